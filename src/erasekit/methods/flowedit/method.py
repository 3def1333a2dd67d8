"""The ``flowedit`` method: FlowEdit as an inference-time erasure on flow-matching models (no weights change).

FlowEdit edits an image, and a text-to-image prompt brings none, so "generating with the erasure" is:

1. sample the prompt with the model as it is (the source image ``x_src``: exactly the original model's
   image of that prompt and seed);
2. derive the prompt's concept-free version: the concept and its synonyms replaced by the anchor (the rule
   by which ``erasekit erase`` derives target prompts, :func:`erasekit.data.retarget`);
3. edit ``x_src`` along the flow from the prompt to that target (the kernel,
   :func:`~erasekit.methods.flowedit.kernels.flowedit`), which keeps the source's layout and changes what
   the two prompts disagree on.

A prompt that names neither the concept nor a synonym has no target: its image is the original model's,
bit for bit (its row is not edited at all). The erasure is therefore only as good as the match: a
paraphrase that avoids the concept's words is not edited (the demo's synonym prompts measure this).
The edit's noise is drawn per image from its seed, so an image does not depend on the others in its batch.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...arch import Trajectory, denoiser_of, run_trajectory
from ...arch.override import SamplingOverride
from ...config import EraseConfig, FlowEditConfig
from ...data import concept_names, concept_pattern, retarget
from ...errors import ConfigError, UnsupportedError
from ..base import Method, register_method
from ..inference import InferenceTimeErasure, fit_inference_time
from .kernels import flowedit

CHANGES = "sampling: prompts naming the concept edited towards the anchor along the flow (no weights)"


def edit_window(settings: dict[str, Any], steps: int) -> tuple[int, int]:
    """``(n_max, n_min)`` of a ``steps``-step generation: ``n_max = round(strength * steps)`` (at least 1).

    Raises:
        ConfigError: a window the steps cannot hold (one line).
    """
    n_max = max(1, round(float(settings["strength"]) * steps))
    n_min = int(settings["n_min"])
    if not 0 <= n_min <= n_max <= steps:
        raise ConfigError(
            f"flowedit edits over {n_max} of {steps} steps (strength {settings['strength']:g}) and needs "
            f"0 <= flowedit.n_min <= {n_max}, got n_min={n_min}"
        )
    return n_max, n_min


def edit_seed(seed: int) -> int:
    """The seed of an image's edit noise: derived from its noise seed, but not the same stream."""
    return (seed * 1_000_003 + 0x5EED) % (2**63 - 1)


class FlowEditOverride(SamplingOverride):
    """Samples every prompt, then edits the rows that name the concept towards their concept-free versions."""

    name = "flowedit erasure"

    def __init__(self, names: list[str], anchor: str, settings: dict[str, Any]) -> None:
        self.pattern = concept_pattern(names)
        self.anchor = anchor
        self.settings = settings

    def target_prompt(self, prompt: str) -> str | None:
        """The concept-free version of ``prompt``, or None when it names neither the concept nor a synonym."""
        return retarget(prompt, self.pattern, self.anchor) if self.pattern.search(prompt) else None

    def sample(
        self,
        pipe: Any,
        prompts: list[str],
        seeds: list[int],
        *,
        steps: int,
        resolution: int,
        guidance_scale: float,
        max_sequence_length: int,
    ) -> tuple[torch.Tensor, Trajectory]:
        arch, _ = denoiser_of(pipe)
        n_max, n_min = edit_window(self.settings, steps)
        encoded = arch.encode_prompts(pipe, prompts, max_sequence_length)
        trajectory = arch.trajectory(
            pipe, encoded, seeds, steps=steps, resolution=resolution, guidance_scale=guidance_scale
        )
        source = run_trajectory(trajectory.step, trajectory.noise, trajectory.num_steps)[-1]
        targets = [self.target_prompt(p) for p in prompts]
        rows = [k for k, target in enumerate(targets) if target is not None]
        if not rows:
            return source, trajectory
        if trajectory.schedule is None or trajectory.velocity_at is None:
            raise UnsupportedError(f"flowedit needs a flow-matching model; this is a {arch.family} one")

        def side(texts: list[str], scale: float | None) -> Trajectory:
            # the velocity of one conditioning, guided as the generation is (or at the side's own scale)
            return arch.trajectory(
                pipe,
                arch.encode_prompts(pipe, texts, max_sequence_length),
                [seeds[k] for k in rows],
                steps=steps,
                resolution=resolution,
                guidance_scale=guidance_scale if scale is None else scale,
            )

        src = side([prompts[k] for k in rows], self.settings.get("source_guidance_scale"))
        tar = side([str(targets[k]) for k in rows], self.settings.get("target_guidance_scale"))
        device = source.device
        sigmas = torch.tensor([*trajectory.schedule.sigmas, 0.0], dtype=torch.float32, device=device)
        generators = [torch.Generator(device=device).manual_seed(edit_seed(seeds[k])) for k in rows]

        def velocity(z: torch.Tensor, sigma: torch.Tensor, side: Trajectory) -> torch.Tensor:
            assert side.velocity_at is not None
            return side.velocity_at(z, float(sigma))

        edited = flowedit(
            velocity,
            source[rows],
            src,
            tar,
            sigmas,
            n_avg=int(self.settings["n_avg"]),
            n_min=n_min,
            n_max=n_max,
            generator=generators,
        )
        out = source.clone()
        out[rows] = edited.to(source.dtype)
        return out, trajectory


class FlowEditErasure(InferenceTimeErasure):
    """A FlowEdit erasure: the concept's names, the anchor and the edit's settings, in the record."""

    method = "flowedit"

    @property
    def names(self) -> list[str]:
        recorded = self.record.get("concept_names")
        return [str(n) for n in recorded] if isinstance(recorded, list) else [str(self.record.get("concept", ""))]

    def override(self, pipe: Any) -> SamplingOverride:
        arch, _ = denoiser_of(pipe)
        FlowEditMethod().check_family(arch)
        return FlowEditOverride(self.names, str(self.record.get("anchor", "")), self.settings)

    def report(self) -> dict[str, Any]:
        return {"flowedit": {"concept_names": self.names, "anchor": self.record.get("anchor", ""), **self.settings}}


@register_method
class FlowEditMethod(Method):
    """FlowEdit (Kulikov et al., 2024): the prompt's own image edited towards its concept-free version."""

    name = "flowedit"
    config_class = FlowEditConfig
    section = "flowedit"
    erasure_class = FlowEditErasure
    trains = False
    needs_cfg = False
    changes = CHANGES
    families = ("flux", "sd3")
    summary = "FlowEdit: inference-time editing along the flow from the concept prompt to the anchor's"

    def validate(self, config: EraseConfig) -> None:
        settings = config.flowedit
        if not concept_names(config.concept):
            raise ConfigError("flowedit needs a concept: set concept.concept")
        if not 0 < settings.strength <= 1:
            raise ConfigError(f"flowedit.strength must be in (0, 1], got {settings.strength:g}")
        if settings.n_avg < 1:
            raise ConfigError(f"flowedit.n_avg must be >= 1, got {settings.n_avg}")
        for name in ("source_guidance_scale", "target_guidance_scale"):
            value = getattr(settings, name)
            if value is not None and value < 0:
                raise ConfigError(f"flowedit.{name} must be >= 0, got {value:g}")
        edit_window(asdict(settings), config.sampling.generation_steps or config.sampling.steps)

    def fit(
        self,
        pipe: Any,
        config: EraseConfig,
        output: str | Path,
        *,
        accelerator: Any = None,
        resume: bool = False,
        stop_after: int | None = None,
        model_id: str | None = None,
    ) -> FlowEditErasure:
        self.validate(config)
        self.check_family(denoiser_of(pipe)[0])
        steps = config.sampling.generation_steps or config.sampling.steps
        n_max, n_min = edit_window(asdict(config.flowedit), steps)
        # per image that names the concept: 2 n_avg velocities per edited step, 1 per plain target step,
        # each as many rows as a default step (the source image itself is the default sample)
        extra = (2 * config.flowedit.n_avg * (n_max - n_min) + n_min) / steps
        erasure = fit_inference_time(
            FlowEditErasure,
            pipe,
            config,
            output,
            changes=CHANGES,
            extra_calls_per_step=extra,
            model_id=model_id,
            fields={"concept_names": concept_names(config.concept)},
        )
        assert isinstance(erasure, FlowEditErasure)
        return erasure


__all__ = ["FlowEditErasure", "FlowEditMethod", "FlowEditOverride", "edit_window"]
