"""What every iterative erasure method shares: one training run's life-cycle.

A :class:`TrainingRun` owns the staging folder (``<output>.incomplete``), the checkpoints in it and
``--resume`` from them, the accelerate :class:`~accelerate.Accelerator` (data parallelism, trackers),
the progress bar and the final rename into ``output``. A method's trainer owns its objective and its
parameters; it hands the run the tensors to checkpoint and asks it for the ones to resume from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import EraseConfig, config_to_dict, save_config
from ..errors import ConfigError, ErasekitError, TrainingDivergedError
from ..launch import warn_if_single_process
from ..outputs import commit_directory
from ..pipeline import resolve_device
from .tracking import CSVTracker

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
#: The trained tensors inside a checkpoint (the optimiser and scheduler states sit beside them).
CHECKPOINT_TENSORS = "tensors.safetensors"

#: Training noise seeds lie below this, so that no evaluation draw that seeds its images from 900_000 up
#: (the ShapesCanvas protocol's) shares a noise with a training sample, whatever ``train.seed`` is; an
#: earlier ``seed * 1_000_003`` put training seed 1's noises on the protocol's evaluation images.
TRAINING_NOISE_SEEDS = 900_000


def training_noise_seed(train_seed: int, sample: int, stream: int, streams: int) -> int:
    """The noise seed of draw ``stream`` (of ``streams`` per sample) of training sample ``sample`` in the
    run of training seed ``train_seed``: distinct for every (sample, stream), in ``[0, TRAINING_NOISE_SEEDS)``."""
    return (train_seed * 100_003 + streams * sample + stream) % TRAINING_NOISE_SEEDS


def staging_path(output: Path) -> Path:
    """Where a run writes until it finishes (then renamed to ``output``); ``--resume`` continues it."""
    return output.with_name(output.name + ".incomplete")


def flat_settings(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, lists as JSON (tracker hparams and the resume check)."""
    if isinstance(value, dict):
        for k, v in value.items():
            flat_settings(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)
    return out


def make_accelerator(config: EraseConfig, logging_dir: Path) -> Accelerator:
    """An Accelerator with the configured trackers (csv built in; others when installed)."""
    trackers: list[Any] = []
    for name in config.train.trackers:
        if name == "csv":
            trackers.append(CSVTracker(logging_dir))
        elif name in ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive"):
            from accelerate.utils import is_tensorboard_available, is_wandb_available

            available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}.get(name, True)
            if available:
                trackers.append(name)
            else:
                logger.warning("tracker %s is not installed; skipping it", name)
        else:
            raise ConfigError(f"train.trackers: unknown tracker {name!r}; use csv, tensorboard or wandb")
    accelerator = Accelerator(cpu=config.model.device == "cpu", log_with=trackers or None, project_dir=str(logging_dir))
    warn_if_single_process(accelerator.num_processes, "erase")
    return accelerator


def validate_run_config(config: EraseConfig) -> None:
    """Reject the run settings no iterative method can run with, naming the key."""
    checks = [
        ("train.iterations", config.train.iterations >= 1),
        ("train.batch_size", config.train.batch_size >= 1),
        (
            "train.preservation_batch_size",
            config.train.preservation_batch_size is None or config.train.preservation_batch_size >= 1,
        ),
        ("train.gradient_accumulation", config.train.gradient_accumulation >= 1),
        ("sampling.steps", config.sampling.steps >= 1),
        ("sampling.resolution", config.sampling.resolution >= 1),
        ("train.log_every", config.train.log_every >= 1),
    ]
    if config.sampling.generation_steps is not None:
        checks.append(("sampling.generation_steps", config.sampling.generation_steps >= 1))
    for key, ok in checks:
        if not ok:
            raise ConfigError(f"{key} must be at least 1")
    try:
        resolve_device(config.model.device)
    except ErasekitError as exc:
        raise ConfigError(f"model.device: {exc}") from None


class PromptEncoder:
    """Runs the text encoders once per distinct prompt (no grad) and caches the outputs."""

    def __init__(self, arch: Any, pipe: Any, max_sequence_length: int) -> None:
        self.arch, self.pipe, self.max_sequence_length = arch, pipe, max_sequence_length
        self.cache: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            encoded = self.arch.encode_prompts(self.pipe, missing, self.max_sequence_length)
            for row, prompt in enumerate(missing):
                self.cache[prompt] = {k: v[row : row + 1] for k, v in encoded.items()}
        return {k: torch.cat([self.cache[p][k] for p in prompts]) for k in self.cache[prompts[0]]}


def freeze(pipe: Any) -> None:
    """Switch off gradients of every module of ``pipe``: only what a method trains learns."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)


class TrainingRun:
    """The life-cycle of one iterative erasure: staging, checkpoints, resume, trackers, progress, commit.

    Args:
        config: the resolved configuration (``train.*`` drives checkpoints, trackers and the bar).
        output: the artefact folder the run creates; it writes into :attr:`staging` until it finishes.
        accelerator: shared with the caller (who placed the pipeline on its device).
    """

    def __init__(self, config: EraseConfig, output: str | Path, accelerator: Accelerator) -> None:
        self.config, self.accelerator = config, accelerator
        self.output = Path(output)
        self.staging = staging_path(self.output)

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def check_start(self, resume: bool) -> None:
        """Refuse an existing output, or a left-over staging folder without ``resume``."""
        if self.output.exists():
            raise ErasekitError(f"output {str(self.output)!r} already exists; choose another --output or remove it")
        if self.staging.exists() and not resume:
            raise ErasekitError(
                f"{self.staging} holds an interrupted run; pass --resume to continue it, or remove that folder"
            )
        self.accelerator.wait_for_everyone()  # every process checks before the main one creates the staging folder

    def begin(self, start: int) -> None:
        """Create the staging folder with the resolved config and start the trackers at step ``start``."""
        acc = self.accelerator
        if acc.is_main_process:
            self.staging.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.staging / "config.yaml")
        acc.wait_for_everyone()
        acc.init_trackers("erasekit", config=flat_settings("", config_to_dict(self.config), {}))
        for tracker in acc.trackers:
            if isinstance(tracker, CSVTracker):
                tracker.truncate_after(start)

    def progress(self, start: int, desc: str = "erase") -> tqdm:
        """The progress bar over ``train.iterations``, on the local main process only."""
        return tqdm(
            total=self.config.train.iterations,
            initial=start,
            desc=desc,
            disable=not self.accelerator.is_local_main_process,
            dynamic_ncols=True,
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)

    def wants_checkpoint(self, done: int) -> bool:
        every = self.config.train.checkpoint_every
        return every > 0 and done % every == 0 and done < self.config.train.iterations

    def schedule(self, optimizer: Any) -> Any:
        """The learning-rate schedule every iterative method steps once per optimiser step (``train.lr_schedule``
        with ``train.warmup_steps`` over ``train.iterations``); a resumed run loads its state with :meth:`restore`."""
        from diffusers.optimization import get_scheduler

        train = self.config.train
        return get_scheduler(
            train.lr_schedule, optimizer, num_warmup_steps=train.warmup_steps, num_training_steps=train.iterations
        )

    def checkpoint(self, step: int, tensors: dict[str, torch.Tensor], optimizer: Any, scheduler: Any) -> None:
        """Write a checkpoint of step ``step`` (main process), keep only the latest, then synchronise."""
        if self.accelerator.is_main_process:
            root = self.staging / CHECKPOINTS
            root.mkdir(parents=True, exist_ok=True)
            final = root / f"step-{step:07d}"
            tmp = root / f".step-{step:07d}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file(tensors, str(tmp / CHECKPOINT_TENSORS))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save({"scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(p for p in root.glob("step-*") if p != final):
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _check_same_run(self) -> None:
        """A resumed run must use the settings of the run it continues (else its result means nothing)."""
        saved_file = self.staging / "config.yaml"
        if not saved_file.is_file():
            return
        saved = flat_settings("", yaml.safe_load(saved_file.read_text()) or {}, {})
        current = flat_settings("", config_to_dict(self.config), {})
        for key in sorted(set(saved) | set(current)):
            if saved.get(key) != current.get(key):
                raise ErasekitError(
                    f"--resume with other settings: {key} was {saved.get(key)!r} in the interrupted run, now "
                    f"{current.get(key)!r}; resume with the same config, or remove {self.staging} to start afresh"
                )

    def restore(self, optimizer: Any, scheduler: Any) -> tuple[int, dict[str, torch.Tensor]]:
        """Load the latest checkpoint into ``optimizer``, ``scheduler`` and torch's RNG; return its step
        and the trained tensors it holds (the caller loads them into its parameters)."""
        self._check_same_run()
        checkpoints = sorted((self.staging / CHECKPOINTS).glob("step-*"))
        if not checkpoints:
            raise ErasekitError(f"nothing to resume: {self.staging} has no checkpoint; start without --resume")
        latest = checkpoints[-1]
        tensors_file = latest / CHECKPOINT_TENSORS
        if not tensors_file.is_file():  # a mask run interrupted under erasekit before the training run existed
            tensors_file = latest / "logits.safetensors"
        tensors = load_file(str(tensors_file))
        optimizer.load_state_dict(torch.load(latest / "optimizer.pt", map_location="cpu", weights_only=True))
        state = torch.load(latest / "state.pt", map_location="cpu", weights_only=True)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step = int(json.loads((latest / "state.json").read_text())["step"])
        logger.info("resuming from %s (step %d)", latest, step)
        return step, tensors

    def abort(self, exc: BaseException) -> None:
        """After a failure: keep the staging folder only for ``--resume`` (a checkpoint to go on from, of a
        run that did not diverge)."""
        if self.accelerator.is_main_process and (
            isinstance(exc, TrainingDivergedError) or not any((self.staging / CHECKPOINTS).glob("step-*"))
        ):
            shutil.rmtree(self.staging, ignore_errors=True)

    def finish_trackers(self) -> None:
        # not accelerator.end_training(): it destroys the process group still needed to write the artefact
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def commit(self) -> Path:
        """Drop the checkpoints and rename the staging folder (with the artefact written into it) to ``output``."""
        shutil.rmtree(self.staging / CHECKPOINTS, ignore_errors=True)
        commit_directory(self.staging, self.output)
        return self.output


__all__ = [
    "CHECKPOINTS",
    "CHECKPOINT_TENSORS",
    "PromptEncoder",
    "TrainingRun",
    "flat_settings",
    "freeze",
    "make_accelerator",
    "staging_path",
    "validate_run_config",
]
