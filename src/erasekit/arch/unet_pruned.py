"""A Stable Diffusion UNet with fewer attention heads and feed-forward neurons per transformer block.

This module is self-contained on purpose: ``erasekit fold --mode prune`` copies it next to the
pruned weights as a diffusers custom component, so that stock diffusers loads the pruned pipeline
with ``DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`` and no erasekit installed.
It imports only torch and diffusers.

``pruned_layout`` (in the model config) maps the module path of each pruned
``BasicTransformerBlock`` (e.g. ``"down_blocks.1.attentions.0.transformer_blocks.0"``) to
``[attn1_heads, attn2_heads, ff_width]``; blocks not listed keep their original sizes. Each
attention keeps its head dimension; diffusers' attention processors reshape with ``attn.heads``,
so the new head count is set on every pruned ``Attention`` module. The GEGLU input projection
``ff.net.0.proj`` produces ``2 * ff_width`` channels (value half, then gate half); a plain GELU
feed-forward (``ff_width`` channels) is handled too.
"""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DConditionModel
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


def _shrink_attention(attn: nn.Module, heads: int) -> None:
    head_dim = attn.to_out[0].in_features // attn.heads
    width = heads * head_dim
    for name in ("to_q", "to_k", "to_v"):
        setattr(attn, name, _linear(getattr(attn, name), out_features=width))
    attn.to_out[0] = _linear(attn.to_out[0], in_features=width)
    attn.heads = heads
    attn.inner_dim = width
    if hasattr(attn, "inner_kv_dim"):
        attn.inner_kv_dim = width


class PrunedUNet2DConditionModel(UNet2DConditionModel):
    """``UNet2DConditionModel`` whose transformer blocks keep only the heads and neurons in ``pruned_layout``."""

    @register_to_config
    def __init__(
        self,
        sample_size: Any = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: tuple[str, ...] = (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        only_cross_attention: Any = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: Any = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: Any = 1280,
        transformer_layers_per_block: Any = 1,
        reverse_transformer_layers_per_block: Any = None,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: Any = 8,
        num_attention_heads: Any = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
        pruned_layout: dict[str, list[int]] | None = None,
    ):
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            center_input_sample=center_input_sample,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
            down_block_types=down_block_types,
            mid_block_type=mid_block_type,
            up_block_types=up_block_types,
            only_cross_attention=only_cross_attention,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            downsample_padding=downsample_padding,
            mid_block_scale_factor=mid_block_scale_factor,
            dropout=dropout,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers_per_block,
            reverse_transformer_layers_per_block=reverse_transformer_layers_per_block,
            encoder_hid_dim=encoder_hid_dim,
            encoder_hid_dim_type=encoder_hid_dim_type,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            dual_cross_attention=dual_cross_attention,
            use_linear_projection=use_linear_projection,
            class_embed_type=class_embed_type,
            addition_embed_type=addition_embed_type,
            addition_time_embed_dim=addition_time_embed_dim,
            num_class_embeds=num_class_embeds,
            upcast_attention=upcast_attention,
            resnet_time_scale_shift=resnet_time_scale_shift,
            resnet_skip_time_act=resnet_skip_time_act,
            resnet_out_scale_factor=resnet_out_scale_factor,
            time_embedding_type=time_embedding_type,
            time_embedding_dim=time_embedding_dim,
            time_embedding_act_fn=time_embedding_act_fn,
            timestep_post_act=timestep_post_act,
            time_cond_proj_dim=time_cond_proj_dim,
            conv_in_kernel=conv_in_kernel,
            conv_out_kernel=conv_out_kernel,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            attention_type=attention_type,
            class_embeddings_concat=class_embeddings_concat,
            mid_block_only_cross_attention=mid_block_only_cross_attention,
            cross_attention_norm=cross_attention_norm,
            addition_embed_type_num_heads=addition_embed_type_num_heads,
        )
        for path, (heads1, heads2, ff_width) in (pruned_layout or {}).items():
            block = self.get_submodule(path)
            _shrink_attention(block.attn1, int(heads1))
            if getattr(block, "attn2", None) is not None:
                _shrink_attention(block.attn2, int(heads2))
            net = block.ff.net
            # GEGLU projects to value and gate halves (factor 2); plain GELU projects once (factor 1).
            factor = net[0].proj.out_features // net[2].in_features
            net[0].proj = _linear(net[0].proj, out_features=factor * int(ff_width))
            net[2] = _linear(net[2], in_features=int(ff_width))
