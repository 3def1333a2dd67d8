"""Discrete prompt search, shared by the token attacks (``p4d``, ``unlearndiffatk``): the vocabulary a
free token draws from, prompts with free-token slots, and their differentiable encoding.

A free token is a *word* that every text encoder of the family reads as exactly one token (FLUX: CLIP
and T5; SDXL: both CLIPs; SD3: both CLIPs and T5), so that one discrete prompt is one string: the
found prompt is written to ``prompts.csv`` as text, and ``evaluate --prompts`` (or any pipeline)
tokenises it back into the very tokens the attack optimised. A slot's embedding in each encoder is a
mixture (one-hot at the end) of that encoder's embedding rows of the vocabulary's words, so a
distribution over the shared vocabulary drives all encoders at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..arch import denoiser_of
from ..arch.base import TokenEmbeddings, Trajectory
from ..errors import ConfigError
from .base import (
    Attack,
    AttackConfig,
    AttackResult,
    Erasure,
    Sampling,
    SeedResult,
    TargetPath,
    chunks,
    count_denoiser_calls,
    cycled,
    draw_images,
    erased,
    judge_images,
    target_prompts,
)

#: The word around a candidate when its tokenisation in context is checked.
_CONTEXT = "a"


@dataclass
class Vocabulary:
    """Words every text encoder reads as one token: ``ids[name]`` their token ids and ``tables[name]``
    the embedding rows (``(V, width)``, detached) in the encoder ``name``."""

    words: list[str]
    ids: dict[str, torch.Tensor]
    tables: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.words)

    def embed(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per encoder, the slot embeddings ``weights @ table`` for weights ``(..., V)`` over the words."""
        return {name: weights.to(table.dtype) @ table for name, table in self.tables.items()}


def _single_token_ids(tokenizer: Any, words: list[str]) -> list[int | None]:
    """The one token id of each word, where the word is one token alone and between two context words."""
    alone = tokenizer(words, add_special_tokens=False)["input_ids"]
    context = tokenizer([f"{_CONTEXT} {w} {_CONTEXT}" for w in words], add_special_tokens=False)["input_ids"]
    around = tokenizer(_CONTEXT, add_special_tokens=False)["input_ids"]
    result: list[int | None] = []
    for ids, inside in zip(alone, context):
        ok = len(ids) == 1 and inside == [*around, ids[0], *around]
        result.append(ids[0] if ok else None)
    return result


def names_concept(word: str, concept: str) -> bool:
    """Whether ``word`` (or a text) names ``concept``: it contains one of the concept's words."""
    # a word names the concept when it contains one of the concept's words (circle, circles); short
    # words ("a", "of") count only when the concept has nothing longer
    parts = concept.lower().split()
    parts = [p for p in parts if len(p) >= 3] or parts
    return any(part in word.lower() for part in parts)


def shared_vocabulary(arch: Any, pipe: Any, exclude_concept: str | None = None) -> Vocabulary:
    """The words of the first text encoder's vocabulary that every text encoder reads as one token.

    ``exclude_concept``: leave out the words that name this concept (so the attack cannot simply write
    it). Candidates are the first tokenizer's tokens decoded to text (special tokens and tokens that
    are not a whole word dropped); a word is kept when each tokenizer turns it into one token, alone and
    between two context words.

    Raises:
        UnsupportedError: a family without a text encoder.
        ConfigError: no word is left.
    """
    encoders = arch.text_encoders(pipe)
    first = next(iter(encoders.values()))[0]
    special = set(first.all_special_ids)
    decoded = first.batch_decode([[i] for i in range(len(first)) if i not in special])
    candidates = sorted({text.strip() for text in decoded})
    words = [w for w in candidates if w and not any(c.isspace() for c in w)]
    if exclude_concept:
        words = [w for w in words if not names_concept(w, exclude_concept)]
    vocabulary = vocabulary_of(arch, pipe, words)
    if not vocabulary.words:
        raise ConfigError("no word is a single token in every text encoder of this model; no token to search over")
    return vocabulary


def vocabulary_of(arch: Any, pipe: Any, words: list[str]) -> Vocabulary:
    """The :class:`Vocabulary` of those of ``words`` that every text encoder reads as one token, alone and
    between two context words (in their order; empty when none is)."""
    encoders = arch.text_encoders(pipe)
    per_encoder = {name: _single_token_ids(tokenizer, words) for name, (tokenizer, _) in encoders.items()}
    keep = [i for i in range(len(words)) if all(ids[i] is not None for ids in per_encoder.values())]
    ids = {name: torch.tensor([per_encoder[name][i] for i in keep], dtype=torch.long) for name in encoders}
    tables = {name: table[ids[name].to(table.device)] for name, table in input_embedding_tables(arch, pipe).items()}
    return Vocabulary(words=[words[i] for i in keep], ids=ids, tables=tables)


def input_embedding_tables(arch: Any, pipe: Any) -> dict[str, torch.Tensor]:
    """Each text encoder's input-embedding table (detached), by the encoder's name."""
    return {
        name: encoder.get_input_embeddings().weight.detach() for name, (_, encoder) in arch.text_encoders(pipe).items()
    }


@dataclass
class SlotPrompt:
    """A prompt of fixed text and free-token slots, in order: ``pieces`` holds text or ``None`` (a slot)."""

    pieces: list[str | None]

    @property
    def num_slots(self) -> int:
        return sum(piece is None for piece in self.pieces)

    def render(self, words: Iterable[str]) -> tuple[str, list[tuple[int, int]]]:
        """The text with ``words`` in the slots, and each slot's character span."""
        chosen = iter(words)
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        cursor = 0
        for piece in self.pieces:
            text = next(chosen) if piece is None else piece.strip()
            if not text:
                continue
            if parts:
                cursor += 1  # the joining space
            if piece is None:
                spans.append((cursor, cursor + len(text)))
            parts.append(text)
            cursor += len(text)
        return " ".join(parts), spans


def slot_positions(tokenizer: Any, text: str, spans: list[tuple[int, int]], expected: list[int]) -> torch.Tensor:
    """The token position of each slot in ``tokenizer``'s encoding of ``text`` (special tokens counted).

    Raises:
        RuntimeError: a slot is not exactly the one expected token (the tokenisation is not word by word).
    """
    encoding = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    positions = []
    for (start, stop), want in zip(spans, expected):
        hits = [k for k, (a, b) in enumerate(offsets) if b > a and a < stop and b > start]
        if len(hits) != 1 or ids[hits[0]] != want:
            raise RuntimeError(f"the free token at characters {start}-{stop} of {text!r} is not one token here")
        positions.append(hits[0])
    return torch.tensor(positions, dtype=torch.long)


def encode_slots(
    arch: Any,
    pipe: Any,
    prompt: SlotPrompt,
    vocabulary: Vocabulary,
    tokens: torch.Tensor,
    embeddings: dict[str, torch.Tensor],
    max_sequence_length: int,
    unconditional: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``encode_prompts`` of ``prompt`` with its slots' token embeddings set to ``embeddings[name]``
    (``(B, k, width)`` per encoder), differentiable in them. ``tokens`` (``(B, k)`` vocabulary indices)
    fill the slots of the text that is tokenised (the words whose embeddings stand there once
    projected; any word gives the same positions, since each is one token)."""
    encoders = arch.text_encoders(pipe)
    texts = []
    replace: dict[str, TokenEmbeddings] = {}
    for row in tokens.tolist():
        text, spans = prompt.render(vocabulary.words[i] for i in row)
        texts.append(text)
        for name, (tokenizer, _) in encoders.items():
            positions = slot_positions(tokenizer, text, spans, vocabulary.ids[name][row].tolist())
            if name in replace and not torch.equal(replace[name].positions, positions):
                raise RuntimeError(f"the free tokens of {text!r} are at other positions than the first prompt's")
            replace[name] = TokenEmbeddings(positions, embeddings[name])
    return arch.encode_token_embeddings(pipe, texts, max_sequence_length, replace, unconditional=unconditional)


def prompts_of(prompt: SlotPrompt, vocabulary: Vocabulary, tokens: torch.Tensor) -> list[str]:
    """The text of each row of ``tokens`` (``(B, k)`` vocabulary indices)."""
    return [prompt.render(vocabulary.words[i] for i in row)[0] for row in tokens.tolist()]


# --------------------------------------------------------------------------- the attacks' common frame
def embedding_scaled_groups(
    params: dict[str, torch.Tensor], tables: dict[str, torch.Tensor], lr: float
) -> list[dict[str, Any]]:
    """Optimiser parameter groups with one step size per text encoder: ``lr`` times the standard deviation
    of that encoder's embedding ``tables[name]``. FLUX's CLIP table is 50 times narrower than its T5's, and
    one absolute step throws the CLIP token far outside the words it was trained on."""
    return [{"params": [p], "lr": lr * float(tables[name].std())} for name, p in params.items()]


@dataclass
class TokenAttackConfig(AttackConfig):
    """Settings both token attacks have. ``init_prompt``: the fixed text of the attacked prompt (must
    not name the concept). ``target_prompt``: the prompt whose original-model images are the target
    (default: the concept), or a list of prompts that the search iterations take in turn.
    ``num_tokens``: free tokens. ``allow_concept``: let the free tokens be words that name the concept
    (off: such words are left out of the vocabulary). ``seed``: the search's own randomness (initial
    tokens, timesteps, noise), independent of the image seeds. ``step_fraction``: the search draws its
    sampling steps from this first (noisiest) fraction of the schedule, where the layout of the image is
    decided."""

    init_prompt: str = "a shape"
    target_prompt: str | list[str] | None = None
    num_tokens: int = 5
    lr: float = 0.1
    weight_decay: float = 0.1
    allow_concept: bool = False
    seed: int = 0
    step_fraction: float = 1.0


@dataclass
class Search:
    """What one batch of seeds gives the search: the original model's reference trajectory of each
    target prompt, the negative rows to encode with, and the vocabulary; the erasure is installed while
    the search runs."""

    arch: Any
    pipe: Any
    seeds: list[int]
    sampling: Sampling
    references: list[TargetPath]
    unconditional: dict[str, torch.Tensor]
    vocabulary: Vocabulary
    prompt: SlotPrompt
    generator: torch.Generator
    step_fraction: float = 1.0

    def encode(self, tokens: torch.Tensor, embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The encoding of the prompt with ``tokens`` in its slots and ``embeddings`` as their embeddings."""
        return encode_slots(
            self.arch,
            self.pipe,
            self.prompt,
            self.vocabulary,
            tokens,
            embeddings,
            self.sampling.max_sequence_length,
            unconditional=self.unconditional,
        )

    def trajectory(self, encoded: dict[str, torch.Tensor]) -> Trajectory:
        return self.arch.trajectory(self.pipe, encoded, self.seeds, **self.sampling.as_kwargs())

    def reference_at(self, iteration: int) -> TargetPath:
        """The target of search iteration ``iteration``: the target prompts in turn."""
        return self.references[iteration % len(self.references)]

    def random_step(self) -> int:
        """A sampling step drawn uniformly from the first ``step_fraction`` of the schedule."""
        steps = max(1, round(self.step_fraction * self.references[0].num_steps))
        return int(torch.randint(steps, (1,), generator=self.generator))


class TokenAttack(Attack):
    """A discrete attack: per seed, ``num_tokens`` free words placed in a prompt around ``init_prompt``
    (:meth:`slot_prompt`), searched by :meth:`search` against the erased model; what it finds is a
    prompt, judged from the seed's noise with the erased model."""

    kind = "discrete"
    white_box = True
    needs_original = True
    config_class = TokenAttackConfig
    #: keep the original model's guided predictions along each target trajectory (p4d matches them)
    matches_predictions: bool = False

    def slot_prompt(self, config: TokenAttackConfig) -> SlotPrompt:
        """Where the free tokens go (subclasses: before or after the initial prompt)."""
        raise NotImplementedError

    def search(self, state: Search, budget: int, config: TokenAttackConfig) -> torch.Tensor:
        """Run ``budget`` search iterations with the erasure installed; the tokens found, ``(B, k)``."""
        raise NotImplementedError

    def objective(self, state: Search, prompts: list[str]) -> list[float]:
        """Each row's loss for the found prompts, for ``results.jsonl`` (no gradients)."""
        raise NotImplementedError

    def run(
        self,
        pipe: Any,
        *,
        erasure: Erasure | None,
        concept: str,
        judge: Callable[[Sequence[Image.Image]], Sequence[bool]],
        budget: int,
        seeds: list[int],
        sampling: Sampling,
        config: AttackConfig,
    ) -> AttackResult:
        assert isinstance(config, TokenAttackConfig)
        self._check(config, concept)
        arch, _ = denoiser_of(pipe)
        vocabulary = shared_vocabulary(arch, pipe, exclude_concept=None if config.allow_concept else concept)
        prompt = self.slot_prompt(config)
        targets = target_prompts(config.target_prompt, concept, self.name)
        length = sampling.max_sequence_length
        per_seed: list[SeedResult] = []
        images: list[Image.Image] = []
        pre_images: list[Image.Image] = []
        found: list[str] = []
        # before the attack, each seed shows the erased model one target prompt (the prompts in turn)
        before = cycled(targets, len(seeds))
        with count_denoiser_calls(pipe) as counter:
            for chunk in chunks(seeds, config.batch_size):
                rows, done = len(chunk), len(per_seed)
                with torch.no_grad():
                    start = arch.encode_prompts(pipe, [config.init_prompt] * rows, length)
                    # the original model's trajectory of each target prompt (no erasure installed here)
                    references = [
                        TargetPath.of(
                            arch.trajectory(
                                pipe, arch.encode_prompts(pipe, [target] * rows, length), chunk, **sampling.as_kwargs()
                            ),
                            self.matches_predictions,
                        )
                        for target in targets
                    ]
                state = Search(
                    arch=arch,
                    pipe=pipe,
                    seeds=chunk,
                    sampling=sampling,
                    references=references,
                    unconditional=start,
                    vocabulary=vocabulary,
                    prompt=prompt,
                    generator=torch.Generator().manual_seed(config.seed),
                    step_fraction=config.step_fraction,
                )
                with erased(pipe, erasure):
                    concept_rows = arch.encode_prompts(pipe, before[done : done + rows], length)
                    pre = draw_images(arch, pipe, concept_rows, chunk, sampling)
                    start_images = draw_images(arch, pipe, start, chunk, sampling)
                    tokens = self.search(state, budget, config)
                    prompts = prompts_of(prompt, vocabulary, tokens)
                    with torch.no_grad():
                        post = draw_images(arch, pipe, arch.encode_prompts(pipe, prompts, length), chunk, sampling)
                    losses = self.objective(state, prompts)
                pre_hits, start_hits, post_hits = (judge_images(judge, x) for x in (pre, start_images, post))
                for row, seed in enumerate(chunk):
                    per_seed.append(
                        SeedResult(
                            seed=seed,
                            pre_success=pre_hits[row],
                            post_success=post_hits[row],
                            budget_used=budget,
                            loss=losses[row],
                            start_success=start_hits[row],
                        )
                    )
                images.extend(post)
                pre_images.extend(pre)
                found.extend(prompts)
        return self.result(
            concept,
            judge,
            budget,
            seeds,
            sampling,
            config,
            erasure,
            per_seed=per_seed,
            images=images,
            pre_images=pre_images,
            denoiser_calls=counter.calls,
            prompts=found,
            extra={"vocabulary_size": len(vocabulary)},
        )

    def _check(self, config: TokenAttackConfig, concept: str) -> None:
        if config.stop_on_success:
            raise ConfigError(f"{self.name} does not stop on the judge; leave stop_on_success off")
        if isinstance(config.num_tokens, bool) or not isinstance(config.num_tokens, int) or config.num_tokens < 1:
            raise ConfigError(f"{self.name} num_tokens must be a positive integer, got {config.num_tokens!r}")
        if not 0 < config.step_fraction <= 1:
            raise ConfigError(f"{self.name} step_fraction must be in (0, 1], got {config.step_fraction!r}")
        if not config.allow_concept and names_concept(config.init_prompt, concept):
            raise ConfigError(
                f"the {self.name} init_prompt {config.init_prompt!r} names the concept {concept!r}; "
                "start from a prompt that does not"
            )
