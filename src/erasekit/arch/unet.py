"""Stable Diffusion UNets (``UNet2DConditionModel``: SD 1.x, SD 2.x, SDXL): sites, samplers, fold, prune.

Units (one set per ``BasicTransformerBlock`` of the down, mid and up blocks):

* ``heads`` -- self-attention ``attn1`` and cross-attention ``attn2``: one scalar per head on the
  input of ``to_out.0`` (``group = head_dim = inner_dim // attn.heads``); stream ``self`` / ``cross``.
* ``neurons`` -- GEGLU feed-forward hidden units on the input of ``ff.net.2`` (the GEGLU projection
  ``ff.net.0.proj`` is twice as wide: a value half and a gate half).
* ``norm`` -- **none**. The transformer blocks of the SD 1.x / 2.x / XL UNets normalise with plain
  ``LayerNorm`` (``norm1``, ``norm2``, ``norm3``) and have no adaptive-norm modulation Linear, so
  there are no norm channels to mask; a config that enables ``mask.norm`` simply finds no norm sites.
  (The UNet's ResNet blocks take the timestep through ``time_emb_proj``, which is not a per-block
  norm of the transformer and is not a unit kind of the method.)

Site ``block_type`` is ``down`` / ``mid`` / ``up`` (where the block sits in the UNet).

Unit counts of the published configs (bundled in :data:`KNOWN_CONFIGS`, checked in tests):

=========================================  =======  ============  =========  =======
model                                      blocks   heads         neurons    norm
=========================================  =======  ============  =========  =======
SD 1.5 (stable-diffusion-v1-5)             16       256 (8/attn)  49 920     0
SD 2.1 (stabilityai/stable-diffusion-2-1)  16       390           49 920     0
SDXL base 1.0                              70       2 600         332 800    0
=========================================  =======  ============  =========  =======

SD 1.5: 16 blocks (6 down, 1 mid, 9 up), 8 heads per attention at every level (its config's
``attention_head_dim: 8`` is diffusers' legacy name for the head count), 2 attentions per block:
256 heads; GEGLU width 4 x channels: 4 x (2(320+640+1280) + 1280 + 3(1280+640+320)) = 49 920.
SD 2.1: same blocks, heads 5/10/20 (head_dim 64) by level: 2(2(5+10+20) + 20 + 3(20+10+5)) = 390.
SDXL: 10 blocks at 640 channels (10 heads) and 60 at 1280 (20 heads): 2(100 + 1200) = 2 600 heads,
4(10 x 640 + 60 x 1280) = 332 800 neurons.

Samplers: the trajectory uses the pipeline's own scheduler type. Supported:
:class:`~diffusers.DDIMScheduler` (SD 2.x's default), :class:`~diffusers.EulerDiscreteScheduler`
(SDXL's default), :class:`~diffusers.DPMSolverMultistepScheduler` (deterministic variants) and
:class:`~diffusers.PNDMScheduler` with ``skip_prk_steps`` (SD 1.5's default, i.e. PLMS); any other
scheduler is refused by name (switch with :func:`~erasekit.arch.samplers.set_scheduler`, alias
:func:`use_scheduler`). Each step calls the scheduler's own ``step`` on a private copy after setting
every piece of its state explicitly (:class:`~erasekit.arch.samplers.StatelessSampler`: step index;
for DPM-Solver the previous model outputs and ``lower_order_nums``; for PLMS the counter, the kept
model outputs and the first sample), so the step is a pure function of its arguments and
recomputing it is bit-identical.

DPM-Solver is multistep: its update at step ``i`` uses the converted model outputs (data
predictions) of the previous ``solver_order - 1`` steps. The trajectory state carries them
explicitly: before step ``i > 0`` the state is ``cat([latent, x0_{i-k}, ..., x0_{i-1}], dim=1)``
(``k = min(i, solver_order - 1)`` previous outputs, each with the latent's channels); step 0 takes
the plain noise and the last step returns the plain latent, so the loss and ``decode`` see the
latent only. Gradients flow through the carried outputs exactly as through the un-checkpointed
graph. PLMS (PNDM) is multistep too, carried the same way: before step ``i`` the state is
``cat([latent, eps_..., (x_0 at step 1)], dim=1)`` with the (at most 3) previous noise predictions
PLMS keeps and, before step 1 only, the sample step 0 started from (PLMS re-evaluates that point);
PNDM's timestep list has ``steps + 1`` entries, so its trajectory has ``steps + 1`` model calls as in
the pipeline.

Classifier-free guidance is done as the pipelines do it: unconditional (empty-prompt; zeros for
SDXL with ``force_zeros_for_empty_prompt``) and conditional rows in one batch, applied when
``guidance_scale > 1``. SDXL gets its pooled text embeddings and added time ids (original size =
target size = the resolution, crop (0, 0)). CLIP's context is fixed at 77 tokens, so
``max_sequence_length`` is ignored.

Published configs (:data:`KNOWN_CONFIGS`): written from the ``unet/config.json`` files of the hub
repositories; every value that changes a shape (block types and widths, layers per block,
transformer layers, head counts, cross-attention and addition-embedding dims, linear projection)
is certain; the remaining values equal diffusers' defaults there.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .base import Architecture, MaskSite, Trajectory, register
from .common import (
    PrunedState,
    basic_block_sites,
    check_resolution,
    check_seeds,
    decode_to_unit,
    randn_latents,
)
from .guidance import Guidance, GuidedDenoiser, guidance_or_default, role_tensor
from .samplers import ALL_SCHEDULERS, SCHEDULER_CLASSES, StatelessSampler, set_scheduler

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_SD_COMMON: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "down_block_types": _SD_DOWN,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "up_block_types": _SD_UP,
}

#: Denoiser (``unet/config.json``) configs of the published checkpoints, so ``inspect`` works offline.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": {
        **_SD_COMMON,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "sample_size": 64,
    },
    "stabilityai/stable-diffusion-2-1": {
        **_SD_COMMON,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "dual_cross_attention": False,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "sample_size": 96,
        "upcast_attention": True,
        "use_linear_projection": True,
    },
    "stabilityai/stable-diffusion-xl-base-1.0": {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": None,
        "use_linear_projection": True,
    },
}

#: Scheduler names of :func:`use_scheduler` the trajectory supports, and their scheduler classes.
SCHEDULERS: dict[str, str] = {k: v for k, v in SCHEDULER_CLASSES.items() if v in ALL_SCHEDULERS}
SUPPORTED_SCHEDULERS = tuple(SCHEDULERS.values())

#: Replace ``pipe.scheduler`` by one built from its config, e.g. ``use_scheduler(pipe, "ddim")`` on
#: SD 1.5 (which ships with PNDM) for the DDIM sampler of the method's reference setting.
use_scheduler = set_scheduler


def transformer_blocks(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(module path, BasicTransformerBlock)`` of every transformer block, in module order."""
    return [(name, m) for name, m in denoiser.named_modules() if type(m).__name__ == "BasicTransformerBlock"]


def _block_type(path: str) -> str:
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(path.split(".")[0], path.split(".")[0])


def _is_sdxl(pipe: Any) -> bool:
    return hasattr(pipe, "_get_add_time_ids") and hasattr(pipe, "text_encoder_2")


class UNetArchitecture(Architecture):
    """Stable Diffusion 1.x / 2.x / XL UNets (any sizes)."""

    family = "unet"
    denoiser_classes = ("UNet2DConditionModel", "PrunedUNet2DConditionModel")
    denoiser_attr = "unet"
    known_configs = KNOWN_CONFIGS
    pruned_module = "unet_pruned"

    text_conditioning_kinds = ("key_value",)

    def text_conditioning_kind(self, module_path: str) -> str | None:
        # the cross-attention's keys and values are computed from the text encoder's sequence
        return "key_value" if re.search(r"\.attn2\.to_[kv]$", module_path) else None

    def supports_cfg(self, pipe: Any) -> bool:
        """False for a UNet distilled with the guidance scale as an input (LCM: ``time_cond_proj_dim``)."""
        return pipe.unet.config.time_cond_proj_dim is None

    def sites(self, denoiser: nn.Module) -> list[MaskSite]:
        sites: list[MaskSite] = []
        for path, block in transformer_blocks(denoiser):
            sites += basic_block_sites(path, block, _block_type(path))
        return sites

    # ------------------------------------------------------------------ sampling
    def text_encoders(self, pipe: Any) -> dict[str, tuple[Any, nn.Module]]:
        """CLIP (SD 1.x / 2.x), or both CLIPs of SDXL (the second gives the pooled embedding)."""
        pairs = {"text_encoder": (pipe.tokenizer, pipe.text_encoder)}
        if _is_sdxl(pipe):
            pairs["text_encoder_2"] = (pipe.tokenizer_2, pipe.text_encoder_2)
        return {name: pair for name, pair in pairs.items() if pair[1] is not None}

    def encode_conditional(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        # the pipelines compute the prompts' rows before, and independently of, the negative ones
        device = self.execution_device(pipe)
        if _is_sdxl(pipe):
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return {"prompt_embeds": embeds}

    def encode_prompts(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """Conditional and unconditional text embeddings, one row per prompt (``max_sequence_length`` unused)."""
        device = self.execution_device(pipe)
        with torch.no_grad():
            if _is_sdxl(pipe):
                embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                    prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True
                )
                return {
                    "prompt_embeds": embeds,
                    "negative_prompt_embeds": negative,
                    "pooled_prompt_embeds": pooled,
                    "negative_pooled_prompt_embeds": negative_pooled,
                }
            embeds, negative = pipe.encode_prompt(prompts, device, 1, True)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

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
        unet = pipe.unet
        device = self.execution_device(pipe)
        multiple = pipe.vae_scale_factor
        check_resolution(resolution, multiple)
        channels = unet.config.in_channels
        sampler = StatelessSampler(
            pipe.scheduler, steps, device, channels, family="UNet", supported=SUPPORTED_SCHEDULERS, error=ValueError
        )

        prompt_embeds = encoded["prompt_embeds"]
        batch = prompt_embeds.shape[0]
        check_seeds(noise_seeds, batch)
        dtype = prompt_embeds.dtype
        side = resolution // multiple
        # as the pipelines' prepare_latents for batch 1, times this scheduler's initial sigma as they scale it
        noise = randn_latents(noise_seeds, (channels, side, side), device, dtype) * sampler.scheduler.init_noise_sigma

        cfg = guidance_scale > 1 and unet.config.time_cond_proj_dim is None
        sdxl = _is_sdxl(pipe)
        time_ids: torch.Tensor | None = None
        if sdxl:
            pooled_dim = int(encoded["pooled_prompt_embeds"].shape[-1])
            projection = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled_dim
            size = (resolution, resolution)
            time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection)
            time_ids = time_ids.to(device)
        timestep_cond = None
        if unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(guidance_scale - 1).repeat(batch)
            timestep_cond = pipe.get_guidance_scale_embedding(scale, embedding_dim=unet.config.time_cond_proj_dim)
            timestep_cond = timestep_cond.to(device=device, dtype=dtype)

        def condition(role: str, g: Guidance) -> dict[str, Any]:
            part: dict[str, Any] = {"context": role_tensor(role, "prompt_embeds", encoded, g, batch)}
            if time_ids is not None:
                part["text_embeds"] = role_tensor(role, "pooled_prompt_embeds", encoded, g, batch).to(device)
                part["time_ids"] = time_ids.repeat(batch, 1)
            if timestep_cond is not None:
                part["timestep_cond"] = timestep_cond
            return part

        def call(rows: torch.Tensor, t: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
            added = {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]} if "time_ids" in c else None
            return unet(
                rows,
                t,
                encoder_hidden_states=c["context"],
                timestep_cond=c.get("timestep_cond"),
                added_cond_kwargs=added,
                return_dict=False,
            )[0]

        guided = GuidedDenoiser(
            guidance_or_default(guidance, cfg, guidance_scale),
            condition,
            call,
            supports_cfg=self.supports_cfg(pipe),
            family=self.family,
        )

        def step(z: torch.Tensor, i: int) -> torch.Tensor:
            return sampler.step(z, i, lambda x, t: guided(x, t, i))

        def predict(z: torch.Tensor, i: int, guidance: Guidance | None = None) -> torch.Tensor:
            x, t = sampler.model_input(z, i)
            return guided(x, t, i, guidance)

        def decode(z: torch.Tensor) -> torch.Tensor:
            vae = pipe.vae
            latents = z[:, :channels]
            upcast = sdxl and vae.dtype == torch.float16 and vae.config.force_upcast
            if upcast:
                vae.to(dtype=torch.float32)
            mean = getattr(vae.config, "latents_mean", None)
            std = getattr(vae.config, "latents_std", None)
            if sdxl and mean is not None and std is not None:
                mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std_t / vae.config.scaling_factor + mean_t
            else:
                latents = latents / vae.config.scaling_factor
            try:
                return decode_to_unit(vae, latents)
            finally:
                if upcast:
                    vae.to(dtype=torch.float16)

        return Trajectory(
            noise=noise,
            num_steps=sampler.num_steps,
            step=step,
            decode=decode,
            predict=predict,
            schedule=sampler.noise_schedule(),
        )

    # ------------------------------------------------------------------ pruning
    def prune(self, denoiser: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
        """Return a :class:`PrunedUNet2DConditionModel` without the dropped heads and neurons.

        ``keep`` maps site keys to boolean keep-masks and must already be zero-folded into
        ``denoiser``. An attention (or feed-forward) that drops every unit keeps one zero-folded unit,
        so that its shapes stay valid.
        """
        cut = PrunedState(denoiser, keep)
        layout = {path: cut.basic_block(path, block) for path, block in transformer_blocks(denoiser)}
        return cut.build(self.pruned_class(), layout).eval()


UNET = register(UNetArchitecture())
