"""A FLUX transformer with fewer heads and feed-forward neurons per block.

This module is self-contained on purpose: ``erasekit fold --mode prune`` copies it next to the
pruned weights as a diffusers custom component, so that stock diffusers loads the pruned pipeline
with ``DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`` and no erasekit installed.
It imports only torch and diffusers.

``pruned_layout`` (in the model config) lists, per double block, ``[heads, ff_width,
ff_context_width]`` and, per single block, ``[heads, mlp_width]``.
"""

from __future__ import annotations

from typing import Any

from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn


def _linear(old: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    return nn.Linear(
        in_features or old.in_features,
        out_features or old.out_features,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )


class PrunedFluxTransformer2DModel(FluxTransformer2DModel):
    """``FluxTransformer2DModel`` whose blocks keep only the heads and neurons in ``pruned_layout``."""

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        pruned_layout: dict[str, Any] | None = None,
    ):
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        )
        layout = pruned_layout or {"double": [], "single": []}
        d = attention_head_dim
        for block, (heads, ff, ff_context) in zip(self.transformer_blocks, layout["double"]):
            attn = block.attn
            for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                setattr(attn, name, _linear(getattr(attn, name), out_features=heads * d))
            attn.to_out[0] = _linear(attn.to_out[0], in_features=heads * d)
            attn.to_add_out = _linear(attn.to_add_out, in_features=heads * d)
            attn.heads, attn.inner_dim = heads, heads * d
            for feed_forward, width in ((block.ff, ff), (block.ff_context, ff_context)):
                feed_forward.net[0].proj = _linear(feed_forward.net[0].proj, out_features=width)
                feed_forward.net[2] = _linear(feed_forward.net[2], in_features=width)
        for block, (heads, mlp) in zip(self.single_transformer_blocks, layout["single"]):
            attn = block.attn
            for name in ("to_q", "to_k", "to_v"):
                setattr(attn, name, _linear(getattr(attn, name), out_features=heads * d))
            attn.heads, attn.inner_dim = heads, heads * d
            block.mlp_hidden_dim = mlp
            block.proj_mlp = _linear(block.proj_mlp, out_features=mlp)
            block.proj_out = _linear(block.proj_out, in_features=heads * d + mlp)
            block.proj_out._tp_packed_row_blocks = [heads * d, mlp]
