"""``erasekit bench``: compute the cells a process owns, wait for the others', write the leaderboard.

Several processes (``torchrun --nproc_per_node N -m erasekit.cli bench ...``, or ``accelerate launch``
with several processes) split the cells: process ``r`` of ``n`` computes cell ``i`` when
``i % n == r`` (:func:`erasekit.bench.cells.plan` orders the erasure cells first). They share
nothing but the output folder: each cell is fitted, scored and attacked by one process alone, with
the launcher's process-group variables hidden from it (:func:`one_process`), because a method's fit
builds an accelerate ``Accelerator`` that would otherwise join the other processes' group and
average their gradients into its own (or wait at their barriers). Process 0 then waits until every
cell's folder exists and writes the leaderboard; the cells' results do not depend on which process
computed them, so the leaderboard is the one a single process writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError, ErasekitError
from ..launch import warn_if_single_process
from ..outputs import check_output, make_directory, write_atomically
from .cells import (
    ATTACK_SEEDS,
    DEFAULT_CONCEPTS,
    BenchSettings,
    Cell,
    check_concept_set,
    compute_cell,
    plan,
    read_cell,
    remove_partials,
    write_cell,
)

#: The marker of a benchmark folder (a rerun continues in it; any other non-empty folder is refused).
MARKER = "bench.json"
MARKER_FORMAT = "erasekit-bench"

#: The launchers' variables that make accelerate (and torch.distributed) see several processes:
#: torchrun's and accelerate's, and those of the MPI launchers accelerate reads.
PROCESS_GROUP_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PMI_RANK",
    "PMI_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MV2_COMM_WORLD_RANK",
    "MV2_COMM_WORLD_SIZE",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS",
)


def process_rank() -> tuple[int, int]:
    """``(rank, number of processes)`` as the launcher set them (``(0, 1)`` when launched alone)."""
    from accelerate.utils.environment import get_int_from_env

    rank = get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0)
    size = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    return rank, size


@contextlib.contextmanager
def one_process() -> Iterator[None]:
    """Hide the launcher's process-group variables for the block (module docstring), then restore them."""
    saved = {name: os.environ.pop(name) for name in PROCESS_GROUP_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@dataclass
class BenchResult:
    """What a run did: the cells it computed and those it found finished, and the files it wrote."""

    output: Path
    rank: int
    processes: int
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def check_bench_output(output: str | os.PathLike[str]) -> Path:
    """Refuse an output the benchmark cannot write or continue, creating nothing.

    Raises:
        ErasekitError: a file, an unwritable place, or a non-empty folder that is no benchmark's.
    """
    target = check_output(output, overwrite=True)
    if target.is_dir() and any(target.iterdir()) and not (target / MARKER).is_file():
        raise ErasekitError(
            f"output {str(target)!r} is a folder of something else (no {MARKER}); choose another --output"
        )
    return target


def prepare_output(output: str | os.PathLike[str]) -> Path:
    """The benchmark folder: created with its marker, or an earlier benchmark's folder to continue.

    Raises:
        ErasekitError: as :func:`check_bench_output`.
    """
    target = check_bench_output(output)
    make_directory(target)
    if not (target / MARKER).is_file():
        marker = {"format": MARKER_FORMAT, "format_version": 1, "erasekit_version": __version__}
        write_atomically(target / MARKER, json.dumps(marker, indent=2) + "\n")
    return target


def wait_for(
    output: Path, cells: list[Cell], log: Callable[[str], None], poll: float = 2.0, what: str = "cells"
) -> None:
    """Return once every cell of ``cells`` is finished (by any process), saying what it waits for."""
    missing = [c for c in cells if read_cell(output, c) is None]
    if missing:
        log(f"bench: waiting for {len(missing)} {what} of the other processes")
    while missing:
        time.sleep(poll)
        missing = [c for c in missing if read_cell(output, c) is None]


def run_bench(
    settings: BenchSettings,
    output: str | os.PathLike[str],
    *,
    world: Any = None,
    world_path: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
    poll: float = 2.0,
) -> BenchResult:
    """Run (or continue) the benchmark ``settings`` into ``output``; return what this process did.

    Every cell already finished in ``output`` is read back, not computed again. Under a launcher of
    several processes this process computes its share (module docstring); process 0 writes
    ``leaderboard.json``, ``leaderboard.md`` and ``report.html`` once every cell is finished.

    Args:
        settings: methods, concept sets, attacks, images per group, attack budget and seeds.
        output: the benchmark folder (created, or continued).
        world: a loaded ShapesCanvas world (default: ``world_path``'s, else the shipped one).
        log: where progress lines go.
        poll: seconds between looks for the other processes' cells.

    Raises:
        ErasekitError: an output that is not a benchmark's folder, a budget an attack cannot use.
    """
    from ..toyworld.world import World
    from .report import write_reports

    started = time.perf_counter()
    rank, processes = process_rank()
    if not 0 <= rank < processes:
        raise ConfigError(f"bench: process rank {rank} is not below the number of processes {processes}")
    warn_if_single_process(processes, "bench")  # `accelerate launch --cpu --num_processes N` starts one
    check_bench_output(output)
    # the pipeline loads when a cell is computed: a rerun that finds every cell finished never needs it
    world = world or World.load(world_path, pipeline=False)
    with one_process():
        cells = plan(world, settings)  # a budget an attack cannot use fails here, before the folder exists
    target = prepare_output(output)
    result = BenchResult(output=target, rank=rank, processes=processes)
    mine = [(i, cell) for i, cell in enumerate(cells) if i % processes == rank]
    context = {"erasekit_version": __version__, "rank": rank, "processes": processes}
    for i, cell in mine:
        where = f"[{i + 1}/{len(cells)}] {cell.label}"
        if read_cell(target, cell) is not None:
            result.reused.append(cell.name)
            continue
        if cell.erasure is not None:
            wait_for(target, [cell.erasure], log, poll, what="erasure cell")
        log(f"bench: {where} ...")
        with one_process():
            record = write_cell(
                target, cell, lambda folder, c=cell: compute_cell(world, settings, target, c, folder), context
            )
        result.computed.append(cell.name)
        log(f"bench: {where} {'failed: ' + record['error'] if record['error'] else 'done'} ({record['seconds']:.0f} s)")
    if rank == 0:
        wait_for(target, cells, log, poll)
        remove_partials(target)  # what a killed run left; every process is past its cells now
        records = [read_cell(target, c) for c in cells]
        result.files = write_reports(target, settings, [r for r in records if r is not None], world)
        log(f"bench: {len(result.computed)} cells computed, {len(result.reused)} reused; {target / 'leaderboard.md'}")
    result.seconds = time.perf_counter() - started
    return result


#: ``--quick``: two training-free methods, one concept, 16 images per group, one cheap attack at a small
#: budget (the completion probe: 4 of the world's 12 steps by the original model) on 4 seeds.
QUICK = {
    "methods": ("uce", "flowedit"),
    "concepts": ("circle",),
    "attacks": ("completion",),
    "images": 16,
    "attack_budget": 4,
    "attack_seeds": ATTACK_SEEDS[:4],
}


def make_settings(
    *,
    methods: list[str] | None = None,
    concepts: list[str] | None = None,
    attacks: list[str] | None = None,
    images: int | None = None,
    attack_budget: int | None = None,
    attack_seeds: int | None = None,
    quick: bool = False,
) -> BenchSettings:
    """The benchmark the flags describe, checked before anything is loaded.

    Unset flags take the default set (every registered method and attack, :data:`DEFAULT_CONCEPTS`, the
    protocol's images per group, each attack's default budget, :data:`ATTACK_SEEDS`) or with ``quick``
    :data:`QUICK`. A concept set is ``a+b`` (several concepts erased together).

    Raises:
        ErasekitError: an unknown method, concept or attack, a concept set the protocol cannot erase
            together (:func:`erasekit.bench.cells.check_concept_set`), numbers below 1.
    """
    from ..attacks import attack_names, get_attack
    from ..methods import available_methods, get_method
    from ..toyworld import protocol

    for name, value in (("images", images), ("attack budget", attack_budget), ("attack seeds", attack_seeds)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"bench: {name} must be a positive integer, got {value!r}")
    if attack_seeds is not None and attack_seeds > len(ATTACK_SEEDS):
        raise ConfigError(f"bench: at most {len(ATTACK_SEEDS)} attack seeds, got {attack_seeds}")
    base: dict[str, Any] = dict(QUICK) if quick else {}
    methods = list(dict.fromkeys(methods or base.get("methods") or available_methods()))
    for method in methods:
        get_method(method)
    sets: list[tuple[str, ...]] = []
    for text in concepts or base.get("concepts") or ["+".join(s) for s in DEFAULT_CONCEPTS]:
        words = tuple(protocol.resolve_concept(w)[1] for w in text.split("+") if w.strip())
        if not words:
            raise ConfigError(f"bench: {text!r} names no concept")
        check_concept_set(words)
        if words not in sets:
            sets.append(words)
    attacks = list(dict.fromkeys(attacks or base.get("attacks") or attack_names()))
    for attack in attacks:
        get_attack(attack)
    return BenchSettings(
        methods=tuple(methods),
        concept_sets=tuple(sets),
        attacks=tuple(attacks),
        images=images or base.get("images") or protocol.PER_GROUP,
        attack_budget=attack_budget or base.get("attack_budget"),
        attack_seeds=ATTACK_SEEDS[:attack_seeds] if attack_seeds else base.get("attack_seeds", ATTACK_SEEDS),
    )
