"""DiT (``DiTTransformer2DModel`` in ``DiTPipeline``): class-conditional ImageNet mask sites and trajectory.

Units (one ``BasicTransformerBlock`` with ``AdaLayerNormZero`` per layer):

* ``heads`` -- one scalar per self-attention head (input of ``attn1.to_out.0``); DiT has no
  cross-attention (the class enters through the modulation).
* ``neurons`` -- feed-forward hidden units (GELU-tanh, 4 x width) before the down projection
  (input of ``ff.net.2``).
* ``norm`` -- output channels of each block's AdaLN-Zero modulation Linear ``norm1.linear``
  (6 x width: shift / scale / gate of attention and MLP), computed from that block's own
  timestep + class embedding. The final layer's modulation (``proj_out_1``) is not a unit, as
  FLUX's ``norm_out`` is not.

Unit counts of the published configuration (DiT-XL/2: 28 blocks, width 1152, 16 heads x 72,
feed-forward 4608):

=====================  =====  =======  ======  =======
model                  heads  neurons  norm    total
=====================  =====  =======  ======  =======
facebook/DiT-XL-2-256    448   129024  193536   323008
=====================  =====  =======  ======  =======

(heads = 28 x 16; neurons = 28 x 4608; norm = 28 x 6 x 1152.)

Prompts are class names. :meth:`DiTArchitecture.encode_prompts` maps each prompt to an ImageNet
class id: a numeric id (``"207"``), or a class name matched case-insensitively against any of the
comma-separated synonyms of the pipeline's ``id2label`` (``"golden retriever"``, ``"Tabby Cat"``);
the empty prompt is the null class (the unconditional model), so an empty ``concept.anchor`` means
"erase the class towards unconditional samples". Anything else raises
:class:`~erasekit.errors.PromptError` naming close valid names. So erasing a class uses the standard
trainer with ``concept.templates=["{concept}"]`` (the default templates such as
``"a photo of {concept}"`` are not class names and are refused), ``concept.anchor`` another class
(the target), and ``concept.preservation_prompts`` a list of class names; see
``configs/dit-xl-2.yaml``.

Sampling: the pipeline's scheduler made stateless by :class:`~erasekit.arch.samplers.StatelessSampler`
(DDIM, DiT-XL-2's default, and deterministic DPM-Solver multistep, whose history travels in the
latent state). ``DiTPipeline`` does not scale the initial noise by the scheduler's
``init_noise_sigma``, so schedulers that need it (Euler) are refused. Classifier-free guidance is the
pipeline's: conditional rows then null-class rows in one batch, guidance on the epsilon channels
when ``guidance_scale > 1``, learned sigma dropped. DiT generates only at its trained resolution
(``sample_size x`` the VAE factor: 256 for DiT-XL-2-256).

Published config: the ``transformer/config.json`` of ``facebook/DiT-XL-2-256`` as the author knows
it without network access; all values that fix the unit counts (28 layers, 16 heads x 72,
``ada_norm_zero``, GELU-tanh, 1000 classes, sample size 32, patch 2, out channels 8) are sure.
The hub file names the class ``Transformer2DModel``; diffusers loads it as
``DiTTransformer2DModel`` (its class remapping by ``norm_type``), the name bundled here.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError, PromptError
from .base import Architecture, MaskSite, Trajectory, register
from .common import PrunedState, check_seeds, decode_to_unit, numbered_blocks, randn_latents
from .guidance import Guidance, GuidedDenoiser, broadcast_rows, guidance_or_default
from .samplers import StatelessSampler

__all__ = ["DIT", "DiTArchitecture", "KNOWN_CONFIGS", "class_ids", "id2label_of"]

#: Denoiser config of the published DiT checkpoint, so that ``inspect`` works without the hub.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "facebook/DiT-XL-2-256": {
        "_class_name": "DiTTransformer2DModel",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "attention_head_dim": 72,
        "dropout": 0.0,
        "in_channels": 4,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "norm_type": "ada_norm_zero",
        "num_attention_heads": 16,
        "num_embeds_ada_norm": 1000,
        "num_layers": 28,
        "out_channels": 8,
        "patch_size": 2,
        "sample_size": 32,
        "upcast_attention": False,
    },
}

_TEMPLATE_HINT = (
    "DiT is class-conditional: every prompt (concept, anchor / target, preservation) must be an ImageNet "
    "class name or id; for erase set concept.templates=['{concept}'], concept.anchor to another class and "
    "concept.preservation_prompts to class names (see configs/dit-xl-2.yaml)"
)


def _label_table(pipe: Any) -> dict[str, int]:
    # DiTPipeline.labels maps every comma-separated synonym of id2label to its id (later ids win, as there).
    return {name.lower(): int(i) for name, i in (getattr(pipe, "labels", None) or {}).items()}


def class_ids(pipe: Any, prompts: list[str]) -> list[int]:
    """ImageNet class ids of ``prompts`` (names, case-insensitive, or numeric ids; ``""`` is the null class).

    Raises:
        PromptError: a prompt is neither a known class name nor an id in range; the message lists
            close valid names.
    """
    num_classes = int(pipe.transformer.config.num_embeds_ada_norm)
    table = _label_table(pipe)
    ids = []
    for prompt in prompts:
        text = re.sub(r"\s+", " ", prompt).strip()
        if text == "":
            ids.append(num_classes)  # the null class: the unconditional model
            continue
        if re.fullmatch(r"\d+", text):
            value = int(text)
            if value >= num_classes:
                raise PromptError(f"class id {value} is out of range: this DiT has classes 0..{num_classes - 1}")
            ids.append(value)
            continue
        if text.lower() in table:
            ids.append(table[text.lower()])
            continue
        if not table:
            raise PromptError(
                f"prompt {prompt!r} is not a class id, and this DiT pipeline has no id2label names; "
                f"use numeric class ids 0..{num_classes - 1}"
            )
        close = difflib.get_close_matches(text.lower(), list(table), n=5, cutoff=0.5)
        examples = close or sorted(table)[:5]
        raise PromptError(
            f"prompt {prompt!r} is not a class of this DiT ({'closest names' if close else 'e.g.'}: "
            f"{', '.join(repr(n) for n in examples)}; or a class id 0..{num_classes - 1}). {_TEMPLATE_HINT}"
        )
    return ids


def id2label_of(pipe: Any) -> dict[int, str]:
    """The ``id2label`` mapping behind ``pipe.labels`` (synonyms joined with ", "), e.g. to save it again.

    ``DiTPipeline.save_pretrained`` drops ``id2label`` unless it is registered in the pipeline config;
    ``pipe.register_to_config(id2label=id2label_of(pipe))`` keeps class names in a saved folder.
    """
    grouped: dict[int, list[str]] = {}
    for name, i in (getattr(pipe, "labels", None) or {}).items():
        grouped.setdefault(int(i), []).append(name)
    return {i: ", ".join(names) for i, names in sorted(grouped.items())}


class DiTArchitecture(Architecture):
    """DiT transformers (any sizes) in ``DiTPipeline``."""

    family = "dit"
    denoiser_classes = ("DiTTransformer2DModel", "PrunedDiTTransformer2DModel")
    known_configs = KNOWN_CONFIGS
    pruned_module = "dit_pruned"
    #: class-conditioned: no text, so no text-conditioning modules
    text_conditioned = False

    def before_save(self, pipe: Any) -> None:
        # DiTPipeline.save_pretrained keeps class names only when id2label is in the pipeline config.
        if getattr(pipe, "labels", None) and "id2label" not in pipe.config:
            pipe.register_to_config(id2label=id2label_of(pipe))

    def sites(self, denoiser: nn.Module) -> list[MaskSite]:
        head_dim = denoiser.config.attention_head_dim
        sites: list[MaskSite] = []
        for p, block in numbered_blocks(denoiser):
            sites += [
                MaskSite("norm", f"{p}.norm1.linear", "output", 0, block.norm1.linear.out_features, 1, "block"),
                MaskSite(
                    "heads", f"{p}.attn1.to_out.0", "input", 0, block.attn1.to_out[0].in_features, head_dim, "block"
                ),
                MaskSite("neurons", f"{p}.ff.net.2", "input", 0, block.ff.net[2].in_features, 1, "block"),
            ]
        return sites

    # ------------------------------------------------------------------ sampling
    def encode_prompts(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """``{"class_labels": (B,) int64}``: see :func:`class_ids` (``max_sequence_length`` is unused)."""
        ids = class_ids(pipe, prompts)
        return {"class_labels": torch.tensor(ids, dtype=torch.long, device=self.execution_device(pipe))}

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
        size = int(transformer.config.sample_size)
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if resolution != size * factor:
            raise ConfigError(
                f"DiT generates only at its trained resolution: {size * factor} px for this model, got "
                f"{resolution}; set sampling.resolution={size * factor}"
            )
        labels = encoded["class_labels"].to(device)
        check_seeds(noise_seeds, labels.shape[0])
        channels = transformer.config.in_channels
        out_channels = transformer.config.out_channels or channels
        if out_channels not in (channels, 2 * channels):
            raise ModelLoadError(
                f"DiT with {out_channels} output channels for {channels} latent channels is not supported"
            )
        sampler = StatelessSampler(pipe.scheduler, steps, device, channels, family="DiT")
        if sampler.init_noise_sigma != 1.0:
            raise ModelLoadError(
                f"DiTPipeline does not scale its initial noise by the scheduler's init_noise_sigma "
                f"({sampler.init_noise_sigma:g} for {type(pipe.scheduler).__name__}), "
                "so that scheduler does not sample "
                "correctly with DiT; use DDIMScheduler or DPMSolverMultistepScheduler"
            )
        noise = randn_latents(noise_seeds, (channels, size, size), device, transformer.dtype)
        cfg = guidance_scale > 1
        batch = labels.shape[0]
        null = torch.full_like(labels, int(transformer.config.num_embeds_ada_norm))

        def condition(role: str, g: Guidance) -> dict[str, Any]:
            # the unconditional rows are the null class; another role brings its own class labels
            if role == "cond":
                return {"labels": labels}
            if role == "uncond":
                return {"labels": null}
            return {"labels": broadcast_rows(g.encodings[role]["class_labels"].to(device), batch)}

        def call(rows: torch.Tensor, t: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
            timestep = t[None].to(device).expand(rows.shape[0])
            out = transformer(rows, timestep=timestep, class_labels=c["labels"], return_dict=False)[0]
            return out[:, :channels]  # learned sigma dropped: the epsilon channels drive the sampler

        # DiTPipeline puts the conditional rows first
        guided = GuidedDenoiser(
            guidance_or_default(guidance, cfg, guidance_scale),
            condition,
            call,
            cond_first=True,
            family=self.family,
        )

        def step(z: torch.Tensor, i: int) -> torch.Tensor:
            return sampler.step(z, i, lambda x, t: guided(x, t, i))

        def predict(z: torch.Tensor, i: int, guidance: Guidance | None = None) -> torch.Tensor:
            x, t = sampler.model_input(z, i)
            return guided(x, t, i, guidance)

        def decode(z: torch.Tensor) -> torch.Tensor:
            return decode_to_unit(pipe.vae, 1 / pipe.vae.config.scaling_factor * z)

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
        """Return a :class:`PrunedDiTTransformer2DModel` without the dropped heads and neurons.

        ``keep`` must already be zero-folded into ``denoiser``. A block keeps at least one (zeroed)
        head and neuron so that its shapes stay valid. ``norm1.linear`` channels cannot be removed
        (they are split into shift / scale / gate): they stay zero-folded.
        """
        head_dim = denoiser.config.attention_head_dim
        cut = PrunedState(denoiser, keep)
        layout = [
            [cut.attention(f"{p}.attn1", block.attn1, head_dim), cut.feed_forward(f"{p}.ff", block.ff)]
            for p, block in numbered_blocks(denoiser)
        ]
        return cut.build(self.pruned_class(), layout).eval()


DIT = register(DiTArchitecture())
