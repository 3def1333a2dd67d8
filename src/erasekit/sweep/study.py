"""A sweep as an Optuna study: stored in a database, resumable, shared by several workers.

**Storage.** By default a SQLite file ``OUTPUT/study.db``; ``storage=URL`` names any database
SQLAlchemy reaches (``postgresql://...``, ``mysql+pymysql://...``, ``sqlite:////shared/sweep.db``),
so that processes on several machines or GPUs work on one study: each calls :func:`run_sweep` with
the same ``storage`` and ``study_name``; the database hands out trial numbers, and the sampler sees
every worker's trials.

**How many trials.** ``trials`` is the number of *completed* trials the study should hold. A worker
keeps running trials until the study has that many; trials that are still running elsewhere count as
on their way, and a worker whose start would overshoot the count records its trial as pruned (user
attribute ``surplus``) and stops: two workers never finish more than ``trials`` trials between them
by more than the ones they started at the same instant, and those are marked, not counted.

**Interruptions.** A trial whose objective raises (``KeyboardInterrupt`` included) is stored as
failed, with the error, and the worker stops (Ctrl-C) or goes on with the next trial (any other
error, up to ``trials`` failures in a row). A process killed outright leaves its trial marked
running: every worker sends a heartbeat while it runs a trial, and a trial whose heartbeat is older
than ``grace_period`` seconds is marked failed by the next worker that looks, which puts a copy of
it with the same parameters back in the queue (``retried_from`` in ``trials.csv``), so the trial is
retried, not lost. Rerunning the same command continues the study; nothing that finished is redone.

**Determinism.** TPE is seeded per trial with ``seed`` and the trial's number, so that a resumed
study or a second worker does not redraw the parameters of trials it already has, and one worker
with one seed draws the same sequence every time. The grid sampler gives each trial a point of the
grid that no trial, finished or running, has taken.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.samplers import BaseSampler, GridSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState

from ..errors import ConfigError, ErasekitError
from ..outputs import check_output, make_directory, write_atomically
from .report import write_outputs
from .space import SearchSpace

#: What a trial's objective gets: the trial's config overrides (dotted key -> value) and a folder of its
#: own (for a mask and its scores). It returns one value per direction, or a mapping holding one entry per
#: metric name (more entries are recorded beside them).
Objective = Callable[[dict[str, Any], Path], "Sequence[float] | Mapping[str, Any]"]

SAMPLERS = ("tpe", "grid")
STUDY_FILE = "study.db"
DEFAULT_STUDY = "erasekit-sweep"


class SweepError(ErasekitError):
    """A sweep cannot start or continue as asked (a storage, a study of another space, ...)."""


@dataclass
class SweepResult:
    """What :func:`run_sweep` leaves: the study and the files it wrote."""

    study: optuna.Study
    output: Path
    front: list[FrozenTrial] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


class _PerTrialSeed(BaseSampler):
    """A sampler built afresh for every trial with seed ``(seed, trial number)``.

    Optuna's samplers keep one random generator per process, so two workers (or a resumed run) with
    the same seed would draw the same first parameters again; the number the storage hands out is
    unique to the trial. TPE reads the history from the storage, so nothing else is lost by rebuilding it.
    """

    def __init__(self, make: Callable[[int | None], BaseSampler], seed: int | None) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        seed = None if self._seed is None else (self._seed * 1_000_003 + trial.number) % 2**32
        self._inner = self._make(seed)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, name: str, distribution: Any) -> Any:
        return self._inner.sample_independent(study, trial, name, distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._inner.after_trial(study, trial, state, values)


def make_sampler(space: SearchSpace, sampler: str, seed: int | None) -> BaseSampler:
    """The study's sampler: TPE (multi-objective when there are several directions) or the full grid."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if sampler == "grid":
        # not reseeded per trial: the seed shuffles the grid's order, which must stay one for the study;
        # it hands each trial a point no trial has taken, running ones included
        return GridSampler(space.grid(), seed=seed)
    return _PerTrialSeed(lambda s: TPESampler(seed=s, multivariate=True), seed)


def open_storage(
    output: Path, storage: str | None, heartbeat_interval: int = 30, grace_period: int | None = None
) -> optuna.storages.RDBStorage:
    """The study's database: ``storage`` or ``sqlite:///OUTPUT/study.db``, with heartbeats and retries.

    Raises:
        SweepError: a URL SQLAlchemy cannot open.
    """
    url = storage or f"sqlite:///{(output / STUDY_FILE).absolute()}"
    # several processes write one SQLite file: wait for its lock rather than fail at once
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna's words since 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
        for attempt in range(4):
            try:
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period or 3 * heartbeat_interval,
                    heartbeat_stale_trial_callback=retry,
                )
            except Exception as exc:  # SQLAlchemy's errors (bad URL, missing driver, refused connection) are many
                # two workers creating the tables of a new database at once: the second one's try
                # fails (a table or the schema version already exists) and the next finds them
                if attempt < 3 and type(exc).__name__ in ("OperationalError", "IntegrityError"):
                    time.sleep(0.5 * (attempt + 1))
                    continue
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise SweepError(f"cannot open the study storage {url!r}: {first}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _check_record(study: optuna.Study, key: str, value: Any) -> None:
    """Store ``value`` under ``key`` in a new study; in an existing one, refuse a different value."""
    stored = study.user_attrs.get(key)
    if stored is None:
        study.set_user_attr(key, value)
    elif stored != value:
        raise SweepError(
            f"the study {study.study_name!r} was started with another {key} ({stored!r}, now {value!r}); "
            "use another --output, --storage or study name"
        )


def _count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def run_sweep(
    objective: Objective,
    space: SearchSpace,
    *,
    trials: int,
    output: str | os.PathLike[str],
    storage: str | None = None,
    sampler: str = "tpe",
    directions: Sequence[str] = ("maximize", "maximize"),
    metric_names: Sequence[str] | None = None,
    seed: int | None = 0,
    study_name: str = DEFAULT_STUDY,
    heartbeat_interval: int = 30,
    grace_period: int | None = None,
    poll_seconds: float | None = None,
) -> SweepResult:
    """Run (or continue) a study until it holds ``trials`` completed trials; write its report to ``output``.

    Args:
        objective: scores one trial's overrides (:data:`Objective`).
        space: the keys and ranges to search (:func:`erasekit.sweep.space.load_space`).
        trials: completed trials the study should hold, over every worker (a grid: at most its size).
        output: folder for ``study.db`` (the default storage), ``trials/NNNN/`` (each trial's folder),
            ``trials.csv``, ``front.md`` and ``front.png``; an existing one is continued.
        storage: a database URL shared by several workers (default: the SQLite file in ``output``).
        sampler: ``tpe`` or ``grid`` (every combination of the space's values).
        directions: ``maximize`` or ``minimize`` per objective value; two values give a Pareto front.
        metric_names: a name per value (default ``value0``, ...); a mapping objective is read by them.
        seed: seeds the sampler per trial (module docstring); None draws fresh entropy.
        study_name: the study in ``storage`` (several studies may share a database).
        heartbeat_interval, grace_period: seconds between a running trial's heartbeats, and of
            silence after which a trial counts as dead, is marked failed and retried (default 3 beats).
        poll_seconds: how often a worker waiting for other workers' trials looks again.

    Returns:
        The study, its Pareto front (``study.best_trials``) and the files written.

    Raises:
        ConfigError, SweepError: bad arguments, an unusable storage or output, a study of another space.
        KeyboardInterrupt: passed on after the running trial is stored as failed.
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials must be a positive integer, got {trials!r}")
    directions = list(directions)
    if not directions or any(d not in ("maximize", "minimize") for d in directions):
        raise ConfigError(f"directions must each be maximize or minimize, got {directions!r}")
    names = list(metric_names) if metric_names is not None else [f"value{i}" for i in range(len(directions))]
    if len(names) != len(directions):
        raise ConfigError(f"{len(names)} metric names for {len(directions)} directions")
    target = check_output(output, overwrite=True)  # an existing output is a study to continue
    make_directory(target)
    if sampler == "grid":
        trials = min(trials, math.prod(len(v) for v in space.grid().values()))
    study = optuna.create_study(
        storage=open_storage(target, storage, heartbeat_interval, grace_period),
        sampler=make_sampler(space, sampler, seed),
        study_name=study_name,
        directions=directions,
        load_if_exists=True,
    )
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in directions]:
        raise SweepError(f"the study {study_name!r} has other directions; use another --output or study name")
    _check_record(study, "space", space.record())
    _check_record(study, "sampler", sampler)
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    poll = poll_seconds if poll_seconds is not None else max(1.0, heartbeat_interval / 2)

    failures = 0

    def run_one(trial: optuna.Trial) -> Sequence[float]:
        # A trial counts only while the trials numbered before it leave room: the storage numbers them
        # in order, so two workers that start at the same instant agree on which one is surplus.
        ahead = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
            if t.number < trial.number
        ]
        if len(ahead) >= trials:
            trial.set_user_attr("surplus", True)
            study.stop()
            raise optuna.TrialPruned("the study already has its trials")
        params = space.suggest(trial)
        folder = make_directory(target / "trials" / f"{trial.number:04d}")
        trial.set_user_attr("folder", str(folder.relative_to(target)))
        started = time.perf_counter()
        try:
            result = objective(params, folder)
        except BaseException as exc:  # recorded for trials.csv; Optuna stores the trial as failed
            trial.set_user_attr(
                "error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            )
            raise
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 3))
        if isinstance(result, Mapping):
            missing = [n for n in names if n not in result]
            if missing:
                raise SweepError(f"the objective returned no {', '.join(missing)}")
            for key, value in result.items():
                if key not in names:
                    trial.set_user_attr(f"extra:{key}", value)
            return [float(result[n]) for n in names]
        values = [float(v) for v in result]
        if len(values) != len(directions):
            raise SweepError(f"the objective returned {len(values)} values for {len(directions)} directions")
        return values

    def note_failure(study_: optuna.Study, frozen: FrozenTrial) -> None:
        nonlocal failures
        failures = failures + 1 if frozen.state == TrialState.FAIL else 0
        if failures >= trials:
            study_.stop()

    try:
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, and queued again
            done = _count(study, TrialState.COMPLETE)
            if done >= trials or failures >= trials:
                break
            running = _count(study, TrialState.RUNNING)
            waiting = _count(study, TrialState.WAITING)
            if done + running >= trials and not waiting:
                time.sleep(poll)  # the last trials run elsewhere: wait for them, or take over when they die
                continue
            study.optimize(
                run_one,
                n_trials=max(1, trials - done - running + waiting),
                catch=(Exception,),
                callbacks=[note_failure],
            )
    except KeyboardInterrupt:
        _report(study, target)  # what finished is reported before the interruption goes on
        raise
    front, files = _report(study, target)
    return SweepResult(study=study, output=target, front=front, files=files)


def _report(study: optuna.Study, target: Path) -> tuple[list[FrozenTrial], list[Path]]:
    """Write the study's report (with the rescored numbers it holds); returns the front and the files."""
    front = study.best_trials if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else []
    attrs = study.user_attrs
    rescored = {t.number: attrs[f"rescored:{t.number}"] for t in front if f"rescored:{t.number}" in attrs}
    return front, write_outputs(study, target, front, rescored, attrs.get("rescored:base"))


def load_study(
    output: str | os.PathLike[str], storage: str | None = None, study_name: str = DEFAULT_STUDY
) -> optuna.Study:
    """An existing study (in ``storage``, default ``OUTPUT/study.db``), to report or rescore.

    Raises:
        SweepError: no such study there.
    """
    target = Path(output)
    if storage is None and not (target / STUDY_FILE).is_file():
        raise SweepError(f"no study in {str(target)!r} (no {STUDY_FILE}); run the sweep first")
    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(target, storage))
    except KeyError:
        raise SweepError(f"no study named {study_name!r} in the storage") from None


def rescore_front(
    study: optuna.Study,
    rescore: Callable[[dict[str, Any], Path], Mapping[str, Any]],
    output: str | os.PathLike[str],
    baseline: bool = False,
) -> dict[int, dict[str, Any]]:
    """Score every trial of the Pareto front again with ``rescore`` (e.g. on the evaluation draw).

    ``rescore`` gets a trial's values and its folder (``OUTPUT/trials/NNNN``) and returns numbers by
    name. The scores are stored in the study (user attributes ``rescored:NUMBER``: a finished trial
    takes no new attributes), so that a rerun does not redo them and a later report keeps them; they
    are written to ``rescored.json`` and added to ``front.md`` as columns. With ``baseline`` the
    recipe the sweep started from (no trial values, folder ``OUTPUT/base``) is scored too, as a row
    of its own.

    Returns:
        Trial number -> its rescored numbers.
    """
    target = Path(output)
    front = study.best_trials

    def scored(name: str, params: dict[str, Any], folder: str) -> dict[str, Any]:
        stored = study.user_attrs.get(f"rescored:{name}")
        if stored is None:  # a rerun does not redo what a previous one rescored
            numbers = rescore(params, make_directory(target / folder))
            stored = {k: v for k, v in numbers.items() if not isinstance(v, (dict, list))}
            study.set_user_attr(f"rescored:{name}", stored)  # a finished trial takes no attributes: the study's
        return stored

    scores = {
        t.number: scored(str(t.number), dict(t.params), t.user_attrs.get("folder", f"trials/{t.number:04d}"))
        for t in front
    }
    base = scored("base", {}, "base") if baseline else None
    record = {"front": {str(k): v for k, v in scores.items()}, "base": base}
    write_atomically(target / "rescored.json", json.dumps(record, indent=2) + "\n")
    write_outputs(study, target, front, scores, base)
    return scores
