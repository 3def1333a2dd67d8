"""Helpers the architecture files share: input checks, seeded noise, flow schedules, VAE decoding, pruning.

Every helper here reproduces, operation for operation, what the family files did on their own, so
the trajectories stay bit-identical to the stock pipelines.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import MaskSite, NoiseSchedule

#: The three input projections of a diffusers ``Attention``, and those of its second (text) stream.
QKV = ("to_q", "to_k", "to_v")
ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


def numbered_blocks(denoiser: nn.Module, attr: str = "transformer_blocks") -> list[tuple[str, nn.Module]]:
    """``(module path, block)`` of every block in the module list ``denoiser.<attr>``, in order."""
    return [(f"{attr}.{i}", block) for i, block in enumerate(getattr(denoiser, attr))]


def basic_block_sites(path: str, block: nn.Module, block_type: str, head_dim: int | None = None) -> list[MaskSite]:
    """Sites of a ``BasicTransformerBlock``: heads of ``attn1`` (stream ``self``) and ``attn2`` (``cross``)
    where present, then the feed-forward neurons. ``head_dim`` defaults to each attention's width / heads."""
    sites = []
    for name, stream in (("attn1", "self"), ("attn2", "cross")):
        attn = getattr(block, name, None)
        if attn is None:
            continue
        width = attn.to_out[0].in_features
        group = width // attn.heads if head_dim is None else head_dim
        sites.append(MaskSite("heads", f"{path}.{name}.to_out.0", "input", 0, width, group, block_type, stream))
    sites.append(MaskSite("neurons", f"{path}.ff.net.2", "input", 0, block.ff.net[2].in_features, 1, block_type))
    return sites


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def check_resolution(resolution: int, multiple: int) -> None:
    if resolution <= 0 or resolution % multiple:
        raise ValueError(f"resolution {resolution} must be a positive multiple of {multiple} for this pipeline")


def check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")


def check_seeds(noise_seeds: list[int], batch: int) -> None:
    if len(noise_seeds) != batch:
        raise ValueError(f"{len(noise_seeds)} noise seeds for {batch} prompts")


# ---------------------------------------------------------------------------------------------
# Noise, schedules, decoding
# ---------------------------------------------------------------------------------------------


def seed_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per seed, as the pipelines seed a batch-1 call."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def randn_latents(seeds: list[int], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One ``(1, *shape)`` draw per seed from ``torch.Generator("cpu").manual_seed(seed)``, as the pipelines draw it."""
    from diffusers.utils.torch_utils import randn_tensor

    return torch.cat(
        [randn_tensor((1, *shape), generator=g, device=device, dtype=dtype) for g in seed_generators(seeds)]
    )


def flow_schedule(timesteps: torch.Tensor, sigmas: torch.Tensor, steps: int) -> NoiseSchedule:
    """The rectified-flow schedule of a flow-matching Euler sampler: ``z = (1 - sigma) x0 + sigma noise``."""
    levels = [float(s) for s in sigmas[:steps]]
    return NoiseSchedule(timesteps[:steps], tuple(1 - s for s in levels), tuple(levels), "flow")


def decode_to_unit(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode already unscaled latents (no grad) -> images in [0, 1], float32."""
    with torch.no_grad():
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------


def nonempty(index: torch.Tensor) -> torch.Tensor:
    # A block with no heads (or no neurons) left keeps one zero-folded unit: zero-size layers break attention.
    return index if index.numel() else torch.zeros(1, dtype=torch.long)


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Channel indices of the kept ``heads``, each ``head_dim`` wide."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


class PrunedState:
    """A denoiser's state dict cut down to the kept heads and neurons, then loaded into its pruned class.

    Args:
        denoiser: the (zero-folded) denoiser; its state dict is copied, the model is not touched.
        keep: boolean keep-masks by site key.
    """

    def __init__(self, denoiser: nn.Module, keep: dict[str, torch.Tensor]) -> None:
        self.denoiser = denoiser
        self.keep = keep
        self.state = dict(denoiser.state_dict())

    def kept(self, size: int, *keys: str) -> torch.Tensor:
        """Indices of the units any of ``keys`` keeps (all ``size`` of them when a key has no mask), never empty."""
        used = None
        for key in keys:
            mask = self.keep.get(key)
            if mask is None:
                return torch.arange(size)
            mask = mask.cpu().to(torch.bool)
            used = mask if used is None else used | mask
        return nonempty(torch.nonzero(used).flatten())

    def rows(self, name: str, index: torch.Tensor) -> None:
        """Keep the output rows (and bias entries) ``index`` of Linear ``name``."""
        self.state[f"{name}.weight"] = self.state[f"{name}.weight"][index]
        if f"{name}.bias" in self.state:
            self.state[f"{name}.bias"] = self.state[f"{name}.bias"][index]

    def cols(self, name: str, index: torch.Tensor) -> None:
        """Keep the input columns ``index`` of Linear ``name``."""
        self.state[f"{name}.weight"] = self.state[f"{name}.weight"][:, index]

    def heads(
        self,
        attn: str,
        heads: torch.Tensor,
        head_dim: int,
        inputs: tuple[str, ...] = QKV,
        outputs: tuple[str, ...] = ("to_out.0",),
    ) -> torch.Tensor:
        """Cut attention ``attn`` to ``heads``: rows of its ``inputs``, columns of its ``outputs``;
        returns the channels."""
        channels = head_channels(heads, head_dim)
        for name in inputs:
            self.rows(f"{attn}.{name}", channels)
        for name in outputs:
            self.cols(f"{attn}.{name}", channels)
        return channels

    def attention(self, path: str, attn: nn.Module, head_dim: int) -> int:
        """Cut the attention at ``path`` to the heads its ``to_out.0`` site keeps; returns how many."""
        heads = self.kept(attn.to_q.out_features // head_dim, f"heads/{path}.to_out.0")
        self.heads(path, heads, head_dim)
        return int(heads.numel())

    def feed_forward(self, path: str, ff: nn.Module) -> int:
        """Cut the feed-forward at ``path`` (``net.0.proj`` up, ``net.2`` down) to the neurons its
        ``net.2`` site keeps; returns how many. A gated up projection (GEGLU: value half and gate half,
        twice as wide) loses the neuron's row in every part."""
        width = ff.net[2].in_features
        neurons = self.kept(width, f"neurons/{path}.net.2")
        factor = ff.net[0].proj.out_features // width
        up = torch.cat([neurons + k * width for k in range(factor)]) if factor > 1 else neurons
        self.rows(f"{path}.net.0.proj", up)
        self.cols(f"{path}.net.2", neurons)
        return int(neurons.numel())

    def basic_block(self, path: str, block: nn.Module, head_dim: int | None = None) -> list[int]:
        """Cut a ``BasicTransformerBlock``; returns ``[attn1 heads, attn2 heads, neurons]`` (0 for an
        absent attention). ``head_dim`` defaults to each attention's width / heads."""
        sizes = []
        for name in ("attn1", "attn2"):
            attn = getattr(block, name, None)
            if attn is None:
                sizes.append(0)
                continue
            dim = head_dim if head_dim is not None else attn.to_out[0].in_features // attn.heads
            sizes.append(self.attention(f"{path}.{name}", attn, dim))
        return sizes + [self.feed_forward(f"{path}.ff", block.ff)]

    def build(self, cls: type[nn.Module], layout: Any) -> nn.Module:
        """``cls`` built on the meta device from the denoiser's config and ``layout``, with the cut state assigned.

        Non-persistent buffers (e.g. a patch embedder's position table) are not in a state dict, so they
        are copied from the denoiser.
        """
        config = {k: v for k, v in self.denoiser.config.items() if not k.startswith("_") and k != "pruned_layout"}
        config["pruned_layout"] = layout
        with torch.device("meta"):
            pruned = cls(**config)
        pruned.load_state_dict(self.state, assign=True, strict=True)
        for name, buffer in self.denoiser.named_buffers():
            if name not in self.state:
                module, _, attr = name.rpartition(".")
                pruned.get_submodule(module)._buffers[attr] = buffer.clone()
        return pruned
