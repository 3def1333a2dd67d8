"""FLUX.1 (``FluxTransformer2DModel``): mask sites, flow-matching trajectory, fold and prune.

Units:

* ``heads`` -- double blocks: one scalar per head on the image stream (input of ``attn.to_out.0``)
  and one per head on the text stream (input of ``attn.to_add_out``); single blocks: one per head
  on the attention part of ``proj_out``'s input.
* ``neurons`` -- feed-forward hidden units before the down projection: ``ff.net.2`` and
  ``ff_context.net.2`` inputs in double blocks, the MLP part of ``proj_out``'s input in single blocks.
* ``norm`` -- output channels of the AdaLN modulation layers ``norm1.linear`` and
  ``norm1_context.linear`` (6 x width: shift/scale/gate for attention and MLP) and single blocks'
  ``norm.linear`` (3 x width).

Sampling: the flow-matching Euler steps of ``FluxPipeline``. A guidance-distilled transformer
(``guidance_embeds``, FLUX.1-dev) receives ``guidance_scale`` as an input; any other (FLUX.1-schnell,
the ShapesCanvas model) gets true classifier-free guidance when ``guidance_scale > 1``, as
``FluxPipeline(true_cfg_scale=g, negative_prompt="")`` computes it, both halves in one batch.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import Architecture, MaskSite, Trajectory, register
from .common import (
    ADDED_QKV,
    QKV,
    PrunedState,
    check_resolution,
    check_seeds,
    decode_to_unit,
    flow_schedule,
    numbered_blocks,
    seed_generators,
)
from .guidance import Guidance, GuidedDenoiser, guidance_or_default, role_tensor
from .samplers import fresh_scheduler

#: Denoiser configs of the published FLUX.1 checkpoints, so that ``inspect`` works without the hub.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "black-forest-labs/FLUX.1-schnell": {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": 128,
        "guidance_embeds": False,
        "in_channels": 64,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 19,
        "num_single_layers": 38,
        "patch_size": 1,
        "pooled_projection_dim": 768,
        "axes_dims_rope": [16, 56, 56],
    },
}
KNOWN_CONFIGS["black-forest-labs/FLUX.1-dev"] = {
    **KNOWN_CONFIGS["black-forest-labs/FLUX.1-schnell"],
    "guidance_embeds": True,
}


#: Text-conditioning modules by kind (``Architecture.text_conditioning_modules``), as module-path patterns.
_TEXT_MODULES = {
    "context": r"context_embedder",
    "pooled": r"time_text_embed\.text_embedder\.linear_1",
    "key_value": r"transformer_blocks\.\d+\.attn\.add_[kv]_proj",
}


def _heads_of(attn: nn.Module) -> int:
    return attn.to_q.out_features // attn.head_dim


class FluxArchitecture(Architecture):
    """FLUX.1 transformer with 19 double-stream and 38 single-stream blocks (any sizes)."""

    family = "flux"
    denoiser_classes = ("FluxTransformer2DModel", "PrunedFluxTransformer2DModel")
    known_configs = KNOWN_CONFIGS
    pruned_module = "flux_pruned"
    flow_matching = True

    text_conditioning_kinds = ("context", "pooled", "key_value")

    def text_conditioning_kind(self, module_path: str) -> str | None:
        # context_embedder reads the T5 sequence, text_embedder.linear_1 the pooled CLIP embedding; the
        # double blocks' text stream makes the joint attention's text keys and values (single blocks mix
        # text and image tokens in one projection, so they are not text-only modules)
        for kind, pattern in _TEXT_MODULES.items():
            if re.fullmatch(pattern, module_path):
                return kind
        return None

    def supports_cfg(self, pipe: Any) -> bool:
        """False for a guidance-distilled transformer (FLUX.1-dev: ``guidance_embeds``)."""
        return not pipe.transformer.config.guidance_embeds

    def sites(self, denoiser: nn.Module) -> list[MaskSite]:
        sites: list[MaskSite] = []
        for p, block in numbered_blocks(denoiser):
            head_dim = block.attn.head_dim
            attn_width = _heads_of(block.attn) * head_dim
            sites += [
                MaskSite(
                    "norm", f"{p}.norm1.linear", "output", 0, block.norm1.linear.out_features, 1, "double", "image"
                ),
                MaskSite(
                    "norm",
                    f"{p}.norm1_context.linear",
                    "output",
                    0,
                    block.norm1_context.linear.out_features,
                    1,
                    "double",
                    "text",
                ),
                MaskSite("heads", f"{p}.attn.to_out.0", "input", 0, attn_width, head_dim, "double", "image"),
                MaskSite("heads", f"{p}.attn.to_add_out", "input", 0, attn_width, head_dim, "double", "text"),
                MaskSite("neurons", f"{p}.ff.net.2", "input", 0, block.ff.net[2].in_features, 1, "double", "image"),
                MaskSite(
                    "neurons",
                    f"{p}.ff_context.net.2",
                    "input",
                    0,
                    block.ff_context.net[2].in_features,
                    1,
                    "double",
                    "text",
                ),
            ]
        for p, block in numbered_blocks(denoiser, "single_transformer_blocks"):
            head_dim = block.attn.head_dim
            attn_width = _heads_of(block.attn) * head_dim
            mlp_width = block.proj_mlp.out_features
            sites += [
                MaskSite("norm", f"{p}.norm.linear", "output", 0, block.norm.linear.out_features, 1, "single"),
                MaskSite("heads", f"{p}.proj_out", "input", 0, attn_width, head_dim, "single"),
                MaskSite("neurons", f"{p}.proj_out", "input", attn_width, attn_width + mlp_width, 1, "single"),
            ]
        return sites

    # ------------------------------------------------------------------ sampling
    def text_encoders(self, pipe: Any) -> dict[str, tuple[Any, nn.Module]]:
        """CLIP (the pooled embedding) and T5 (the sequence)."""
        return {
            "text_encoder": (pipe.tokenizer, pipe.text_encoder),
            "text_encoder_2": (pipe.tokenizer_2, pipe.text_encoder_2),
        }

    def encode_conditional(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.execution_device(pipe), max_sequence_length=max_sequence_length
        )
        return {
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled,
            "text_ids": text_ids.unsqueeze(0).expand(len(prompts), *text_ids.shape),
        }

    def encode_prompts(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        device = self.execution_device(pipe)
        with torch.no_grad():
            encoded = self.encode_conditional(pipe, prompts, max_sequence_length)
            # The empty prompt: FluxPipeline's negative prompt for true classifier-free guidance.
            negative, negative_pooled, _ = pipe.encode_prompt(
                prompt=[""], prompt_2=None, device=device, max_sequence_length=max_sequence_length
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
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        transformer = pipe.transformer
        device = self.execution_device(pipe)
        check_resolution(resolution, pipe.vae_scale_factor * 2)
        prompt_embeds = encoded["prompt_embeds"]
        text_ids = encoded["text_ids"][0]
        check_seeds(noise_seeds, prompt_embeds.shape[0])
        channels = transformer.config.in_channels // 4
        drawn = [
            pipe.prepare_latents(1, channels, resolution, resolution, prompt_embeds.dtype, device, generator)
            for generator in seed_generators(noise_seeds)
        ]
        noise = torch.cat([latents for latents, _ in drawn])
        image_ids = drawn[-1][1]
        batch = noise.shape[0]

        sched = fresh_scheduler(pipe.scheduler)
        cfg = sched.config
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(cfg, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            noise.shape[1],
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        if sigmas is None:
            sched.set_timesteps(num_inference_steps=steps, device=device, mu=mu)
        else:
            sched.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        timesteps = sched.timesteps.to(device)
        schedule = sched.sigmas.to(device=device, dtype=torch.float32)
        # A guidance-distilled model (FLUX.1-dev) takes the scale as an input; any other FLUX model
        # gets true classifier-free guidance above 1 (FluxPipeline's true_cfg_scale with the empty
        # negative prompt), with both halves in one batch.
        true_cfg = guidance_scale > 1 and not transformer.config.guidance_embeds
        distilled = None
        if transformer.config.guidance_embeds:
            distilled = torch.full([batch], guidance_scale, device=device, dtype=torch.float32)

        def condition(role: str, g: Guidance) -> dict[str, Any]:
            part: dict[str, Any] = {
                "embeds": role_tensor(role, "prompt_embeds", encoded, g, batch),
                "pooled": role_tensor(role, "pooled_prompt_embeds", encoded, g, batch),
            }
            if distilled is not None:
                part["guidance"] = distilled
            return part

        def call(rows: torch.Tensor, t: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
            timestep = t.expand(rows.shape[0]).to(rows.dtype)
            return transformer(
                hidden_states=rows,
                timestep=timestep / 1000,
                guidance=c.get("guidance"),
                pooled_projections=c["pooled"],
                encoder_hidden_states=c["embeds"],
                txt_ids=text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]

        guided = GuidedDenoiser(
            guidance_or_default(guidance, true_cfg, guidance_scale),
            condition,
            call,
            supports_cfg=self.supports_cfg(pipe),
            family=self.family,
        )
        flow = flow_schedule(timesteps, schedule, steps)

        def step(z: torch.Tensor, i: int) -> torch.Tensor:
            velocity = guided(z, timesteps[i], i)
            # The scheduler's Euler step, without its step counter: recomputing step i is exact.
            out = z.to(torch.float32) + (schedule[i + 1] - schedule[i]) * velocity.to(torch.float32)
            return out.to(velocity.dtype)

        def predict(z: torch.Tensor, i: int, guidance: Guidance | None = None) -> torch.Tensor:
            return guided(z, timesteps[flow.check_index(i)], i, guidance)

        train_steps = float(sched.config.num_train_timesteps)

        def velocity_at(z: torch.Tensor, sigma: float, guidance: Guidance | None = None) -> torch.Tensor:
            t = torch.tensor(float(sigma) * train_steps, device=z.device, dtype=timesteps.dtype)
            return guided(z, t, -1, guidance)

        def decode(z: torch.Tensor) -> torch.Tensor:
            latents = pipe._unpack_latents(z, resolution, resolution, pipe.vae_scale_factor)
            return decode_to_unit(pipe.vae, latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor)

        return Trajectory(
            noise=noise,
            num_steps=steps,
            step=step,
            decode=decode,
            predict=predict,
            schedule=flow,
            velocity_at=velocity_at,
        )

    # ------------------------------------------------------------------ pruning
    def prune(self, denoiser: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
        """Return a :class:`PrunedFluxTransformer2DModel` without the dropped heads and neurons.

        ``keep`` maps site keys to boolean keep-masks and must already be zero-folded into
        ``denoiser``. A double-block head is removed only when both streams drop it (the streams share
        the joint attention); a block keeps at least one head and one neuron (zeroed) so that its
        shapes stay valid. Norm channels cannot be removed (they are split into shift/scale/gate):
        they stay zero-folded.
        """
        head_dim = denoiser.config.attention_head_dim
        cut = PrunedState(denoiser, keep)
        double_layout, single_layout = [], []
        for p, block in numbered_blocks(denoiser):
            heads = cut.kept(_heads_of(block.attn), f"heads/{p}.attn.to_out.0", f"heads/{p}.attn.to_add_out")
            cut.heads(f"{p}.attn", heads, head_dim, QKV + ADDED_QKV, ("to_out.0", "to_add_out"))
            ff, ffc = cut.feed_forward(f"{p}.ff", block.ff), cut.feed_forward(f"{p}.ff_context", block.ff_context)
            double_layout.append([int(heads.numel()), ff, ffc])

        for p, block in numbered_blocks(denoiser, "single_transformer_blocks"):
            n_heads = _heads_of(block.attn)
            heads = cut.kept(n_heads, f"heads/{p}.proj_out")
            mlp = cut.kept(block.proj_mlp.out_features, f"neurons/{p}.proj_out")
            ch = cut.heads(f"{p}.attn", heads, head_dim, outputs=())
            cut.rows(f"{p}.proj_mlp", mlp)
            cut.cols(f"{p}.proj_out", torch.cat([ch, n_heads * head_dim + mlp]))
            single_layout.append([int(heads.numel()), int(mlp.numel())])

        return cut.build(self.pruned_class(), {"double": double_layout, "single": single_layout})


FLUX = register(FluxArchitecture())
