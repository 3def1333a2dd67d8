"""A real 2-process data-parallel CPU training run (torchrun + gloo) against a 1-process run.

``accelerate launch --cpu --num_processes 2`` starts a single process on a machine without
multi-CPU setup, so the workers are started with ``python -m torch.distributed.run``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from erasekit.config import load_config
from erasekit.methods.mask.trainer import MaskTrainer
from erasekit.pipeline import load_pipeline
from erasekit.training.run import make_accelerator, staging_path

WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT_S = 420

pytestmark = pytest.mark.slow


def _read_log(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _one_process_run(overrides: list[str], output: Path) -> dict[str, torch.Tensor]:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = load_config(None, overrides)
        accelerator = make_accelerator(config, staging_path(output))
        assert accelerator.num_processes == 1
        pipe = load_pipeline(config.model.id, config.model.dtype, "cpu")
        return MaskTrainer(pipe, config, output, accelerator).fit().logits
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)


def test_two_processes_equal_one_process_with_double_batch(tiny_train_overrides: Any, tmp_path: Path) -> None:
    # A moderate learning rate: Adam's 1/(sqrt(v) + eps) turns the float noise of the two ways of
    # averaging the same gradient (all-reduce of per-rank means vs one batch mean) into update
    # differences of about lr * 1e-4 on near-zero gradients.
    common = dict(train__iterations=3, mask__neurons__lr=0.01, mask__norm__lr=0.01)
    results, output = tmp_path / "results", tmp_path / "mask-2proc"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MASTER_", "ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))
    }
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(WORKER), "--output", str(output), "--results", str(results),
        *tiny_train_overrides(train__batch_size=1, **common),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s; stderr:\n{exc.stderr}")
    if done.returncode != 0:
        pytest.fail(
            f"torchrun exited with {done.returncode}\nstdout:\n{done.stdout[-6000:]}\nstderr:\n{done.stderr[-12000:]}"
        )

    reports = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["num_processes"] == 2 and r["world_size"] == 2 for r in reports), reports
    assert all("MULTI_CPU" in r["distributed_type"] and r["device"].startswith("cpu") for r in reports), json.dumps(
        reports
    )
    assert reports[0]["pid"] != reports[1]["pid"]
    assert [r["is_main_process"] for r in reports] == [True, False]
    assert [r["wrote_artifact"] for r in reports] == [True, False], "only rank 0 writes the artefact"

    logits = [load_file(str(results / f"rank{r}.safetensors")) for r in range(2)]
    assert logits[0].keys() == logits[1].keys()
    for key in logits[0]:
        assert torch.equal(logits[0][key], logits[1][key]), f"ranks disagree on {key}"

    assert output.is_dir() and not staging_path(output).exists()
    record = json.loads((output / "erasure.json").read_text())
    assert record["training"]["processes"] == 2
    saved = load_file(str(output / "masks.safetensors"))
    assert all(torch.equal(saved[k], logits[0][k]) for k in saved)
    rows = _read_log(output / "training_log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3], "one log row per step, from rank 0 only"

    single_output = tmp_path / "mask-1proc"
    single = _one_process_run(tiny_train_overrides(train__batch_size=2, **common), single_output)
    assert single.keys() == logits[0].keys()
    assert any(not torch.equal(v, torch.full_like(v, 0.5)) for v in single.values())
    for key in single:
        torch.testing.assert_close(logits[0][key], single[key], rtol=0.0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    for a, b in zip(rows, _read_log(single_output / "training_log.csv"), strict=True):
        for column in ("loss", "erase", "preserve", "sparsity", "masked_fraction"):
            assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-4, abs=1e-7), column
