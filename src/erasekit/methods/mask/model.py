"""Masks applied to a denoiser through forward hooks keyed by module path.

The base weights are never touched: :meth:`MaskedModel.remove` (or leaving the ``with`` block)
restores the model exactly, and a disabled mask passes activations through unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...arch.base import MaskSite
from ...errors import MaskMismatchError
from .parameterization import MaskSettings, binary_mask, closed_probability, draw_noise, mask_values

MODES = ("train", "binary")


def fraction_of(counts: dict[str, dict[str, int]]) -> float:
    """The masked fraction of all units from per-kind counts (:meth:`MaskedModel.masked_counts`)."""
    total = sum(c["total"] for c in counts.values())
    return sum(c["masked"] for c in counts.values()) / total if total else 0.0


class MaskedModel(nn.Module):
    """Float32 mask logits for a set of :class:`MaskSite` s of one denoiser, and the hooks applying them.

    Args:
        denoiser: the transformer or UNet (not registered as a submodule: only the logits are parameters).
        sites: where the masks apply (see the architecture file).
        settings: training parameterisation.
        init_lambda: initial logit (3.0: gates nearly fully open).
        logits: optional initial logits keyed by site key (e.g. from an artefact).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        sites: list[MaskSite],
        settings: MaskSettings | None = None,
        init_lambda: float = 3.0,
        logits: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self._denoiser = [denoiser]  # a list hides it from nn.Module registration
        self.sites = list(sites)
        self.settings = settings or MaskSettings()
        device = next(denoiser.parameters()).device
        if device.type == "meta":
            device = torch.device("cpu")
        self.logits = nn.ParameterList(
            [
                nn.Parameter(torch.full((s.num_units,), float(init_lambda), dtype=torch.float32, device=device))
                for s in self.sites
            ]
        )
        self.mode = "binary"
        self.enabled = True
        self._noise: list[torch.Tensor] | None = None
        self._handles: list[Any] = []
        if logits is not None:
            self.load_logits(logits)

    # ------------------------------------------------------------------ basics
    @property
    def denoiser(self) -> nn.Module:
        return self._denoiser[0]

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.sites]

    def set_mode(self, mode: str) -> None:
        """``train``: the training parameterisation; ``binary``: the inference mask 1[lambda > 0]."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def resample_noise(self, generator: torch.Generator) -> None:
        """Draw the hard-concrete noise for the next trajectory (reused until drawn again)."""
        device = self.logits[0].device if len(self.logits) else torch.device("cpu")
        self._noise = [draw_noise(p.numel(), generator).to(device) for p in self.logits]

    def mask(self, index: int) -> torch.Tensor:
        """Current mask values of site ``index`` (float32, differentiable in train mode)."""
        logits = self.logits[index]
        if self.mode == "binary":
            return binary_mask(logits.detach())
        noise = self._noise[index] if self._noise is not None else None
        return mask_values(logits, self.settings, noise)

    # ------------------------------------------------------------------ hooks
    def _scale(self, indices: list[int], x: torch.Tensor) -> torch.Tensor:
        """Multiply ``x`` once by the masks of the sites ``indices`` (all on one module and hook).

        One full-width scale vector (ones where no site applies) rather than one slice-and-concatenate
        per site: a single blocks' ``proj_out`` input carries heads and neurons, and copying it per
        site cost memory and time during training.
        """
        width = x.shape[-1]
        pieces: list[torch.Tensor] = []
        position = 0
        for index in sorted(indices, key=lambda i: self.sites[i].start):
            site = self.sites[index]
            if site.start > position:
                pieces.append(torch.ones(site.start - position, device=x.device, dtype=x.dtype))
            pieces.append(self.mask(index).to(device=x.device, dtype=x.dtype).repeat_interleave(site.group))
            position = site.stop
        if position < width:
            pieces.append(torch.ones(width - position, device=x.device, dtype=x.dtype))
        return x * (pieces[0] if len(pieces) == 1 else torch.cat(pieces))

    def _make_hook(self, indices: list[int], where: str) -> Any:
        if where == "input":

            def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
                if not self.enabled:
                    return None
                return (self._scale(indices, args[0]), *args[1:])

            return pre_hook

        def post_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            if not self.enabled:
                return None
            return self._scale(indices, output)

        return post_hook

    def install(self) -> MaskedModel:
        """Register the hooks (idempotent): one per hooked module and direction."""
        if self._handles:
            return self
        groups: dict[tuple[str, str], list[int]] = {}
        for index, site in enumerate(self.sites):
            groups.setdefault((site.module, site.hook), []).append(index)
        for (module_path, where), indices in groups.items():
            module = self.denoiser.get_submodule(module_path)
            if where == "input":
                handle = module.register_forward_pre_hook(self._make_hook(indices, "input"))
            else:
                handle = module.register_forward_hook(self._make_hook(indices, "output"))
            self._handles.append(handle)
        return self

    def remove(self) -> None:
        """Remove every hook; the denoiser is exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> MaskedModel:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def disabled(self) -> _Disabled:
        """Context manager running the denoiser without masks (the original model)."""
        return _Disabled(self)

    # ------------------------------------------------------------------ logits
    def logits_dict(self) -> dict[str, torch.Tensor]:
        """Detached float32 CPU copies of the logits keyed by site key."""
        return {s.key: p.detach().float().cpu().clone() for s, p in zip(self.sites, self.logits)}

    def shift_logits(self, delta: float) -> None:
        """Add ``delta`` to every logit: with ``delta = -t`` the binary mask closes the units whose logits
        were at most ``t``."""
        with torch.no_grad():
            for p in self.logits:
                p.add_(delta)

    def load_logits(self, logits: dict[str, torch.Tensor]) -> None:
        """Copy logits in by key; every key must name one of this model's sites with the same shape."""
        index = {s.key: i for i, s in enumerate(self.sites)}
        for key, value in logits.items():
            if key not in index:
                raise MaskMismatchError(f"mask key {key!r} is not a mask site of this model (first unknown key)")
            target = self.logits[index[key]]
            if tuple(value.shape) != tuple(target.shape):
                raise MaskMismatchError(
                    f"mask {key!r} has shape {tuple(value.shape)} but the model has {tuple(target.shape)} units there"
                )
            with torch.no_grad():
                target.copy_(value.to(torch.float32))

    def keep_masks(self) -> dict[str, torch.Tensor]:
        """Boolean inference masks (True = unit kept) keyed by site key."""
        return {s.key: (p.detach() > 0).cpu() for s, p in zip(self.sites, self.logits)}

    def masked_counts(self) -> dict[str, dict[str, int]]:
        """Masked and total units per kind (binary mask)."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: {"masked": 0, "total": 0})
        for site, p in zip(self.sites, self.logits):
            out[site.kind]["masked"] += int((p.detach() <= 0).sum())
            out[site.kind]["total"] += p.numel()
        return dict(out)

    def masked_fraction(self) -> float:
        """Fraction of all masked units switched off by the binary mask."""
        return fraction_of(self.masked_counts())

    def sparsity_penalty(self) -> torch.Tensor:
        """Expected fraction of closed gates, averaged within each unit kind and summed over kinds."""
        per_kind: dict[str, list[torch.Tensor]] = defaultdict(list)
        for site, p in zip(self.sites, self.logits):
            per_kind[site.kind].append(closed_probability(p, self.settings))
        if not per_kind:
            return torch.zeros(())
        return sum(torch.cat(v).mean() for v in per_kind.values())  # type: ignore[return-value]

    def parameters_by_kind(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = defaultdict(list)
        for site, p in zip(self.sites, self.logits):
            groups[site.kind].append(p)
        return dict(groups)

    def iter_sites(self) -> Iterator[tuple[MaskSite, nn.Parameter]]:
        return zip(self.sites, self.logits)


class _Disabled:
    def __init__(self, masked: MaskedModel) -> None:
        self.masked = masked
        self.previous = masked.enabled

    def __enter__(self) -> MaskedModel:
        self.masked.enabled = False
        return self.masked

    def __exit__(self, *exc: Any) -> None:
        self.masked.enabled = self.previous
