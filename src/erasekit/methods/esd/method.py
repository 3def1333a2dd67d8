"""``esd``: Erased Stable Diffusion, the model fine-tuned away from the concept by negative guidance.

Each training sample (the new official code's loop, with its known bugs left out):

1. a random step ``i`` of the ``sampling.steps``-step schedule and fresh noise;
2. the *frozen* original model samples the concept prompt from that noise to step ``i`` (classifier-free
   guidance ``esd.start_guidance``; on guidance-distilled FLUX the guidance input) -> ``x_t``;
3. the frozen model predicts ``x_t`` for the concept prompt and for the empty prompt (the family's
   unconditional row: the empty prompt, DiT's null class) -> the target
   ``neutral - eta (concept - neutral)`` (:func:`~.kernels.esd_target_from_model`);
4. the model being trained predicts ``x_t`` for the concept prompt; MSE to the target (:func:`~.kernels.esd_loss`).

Both predictions of step 3 are *conditional* predictions of the same call (no classifier-free guidance
combination), which is the guidance-distilled form of the reference notes and the CFG form alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...arch.base import Trajectory
from ...arch.guidance import Conditional
from ...config import EraseConfig, EsdConfig
from ...errors import ConfigError
from ..base import register_method
from ..finetune import FineTuneMethod, WeightTrainer
from ..weights import WeightEditErasure
from .kernels import ESD_VARIANTS, esd_loss, esd_parameters, esd_target_from_model, module_name_predicate

CHANGES = "denoiser weights fine-tuned (ESD)"


class EsdErasure(WeightEditErasure):
    """The parameters ESD fine-tuned (``weights.safetensors``); applied by copying them in."""

    method = "esd"


def check_esd_settings(settings: EsdConfig, section: str = "esd") -> None:
    """Refuse ESD settings it cannot run with, naming the key (in ``section``: EAP shares these fields)."""
    if settings.variant not in ESD_VARIANTS:
        raise ConfigError(
            f"{section}.variant: unknown variant {settings.variant!r}; choose one of {', '.join(ESD_VARIANTS)}"
        )
    if settings.eta < 0:
        raise ConfigError(f"{section}.eta must not be negative (0 makes the target the empty prompt's prediction)")
    if not settings.lr > 0:
        raise ConfigError(f"{section}.lr must be positive, got {settings.lr}")
    if settings.start_guidance < 0:
        raise ConfigError(f"{section}.start_guidance must not be negative")


@dataclass
class EsdSample:
    """One ESD training sample: the frozen model's latent ``z`` before step ``step`` of ``trajectory`` (the
    concept prompt's) and the frozen ``target`` there."""

    trajectory: Trajectory
    z: torch.Tensor
    step: int
    target: torch.Tensor

    def prediction(self) -> torch.Tensor:
        """The trained model's conditional prediction for the concept prompt at ``z`` (with gradient)."""
        assert self.trajectory.predict is not None
        return self.trajectory.predict(self.z, self.step, Conditional("cond"))


class EsdTrainer(WeightTrainer):
    """ESD's parameter sets and loss on the shared fine-tuning loop."""

    erasure_class = EsdErasure
    changes = CHANGES

    def settings_of(self, config: EraseConfig) -> EsdConfig:
        self.settings: EsdConfig = config.esd
        check_esd_settings(self.settings)
        return self.settings

    def select(self) -> list[tuple[str, torch.nn.Parameter]]:
        text = self.arch.text_conditioning_modules(self.denoiser)
        if not text and self.settings.variant == "esd-x":
            raise ConfigError(
                f"esd.variant esd-x trains the text-conditioning projections, and the {self.arch.family} family "
                "has none (it is class-conditioned); use esd.variant=esd-u"
            )
        return esd_parameters(self.denoiser.named_parameters(), module_name_predicate(text), self.settings.variant)

    def esd_sample(self, sample: int) -> EsdSample:
        """Steps 1-3 of the module docstring for global training sample ``sample`` (step 4:
        :meth:`EsdSample.prediction`)."""
        s = self.config.sampling
        prompt = self.prompts.concept[self.concept_row(sample)]
        step = int(torch.randint(s.steps, (1,), generator=self.generator(sample)))
        trajectory = self.arch.trajectory(
            self.pipe,
            self.encode([prompt]),
            [self.noise_seed(sample)],
            steps=s.steps,
            resolution=s.resolution,
            guidance_scale=self.settings.start_guidance,
        )
        assert trajectory.predict is not None
        predict = trajectory.predict
        concept, neutral = Conditional("cond"), Conditional("uncond")

        def frozen(z: torch.Tensor, i: int, guidance: Conditional) -> torch.Tensor:
            return predict(z, i, guidance)

        with torch.no_grad(), self.original_weights():
            z = trajectory.noise
            for i in range(step):
                z = trajectory.step(z, i)
            target = esd_target_from_model(frozen, z, step, concept, neutral, self.settings.eta)  # type: ignore[arg-type]
        return EsdSample(trajectory, z, step, target)

    def loss(self, sample: int) -> tuple[torch.Tensor, dict[str, float]]:
        esd = self.esd_sample(sample)
        return esd_loss(esd.prediction().float(), esd.target.float()), {"timestep_index": float(esd.step)}


@register_method
class EsdMethod(FineTuneMethod):
    """ESD (Gandikota et al., ICCV 2023): the text-conditioning projections (``esd-x``) or the rest of the
    denoiser (``esd-u``) fine-tuned towards the frozen model's negatively guided prediction."""

    name = "esd"
    config_class = EsdConfig
    section = "esd"
    erasure_class = EsdErasure
    needs_cfg = False
    changes = CHANGES
    several_concepts = True
    families = ("dit", "flux", "pixart", "sd3", "unet")
    summary = "ESD: fine-tune the denoiser towards the frozen model's negatively guided prediction"
    trainer_class = EsdTrainer

    def check_settings(self, settings: Any) -> None:
        check_esd_settings(settings)


__all__ = ["CHANGES", "EsdErasure", "EsdMethod", "EsdSample", "EsdTrainer", "check_esd_settings"]
