"""What the fine-tuning erasures (ESD, CA) share: train a chosen set of denoiser parameters with Adam
inside a :class:`~erasekit.training.run.TrainingRun`, then hand the changed tensors to a
:class:`~erasekit.methods.weights.WeightEditErasure`.

A method subclasses :class:`WeightTrainer` with its parameter selection and its per-sample loss; the
loop here owns the optimiser, gradient accumulation, the data-parallel gradient average, checkpoints and
``--resume``, logging and the artefact. The original values of the trained parameters are kept beside
them: :meth:`WeightTrainer.original_weights` swaps them in (no copy: tensor pointers are exchanged) for
what the *frozen* model must compute, and the pipeline is left exactly as it was when the fit ends.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator

from ..arch import denoiser_of
from ..arch.samplers import set_scheduler
from ..config import EraseConfig
from ..data import build_concept_prompts
from ..errors import ConfigError, TrainingDivergedError
from ..training.run import (
    PromptEncoder,
    TrainingRun,
    freeze,
    make_accelerator,
    staging_path,
    training_noise_seed,
    validate_run_config,
)
from .base import Method, peak_memory_bytes
from .weights import WeightEditErasure, erasure_record


def with_run_length(config: EraseConfig, settings: Any) -> EraseConfig:
    """``config`` with the method section's ``iterations`` and ``batch_size`` (where set) as the run's
    ``train.iterations`` and ``train.batch_size``: one recipe file holds every method's length, and the run
    (its progress, checkpoints, resume check and the artefact's settings) sees the resolved values."""
    changes = {
        key: getattr(settings, key) for key in ("iterations", "batch_size") if getattr(settings, key, None) is not None
    }
    if not changes:
        return config
    return replace(config, train=replace(config.train, **changes))


class WeightTrainer(ABC):
    """Fine-tunes :meth:`select` 's parameters of ``pipe``'s denoiser on :meth:`loss`.

    Args:
        pipe: a loaded pipeline of a supported family, on ``accelerator.device``.
        config: the resolved configuration.
        output: the artefact folder to create.
        accelerator: shared with the caller.
        model_id: recorded in the artefact (default ``config.model.id``).
    """

    def __init__(
        self,
        pipe: Any,
        config: EraseConfig,
        output: str | Path,
        accelerator: Accelerator,
        model_id: str | None = None,
    ) -> None:
        lr = self.settings_of(config).lr
        config = with_run_length(config, getattr(config, config.method, None))
        validate_run_config(config)
        if not lr > 0:
            raise ConfigError(f"{config.method}.lr must be positive, got {lr}")
        self.pipe, self.config, self.accelerator = pipe, config, accelerator
        self.lr = lr
        self.output = Path(output)
        self.model_id = model_id or config.model.id
        self.run = TrainingRun(config, self.output, accelerator)
        self.arch, self.denoiser = denoiser_of(pipe)
        set_scheduler(pipe, config.sampling.scheduler)
        self.prompts = build_concept_prompts(config.concept)
        freeze(pipe)
        self.params = dict(self.select())
        # the originals live beside the trained tensors; :meth:`original_weights` swaps them in
        self.originals = {name: p.detach().clone() for name, p in self.params.items()}
        self.encode = PromptEncoder(self.arch, pipe, config.sampling.max_sequence_length)

    # ------------------------------------------------------------------ what a method defines
    erasure_class: ClassVar[type[WeightEditErasure]]
    """The method's :class:`WeightEditErasure` subclass."""
    changes: ClassVar[str]
    """What the method changes, in words (the cost's ``changes``)."""

    @abstractmethod
    def settings_of(self, config: EraseConfig) -> Any:
        """The method's settings section of ``config``, checked (it has ``lr``, Adam's learning rate)."""

    @abstractmethod
    def select(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The denoiser parameters to train, by name (a :class:`ConfigError` when there are none)."""

    @abstractmethod
    def loss(self, sample: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of global training sample ``sample`` (with gradient into :attr:`params`) and the numbers
        to log."""

    def prepare(self) -> None:  # noqa: B027  (optional hook)
        """Work before the first step, once per run and resume (e.g. generating images); default: none."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors a method carries from step to step beside the trained parameters (EAP's adversary), saved
        in every checkpoint under these names (which must not be parameter names); default: none."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:  # noqa: B027  (optional hook)
        """Restore :meth:`extra_state` from a checkpoint on ``--resume``; default: nothing to restore."""

    def training_record(self) -> dict[str, Any]:
        """What the artefact's ``training`` record gains beyond the run's length (JSON values); default: none."""
        return {}

    # ------------------------------------------------------------------ helpers for methods
    def noise_seed(self, sample: int, stream: int = 0) -> int:
        """The noise seed of training sample ``sample`` (``stream`` tells apart several draws per sample)."""
        return training_noise_seed(self.config.train.seed, sample, stream, streams=4)

    def generator(self, sample: int) -> torch.Generator:
        """A CPU generator for sample ``sample``'s random choices (timestep, image), the same on resume."""
        return torch.Generator().manual_seed(self.config.train.seed * 7919 + sample)

    def concept_row(self, sample: int) -> int:
        """Which concept prompt (and its target) sample ``sample`` uses: the prompts in turn."""
        return sample % len(self.prompts.concept)

    @contextmanager
    def original_weights(self) -> Iterator[None]:
        """Within the block the trained parameters hold their original values (the frozen model).

        Only tensor pointers are exchanged, so entering costs nothing; use it under ``torch.no_grad``.
        """
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for name, param in self.params.items():
            param.data, self.originals[name] = self.originals[name], param.data

    # ------------------------------------------------------------------ the run
    def fit(self, resume: bool = False, stop_after: int | None = None) -> WeightEditErasure | None:
        """Train, then write the artefact to ``output`` (main process); returns the erasure, or None when
        ``stop_after`` stopped the run before its end (the staging folder stays for ``resume``)."""
        cfg, acc, run = self.config, self.accelerator, self.run
        run.check_start(resume)
        started = time.perf_counter()
        for param in self.params.values():
            param.requires_grad_(True)
        try:
            params = list(self.params.values())
            optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=cfg.train.weight_decay)
            scheduler = run.schedule(optimizer)
            start = 0
            if resume:
                start, tensors = run.restore(optimizer, scheduler)
                with torch.no_grad():
                    for name, param in self.params.items():
                        param.copy_(tensors[name].to(param.device, param.dtype))
                self.load_extra_state({k: v for k, v in tensors.items() if k not in self.params})
            run.begin(start)
            self.prepare()
            self._loop(optimizer, scheduler, start, stop_after)
        except BaseException as exc:
            run.abort(exc)
            self._restore_pipeline()
            raise
        finally:
            run.finish_trackers()
        edits = {name: param.detach().clone() for name, param in self.params.items()}
        self._restore_pipeline()
        if stop_after is not None and stop_after < cfg.train.iterations:
            return None
        seconds = time.perf_counter() - started
        record = erasure_record(
            self.erasure_class.method,
            cfg,
            self.denoiser,
            self.arch.family,
            model_id=self.model_id,
            changes=self.changes,
            seconds=seconds,
            peak_memory_bytes=peak_memory_bytes(acc.device),
        )
        record["training"] = {
            "iterations": cfg.train.iterations,
            "processes": acc.num_processes,
            **self.training_record(),
        }
        erasure = self.erasure_class.from_edits(self.denoiser, edits, record)
        acc.wait_for_everyone()
        if acc.is_main_process:
            erasure.write(run.staging)
            run.commit()
        acc.wait_for_everyone()
        erasure.path = self.output
        return erasure

    def _restore_pipeline(self) -> None:
        """Put the original values back and switch gradients off: the fit leaves the pipeline as it was."""
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.originals[name])
                param.requires_grad_(False)
                param.grad = None

    def _loop(self, optimizer: Any, scheduler: Any, start: int, stop_after: int | None) -> None:
        cfg, acc = self.config, self.accelerator
        rank, world = acc.process_index, acc.num_processes
        accum, batch = cfg.train.gradient_accumulation, cfg.train.batch_size
        end = cfg.train.iterations if stop_after is None else min(stop_after, cfg.train.iterations)
        params = list(self.params.values())
        with self.run.progress(start, desc=f"erase ({cfg.method})") as bar:
            for step in range(start, end):
                optimizer.zero_grad(set_to_none=True)
                values: dict[str, float] = {}
                for micro in range(accum):
                    for row in range(batch):
                        sample = ((step * accum + micro) * world + rank) * batch + row
                        loss, parts = self.loss(sample)
                        (loss / (accum * batch)).backward()
                        for key, value in {"loss": float(loss.detach()), **parts}.items():
                            values[key] = values.get(key, 0.0) + value / (accum * batch)
                if world > 1:
                    for param in params:
                        if param.grad is not None:
                            param.grad.copy_(acc.reduce(param.grad, reduction="mean"))
                if not math.isfinite(values["loss"]):
                    raise TrainingDivergedError(
                        f"loss became {values['loss']} at iteration {step + 1}; lower {cfg.method}.lr"
                        + ("" if self.denoiser.dtype == torch.float32 else " or train in float32")
                    )
                optimizer.step()
                scheduler.step()
                done = step + 1
                if done % cfg.train.log_every == 0 or done == cfg.train.iterations:
                    self.run.log({**values, "lr": optimizer.param_groups[0]["lr"]}, step=done)
                bar.set_postfix(loss=f"{values['loss']:.4g}")
                bar.update(1)
                if self.run.wants_checkpoint(done):
                    tensors = {name: p.detach().contiguous() for name, p in self.params.items()}
                    tensors.update({k: v.detach().contiguous() for k, v in self.extra_state().items()})
                    self.run.checkpoint(done, tensors, optimizer, scheduler)


__all__ = ["WeightTrainer", "with_run_length"]


class FineTuneMethod(Method):
    """A method that fine-tunes denoiser weights with a :class:`WeightTrainer` (ESD, CA): its settings
    check, run length and fit are the same, only the trainer differs."""

    trainer_class: ClassVar[type[WeightTrainer]]
    trains = True

    def check_settings(self, settings: Any) -> None:  # noqa: B027  (optional hook)
        """Refuse this method's own settings in one line (default: none)."""

    def validate(self, config: EraseConfig) -> None:
        settings = self.settings(config)
        build_concept_prompts(config.concept)
        validate_run_config(with_run_length(config, settings))
        self.check_settings(settings)

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
    ) -> WeightEditErasure:
        output = Path(output)
        if accelerator is None:
            accelerator = make_accelerator(config, staging_path(output))
        trainer = self.trainer_class(pipe, config, output, accelerator, model_id)  # type: ignore[call-arg]
        erasure = trainer.fit(resume=resume, stop_after=stop_after)
        if erasure is None:  # stopped early: no artefact; an empty erasure says so
            return self.erasure_class({}, {})  # type: ignore[return-value]
        return erasure
