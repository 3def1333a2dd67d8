"""The mask trainer: the trajectory loss and its checkpointed gradients (the run's life-cycle: training.run)."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ...arch import count_units, select_sites
from ...arch.samplers import run_trajectory, set_scheduler
from ...config import UNIT_KINDS, EraseConfig, config_to_dict
from ...data import build_concept_prompts
from ...errors import ConfigError, TrainingDivergedError
from ...pipeline import denoiser_of
from ...training.adversarial import adversarial_conditioning
from ...training.gradient import checkpointed_gradient, naive_gradient
from ...training.run import PromptEncoder, TrainingRun, freeze, training_noise_seed, validate_run_config
from ..base import base_model_record, concept_fields, peak_memory_bytes
from .artifact import write_mask_files
from .model import MaskedModel, fraction_of
from .parameterization import MaskSettings

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished training run produced."""

    output: Path
    logits: dict[str, torch.Tensor]
    masked_fraction: float
    iterations: int
    seconds: float
    masked_units: dict[str, dict[str, int]]
    """Per unit kind: ``{"masked": n, "total": N}``."""


def distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample mean squared (``mse``) or absolute (``l1``) distance, float32."""
    diff = a.float() - b.float()
    per = diff.pow(2) if kind == "mse" else diff.abs()
    return per.flatten(1).mean(1)


class MaskTrainer:
    """Learns a sparse mask that erases ``config.concept`` from ``pipe`` (the method: docs/design.md, section 1).

    Args:
        pipe: a loaded diffusers pipeline of a supported family, on ``accelerator.device``.
        config: the resolved configuration.
        output: the mask artefact folder to create (must not exist).
        accelerator: shared with the caller (who placed the pipeline on its device).
        model_id: recorded in the artefact (defaults to ``config.model.id``).
    """

    def __init__(
        self,
        pipe: Any,
        config: EraseConfig,
        output: str | Path,
        accelerator: Accelerator,
        model_id: str | None = None,
    ) -> None:
        self.pipe, self.config, self.accelerator = pipe, config, accelerator
        self.output = Path(output)
        self.run = TrainingRun(config, self.output, accelerator)
        self.staging = self.run.staging
        self.model_id = model_id or config.model.id
        self.arch, self.denoiser = denoiser_of(pipe)
        set_scheduler(pipe, config.sampling.scheduler)
        self.prompts = build_concept_prompts(config.concept)
        validate_training_config(config)
        self._check_sampling()
        selection = {
            k: (getattr(config.mask, k).enabled, getattr(config.mask, k).include, getattr(config.mask, k).exclude)
            for k in UNIT_KINDS
        }
        self.sites = select_sites(self.arch.sites(self.denoiser), selection)
        if not self.sites:
            raise ConfigError(
                "no mask units selected: enable mask.heads, mask.neurons or mask.norm, or widen its include regex"
            )
        freeze(pipe)  # only the mask logits learn

    # ------------------------------------------------------------------ helpers
    def _check_sampling(self) -> None:
        """Set up one trajectory (no model evaluation) so that settings this model cannot sample with fail now."""
        s = self.config.sampling
        encoded = self.arch.encode_prompts(self.pipe, self.prompts.concept[:1], s.max_sequence_length)
        try:
            self.arch.trajectory(
                self.pipe, encoded, [0], steps=s.steps, resolution=s.resolution, guidance_scale=s.guidance_scale
            )
        except ValueError as exc:
            raise ConfigError(f"sampling settings: {exc}") from None

    def _noise_seed(self, index: int, stream: int, prompts: int) -> int:
        """Noise seed of training sample ``index`` (stream 0: concept rows, 1: preservation rows, of
        ``prompts`` prompts drawn in turn), in ``[0, TRAINING_NOISE_SEEDS)``. With ``train.noise_pool`` N,
        the prompt of sample ``index`` gets the same N seeds in turn, one per pass over the prompts."""
        pool = self.config.train.noise_pool
        if pool:
            index = (index % prompts) * pool + (index // prompts) % pool
        return training_noise_seed(self.config.train.seed, index, stream, streams=2)

    def _build_mask(self) -> MaskedModel:
        m = self.config.mask
        settings = MaskSettings(m.parameterization, m.temperature, m.gamma, m.zeta, m.straight_through)
        masked = MaskedModel(self.denoiser, self.sites, settings, init_lambda=m.init_lambda)
        masked.set_mode("train")
        return masked.install()

    # ------------------------------------------------------------------ training
    def fit(
        self, resume: bool = False, stop_after: int | None = None, on_step: Callable[[int], None] | None = None
    ) -> TrainResult:
        """Train, then write the artefact to ``output`` (atomically, main process only).

        Args:
            resume: continue the interrupted run in ``<output>.incomplete`` from its last checkpoint.
            stop_after: stop (without writing the artefact) after this many optimiser steps, leaving
                the staging folder and its checkpoints for a later ``resume`` (used by tests).
            on_step: called with the step number after each optimiser step.
        """
        cfg, acc, run = self.config, self.accelerator, self.run
        run.check_start(resume)
        started = time.perf_counter()
        masked = self._build_mask()
        try:
            params = list(masked.logits)
            groups = [
                {"params": ps, "lr": getattr(cfg.mask, kind).lr, "name": kind}
                for kind, ps in masked.parameters_by_kind().items()
            ]
            optimizer = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
            scheduler = run.schedule(optimizer)
            start = 0
            if resume:
                start, logits = run.restore(optimizer, scheduler)
                masked.load_logits(logits)
            run.begin(start)
            self._loop(masked, params, optimizer, scheduler, start, stop_after, on_step)
        except BaseException as exc:
            run.abort(exc)
            raise
        finally:
            masked.remove()
            run.finish_trackers()
        finished = stop_after is None or stop_after >= cfg.train.iterations
        if finished and cfg.mask.final_threshold:
            masked.shift_logits(-cfg.mask.final_threshold)
        logits = masked.logits_dict()
        counts = masked.masked_counts()
        fraction = fraction_of(counts)
        seconds = time.perf_counter() - started
        if not finished:
            return TrainResult(self.staging, logits, fraction, stop_after, seconds, counts)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._write_artifact(masked, seconds, counts)
        acc.wait_for_everyone()
        return TrainResult(self.output, logits, fraction, cfg.train.iterations, seconds, counts)

    def _loop(
        self,
        masked: MaskedModel,
        params: list[torch.nn.Parameter],
        optimizer: Any,
        scheduler: Any,
        start: int,
        stop_after: int | None,
        on_step: Callable[[int], None] | None,
    ) -> None:
        cfg, acc = self.config, self.accelerator
        rank, world = acc.process_index, acc.num_processes
        b, accum, steps = cfg.train.batch_size, cfg.train.gradient_accumulation, cfg.sampling.steps
        pb = cfg.train.preservation_batch_size or b
        order_c = list(range(len(self.prompts.concept)))
        order_p = list(range(len(self.prompts.preservation)))
        shuffle = random.Random(cfg.train.seed)
        shuffle.shuffle(order_c)
        shuffle.shuffle(order_p)
        encode = PromptEncoder(self.arch, self.pipe, cfg.sampling.max_sequence_length)
        sample = dict(steps=steps, resolution=cfg.sampling.resolution, guidance_scale=cfg.sampling.guidance_scale)
        end = cfg.train.iterations if stop_after is None else min(stop_after, cfg.train.iterations)
        gradient = checkpointed_gradient if cfg.train.gradient_checkpointing else naive_gradient
        intermediate = cfg.loss.intermediate_preservation if steps > 1 else 0.0
        intermediate_erase = cfg.loss.intermediate_erasure if steps > 1 else 0.0
        eta = cfg.loss.negative_guidance
        attack_steps = cfg.train.adversarial.steps
        # the original model's trajectories of a reference batch (its prompts and seeds), with train.noise_pool
        reference_paths: dict[tuple[tuple[str, ...], tuple[int, ...]], list[torch.Tensor]] = {}

        def numbered(k: int, size: int) -> list[int]:
            """Global numbers of this process's ``size`` samples of micro-step ``k`` (prompt rows and noise seeds)."""
            return [k * size * world + rank * size + j for j in range(size)]

        with self.run.progress(start) as bar:
            for step in range(start, end):
                grads = [torch.zeros_like(p) for p in params]
                terms = torch.zeros(2, dtype=torch.float64)
                for micro in range(accum):
                    k = step * accum + micro
                    index, keep_index = numbered(k, b), numbered(k, pb)
                    concept_rows = [order_c[i % len(order_c)] for i in index]
                    keep_rows = [order_p[i % len(order_p)] for i in keep_index]
                    prompts = [self.prompts.concept[r] for r in concept_rows] + [
                        self.prompts.preservation[r] for r in keep_rows
                    ]
                    targets = [self.prompts.target[r] for r in concept_rows] + [
                        self.prompts.preservation[r] for r in keep_rows
                    ]
                    seeds = [self._noise_seed(i, 0, len(order_c)) for i in index] + [
                        self._noise_seed(i, 1, len(order_p)) for i in keep_index
                    ]
                    # one hard-concrete sample per trajectory, identical on every process
                    masked.resample_noise(torch.Generator().manual_seed(cfg.train.seed * 7919 + k))
                    # negative guidance and the inner attack need the concept prompts' original latents: they
                    # ride in the targets' batch
                    originals = prompts[:b] if eta or attack_steps else []
                    reference_prompts, reference_seeds = targets + originals, seeds + seeds[: len(originals)]
                    reference_rows = (tuple(reference_prompts), tuple(reference_seeds))
                    path = reference_paths.get(reference_rows)
                    if path is None:
                        with masked.disabled():
                            reference = self.arch.trajectory(
                                self.pipe, encode(reference_prompts), reference_seeds, **sample
                            )
                            path = run_trajectory(
                                reference.step,
                                reference.noise,
                                steps,
                                keep=intermediate > 0 or intermediate_erase > 0 or attack_steps > 0,
                            )
                        if cfg.train.noise_pool:
                            # the same prompts and seeds come back every noise_pool passes over the prompts
                            reference_paths[reference_rows] = path
                    goal = aim(path[-1], len(targets), b, eta)
                    encoded = encode(prompts)
                    if attack_steps:
                        encoded = self._attack(masked, encoded, path, len(targets), b, seeds[:b], sample, k)
                    trajectory = self.arch.trajectory(self.pipe, encoded, seeds, **sample)
                    parts: dict[str, torch.Tensor] = {"steps": torch.zeros(()), "erase_steps": torch.zeros(())}

                    # this iteration's goal, parts and path are bound as defaults (the closures run within it)
                    def loss_fn(
                        z: torch.Tensor, goal: torch.Tensor = goal, parts: dict[str, torch.Tensor] = parts
                    ) -> torch.Tensor:
                        per_sample = distance(z, goal, cfg.loss.distance)
                        parts["erase"], parts["preserve"] = per_sample[:b].mean(), per_sample[b:].mean()
                        return cfg.loss.erase_weight * parts["erase"] + cfg.loss.preserve_weight * parts["preserve"]

                    def step_loss(
                        i: int,
                        z: torch.Tensor,
                        path: list[torch.Tensor] = path,
                        parts: dict[str, torch.Tensor] = parts,
                        n_targets: int = len(targets),
                    ) -> torch.Tensor:
                        # after step i: the preservation rows against the original model's latents from the
                        # same noise, the concept rows against their (aimed) targets'
                        total = torch.zeros(())
                        if intermediate:
                            term = (
                                intermediate
                                / (steps - 1)
                                * distance(z[b:], path[i + 1][b : b + pb], cfg.loss.distance).mean()
                            )
                            parts["steps"] = parts["steps"] + term.detach()
                            total = total + cfg.loss.preserve_weight * term
                        if intermediate_erase:
                            target = aim(path[i + 1], n_targets, b, eta)[:b]
                            term = intermediate_erase / (steps - 1) * distance(z[:b], target, cfg.loss.distance).mean()
                            parts["erase_steps"] = parts["erase_steps"] + term.detach()
                            total = total + cfg.loss.erase_weight * term
                        return total

                    _, micro_grads = gradient(
                        trajectory.step,
                        trajectory.noise,
                        steps,
                        loss_fn,
                        params,
                        step_loss=step_loss if intermediate > 0 or intermediate_erase > 0 else None,
                    )
                    for acc_grad, g in zip(grads, micro_grads):
                        acc_grad.add_(g, alpha=1.0 / accum)
                    preserve_term = parts["preserve"].detach() + parts["steps"]
                    erase_term = parts["erase"].detach() + parts["erase_steps"]
                    terms += torch.tensor([float(erase_term), float(preserve_term)], dtype=torch.float64) / accum
                if world > 1:
                    for g in grads:
                        g.copy_(acc.reduce(g, reduction="mean"))
                    terms = acc.reduce(terms.to(acc.device), reduction="mean").cpu()
                with torch.enable_grad():
                    penalty = masked.sparsity_penalty()
                    penalty_grads = torch.autograd.grad(cfg.loss.sparsity_weight * penalty, params, allow_unused=True)
                erase, preserve = float(terms[0]), float(terms[1])
                loss = (
                    cfg.loss.erase_weight * erase
                    + cfg.loss.preserve_weight * preserve
                    + cfg.loss.sparsity_weight * float(penalty.detach())
                )
                if not math.isfinite(loss):
                    hint = (
                        ""
                        if self.denoiser.dtype == torch.float32
                        else " or train in float32 (--set model.dtype=float32)"
                    )
                    raise TrainingDivergedError(
                        f"loss became {loss} at iteration {step + 1}; check the loss weights and lower the mask "
                        f"learning rates (mask.*.lr){hint}"
                    )
                for p, g, pg in zip(params, grads, penalty_grads):
                    p.grad = g if pg is None else g + pg
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                counts = masked.masked_counts()
                fraction = fraction_of(counts)
                if done % cfg.train.log_every == 0 or done == cfg.train.iterations:
                    values: dict[str, float] = {
                        "loss": loss,
                        "erase": erase,
                        "preserve": preserve,
                        "sparsity": float(penalty.detach()),
                        "masked_fraction": fraction,
                    }
                    for kind, c in counts.items():
                        values[f"masked_{kind}"] = c["masked"] / c["total"]
                    for group in optimizer.param_groups:
                        values[f"lr_{group['name']}"] = group["lr"]
                    self.run.log(values, step=done)
                bar.set_postfix(loss=f"{loss:.4g}", masked=f"{fraction:.2%}")
                bar.update(1)
                if self.run.wants_checkpoint(done):
                    self.run.checkpoint(done, masked.logits_dict(), optimizer, scheduler)
                if on_step is not None:
                    on_step(done)

    def _attack(
        self,
        masked: MaskedModel,
        encoded: dict[str, torch.Tensor],
        path: list[torch.Tensor],
        n_targets: int,
        b: int,
        seeds: list[int],
        sample: dict[str, Any],
        k: int,
    ) -> dict[str, torch.Tensor]:
        """``encoded`` with the concept rows' conditioning replaced by what the inner attack found against the
        mask as it is (``train.adversarial``; :mod:`erasekit.training.adversarial`): at one denoising step,
        drawn per micro-step from the training seed, on the original model's latents of the concept
        prompts there, the attacked conditioning makes the masked model predict what the original model
        predicts for the concept prompts."""
        cfg = self.config
        i = random.Random(cfg.train.seed * 104_729 + k).randrange(cfg.sampling.steps)
        z = path[i][n_targets : n_targets + b]
        concept = {key: value[:b] for key, value in encoded.items()}
        with masked.disabled(), torch.no_grad():
            target = self.arch.trajectory(self.pipe, concept, seeds, **sample).predict(z, i)

        def predict(conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.arch.trajectory(self.pipe, conditioning, seeds, **sample).predict(z, i)

        found, _ = adversarial_conditioning(
            predict, concept, target, cfg.train.adversarial.steps, cfg.train.adversarial.lr
        )
        return {key: torch.cat([found[key], value[b:]]) for key, value in encoded.items()}

    def _write_artifact(self, masked: MaskedModel, seconds: float, counts: dict[str, dict[str, int]]) -> None:
        cfg = self.config
        record = {
            "method": "mask",
            "family": self.arch.family,
            "parameterization": cfg.mask.parameterization,
            "unit_kinds": sorted({s.kind for s in self.sites}),
            "units": count_units(self.sites)["per_kind"],
            "base_model": base_model_record(self.denoiser, self.model_id, cfg.model.revision),
            **concept_fields(cfg),
            "settings": config_to_dict(cfg),
            "training": {
                "iterations": cfg.train.iterations,
                "seconds": round(seconds, 3),
                "processes": self.accelerator.num_processes,
            },
            "masked": counts,
            "cost": {"peak_memory_bytes": peak_memory_bytes(self.accelerator.device)},
        }
        write_mask_files(self.staging, masked.logits_dict(), record)
        self.run.commit()


def aim(latents: torch.Tensor, n_targets: int, b: int, eta: float) -> torch.Tensor:
    """The reference batch's goal rows: ``latents`` holds the ``n_targets`` target rows (the first ``b`` the
    concept rows' targets) followed, when ``eta`` is set, by the ``b`` concept prompts' own latents under
    the original model; the concept rows' goals move past their targets by ``eta`` times the difference
    (ESD's negative guidance)."""
    goal = latents[:n_targets]
    if not eta:
        return goal
    return torch.cat([goal[:b] + eta * (goal[:b] - latents[n_targets : n_targets + b]), goal[b:]])


def validate_training_config(config: EraseConfig) -> None:
    """Reject settings the mask trainer cannot run with, naming the key."""
    validate_run_config(config)
    if config.loss.intermediate_preservation < 0:
        raise ConfigError("loss.intermediate_preservation must not be negative (0 preserves the final latents alone)")
    if config.train.noise_pool < 0:
        raise ConfigError("train.noise_pool must not be negative (0 draws a new noise seed for every sample)")
    if config.train.adversarial.steps < 0:
        raise ConfigError("train.adversarial.steps must not be negative (0 trains without the inner attack)")
    if config.train.adversarial.steps and config.train.adversarial.lr <= 0:
        raise ConfigError("train.adversarial.lr must be positive when train.adversarial.steps is set")
    if config.loss.intermediate_erasure < 0:
        raise ConfigError("loss.intermediate_erasure must not be negative (0 aims the final latents alone)")
    if config.loss.negative_guidance < 0:
        raise ConfigError("loss.negative_guidance must not be negative (0 aims at the target itself)")
    for kind in UNIT_KINDS:
        if getattr(config.mask, kind).lr < 0:
            raise ConfigError(f"mask.{kind}.lr must not be negative")
