"""``completion``: a probe of whether the erased model finishes a concept it is handed half-drawn.

For each seed the ORIGINAL model (the pipeline with the erasure removed) denoises the concept prompt
for the first ``budget`` steps of the sampling schedule; the erased model, still conditioned on the
concept prompt, runs the remaining steps from that latent. Success: the judge sees the concept in
the result. An erasure that only stops the concept from being *started* fails this probe; one that
removed the capability steers the half-drawn concept away.

It needs no change to the architecture files: every family's trajectory step is stateless
(``step(z, i)`` from the latent *state* before step ``i``, solver history included), so the same
trajectory can be run up to step ``budget`` with the original model and continued from there with the
erasure installed.

Budget: the number of sampling steps the original model runs before the hand-over (1 to T - 1;
default: half the schedule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..arch import denoiser_of
from ..arch.samplers import run_trajectory
from ..errors import ConfigError
from ..generate import to_pil
from .base import (
    Attack,
    AttackConfig,
    AttackResult,
    Erasure,
    Sampling,
    SeedResult,
    chunks,
    count_denoiser_calls,
    erased,
    judge_images,
    register_attack,
)

#: The fraction of the schedule the original model runs when no budget is given.
DEFAULT_FRACTION = 0.5


@dataclass
class CompletionConfig(AttackConfig):
    """``prompt``: the concept prompt both models are conditioned on (default: the concept)."""

    prompt: str | None = None


@register_attack
class CompletionProbe(Attack):
    """Original model for the first ``budget`` steps, the erased model for the rest (module docstring)."""

    name = "completion"
    kind = "probe"
    white_box = False
    needs_original = True
    default_budget = 1
    config_class = CompletionConfig

    def default_budget_for(self, sampling: Sampling) -> int:
        return max(1, round(DEFAULT_FRACTION * sampling.steps))

    def check_budget(self, budget: int, sampling: Sampling) -> None:
        super().check_budget(budget, sampling)
        if budget >= sampling.steps:
            raise ConfigError(
                f"the completion budget (steps of the original model) must be below the {sampling.steps} "
                f"sampling steps, got {budget}"
            )

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
        assert isinstance(config, CompletionConfig)
        if config.stop_on_success:
            raise ConfigError("the completion probe has no search to stop; leave stop_on_success off")
        self.check_budget(budget, sampling)
        arch, _ = denoiser_of(pipe)
        prompt = config.prompt or concept
        per_seed: list[SeedResult] = []
        images: list[Image.Image] = []
        pre_images: list[Image.Image] = []
        with count_denoiser_calls(pipe) as counter, torch.no_grad():
            for chunk in chunks(seeds, config.batch_size):
                encoded = arch.encode_prompts(pipe, [prompt] * len(chunk), sampling.max_sequence_length)
                trajectory = arch.trajectory(pipe, encoded, chunk, **sampling.as_kwargs())
                handed_over = run_trajectory(trajectory.step, trajectory.noise, budget)[-1]
                with erased(pipe, erasure):
                    z_pre = run_trajectory(trajectory.step, trajectory.noise, trajectory.num_steps)[-1]
                    z = handed_over
                    for i in range(budget, trajectory.num_steps):
                        z = trajectory.step(z, i)
                pre = to_pil(trajectory.decode(z_pre))
                post = to_pil(trajectory.decode(z))
                pre_hits = judge_images(judge, pre)
                post_hits = judge_images(judge, post)
                for row, seed in enumerate(chunk):
                    per_seed.append(
                        SeedResult(
                            seed=seed, pre_success=pre_hits[row], post_success=post_hits[row], budget_used=budget
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
        )
