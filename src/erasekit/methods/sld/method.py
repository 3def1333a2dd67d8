"""The ``sld`` method: Safe Latent Diffusion as an inference-time erasure (no weights change).

Fitting writes the settings (a preset and its overrides, the safety concept) into ``erasure.json``;
applying installs a sampling override that samples every image with :class:`SLDGuidance`: the denoiser
evaluates the unconditional, prompt and safety-concept rows in one batch and the kernel
(:func:`~erasekit.methods.sld.kernels.sld_step`) combines them, the momentum carried from step to step.
SLD is a change of classifier-free guidance, so it needs a model with an unconditional branch and a
guidance scale above 1.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ...arch import Guidance, Trajectory, denoiser_of, run_trajectory
from ...arch.override import SamplingOverride
from ...config import EraseConfig, SLDConfig
from ...errors import ConfigError, UnsupportedError
from ..base import Method, register_method
from ..inference import InferenceTimeErasure, fit_inference_time
from .kernels import SLDSettings, sld_preset, sld_step

CHANGES = "sampling: safety guidance away from the concept (no weights)"
#: The settings a config field overrides, by name (``SLDSettings``' fields).
OVERRIDABLE = ("sld_guidance_scale", "sld_warmup_steps", "sld_threshold", "sld_momentum_scale", "sld_mom_beta")


def resolve_settings(section: dict[str, Any] | SLDConfig) -> SLDSettings:
    """The preset named in an ``sld`` section with the section's set fields over it.

    Raises:
        ConfigError: an unknown preset or an out-of-range value (one line).
    """
    data = asdict(section) if isinstance(section, SLDConfig) else dict(section)
    settings = sld_preset(str(data.get("preset", "medium")))
    changed = {k: data[k] for k in OVERRIDABLE if data.get(k) is not None}
    if "sld_warmup_steps" in changed:
        changed["sld_warmup_steps"] = int(changed["sld_warmup_steps"])
    return replace(settings, **changed) if changed else settings


class SLDGuidance(Guidance):
    """SLD as a guidance step: roles ``uncond``, ``cond`` and ``safety`` (its encoding in ``encodings``).

    The momentum is the carry: step ``i`` reads what step ``i - 1`` left, so a recomputed step is exact.
    """

    roles = ("uncond", "cond", "safety")
    needs_cfg = True

    def __init__(self, settings: SLDSettings, scale: float, safety: dict[str, torch.Tensor]) -> None:
        super().__init__({"safety": safety})
        self.settings = settings
        self.scale = scale

    def combine(self, outputs: dict[str, torch.Tensor], i: int, carry: Any) -> tuple[torch.Tensor, Any]:
        return sld_step(outputs["uncond"], outputs["cond"], outputs["safety"], i, self.scale, self.settings, carry)


class SLDOverride(SamplingOverride):
    """Samples with :class:`SLDGuidance` in place of classifier-free guidance."""

    name = "sld erasure"

    def __init__(self, settings: SLDSettings, safety_concept: str) -> None:
        self.settings = settings
        self.safety_concept = safety_concept

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
        if guidance_scale <= 1:
            raise ConfigError(
                f"an sld erasure changes classifier-free guidance, which needs a guidance scale above 1; "
                f"got {guidance_scale:g} (pass --guidance)"
            )
        arch, _ = denoiser_of(pipe)
        encoded = arch.encode_prompts(pipe, prompts, max_sequence_length)
        safety = arch.encode_prompts(pipe, [self.safety_concept], max_sequence_length)
        guidance = SLDGuidance(self.settings, guidance_scale, safety)
        trajectory = arch.trajectory(
            pipe, encoded, seeds, steps=steps, resolution=resolution, guidance_scale=guidance_scale, guidance=guidance
        )
        return run_trajectory(trajectory.step, trajectory.noise, trajectory.num_steps)[-1], trajectory


def _refuse_without_cfg(pipe: Any) -> None:
    arch, _ = denoiser_of(pipe)
    if not arch.supports_cfg(pipe):
        raise UnsupportedError(
            f"sld needs classifier-free guidance, and this {arch.family} model has none "
            "(it is guidance-distilled); use a model with an unconditional branch"
        )


class SLDErasure(InferenceTimeErasure):
    """An SLD erasure: the resolved settings and the safety concept, in the record."""

    method = "sld"

    @property
    def sld_settings(self) -> SLDSettings:
        return resolve_settings(self.settings)

    @property
    def safety_concept(self) -> str:
        return str(self.record.get("safety_concept") or self.record.get("concept", ""))

    def override(self, pipe: Any) -> SamplingOverride:
        _refuse_without_cfg(pipe)
        return SLDOverride(self.sld_settings, self.safety_concept)

    def report(self) -> dict[str, Any]:
        return {"sld": {"safety_concept": self.safety_concept, **asdict(self.sld_settings)}}


@register_method
class SLDMethod(Method):
    """Safe Latent Diffusion (Schramowski et al., CVPR 2023): guidance away from the concept at every step."""

    name = "sld"
    config_class = SLDConfig
    section = "sld"
    erasure_class = SLDErasure
    trains = False
    needs_cfg = True
    changes = CHANGES
    families = ("dit", "flux", "pixart", "sd3", "unet")
    summary = "Safe Latent Diffusion: inference-time guidance away from the concept (presets weak..max)"

    def validate(self, config: EraseConfig) -> None:
        resolve_settings(config.sld)
        if not (config.sld.safety_concept or config.concept.concept).strip():
            raise ConfigError("sld needs a safety concept: set concept.concept (or sld.safety_concept)")
        if config.sampling.guidance_scale <= 1:
            raise ConfigError(
                "sld changes classifier-free guidance and needs sampling.guidance_scale above 1, "
                f"got {config.sampling.guidance_scale:g}"
            )

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
    ) -> SLDErasure:
        self.validate(config)
        _refuse_without_cfg(pipe)
        safety = (config.sld.safety_concept or config.concept.concept).strip()
        settings = resolve_settings(config.sld)
        erasure = fit_inference_time(
            SLDErasure,
            pipe,
            config,
            output,
            changes=CHANGES,
            # one more row per step than classifier-free guidance: the safety concept's
            extra_calls_per_step=1.0,
            model_id=model_id,
            fields={"safety_concept": safety, "sld_settings": asdict(settings)},
        )
        assert isinstance(erasure, SLDErasure)
        return erasure


__all__ = ["SLDErasure", "SLDGuidance", "SLDMethod", "SLDOverride", "resolve_settings"]
