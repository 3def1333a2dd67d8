"""The search space of a sweep: a YAML file mapping dotted config keys to the range each may take.

::

    loss.erase_weight: {type: float, low: 2, high: 12, log: true}
    loss.negative_guidance: {type: float, low: 0, high: 2, step: 0.25}
    train.preservation_batch_size: {type: int, low: 2, high: 6}
    loss.distance: {type: categorical, choices: [mse, l1]}

Keys are those ``erasekit erase --set`` takes (:class:`erasekit.config.EraseConfig`); every entry is
checked up front against the config's types and choices, so that a typo fails in a second, not after
the first trial has trained.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..config import EraseConfig, set_value
from ..errors import ConfigError

if TYPE_CHECKING:
    import optuna

TYPES = ("float", "int", "categorical")
_ALLOWED = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


@dataclass(frozen=True)
class Parameter:
    """The range of one config key: ``low``..``high`` (optionally log-scaled or stepped) or ``choices``."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        """The trial's value of this key, drawn by the study's sampler."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid(self) -> list[Any]:
        """Every value a grid search tries.

        Raises:
            ConfigError: a continuous range (float without ``step``, or log-scaled), which has no grid.
        """
        if self.type == "categorical":
            return list(self.choices)
        if self.log or (self.type == "float" and self.step is None):
            raise ConfigError(
                f"search space {self.key!r}: a grid needs a finite set of values; "
                "give a float a step (without log) or use type categorical with choices"
            )
        step = self.step or 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + k * step for k in range(count)]
        return [int(v) for v in values] if self.type == "int" else [round(v, 12) for v in values]

    def record(self) -> dict[str, Any]:
        """The entry as the space file gives it (for the study's record and comparisons)."""
        entry: dict[str, Any] = {"type": self.type}
        if self.type == "categorical":
            entry["choices"] = list(self.choices)
        else:
            entry.update(low=self.low, high=self.high, log=self.log)
            if self.step is not None:
                entry["step"] = self.step
        return entry


@dataclass(frozen=True)
class SearchSpace:
    """The parameters of a sweep, in file order."""

    parameters: tuple[Parameter, ...]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.parameters]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """One value per key, drawn by the trial's sampler."""
        return {p.key: p.suggest(trial) for p in self.parameters}

    def grid(self) -> dict[str, list[Any]]:
        """Every key's grid values (:meth:`Parameter.grid`)."""
        return {p.key: p.grid() for p in self.parameters}

    def record(self) -> dict[str, dict[str, Any]]:
        return {p.key: p.record() for p in self.parameters}


def _leaf_type(key: str) -> Any:
    """The declared type of the dotted config key, or a one-line error naming the valid keys there."""
    cls: Any = EraseConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(
                f"search space: {key!r} is not an erase config key; valid keys at {where}: {', '.join(names)}"
            )
        tp = hints[part]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"search space: {key!r} is a section, not a setting; name one of its keys")
            return tp
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(
                f"search space: {key!r} is not an erase config key ({'.'.join(parts[: depth + 1])} is a setting)"
            )
        cls = tp
    raise AssertionError("unreachable")  # pragma: no cover


def _number(key: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"search space {key!r}: {name} must be a finite number, got {value!r}")
    return value


def parse_parameter(key: str, entry: Any) -> Parameter:
    """One space entry, checked: its type, bounds and that each value it can take fits the config key.

    Raises:
        ConfigError: one line naming the key and the problem.
    """
    _leaf_type(key)
    if not isinstance(entry, Mapping):
        raise ConfigError(f"search space {key!r}: expected a mapping such as {{type: float, low: 0.1, high: 1}}")
    kind = entry.get("type")
    if kind not in TYPES:
        raise ConfigError(f"search space {key!r}: type {kind!r} is not one of {', '.join(TYPES)}")
    unknown = sorted(set(entry) - _ALLOWED[kind])
    if unknown:
        raise ConfigError(
            f"search space {key!r}: {', '.join(map(str, unknown))} not allowed for type {kind} "
            f"(allowed: {', '.join(sorted(_ALLOWED[kind]))})"
        )
    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"search space {key!r}: categorical needs a non-empty list of choices")
        if len({repr(c) for c in choices}) != len(choices):
            raise ConfigError(f"search space {key!r}: choices repeat a value")
        parameter = Parameter(key, kind, choices=tuple(choices))
        values: Sequence[Any] = choices
    else:
        for name in ("low", "high"):
            if name not in entry:
                raise ConfigError(f"search space {key!r}: type {kind} needs low and high")
        low, high = _number(key, "low", entry["low"]), _number(key, "high", entry["high"])
        log, step = entry.get("log", False), entry.get("step")
        if not isinstance(log, bool):
            raise ConfigError(f"search space {key!r}: log must be true or false, got {log!r}")
        if kind == "int" and not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
            raise ConfigError(f"search space {key!r}: an int range needs integer low and high, got {low!r}, {high!r}")
        if low >= high:
            raise ConfigError(f"search space {key!r}: low ({low}) must be below high ({high})")
        if log and low <= 0:
            raise ConfigError(f"search space {key!r}: a log range needs low > 0, got {low}")
        if step is not None:
            step = _number(key, "step", step)
            if step <= 0 or (kind == "int" and not isinstance(step, int)):
                raise ConfigError(f"search space {key!r}: step must be a positive {kind}, got {step!r}")
            if log and (kind == "float" or step != 1):
                raise ConfigError(f"search space {key!r}: log and step cannot be combined")
        parameter = Parameter(key, kind, low=low, high=high, log=log, step=step)
        values = (low, high)
    probe = copy.deepcopy(EraseConfig())
    for value in values:
        try:
            set_value(probe, key, value)
        except ConfigError as exc:  # the config's own check: a type or a choice the key does not take
            raise ConfigError(f"search space {key!r}: {exc}") from None
    return parameter


def parse_space(data: Any, source: str = "search space") -> SearchSpace:
    """A :class:`SearchSpace` from the YAML file's mapping (key -> entry).

    Raises:
        ConfigError: the mapping is empty or an entry is invalid (:func:`parse_parameter`).
    """
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(
            f"{source}: expected a mapping of config keys to ranges, "
            "e.g. loss.erase_weight: {type: float, low: 1, high: 10}"
        )
    return SearchSpace(tuple(parse_parameter(str(key), entry) for key, entry in data.items()))


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a ``space.yaml`` (module docstring).

    Raises:
        ConfigError: a missing or unreadable file, invalid YAML, or an invalid entry.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"search space file {str(path)!r} is not valid YAML: {first}") from None
    return parse_space(data, f"search space file {str(path)!r}")
