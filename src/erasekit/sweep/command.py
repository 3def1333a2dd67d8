"""``erasekit sweep``: the command's body, without argument parsing (the CLI parses and calls :func:`main`).

::

    erasekit sweep --method mask --config base.yaml --space space.yaml --trials 30 --output sweeps/circle \\
        [--storage URL] [--sampler tpe|grid] [--seed 0] [--concept circle] [--images 96] [--no-rescore]

maps one flag to each argument of :func:`main`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..config import load_config
from ..errors import ConfigError
from ..outputs import check_output
from .space import load_space
from .study import DEFAULT_STUDY, SweepResult, rescore_front, run_sweep

#: Methods a sweep can tune (name -> what its objective trains and scores).
METHODS: dict[str, str] = {"mask": "ShapesCanvas mask erasure (the demo's recipe)"}


def flatten(data: Any, prefix: str = "") -> list[str]:
    """``key=value`` overrides (``--set`` form) for every setting of a nested recipe mapping."""
    if isinstance(data, dict) and data:
        return [item for key, value in data.items() for item in flatten(value, f"{prefix}{key}.")]
    return [f"{prefix[:-1]}={yaml.safe_dump(data, default_flow_style=True).strip().removesuffix('...').strip()}"]


def base_overrides(config: str | os.PathLike[str] | None) -> list[str]:
    """A base recipe as overrides on top of the method's own recipe; checked against the erase config first.

    Raises:
        ConfigError: a missing or invalid recipe (unknown key, wrong type).
    """
    if config is None:
        return []
    load_config(config)  # one-line errors for unknown keys and wrong types, before any trial
    data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    return flatten(data)


def main(
    *,
    method: str,
    space: str | os.PathLike[str],
    trials: int,
    output: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    storage: str | None = None,
    sampler: str = "tpe",
    seed: int | None = 0,
    study_name: str = DEFAULT_STUDY,
    concept: str = "circle",
    anchor: str | None = None,
    images: int = 96,
    evaluation_images: int | None = None,
    train_seed: int = 0,
    rescore: bool = True,
    baseline: bool = True,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Run (or continue) the sweep ``erasekit sweep`` describes, then rescore its front; return the result.

    Args:
        method: the method to tune (:data:`METHODS`).
        space: the ``space.yaml`` (:mod:`erasekit.sweep.space`).
        trials: completed trials the study should hold (all workers together).
        output: the sweep's folder (``study.db``, ``trials/``, ``trials.csv``, ``front.md``, ``front.png``,
            ``rescored.json``); an existing one is continued.
        config: a base recipe every trial starts from (on top of the method's own).
        storage: a database URL shared by several workers (default ``sqlite:///OUTPUT/study.db``).
        sampler, seed, study_name: as :func:`erasekit.sweep.run_sweep`.
        concept, anchor: what the mask erases on ShapesCanvas (as ``erasekit demo``).
        images: images per group of the tuning draw; evaluation_images: of the evaluation draw
            (default the protocol's).
        train_seed: every trial's training seed.
        rescore: rescore the front on the evaluation draw (skip on workers other than the last one).
        baseline: rescore the base recipe too, as the front's reference row.
        log: where progress lines go.

    Raises:
        ConfigError: an unknown method, a bad space or recipe, bad numbers.
    """
    if method not in METHODS:
        raise ConfigError(f"sweep: method {method!r} has no sweep objective yet; use one of: {', '.join(METHODS)}")
    for name, value in (("images", images), ("evaluation_images", evaluation_images or 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"sweep: {name} must be a positive integer, got {value!r}")
    parsed = load_space(space)
    base = base_overrides(config)
    check_output(output, overwrite=True)
    from ..reproducibility import pin_cpu_numerics

    pin_cpu_numerics()  # before torch: the demo's kernels, so a trial trains what erasekit demo would
    from ..toyworld import protocol
    from .shapes import ShapesMaskObjective

    objective = ShapesMaskObjective(concept, base, anchor=anchor, images=images, seed=train_seed)
    result = run_sweep(
        objective,
        parsed,
        trials=trials,
        output=output,
        storage=storage,
        sampler=sampler,
        directions=("maximize", "maximize"),
        metric_names=objective.metric_names,
        seed=seed,
        study_name=study_name,
    )
    log(f"sweep: {len(result.front)} trials on the Pareto front; {result.output / 'front.md'}")
    if rescore and result.front:
        per_group = evaluation_images or protocol.PER_GROUP
        rescore_front(
            result.study,
            lambda params, folder: objective.rescore(params, folder, per_group=per_group),
            result.output,
            baseline=baseline,
        )
        log(
            f"sweep: the front rescored on the evaluation draw ({per_group} images per group); "
            f"{result.output / 'rescored.json'}"
        )
    return result
