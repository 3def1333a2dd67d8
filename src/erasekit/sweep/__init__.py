"""Hyper-parameter sweeps on Optuna: ``erasekit sweep`` (docs/sweeps.md).

* :mod:`.space`: the ``space.yaml`` format, checked against the erase config up front;
* :mod:`.study`: :func:`run_sweep` (a stored, resumable, multi-worker, multi-objective study) and
  :func:`rescore_front`;
* :mod:`.report`: ``trials.csv``, ``front.md``, ``front.png``;
* :mod:`.shapes`: the mask method's objective on ShapesCanvas (imported on use: it loads torch and the world);
* :mod:`.command`: the command's body, :func:`main`.

Layering: beside :mod:`erasekit.evaluation`; it may import the library and :mod:`erasekit.toyworld`,
never :mod:`erasekit.cli`.
"""

from .space import Parameter, SearchSpace, load_space, parse_space
from .study import SweepError, SweepResult, load_study, rescore_front, run_sweep

__all__ = [
    "Parameter",
    "SearchSpace",
    "SweepError",
    "SweepResult",
    "load_space",
    "load_study",
    "parse_space",
    "rescore_front",
    "run_sweep",
]
