"""``advunlearn``: ESD trained against an attacker (AdvUnlearn, Zhang et al., NeurIPS 2024).

Each training sample is ESD's (:mod:`erasekit.methods.esd`: the frozen model's latent ``x_t`` of the
concept prompt at a random step and its negatively guided target there), with two changes:

1. **The inner attack.** Before the model's loss, an attacker holding the model as it is now moves the
   concept prompt's text-encoder outputs with ``attack_steps`` Adam steps so that the trained model's
   prediction at ``x_t`` matches what the *frozen* model predicts there for the concept prompt
   (AdvUnlearn's ``min_delta MSE(eps_theta(x_t, c(delta + P)), eps*(x_t, c_P))``;
   :func:`erasekit.training.adversarial.adversarial_conditioning`, shared with the mask's
   ``train.adversarial``). ESD's loss is then taken on that conditioning: the model learns to erase what
   the attacker found, not only the plain prompt.
2. **The retain loss.** ``retain_weight`` times the distance of the trained model's prediction for a
   preservation prompt at the same ``x_t`` to the frozen model's (the official code draws COCO object
   prompts; erasekit uses the run's preservation prompts).

Where erasekit departs from the official code: the attacker moves the text-encoder outputs (every token
position and the pooled vector) rather than one prefix token's word embedding, and the model trains the
text-conditioning projections (``esd-x``) rather than the text encoder, which the reference notes recommend
on FLUX and SD3 and which is one parameter set for every text family.
"""

from __future__ import annotations

from typing import Any

import torch

from ...arch.guidance import Conditional
from ...config import AdvUnlearnConfig, EraseConfig
from ...errors import ConfigError
from ...training.adversarial import adversarial_conditioning
from ..base import register_method
from ..esd.kernels import esd_loss
from ..esd.method import EsdTrainer, check_esd_settings
from ..finetune import FineTuneMethod
from ..weights import WeightEditErasure

CHANGES = "denoiser weights fine-tuned against an inner attack (AdvUnlearn)"


class AdvUnlearnErasure(WeightEditErasure):
    """The parameters AdvUnlearn fine-tuned (``weights.safetensors``); applied by copying them in."""

    method = "advunlearn"


def check_advunlearn_settings(settings: AdvUnlearnConfig) -> None:
    """Refuse AdvUnlearn settings it cannot run with, naming the key."""
    check_esd_settings(settings, section="advunlearn")
    if settings.attack_steps < 0:
        raise ConfigError("advunlearn.attack_steps must not be negative (0 trains plain ESD with the retain loss)")
    if settings.attack_steps and not settings.attack_lr > 0:
        raise ConfigError(f"advunlearn.attack_lr must be positive, got {settings.attack_lr}")
    if settings.retain_weight < 0:
        raise ConfigError("advunlearn.retain_weight must not be negative")


class AdvUnlearnTrainer(EsdTrainer):
    """ESD's sample, the inner attack on its conditioning, and the retain loss (see the module docstring)."""

    erasure_class = AdvUnlearnErasure
    changes = CHANGES

    def settings_of(self, config: EraseConfig) -> AdvUnlearnConfig:
        self.settings: AdvUnlearnConfig = config.advunlearn
        check_advunlearn_settings(self.settings)
        return self.settings

    def loss(self, sample: int) -> tuple[torch.Tensor, dict[str, float]]:
        esd = self.esd_sample(sample)
        trajectory, z, step = esd.trajectory, esd.z, esd.step
        assert trajectory.predict is not None
        predict_at = trajectory.predict

        def predict(conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
            # the model's conditional prediction at x_t for any conditioning (a role of its own)
            return predict_at(z, step, Conditional("attack", {"attack": conditioning}))

        concept = self.encode([self.prompts.concept[self.concept_row(sample)]])
        with torch.no_grad(), self.original_weights():
            wanted = predict(concept)
        found, history = adversarial_conditioning(
            predict, concept, wanted, self.settings.attack_steps, self.settings.attack_lr
        )
        loss = esd_loss(predict(found).float(), esd.target.float())
        numbers = {"timestep_index": float(step)}
        if history:
            # how far the attack brought the model's prediction back to the frozen concept's (1: not at all)
            numbers["attack_remaining"] = history[-1] / history[0] if history[0] > 0 else 0.0
        if self.settings.retain_weight:
            keep = self.encode([self.prompts.preservation[sample % len(self.prompts.preservation)]])
            with torch.no_grad(), self.original_weights():
                kept = predict(keep)
            retain = (predict(keep).float() - kept.float()).pow(2).mean()
            loss = loss + self.settings.retain_weight * retain
            numbers["retain"] = float(retain.detach())
        return loss, numbers


@register_method
class AdvUnlearnMethod(FineTuneMethod):
    """AdvUnlearn (Zhang et al., NeurIPS 2024): ESD against an inner attack on the conditioning, with a retain
    loss; the text-conditioning projections are trained."""

    name = "advunlearn"
    config_class = AdvUnlearnConfig
    section = "advunlearn"
    erasure_class = AdvUnlearnErasure
    needs_cfg = False
    changes = CHANGES
    families = ("flux", "pixart", "sd3", "unet")
    summary = "AdvUnlearn: ESD trained against an inner attack on the conditioning, plus a retain loss"
    trainer_class = AdvUnlearnTrainer
    # ESD's sampling draws each step's concept prompt from every erased concept's prompts, and the attack
    # starts from that prompt
    several_concepts = True

    def check_settings(self, settings: Any) -> None:
        check_advunlearn_settings(settings)


__all__ = ["CHANGES", "AdvUnlearnErasure", "AdvUnlearnMethod", "AdvUnlearnTrainer", "check_advunlearn_settings"]
