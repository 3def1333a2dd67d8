"""Scheduler-driven samplers made stateless (UNet, PixArt and DiT families), :func:`set_scheduler`,
and :func:`run_trajectory`, which runs any family's stateless steps.

:class:`StatelessSampler` runs a private copy of a pipeline's scheduler whose state is set
explicitly before every step, so a step is a pure function of (state, index) and recomputing it is
bit-identical. Multistep history (DPM-Solver's converted outputs, PLMS's kept outputs) travels in
the latent state as extra channels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ModelLoadError
from .base import PREDICTION_TYPES, NoiseSchedule
from .common import check_steps

__all__ = [
    "ALL_SCHEDULERS",
    "SCHEDULER_CLASSES",
    "SUPPORTED_SCHEDULERS",
    "StatelessSampler",
    "fresh_scheduler",
    "run_trajectory",
    "set_scheduler",
]

#: Names accepted by :func:`set_scheduler` and the diffusers scheduler class each one builds
#: (``pipeline``: keep the pipeline's own scheduler).
SCHEDULER_CLASSES: dict[str, str | None] = {
    "pipeline": None,
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
}

#: Scheduler classes :class:`StatelessSampler` accepts by default (the PixArt and DiT trajectories).
SUPPORTED_SCHEDULERS = ("DPMSolverMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler")
#: Every scheduler class :class:`StatelessSampler` can make stateless (PLMS added: the UNet trajectory).
ALL_SCHEDULERS = (*SUPPORTED_SCHEDULERS, "PNDMScheduler")
_DETERMINISTIC_DPM = ("dpmsolver++", "dpmsolver")


def run_trajectory(
    step: Callable[[torch.Tensor, int], torch.Tensor], z_start: torch.Tensor, num_steps: int, keep: bool = False
) -> list[torch.Tensor]:
    """Run ``num_steps`` steps of a stateless ``step(z, i)`` (a :class:`~erasekit.arch.base.Trajectory`'s)
    from ``z_start`` without gradients; returns [z_T, ..., z_0] if ``keep`` else [z_0].

    Generation takes the final latent; the trajectory gradients keep every latent to recompute the
    steps from (``erasekit.training.gradient``).
    """
    latents = [z_start]
    z = z_start
    with torch.no_grad():
        for i in range(num_steps):
            z = step(z, i)
            if keep:
                latents.append(z)
    return latents if keep else [z]


def set_scheduler(pipe: Any, name: str) -> Any:
    """Replace ``pipe.scheduler`` by the scheduler ``name`` built from its config; returns the pipeline.

    Names: ``pipeline`` (keep it as it is), ``ddim``, ``euler``, ``dpm`` (DPM-Solver multistep),
    ``pndm`` and ``flow-euler`` (flow-matching Euler). E.g. ``set_scheduler(pipe, "ddim")`` on SD 1.5
    (which ships with PNDM) gives the DDIM sampler of the method's reference setting.

    Raises:
        ValueError: ``name`` is not one of the names above.
    """
    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_CLASSES)}")
    class_name = SCHEDULER_CLASSES[name]
    if class_name is not None:
        import diffusers

        pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config)
    return pipe


def fresh_scheduler(scheduler: Any) -> Any:
    """A private scheduler of the same class and config (the pipeline's own is never touched)."""
    return type(scheduler).from_config(scheduler.config)


class StatelessSampler:
    """A private copy of a pipeline's scheduler whose step is a pure function of (state, index).

    The copy is built from the pipeline scheduler's config and ``set_timesteps(steps)`` once; before
    every step all the state the scheduler reads is set explicitly from the arguments: its step index;
    for DPM-Solver multistep the previous converted model outputs and the lower-order counter; for
    PLMS (``PNDMScheduler`` with ``skip_prk_steps``) its counter, kept model outputs and first sample.
    So calling ``step(state, i, predict)`` twice with the same inputs gives bit-identical results.

    The history travels in ``state``: channels ``[0, C)`` hold the latent and the following channels,
    ``C`` each, the carried tensors (see :meth:`carried`), oldest first. DPM-Solver carries the last
    ``min(i, solver_order - 1)`` converted outputs; PLMS the (at most 3) noise predictions it keeps
    and, before step 1 only, the sample step 0 started from (PLMS re-evaluates that point). The state
    of the first step is the noise and the state after the last step is the latent alone.

    Args:
        scheduler: the pipeline's scheduler (only its class and config are used; it is not touched).
        steps: number of inference steps (PNDM's timestep list, hence its trajectory, has one more).
        device: where the timesteps live.
        channels: latent channels ``C``.
        x0_when_single_step: return the scheduler's predicted ``x0`` (its second output) after a
            one-step trajectory, as ``PixArtAlphaPipeline`` does for distilled one-step sampling.
        family: named in error messages.
        supported: the scheduler class names accepted (a subset of :data:`ALL_SCHEDULERS`).
        error: the exception class raised for an unsupported scheduler.

    Raises:
        ModelLoadError (or ``error``): the scheduler class (or its DPM-Solver / PNDM variant) is not
            supported; the message names the supported ones and how to switch.
        ValueError: ``steps < 1``.
    """

    def __init__(
        self,
        scheduler: Any,
        steps: int,
        device: torch.device,
        channels: int,
        *,
        x0_when_single_step: bool = False,
        family: str = "this pipeline",
        supported: tuple[str, ...] = SUPPORTED_SCHEDULERS,
        error: type[Exception] = ModelLoadError,
    ) -> None:
        name = type(scheduler).__name__
        if name not in supported:
            names = [k for k, v in SCHEDULER_CLASSES.items() if v in supported]
            raise error(
                f"{family}: the pipeline's scheduler {name} is not supported by the stateless trajectory; "
                f"supported: {', '.join(supported)}. Switch it first with "
                f"erasekit.arch.samplers.set_scheduler(pipe, {' | '.join(repr(k) for k in names)})"
            )
        self.multistep = name == "DPMSolverMultistepScheduler"
        self.plms = name == "PNDMScheduler"
        if self.multistep and scheduler.config.algorithm_type not in _DETERMINISTIC_DPM:
            raise error(
                f"{family}: DPMSolverMultistepScheduler with algorithm_type={scheduler.config.algorithm_type!r} "
                f"draws noise at every step; the trajectory supports the deterministic {' / '.join(_DETERMINISTIC_DPM)}"
            )
        if self.plms and not scheduler.config.skip_prk_steps:
            raise error(
                f"{family}: PNDMScheduler is supported with skip_prk_steps=True (Stable Diffusion's setting) only"
            )
        check_steps(steps)
        self.scheduler = fresh_scheduler(scheduler)
        self.scheduler.set_timesteps(steps, device=device)
        self.timesteps = self.scheduler.timesteps
        self.num_steps = len(self.timesteps)
        self.channels = channels
        self.order = int(self.scheduler.config.solver_order) if self.multistep else 1
        self.history = self.order - 1 if self.multistep else 0
        self.x0_when_single_step = x0_when_single_step
        self.init_noise_sigma = float(self.scheduler.init_noise_sigma)

    def carried(self, i: int) -> int:
        """How many tensors of history the state before step ``i`` carries."""
        if self.plms:
            # after step 0: its output and start sample; after step 1: one output; then up to 3 outputs
            return 0 if i == 0 else 2 if i == 1 else min(i - 1, 3)
        return min(i, self.history)

    def model_input(self, state: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scaled latent, timestep)`` the model sees at step ``i`` for the state before it (history ignored)."""
        if not 0 <= i < self.num_steps:
            raise ValueError(f"step index {i} is outside this {self.num_steps}-step schedule")
        self.scheduler._step_index = i  # Euler's input scaling reads it
        t = self.timesteps[i]
        return self.scheduler.scale_model_input(state[:, : self.channels], t), t

    def noise_schedule(self) -> NoiseSchedule | None:
        """The timesteps and noise levels of this schedule, the latent before step ``i`` being
        ``alpha_i x0 + sigma_i noise`` in the scheduler's own latent scale; None for a prediction type
        :class:`~erasekit.arch.base.NoiseSchedule` does not know (sampling is not affected)."""
        sched = self.scheduler
        kind = sched.config.prediction_type
        kind = "flow" if kind == "flow_prediction" else kind
        if kind not in PREDICTION_TYPES:
            return None
        name = type(sched).__name__
        alphas, sigmas = [], []
        for i in range(self.num_steps):
            if name == "EulerDiscreteScheduler":
                alpha, sigma = 1.0, float(sched.sigmas[i])
            elif self.multistep:
                a, s = sched._sigma_to_alpha_sigma_t(sched.sigmas[i])
                alpha, sigma = float(a), float(s)
            else:  # DDIM, PLMS: the training schedule's cumulative alphas at this timestep
                cumulative = float(sched.alphas_cumprod[int(self.timesteps[i])])
                alpha, sigma = cumulative**0.5, (1 - cumulative) ** 0.5
            alphas.append(alpha)
            sigmas.append(sigma)
        return NoiseSchedule(self.timesteps, tuple(alphas), tuple(sigmas), kind)

    def step(
        self,
        state: torch.Tensor,
        i: int,
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """One solver step: ``predict(scaled_latent, t)`` must return the model output the scheduler expects."""
        c, k = self.channels, self.carried(i)
        if state.shape[1] != c * (1 + k):
            raise ValueError(
                f"latent state before step {i} has {state.shape[1]} channels; expected {c * (1 + k)} "
                f"({c} latent + {k} x {c} carried solver history)"
            )
        x = state[:, :c]
        previous = list(state[:, c:].split(c, dim=1)) if k else []
        sched = self.scheduler
        # Everything the scheduler reads is set here: it never relies on its own counters.
        sched._step_index = i
        if self.multistep:
            sched.model_outputs = [None] * (self.order - k) + previous
            sched.lower_order_nums = min(i, self.order)
        elif self.plms:
            sched.cur_sample = previous.pop() if i == 1 else None
            sched.ets = previous
            sched.counter = i
        t = self.timesteps[i]
        model_output = predict(sched.scale_model_input(x, t), t)
        out = sched.step(model_output, t, x, return_dict=False)
        latent = out[0]
        if self.x0_when_single_step and self.num_steps == 1 and len(out) > 1:
            latent = out[1]
        last = i + 1 == self.num_steps
        carried: list[torch.Tensor] = []
        if self.multistep:
            keep = 0 if last else min(i + 1, self.history)
            carried = sched.model_outputs[len(sched.model_outputs) - keep :] if keep else []
            sched.model_outputs = [None] * self.order  # no reference to this step's graph stays behind
        elif self.plms:
            if not last:
                carried = list(sched.ets[-3:]) + ([sched.cur_sample] if sched.cur_sample is not None else [])
            sched.ets, sched.cur_sample = [], None
        return torch.cat([latent, *[m.to(latent.dtype) for m in carried]], dim=1) if carried else latent
