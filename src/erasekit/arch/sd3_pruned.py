"""An SD3 / SD3.5 transformer with fewer attention heads and feed-forward neurons per block.

This module is self-contained on purpose: ``erasekit fold --mode prune`` copies it next to the
pruned weights as a diffusers custom component, so that stock diffusers loads the pruned pipeline
with ``DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`` and no erasekit installed.
It imports only torch and diffusers.

``pruned_layout`` (in the model config) lists, per joint block, ``[heads, attn2_heads, ff_width,
ff_context_width]``: the heads kept by the joint attention (shared by the image and text streams),
by SD3.5's extra self-attention ``attn2`` (0 where the block has none), and the hidden widths of the
image and text feed-forwards (``ff_context_width`` is 0 in the last, ``context_pre_only`` block).
"""

from __future__ import annotations

from typing import Any

from diffusers import SD3Transformer2DModel
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


def _narrow_attention(attn: nn.Module, heads: int, head_dim: int, names: tuple[str, ...]) -> None:
    inner = heads * head_dim
    for name in names:
        setattr(attn, name, _linear(getattr(attn, name), out_features=inner))
    attn.to_out[0] = _linear(attn.to_out[0], in_features=inner)
    if getattr(attn, "to_add_out", None) is not None:
        attn.to_add_out = _linear(attn.to_add_out, in_features=inner)
    # The attention processor splits the projections into ``attn.heads`` heads.
    attn.heads, attn.inner_dim, attn.inner_kv_dim = heads, inner, inner


class PrunedSD3Transformer2DModel(SD3Transformer2DModel):
    """``SD3Transformer2DModel`` whose blocks keep only the heads and neurons in ``pruned_layout``."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
        pruned_layout: list[Any] | None = None,
    ):
        super().__init__(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            caption_projection_dim=caption_projection_dim,
            pooled_projection_dim=pooled_projection_dim,
            out_channels=out_channels,
            pos_embed_max_size=pos_embed_max_size,
            dual_attention_layers=tuple(dual_attention_layers),
            qk_norm=qk_norm,
        )
        layout = pruned_layout or []
        if layout and len(layout) != len(self.transformer_blocks):
            raise ValueError(f"pruned_layout has {len(layout)} entries for {len(self.transformer_blocks)} blocks")
        d = attention_head_dim
        joint = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
        for block, (heads, heads2, ff, ff_context) in zip(self.transformer_blocks, layout):
            _narrow_attention(block.attn, heads, d, joint)
            if block.attn2 is not None:
                _narrow_attention(block.attn2, heads2, d, ("to_q", "to_k", "to_v"))
            feed_forwards = [(block.ff, ff)]
            if block.ff_context is not None:
                feed_forwards.append((block.ff_context, ff_context))
            for feed_forward, width in feed_forwards:
                feed_forward.net[0].proj = _linear(feed_forward.net[0].proj, out_features=width)
                feed_forward.net[2] = _linear(feed_forward.net[2], in_features=width)
