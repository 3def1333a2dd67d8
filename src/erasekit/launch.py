"""How the processes of a run were launched: the one case that silently gives fewer than asked for."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def single_process_launch() -> bool:
    """Whether ``accelerate launch --num_processes N`` (N > 1) started this process alone.

    accelerate's simple launcher (``--cpu``, or no ``--multi_gpu`` on a machine without GPUs) starts
    one process whatever ``--num_processes`` says; it sets ``ACCELERATE_USE_CPU`` for every launch,
    and ``MASTER_ADDR`` only when more than one process was asked for, but no ``WORLD_SIZE`` (which
    torchrun and the multi-GPU launcher set for each of the processes they start).
    """
    env = os.environ
    return "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env


def warn_if_single_process(num_processes: int, command: str) -> None:
    """Log a warning when the launch asked for several processes and this is the only one."""
    if num_processes == 1 and single_process_launch():
        logger.warning(
            "accelerate launch started ONE process, not the --num_processes asked for (its launcher starts one on a "
            "CPU); for N processes run: torchrun --standalone --nproc_per_node N -m erasekit.cli %s ...",
            command,
        )
