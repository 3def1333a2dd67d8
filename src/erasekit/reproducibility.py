"""Repeatable CPU numerics: the settings that make the same training give the same mask twice.

Mask training is chaotic: a difference in the last bit of one gradient moves the logits, which moves
the next step's mask, and after a few hundred steps the run lands on another mask. On a CPU the bits
depend on which kernels run, and PyTorch and MKL pick their kernels by the processor's instruction
set (AVX-512 where the processor has it, AVX2 otherwise). Measured on the ShapesCanvas demo recipe:
ten iterations with the AVX-512 and the AVX2 kernels already end on different logits, whereas one
and two threads, and an idle and a fully loaded machine, give the same logits bit for bit.

:func:`pin_cpu_numerics` therefore pins the instruction set to AVX2 (which every x86 processor of
the last decade has) for PyTorch's own kernels, oneDNN and MKL (MKL's conditional numerical
reproducibility), turns off the libraries' dynamic thread counts, chooses how waiting OpenMP threads
wait (:func:`wait_environment`: briefly spinning on an idle machine, sleeping on a busy one), and sets
the number of threads. The instruction set is read when
the libraries load or first run, so the variables must be set before :mod:`torch` is imported: the CLI
calls it first thing for the commands that run a model (``erase``, ``generate``, ``evaluate``, ``demo``),
and the test suite's ``conftest.py`` before any test imports torch;
:func:`numerics_record` says what is in force (it is written into ``metrics.json``).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any

#: Environment of the pinned CPU numerics (set only where the user has not set them).
PINNED_ENVIRONMENT: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's vectorised kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (convolutions, some matmuls)
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility
    "MKL_DYNAMIC": "FALSE",  # no thread counts chosen by the load
    "OMP_DYNAMIC": "FALSE",
}

#: The OpenMP variables that decide how a waiting thread waits (GNU libgomp, which PyTorch's Linux wheels use).
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

#: Spins before a waiting thread sleeps, on a machine that was idle when the run started. The world's model
#: runs thousands of short parallel regions per iteration, and waking a sleeping thread for each made the
#: demo's 2-thread training a third slower on an idle 2-core machine (4.7-4.8 s per iteration against
#: 3.2-3.5 s). Beside one busy process any spinning is 2-7 times slower than sleeping (12-40 s against
#: 5.9 s), whatever the count; a bounded count keeps each wasted wait short. benchmarks/cpu_numerics.py --waits.
IDLE_SPINCOUNT = "10000"

#: Cores other processes may keep busy at the start for the machine to count as idle.
IDLE_OTHER_CORES = 0.5

#: What :func:`wait_environment` decided in this process (recorded by :func:`numerics_record`).
_wait_decision: dict[str, Any] = {}


def other_cpu_load(interval: float = 0.3) -> float | None:
    """Cores kept busy over the next ``interval`` seconds, from ``/proc/stat``; ``None`` where unreadable.

    The caller sleeps meanwhile, so the load is the other processes'.
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
        return sum(fields[:8]), idle  # user..steal: guest time is already counted in user

    try:
        total_0, idle_0 = sample()
        time.sleep(interval)
        total_1, idle_1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total_1 <= total_0:
        return None
    return (1.0 - (idle_1 - idle_0) / (total_1 - total_0)) * (os.cpu_count() or 1)


def wait_environment(other_cores: float | None) -> dict[str, str]:
    """How waiting OpenMP threads should wait, given the cores other processes keep busy (``None``: unknown).

    Spinning is faster only while the waiting thread has a core of its own, and a busy machine is the
    case that stalls, so only a machine seen idle gets bounded spinning; any other sleeps. The choice
    changes the time, never the bits (``docs/reproducibility.md``).
    """
    if other_cores is not None and other_cores < IDLE_OTHER_CORES:
        return {"GOMP_SPINCOUNT": IDLE_SPINCOUNT}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def pin_cpu_numerics(threads: int | None = None) -> list[str]:
    """Set :data:`PINNED_ENVIRONMENT` and the OpenMP wait (:func:`wait_environment`, from a 0.3 s look at
    the machine's load unless ``threads`` is 1), keeping the user's own values, and, if given, the thread count.

    Returns the names of the variables set after :mod:`torch` was imported, which may not take effect
    (OpenMP reads its settings when torch loads it; the kernels are chosen at their first use), empty
    when torch was not imported yet. :func:`numerics_record` says what is in force.
    """
    pinned = dict(PINNED_ENVIRONMENT)
    if not any(name in os.environ for name in WAIT_VARIABLES):
        # one thread never waits for another: no need to look at the machine (unknown load: sleeping)
        other = None if threads == 1 else other_cpu_load()
        pinned.update(wait_environment(other))
        _wait_decision["other_cores_busy_at_start"] = None if other is None else round(other, 2)
    late = []
    for name, value in pinned.items():
        if name not in os.environ:
            os.environ[name] = value
            if "torch" in sys.modules:
                late.append(name)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
    return late


def numerics_record() -> dict[str, Any]:
    """What decides the bits of a CPU run: versions, threads, instruction set in use, the pinned variables,
    and (``wait``) the other processes' load that chose the OpenMP wait (``None`` where it was not measured:
    one thread, or no ``/proc/stat``)."""
    import torch

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "processor": platform.processor() or platform.machine(),
        "environment": {
            name: os.environ.get(name)
            for name in (*PINNED_ENVIRONMENT, *WAIT_VARIABLES, "OMP_NUM_THREADS", "MKL_NUM_THREADS")
        },
        **({"wait": dict(_wait_decision)} if _wait_decision else {}),
    }
