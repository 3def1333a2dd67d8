"""``uce``: Unified Concept Editing wired as a method -- the closed form of :mod:`.kernels` on the projections
that read the text conditioning, with inputs read from the model itself.

Which projections: the family's layers that see the text encoder's output directly. Where the family has a
``context`` projection (FLUX, SD3: ``context_embedder``, plus the ``pooled`` text projection) those, which is
what the official FLUX script edits and the only place a closed form is exact there (the joint blocks'
``add_k/v_proj`` read the output of earlier blocks). Elsewhere (UNet, PixArt) the cross-attention's
``key_value`` projections ``attn2.to_k/to_v``, as the paper. ``uce.kinds`` overrides the choice.

Which inputs: what each projection receives for the concept prompts, read with forward pre-hooks on one
denoiser step (:func:`erasekit.arch.capture_layer_inputs`: PixArt's keys read the caption projection's
output, not T5's), prompt by prompt, every token position of the sequence, each mapped to the value the
same position of the prompt's anchor (target) prompt gets: ``v* = W c_target``. The official code keeps
one vector per concept, the last word's token (its older code, every token from the last word on). We
keep every position because the tokens after the concept carry it too and are read by the model: CLIP is
causal, so EOS and the padding that SD's unmasked cross-attention reads summarise the concept; T5 is
bidirectional, so every token of the prompt does; and a sequence-wide rule needs no per-tokenizer index
(SD3's sequence is CLIP's tokens then T5's). Positions where the prompt's attention mask is 0 (PixArt) are
never read by the model and are left out. Preservation prompts keep their values, every position, at
``uce.preserve_scale``. Several concepts (``uce.concepts``) are edited at once, in one solve.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ...arch import architecture_for, capture_layer_inputs, denoiser_of
from ...config import EraseConfig, UCEConfig
from ...data import build_concept_prompts
from ...errors import ConfigError
from ..base import Method, peak_memory_bytes, register_method
from ..weights import WeightEditErasure, erasure_record
from .kernels import uce_edit, uce_targets

CHANGES = "text-conditioning projections edited in closed form"
_KINDS = ("key_value", "context", "pooled")


class UCEErasure(WeightEditErasure):
    """The projections' edited weights (see :class:`~erasekit.methods.weights.WeightEditErasure`)."""

    method = "uce"


def default_kinds(text_conditioning_kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The projections UCE edits on a family with these kinds: the raw-text ones (context, pooled) where
    the family has them, else the cross-attention keys and values."""
    if "context" in text_conditioning_kinds:
        return tuple(k for k in ("context", "pooled") if k in text_conditioning_kinds)
    return ("key_value",)


def concept_pairs(config: EraseConfig) -> tuple[list[str], list[str], list[str]]:
    """The concept prompts, their target (anchor) prompts, and the preservation prompts.

    The concepts of ``config.concept`` (``concept`` and ``more_concepts``, each to its anchor) come as every
    method builds them; each concept of ``uce.concepts`` (the older way to name more) is put through the
    same templates (or used bare where there are none) with ``concept.anchor``.
    """
    prompts = build_concept_prompts(config.concept)
    concepts, targets = list(prompts.concept), list(prompts.target)
    for extra in config.uce.concepts:
        cfg = replace(
            config.concept,
            concept=extra,
            more_concepts=[],
            more_anchors=[],
            synonyms=[],
            prompts=[] if config.concept.templates else [extra],
            target_prompts=[] if config.concept.templates else [config.concept.anchor.strip() or extra],
        )
        more = build_concept_prompts(cfg)
        concepts += more.concept
        targets += more.target
    return concepts, targets, list(prompts.preservation)


def _read_inputs(
    pipe: Any, prompts: list[str], layers: list[str], config: EraseConfig
) -> dict[str, list[torch.Tensor]]:
    """Per layer, one tensor per prompt: what the layer reads, ``(positions, in_features)`` (masked-out
    positions dropped) or ``(1, in_features)`` for a pooled projection."""
    arch, _ = denoiser_of(pipe)
    s = config.sampling
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    size = config.uce.batch_size
    for start in range(0, len(prompts), size):
        chunk = prompts[start : start + size]
        encoded = arch.encode_prompts(pipe, chunk, s.max_sequence_length)
        # guidance_scale 1: the conditional rows alone, one per prompt (the text inputs do not depend on it)
        captured = capture_layer_inputs(
            pipe,
            encoded,
            layers,
            resolution=s.resolution,
            steps=s.steps,
            step_indices=[0],
            seeds=[0] * len(chunk),
            guidance_scale=1.0,
        )
        mask = encoded.get("prompt_attention_mask")
        for name in layers:
            x = captured[name][0]
            if x.shape[0] != len(chunk):
                raise ConfigError(f"{name} read {x.shape[0]} rows for {len(chunk)} prompts; UCE cannot pair them")
            for i in range(len(chunk)):
                row = x[i]
                if row.dim() == 1:
                    rows[name].append(row.unsqueeze(0))
                elif mask is not None and mask.shape[-1] == row.shape[0]:
                    rows[name].append(row[mask[i].bool().to(row.device)])
                else:
                    rows[name].append(row.reshape(-1, row.shape[-1]))
    return rows


def _paired(concept: list[torch.Tensor], target: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Position-aligned rows of concept and target prompts (the shorter one's length per pair)."""
    cs, ts = [], []
    for c, t in zip(concept, target, strict=True):
        n = min(c.shape[0], t.shape[0])
        cs.append(c[:n])
        ts.append(t[:n])
    return torch.cat(cs), torch.cat(ts)


@register_method
class UCEMethod(Method):
    """Unified Concept Editing (Gandikota et al., WACV 2024): training-free, seconds."""

    name = "uce"
    config_class = UCEConfig
    section = "uce"
    erasure_class = UCEErasure
    trains = False
    needs_cfg = False
    changes = CHANGES
    several_concepts = True
    families = ("flux", "pixart", "sd3", "unet")
    summary = "unified concept editing: a closed-form edit of the text-conditioning projections"

    def validate(self, config: EraseConfig) -> None:
        u = config.uce
        if not u.lam >= 0:
            raise ConfigError(f"uce.lam must be >= 0, got {u.lam}")
        if not (u.erase_scale >= 0 and u.preserve_scale >= 0):
            raise ConfigError(
                f"uce.erase_scale and uce.preserve_scale must be >= 0, got {u.erase_scale}, {u.preserve_scale}"
            )
        if u.batch_size < 1:
            raise ConfigError(f"uce.batch_size must be >= 1, got {u.batch_size}")
        unknown = [k for k in u.kinds if k not in _KINDS]
        if unknown:
            raise ConfigError(f"uce.kinds: unknown kind {unknown[0]!r}; use {', '.join(_KINDS)}")
        if any(not c.strip() for c in u.concepts):
            raise ConfigError("uce.concepts has an empty concept")
        concept_pairs(config)  # bad prompts fail before any weights are loaded

    def layers(self, pipe: Any, config: EraseConfig) -> dict[str, torch.nn.Linear]:
        """The Linear layers this fit edits, by module path."""
        arch, denoiser = denoiser_of(pipe)
        kinds = tuple(config.uce.kinds) or default_kinds(arch.text_conditioning_kinds)
        found = arch.text_conditioning_modules(denoiser, kinds=kinds)
        if not found:
            raise ConfigError(f"{arch.family} has no text-conditioning modules of kind {', '.join(kinds)}")
        return found

    def edits(self, pipe: Any, config: EraseConfig) -> dict[str, torch.Tensor]:
        """The edited weights, ``{parameter name: W'}``, of every layer :meth:`layers` names."""
        u = config.uce
        concepts, targets, preserve = concept_pairs(config)
        layers = self.layers(pipe, config)
        names = list(layers)
        read = _read_inputs(pipe, concepts + targets + preserve, names, config)
        n_c, n_t = len(concepts), len(targets)
        edits = {}
        for name, module in layers.items():
            rows = read[name]
            c_e, c_guide = _paired(rows[:n_c], rows[n_c : n_c + n_t])
            c_p = torch.cat(rows[n_c + n_t :]) if preserve else None
            weight = module.weight
            edits[f"{name}.weight"] = uce_edit(
                weight,
                c_e,
                uce_targets(weight, c_guide),
                c_p,
                lam=u.lam,
                erase_scale=u.erase_scale,
                preserve_scale=u.preserve_scale,
            )
        return edits

    def fit(
        self,
        pipe: Any,
        config: EraseConfig,
        output: str | Path,
        *,
        accelerator: Any = None,
        resume: bool = False,
        stop_after: int | None = None,
        model_id: str | None = None,
    ) -> UCEErasure:
        started = time.perf_counter()
        self.validate(config)
        arch = architecture_for(pipe)
        self.check_family(arch)
        _, denoiser = denoiser_of(pipe)
        edits = self.edits(pipe, config)
        seconds = time.perf_counter() - started
        record = erasure_record(
            self.name,
            config,
            denoiser,
            arch.family,
            model_id=model_id,
            changes=CHANGES,
            seconds=seconds,
            peak_memory_bytes=peak_memory_bytes(arch.execution_device(pipe)),
        )
        record["concepts"] = [*record["concepts"], *config.uce.concepts]
        record["modules"] = sorted(name.removesuffix(".weight") for name in edits)
        erasure = UCEErasure.from_edits(denoiser, edits, record)
        assert isinstance(erasure, UCEErasure)
        # training-free: under `accelerate launch` every process computes the same edit, one writes it
        if accelerator is None or accelerator.is_main_process:
            erasure.save(output)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return erasure


__all__ = ["CHANGES", "UCEErasure", "UCEMethod", "concept_pairs", "default_kinds"]
