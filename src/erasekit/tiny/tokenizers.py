"""Offline tokenizers for tiny test pipelines.

Two builders are provided, both working without any download:

* :func:`build_clip_tokenizer` -- the real CLIP byte-level BPE (49408 tokens), built from
  the ``bpe_simple_vocab_16e6.txt.gz`` merges file that ships with ``open_clip``.
* :func:`build_t5_tokenizer` -- a small T5-style SentencePiece-like Unigram tokenizer
  (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, ``</s>`` appended to every sequence) whose
  pieces are derived deterministically from the CLIP vocabulary (no training).

Both return ``transformers`` tokenizer objects (``CLIPTokenizer`` / ``T5Tokenizer`` in
transformers v5, ``CLIPTokenizerFast`` / ``T5TokenizerFast`` in v4) that round-trip
through ``save_pretrained`` / ``from_pretrained`` and are accepted by ``FluxPipeline``.

Note on transformers v5: ``CLIPTokenizer`` and ``T5Tokenizer`` rebuild their normalizer
and pre-tokenizer in ``__init__`` when they are loaded and only take the vocabulary (and
merges) from ``tokenizer.json``. So with v5 the wrappers are constructed from the
vocabulary itself, which makes the tokenizer behave identically before and after a
save/load round trip; the ``tokenizers`` backends built here
(:func:`build_clip_backend`, :func:`build_t5_backend`) use the same configuration and
are what gets wrapped with transformers v4. This is also why the T5 tokenizer has to be
a Unigram model: v5 ``T5Tokenizer`` can only load a Unigram vocabulary.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any

import transformers
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

__all__ = [
    "CLIP_BOS_TOKEN",
    "CLIP_EOS_TOKEN",
    "CLIP_VOCAB_SIZE",
    "build_clip_backend",
    "build_clip_tokenizer",
    "build_t5_backend",
    "build_t5_tokenizer",
    "clip_bpe_vocab_path",
    "clip_tokenizer_from_vocab",
    "t5_tokenizer_from_pieces",
    "clip_vocab_and_merges",
    "t5_pieces",
]

CLIP_BOS_TOKEN = "<|startoftext|>"
CLIP_EOS_TOKEN = "<|endoftext|>"
#: 256 byte symbols + 256 end-of-word byte symbols + 48894 merges + 2 specials.
CLIP_VOCAB_SIZE = 49408
_CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2

#: Pre-tokenization regex of CLIP (applied after lower-casing).
_CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

_T5_PAD, _T5_EOS, _T5_UNK = "<pad>", "</s>", "<unk>"
_SPIECE_UNDERLINE = "\u2581"  # "▁", SentencePiece's word-start marker

_VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"


def _transformers_major() -> int:
    match = re.match(r"(\d+)", transformers.__version__)
    return int(match.group(1)) if match else 0


# --------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------


def clip_bpe_vocab_path() -> Path:
    """Return the path of the CLIP BPE merges file shipped with ``open_clip``.

    The package is located with :func:`importlib.util.find_spec` and never imported
    (importing ``open_clip`` pulls in ``torchvision``). The environment variable
    ``ERASEKIT_CLIP_BPE_VOCAB`` overrides the location.

    Returns:
        Path to ``bpe_simple_vocab_16e6.txt.gz``.

    Raises:
        FileNotFoundError: if neither the override nor ``open_clip`` provides the file.
    """
    override = os.environ.get("ERASEKIT_CLIP_BPE_VOCAB")
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"ERASEKIT_CLIP_BPE_VOCAB={override!r} is not a file")
        return path
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / _VOCAB_FILE_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"Cannot find the CLIP BPE vocabulary {_VOCAB_FILE_NAME!r}: install it with "
        "`pip install --no-deps open_clip_torch` (only the data file is used) or set "
        "ERASEKIT_CLIP_BPE_VOCAB to its path."
    )


def _bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character (GPT-2 / CLIP byte-level scheme).

    Bytes that are already printable and not whitespace map to themselves; the remaining
    68 bytes map to ``chr(256 + n)`` in increasing byte order. The insertion order of the
    result (printable bytes first) is the order of the first 256 CLIP vocabulary ids.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    offset = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + offset)
            offset += 1
    return mapping


@functools.lru_cache(maxsize=4)
def _read_clip_vocab(path: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # Line 0 is a version header; CLIP uses exactly the first 48894 merges after it.
    merges = tuple(tuple(line.split()) for line in lines[1 : 1 + _CLIP_NUM_MERGES])
    if len(merges) != _CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} does not look like the CLIP BPE merges file")
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m) for m in merges]
    tokens += [CLIP_BOS_TOKEN, CLIP_EOS_TOKEN]
    if len(tokens) != CLIP_VOCAB_SIZE or len(set(tokens)) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{path}: unexpected CLIP vocabulary ({len(tokens)} tokens)")
    return tuple(tokens), merges  # type: ignore[return-value]


def clip_vocab_and_merges(
    vocab_path: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read the CLIP BPE vocabulary and merge list.

    Args:
        vocab_path: the ``bpe_simple_vocab_16e6.txt.gz`` file; default
            :func:`clip_bpe_vocab_path`.

    Returns:
        ``(vocab, merges)``: token -> id (49408 entries, ``<|startoftext|>`` = 49406,
        ``<|endoftext|>`` = 49407) and the 48894 merges in rank order.
    """
    path = Path(vocab_path) if vocab_path is not None else clip_bpe_vocab_path()
    tokens, merges = _read_clip_vocab(str(path))
    return {token: i for i, token in enumerate(tokens)}, list(merges)


def build_clip_backend(vocab_path: str | os.PathLike[str] | None = None) -> Tokenizer:
    """Build the CLIP tokenizer as a raw ``tokenizers.Tokenizer``.

    Byte-level BPE with ``</w>`` end-of-word suffix; NFC + whitespace collapsing +
    lower-casing; CLIP's pre-tokenization regex; ``<|startoftext|> ... <|endoftext|>``
    added around every sequence. No padding or truncation is configured.

    Args:
        vocab_path: see :func:`clip_vocab_and_merges`.

    Returns:
        The backend tokenizer (49408 tokens).
    """
    vocab, merges = clip_vocab_and_merges(vocab_path)
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=CLIP_EOS_TOKEN,
        )
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([CLIP_BOS_TOKEN, CLIP_EOS_TOKEN])
    backend.post_processor = processors.RobertaProcessing(
        (CLIP_EOS_TOKEN, vocab[CLIP_EOS_TOKEN]),
        (CLIP_BOS_TOKEN, vocab[CLIP_BOS_TOKEN]),
        trim_offsets=False,
        add_prefix_space=False,
    )
    return backend


def _clip_special_tokens(max_length: int) -> dict[str, Any]:
    return {
        "bos_token": CLIP_BOS_TOKEN,
        "eos_token": CLIP_EOS_TOKEN,
        "pad_token": CLIP_EOS_TOKEN,
        "unk_token": CLIP_EOS_TOKEN,
        "model_max_length": max_length,
    }


def clip_tokenizer_from_vocab(vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = 77) -> Any:
    """A ``transformers.CLIPTokenizer`` (v5) over any CLIP-style byte-level BPE vocabulary.

    ``vocab`` must hold ``<|startoftext|>`` and ``<|endoftext|>`` (eos = pad = unk, as in CLIP).
    """
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, **_clip_special_tokens(max_length))


def build_clip_tokenizer(max_length: int = 77, vocab_path: str | os.PathLike[str] | None = None) -> Any:
    """Build the real CLIP (ViT-L/14, as used by FLUX) tokenizer locally.

    Args:
        max_length: ``model_max_length`` of the tokenizer; ``FluxPipeline`` pads and
            truncates CLIP prompts to it, so the CLIP text encoder needs at least this many
            position embeddings.
        vocab_path: see :func:`clip_vocab_and_merges`.

    Returns:
        A ``transformers.CLIPTokenizer`` (v5) / ``CLIPTokenizerFast`` (v4) with bos id
        49406, eos (= pad = unk) id 49407 and 49408 tokens.
    """
    if _transformers_major() >= 5:
        vocab, merges = clip_vocab_and_merges(vocab_path)
        tokenizer = clip_tokenizer_from_vocab(vocab, merges, max_length)
    else:  # pragma: no cover - transformers v4
        tokenizer = transformers.CLIPTokenizerFast(
            tokenizer_object=build_clip_backend(vocab_path), **_clip_special_tokens(max_length)
        )
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer has {len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tokenizer


# --------------------------------------------------------------------------------------
# T5
# --------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[a-z]+")
_SUBWORD_RE = re.compile(r"[a-z]{2,6}")
# Every printable ASCII character except space, so any ASCII text can be segmented.
_ASCII_CHARS = [chr(c) for c in range(33, 127)]


@functools.lru_cache(maxsize=8)
def _t5_pieces(vocab_size: int, num_subwords: int, extra_ids: int, path: str) -> tuple[tuple[str, float], ...]:
    tokens, _ = _read_clip_vocab(path)
    pieces: list[tuple[str, float]] = [(_T5_PAD, 0.0), (_T5_EOS, 0.0), (_T5_UNK, 0.0)]
    seen = {_T5_PAD, _T5_EOS, _T5_UNK}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    # Character coverage (low scores: only used when nothing longer matches).
    add(_SPIECE_UNDERLINE, -10.0)
    for char in _ASCII_CHARS:
        add(char, -12.0)
        add(_SPIECE_UNDERLINE + char, -12.0)
    if len(pieces) + extra_ids + num_subwords > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for {len(pieces)} base pieces, "
            f"{num_subwords} subwords and {extra_ids} extra ids"
        )
    # Word-internal pieces: short lower-case BPE tokens in merge order (frequent first).
    budget = len(pieces) + num_subwords
    rank = 0
    for token in tokens[512:]:
        if len(pieces) >= budget:
            break
        stem = token[:-4] if token.endswith("</w>") else token
        if _SUBWORD_RE.fullmatch(stem) and stem not in seen:
            add(stem, -(6.0 + math.log1p(rank)))
            rank += 1
    # Whole words: CLIP tokens that form a complete lower-case word, in merge order.
    budget = vocab_size - extra_ids
    rank = 0
    for token in tokens[512:]:
        if len(pieces) >= budget:
            break
        if token.endswith("</w>") and _WORD_RE.fullmatch(token[:-4]):
            piece = _SPIECE_UNDERLINE + token[:-4]
            if piece not in seen:
                add(piece, -(3.0 + math.log1p(rank)))
                rank += 1
    # Sentinel tokens at the end, highest id = <extra_id_0>, as in the real T5 vocabulary.
    for i in reversed(range(extra_ids)):
        add(f"<extra_id_{i}>", 0.0)
    if len(pieces) != vocab_size:
        raise ValueError(f"could only build {len(pieces)} pieces for vocab_size={vocab_size}")
    return tuple(pieces)


def t5_pieces(
    vocab_size: int = 8192,
    num_subwords: int = 512,
    extra_ids: int = 0,
    vocab_path: str | os.PathLike[str] | None = None,
) -> list[tuple[str, float]]:
    """Build the Unigram ``(piece, log-probability)`` list of the tiny T5 tokenizer.

    Layout: ``<pad>``, ``</s>``, ``<unk>``; ``▁`` and all printable ASCII characters
    (bare and ``▁``-prefixed) as low-scored fall-backs; ``num_subwords`` short
    word-internal pieces; then whole lower-case words (``▁word``) taken from the CLIP BPE
    vocabulary in merge order (roughly by frequency) until ``vocab_size - extra_ids``;
    finally ``extra_ids`` sentinels ``<extra_id_N>`` in reverse order. Scores decrease
    with rank so that Viterbi segmentation prefers whole words.

    Args:
        vocab_size: total number of pieces (= ``len(tokenizer)``).
        num_subwords: number of word-internal pieces.
        extra_ids: number of T5 sentinel tokens.
        vocab_path: see :func:`clip_vocab_and_merges`.

    Returns:
        ``vocab_size`` ``(piece, score)`` pairs; the index of a pair is its token id.
    """
    path = Path(vocab_path) if vocab_path is not None else clip_bpe_vocab_path()
    return list(_t5_pieces(vocab_size, num_subwords, extra_ids, str(path)))


def build_t5_backend(
    vocab_size: int = 8192,
    num_subwords: int = 512,
    extra_ids: int = 0,
    vocab_path: str | os.PathLike[str] | None = None,
) -> Tokenizer:
    """Build the tiny T5 tokenizer as a raw ``tokenizers.Tokenizer``.

    Unigram model over :func:`t5_pieces` (unk id 2), whitespace splitting + ``▁``
    Metaspace (no normalizer, so it is case-sensitive like T5: upper-case letters fall
    back to characters), ``</s>`` appended to every sequence.

    Args:
        vocab_size, num_subwords, extra_ids, vocab_path: see :func:`t5_pieces`.

    Returns:
        The backend tokenizer.
    """
    pieces = t5_pieces(vocab_size, num_subwords, extra_ids, vocab_path)
    backend = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=_SPIECE_UNDERLINE, prepend_scheme="always", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement=_SPIECE_UNDERLINE, prepend_scheme="always", split=True)
    backend.add_special_tokens([_T5_PAD, _T5_EOS, _T5_UNK])
    backend.add_special_tokens([f"<extra_id_{i}>" for i in range(extra_ids)])
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", _T5_EOS],
        pair=["$A", _T5_EOS, "$B", _T5_EOS],
        special_tokens=[(_T5_EOS, 1)],
    )
    return backend


def build_t5_tokenizer(
    vocab_size: int = 8192,
    max_length: int = 512,
    num_subwords: int = 512,
    extra_ids: int = 0,
    vocab_path: str | os.PathLike[str] | None = None,
) -> Any:
    """Build a small T5-style tokenizer locally (no download, no training).

    Args:
        vocab_size: number of tokens (use it as the T5 encoder's ``vocab_size``).
        max_length: ``model_max_length`` (FLUX uses 512 for its T5 tokenizer).
        num_subwords: number of word-internal pieces, see :func:`t5_pieces`.
        extra_ids: number of ``<extra_id_N>`` sentinels (real T5 has 100; FLUX never uses
            them).
        vocab_path: see :func:`clip_vocab_and_merges`.

    Returns:
        A ``transformers.T5Tokenizer`` (v5) / ``T5TokenizerFast`` (v4) with ``<pad>`` = 0,
        ``</s>`` = 1 (appended to every sequence) and ``<unk>`` = 2.
    """
    if _transformers_major() >= 5:
        pieces = t5_pieces(vocab_size, num_subwords, extra_ids, vocab_path)
        tokenizer = t5_tokenizer_from_pieces(pieces, max_length, extra_ids)
    else:  # pragma: no cover - transformers v4
        tokenizer = transformers.T5TokenizerFast(
            tokenizer_object=build_t5_backend(vocab_size, num_subwords, extra_ids, vocab_path),
            **_t5_special_tokens(max_length, extra_ids),
        )
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"T5 tokenizer has {len(tokenizer)} tokens, expected {vocab_size}")
    return tokenizer


def t5_tokenizer_from_pieces(pieces: list[tuple[str, float]], max_length: int = 512, extra_ids: int = 0) -> Any:
    """A ``transformers.T5Tokenizer`` (v5) over any Unigram ``(piece, score)`` list.

    The list must start with ``<pad>``, ``</s>``, ``<unk>`` (ids 0, 1, 2) and end with the
    ``extra_ids`` sentinels, as :func:`t5_pieces` lays it out.
    """
    return transformers.T5Tokenizer(vocab=pieces, **_t5_special_tokens(max_length, extra_ids))


def _t5_special_tokens(max_length: int, extra_ids: int) -> dict[str, Any]:
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    return {
        "pad_token": _T5_PAD,
        "eos_token": _T5_EOS,
        "unk_token": _T5_UNK,
        "extra_ids": extra_ids,
        "additional_special_tokens": sentinels or None,
        "model_max_length": max_length,
    }
