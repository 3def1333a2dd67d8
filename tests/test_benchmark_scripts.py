"""The benchmark scripts keep running (smoke runs on tiny configs; their numbers are not asserted here)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_families_smoke_run_on_cpu(capsys):
    module = _load("gpu_check_families")
    assert module.main(["--device", "cpu", "--tiny", "--resolution", "32", "--steps", "2", "--iterations", "1"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["family"] for r in results] == ["sdxl", "sd3.5-medium"]
    for r in results:
        assert r["mask_units"] > 0 and r["seconds_per_iteration"] > 0 and math.isfinite(r["final_loss"])


def test_gpu_check_refuses_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert _load("gpu_check_families").main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_cache_benchmark_finds_the_shipped_entries_equal(capsys):
    _load("demo_cache").main(["--batches", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("nearest", "original", "anchor"))]
    assert len(rows) == 3 and all(row.endswith("True") for row in rows), rows


@pytest.mark.slow
def test_recipe_probe_scores_a_short_run_on_the_tuning_draw(capsys, tmp_path):
    from erasekit.toyworld import protocol

    row = _load("recipe_probe").main(
        ["--output", str(tmp_path / "mask"), "--images", "4"]
        + ["--set", "train.iterations=2", "--set", "sampling.steps=2"]
    )
    assert (tmp_path / "mask" / "masks.safetensors").is_file()
    assert 0.0 <= row["strict_ua"] <= row["ua"] + 1e-9  # a judge more can only find more circles
    assert row["seed"] == 0 and row["overrides"] == ["train.iterations=2", "sampling.steps=2"]
    tuning = {s.seed for s in protocol.tuning_samples("circle", per_group=4)}
    evaluation = {s.seed for s in protocol.evaluation_samples("circle", per_group=protocol.PER_GROUP)}
    assert min(tuning) == protocol.TUNING_SEED_BASE and not tuning & evaluation


@pytest.mark.slow
def test_iteration_cost_splits_a_profiled_iteration_into_kinds_of_work(capsys):
    module = _load("iteration_cost")
    assert module.kind_of("aten::addmm") == module.kind_of("aten::mm") == "linear layers (matrix products)"
    assert module.kind_of("aten::gelu_backward") == module.kind_of("aten::gelu") == "element-wise arithmetic"
    assert module.kind_of("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention (fused kernels)"
    assert module.kind_of("aten::topk") == "other"
    result = module.main(["--iterations", "1", "--set", "sampling.steps=2"])
    share = result["by_operation"]["share"]
    assert math.isclose(sum(share.values()), 1.0, abs_tol=0.01)
    assert share["linear layers (matrix products)"] > 0 and result["by_operation"]["seconds_per_iteration"] > 0


@pytest.mark.slow
def test_iteration_cost_times_the_phases_without_and_with_the_noise_pool(capsys):
    result = _load("iteration_cost").main(
        ["--phases", "--noise-pool", "1", "--iterations", "2", "--set", "sampling.steps=2"]
    )
    for pool in ("noise_pool=0", "noise_pool=1"):
        phases = result[pool]
        assert 0 < phases["reference_per_iteration"] + phases["masked_forward_backward_per_iteration"]
        assert phases["reference_per_iteration"] + phases["masked_forward_backward_per_iteration"] <= (
            phases["seconds_per_iteration"] + 1e-3
        )
    assert result["without_over_with_pool"] > 0


@pytest.mark.slow
def test_anchor_ceiling_scores_the_anchor_prompts_images(capsys):
    rows = _load("anchor_ceiling").main(
        ["--images", "2", "--anchor", "triangle", "--anchor", "empty", "--threads", "1"]
    )
    assert [(r["concept"], r["anchor"]) for r in rows] == [("circle", "triangle"), ("circle", "empty")]
    for row in rows:
        assert 0.0 <= row["strict_ua"] <= row["ua"] + 1e-9  # a judge more can only find more circles
    assert "| circle | triangle |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        _load("anchor_ceiling").main(["--concept", "red"])
    assert refused.value.code == 2
