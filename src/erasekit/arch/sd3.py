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

import re
from typing import Any

import torch
from torch import nn

from .base import Architecture, MaskSite, Trajectory, register
from .common import (
    ADDED_QKV,
    QKV,
    PrunedState,
    check_resolution,
    check_seeds,
    check_steps,
    decode_to_unit,
    flow_schedule,
    numbered_blocks,
    seed_generators,
)
from .guidance import Guidance, GuidedDenoiser, guidance_or_default, role_tensor
from .samplers import fresh_scheduler

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


#: Text-conditioning modules by kind (``Architecture.text_conditioning_modules``), as module-path patterns.
_TEXT_MODULES = {
    "context": r"context_embedder",
    "pooled": r"time_text_embed\.text_embedder\.linear_1",
    "key_value": r"transformer_blocks\.\d+\.attn\.add_[kv]_proj",
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
    known_configs = KNOWN_CONFIGS
    pruned_module = "sd3_pruned"
    flow_matching = True

    text_conditioning_kinds = ("context", "pooled", "key_value")

    def text_conditioning_kind(self, module_path: str) -> str | None:
        # context_embedder reads the text encoder's sequence, text_embedder.linear_1 the pooled CLIP
        # embedding; the double blocks' text stream makes the joint attention's text keys and values
        for kind, pattern in _TEXT_MODULES.items():
            if re.fullmatch(pattern, module_path):
                return kind
        return None

    def sites(self, denoiser: nn.Module) -> list[MaskSite]:
        sites: list[MaskSite] = []
        for p, block in numbered_blocks(denoiser):
            attn = block.attn
            head_dim = _head_dim(attn)
            width = attn.to_out[0].in_features
            sites += [
                MaskSite(
                    "norm", f"{p}.norm1.linear", "output", 0, block.norm1.linear.out_features, 1, "joint", "image"
                ),
                MaskSite(
                    "norm",
                    f"{p}.norm1_context.linear",
                    "output",
                    0,
                    block.norm1_context.linear.out_features,
                    1,
                    "joint",
                    "text",
                ),
                MaskSite("heads", f"{p}.attn.to_out.0", "input", 0, width, head_dim, "joint", "image"),
            ]
            if attn.to_add_out is not None:
                sites.append(
                    MaskSite(
                        "heads",
                        f"{p}.attn.to_add_out",
                        "input",
                        0,
                        attn.to_add_out.in_features,
                        head_dim,
                        "joint",
                        "text",
                    )
                )
            if block.attn2 is not None:
                attn2 = block.attn2
                sites.append(
                    MaskSite(
                        "heads",
                        f"{p}.attn2.to_out.0",
                        "input",
                        0,
                        attn2.to_out[0].in_features,
                        _head_dim(attn2),
                        "joint",
                        "image_self",
                    )
                )
            sites.append(
                MaskSite("neurons", f"{p}.ff.net.2", "input", 0, block.ff.net[2].in_features, 1, "joint", "image")
            )
            if block.ff_context is not None:
                sites.append(
                    MaskSite(
                        "neurons",
                        f"{p}.ff_context.net.2",
                        "input",
                        0,
                        block.ff_context.net[2].in_features,
                        1,
                        "joint",
                        "text",
                    )
                )
        return sites

    # ------------------------------------------------------------------ sampling
    def text_encoders(self, pipe: Any) -> dict[str, tuple[Any, nn.Module]]:
        """CLIP-L, CLIP-G and (where the pipeline has it) T5."""
        pairs = {
            "text_encoder": (pipe.tokenizer, pipe.text_encoder),
            "text_encoder_2": (pipe.tokenizer_2, pipe.text_encoder_2),
            "text_encoder_3": (pipe.tokenizer_3, pipe.text_encoder_3),
        }
        return {name: pair for name, pair in pairs.items() if pair[1] is not None}

    def encode_conditional(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.execution_device(pipe),
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def encode_prompts(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """CLIP-L + CLIP-G + T5 embeddings of ``prompts`` and of the empty negative prompt, one row per prompt.

        The negative (unconditional) rows are what ``StableDiffusion3Pipeline`` uses for
        classifier-free guidance with no ``negative_prompt``: the encoding of ``""``.
        """
        device = self.execution_device(pipe)
        with torch.no_grad():
            encoded = self.encode_conditional(pipe, prompts, max_sequence_length)
            negative, _, negative_pooled, _ = pipe.encode_prompt(
                prompt=[""],
                prompt_2=None,
                prompt_3=None,
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=max_sequence_length,
            )
        batch = len(prompts)
        return {
            **encoded,
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
        guidance: Guidance | None = None,
    ) -> Trajectory:
        """Flow-matching Euler sampling exactly as ``StableDiffusion3Pipeline.__call__`` does it.

        Guidance > 1 runs the unconditional and conditional rows in one batch (uncond first) and
        mixes ``uncond + g (cond - uncond)``; guidance <= 1 runs the conditional rows only.
        Skip-layer guidance (off by default in the pipeline) is not reproduced.
        """
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        transformer = pipe.transformer
        device = self.execution_device(pipe)
        multiple = pipe.vae_scale_factor * transformer.config.patch_size
        check_resolution(resolution, multiple)
        tokens = resolution // multiple
        if tokens > transformer.config.pos_embed_max_size:
            largest = transformer.config.pos_embed_max_size * multiple
            raise ValueError(
                f"resolution {resolution} exceeds this transformer's positional embeddings (at most {largest})"
            )
        check_steps(steps)
        check_seeds(noise_seeds, encoded["prompt_embeds"].shape[0])
        cfg_on = guidance_scale > 1
        prompt_embeds = encoded["prompt_embeds"]
        batch = prompt_embeds.shape[0]

        channels = transformer.config.in_channels
        noise = torch.cat(
            [
                pipe.prepare_latents(1, channels, resolution, resolution, prompt_embeds.dtype, device, generator)
                for generator in seed_generators(noise_seeds)
            ]
        )

        # A fresh scheduler: the pipeline's own schedule, read once; the step below keeps no counter.
        sched = fresh_scheduler(pipe.scheduler)
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
            raise ValueError(
                "stochastic_sampling flow-matching schedulers are not supported: their steps draw fresh noise"
            )
        timesteps = sched.timesteps.to(device)
        sigmas = sched.sigmas.to(device)

        def condition(role: str, g: Guidance) -> dict[str, Any]:
            return {
                "embeds": role_tensor(role, "prompt_embeds", encoded, g, batch),
                "pooled": role_tensor(role, "pooled_prompt_embeds", encoded, g, batch),
            }

        def call(rows: torch.Tensor, t: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
            return transformer(
                hidden_states=rows,
                timestep=t.expand(rows.shape[0]),
                encoder_hidden_states=c["embeds"],
                pooled_projections=c["pooled"],
                return_dict=False,
            )[0]

        guided = GuidedDenoiser(
            guidance_or_default(guidance, cfg_on, guidance_scale),
            condition,
            call,
            family=self.family,
        )
        schedule = flow_schedule(timesteps, sigmas, steps)

        def step(z: torch.Tensor, i: int) -> torch.Tensor:
            velocity = guided(z, timesteps[i], i)
            # FlowMatchEulerDiscreteScheduler.step for index i, without its step counter (so recomputing step i
            # is exact), with its casts: sample upcast to float32 (float64 kept), result in the model's dtype.
            sample = z if z.dtype == torch.float64 else z.to(torch.float32)
            return (sample + (sigmas[i + 1] - sigmas[i]) * velocity).to(velocity.dtype)

        def predict(z: torch.Tensor, i: int, guidance: Guidance | None = None) -> torch.Tensor:
            return guided(z, timesteps[schedule.check_index(i)], i, guidance)

        train_steps = float(sched.config.num_train_timesteps)

        def velocity_at(z: torch.Tensor, sigma: float, guidance: Guidance | None = None) -> torch.Tensor:
            t = torch.tensor(float(sigma) * train_steps, device=z.device, dtype=timesteps.dtype)
            return guided(z, t, -1, guidance)

        def decode(z: torch.Tensor) -> torch.Tensor:
            return decode_to_unit(pipe.vae, z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor)

        return Trajectory(
            noise=noise,
            num_steps=steps,
            step=step,
            decode=decode,
            predict=predict,
            schedule=schedule,
            velocity_at=velocity_at,
        )

    # ------------------------------------------------------------------ pruning
    def prune(self, denoiser: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
        """Return a :class:`PrunedSD3Transformer2DModel` without the dropped heads and neurons.

        ``keep`` maps site keys to boolean keep-masks and must already be zero-folded into
        ``denoiser``. A joint head is removed only when every stream with an output drops it; a block
        keeps at least one head per attention and one neuron per feed-forward (zeroed) so that its
        shapes stay valid. Norm channels cannot be removed (they are split into shift/scale/gate):
        they stay zero-folded.
        """
        cut = PrunedState(denoiser, keep)
        layout = []
        for p, block in numbered_blocks(denoiser):
            attn = block.attn
            streams = [f"heads/{p}.attn.to_out.0"]
            outputs = ["to_out.0"]
            if attn.to_add_out is not None:
                streams.append(f"heads/{p}.attn.to_add_out")
                outputs.append("to_add_out")
            heads = cut.kept(_heads_of(attn), *streams)
            cut.heads(f"{p}.attn", heads, _head_dim(attn), QKV + ADDED_QKV, tuple(outputs))

            heads2 = 0 if block.attn2 is None else cut.attention(f"{p}.attn2", block.attn2, _head_dim(block.attn2))
            ff = cut.feed_forward(f"{p}.ff", block.ff)
            ffc = 0 if block.ff_context is None else cut.feed_forward(f"{p}.ff_context", block.ff_context)
            layout.append([int(heads.numel()), heads2, ff, ffc])

        return cut.build(self.pruned_class(), layout)


SD3 = register(SD3Architecture())
