"""``textual-inversion``: one new word learned through the erased model on images of the concept (Pham et
al., "Circumventing Concept Erasure Methods For Text-to-Image Generative Models", ICLR 2024).

Threat model: white-box on the erased model, and a handful of images of the concept. The original model
(the pipeline with the erasure removed) draws them: ``images`` images of ``target_prompt`` (default: the
concept) from noise seeds ``image_seed``, ``image_seed + 1``, ... which must not be among the seeds the
attack is judged on, so that the token is never fitted to the very noise it is judged from.

The attack learns one token embedding per text encoder (FLUX: CLIP and T5) that stands in a prompt
``template`` ("a {}": the token where ``{}`` is), started from a word (``init_word``) that does not name
the concept, with textual inversion's objective: the erased model's conditional denoising loss on the
concept images, ``|| target(x0, e, i) - pred_erased(add_noise(x0, e, i), i, template(token)) ||^2`` for a
step ``i`` drawn uniformly and fresh noise ``e`` each iteration, every image in each iteration. Unlike
the prompt attacks, one token serves every seed: it is learned once and then judged from each seed's
noise, as a user would use a learned concept word. An erasure that only cut the path from the concept's
own word to the concept falls to it; one that removed the model's ability to draw the concept does not.

Budget: optimiser steps (each one conditional denoiser call with gradients on the ``images`` rows).
What it finds is the token embeddings (``embeddings.safetensors``: ``token.<encoder>``, one row each).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..arch import denoiser_of
from ..arch.guidance import Conditional
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
    cycled,
    draw_images,
    erased,
    final_latents,
    judge_images,
    register_attack,
    row_distance,
    target_prompts,
)
from .tokens import (
    SlotPrompt,
    Vocabulary,
    embedding_scaled_groups,
    encode_slots,
    input_embedding_tables,
    names_concept,
    vocabulary_of,
)


@dataclass
class TextualInversionConfig(AttackConfig):
    """``template``: the prompt the token is learned and used in (``{}`` marks the token). ``init_word``:
    the word whose embeddings the token starts from (one token in every text encoder; must not name the
    concept). ``target_prompt``: what the original model draws as the concept's images (default: the
    concept). ``images``: how many. ``image_seed``: their first noise seed (kept apart from the judged
    seeds). ``lr``: Adam's step size on the token embeddings, in units of each text encoder's
    embedding-table standard deviation (as ``p4d``'s). ``seed``: the search's own randomness (timesteps,
    noise)."""

    template: str = "a {}"
    init_word: str = "picture"
    target_prompt: str | list[str] | None = None
    images: int = 8
    image_seed: int = 900_000
    lr: float = 0.02
    seed: int = 0


def template_prompt(template: str) -> SlotPrompt:
    """The slot prompt of ``template``: its text around exactly one ``{}``.

    Raises:
        ConfigError: the template does not hold exactly one ``{}``.
    """
    if template.count("{}") != 1:
        raise ConfigError(f"the textual-inversion template must hold one {{}} where the token goes, got {template!r}")
    before, after = template.split("{}")
    return SlotPrompt([before, None, after])


@dataclass
class LearnedWord:
    """The template with the word being learned in its slot: the encoders' tables of the shared vocabulary
    and the initial word's index among them (the text tokenised is the template with that word)."""

    arch: Any
    pipe: Any
    prompt: SlotPrompt
    vocabulary: Vocabulary
    word: int
    max_sequence_length: int

    def text(self) -> str:
        """The template with the initial word, as text (what the tokenizers read)."""
        return self.prompt.render([self.vocabulary.words[self.word]])[0]

    def start(self) -> dict[str, torch.Tensor]:
        """The initial word's ``(1, width)`` embedding row in every text encoder."""
        return {name: table[self.word : self.word + 1] for name, table in self.vocabulary.tables.items()}

    def encode(
        self, tokens: dict[str, torch.Tensor], rows: int, unconditional: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The template with ``tokens`` (each encoder's ``(1, width)`` row) as the word, in each of ``rows`` rows."""
        slots = torch.full((rows, 1), self.word, dtype=torch.long)
        embeddings = {name: table.expand(rows, 1, -1) for name, table in tokens.items()}
        return encode_slots(
            self.arch,
            self.pipe,
            self.prompt,
            self.vocabulary,
            slots,
            embeddings,
            self.max_sequence_length,
            unconditional=unconditional,
        )


@register_attack
class TextualInversion(Attack):
    """One token embedding per text encoder learned on the concept's images (module docstring)."""

    name = "textual-inversion"
    kind = "continuous"
    white_box = True
    needs_original = True
    default_budget = 200
    config_class = TextualInversionConfig

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
        assert isinstance(config, TextualInversionConfig)
        prompt = template_prompt(config.template)
        image_seeds = self._image_seeds(config, seeds)
        targets = target_prompts(config.target_prompt, concept, self.name)
        if names_concept(config.init_word, concept) or names_concept(config.template.replace("{}", ""), concept):
            raise ConfigError(
                f"the textual-inversion init_word {config.init_word!r} or template {config.template!r} names the "
                f"concept {concept!r}; start from words that do not"
            )
        arch, _ = denoiser_of(pipe)
        # the initial word alone: the learned token takes its place, so no other word is ever needed
        vocabulary = vocabulary_of(arch, pipe, [config.init_word])
        if not vocabulary.words:
            raise ConfigError(
                f"the textual-inversion init_word {config.init_word!r} is not one token in every text encoder of "
                "this model; choose a common single word"
            )
        learned = LearnedWord(arch, pipe, prompt, vocabulary, 0, sampling.max_sequence_length)
        with count_denoiser_calls(pipe) as counter:
            with torch.no_grad():
                # the concept's images, drawn by the original model (no erasure installed here)
                wanted = arch.encode_prompts(pipe, cycled(targets, len(image_seeds)), sampling.max_sequence_length)
                x0, _ = final_latents(arch, pipe, wanted, image_seeds, sampling)
            with erased(pipe, erasure):
                tokens, losses = self._learn(learned, x0, image_seeds, budget, sampling, config)
                per_seed, images, pre_images = self._judge(
                    learned, tokens, targets, judge, seeds, budget, sampling, config
                )
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
            embeddings={f"token.{name}": table for name, table in tokens.items()},
            search={"image_seeds": image_seeds, "loss_first": losses[0], "loss_last": losses[-1]},
        )

    @staticmethod
    def _image_seeds(config: TextualInversionConfig, seeds: list[int]) -> list[int]:
        if isinstance(config.images, bool) or not isinstance(config.images, int) or config.images < 1:
            raise ConfigError(f"textual-inversion images must be a positive integer, got {config.images!r}")
        if not config.lr > 0:
            raise ConfigError(f"textual-inversion lr must be positive, got {config.lr!r}")
        if config.stop_on_success:
            raise ConfigError("textual-inversion does not stop on the judge; leave stop_on_success off")
        image_seeds = list(range(config.image_seed, config.image_seed + config.images))
        shared = sorted(set(image_seeds) & set(seeds))
        if shared:
            raise ConfigError(
                f"the textual-inversion images' noise seeds ({image_seeds[0]}-{image_seeds[-1]}) include judged "
                f"seed(s) {', '.join(map(str, shared[:3]))}; move image_seed away from the attack's seeds"
            )
        return image_seeds

    def _learn(
        self,
        learned: LearnedWord,
        x0: torch.Tensor,
        image_seeds: list[int],
        budget: int,
        sampling: Sampling,
        config: TextualInversionConfig,
    ) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Adam on the word's embeddings (from the initial word's) for ``budget`` steps; the embeddings and losses."""
        tokens = {name: row.clone().requires_grad_(True) for name, row in learned.start().items()}
        tables = input_embedding_tables(learned.arch, learned.pipe)
        optimizer = torch.optim.Adam(embedding_scaled_groups(tokens, tables, config.lr))
        generator = torch.Generator().manual_seed(config.seed)
        rows = len(image_seeds)
        with torch.no_grad():
            negative = learned.arch.encode_prompts(learned.pipe, [learned.text()] * rows, learned.max_sequence_length)
        losses = []
        for _ in self.search_steps(budget, image_seeds):
            encoded = learned.encode(tokens, rows, negative)
            trajectory = learned.arch.trajectory(learned.pipe, encoded, image_seeds, **sampling.as_kwargs())
            step = int(torch.randint(trajectory.num_steps, (1,), generator=generator))
            noise = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
            assert trajectory.schedule is not None
            wanted = trajectory.schedule.target(x0, noise, step)
            prediction = trajectory.predict(trajectory.add_noise(x0, noise, step), step, Conditional())
            loss = row_distance(prediction, wanted).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return {name: table.detach() for name, table in tokens.items()}, losses

    def _judge(
        self,
        learned: LearnedWord,
        tokens: dict[str, torch.Tensor],
        targets: list[str],
        judge: Callable[[Sequence[Image.Image]], Sequence[bool]],
        seeds: list[int],
        budget: int,
        sampling: Sampling,
        config: TextualInversionConfig,
    ) -> tuple[list[SeedResult], list[Image.Image], list[Image.Image]]:
        """Per seed: the erased model on a target prompt (before; the seeds take the target prompts in turn)
        and on the template with the word (after)."""
        arch, pipe = learned.arch, learned.pipe
        per_seed: list[SeedResult] = []
        images: list[Image.Image] = []
        pre_images: list[Image.Image] = []
        before = cycled(targets, len(seeds))
        for chunk in chunks(seeds, config.batch_size):
            rows, done = len(chunk), len(per_seed)
            with torch.no_grad():
                target = arch.encode_prompts(pipe, before[done : done + rows], learned.max_sequence_length)
                pre = draw_images(arch, pipe, target, chunk, sampling)
                post = draw_images(arch, pipe, learned.encode(tokens, rows), chunk, sampling)
            pre_hits, post_hits = judge_images(judge, pre), judge_images(judge, post)
            per_seed.extend(
                SeedResult(seed=seed, pre_success=pre_hits[row], post_success=post_hits[row], budget_used=budget)
                for row, seed in enumerate(chunk)
            )
            images.extend(post)
            pre_images.extend(pre)
        return per_seed, images, pre_images
