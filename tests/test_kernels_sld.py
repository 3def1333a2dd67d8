"""Known-value tests of the SLD guidance step (erasekit.methods.sld)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from erasekit.errors import ConfigError
from erasekit.methods.sld import SLD_PRESETS, SafeLatentGuidance, SLDSettings, sld_preset, sld_step


def predictions(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(0.05 * torch.randn(2, 8, generator=g) for _ in range(3))  # type: ignore[return-value]


def test_presets_are_the_papers() -> None:
    assert set(SLD_PRESETS) == {"weak", "medium", "strong", "max"}
    assert dataclasses.astuple(sld_preset("MEDIUM")) == (1000.0, 10, 0.01, 0.3, 0.4)
    assert dataclasses.astuple(sld_preset("max")) == (5000.0, 0, 1.0, 0.5, 0.7)
    assert dataclasses.astuple(sld_preset("weak")) == (20.0, 15, 0.0, 0.0, 0.0)
    assert dataclasses.astuple(sld_preset("strong")) == (2000.0, 7, 0.025, 0.5, 0.7)
    with pytest.raises(ConfigError, match="weak, medium, strong, max"):
        sld_preset("extreme")
    with pytest.raises(ConfigError, match="mom_beta"):
        SLDSettings(10.0, 0, 0.0, 0.0, 1.5)


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_guidance_scale_zero_is_plain_cfg(scale: float) -> None:
    uncond, text, safety = predictions()
    settings = dataclasses.replace(sld_preset("max"), sld_guidance_scale=scale)
    guided, momentum = sld_step(uncond, text, safety, 5, 7.5, settings)
    assert torch.equal(guided, uncond + 7.5 * (text - uncond))
    assert momentum is None


def test_warmup_is_respected_and_the_formula_holds() -> None:
    uncond, text, safety = predictions(1)
    settings = SLDSettings(
        sld_guidance_scale=30.0, sld_warmup_steps=2, sld_threshold=0.02, sld_momentum_scale=0.0, sld_mom_beta=0.0
    )
    cfg = uncond + 5.0 * (text - uncond)
    before, _ = sld_step(uncond, text, safety, 1, 5.0, settings)
    assert torch.equal(before, cfg)
    after, _ = sld_step(uncond, text, safety, 2, 5.0, settings)
    # The formula by hand, element by element.
    expected = torch.empty_like(cfg)
    for index in range(cfg.numel()):
        u, p, s = (v.flatten()[index].item() for v in (uncond, text, safety))
        gamma = 0.0 if p - s >= 0.02 else min(abs(p - s) * 30.0, 1.0)
        expected.view(-1)[index] = u + 5.0 * (p - u - gamma * (s - u))
    torch.testing.assert_close(after, expected)
    # Both branches of the threshold occur, so the test exercises each.
    assert ((text - safety) >= 0.02).any() and ((text - safety) < 0.02).any()


def test_momentum_accumulates_as_the_formula_says() -> None:
    uncond, text, safety = predictions(2)
    s_S, lam, s_m, beta = 40.0, 0.01, 0.5, 0.7
    settings = SLDSettings(s_S, 3, lam, s_m, beta)
    guidance = SafeLatentGuidance(settings, guidance_scale=4.0)
    gamma = torch.where(text - safety >= lam, 0.0, ((text - safety).abs() * s_S).clamp(max=1.0))
    nu = torch.zeros_like(text)
    for step in range(5):
        # The same predictions every step, so g_S changes only through the momentum.
        g_s = gamma * (safety - uncond) + s_m * nu
        expected = uncond + 4.0 * (text - uncond - (g_s if step >= 3 else 0.0))
        torch.testing.assert_close(guidance(uncond, text, safety, step), expected)
        nu = beta * nu + (1 - beta) * g_s
        torch.testing.assert_close(guidance.momentum, nu)
    assert nu.abs().max() > 0
    guidance.reset()
    assert guidance.momentum is None
    # After a reset the first step is the first step again.
    torch.testing.assert_close(guidance(uncond, text, safety, 0), uncond + 4.0 * (text - uncond))
    torch.testing.assert_close(guidance.momentum, (1 - beta) * gamma * (safety - uncond))
