"""Tests of the tiny FLUX pipeline factory and its offline tokenizers."""

from __future__ import annotations

import gzip
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers
from diffusers import DiffusionPipeline, FluxPipeline

from erasekit.tiny import (
    SPEC_FILE_NAME,
    TinyFluxSpec,
    build_clip_tokenizer,
    build_t5_tokenizer,
    build_tiny_flux_pipeline,
    save_tiny_flux_pipeline,
)
from erasekit.tiny.tokenizers import build_clip_backend, build_t5_backend, clip_bpe_vocab_path

MODEL_NAMES = ("transformer", "vae", "text_encoder", "text_encoder_2")
PROMPT = "a photo of a cat"


def _state_dicts(pipe: FluxPipeline) -> dict[str, dict[str, torch.Tensor]]:
    return {name: getattr(pipe, name).state_dict() for name in MODEL_NAMES}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _realign(pipe: FluxPipeline) -> None:
    """Replace every parameter/buffer by a freshly allocated copy (same bits)."""
    with torch.no_grad():
        for name in MODEL_NAMES:
            for tensor in [*getattr(pipe, name).parameters(), *getattr(pipe, name).buffers()]:
                tensor.data = tensor.data.clone()


def _generate(pipe: FluxPipeline, prompt: str | list[str] = PROMPT, size: int = 32, steps: int = 2) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt,
        num_inference_steps=steps,
        height=size,
        width=size,
        guidance_scale=0.0,
        max_sequence_length=32,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
    ).images


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    return build_tiny_flux_pipeline()


@pytest.fixture(scope="module")
def saved_path(tmp_path_factory: pytest.TempPathFactory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-flux")


# --------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------


def test_build_is_deterministic(pipe: FluxPipeline) -> None:
    same = build_tiny_flux_pipeline(seed=0)
    other = build_tiny_flux_pipeline(seed=1)
    ref = _state_dicts(pipe)
    for name, weights in _state_dicts(same).items():
        _assert_same_weights(ref[name], weights)
    for name, weights in _state_dicts(other).items():
        assert any(not torch.equal(ref[name][k], weights[k]) for k in weights), name


def test_components_are_seeded_independently() -> None:
    spec = TinyFluxSpec(vae_block_out_channels=(8, 16), clip_num_layers=1)
    a = build_tiny_flux_pipeline()
    b = build_tiny_flux_pipeline(spec)
    _assert_same_weights(a.transformer.state_dict(), b.transformer.state_dict())
    _assert_same_weights(a.text_encoder_2.state_dict(), b.text_encoder_2.state_dict())


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build_tiny_flux_pipeline(seed=5)
    assert torch.equal(before, torch.get_rng_state())


def test_pipeline_config(pipe: FluxPipeline) -> None:
    spec = TinyFluxSpec()
    assert pipe.transformer.config.in_channels == 4 * spec.latent_channels
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert sum(pipe.transformer.config.axes_dims_rope) == pipe.transformer.config.attention_head_dim
    assert not pipe.transformer.config.guidance_embeds
    assert pipe.vae_scale_factor == spec.vae_scale_factor == 8
    assert pipe.vae.config.shift_factor == spec.vae_shift_factor
    assert pipe.scheduler.config.shift == 1.0
    assert not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.text_encoder_2.config.vocab_size == len(pipe.tokenizer_2)
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == 49408
    assert all(not getattr(pipe, name).training for name in MODEL_NAMES)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="axes_dims_rope"):
        TinyFluxSpec(attention_head_dim=32)
    with pytest.raises(ValueError, match="vae_norm_num_groups"):
        TinyFluxSpec(vae_block_out_channels=(6, 8))
    spec = TinyFluxSpec(num_layers=1, attention_head_dim=32, axes_dims_rope=[8, 12, 12])
    assert TinyFluxSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_bfloat16_build() -> None:
    pipe = build_tiny_flux_pipeline(TinyFluxSpec(num_single_layers=0), dtype=torch.bfloat16)
    for name in MODEL_NAMES:
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.bfloat16}, name


# --------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------


def test_call_gives_finite_image(pipe: FluxPipeline) -> None:
    image = _generate(pipe)
    assert image.shape == (1, 32, 32, 3)
    assert image.dtype == np.float32
    assert np.isfinite(image).all()
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image.std() > 0.0


def test_call_batch_non_square_and_prompt_dependence(pipe: FluxPipeline) -> None:
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [PROMPT, "a painting of a dog"],
        num_inference_steps=2,
        height=32,
        width=48,
        guidance_scale=0.0,
        max_sequence_length=16,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
    ).images
    assert images.shape == (2, 32, 48, 3)
    assert np.isfinite(images).all()
    assert not np.array_equal(images[0], images[1])


def test_call_is_reproducible(pipe: FluxPipeline) -> None:
    np.testing.assert_array_equal(_generate(pipe), _generate(pipe))


# --------------------------------------------------------------------------------------
# saving / loading
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", [FluxPipeline, DiffusionPipeline])
def test_save_and_reload(loader, saved_path, pipe: FluxPipeline) -> None:
    assert (saved_path / "model_index.json").is_file()
    meta = json.loads((saved_path / SPEC_FILE_NAME).read_text())
    assert meta["seed"] == 0 and TinyFluxSpec.from_dict(meta["spec"]) == TinyFluxSpec()
    assert not [p for p in saved_path.parent.iterdir() if p.name.startswith(".")]

    loaded = loader.from_pretrained(saved_path)
    assert isinstance(loaded, FluxPipeline)
    ref = _state_dicts(pipe)
    for name, weights in _state_dicts(loaded).items():
        _assert_same_weights(ref[name], weights)
    for name in ("tokenizer", "tokenizer_2"):
        assert type(getattr(loaded, name)) is type(getattr(pipe, name))
        text = "A photo of a Cat, snoopy's 1girl!!  café"
        assert getattr(loaded, name)(text).input_ids == getattr(pipe, name)(text).input_ids
    assert loaded.scheduler.config.shift == pipe.scheduler.config.shift
    expected = _generate(pipe)
    # Loaded weights live in (memory-mapped) safetensors buffers that are not 64-byte
    # aligned, and CPU GEMM kernels may then round differently (~1e-7).
    np.testing.assert_allclose(_generate(loaded), expected, rtol=0, atol=1e-5)
    # With freshly allocated copies of the same bits, the images are identical.
    _realign(loaded)
    np.testing.assert_array_equal(_generate(loaded), expected)


def test_save_refuses_non_empty_target(tmp_path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(ValueError, match="non-empty"):
        save_tiny_flux_pipeline(tmp_path / "full")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        save_tiny_flux_pipeline(tmp_path / "file")
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]


def test_save_into_empty_folder(tmp_path) -> None:
    small = TinyFluxSpec(num_layers=1, num_single_layers=0, vae_block_out_channels=(4, 4), t5_vocab_size=1024)
    (tmp_path / "empty").mkdir()
    out = save_tiny_flux_pipeline(tmp_path / "empty", spec=small, seed=3)
    assert out == (tmp_path / "empty").absolute()
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# --------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------

_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _reference_clip_ids(texts: list[str]) -> list[list[int]]:
    """Independent re-implementation of CLIP's ``SimpleTokenizer`` (minus ftfy/html)."""
    regex = pytest.importorskip("regex")
    with gzip.open(clip_bpe_vocab_path(), "rt", encoding="utf-8") as handle:
        merges = [tuple(line.split()) for line in handle.read().split("\n")[1 : 49152 - 256 - 2 + 1]]
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_char = {b: chr(b) for b in keep}
    byte_char.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in byte_char)})
    symbols = list(byte_char.values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {token: i for i, token in enumerate(vocab)}
    ranks = {pair: i for i, pair in enumerate(merges)}

    def bpe(token: str) -> list[str]:
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    out = []
    for text in texts:
        text = " ".join(text.split()).lower()
        ids = [encoder["<|startoftext|>"]]
        for token in regex.findall(_CLIP_PATTERN, text):
            if token in encoder and token.startswith("<|"):
                ids.append(encoder[token])
                continue
            ids += [encoder[piece] for piece in bpe("".join(byte_char[b] for b in token.encode("utf-8")))]
        out.append(ids + [encoder["<|endoftext|>"]])
    return out


CLIP_TEXTS = [
    PROMPT,
    "A  PHOTO of a Cat!!  snoopy's   1girl, 1234 café",
    "van gogh style church; parachute -- garbage truck (english springer) at 3:45pm",
    "naïve 東京 emoji 🙂 tabs\tand\nnewlines",
]


def test_clip_tokenizer_ids() -> None:
    tok = build_clip_tokenizer()
    assert isinstance(tok, transformers.PreTrainedTokenizerBase)
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    ids = tok(PROMPT).input_ids
    # Same ids as openai/clip-vit-large-patch14: "a"=320, "photo"=1125, "of"=539, "cat"=2368.
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.convert_ids_to_tokens(ids[5]) == "cat</w>"
    got = [tok(t).input_ids for t in CLIP_TEXTS]
    assert got == _reference_clip_ids(CLIP_TEXTS)
    assert [e.ids for e in build_clip_backend().encode_batch(CLIP_TEXTS)] == got
    padded = tok(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT


def test_t5_tokenizer() -> None:
    tok = build_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    ids = tok(PROMPT).input_ids
    assert ids[-1] == 1 and len(ids) == 6  # one piece per word + </s>
    assert tok.convert_ids_to_tokens(ids[:-1]) == ["\u2581a", "\u2581photo", "\u2581of", "\u2581a", "\u2581cat"]
    padded = tok(PROMPT, padding="max_length", max_length=10, truncation=True)
    assert padded.input_ids == ids + [0] * 4
    assert padded.attention_mask == [1] * 6 + [0] * 4
    mixed = tok("A Cat, cyberpunk 1girl é").input_ids
    assert mixed[-1] == 1 and 2 in mixed and 0 not in mixed
    assert tok.decode(tok("a Cat, cyberpunk").input_ids, skip_special_tokens=True) == "a Cat, cyberpunk"
    assert build_t5_backend(vocab_size=8192).encode("A Cat, cyberpunk 1girl é").ids == mixed


def test_t5_tokenizer_sentinels() -> None:
    tok = build_t5_tokenizer(vocab_size=1100, extra_ids=100)
    assert len(tok) == 1100
    assert tok.convert_tokens_to_ids("<extra_id_0>") == 1099
    assert tok.convert_tokens_to_ids("<extra_id_99>") == 1000
    assert tok("a <extra_id_3> cat").input_ids[-1] == 1


@pytest.mark.parametrize("builder", [build_clip_tokenizer, build_t5_tokenizer])
def test_tokenizer_round_trip(builder, tmp_path) -> None:
    tok = builder()
    tok.save_pretrained(tmp_path)
    loaded = type(tok).from_pretrained(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(auto) is type(tok)
    assert len(loaded) == len(tok) and loaded.model_max_length == tok.model_max_length
    for text in CLIP_TEXTS:
        expected = tok(text, padding="max_length", max_length=64, truncation=True).input_ids
        assert loaded(text, padding="max_length", max_length=64, truncation=True).input_ids == expected
        assert auto(text, padding="max_length", max_length=64, truncation=True).input_ids == expected
