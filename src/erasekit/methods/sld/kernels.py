"""Safe Latent Diffusion guidance (SLD, Schramowski et al., "Safe Latent Diffusion: Mitigating Inappropriate
Degeneration in Diffusion Models", CVPR 2023): the per-step combination of three predictions.

At every step the denoiser predicts noise unconditionally (``ε_u``), for the prompt (``ε_p``) and for the
safety concept (``ε_S``). With the SLD settings (guidance scale ``s_S``, warm-up steps, threshold ``λ``,
momentum scale ``s_m``, momentum β) and the carried momentum ``ν`` (zero at the first step):

    γ   = min(|ε_p − ε_S| · s_S, 1), and 0 where ε_p − ε_S ≥ λ        (element-wise)
    g_S = γ ⊙ (ε_S − ε_u) + s_m ν
    ν  ← β ν + (1 − β) g_S                                            (also during the warm-up)
    ε   = ε_u + s (ε_p − ε_u − g_S)     from step ``warmup`` on; plain CFG ε_u + s (ε_p − ε_u) before

where ``s`` is the ordinary classifier-free guidance scale. As in the reference pipeline (diffusers'
``StableDiffusionPipelineSafe``), safety guidance is off altogether when ``s_S ≤ 1``: the result is plain CFG
and the momentum is not carried. The thresholds were tuned on ε-prediction models; they do not transfer
as-is to velocity-predicting families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erasekit.errors import ConfigError


@dataclass(frozen=True)
class SLDSettings:
    """The five SLD settings (diffusers' argument names).

    Attributes:
        sld_guidance_scale: ``s_S``; safety guidance is enabled only above 1.
        sld_warmup_steps: steps of plain CFG before the safety term is applied.
        sld_threshold: ``λ``; where ``ε_p − ε_S`` reaches it the safety scale is 0.
        sld_momentum_scale: ``s_m``.
        sld_mom_beta: ``β``, how much of the previous momentum is kept.
    """

    sld_guidance_scale: float
    sld_warmup_steps: int
    sld_threshold: float
    sld_momentum_scale: float
    sld_mom_beta: float

    def __post_init__(self) -> None:
        if self.sld_warmup_steps < 0:
            raise ConfigError(f"sld_warmup_steps must be >= 0, got {self.sld_warmup_steps}")
        if not 0.0 <= self.sld_mom_beta <= 1.0:
            raise ConfigError(f"sld_mom_beta must be in [0, 1], got {self.sld_mom_beta}")
        if self.sld_guidance_scale < 0:
            raise ConfigError(f"sld_guidance_scale must be >= 0, got {self.sld_guidance_scale}")

    @property
    def enabled(self) -> bool:
        """Whether safety guidance acts at all (``s_S > 1``, as in the reference pipeline)."""
        return self.sld_guidance_scale > 1.0


#: The four presets of the paper (diffusers' ``SafetyConfig``); ``medium`` is the pipeline's default.
SLD_PRESETS: dict[str, SLDSettings] = {
    "weak": SLDSettings(20.0, 15, 0.0, 0.0, 0.0),
    "medium": SLDSettings(1000.0, 10, 0.01, 0.3, 0.4),
    "strong": SLDSettings(2000.0, 7, 0.025, 0.5, 0.7),
    "max": SLDSettings(5000.0, 0, 1.0, 0.5, 0.7),
}


def sld_preset(name: str) -> SLDSettings:
    """The named preset (case-insensitive).

    Raises:
        ConfigError: an unknown name; the message lists the presets.
    """
    try:
        return SLD_PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown SLD preset {name!r}; choose one of {', '.join(SLD_PRESETS)}") from None


def sld_step(
    noise_uncond: torch.Tensor,
    noise_text: torch.Tensor,
    noise_safety: torch.Tensor,
    step: int,
    guidance_scale: float,
    settings: SLDSettings,
    momentum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of SLD guidance (see the module docstring).

    Args:
        noise_uncond, noise_text, noise_safety: ``ε_u``, ``ε_p``, ``ε_S`` of one shape.
        step: the index of the sampling step (0 first), compared with the warm-up.
        guidance_scale: the classifier-free guidance scale ``s``.
        settings: the SLD settings (e.g. :func:`sld_preset`).
        momentum: ``ν`` carried from the previous step; None at the first step.

    Returns:
        The guided prediction and the momentum to carry to the next step (None while disabled).
    """
    if not noise_uncond.shape == noise_text.shape == noise_safety.shape:
        raise ValueError(
            f"predictions differ in shape: {tuple(noise_uncond.shape)}, {tuple(noise_text.shape)}, "
            f"{tuple(noise_safety.shape)}"
        )
    guidance = noise_text - noise_uncond
    if not settings.enabled:
        return noise_uncond + guidance_scale * guidance, momentum
    if momentum is None:
        momentum = torch.zeros_like(guidance)
    difference = noise_text - noise_safety
    scale = (difference.abs() * settings.sld_guidance_scale).clamp(max=1.0)
    # Where the prompt's prediction already exceeds the safety concept's by the threshold, leave it alone.
    scale = torch.where(difference >= settings.sld_threshold, torch.zeros_like(scale), scale)
    safety = scale * (noise_safety - noise_uncond) + settings.sld_momentum_scale * momentum
    momentum = settings.sld_mom_beta * momentum + (1.0 - settings.sld_mom_beta) * safety
    if step >= settings.sld_warmup_steps:
        guidance = guidance - safety
    return noise_uncond + guidance_scale * guidance, momentum


class SafeLatentGuidance:
    """SLD as a stateful guidance step: call it once per sampling step, :meth:`reset` between trajectories.

    Args:
        settings: the SLD settings, or a preset name.
        guidance_scale: the classifier-free guidance scale ``s``.
    """

    def __init__(self, settings: SLDSettings | str = "medium", guidance_scale: float = 7.5) -> None:
        self.settings = sld_preset(settings) if isinstance(settings, str) else settings
        self.guidance_scale = guidance_scale
        self.momentum: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the momentum (a new trajectory starts)."""
        self.momentum = None

    def __call__(
        self, noise_uncond: torch.Tensor, noise_text: torch.Tensor, noise_safety: torch.Tensor, step: int
    ) -> torch.Tensor:
        """The guided prediction of step ``step``; the momentum is carried to the next call."""
        guided, self.momentum = sld_step(
            noise_uncond, noise_text, noise_safety, step, self.guidance_scale, self.settings, self.momentum
        )
        return guided
