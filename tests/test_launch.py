"""``accelerate launch --cpu --num_processes N`` (N > 1) runs one process: erasekit says so, and how to run N."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from erasekit.launch import single_process_launch

LAUNCHER_PREFIXES = ("MASTER_", "ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def accelerate_environment(*flags: str) -> dict[str, str]:
    """The variables accelerate's own launcher adds for ``accelerate launch FLAGS script.py``."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args([*flags, "script.py"]))
    _, env = prepare_simple_launcher_cmd_env(args)
    return {k: v for k, v in env.items() if k not in os.environ or os.environ[k] != v}


@pytest.mark.parametrize(("processes", "alone"), [("2", True), ("4", True), ("1", False)])
def test_single_process_launch_is_told_from_what_accelerate_sets(processes, alone, monkeypatch):
    for key in list(os.environ):
        if key.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(key)
    for key, value in accelerate_environment("--cpu", "--num_processes", processes).items():
        monkeypatch.setenv(key, value)
    assert single_process_launch() is alone
    # torchrun (and accelerate's multi-process launchers) give every process its WORLD_SIZE
    monkeypatch.setenv("WORLD_SIZE", processes)
    assert not single_process_launch()


@pytest.mark.slow
def test_accelerate_launch_cpu_with_two_processes_warns(tiny_flux_path, tmp_path: Path):
    output = tmp_path / "mask"
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    env.update(HF_HUB_OFFLINE="1")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "erasekit.cli", "erase", "--model", tiny_flux_path,
        "--concept", "cat", "--steps", "1", "--resolution", "32", "--iterations", "1", "--set", "model.device=cpu",
        "--set", "sampling.max_sequence_length=16", "--output", str(output),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "accelerate launch started ONE process" in done.stderr
    assert "torchrun --standalone --nproc_per_node N -m erasekit.cli erase" in done.stderr
    assert json.loads((output / "erasure.json").read_text())["training"]["processes"] == 1
