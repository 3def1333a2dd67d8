"""``erasekit evaluate`` split over 2 processes (torchrun + gloo on CPU) equals a 1-process run.

Run as a script under torchrun, this file is the worker: it sets up ``Accelerator(cpu=True)`` (as
tests/test_distributed.py does; ``accelerate launch --cpu`` starts one process on such a machine)
and runs the CLI.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TIMEOUT_S = 300


def _worker(argv: list[str]) -> int:
    import torch
    from accelerate import Accelerator

    from erasekit.cli import main

    torch.set_num_threads(1)
    Accelerator(cpu=True)
    return main(argv)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))

import pytest  # noqa: E402

pytestmark = pytest.mark.slow


def test_two_processes_write_the_same_evaluation_as_one(tiny_flux_path: str, tmp_path: Path) -> None:
    import torch

    from erasekit.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\na house by a lake\n")
    flags = ["evaluate", "--model", tiny_flux_path, "--masks", "", "--prompts", str(prompts),
             "--seed", "0", "--seed", "1", "--batch-size", "2", "--steps", "1", "--resolution", "32",
             "--max-sequence-length", "16", "--device", "cpu", "--dtype", "float32",
             "--metrics", "ssim,psnr,cost"]  # fmt: skip
    # a mask: zero logits on one site keep nothing there (logit <= 0), so the variant differs from the original
    from erasekit.methods.mask.artifact import save_mask_artifact
    from erasekit.pipeline import denoiser_of, load_pipeline

    pipe = load_pipeline(tiny_flux_path, "float32", "cpu")
    arch, denoiser = denoiser_of(pipe)
    site = [s for s in arch.sites(denoiser) if s.key.startswith("neurons/")][0]
    logits = {
        site.key: torch.cat(
            [torch.full((site.num_units // 2,), -1.0), torch.full((site.num_units - site.num_units // 2,), 1.0)]
        )
    }
    from erasekit.methods.mask.artifact import base_model_record

    mask = save_mask_artifact(
        tmp_path / "half-mask", logits, {"base_model": base_model_record(denoiser, tiny_flux_path)}
    )
    flags[flags.index("--masks") + 1] = str(mask)

    two = tmp_path / "two"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MASTER_", "ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))
    }
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        *flags,
        "--output",
        str(two),
    ]
    try:
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s; stderr:\n{exc.stderr}")
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-8000:]}"
    assert done.stdout.count("evaluation written to") == 1, "only the main process reports"

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same kernels, so the same bits
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main([*flags, "--output", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)

    a, b = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert a["timing"]["processes"] == 1 and b["timing"]["processes"] == 2
    # 6 jobs in 3 batches of 2: the main process generated batches 0 and 2, the other one batch 1
    assert b["timing"]["images_generated"] == {"original": 4, "half-mask": 4}
    assert {k: v for k, v in a.items() if k != "timing"} == {k: v for k, v in b.items() if k != "timing"}
    assert (one / "results.jsonl").read_bytes() == (two / "results.jsonl").read_bytes()
    assert a["metrics"]["half-mask"]["ssim"] < 1.0
    assert sorted(p.name for p in (two / "images" / "original").iterdir()) == sorted(
        p.name for p in (one / "images" / "original").iterdir()
    )
    assert not list(tmp_path.glob(".*.partial"))
