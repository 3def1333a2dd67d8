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
:class:`StatelessSampler`: ``DPMSolverMultistepScheduler`` (PixArt's default; deterministic
``dpmsolver++`` / ``dpmsolver`` only), ``DDIMScheduler`` (eta = 0) and ``EulerDiscreteScheduler``.
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

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ModelLoadError
from .base import Architecture, MaskSite, Trajectory, register

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

# ---------------------------------------------------------------------------------------------
# A stateless scheduler step (shared with the DiT family)
# ---------------------------------------------------------------------------------------------

#: Scheduler classes whose step :class:`StatelessSampler` can make stateless.
SUPPORTED_SCHEDULERS = ("DPMSolverMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler")
_DETERMINISTIC_DPM = ("dpmsolver++", "dpmsolver")


class StatelessSampler:
    """A private copy of a pipeline's scheduler whose step is a pure function of (state, index).

    The copy is built from the pipeline scheduler's config and ``set_timesteps(steps)`` once; before
    every step all the state the scheduler reads (its step index and, for DPM-Solver multistep, the
    previous converted model outputs and the lower-order counter) is set explicitly from the
    arguments, so calling ``step(state, i, predict)`` twice with the same inputs gives bit-identical
    results. The DPM-Solver history travels in ``state``: channels ``[0, C)`` hold the latent and the
    following ``k * C`` channels the last ``k = min(i, solver_order - 1)`` converted outputs,
    oldest first; the state after the last step is the latent alone.

    Args:
        scheduler: the pipeline's scheduler (only its class and config are used; it is not touched).
        steps: number of inference steps.
        device: where the timesteps live.
        channels: latent channels ``C``.
        x0_when_single_step: return the scheduler's predicted ``x0`` (its second output) after a
            one-step trajectory, as ``PixArtAlphaPipeline`` does for distilled one-step sampling.
        family: named in error messages.

    Raises:
        ModelLoadError: the scheduler class (or DPM-Solver variant) is not supported; the message
            names the supported ones and how to switch.
    """

    def __init__(
        self,
        scheduler: Any,
        steps: int,
        device: torch.device,
        channels: int,
        *,
        x0_when_single_step: bool = False,
        family: str = "this pipeline",
    ) -> None:
        name = type(scheduler).__name__
        if name not in SUPPORTED_SCHEDULERS:
            raise ModelLoadError(
                f"{family}: the pipeline's scheduler {name} is not supported by the stateless trajectory; "
                f"supported: {', '.join(SUPPORTED_SCHEDULERS)}. Switch it first, e.g. "
                "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)"
            )
        self.multistep = name == "DPMSolverMultistepScheduler"
        if self.multistep and scheduler.config.algorithm_type not in _DETERMINISTIC_DPM:
            raise ModelLoadError(
                f"{family}: DPMSolverMultistepScheduler with algorithm_type={scheduler.config.algorithm_type!r} "
                f"draws noise at every step; the trajectory supports the deterministic {' / '.join(_DETERMINISTIC_DPM)}"
            )
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        self.scheduler = type(scheduler).from_config(scheduler.config)
        self.scheduler.set_timesteps(steps, device=device)
        self.timesteps = self.scheduler.timesteps
        self.num_steps = len(self.timesteps)
        self.channels = channels
        self.order = int(self.scheduler.config.solver_order) if self.multistep else 1
        self.history = self.order - 1 if self.multistep else 0
        self.x0_when_single_step = x0_when_single_step
        self.init_noise_sigma = float(self.scheduler.init_noise_sigma)

    def carried(self, i: int) -> int:
        """How many previous model outputs the state before step ``i`` carries."""
        return min(i, self.history)

    def step(
        self,
        state: torch.Tensor,
        i: int,
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """One solver step: ``predict(scaled_latent, t)`` must return the model output the scheduler expects."""
        c, k = self.channels, self.carried(i)
        if state.shape[1] != c * (1 + k):
            raise ValueError(
                f"latent state before step {i} has {state.shape[1]} channels; expected {c * (1 + k)} "
                f"({c} latent + {k} x {c} carried solver history)"
            )
        x = state[:, :c]
        sched = self.scheduler
        # Everything the scheduler reads is set here: it never relies on its own counters.
        sched._step_index = i
        if self.multistep:
            previous = list(state[:, c:].split(c, dim=1)) if k else []
            sched.model_outputs = [None] * (self.order - k) + previous
            sched.lower_order_nums = min(i, self.order)
        t = self.timesteps[i]
        model_output = predict(sched.scale_model_input(x, t), t)
        out = sched.step(model_output, t, x, return_dict=False)
        latent = out[0]
        if self.x0_when_single_step and self.num_steps == 1 and len(out) > 1:
            latent = out[1]
        carried = []
        if self.multistep:
            keep = min(i + 1, self.history) if i + 1 < self.num_steps else 0
            carried = sched.model_outputs[len(sched.model_outputs) - keep :] if keep else []
            sched.model_outputs = [None] * self.order  # no reference to this step's graph stays behind
        return torch.cat([latent, *carried], dim=1) if carried else latent


def randn_latents(
    seeds: list[int], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """One ``(1, *shape)`` draw per seed from ``torch.Generator("cpu").manual_seed(seed)``, as the pipelines draw it."""
    from diffusers.utils.torch_utils import randn_tensor

    parts = [
        randn_tensor((1, *shape), generator=torch.Generator(device="cpu").manual_seed(int(s)), device=device, dtype=dtype)
        for s in seeds
    ]
    return torch.cat(parts)


def execution_device(pipe: Any) -> torch.device:
    device = getattr(pipe, "_execution_device", None)
    return device if isinstance(device, torch.device) else pipe.transformer.device


def nonempty(index: torch.Tensor) -> torch.Tensor:
    # A block with no heads (or no neurons) left keeps one zero-folded unit: zero-size layers break attention.
    return index if index.numel() else torch.zeros(1, dtype=torch.long)


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def load_pruned_state(pruned: nn.Module, state: dict[str, torch.Tensor], source: nn.Module) -> nn.Module:
    """Assign ``state`` to a meta-built pruned model; non-persistent buffers (e.g. the patch embedder's
    position table) are not in a state dict, so they are copied from ``source``."""
    pruned.load_state_dict(state, assign=True, strict=True)
    for name, buffer in source.named_buffers():
        if name not in state:
            module, _, attr = name.rpartition(".")
            pruned.get_submodule(module)._buffers[attr] = buffer.clone()
    return pruned.eval()


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
    denoiser_attr = "transformer"
    known_configs = KNOWN_CONFIGS

    def extra_classes(self) -> dict[str, type[nn.Module]]:
        from .pixart_pruned import PrunedPixArtTransformer2DModel

        return {"PrunedPixArtTransformer2DModel": PrunedPixArtTransformer2DModel}

    def sites(self, denoiser: nn.Module) -> list[MaskSite]:
        head_dim = denoiser.config.attention_head_dim
        sites: list[MaskSite] = []
        for i, block in enumerate(denoiser.transformer_blocks):
            p = f"transformer_blocks.{i}"
            for name, stream in (("attn1", "self"), ("attn2", "cross")):
                attn = getattr(block, name, None)
                if attn is None:
                    continue
                width = attn.to_out[0].in_features
                sites.append(MaskSite("heads", f"{p}.{name}.to_out.0", "input", 0, width, head_dim, "block", stream))
            sites.append(MaskSite("neurons", f"{p}.ff.net.2", "input", 0, block.ff.net[2].in_features, 1, "block"))
        adaln = denoiser.adaln_single.linear
        sites.append(MaskSite("norm", "adaln_single.linear", "output", 0, adaln.out_features, 1, "shared"))
        return sites

    # ------------------------------------------------------------------ sampling
    def encode_prompts(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """T5 embeddings and attention masks of ``prompts`` and of the empty negative prompt, one row per prompt."""
        device = execution_device(pipe)
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
    ) -> Trajectory:
        transformer = pipe.transformer
        device = execution_device(pipe)
        multiple = pipe.vae_scale_factor * transformer.config.patch_size
        if resolution <= 0 or resolution % multiple:
            raise ValueError(f"resolution {resolution} must be a positive multiple of {multiple} for this pipeline")
        embeds = encoded["prompt_embeds"]
        mask = encoded["prompt_attention_mask"]
        batch = embeds.shape[0]
        if len(noise_seeds) != batch:
            raise ValueError(f"{len(noise_seeds)} noise seeds for {batch} prompts")
        cfg = guidance_scale > 1.0
        if cfg:
            embeds = torch.cat([encoded["negative_prompt_embeds"], embeds])
            mask = torch.cat([encoded["negative_prompt_attention_mask"], mask])
        channels = transformer.config.in_channels
        is_alpha = type(pipe).__name__.startswith("PixArtAlpha")
        sampler = StatelessSampler(
            pipe.scheduler, steps, device, channels, x0_when_single_step=is_alpha, family="PixArt"
        )
        size = resolution // pipe.vae_scale_factor
        noise = randn_latents(noise_seeds, (channels, size, size), device, embeds.dtype) * sampler.init_noise_sigma

        rows = embeds.shape[0]
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if is_alpha and transformer.config.sample_size == 128:
            added = {
                "resolution": torch.tensor([resolution, resolution]).repeat(rows, 1).to(dtype=embeds.dtype, device=device),
                "aspect_ratio": torch.tensor([1.0]).repeat(rows, 1).to(dtype=embeds.dtype, device=device),
            }
        learned_sigma = transformer.config.out_channels // 2 == channels

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            model_input = torch.cat([x, x]) if cfg else x
            timestep = t[None].to(device).expand(model_input.shape[0])
            out = transformer(
                model_input,
                encoder_hidden_states=embeds,
                encoder_attention_mask=mask,
                timestep=timestep,
                added_cond_kwargs=added,
                return_dict=False,
            )[0]
            if cfg:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            return out.chunk(2, dim=1)[0] if learned_sigma else out

        def step(z: torch.Tensor, i: int) -> torch.Tensor:
            return sampler.step(z, i, predict)

        def decode(z: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                image = pipe.vae.decode(z.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
            return (image.float() / 2 + 0.5).clamp(0, 1)

        return Trajectory(noise=noise, num_steps=sampler.num_steps, step=step, decode=decode)

    # ------------------------------------------------------------------ pruning
    def prune(self, denoiser: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
        """Return a :class:`PrunedPixArtTransformer2DModel` without the dropped heads and neurons.

        ``keep`` maps site keys to boolean keep-masks and must already be zero-folded into
        ``denoiser``. Self- and cross-attention heads are removed independently; a block keeps at
        least one (zeroed) head per attention and one neuron so that its shapes stay valid. The
        shared ``adaln_single.linear`` norm channels cannot be removed (they feed every block's
        shift / scale / gate): they stay zero-folded.
        """
        from .pixart_pruned import PrunedPixArtTransformer2DModel

        head_dim = denoiser.config.attention_head_dim
        state = dict(denoiser.state_dict())

        def kept(key: str, size: int) -> torch.Tensor:
            mask = keep.get(key)
            return torch.arange(size) if mask is None else nonempty(torch.nonzero(mask.cpu()).flatten())

        def rows(name: str, index: torch.Tensor) -> None:
            state[f"{name}.weight"] = state[f"{name}.weight"][index]
            if f"{name}.bias" in state:
                state[f"{name}.bias"] = state[f"{name}.bias"][index]

        def cols(name: str, index: torch.Tensor) -> None:
            state[f"{name}.weight"] = state[f"{name}.weight"][:, index]

        layout: list[list[int]] = []
        for i, block in enumerate(denoiser.transformer_blocks):
            p = f"transformer_blocks.{i}"
            entry = []
            for name in ("attn1", "attn2"):
                attn = getattr(block, name, None)
                if attn is None:
                    entry.append(0)
                    continue
                heads = kept(f"heads/{p}.{name}.to_out.0", attn.to_q.out_features // head_dim)
                ch = head_channels(heads, head_dim)
                for proj in ("to_q", "to_k", "to_v"):
                    rows(f"{p}.{name}.{proj}", ch)
                cols(f"{p}.{name}.to_out.0", ch)
                entry.append(int(heads.numel()))
            ff = kept(f"neurons/{p}.ff.net.2", block.ff.net[2].in_features)
            rows(f"{p}.ff.net.0.proj", ff)
            cols(f"{p}.ff.net.2", ff)
            layout.append(entry + [int(ff.numel())])

        config = {k: v for k, v in denoiser.config.items() if not k.startswith("_") and k != "pruned_layout"}
        config["pruned_layout"] = layout
        with torch.device("meta"):
            pruned = PrunedPixArtTransformer2DModel(**config)
        return load_pruned_state(pruned, state, denoiser)

    def pruned_component_source(self) -> Path:
        return Path(__file__).with_name("pixart_pruned.py")


PIXART = register(PixArtArchitecture())
