"""``ca``: concept ablation (model-based), the concept prompt's prediction pulled to the anchor prompt's.

As the official code does, the original model first generates ``ca.anchor_images`` images of the anchor
(each concept prompt's target: the concept replaced by the anchor). Each training sample then takes one
of them, noises it to a random step ``i`` of the ``sampling.steps``-step schedule and pulls the model's
prediction for the matching *concept* prompt to the model's own prediction for the anchor prompt, held
fixed (:func:`~.kernels.ca_loss`). With ``ca.prior_weight > 0`` the anchor prompt's prediction on the same
noised image is also trained towards the true target (the ordinary denoising loss: prior preservation).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ...arch.guidance import Conditional
from ...arch.samplers import run_trajectory
from ...config import CaConfig, EraseConfig
from ...errors import ConfigError
from ..base import register_method
from ..esd.kernels import module_name_predicate
from ..finetune import FineTuneMethod, WeightTrainer
from ..weights import WeightEditErasure
from .kernels import ca_loss, ca_parameters

CHANGES = "denoiser weights fine-tuned (concept ablation)"
#: The groups erasekit's CA offers (the official ``embedding`` group trains the text encoder, which
#: a denoiser weight edit does not hold).
CA_GROUPS = ("cross-attn", "attn", "full-weight")
#: Attention projections in every family's denoiser (diffusers' names): queries, keys, values, outputs,
#: and the text stream's projections of joint attention.
_ATTENTION = re.compile(r"(^|\.)attn\d?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$")


class CaErasure(WeightEditErasure):
    """The parameters concept ablation fine-tuned (``weights.safetensors``); applied by copying them in."""

    method = "ca"


def check_ca_settings(settings: CaConfig) -> None:
    """Refuse CA settings it cannot run with, naming the key."""
    if settings.parameters not in CA_GROUPS:
        extra = " (the text encoder's embedding is not a denoiser edit)" if settings.parameters == "embedding" else ""
        raise ConfigError(
            f"ca.parameters: unknown group {settings.parameters!r}{extra}; choose one of {', '.join(CA_GROUPS)}"
        )
    if not settings.lr > 0:
        raise ConfigError(f"ca.lr must be positive, got {settings.lr}")
    if settings.prior_weight < 0:
        raise ConfigError("ca.prior_weight must not be negative (0 switches the prior loss off)")
    if settings.anchor_images < 1:
        raise ConfigError("ca.anchor_images must be at least 1")


class CaTrainer(WeightTrainer):
    """Concept ablation's parameter groups and loss on the shared fine-tuning loop."""

    erasure_class = CaErasure
    changes = CHANGES

    def __init__(
        self, pipe: Any, config: EraseConfig, output: str | Path, accelerator: Any, model_id: str | None = None
    ) -> None:
        self.images: torch.Tensor | None = None  # the anchor images, drawn when training starts
        super().__init__(pipe, config, output, accelerator, model_id)

    def settings_of(self, config: EraseConfig) -> CaConfig:
        self.settings: CaConfig = config.ca
        check_ca_settings(self.settings)
        return self.settings

    def select(self) -> list[tuple[str, torch.nn.Parameter]]:
        text = self.arch.text_conditioning_modules(self.denoiser)
        if not text and self.settings.parameters == "cross-attn":
            raise ConfigError(
                f"ca.parameters cross-attn trains the text-conditioning projections, and the {self.arch.family} "
                "family has none (it is class-conditioned); use ca.parameters=attn"
            )
        return ca_parameters(
            self.denoiser.named_parameters(),
            self.settings.parameters,
            is_text_conditioning=module_name_predicate(text),
            is_attention=lambda module: bool(_ATTENTION.search(module)),
        )

    def _sample_settings(self) -> dict[str, Any]:
        s = self.config.sampling
        return {"steps": s.steps, "resolution": s.resolution, "guidance_scale": s.guidance_scale}

    def prepare(self) -> None:
        """Generate the anchor images (final latents) with the original model, deterministically, so that a
        resumed run trains on the same ones."""
        rows = [j % len(self.prompts.target) for j in range(self.settings.anchor_images)]
        prompts = [self.prompts.target[r] for r in rows]
        seeds = [self.noise_seed(j, 3) for j in range(len(rows))]
        trajectory = self.arch.trajectory(self.pipe, self.encode(prompts), seeds, **self._sample_settings())
        with self.original_weights():  # a resumed run has the trained values in place by now
            final = run_trajectory(trajectory.step, trajectory.noise, self.config.sampling.steps)[-1]
        self.images = final.detach()

    def loss(self, sample: int) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.images is not None, "prepare() generates the anchor images first"
        generator = self.generator(sample)
        image = int(torch.randint(len(self.images), (1,), generator=generator))
        step = int(torch.randint(self.config.sampling.steps, (1,), generator=generator))
        row = image % len(self.prompts.target)
        x0 = self.images[image : image + 1]
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        anchor = Conditional("anchor", {"anchor": self.encode([self.prompts.target[row]])})
        trajectory = self.arch.trajectory(
            self.pipe, self.encode([self.prompts.concept[row]]), [self.noise_seed(sample)], **self._sample_settings()
        )
        assert trajectory.predict is not None
        z = trajectory.add_noise(x0, noise, step)
        with torch.no_grad():
            anchor_prediction = trajectory.predict(z, step, anchor)
        prediction = trajectory.predict(z, step, Conditional("cond"))
        if self.settings.prior_weight > 0:
            assert trajectory.schedule is not None
            truth = trajectory.schedule.target(x0, noise, step)
            loss = ca_loss(
                prediction.float(),
                anchor_prediction.float(),
                prior_prediction=trajectory.predict(z, step, anchor).float(),
                prior_noise=truth.float(),
                prior_weight=self.settings.prior_weight,
            )
        else:
            loss = ca_loss(prediction.float(), anchor_prediction.float())
        return loss, {"timestep_index": float(step)}


@register_method
class CaMethod(FineTuneMethod):
    """Concept ablation (Kumari et al., ICCV 2023), model-based: the concept prompt's prediction is pulled to
    the anchor prompt's on the anchor's images; cross-attention by default."""

    name = "ca"
    config_class = CaConfig
    section = "ca"
    erasure_class = CaErasure
    needs_cfg = False
    changes = CHANGES
    several_concepts = True
    families = ("dit", "flux", "pixart", "sd3", "unet")
    summary = "concept ablation: fine-tune so the concept prompt predicts what the anchor prompt does"
    trainer_class = CaTrainer

    def check_settings(self, settings: Any) -> None:
        check_ca_settings(settings)


__all__ = ["CA_GROUPS", "CHANGES", "CaErasure", "CaMethod", "CaTrainer", "check_ca_settings"]
