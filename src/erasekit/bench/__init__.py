"""``erasekit bench``: every method x concept set x attack on ShapesCanvas, resumable, in one leaderboard.

* :mod:`.cells`: the plan (erasure cells, then attack cells), each cell's key of its inputs, and the
  cell folders a rerun reads back instead of computing again;
* :mod:`.run`: :func:`run_bench` (one process, or its share of several) and :func:`make_settings`
  (the flags, checked before anything is loaded);
* :mod:`.report`: ``leaderboard.json``, ``leaderboard.md`` and ``report.html``.

The default set: every registered method on circle, star, red, checkered and the set circle+star, every
registered attack at its default budget. A concept set of several concepts (``circle+star``, values of one
attribute) is erased by one fit, as ``erasekit demo --concept circle --concept star`` erases it; its rows
and attacks are per concept of the set, and a method that cannot erase several concepts at once refuses
the set in its cell.

Layering: beside :mod:`erasekit.sweep`; it uses the library and :mod:`erasekit.toyworld`, never the CLI.
"""

from .cells import ATTACK_SEEDS, DEFAULT_CONCEPTS, BenchSettings, Cell, cell_key, plan
from .run import QUICK, BenchResult, make_settings, run_bench

__all__ = [
    "ATTACK_SEEDS",
    "DEFAULT_CONCEPTS",
    "QUICK",
    "BenchResult",
    "BenchSettings",
    "Cell",
    "cell_key",
    "make_settings",
    "plan",
    "run_bench",
]
