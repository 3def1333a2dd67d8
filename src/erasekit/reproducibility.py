"""Repeatable CPU numerics: the settings that make the same training give the same mask twice.

Mask training is chaotic: a difference in the last bit of one gradient moves the logits, which moves
the next step's mask, and after a few hundred steps the run lands on another mask. On a CPU the bits
depend on which kernels run, and PyTorch and MKL pick their kernels by the processor's instruction
set (AVX-512 where the processor has it, AVX2 otherwise). Measured on the ShapesCanvas demo recipe:
ten iterations with the AVX-512 and the AVX2 kernels already end on different logits, whereas one
and two threads, and an idle and a fully loaded machine, give the same logits bit for bit.

:func:`pin_cpu_numerics` therefore pins the instruction set to AVX2 (which every x86 processor of
the last decade has) for PyTorch's own kernels, oneDNN and MKL (MKL's conditional numerical
reproducibility), turns off the libraries' dynamic thread counts, lets waiting OpenMP threads sleep
instead of spin (on a busy machine spinning threads fight the other processes for the cores and an
iteration took 15 times as long), and sets the number of threads. The instruction set is read when
the libraries load or first run, so the variables must be set before :mod:`torch` is imported: the CLI
calls it first thing for the commands that run a model (``erase``, ``generate``, ``evaluate``, ``demo``),
and the test suite's ``conftest.py`` before any test imports torch;
:func:`numerics_record` says what is in force (it is written into ``metrics.json``).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

#: Environment of the pinned CPU numerics (set only where the user has not set them).
PINNED_ENVIRONMENT: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's vectorised kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (convolutions, some matmuls)
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility
    "MKL_DYNAMIC": "FALSE",  # no thread counts chosen by the load
    "OMP_DYNAMIC": "FALSE",
    "OMP_WAIT_POLICY": "PASSIVE",  # idle threads sleep: a busy machine slows the run, not stalls it
}


def pin_cpu_numerics(threads: int | None = None) -> list[str]:
    """Set :data:`PINNED_ENVIRONMENT` (keeping the user's own values) and, if given, the thread count.

    Returns the names of the variables set after :mod:`torch` was imported, which may not take effect
    (OpenMP reads its settings when torch loads it; the kernels are chosen at their first use), empty
    when torch was not imported yet. :func:`numerics_record` says what is in force.
    """
    late = []
    for name, value in PINNED_ENVIRONMENT.items():
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
    """What decides the bits of a CPU run: versions, threads, instruction set in use, the pinned variables."""
    import torch

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "processor": platform.processor() or platform.machine(),
        "environment": {
            name: os.environ.get(name) for name in (*PINNED_ENVIRONMENT, "OMP_NUM_THREADS", "MKL_NUM_THREADS")
        },
    }
