"""The inputs of named Linear layers at chosen steps of a trajectory (UCE's text projections,
ConceptPrune's feed-forward output layers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import denoiser_of
from .guidance import Guidance

__all__ = ["capture_layer_inputs"]


def capture_layer_inputs(
    pipe: Any,
    encoded: dict[str, torch.Tensor],
    layer_names: Sequence[str],
    *,
    resolution: int,
    steps: int,
    step_indices: Sequence[int],
    seeds: list[int],
    guidance_scale: float = 1.0,
    guidance: Guidance | None = None,
) -> dict[str, torch.Tensor]:
    """Run the trajectory of ``encoded`` (one noise seed per row) up to the last of ``step_indices`` and
    return what the named Linear layers of the denoiser received at those steps.

    Returns:
        ``{layer name: tensor}``, each ``(len(step_indices), rows, ..., in_features)`` in the order of
        ``step_indices``, where ``rows`` is the denoiser's batch at a step (the prompts' rows times the
        guidance's roles: twice the prompts with classifier-free guidance, unconditional rows first except
        for DiT). A layer called more than once in a step has its calls concatenated along ``rows``.

    The hooks are forward pre-hooks, removed whatever happens; the model is not changed.

    Raises:
        ConfigError: a name that is not a Linear layer of the denoiser, no steps, a step outside the
            schedule, or a layer the denoiser never called.
    """
    arch, denoiser = denoiser_of(pipe)
    modules: dict[str, nn.Module] = {}
    for name in layer_names:
        try:
            module = denoiser.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"{arch.family} denoiser has no module {name!r}") from None
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"{name} is a {type(module).__name__}, not a Linear layer")
        modules[name] = module
    wanted = [int(i) for i in step_indices]
    if not wanted:
        raise ConfigError("capture_layer_inputs needs at least one step index")
    trajectory = arch.trajectory(
        pipe, encoded, seeds, steps=steps, resolution=resolution, guidance_scale=guidance_scale, guidance=guidance
    )
    outside = [i for i in wanted if not 0 <= i < trajectory.num_steps]
    if outside:
        raise ConfigError(f"step index {outside[0]} is outside this {trajectory.num_steps}-step trajectory")

    chosen = set(wanted)
    current: list[int] = [-1]
    records: dict[str, dict[int, list[torch.Tensor]]] = {name: {} for name in modules}

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if current[0] in chosen:
                records[name].setdefault(current[0], []).append(args[0].detach().clone())

        return hook

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(recorder(name)))
        z = trajectory.noise
        with torch.no_grad():
            for i in range(max(wanted) + 1):
                current[0] = i
                z = trajectory.step(z, i)
    finally:
        for handle in handles:
            handle.remove()

    result = {}
    for name, per_step in records.items():
        missing = [i for i in wanted if i not in per_step]
        if missing:
            raise ConfigError(f"layer {name} was not called at step {missing[0]} of the trajectory")
        result[name] = torch.stack([torch.cat(per_step[i]) for i in wanted])
    return result
