"""PixArt-α / PixArt-Σ (``PixArtTransformer2DModel``): mask sites, sampler trajectory, fold and prune.

Units (one ``BasicTransformerBlock`` per layer; XL-2 models: 28 blocks of width 1152, 16 heads of 72):

* ``heads`` -- one scalar per head of the self-attention (input of ``attn1.to_out.0``, stream
  ``self``) and one per head of the cross-attention to the T5 tokens (input of ``attn2.to_out.0``,
  stream ``cross``).
* ``neurons`` -- feed-forward hidden units (GELU-tanh, 4 x width) before the down projection
  (input of ``ff.net.2``).
* ``norm`` -- PixArt blocks have **no modulation Linear of their own**: each block's shift / scale /
  gate come from a learned per-block ``scale_shift_table`` (6 x width, a constant, not a layer)
  plus ONE timestep embedding shared by every block, the output of ``adaln_single.linear``
  (``AdaLayerNormSingle``: a timestep embedder followed by one ``Linear(width, 6 x width)``). The
  only norm site is therefore that shared layer's output: 6 x width units (6912 for XL-2) at
  ``norm/adaln_single.linear``, block type ``shared``. Closing one of its channels removes the
  time-dependent part of that shift / scale / gate channel in *every* block (the per-block table
  entry stays), so it is a coarse, global unit: the bundled recipes leave ``mask.norm`` off and
  enable it only on request. The final layer's ``scale_shift_table`` is not a unit either.

Unit counts of the published configurations (both XL-2, 28 blocks, width 1152, 16 heads x 72,
feed-forward 4608):

=========================================  =====  =======  ====  =======
model                                      heads  neurons  norm  total
=========================================  =====  =======  ====  =======
PixArt-alpha/PixArt-Sigma-XL-2-1024-MS       896   129024  6912   136832
PixArt-alpha/PixArt-XL-2-1024-MS (alpha)     896   129024  6912   136832
=========================================  =====  =======  ====  =======

(heads = 28 x 16 self + 28 x 16 cross; neurons = 28 x 4608; norm = 6 x 1152.)

Sampling. The trajectory runs the pipeline's own scheduler class, made stateless by
:class:`~erasekit.arch.samplers.StatelessSampler`: ``DPMSolverMultistepScheduler`` (PixArt's
default; deterministic ``dpmsolver++`` / ``dpmsolver`` only), ``DDIMScheduler`` (eta = 0) and
``EulerDiscreteScheduler``.
DPM-Solver multistep needs the converted model outputs of the previous ``solver_order - 1`` steps:
they are **carried in the latent state** (concatenated after the latent along the channel
dimension), so a step is a pure function of its input state and index, the recomputed step is
bit-identical, and the checkpointed gradient flows into earlier steps through the history exactly
as through the plain graph. The state of the first step is the noise, and the last step returns
the latent alone, so the trainer's loss and ``decode`` only ever see ``(B, 4, h, w)`` latents.
Classifier-free guidance is the pipeline's (uncond "" + cond in one batch, ``guidance_scale > 1``),
and with learned sigma (``out_channels = 8``) only the first 4 channels (epsilon) drive the step.
The PixArt-α pipeline's extra resolution / aspect-ratio conditions (1024 model) are passed as it
does; images are square at ``resolution`` and, unlike ``pipe(...)``'s default, no aspect-ratio
binning is applied (call the pipeline with ``use_resolution_binning=False`` to compare).

Published configs: the values below are the published ``transformer/config.json`` files as far as
the author knows them without network access. Sure: class layout, 28 layers, 16 heads x 72,
in 4 / out 8 channels, patch 2, sample size 128, caption channels 4096, cross-attention dim 1152,
``ada_norm_single``, GELU-tanh (these fix every unit count). Less sure (they do not change any
count): ``interpolation_scale`` (2 for Σ, unset for α) and ``use_additional_conditions`` (false for
Σ, unset -- hence true at sample size 128 -- for α). The hub files name the class
``Transformer2DModel``; diffusers loads them as ``PixArtTransformer2DModel`` (its class remapping
by ``norm_type``), which is the name bundled here.
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
    numbered_blocks,
    randn_latents,
)
from .guidance import Guidance, GuidedDenoiser, guidance_or_default, role_tensor
from .samplers import SUPPORTED_SCHEDULERS, StatelessSampler

__all__ = [
    "KNOWN_CONFIGS",
    "PIXART",
    "PixArtArchitecture",
    "SUPPORTED_SCHEDULERS",
    "StatelessSampler",
]

_XL2: dict[str, Any] = {
    "_class_name": "PixArtTransformer2DModel",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 4096,
    "cross_attention_dim": 1152,
    "dropout": 0.0,
    "in_channels": 4,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 128,
    "upcast_attention": False,
}

#: Denoiser configs of the published PixArt checkpoints, so that ``inspect`` works without the hub.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": {**_XL2, "interpolation_scale": 2, "use_additional_conditions": False},
    "PixArt-alpha/PixArt-XL-2-1024-MS": {**_XL2, "interpolation_scale": None, "use_additional_conditions": None},
}


def _clean_caption_default() -> bool:
    # The pipelines' default clean_caption=True silently falls back to False without bs4 and ftfy.
    from diffusers.utils import is_bs4_available, is_ftfy_available

    return bool(is_bs4_available() and is_ftfy_available())


# ---------------------------------------------------------------------------------------------
# The architecture
# ---------------------------------------------------------------------------------------------


class PixArtArchitecture(Architecture):
    """PixArt-α / PixArt-Σ transformers (any sizes), in ``PixArtAlphaPipeline`` or ``PixArtSigmaPipeline``."""

    family = "pixart"
    denoiser_classes = ("PixArtTransformer2DModel", "PrunedPixArtTransformer2DModel")
    known_configs = KNOWN_CONFIGS
    pruned_module = "pixart_pruned"

    text_conditioning_kinds = ("key_value",)

    def text_conditioning_kind(self, module_path: str) -> str | None:
        # the cross-attention's keys and values are computed from the (caption-projected) T5 sequence
        return "key_value" if re.search(r"\.attn2\.to_[kv]$", module_path) else None

    def sites(self, denoiser: nn.Module) -> list[MaskSite]:
        head_dim = denoiser.config.attention_head_dim
        sites: list[MaskSite] = []
        for p, block in numbered_blocks(denoiser):
            sites += basic_block_sites(p, block, "block", head_dim)
        adaln = denoiser.adaln_single.linear
        sites.append(MaskSite("norm", "adaln_single.linear", "output", 0, adaln.out_features, 1, "shared"))
        return sites

    # ------------------------------------------------------------------ sampling
    def text_encoders(self, pipe: Any) -> dict[str, tuple[Any, nn.Module]]:
        """T5."""
        return {"text_encoder": (pipe.tokenizer, pipe.text_encoder)}

    def encode_conditional(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=self.execution_device(pipe),
            clean_caption=_clean_caption_default(),
            max_sequence_length=max_sequence_length,
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def encode_prompts(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """T5 embeddings and attention masks of ``prompts`` and of the empty negative prompt, one row per prompt."""
        device = self.execution_device(pipe)
        with torch.no_grad():
            embeds, mask, negative, negative_mask = pipe.encode_prompt(
                prompts,
                do_classifier_free_guidance=True,
                negative_prompt="",
                device=device,
                clean_caption=_clean_caption_default(),
                max_sequence_length=max_sequence_length,
            )
        return {
            "prompt_embeds": embeds,
            "prompt_attention_mask": mask,
            "negative_prompt_embeds": negative,
            "negative_prompt_attention_mask": negative_mask,
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
        transformer = pipe.transformer
        device = self.execution_device(pipe)
        check_resolution(resolution, pipe.vae_scale_factor * transformer.config.patch_size)
        check_seeds(noise_seeds, encoded["prompt_embeds"].shape[0])
        cfg = guidance_scale > 1.0
        batch = encoded["prompt_embeds"].shape[0]
        dtype = encoded["prompt_embeds"].dtype
        channels = transformer.config.in_channels
        is_alpha = type(pipe).__name__.startswith("PixArtAlpha")
        sampler = StatelessSampler(
            pipe.scheduler, steps, device, channels, x0_when_single_step=is_alpha, family="PixArt"
        )
        size = resolution // pipe.vae_scale_factor
        noise = randn_latents(noise_seeds, (channels, size, size), device, dtype) * sampler.init_noise_sigma

        extra_conditions = is_alpha and transformer.config.sample_size == 128
        learned_sigma = transformer.config.out_channels // 2 == channels

        def condition(role: str, g: Guidance) -> dict[str, Any]:
            part: dict[str, Any] = {
                "embeds": role_tensor(role, "prompt_embeds", encoded, g, batch),
                "mask": role_tensor(role, "prompt_attention_mask", encoded, g, batch),
                "resolution": None,
                "aspect_ratio": None,
            }
            if extra_conditions:
                # the PixArt-alpha pipeline's resolution / aspect-ratio conditions of the 1024 model
                part["resolution"] = (
                    torch.tensor([resolution, resolution]).repeat(batch, 1).to(dtype=dtype, device=device)
                )
                part["aspect_ratio"] = torch.tensor([1.0]).repeat(batch, 1).to(dtype=dtype, device=device)
            return part

        def call(rows: torch.Tensor, t: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
            out = transformer(
                rows,
                encoder_hidden_states=c["embeds"],
                encoder_attention_mask=c["mask"],
                timestep=t[None].to(device).expand(rows.shape[0]),
                added_cond_kwargs={"resolution": c["resolution"], "aspect_ratio": c["aspect_ratio"]},
                return_dict=False,
            )[0]
            # with learned sigma only the epsilon half drives the sampler (and the guidance)
            return out.chunk(2, dim=1)[0] if learned_sigma else out

        guided = GuidedDenoiser(
            guidance_or_default(guidance, cfg, guidance_scale),
            condition,
            call,
            family=self.family,
        )

        def step(z: torch.Tensor, i: int) -> torch.Tensor:
            return sampler.step(z, i, lambda x, t: guided(x, t, i))

        def predict(z: torch.Tensor, i: int, guidance: Guidance | None = None) -> torch.Tensor:
            x, t = sampler.model_input(z, i)
            return guided(x, t, i, guidance)

        def decode(z: torch.Tensor) -> torch.Tensor:
            return decode_to_unit(pipe.vae, z.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor)

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
        """Return a :class:`PrunedPixArtTransformer2DModel` without the dropped heads and neurons.

        ``keep`` maps site keys to boolean keep-masks and must already be zero-folded into
        ``denoiser``. Self- and cross-attention heads are removed independently; a block keeps at
        least one (zeroed) head per attention and one neuron so that its shapes stay valid. The
        shared ``adaln_single.linear`` norm channels cannot be removed (they feed every block's
        shift / scale / gate): they stay zero-folded.
        """
        head_dim = denoiser.config.attention_head_dim
        cut = PrunedState(denoiser, keep)
        layout = [cut.basic_block(p, block, head_dim) for p, block in numbered_blocks(denoiser)]
        return cut.build(self.pruned_class(), layout).eval()


PIXART = register(PixArtArchitecture())
