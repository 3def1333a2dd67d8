"""FlowEdit (Kulikov et al., "FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow Models",
2024): inference-time editing along a rectified flow, model-independent.

Rectified flow noises ``x_σ = (1 − σ) x0 + σ ε`` and samples by Euler steps ``z ← z + (σ' − σ) v(z, σ, c)``
(diffusers' flow-matching convention, σ from high to low). FlowEdit moves a clean source latent ``x_src``
towards the target conditioning without inverting it: at each step of its window it draws fresh noise,
puts the source on its noisy path and the edit at the same offset,

    z_src = (1 − σ) x_src + σ ε,      z_tar = z_edit + z_src − x_src
    Δv    = v(z_tar, σ, c_tar) − v(z_src, σ, c_src)          (averaged over ``n_avg`` draws of ε)
    z_edit ← z_edit + (σ' − σ) Δv

starting from ``z_edit = x_src``. Of ``T`` steps, the first ``T − n_max`` are skipped (the edit starts at a
lower noise level and keeps the source's layout); the last ``n_min`` are ordinary sampling of the target from
the noised edit ``z_edit + z_src − x_src``. In erasekit it erases at inference time: the source conditioning
is the concept prompt's, the target the anchor's (the reference code's FLUX baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from erasekit.errors import ConfigError

#: ``velocity(z, sigma, conditioning) -> v`` with ``sigma`` a 0-d tensor; guidance (true CFG or a distilled
#: guidance embedding) is the callable's business, as are the family's timestep units.
VelocityField = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def flowedit(
    velocity: VelocityField,
    source_latents: torch.Tensor,
    source_conditioning: Any,
    target_conditioning: Any,
    sigmas: torch.Tensor,
    *,
    n_avg: int = 1,
    n_min: int = 0,
    n_max: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """The FlowEdit result: the clean latent edited from ``source_conditioning`` to ``target_conditioning``.

    Args:
        velocity: the model's velocity field (see :data:`VelocityField`).
        source_latents: ``x_src``, the clean latent of the source image.
        source_conditioning, target_conditioning: passed through to ``velocity``.
        sigmas: 1-D, strictly decreasing, ``T + 1`` values: step ``i`` goes from ``sigmas[i]`` to ``sigmas[i+1]``
            (the last is usually 0).
        n_avg: noise draws averaged per step.
        n_min: the last ``n_min`` steps sample the target plainly.
        n_max: the edit runs over the last ``n_max`` steps (None: all ``T``).
        generator: for the noise draws: one, or one per row of ``source_latents`` (as diffusers' ``randn_tensor``
            takes them), which makes a row's draws independent of the rows batched with it.

    Raises:
        ConfigError: a schedule that is not strictly decreasing, or window settings out of range.
    """
    if sigmas.dim() != 1 or sigmas.numel() < 2 or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ConfigError("FlowEdit needs a strictly decreasing 1-D sigma schedule of at least 2 values")
    steps = sigmas.numel() - 1
    n_max = steps if n_max is None else n_max
    if n_avg < 1:
        raise ConfigError(f"FlowEdit n_avg must be >= 1, got {n_avg}")
    if not 0 <= n_min <= n_max <= steps:
        raise ConfigError(
            f"FlowEdit needs 0 <= n_min <= n_max <= {steps} (the steps), got n_min={n_min}, n_max={n_max}"
        )
    x_src = source_latents
    if isinstance(generator, Sequence) and len(generator) != x_src.shape[0]:
        raise ConfigError(f"FlowEdit got {len(generator)} generators for {x_src.shape[0]} rows; give one per row")

    def noise() -> torch.Tensor:
        if isinstance(generator, Sequence):
            row = (1, *x_src.shape[1:])
            return torch.cat([torch.randn(row, generator=g, dtype=x_src.dtype, device=x_src.device) for g in generator])
        return torch.randn(x_src.shape, generator=generator, dtype=x_src.dtype, device=x_src.device)

    z_edit = x_src.clone()
    z_tar: torch.Tensor | None = None
    with torch.no_grad():
        for i in range(steps - n_max, steps):
            sigma, step = sigmas[i], sigmas[i + 1] - sigmas[i]
            if i < steps - n_min:
                delta = torch.zeros_like(x_src)
                for _ in range(n_avg):
                    z_src_t = (1 - sigma) * x_src + sigma * noise()
                    z_tar_t = z_edit + z_src_t - x_src
                    delta += velocity(z_tar_t, sigma, target_conditioning) - velocity(
                        z_src_t, sigma, source_conditioning
                    )
                z_edit = z_edit + step * delta / n_avg
            else:
                if z_tar is None:
                    # Put the edit on the target's noisy path once, then sample it plainly.
                    z_tar = z_edit + sigma * (noise() - x_src)
                z_tar = z_tar + step * velocity(z_tar, sigma, target_conditioning)
    return z_edit if z_tar is None else z_tar
