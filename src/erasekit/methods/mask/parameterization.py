"""Mask parameterisations: logits (float32) -> mask values in [0, 1].

* ``sigmoid``: m = sigmoid(lambda).
* ``hard_concrete`` (Louizos et al., 2018): a stretched, clamped binary-concrete sample; the uniform
  noise ``u`` is drawn by the caller once per trajectory and reused for every step and recomputation.
* ``binary``: m = 1[lambda > 0], optionally with the sigmoid's gradient passed straight through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PARAMETERIZATIONS = ("sigmoid", "hard_concrete", "binary")


@dataclass(frozen=True)
class MaskSettings:
    """How logits become mask values."""

    parameterization: str = "hard_concrete"
    temperature: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1
    straight_through: bool = True

    def __post_init__(self) -> None:
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"unknown mask parameterization {self.parameterization!r}; choose one of {', '.join(PARAMETERIZATIONS)}"
            )


def binary_mask(logits: torch.Tensor) -> torch.Tensor:
    """The inference mask: keep a unit where its logit is positive."""
    return (logits > 0).to(logits.dtype)


def mask_values(logits: torch.Tensor, settings: MaskSettings, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Training-time mask values for ``logits`` (``noise``: uniform samples for hard-concrete)."""
    kind = settings.parameterization
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    if kind == "hard_concrete":
        if noise is None:
            raise ValueError("hard_concrete masks need noise drawn once per trajectory")
        s = torch.sigmoid((torch.log(noise) - torch.log1p(-noise) + logits) / settings.temperature)
        return (s * (settings.zeta - settings.gamma) + settings.gamma).clamp(0.0, 1.0)
    hard = binary_mask(logits)
    if settings.straight_through:
        soft = torch.sigmoid(logits)
        return hard + (soft - soft.detach())  # exactly 0 or 1 forward, the sigmoid gradient backward
    return hard


def closed_probability(logits: torch.Tensor, settings: MaskSettings) -> torch.Tensor:
    """Expected probability that each unit's gate is closed (the differentiable unit count)."""
    if settings.parameterization == "hard_concrete":
        # P(gate > 0) for the stretched concrete distribution (Louizos et al., eq. 12).
        shift = settings.temperature * math.log(-settings.gamma / settings.zeta)
        return 1.0 - torch.sigmoid(logits - shift)
    return 1.0 - torch.sigmoid(logits)


def draw_noise(num: int, generator: torch.Generator, eps: float = 1e-6) -> torch.Tensor:
    """Uniform(eps, 1 - eps) samples on the CPU, float32 (deterministic across devices)."""
    u = torch.rand(num, generator=generator, dtype=torch.float32)
    return u.clamp(eps, 1.0 - eps)
