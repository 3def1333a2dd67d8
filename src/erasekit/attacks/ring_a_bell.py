"""``ring-a-bell`` and ``ring-a-bell-embedding``: the concept vector of Ring-a-Bell (Tsai et al., ICLR'24).

Threat model: the attacker holds only a copy of the model's text encoder, never the erased denoiser.

**Concept vector.** ``v`` = the mean, over prompt pairs that differ only in the concept, of the
difference of their text-encoder outputs: ``mean(E(with) - E(without))``. The paper's ``E`` is
CLIP-L's output; ``outputs`` names the outputs used (default: on FLUX the pooled embedding, which is
CLIP-L's there, the T5 sequence being outside the paper's threat model; elsewhere every text-encoder
output the family has, the whole padded sequence and the pooled embedding). The pairs are the
user's (``pairs``: a CSV file with columns ``with_concept,without_concept``, or a list of pairs);
``erasekit attack --world shapes`` gives the world's templates, filled once with the concept and once
with each other value of its attribute. The target is ``E(start_prompt) + strength * v``.

``ring-a-bell`` (discrete) searches ``length`` token ids of the pipeline's first tokenizer with the
paper's genetic algorithm: a population of ``population`` random prompts; every generation each is
scored by its fitness, the squared distance of its encoding to the target (the text the ids decode
to is encoded, so the score is that of the prompt written to ``prompts.csv``); the best ``elites``
(half the population) are kept; each elite, with probability ``crossover_rate``, is crossed with
another at one random cut (both children join); then every member, elites included, has one token
replaced by a random one with probability ``mutation_rate``. The prompt found is the best one scored
during the search; one search serves every noise seed (the search never sees the noise). Budget:
generations (each scores the whole population: about ``population`` fitness evaluations; prompts
already scored are not encoded again); default 100 (the paper's 3000 is for CLIP-L's 49,408 tokens;
on ShapesCanvas the best distance stops moving by about 100, tuning seeds 7000-7015: 202 after 100
generations, 200 after 300, and the circles did not increase).

Departures from the official notebook (``InversePrompt.ipynb``): the cut leaves both parents at least
one token (the notebook's cut may copy the whole mate); the best prompt of the whole search is kept
rather than the best of the last generation; a candidate whose text contains the concept's word
anywhere (also glued to other characters) is never chosen (``ban_concept``; the erased model's answer
to the word itself is the pre-attack rate).

``ring-a-bell-embedding`` (continuous) is the reproduction RECE calls Ring-a-Bell: no search, the
target ``E(start_prompt) + strength * v`` is fed to the denoiser directly (it need not be the encoding
of any prompt). Its budget is 1 (one embedding).

Neither looks at the erased model or the judge while it builds its prompt or embedding, so
``stop_on_success`` is refused. The concept vector and the search use the text encoder with the
erasure removed (the attacker's copy); the images are drawn with the erasure installed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..arch import denoiser_of
from ..data.concepts import concept_pattern
from ..errors import ConfigError
from .base import (
    Attack,
    AttackConfig,
    AttackResult,
    Erasure,
    Sampling,
    SeedResult,
    chunks,
    count_denoiser_calls,
    draw_images,
    erased,
    judge_images,
    register_attack,
)
from .soft_prompt import OPTIMISED_KEYS

#: Columns of a pairs CSV file.
PAIR_COLUMNS = ("with_concept", "without_concept")
#: The paper's number of free tokens (K); capped by the text length the model reads.
PAPER_LENGTH = 16
#: Prompts encoded per text-encoder call while the concept vector is built.
ENCODE_BATCH = 256
#: Per family, the text-encoder outputs that are CLIP-L's (Ring-a-Bell's space) when the family has others
#: too; a family not named uses every output it has.
CLIP_OUTPUTS: dict[str, tuple[str, ...]] = {"flux": ("pooled_prompt_embeds",)}

Encoder = Callable[[list[str]], Mapping[str, torch.Tensor]]


# --------------------------------------------------------------------------- settings
@dataclass
class RingABellEmbeddingConfig(AttackConfig):
    """``start_prompt``: the prompt the target starts from (must not name the concept).
    ``concept_prompt``: the prompt of the pre-attack images (default: the concept). ``strength``: the
    concept vector's coefficient (the paper's 3 for nudity). ``pairs``: a CSV file (columns
    ``with_concept,without_concept``) or a list of ``[with, without]`` prompt pairs. ``outputs``: the
    text-encoder outputs the vector and the distance use (``prompt_embeds``, ``pooled_prompt_embeds``;
    default: :data:`CLIP_OUTPUTS` for the family, else all)."""

    start_prompt: str = "a shape"
    concept_prompt: str | None = None
    strength: float = 3.0
    pairs: str | list[Any] | None = None
    outputs: list[str] | None = None


@dataclass
class RingABellConfig(RingABellEmbeddingConfig):
    """The genetic search (the paper's settings): ``length`` free tokens (default 16, at most the
    text length minus the start and end tokens), ``population``, ``elites`` kept each generation
    (default half the population), ``crossover_rate``, ``mutation_rate``, the search's own ``seed``,
    and ``ban_concept`` (candidates whose text contains the concept's word are never chosen).
    ``words_only``: draw only tokens that are whole alphabetic words (CLIP's ``</w>`` ending,
    SentencePiece's ``▁`` start), not word pieces, bytes or punctuation (the paper draws any token)."""

    length: int | None = None
    population: int = 200
    elites: int | None = None
    crossover_rate: float = 0.5
    mutation_rate: float = 0.25
    seed: int = 0
    ban_concept: bool = True
    words_only: bool = False


# --------------------------------------------------------------------------- the concept vector
def load_pairs(pairs: str | Path | Sequence[Any] | None) -> list[tuple[str, str]]:
    """The prompt pairs of a ``pairs`` setting: a CSV file with columns ``with_concept,without_concept``,
    or a sequence of two-prompt pairs.

    Raises:
        ConfigError: none given, an unreadable file, a missing column, a pair that is not two
            non-empty prompts, or no pairs at all.
    """
    if pairs is None:
        raise ConfigError(
            "ring-a-bell needs prompt pairs with and without the concept: --set pairs=FILE.csv "
            f"(columns {','.join(PAIR_COLUMNS)}); --world shapes gives the world's"
        )
    if isinstance(pairs, (str, Path)):
        path = Path(pairs)
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
                header = rows[0].keys() if rows else []
        except OSError as error:
            raise ConfigError(f"cannot read the pairs file {str(path)!r}: {error.strerror or error}") from None
        missing = [c for c in PAIR_COLUMNS if c not in header]
        if rows and missing:
            raise ConfigError(f"the pairs file {str(path)!r} has no column {', '.join(missing)}")
        found = [(row[PAIR_COLUMNS[0]], row[PAIR_COLUMNS[1]]) for row in rows]
    else:
        found = [tuple(pair) if isinstance(pair, (list, tuple)) else (pair,) for pair in pairs]  # type: ignore[misc]
    for pair in found:
        if len(pair) != 2 or not all(isinstance(p, str) and p.strip() for p in pair):
            raise ConfigError(f"a concept pair must be two non-empty prompts (with, without the concept), got {pair!r}")
    if not found:
        raise ConfigError("no concept pairs given; the concept vector needs at least one")
    return [(a, b) for a, b in found]  # type: ignore[misc]


def concept_vector(
    encode: Encoder,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = ENCODE_BATCH,
    outputs: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Ring-a-Bell's concept vector: per text-encoder output (``outputs``, default ``prompt_embeds`` and
    ``pooled_prompt_embeds`` where ``encode`` returns them), the mean over ``pairs`` of
    ``E(with) - E(without)``, one row without the batch dimension (accumulated in float64, returned in
    the encoder's dtype).

    Raises:
        ConfigError: no pairs, or ``encode`` returns no text-encoder output.
    """
    if not pairs:
        raise ConfigError("no concept pairs given; the concept vector needs at least one")
    sums: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for start in range(0, len(pairs), max(1, batch_size)):
        chunk = pairs[start : start + max(1, batch_size)]
        with torch.no_grad():
            with_concept = encode([a for a, _ in chunk])
            without = encode([b for _, b in chunk])
        keys = [k for k in (outputs or OPTIMISED_KEYS) if k in with_concept]
        if not keys:
            raise ConfigError("the concept vector needs text-encoder outputs; this encoder returns none")
        for key in keys:
            difference = (with_concept[key].double() - without[key].double()).sum(0)
            sums[key] = sums[key] + difference if key in sums else difference
            dtypes[key] = with_concept[key].dtype
    return {key: (total / len(pairs)).to(dtypes[key]) for key, total in sums.items()}


def squared_distance(encoded: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per row, the squared distance of ``encoded`` to ``target`` summed over the target's keys (float64)."""
    total = None
    for key, wanted in target.items():
        row = (encoded[key].double() - wanted.double()).pow(2).flatten(1).sum(1)
        total = row if total is None else total + row
    assert total is not None
    return total


def word_tokens(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """The ids among ``ids`` whose token is a whole alphabetic word: CLIP's BPE marks a word's end with
    ``</w>``, SentencePiece a word's start with ``▁``; a token with neither marker is a piece of a word."""
    words = []
    for i, token in zip(ids, tokenizer.convert_ids_to_tokens(list(ids))):
        marked = token.endswith("</w>") or token.startswith("\u2581")
        word = token.removesuffix("</w>").removeprefix("\u2581")
        if marked and word.isascii() and word.isalpha():
            words.append(i)
    return words


# --------------------------------------------------------------------------- the genetic search
@dataclass
class SearchResult:
    """What :func:`genetic_search` found: the best ids and their text and fitness, and what it cost."""

    ids: list[int]
    text: str
    fitness: float
    generations: int
    evaluations: int
    """Fitness evaluations (every member of every generation scored)."""
    scored: int
    """Distinct texts scored (the others were read from the cache)."""
    best_per_generation: list[float] = field(default_factory=list)


def genetic_search(
    fitness: Callable[[list[str]], Sequence[float]],
    decode: Callable[[list[int]], str],
    vocabulary: Sequence[int],
    *,
    length: int,
    generations: int,
    population: int,
    elites: int,
    crossover_rate: float,
    mutation_rate: float,
    seed: int,
    allowed: Callable[[str], bool] | None = None,
    steps: Callable[[int], Iterable[int]] = range,
) -> SearchResult:
    """Ring-a-Bell's genetic algorithm over token ids (module docstring): minimise ``fitness`` of the
    decoded texts for ``generations`` generations. ``allowed``: a text it rejects is never chosen
    (its fitness counts as infinite). ``steps``: ``range``, or a range with a progress bar.
    Deterministic for ``seed`` (one numpy generator draws every random choice)."""
    rng = np.random.default_rng(seed)
    vocab = np.asarray(vocabulary, dtype=np.int64)
    cache: dict[str, float] = {}
    members = [vocab[rng.integers(len(vocab), size=length)] for _ in range(population)]
    best_ids, best_text, best_fitness = members[0], "", math.inf
    evaluations = 0
    history: list[float] = []
    for generation in steps(generations):
        texts = [decode(m.tolist()) for m in members]
        fresh = sorted({t for t in texts if t not in cache})
        if fresh:
            for text, value in zip(fresh, fitness(fresh)):
                cache[text] = float(value) if allowed is None or allowed(text) else math.inf
        scores = np.array([cache[t] for t in texts])
        evaluations += len(texts)
        order = np.argsort(scores, kind="stable")
        if scores[order[0]] < best_fitness:
            best_ids, best_text, best_fitness = members[order[0]].copy(), texts[order[0]], float(scores[order[0]])
        history.append(best_fitness)
        if generation == generations - 1:
            break
        parents = [members[i] for i in order[:elites]]
        children: list[np.ndarray] = []
        for parent in parents:
            children.append(parent.copy())
            if rng.random() < crossover_rate:
                mate = parents[int(rng.integers(len(parents)))]
                cut = int(rng.integers(1, length))
                children.append(np.concatenate([parent[:cut], mate[cut:]]))
                children.append(np.concatenate([mate[:cut], parent[cut:]]))
        for child in children:
            if rng.random() < mutation_rate:
                child[int(rng.integers(length))] = vocab[int(rng.integers(len(vocab)))]
        members = children
    return SearchResult(
        ids=best_ids.tolist(),
        text=best_text,
        fitness=best_fitness,
        generations=len(history),
        evaluations=evaluations,
        scored=len(cache),
        best_per_generation=history,
    )


# --------------------------------------------------------------------------- the attacks
def _pairs_record(pairs: list[tuple[str, str]], setting: Any) -> dict[str, Any]:
    """How ``summary.json`` records the pairs: their source, count and digest (not the pairs themselves)."""
    digest = hashlib.sha256(json.dumps(pairs).encode("utf-8")).hexdigest()
    source = str(setting) if isinstance(setting, (str, Path)) else "given"
    return {"source": source, "count": len(pairs), "sha256": digest, "first": list(pairs[0])}


class _RingABell(Attack):
    """What both variants share: the checks, the concept vector and target, and the images."""

    white_box = False
    needs_original = False

    def _check(self, config: RingABellEmbeddingConfig, concept: str) -> None:
        if config.stop_on_success:
            raise ConfigError(
                f"{self.name} never looks at the model or the judge while it searches; leave stop_on_success off"
            )
        if concept_pattern([concept.strip()]).search(config.start_prompt):
            raise ConfigError(
                f"the {self.name} start_prompt {config.start_prompt!r} names the concept {concept!r}; "
                "start from a prompt that does not"
            )
        if not math.isfinite(config.strength):
            raise ConfigError(f"the {self.name} strength must be a finite number, got {config.strength!r}")

    def _find(
        self,
        encode: Encoder,
        target: dict[str, torch.Tensor],
        pipe: Any,
        concept: str,
        budget: int,
        config: RingABellEmbeddingConfig,
    ) -> tuple[str | None, dict[str, Any]]:
        """The prompt found (``None``: the target embedding is the attack) and a record of the search."""
        return None, {}

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
        assert isinstance(config, RingABellEmbeddingConfig)
        self._check(config, concept)
        pairs = load_pairs(config.pairs)
        arch, _ = denoiser_of(pipe)
        length = sampling.max_sequence_length

        def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return arch.encode_prompts(pipe, prompts, length)

        # the attacker's copy of the text encoder: no erasure is installed while the vector and the search run
        start = encode([config.start_prompt])
        vector = concept_vector(encode, pairs, outputs=self._outputs(config, arch.family, start))
        target = {key: start[key][0] + config.strength * v for key, v in vector.items()}
        prompt, search = self._find(encode, target, pipe, concept, budget, config)
        concept_prompt = config.concept_prompt or concept
        per_seed: list[SeedResult] = []
        images: list[Image.Image] = []
        pre_images: list[Image.Image] = []
        rows_found: list[dict[str, torch.Tensor]] = []
        with count_denoiser_calls(pipe) as counter, erased(pipe, erasure):
            for chunk in chunks(seeds, config.batch_size):
                rows = len(chunk)
                pre = draw_images(arch, pipe, encode([concept_prompt] * rows), chunk, sampling)
                starting = encode([config.start_prompt] * rows)
                start_images = draw_images(arch, pipe, starting, chunk, sampling)
                if prompt is not None:
                    attacked = encode([prompt] * rows)
                else:
                    # the denoiser's other inputs (text ids, the empty prompt for guidance) as the start prompt's
                    fed = {key: t.unsqueeze(0).expand(rows, *t.shape).to(starting[key]) for key, t in target.items()}
                    attacked = {**starting, **fed}
                    rows_found.append(fed)
                post = draw_images(arch, pipe, attacked, chunk, sampling)
                distances = squared_distance(attacked, target).tolist()
                hits = [judge_images(judge, group) for group in (pre, start_images, post)]
                for row, seed in enumerate(chunk):
                    per_seed.append(
                        SeedResult(
                            seed=seed,
                            pre_success=hits[0][row],
                            post_success=hits[2][row],
                            budget_used=budget,
                            loss=distances[row],
                            start_success=hits[1][row],
                        )
                    )
                images.extend(post)
                pre_images.extend(pre)
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
            prompts=[prompt] * len(seeds) if prompt is not None else None,
            embeddings=({key: torch.cat([r[key] for r in rows_found]) for key in target} if prompt is None else None),
            extra={"pairs": _pairs_record(pairs, config.pairs)},
            search={"start_distance": float(squared_distance(start, target)[0]), **search},
        )

    @staticmethod
    def _outputs(config: RingABellEmbeddingConfig, family: str, encoded: Mapping[str, torch.Tensor]) -> list[str]:
        """The text-encoder outputs the attack uses (the ``outputs`` setting, else the family's default)."""
        available = [k for k in OPTIMISED_KEYS if k in encoded]
        if not available:
            raise ConfigError(f"ring-a-bell needs text-encoder outputs; the {family} family has none")
        given = [config.outputs] if isinstance(config.outputs, str) else config.outputs
        wanted = list(given or [k for k in CLIP_OUTPUTS.get(family, ()) if k in available] or available)
        unknown = [k for k in wanted if k not in available]
        if unknown:
            raise ConfigError(
                f"ring-a-bell outputs {', '.join(map(str, unknown))} are not text-encoder outputs of the {family} "
                f"family; choose from {', '.join(available)}"
            )
        return wanted


@register_attack
class RingABellEmbedding(_RingABell):
    """``E(start_prompt) + strength * v`` fed to the denoiser directly (module docstring)."""

    name = "ring-a-bell-embedding"
    kind = "continuous"
    default_budget = 1
    config_class = RingABellEmbeddingConfig

    def check_budget(self, budget: int, sampling: Sampling) -> None:
        super().check_budget(budget, sampling)
        if budget != 1:
            raise ConfigError(f"ring-a-bell-embedding has no search: its budget is 1 (one embedding), got {budget}")


@register_attack
class RingABell(_RingABell):
    """The genetic search over token ids towards ``E(start_prompt) + strength * v`` (module docstring)."""

    name = "ring-a-bell"
    kind = "discrete"
    default_budget = 100
    config_class = RingABellConfig

    def _check(self, config: RingABellEmbeddingConfig, concept: str) -> None:
        super()._check(config, concept)
        assert isinstance(config, RingABellConfig)
        if config.population < 2:
            raise ConfigError(f"the ring-a-bell population must be at least 2, got {config.population}")
        if config.elites is not None and not 1 <= config.elites <= config.population:
            raise ConfigError(f"ring-a-bell elites must be between 1 and the population, got {config.elites}")
        for name in ("crossover_rate", "mutation_rate"):
            value = getattr(config, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"the ring-a-bell {name} must be between 0 and 1, got {value!r}")
        if config.length is not None and config.length < 2:
            raise ConfigError(f"the ring-a-bell length (free tokens) must be at least 2, got {config.length}")

    def _find(
        self,
        encode: Encoder,
        target: dict[str, torch.Tensor],
        pipe: Any,
        concept: str,
        budget: int,
        config: RingABellEmbeddingConfig,
    ) -> tuple[str | None, dict[str, Any]]:
        assert isinstance(config, RingABellConfig)
        tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
        if tokenizer is None:
            raise ConfigError(f"ring-a-bell searches token ids; the pipeline {type(pipe).__name__} has no tokenizer")
        special = set(tokenizer.all_special_ids)
        vocabulary = [i for i in range(len(tokenizer)) if i not in special]
        if config.words_only:
            vocabulary = word_tokens(tokenizer, vocabulary)
            if not vocabulary:
                raise ConfigError("the tokenizer has no whole-word tokens; set words_only=false")
        # the model reads at most max_length tokens, start and end tokens included
        readable = int(getattr(tokenizer, "model_max_length", PAPER_LENGTH + 2)) - 2
        length = config.length or max(2, min(PAPER_LENGTH, readable))
        # anywhere in the text, not only as a whole word: a glued "7circle" is read as "circle" by a tokenizer
        banned = concept.strip().lower() if config.ban_concept else None

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()

        def fitness(texts: list[str]) -> list[float]:
            return squared_distance(encode(texts), target).tolist()

        found = genetic_search(
            fitness,
            decode,
            vocabulary,
            length=length,
            generations=budget,
            population=config.population,
            elites=config.elites or config.population // 2,
            crossover_rate=config.crossover_rate,
            mutation_rate=config.mutation_rate,
            seed=config.seed,
            allowed=None if banned is None else (lambda text: banned not in text.lower()),
            steps=self.search_steps,
        )
        if not math.isfinite(found.fitness):
            raise ConfigError(
                "every prompt ring-a-bell scored names the concept; set ban_concept=false or a larger population"
            )
        return found.text, {
            "generations": found.generations,
            "length": length,
            "fitness_evaluations": found.evaluations,
            "prompts_encoded": found.scored,
            "best_distance": found.fitness,
            "best_distance_per_generation": found.best_per_generation,
        }
