"""Guidance as a pluggable step: which conditionings one denoiser call needs, and how their outputs
become the one prediction the sampler steps with.

A :class:`Guidance` names *roles*: ``"cond"`` (the prompts' own encoding), ``"uncond"`` (the
unconditional / empty-prompt rows the family's ``encode_prompts`` returns beside them) and any other
name, whose encoding the guidance carries in :attr:`Guidance.encodings` (an ``encode_prompts`` output:
its conditional rows are used; one row is broadcast to the batch). The family file runs the
denoiser once on all roles' rows stacked in one batch, splits the output by role and hands it to
:meth:`Guidance.combine`.

A guidance may carry state from step to step (SLD's momentum). To keep a trajectory's step a pure
function of ``(z, i)`` -- the trajectory gradients recompute steps -- the carry is stored by step
index: step ``i`` reads the carry step ``i - 1`` left (the initial one at step 0, or when step
``i - 1`` never ran), so recomputing step ``i`` reads the same carry and gives the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import ConfigError

__all__ = [
    "ClassifierFreeGuidance",
    "Conditional",
    "Guidance",
    "GuidedDenoiser",
    "broadcast_rows",
    "guidance_or_default",
    "role_tensor",
]


class Guidance:
    """Base class: what one guided step needs and how it combines the denoiser's outputs.

    Subclasses set :attr:`roles` and override :meth:`combine` (and :meth:`initial_carry` for a
    guidance with state).

    Attributes:
        roles: the conditionings one step evaluates, e.g. ``("uncond", "cond")``.
        needs_cfg: True when the guidance is only meaningful on a model with true classifier-free
            guidance (an unconditional branch); such a guidance is refused, in one line, on a
            guidance-distilled model (see ``Architecture.supports_cfg``).
        encodings: ``encode_prompts`` outputs of the roles other than ``cond`` and ``uncond``.
    """

    roles: tuple[str, ...] = ("cond",)
    needs_cfg: bool = False

    def __init__(self, encodings: Mapping[str, dict[str, torch.Tensor]] | None = None) -> None:
        self.encodings: dict[str, dict[str, torch.Tensor]] = dict(encodings or {})

    @property
    def name(self) -> str:
        return type(self).__name__

    def initial_carry(self) -> Any:
        """The state before the first step (default: none)."""
        return None

    def combine(self, outputs: dict[str, torch.Tensor], i: int, carry: Any) -> tuple[torch.Tensor, Any]:
        """The prediction of step ``i`` from the denoiser outputs by role, and the carry for step ``i + 1``."""
        raise NotImplementedError(f"{self.name} does not define combine()")

    def check(self, supports_cfg: bool, family: str) -> None:
        """Refuse, in one line, a guidance this model cannot run (no unconditional branch, missing encodings)."""
        if self.needs_cfg and not supports_cfg:
            raise ConfigError(
                f"{self.name} needs classifier-free guidance, and this {family} model has none "
                "(it is guidance-distilled: the scale is an input of the model)"
            )
        missing = [r for r in self.roles if r not in ("cond", "uncond") and r not in self.encodings]
        if missing:
            raise ConfigError(f"{self.name} needs encodings for role(s) {', '.join(missing)}; pass them in encodings=")


class ClassifierFreeGuidance(Guidance):
    """``uncond + scale (cond - uncond)``: exactly today's classifier-free guidance."""

    roles = ("uncond", "cond")
    needs_cfg = True

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def combine(self, outputs: dict[str, torch.Tensor], i: int, carry: Any) -> tuple[torch.Tensor, Any]:
        uncond, cond = outputs["uncond"], outputs["cond"]
        return uncond + self.scale * (cond - uncond), None


class Conditional(Guidance):
    """The output of one conditioning alone (no guidance): ``role="cond"`` is guidance scale 1 by definition.

    Another role (with its encoding) gives e.g. the target conditioning's velocity for FlowEdit.
    """

    def __init__(self, role: str = "cond", encodings: Mapping[str, dict[str, torch.Tensor]] | None = None) -> None:
        super().__init__(encodings)
        self.roles = (role,)

    def combine(self, outputs: dict[str, torch.Tensor], i: int, carry: Any) -> tuple[torch.Tensor, Any]:
        return outputs[self.roles[0]], None


def guidance_or_default(guidance: Guidance | None, cfg: bool, scale: float) -> Guidance:
    """``guidance``, or what a trajectory without ``guidance=`` does: classifier-free guidance when ``cfg``,
    else the prompts alone."""
    if guidance is not None:
        return guidance
    return ClassifierFreeGuidance(scale) if cfg else Conditional()


def _detached(carry: Any) -> Any:
    # A carry kept for later steps must not hold this step's autograd graph.
    if isinstance(carry, torch.Tensor):
        return carry.detach()
    if isinstance(carry, tuple | list):
        return type(carry)(_detached(c) for c in carry)
    if isinstance(carry, dict):
        return {k: _detached(v) for k, v in carry.items()}
    return carry


#: ``condition(role, guidance)``: the family's conditioning tensors of one role, ``batch`` rows each.
ConditionFn = Callable[[str, Guidance], dict[str, Any]]
#: ``call(rows, t, conditioning)``: the family's denoiser output for stacked rows (the part the sampler uses).
CallFn = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]


class GuidedDenoiser:
    """One family's guided denoiser call: stacks the rows of every role, runs the model once, combines.

    Args:
        default: the trajectory's guidance.
        condition: the conditioning tensors of a role (values that are not tensors are passed as they are).
        call: the denoiser on stacked rows with the stacked conditioning.
        cond_first: stack ``cond`` before the other roles (DiT's pipeline puts the conditional rows first).
        supports_cfg: whether the model has true classifier-free guidance.
        family: named in errors.
    """

    def __init__(
        self,
        default: Guidance,
        condition: ConditionFn,
        call: CallFn,
        *,
        cond_first: bool = False,
        supports_cfg: bool = True,
        family: str = "",
    ) -> None:
        self.default = default
        self.condition = condition
        self.call = call
        self.cond_first = cond_first
        self.supports_cfg = supports_cfg
        self.family = family
        # keyed by the guidance object itself (identity), which also keeps it alive: an id() could be reused;
        # and by whether gradients are on: stacked once under no_grad (a checkpointed forward pass), the
        # conditioning would be a constant to the recomputation that needs its gradient (soft-prompt attacks)
        self._conditioning: dict[tuple[Guidance, bool], tuple[tuple[str, ...], dict[str, Any]]] = {}
        self._carries: dict[Guidance, dict[int, Any]] = {}
        default.check(supports_cfg, family)

    def _prepared(self, guidance: Guidance) -> tuple[tuple[str, ...], dict[str, Any]]:
        key = (guidance, torch.is_grad_enabled())
        if key not in self._conditioning:
            guidance.check(self.supports_cfg, self.family)
            order = tuple(guidance.roles)
            if self.cond_first and "cond" in order:
                order = ("cond", *[r for r in order if r != "cond"])
            parts = [self.condition(role, guidance) for role in order]
            stacked: dict[str, Any] = {}
            for name, first in parts[0].items():
                if isinstance(first, torch.Tensor) and len(parts) > 1:
                    stacked[name] = torch.cat([p[name] for p in parts])
                else:
                    stacked[name] = first
            self._conditioning[key] = (order, stacked)
            self._carries.setdefault(guidance, {})
        return self._conditioning[key]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, i: int, guidance: Guidance | None = None) -> torch.Tensor:
        """The prediction at step ``i`` for the (model-scaled) latent rows ``x`` at timestep ``t``."""
        guidance = self.default if guidance is None else guidance
        order, conditioning = self._prepared(guidance)
        rows = torch.cat([x] * len(order)) if len(order) > 1 else x
        output = self.call(rows, t, conditioning)
        outputs = dict(zip(order, output.chunk(len(order)), strict=True)) if len(order) > 1 else {order[0]: output}
        carries = self._carries[guidance]
        carry = carries[i - 1] if i > 0 and (i - 1) in carries else guidance.initial_carry()
        prediction, after = guidance.combine(outputs, i, carry)
        if i >= 0:  # a call off the schedule (i = -1, ``velocity_at``) leaves no carry
            carries[i] = _detached(after)
        return prediction


def broadcast_rows(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """``tensor`` with ``batch`` rows: one row is expanded, ``batch`` rows are kept; anything else is refused."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ConfigError(f"a guidance encoding has {tensor.shape[0]} rows for a batch of {batch}; give 1 or {batch}")


def role_tensor(
    role: str, key: str, encoded: Mapping[str, torch.Tensor], guidance: Guidance, batch: int
) -> torch.Tensor:
    """The ``key`` tensor of a role, ``batch`` rows: ``encoded[key]`` for ``cond``, ``encoded["negative_" + key]``
    for ``uncond``, else the guidance's own encoding of that role (its conditional rows)."""
    if role == "cond":
        return encoded[key]
    if role == "uncond":
        return encoded[f"negative_{key}"]
    return broadcast_rows(guidance.encodings[role][key], batch)
