"""``concept-prune``: ConceptPrune (Chavhan et al., 2024) wired as an erasure method.

Training-free. The units are the mask's own feed-forward ``neurons`` sites (the inputs of each
family's feed-forward down projection: ``ff.net.2``, FLUX's ``ff_context.net.2`` and the MLP columns
of its single blocks' ``proj_out``), so the result *is* a mask: a ``masks.safetensors`` whose pruned
neurons have a negative logit, applied by the mask's hooks and folded by ``erasekit fold --mode zero``
or ``--mode prune``.

For each of the first ``concept_prune.timesteps`` denoising steps, the squared inputs of every
down projection are summed over all tokens (and guidance rows) of the concept prompts, and separately
of the base prompts (by default each concept prompt's own anchor prompt, from the same noise, as the
official code pairs them; or the preservation prompts). A neuron's WANDA score is the norm of its input
times the sum of its weight column's magnitudes (:func:`~erasekit.methods.concept_prune.kernels.neuron_scores`);
per step and layer the top ``top_share`` of the neurons that score higher on the concept than on the
base are skilled, and the union over the steps is pruned
(:func:`~erasekit.methods.concept_prune.kernels.skilled_neurons`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...arch import count_units, denoiser_of
from ...arch.base import MaskSite
from ...arch.samplers import set_scheduler
from ...config import ConceptPruneConfig, EraseConfig, config_to_dict
from ...data import build_concept_prompts
from ...errors import ConfigError
from ...outputs import check_output
from ..base import Method, base_model_record, concept_fields, peak_memory_bytes, register_method
from ..mask.method import MaskErasure
from .kernels import InputNormRecorder, neuron_scores, skilled_neurons

CHANGES = "mask over feed-forward neurons"
#: The logits written for kept and pruned neurons (a unit is kept where its logit is > 0; the value is
#: the mask's initial logit, so that a ConceptPrune mask can seed a mask training run unchanged).
KEPT_LOGIT, PRUNED_LOGIT = 3.0, -3.0
#: Scoring noise seeds lie below this, as the mask's training seeds do (the ShapesCanvas protocol's
#: evaluation images are seeded from 900_000 up).
SCORING_NOISE_SEEDS = 900_000


class ConceptPruneErasure(MaskErasure):
    """A ConceptPrune result: a binary mask over feed-forward neurons (everything else is the mask's)."""

    method = "concept-prune"
    legacy_record = None  # the mask's older folders are masks, never ConceptPrune results

    def changed_text(self) -> str:
        return f"{self.masked_fraction:.2%} of feed-forward neurons pruned"


def neuron_sites(arch: Any, denoiser: torch.nn.Module) -> list[MaskSite]:
    """The feed-forward ``neurons`` sites of a denoiser, in module order (the units ConceptPrune scores)."""
    return [s for s in arch.sites(denoiser) if s.kind == "neurons"]


def scoring_steps(config: EraseConfig) -> tuple[int, int]:
    """``(trajectory steps, scored steps)``: the trajectory the erasure is used with (the generation
    steps where set, else ``sampling.steps``) and the first ``concept_prune.timesteps`` of it."""
    steps = config.sampling.generation_steps or config.sampling.steps
    return steps, min(config.concept_prune.timesteps, steps)


def record_input_norms(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    layers: dict[str, torch.nn.Linear],
    config: EraseConfig,
) -> list[dict[str, torch.Tensor]]:
    """Per scored step, ``||X_j||`` of every layer's input features over all rows and tokens of ``prompts``.

    Each prompt is denoised from its own noise seed on the erasure's trajectory (guidance as in
    generation); the inputs of step ``i`` are those the layer receives while the latent before step
    ``i`` is denoised.
    """
    arch, _ = denoiser_of(pipe)
    s = config.sampling
    steps, scored = scoring_steps(config)
    recorders = [InputNormRecorder(layers) for _ in range(scored)]
    batch = config.concept_prune.batch_size
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            chunk = list(prompts[start : start + batch])
            encoded = arch.encode_prompts(pipe, chunk, s.max_sequence_length)
            trajectory = arch.trajectory(
                pipe,
                encoded,
                list(seeds[start : start + batch]),
                steps=steps,
                resolution=s.resolution,
                guidance_scale=s.guidance_scale,
            )
            z = trajectory.noise
            for i, recorder in enumerate(recorders):
                with recorder:  # one recorder per step accumulates over the batches
                    z = trajectory.step(z, i)
    norms = [recorder.norms() for recorder in recorders]
    for i, step in enumerate(norms):
        missing = [name for name in layers if name not in step]
        if missing:
            raise ConfigError(f"layer {missing[0]} was not called at step {i} of the trajectory")
    return norms


def concept_prune_logits(
    sites: Sequence[MaskSite],
    layers: dict[str, torch.nn.Linear],
    concept_norms: Sequence[dict[str, torch.Tensor]],
    base_norms: Sequence[dict[str, torch.Tensor]],
    top_share: float,
) -> dict[str, torch.Tensor]:
    """The mask logits (``KEPT_LOGIT`` / ``PRUNED_LOGIT``) per neuron site from the recorded input norms.

    A site covers input channels ``[start, stop)`` of its layer (FLUX's single blocks: the MLP columns of
    ``proj_out``); a neuron's score uses its own weight column and input norm only.
    """
    logits: dict[str, torch.Tensor] = {}
    for site in sites:
        weight = layers[site.module].weight[:, site.start : site.stop]
        channels = slice(site.start, site.stop)
        concept = [neuron_scores(weight, step[site.module][channels]) for step in concept_norms]
        base = [neuron_scores(weight, step[site.module][channels]) for step in base_norms]
        keep = skilled_neurons(concept, base, top_share)
        logits[site.key] = torch.where(keep, KEPT_LOGIT, PRUNED_LOGIT).to(torch.float32).cpu()
    return logits


@register_method
class ConceptPruneMethod(Method):
    """ConceptPrune: prune the feed-forward neurons skilled at the concept, found by WANDA scores on
    concept vs base prompts over the first denoising steps; training-free, writes a mask."""

    name = "concept-prune"
    config_class = ConceptPruneConfig
    section = "concept_prune"
    erasure_class = ConceptPruneErasure
    trains = False
    needs_cfg = False
    changes = CHANGES
    several_concepts = True
    families = ("dit", "flux", "pixart", "sd3", "unet")
    summary = "ConceptPrune: training-free pruning of the feed-forward neurons skilled at the concept (WANDA)"

    def validate(self, config: EraseConfig) -> None:
        build_concept_prompts(config.concept)  # fail on bad prompts before loading any weights
        settings = config.concept_prune
        if not 0.0 < settings.top_share <= 1.0:
            raise ConfigError(f"concept_prune.top_share must be in (0, 1], got {settings.top_share}")
        if settings.timesteps < 1:
            raise ConfigError(f"concept_prune.timesteps must be at least 1, got {settings.timesteps}")
        if settings.batch_size < 1:
            raise ConfigError(f"concept_prune.batch_size must be at least 1, got {settings.batch_size}")

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
    ) -> ConceptPruneErasure:
        """Score, prune and write the mask artefact to ``output`` (``resume``/``stop_after``: nothing to resume)."""
        started = time.perf_counter()
        output = check_output(output)
        self.validate(config)
        settings = config.concept_prune
        arch, denoiser = denoiser_of(pipe)
        self.check_family(arch)
        set_scheduler(pipe, config.sampling.scheduler)
        prompts = build_concept_prompts(config.concept)
        base_prompts = prompts.target if settings.base == "anchor" else prompts.preservation
        sites = neuron_sites(arch, denoiser)
        layers = {s.module: denoiser.get_submodule(s.module) for s in sites}
        # paired prompts share their noise: concept prompt k and its anchor prompt k start alike
        seeds = [(settings.seed * 100_003 + k) % SCORING_NOISE_SEEDS for k in range(len(prompts.concept))]
        base_seeds = (
            seeds
            if settings.base == "anchor"
            else [(settings.seed * 100_003 + len(seeds) + k) % SCORING_NOISE_SEEDS for k in range(len(base_prompts))]
        )
        try:
            concept_norms = record_input_norms(pipe, prompts.concept, seeds, layers, config)
            base_norms = record_input_norms(pipe, base_prompts, base_seeds, layers, config)
        except ValueError as exc:  # the trajectory refuses settings this model cannot sample with
            raise ConfigError(f"sampling settings: {exc}") from None
        logits = concept_prune_logits(sites, layers, concept_norms, base_norms, settings.top_share)
        masked = sum(int((v <= 0).sum()) for v in logits.values())
        total = sum(v.numel() for v in logits.values())
        steps, scored = scoring_steps(config)
        record = {
            "method": self.name,
            "family": arch.family,
            "unit_kinds": ["neurons"],
            "units": count_units(sites)["per_kind"],
            "base_model": base_model_record(denoiser, model_id or config.model.id, config.model.revision),
            **concept_fields(config),
            "settings": config_to_dict(config),
            "scoring": {
                "trajectory_steps": steps,
                "scored_steps": scored,
                "concept_prompts": len(prompts.concept),
                "base_prompts": len(base_prompts),
                "base": settings.base,
            },
            "masked": {"neurons": {"masked": masked, "total": total}},
        }
        device = next(denoiser.parameters()).device
        record["cost"] = {
            "changes": CHANGES,
            "seconds": round(time.perf_counter() - started, 3),
            "peak_memory_bytes": peak_memory_bytes(device),
        }
        erasure = ConceptPruneErasure(logits, record)
        erasure.save(output)
        return erasure


__all__ = [
    "CHANGES",
    "ConceptPruneErasure",
    "ConceptPruneMethod",
    "concept_prune_logits",
    "neuron_sites",
    "record_input_norms",
    "scoring_steps",
]
