"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): mask sites, flow-matching trajectory, fold and prune.

The denoiser is a stack of MM-DiT ``JointTransformerBlock`` s: an image stream and a text stream
that share one joint attention. The last block is ``context_pre_only``: its text stream only feeds
keys and values to the image stream (no text output projection ``to_add_out``, no ``ff_context``,
and its text modulation is an ``AdaLayerNormContinuous`` giving scale and shift only). SD3.5 medium
adds a second, image-only self-attention ``attn2`` to the blocks in ``dual_attention_layers``, whose
modulation ``SD35AdaLayerNormZeroX`` has three more shift/scale/gate chunks.

Units (block ``transformer_blocks.i`` of width ``D = heads x head_dim``):

* ``heads`` -- one scalar per head and stream of the joint attention: image stream at the input of
  ``attn.to_out.0``, text stream at the input of ``attn.to_add_out`` (absent in the last block);
  and one per head of ``attn2`` at the input of ``attn2.to_out.0`` (dual-attention blocks).
* ``neurons`` -- feed-forward hidden units (GELU-tanh, width ``4 D``) at the input of ``ff.net.2``
  and ``ff_context.net.2`` (the latter absent in the last block).
* ``norm`` -- output channels of ``norm1.linear`` (``AdaLayerNormZero``: ``6 D``; ``SD35AdaLayerNormZeroX``
  in dual-attention blocks: ``9 D``) and ``norm1_context.linear`` (``6 D``; ``2 D`` in the last block).
  The final ``norm_out`` is not masked (as in FLUX).

Pruning: the joint attention's heads are shared by both streams, so a joint head is removed only
when both streams drop it (in the last block, whose text output is discarded, when the image
stream drops it); ``attn2`` heads and feed-forward neurons are removed independently. Norm channels
stay zero-folded.

Unit counts of the published checkpoints (computed from the configs below; ``tests/test_sd3.py``
instantiates them on the meta device and checks these numbers):

===============================================  ======  ====  =====  =======  =========
checkpoint                                       blocks  dual  heads  neurons       norm
===============================================  ======  ====  =====  =======  =========
stabilityai/stable-diffusion-3-medium-diffusers      24     0  1,128  288,768    436,224
stabilityai/stable-diffusion-3.5-medium              24    13  1,440  288,768    496,128
stabilityai/stable-diffusion-3.5-large               38     0  2,850  729,600  1,099,264
stabilityai/stable-diffusion-3.5-large-turbo         38     0  2,850  729,600  1,099,264
===============================================  ======  ====  =====  =======  =========

Config values: SD3 medium (24 heads x 64, 24 layers, caption projection 1536, pooled 2048, joint 4096,
``pos_embed_max_size`` 192), SD3.5 large (38 heads x 64, 38 layers, caption projection 2432,
``qk_norm`` rms_norm, ``pos_embed_max_size`` 192) and SD3.5 medium (SD3 medium's sizes with
``dual_attention_layers`` 0-12 and ``qk_norm`` rms_norm) are written from the published
``transformer/config.json`` files from memory (no network here); the unit-determining values
(heads, head_dim, layers, dual layers) are certain. As a cross-check, parameters plus the persistent
positional-embedding buffer come to 2.085 B (SD3 medium), 2.470 B (SD3.5 medium: 2.243 B + a 384^2 x 1536
buffer) and 8.146 B (SD3.5 large), which match the published bf16 transformer weight sizes (~4.2, ~4.9
and ~16.3 GB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import Architecture, MaskSite, Trajectory, register

_SD3_MEDIUM: dict[str, Any] = {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
_SD35_LARGE: dict[str, Any] = {
    **_SD3_MEDIUM,
    "num_layers": 38,
    "num_attention_heads": 38,
    "caption_projection_dim": 2432,
    "dual_attention_layers": [],
    "qk_norm": "rms_norm",
}

#: Denoiser configs of the published SD3 / SD3.5 checkpoints, so that ``inspect`` works without the hub.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "stabilityai/stable-diffusion-3-medium-diffusers": dict(_SD3_MEDIUM),
    "stabilityai/stable-diffusion-3.5-medium": {
        **_SD3_MEDIUM,
        "pos_embed_max_size": 384,
        "dual_attention_layers": list(range(13)),
        "qk_norm": "rms_norm",
    },
    "stabilityai/stable-diffusion-3.5-large": dict(_SD35_LARGE),
    "stabilityai/stable-diffusion-3.5-large-turbo": dict(_SD35_LARGE),
}


def _heads_of(attn: nn.Module) -> int:
    return attn.heads


def _head_dim(attn: nn.Module) -> int:
    # diffusers' Attention stores ``heads`` but not the head width; the pruned model keeps ``heads`` in step
    # with its narrower projections, so the ratio is right for both.
    return attn.to_q.out_features // attn.heads


class SD3Architecture(Architecture):
    """SD3 / SD3.5 MM-DiT transformer (any sizes, with or without dual attention and q/k-norm)."""

    family = "sd3"
    denoiser_classes = ("SD3Transformer2DModel", "PrunedSD3Transformer2DModel")
    denoiser_attr = "transformer"
    known_configs = KNOWN_CONFIGS

    def extra_classes(self) -> dict[str, type[nn.Module]]:
        from .sd3_pruned import PrunedSD3Transformer2DModel

        return {"PrunedSD3Transformer2DModel": PrunedSD3Transformer2DModel}

    def sites(self, denoiser: nn.Module) -> list[MaskSite]:
        sites: list[MaskSite] = []
        for i, block in enumerate(denoiser.transformer_blocks):
            p = f"transformer_blocks.{i}"
            attn = block.attn
            head_dim = _head_dim(attn)
            width = attn.to_out[0].in_features
            sites += [
                MaskSite("norm", f"{p}.norm1.linear", "output", 0, block.norm1.linear.out_features, 1, "joint", "image"),
                MaskSite("norm", f"{p}.norm1_context.linear", "output", 0, block.norm1_context.linear.out_features, 1, "joint", "text"),
                MaskSite("heads", f"{p}.attn.to_out.0", "input", 0, width, head_dim, "joint", "image"),
            ]
            if attn.to_add_out is not None:
                sites.append(MaskSite("heads", f"{p}.attn.to_add_out", "input", 0, attn.to_add_out.in_features, head_dim, "joint", "text"))
            if block.attn2 is not None:
                attn2 = block.attn2
                sites.append(
                    MaskSite("heads", f"{p}.attn2.to_out.0", "input", 0, attn2.to_out[0].in_features, _head_dim(attn2), "joint", "image_self")
                )
            sites.append(MaskSite("neurons", f"{p}.ff.net.2", "input", 0, block.ff.net[2].in_features, 1, "joint", "image"))
            if block.ff_context is not None:
                sites.append(
                    MaskSite("neurons", f"{p}.ff_context.net.2", "input", 0, block.ff_context.net[2].in_features, 1, "joint", "text")
                )
        return sites

    # ------------------------------------------------------------------ sampling
    def encode_prompts(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """CLIP-L + CLIP-G + T5 embeddings of ``prompts`` and of the empty negative prompt, one row per prompt.

        The negative (unconditional) rows are what ``StableDiffusion3Pipeline`` uses for
        classifier-free guidance with no ``negative_prompt``: the encoding of ``""``.
        """
        device = _execution_device(pipe)
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
            )
            negative, _, negative_pooled, _ = pipe.encode_prompt(
                prompt=[""], prompt_2=None, prompt_3=None, device=device,
                do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
            )
        batch = len(prompts)
        return {
            "prompt_embeds": embeds,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative.expand(batch, *negative.shape[1:]),
            "negative_pooled_prompt_embeds": negative_pooled.expand(batch, *negative_pooled.shape[1:]),
        }

    def trajectory(
        self,
        pipe: Any,
        encoded: dict[str, torch.Tensor],
        noise_seeds: list[int],
        *,
        steps: int,
        resolution: int,
        guidance_scale: float,
    ) -> Trajectory:
        """Flow-matching Euler sampling exactly as ``StableDiffusion3Pipeline.__call__`` does it.

        Guidance > 1 runs the unconditional and conditional rows in one batch (uncond first) and
        mixes ``uncond + g (cond - uncond)``; guidance <= 1 runs the conditional rows only.
        Skip-layer guidance (off by default in the pipeline) is not reproduced.
        """
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        transformer = pipe.transformer
        device = _execution_device(pipe)
        multiple = pipe.vae_scale_factor * transformer.config.patch_size
        if resolution <= 0 or resolution % multiple:
            raise ValueError(f"resolution {resolution} must be a positive multiple of {multiple} for this pipeline")
        tokens = resolution // multiple
        if tokens > transformer.config.pos_embed_max_size:
            largest = transformer.config.pos_embed_max_size * multiple
            raise ValueError(f"resolution {resolution} exceeds this transformer's positional embeddings (at most {largest})")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        prompt_embeds = encoded["prompt_embeds"]
        pooled = encoded["pooled_prompt_embeds"]
        if len(noise_seeds) != prompt_embeds.shape[0]:
            raise ValueError(f"{len(noise_seeds)} noise seeds for {prompt_embeds.shape[0]} prompts")
        cfg_on = guidance_scale > 1
        if cfg_on:
            prompt_embeds = torch.cat([encoded["negative_prompt_embeds"], prompt_embeds])
            pooled = torch.cat([encoded["negative_pooled_prompt_embeds"], pooled])

        channels = transformer.config.in_channels
        parts = []
        for seed in noise_seeds:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
            parts.append(pipe.prepare_latents(1, channels, resolution, resolution, prompt_embeds.dtype, device, generator))
        noise = torch.cat(parts)

        # A fresh scheduler: the pipeline's own schedule, read once; the step below keeps no counter.
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        kwargs: dict[str, Any] = {}
        if sched.config.get("use_dynamic_shifting", False):
            patch = transformer.config.patch_size
            kwargs["mu"] = calculate_shift(
                (noise.shape[2] // patch) * (noise.shape[3] // patch),
                sched.config.get("base_image_seq_len", 256),
                sched.config.get("max_image_seq_len", 4096),
                sched.config.get("base_shift", 0.5),
                sched.config.get("max_shift", 1.16),
            )
        sched.set_timesteps(num_inference_steps=steps, device=device, **kwargs)
        if getattr(sched.config, "stochastic_sampling", False):
            raise ValueError("stochastic_sampling flow-matching schedulers are not supported: their steps draw fresh noise")
        timesteps = sched.timesteps.to(device)
        sigmas = sched.sigmas.to(device)

        def step(z: torch.Tensor, i: int) -> torch.Tensor:
            model_input = torch.cat([z, z]) if cfg_on else z
            velocity = transformer(
                hidden_states=model_input,
                timestep=timesteps[i].expand(model_input.shape[0]),
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
            if cfg_on:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            # FlowMatchEulerDiscreteScheduler.step for index i, without its step counter (so recomputing step i
            # is exact), with its casts: sample upcast to float32 (float64 kept), result in the model's dtype.
            sample = z if z.dtype == torch.float64 else z.to(torch.float32)
            return (sample + (sigmas[i + 1] - sigmas[i]) * velocity).to(velocity.dtype)

        def decode(z: torch.Tensor) -> torch.Tensor:
            latents = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            with torch.no_grad():
                image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
            return (image.float() / 2 + 0.5).clamp(0, 1)

        return Trajectory(noise=noise, num_steps=steps, step=step, decode=decode)

    # ------------------------------------------------------------------ pruning
    def prune(self, denoiser: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
        """Return a :class:`PrunedSD3Transformer2DModel` without the dropped heads and neurons.

        ``keep`` maps site keys to boolean keep-masks and must already be zero-folded into
        ``denoiser``. A joint head is removed only when every stream with an output drops it; a block
        keeps at least one head per attention and one neuron per feed-forward (zeroed) so that its
        shapes stay valid. Norm channels cannot be removed (they are split into shift/scale/gate):
        they stay zero-folded.
        """
        from .sd3_pruned import PrunedSD3Transformer2DModel

        state = dict(denoiser.state_dict())

        def rows(name: str, index: torch.Tensor) -> None:
            state[f"{name}.weight"] = state[f"{name}.weight"][index]
            if f"{name}.bias" in state:
                state[f"{name}.bias"] = state[f"{name}.bias"][index]

        def cols(name: str, index: torch.Tensor) -> None:
            state[f"{name}.weight"] = state[f"{name}.weight"][:, index]

        def channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
            return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()

        def mask(key: str, size: int) -> torch.Tensor:
            value = keep.get(key)
            return torch.ones(size, dtype=torch.bool) if value is None else value.cpu().to(torch.bool)

        layout = []
        for i, block in enumerate(denoiser.transformer_blocks):
            p = f"transformer_blocks.{i}"
            attn = block.attn
            head_dim, n_heads = _head_dim(attn), _heads_of(attn)
            used = mask(f"heads/{p}.attn.to_out.0", n_heads)
            if attn.to_add_out is not None:
                used = used | mask(f"heads/{p}.attn.to_add_out", n_heads)
            heads = _nonempty(torch.nonzero(used).flatten())
            ch = channels(heads, head_dim)
            for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                rows(f"{p}.attn.{name}", ch)
            cols(f"{p}.attn.to_out.0", ch)
            if attn.to_add_out is not None:
                cols(f"{p}.attn.to_add_out", ch)

            heads2 = 0
            if block.attn2 is not None:
                head_dim2 = _head_dim(block.attn2)
                kept2 = _nonempty(torch.nonzero(mask(f"heads/{p}.attn2.to_out.0", _heads_of(block.attn2))).flatten())
                ch2 = channels(kept2, head_dim2)
                for name in ("to_q", "to_k", "to_v"):
                    rows(f"{p}.attn2.{name}", ch2)
                cols(f"{p}.attn2.to_out.0", ch2)
                heads2 = int(kept2.numel())

            ff = _nonempty(torch.nonzero(mask(f"neurons/{p}.ff.net.2", block.ff.net[2].in_features)).flatten())
            rows(f"{p}.ff.net.0.proj", ff)
            cols(f"{p}.ff.net.2", ff)
            ffc_width = 0
            if block.ff_context is not None:
                ffc = _nonempty(torch.nonzero(mask(f"neurons/{p}.ff_context.net.2", block.ff_context.net[2].in_features)).flatten())
                rows(f"{p}.ff_context.net.0.proj", ffc)
                cols(f"{p}.ff_context.net.2", ffc)
                ffc_width = int(ffc.numel())
            layout.append([int(heads.numel()), heads2, int(ff.numel()), ffc_width])

        config = {k: v for k, v in denoiser.config.items() if not k.startswith("_") and k != "pruned_layout"}
        config["pruned_layout"] = layout
        with torch.device("meta"):
            pruned = PrunedSD3Transformer2DModel(**config)
        pruned.load_state_dict(state, assign=True, strict=True)
        return pruned

    def pruned_component_source(self) -> Path:
        return Path(__file__).with_name("sd3_pruned.py")


def _nonempty(index: torch.Tensor) -> torch.Tensor:
    # A block with no heads (or no neurons) left keeps one zero-folded unit: zero-size layers break attention.
    return index if index.numel() else torch.zeros(1, dtype=torch.long)


def _execution_device(pipe: Any) -> torch.device:
    device = getattr(pipe, "_execution_device", None)
    return device if isinstance(device, torch.device) else pipe.transformer.device


SD3 = register(SD3Architecture())
