"""AdvUnlearn wired on a real tiny pipeline: without an attack its loss is ESD's for the same sample; against a
model that has moved, the inner attack lowers its objective and the loss is taken on what it found; the retain
loss is the trained model's distance to the frozen one on a preservation prompt; bad settings are refused."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import erasekit.methods.advunlearn.method as advunlearn_module
from erasekit.config import EraseConfig, load_config
from erasekit.errors import ConfigError
from erasekit.methods import get_method
from erasekit.methods.advunlearn import AdvUnlearnTrainer
from erasekit.methods.esd.method import EsdTrainer
from erasekit.tiny import build_tiny_flux_pipeline
from erasekit.training.run import make_accelerator
from tiny_settings import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerator_state")

SHARED = [
    *tiny_overrides(),
    "concept.templates=['a photo of {concept}', 'a {concept} on a sofa']",
]
#: The ESD fields both methods read, the same values in each section.
ESD_FIELDS = ["variant=esd-x", "eta=1.5", "start_guidance=2.0", "lr=1e-3"]


def _config(method: str, *extra: str) -> EraseConfig:
    return load_config(None, [f"method={method}", *SHARED, *[f"{method}.{f}" for f in ESD_FIELDS], *extra])


@pytest.fixture(scope="module")
def pipe() -> Any:
    return build_tiny_flux_pipeline(seed=0)


def _trainer(cls: type, pipe: Any, config: EraseConfig, path: Path) -> Any:
    return cls(pipe, config, path / "out", make_accelerator(config, path))


def _advunlearn(pipe: Any, path: Path, attack_steps: int, retain_weight: float, *extra: str) -> AdvUnlearnTrainer:
    config = _config(
        "advunlearn", f"advunlearn.attack_steps={attack_steps}", f"advunlearn.retain_weight={retain_weight}", *extra
    )
    return _trainer(AdvUnlearnTrainer, pipe, config, path)


def _move(trainer: Any, scale: float = 0.5) -> None:
    """Move the trained parameters away from the originals, as training would (the frozen copy stays)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainer.params.values():
            p.add_(scale * torch.randn(p.shape, generator=generator) * p.abs().mean())
            p.requires_grad_(True)  # as the fit sets them


def test_without_attack_or_retain_the_loss_is_esds(pipe: Any, tmp_path: Path) -> None:
    esd = _trainer(EsdTrainer, pipe, _config("esd"), tmp_path / "esd")
    adv = _advunlearn(pipe, tmp_path / "adv", 0, 0)
    for trainer in (esd, adv):
        _move(trainer)
    for sample in (0, 1):
        expected, _ = esd.loss(sample)
        got, numbers = adv.loss(sample)
        assert float(got) == pytest.approx(float(expected), rel=1e-5)
        assert "attack_remaining" not in numbers


def test_the_attack_lowers_its_objective_and_the_loss_uses_what_it_found(
    pipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    histories: list[list[float]] = []
    original = advunlearn_module.adversarial_conditioning

    def spy(*args: Any, **kwargs: Any) -> Any:
        found, history = original(*args, **kwargs)
        histories.append(history)
        return found, history

    monkeypatch.setattr(advunlearn_module, "adversarial_conditioning", spy)
    attacked = _advunlearn(pipe, tmp_path / "attacked", 5, 0, "advunlearn.attack_lr=0.05")
    plain = _advunlearn(pipe, tmp_path / "plain", 0, 0)
    for trainer in (attacked, plain):
        _move(trainer)
    loss, numbers = attacked.loss(0)
    (history,) = histories
    assert len(history) == 6 and 0 < history[-1] < history[0]
    assert numbers["attack_remaining"] == pytest.approx(history[-1] / history[0])
    plain_loss, _ = plain.loss(0)
    assert float(loss) != pytest.approx(float(plain_loss), rel=1e-4)
    grads = torch.autograd.grad(loss, list(attacked.params.values()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_retain_loss_is_zero_for_the_frozen_model_and_grows_when_it_moves(pipe: Any, tmp_path: Path) -> None:
    trainer = _advunlearn(pipe, tmp_path / "adv", 0, 0.3)
    _, numbers = trainer.loss(0)
    assert numbers["retain"] == 0.0
    without = _advunlearn(pipe, tmp_path / "without", 0, 0)
    for t in (trainer, without):
        _move(t)
    loss, numbers = trainer.loss(0)
    base, _ = without.loss(0)
    assert numbers["retain"] > 0
    assert float(loss) == pytest.approx(float(base) + 0.3 * numbers["retain"], rel=1e-5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("advunlearn.attack_steps=-1", "advunlearn.attack_steps must not be negative"),
        ("advunlearn.attack_lr=0", "advunlearn.attack_lr must be positive"),
        ("advunlearn.retain_weight=-1", "advunlearn.retain_weight must not be negative"),
        ("advunlearn.eta=-1", "advunlearn.eta must not be negative"),
    ],
)
def test_bad_settings_are_refused(override: str, message: str) -> None:
    config = _config("advunlearn", override)
    with pytest.raises(ConfigError, match=message):
        get_method("advunlearn").check_settings(config.advunlearn)
