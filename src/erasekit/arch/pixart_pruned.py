"""A PixArt transformer with fewer attention heads and feed-forward neurons per block.

This module is self-contained on purpose: ``erasekit fold --mode prune`` copies it next to the
pruned weights as a diffusers custom component, so that stock diffusers loads the pruned pipeline
with ``DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`` and no erasekit installed.
It imports only torch and diffusers.

``pruned_layout`` (in the model config) lists, per block, ``[self_attention_heads,
cross_attention_heads, ff_width]``.
"""

from __future__ import annotations

from diffusers import PixArtTransformer2DModel
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


def _shrink_attention(attn: nn.Module, heads: int, head_dim: int) -> None:
    width = heads * head_dim
    for name in ("to_q", "to_k", "to_v"):
        setattr(attn, name, _linear(getattr(attn, name), out_features=width))
    attn.to_out[0] = _linear(attn.to_out[0], in_features=width)
    attn.heads = heads
    attn.inner_dim = width
    attn.inner_kv_dim = width
    attn.sliceable_head_dim = heads


class PrunedPixArtTransformer2DModel(PixArtTransformer2DModel):
    """``PixArtTransformer2DModel`` whose blocks keep only the heads and neurons in ``pruned_layout``."""

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 128,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: int | None = None,
        use_additional_conditions: bool | None = None,
        caption_channels: int | None = None,
        attention_type: str | None = "default",
        pruned_layout: list[list[int]] | None = None,
    ):
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            cross_attention_dim=cross_attention_dim,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            activation_fn=activation_fn,
            num_embeds_ada_norm=num_embeds_ada_norm,
            upcast_attention=upcast_attention,
            norm_type=norm_type,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
            interpolation_scale=interpolation_scale,
            use_additional_conditions=use_additional_conditions,
            caption_channels=caption_channels,
            attention_type=attention_type,
        )
        for block, (self_heads, cross_heads, ff) in zip(self.transformer_blocks, pruned_layout or []):
            _shrink_attention(block.attn1, self_heads, attention_head_dim)
            if getattr(block, "attn2", None) is not None:
                _shrink_attention(block.attn2, cross_heads, attention_head_dim)
            block.ff.net[0].proj = _linear(block.ff.net[0].proj, out_features=ff)
            block.ff.net[2] = _linear(block.ff.net[2], in_features=ff)
