"""Tests of the mask trainer on the tiny FLUX pipeline (CPU, float32, a few iterations)."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

import erasekit.methods.mask.trainer as trainer_module
from erasekit.config import EraseConfig, load_config
from erasekit.errors import ErasekitError, TrainingDivergedError
from erasekit.methods import erase
from erasekit.methods.mask.trainer import MaskTrainer, TrainResult
from erasekit.pipeline import load_pipeline
from erasekit.training.run import CHECKPOINTS, make_accelerator, staging_path

INIT = 0.5  # mask.init_lambda of the tiny training config (conftest)
LOG_COLUMNS = ("loss", "erase", "preserve", "sparsity", "masked_fraction")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine this is ~10x faster for the tiny model."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Each run builds its own Accelerator; start from a clean accelerate state (no leaks between tests)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def pipe(tiny_flux_path: str) -> Any:
    return load_pipeline(tiny_flux_path, "float32", "cpu")


def run(pipe: Any, config: EraseConfig, output: Path, resume: bool = False, **fit_kwargs: Any) -> TrainResult:
    """What ``erase`` does, with an already loaded pipeline."""
    accelerator = make_accelerator(config, staging_path(output))
    return MaskTrainer(pipe, config, output, accelerator).fit(resume=resume, **fit_kwargs)


def read_log(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_same_logits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), f"{key}: max diff {(a[key] - b[key]).abs().max().item()}"
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0.0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


def moved(logits: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(v, torch.full_like(v, INIT)) for v in logits.values())


@pytest.fixture(scope="module")
def six_steps(pipe: Any, tiny_train_config: Any, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """An uninterrupted 6-iteration run with checkpoints every 2 steps (the resume reference)."""
    config = tiny_train_config(train__iterations=6, train__checkpoint_every=2)
    return run(pipe, config, tmp_path_factory.mktemp("six") / "mask")


# --------------------------------------------------------------------------- the artefact
def test_short_run_writes_the_artifact(pipe: Any, tiny_train_config: Any, tmp_path: Path) -> None:
    config = tiny_train_config()
    output = tmp_path / "mask"
    result = run(pipe, config, output)

    assert result.output == output and result.iterations == 4
    assert output.is_dir()
    assert not staging_path(output).exists()
    assert not (output / CHECKPOINTS).exists()

    record = json.loads((output / "erasure.json").read_text())
    assert record["method"] == "mask"
    assert record["base_model"]["id"] == config.model.id
    assert record["base_model"]["denoiser_class"] == "FluxTransformer2DModel"
    assert record["concept"] == "cat" and record["anchor"] == "dog"
    assert record["settings"]["train"]["iterations"] == 4
    assert record["settings"]["mask"]["init_lambda"] == INIT
    assert record["erasekit_version"]
    assert record["training"]["processes"] == 1

    tensors = load_file(str(output / "masks.safetensors"))
    trainer = MaskTrainer(pipe, config, tmp_path / "unused", make_accelerator(config, tmp_path / "unused-log"))
    sites = {s.key: s for s in trainer.sites}
    assert set(tensors) == set(sites) == set(result.logits)
    assert {s.kind for s in sites.values()} == {"neurons", "norm"}  # heads are off by default
    for key, value in tensors.items():
        assert value.dtype == torch.float32
        assert tuple(value.shape) == (sites[key].num_units,)
        assert torch.equal(value, result.logits[key])
    assert sorted(record["unit_kinds"]) == ["neurons", "norm"]

    assert load_config(output / "config.yaml") == config

    rows = read_log(output / "training_log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for row in rows:
        for column in LOG_COLUMNS:
            assert math.isfinite(float(row[column])), (column, row)
        assert float(row["erase"]) > 0 and float(row["preserve"]) >= 0
    assert float(rows[-1]["masked_fraction"]) == pytest.approx(result.masked_fraction)

    assert moved(result.logits)
    assert result.masked_fraction > 0, "the large learning rates should switch some units off"
    assert record["stats"]["masked_units"] > 0


def test_same_seed_gives_identical_logits(pipe: Any, tiny_train_config: Any, tmp_path: Path) -> None:
    config = tiny_train_config(train__seed=3)
    first = run(pipe, config, tmp_path / "a")
    second = run(pipe, config, tmp_path / "b")
    assert moved(first.logits)
    assert_same_logits(first.logits, second.logits)
    other = run(pipe, tiny_train_config(train__seed=4), tmp_path / "c")
    assert any(not torch.equal(first.logits[k], other.logits[k]) for k in first.logits)


def test_erase_loads_the_model_and_trains(pipe: Any, tiny_train_config: Any, tmp_path: Path) -> None:
    """The library entry point: load ``config.model``, train, write; the same logits as a run on a loaded pipe."""
    config = tiny_train_config(train__iterations=2)
    result = erase(config, tmp_path / "via-erase").result
    assert result.output == tmp_path / "via-erase" and (result.output / "masks.safetensors").is_file()
    assert not staging_path(result.output).exists()
    direct = run(pipe, config, tmp_path / "direct")
    assert_same_logits(result.logits, direct.logits)


# --------------------------------------------------------------------------- checkpoints and resume
class Interrupt(Exception):
    pass


def _raise_at_3(step: int) -> None:
    if step == 3:
        raise Interrupt


@pytest.mark.parametrize("how", ["stop_after", "exception"])
def test_resume_matches_an_uninterrupted_run(
    pipe: Any, tiny_train_config: Any, six_steps: TrainResult, tmp_path: Path, how: str
) -> None:
    config = tiny_train_config(train__iterations=6, train__checkpoint_every=2)
    output = tmp_path / "mask"
    staging = staging_path(output)
    if how == "stop_after":
        partial = run(pipe, config, output, stop_after=2)
        assert partial.output == staging and partial.iterations == 2
        logged = [1, 2]
    else:
        with pytest.raises(Interrupt):
            run(pipe, config, output, on_step=_raise_at_3)
        logged = [1, 2, 3]
    assert not output.exists()
    checkpoints = sorted(p.name for p in (staging / CHECKPOINTS).iterdir())
    assert checkpoints == ["step-0000002"]
    assert [int(r["step"]) for r in read_log(staging / "training_log.csv")] == logged

    steps_seen: list[int] = []
    resumed = run(pipe, config, output, resume=True, on_step=steps_seen.append)
    assert steps_seen == [3, 4, 5, 6]
    assert resumed.output == output and output.is_dir() and not staging.exists()
    assert_same_logits(resumed.logits, six_steps.logits)
    assert_same_logits(load_file(str(output / "masks.safetensors")), six_steps.logits)

    rows = read_log(output / "training_log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    reference = read_log(six_steps.output / "training_log.csv")
    for mine, theirs in zip(rows, reference):
        for column in LOG_COLUMNS:
            assert float(mine[column]) == pytest.approx(float(theirs[column]), rel=1e-6, abs=1e-9), column


def test_resume_reads_a_checkpoint_of_the_earlier_mask_trainer(
    pipe: Any, tiny_train_config: Any, six_steps: TrainResult, tmp_path: Path
) -> None:
    """Checkpoints written before the shared training run held the logits as ``logits.safetensors``."""
    config = tiny_train_config(train__iterations=6, train__checkpoint_every=2)
    output = tmp_path / "mask"
    run(pipe, config, output, stop_after=2)
    latest = staging_path(output) / CHECKPOINTS / "step-0000002"
    (latest / "tensors.safetensors").rename(latest / "logits.safetensors")
    assert_same_logits(run(pipe, config, output, resume=True).logits, six_steps.logits)


def test_resume_with_other_settings_is_refused(pipe: Any, tiny_train_config: Any, tmp_path: Path) -> None:
    output = tmp_path / "mask"
    run(pipe, tiny_train_config(train__iterations=6, train__checkpoint_every=2), output, stop_after=2)
    changed = tiny_train_config(train__iterations=6, train__checkpoint_every=2, loss__sparsity_weight=0.5)
    with pytest.raises(ErasekitError, match="loss.sparsity_weight was 0.05 in the interrupted run, now 0.5"):
        run(pipe, changed, output, resume=True)
    assert staging_path(output).is_dir() and not output.exists()


def test_checkpoints_keep_only_the_latest(pipe: Any, tiny_train_config: Any, tmp_path: Path) -> None:
    config = tiny_train_config(train__iterations=6, train__checkpoint_every=1)
    output = tmp_path / "mask"
    run(pipe, config, output, stop_after=3)
    root = staging_path(output) / CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["step-0000003"]
    latest = root / "step-0000003"
    assert json.loads((latest / "state.json").read_text()) == {"step": 3}
    assert {p.name for p in latest.iterdir()} >= {"tensors.safetensors", "optimizer.pt", "state.pt"}


# --------------------------------------------------------------------------- refusing
def test_refuses_an_existing_output(pipe: Any, tiny_train_config: Any, tmp_path: Path) -> None:
    config = tiny_train_config()
    output = tmp_path / "mask"
    output.mkdir()
    with pytest.raises(ErasekitError, match="already exists"):
        run(pipe, config, output)
    with pytest.raises(ErasekitError, match="already exists"):
        erase(config, output)
    assert list(output.iterdir()) == [] and not staging_path(output).exists()


def test_refuses_an_interrupted_run_without_resume(pipe: Any, tiny_train_config: Any, tmp_path: Path) -> None:
    config = tiny_train_config()
    output = tmp_path / "mask"
    staging_path(output).mkdir()
    (staging_path(output) / "marker").write_text("x")
    with pytest.raises(ErasekitError, match="--resume"):
        run(pipe, config, output)
    with pytest.raises(ErasekitError, match="--resume"):
        erase(config, output)
    assert [p.name for p in staging_path(output).iterdir()] == ["marker"]
    assert not output.exists()


@pytest.mark.parametrize("staging_exists", [False, True])
def test_resume_without_a_checkpoint_fails(
    pipe: Any, tiny_train_config: Any, tmp_path: Path, staging_exists: bool
) -> None:
    config = tiny_train_config()
    output = tmp_path / "mask"
    if staging_exists:
        staging_path(output).mkdir()
    with pytest.raises(ErasekitError, match="nothing to resume") as info:
        run(pipe, config, output, resume=True)
    assert not isinstance(info.value, TrainingDivergedError)
    assert not output.exists()
    # a staging folder without a checkpoint holds nothing to resume: it is removed,
    # so that a start without --resume works
    assert not staging_path(output).exists()


# --------------------------------------------------------------------------- divergence
def test_nan_loss_raises_and_cleans_up(
    pipe: Any, tiny_train_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trainer_module.distance
    poisoned = {"on": False}

    def distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
        d = real(a, b, kind)
        return d * float("nan") if poisoned["on"] else d

    def poison(step: int) -> None:
        if step == 2:  # after a checkpoint and some log rows exist in the staging folder
            poisoned["on"] = True

    monkeypatch.setattr(trainer_module, "distance", distance)
    config = tiny_train_config(train__checkpoint_every=1)
    output = tmp_path / "mask"
    steps: list[int] = []
    with pytest.raises(TrainingDivergedError, match="iteration 3") as info:
        run(pipe, config, output, on_step=lambda s: (steps.append(s), poison(s)))
    assert info.value.exit_code == 1
    assert steps == [1, 2]
    assert not output.exists()
    assert not staging_path(output).exists()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- optimisation settings
Gradients = list[list[torch.Tensor]]  # per optimiser step, one gradient per mask parameter


@pytest.fixture
def record_gradients(monkeypatch: pytest.MonkeyPatch) -> Callable[[], Gradients]:
    """Make the trainer's AdamW record the gradients it steps with: ``record_gradients()`` before a
    run returns the list that run fills."""
    runs: list[Gradients] = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, *args: Any, **kwargs: Any) -> Any:
            runs[-1].append([p.grad.clone() for g in self.param_groups for p in g["params"]])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)

    def start() -> Gradients:
        runs.append([])
        return runs[-1]

    return start


def test_gradient_accumulation_equals_a_larger_batch(
    pipe: Any, tiny_train_config: Any, tmp_path: Path, record_gradients: Callable[[], Gradients]
) -> None:
    """batch_size=2 x 1 micro-step == batch_size=1 x 2 accumulated micro-steps (same prompts, same seeds).

    The trainer numbers samples globally (``(step * accum + micro) * batch * world + rank * batch + j``),
    so both runs see the same prompt pairs and noise seeds at every step. Two caveats, both by design:
    the hard-concrete noise is drawn once per micro-step (shared by its rows), so the test uses the
    ``sigmoid`` parameterisation; and Adam divides by sqrt(v) + 1e-8, which turns the ~1e-4 relative
    float noise of near-zero gradients into update differences of about ``lr * 1e-4``, so the logits
    are compared at a moderate learning rate while the gradients themselves are compared directly.
    """
    seen: dict[str, Gradients] = {}

    def go(name: str, **extra: Any) -> TrainResult:
        seen[name] = record_gradients()
        config = tiny_train_config(
            mask__parameterization="sigmoid", mask__neurons__lr=0.01, mask__norm__lr=0.01, train__iterations=3, **extra
        )
        return run(pipe, config, tmp_path / name)

    big = go("big", train__batch_size=2)
    accumulated = go("accum", train__batch_size=1, train__gradient_accumulation=2)
    single = go("single", train__batch_size=1)

    assert len(seen["big"]) == len(seen["accum"]) == 3
    for step, (g_big, g_acc) in enumerate(zip(seen["big"], seen["accum"])):
        for a, b in zip(g_big, g_acc, strict=True):
            torch.testing.assert_close(
                a, b, rtol=1e-3, atol=1e-8, msg=lambda m, s=step: f"gradient at step {s + 1}: {m}"
            )
    assert moved(big.logits)
    assert_same_logits(big.logits, accumulated.logits, atol=1e-5)
    # the check has teeth: one prompt pair per step is a different run
    assert any((big.logits[k] - single.logits[k]).abs().max() > 1e-3 for k in big.logits)

    rows_big = read_log(tmp_path / "big" / "training_log.csv")
    rows_acc = read_log(tmp_path / "accum" / "training_log.csv")
    for a, b in zip(rows_big, rows_acc, strict=True):
        for column in LOG_COLUMNS:
            assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-4, abs=1e-7), column


def test_negative_guidance_aims_past_the_target(pipe: Any, tiny_train_config: Any, tmp_path: Path) -> None:
    """At the first step every binary gate is open, so the concept latents are the original model's and
    the goal target + eta (target - concept) lies 1 + eta times as far from them: with eta = 1 the
    first erase term (MSE) is four times that of plain target matching; preservation is untouched."""
    first: dict[float, dict[str, str]] = {}
    for eta in (0.0, 1.0):
        config = tiny_train_config(
            mask__parameterization="binary", mask__init_lambda=3.0, train__iterations=1, loss__negative_guidance=eta
        )
        run(pipe, config, tmp_path / str(eta))
        first[eta] = read_log(tmp_path / str(eta) / "training_log.csv")[0]
    assert float(first[0.0]["erase"]) > 0
    assert float(first[1.0]["erase"]) == pytest.approx(4 * float(first[0.0]["erase"]), rel=1e-4)
    assert float(first[1.0]["preserve"]) == pytest.approx(float(first[0.0]["preserve"]), abs=1e-9)


def test_preservation_batch_size_sets_the_preservation_rows(pipe: Any, tiny_train_config: Any, tmp_path: Path) -> None:
    """One concept prompt with two preservation prompts: the first step's erase term is that of a run
    with one of each, and its preservation term that of a run with two of each (the same rows and
    noise seeds, and at the first step the same mask: sigmoid gates, partly closed, so that the
    preservation term is not zero)."""
    first: dict[str, dict[str, str]] = {}
    for name, extra in {
        "one": {"train__batch_size": 1},
        "two": {"train__batch_size": 2},
        "one_and_two": {"train__batch_size": 1, "train__preservation_batch_size": 2},
    }.items():
        config = tiny_train_config(mask__parameterization="sigmoid", train__iterations=1, **extra)
        run(pipe, config, tmp_path / name)
        first[name] = read_log(tmp_path / name / "training_log.csv")[0]
    assert float(first["one_and_two"]["erase"]) == pytest.approx(float(first["one"]["erase"]), rel=1e-5)
    assert float(first["one_and_two"]["preserve"]) == pytest.approx(float(first["two"]["preserve"]), rel=1e-5)
    # the second preservation row counts: two rows are not the first row alone
    assert float(first["one_and_two"]["preserve"]) != pytest.approx(float(first["one"]["preserve"]), rel=1e-3)


def test_noise_pool_gives_each_prompt_its_seeds_in_turn(pipe: Any, tiny_train_config: Any, tmp_path: Path) -> None:
    """With ``train.noise_pool`` N the k-th draw of a prompt takes its (k mod N)-th seed; the prompts' seeds
    are all distinct, and without a pool every draw has a new seed."""
    config = tiny_train_config(train__noise_pool=2)
    trainer = MaskTrainer(pipe, config, tmp_path / "mask", make_accelerator(config, tmp_path / "staging"))
    prompts = 4
    pooled = [[trainer._noise_seed(i, 0, prompts) for i in range(row, 6 * prompts, prompts)] for row in range(prompts)]
    for seeds in pooled:
        assert seeds[0] != seeds[1] and seeds == seeds[:2] * 3
    assert len({seed for seeds in pooled for seed in seeds}) == 2 * prompts
    # the other stream draws other seeds
    assert trainer._noise_seed(0, 1, prompts) not in {seed for seeds in pooled for seed in seeds}
    config = tiny_train_config()
    fresh = MaskTrainer(pipe, config, tmp_path / "fresh", make_accelerator(config, tmp_path / "staging2"))
    assert len({fresh._noise_seed(i, 0, prompts) for i in range(6 * prompts)}) == 6 * prompts


def test_noise_pool_computes_each_reference_once(
    pipe: Any, tiny_train_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 concept and 3 preservation prompts, one of each per step: with one seed per prompt the reference
    batches repeat every 12 steps, so 24 steps run the original model's trajectory 12 times (24 without
    a pool); a run interrupted after the first 12 rebuilds what it needs on resume and ends with the
    uninterrupted run's logits."""
    calls: list[int] = []
    original = trainer_module.run_trajectory

    def counted(*args: Any, **kwargs: Any) -> list[torch.Tensor]:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "run_trajectory", counted)
    config = tiny_train_config(train__iterations=14, train__noise_pool=1, train__checkpoint_every=12)
    whole = run(pipe, config, tmp_path / "whole")
    assert len(calls) == 12
    calls.clear()
    run(pipe, tiny_train_config(train__iterations=14), tmp_path / "fresh")
    assert len(calls) == 14

    calls.clear()
    run(pipe, config, tmp_path / "resumed", stop_after=12)
    resumed = run(pipe, config, tmp_path / "resumed", resume=True)
    assert len(calls) == 12 + 2
    assert moved(whole.logits)
    assert_same_logits(resumed.logits, whole.logits)


def test_final_threshold_closes_the_units_below_it(pipe: Any, tiny_train_config: Any, tmp_path: Path) -> None:
    """The same training with a final threshold t: the artefact holds the logits minus t, and the
    masked count is that of the logits at most t (t between the plain run's logits, so that units
    change sides)."""
    plain = run(pipe, tiny_train_config(train__iterations=3), tmp_path / "plain")
    values = torch.cat(list(plain.logits.values()))
    t = float(values.median())
    assert values.min() < t < values.max()
    shifted = run(pipe, tiny_train_config(train__iterations=3, mask__final_threshold=t), tmp_path / "shifted")
    assert_same_logits(shifted.logits, {k: v - t for k, v in plain.logits.items()})
    assert_same_logits(load_file(str(tmp_path / "shifted" / "masks.safetensors")), shifted.logits)
    closed = int((values <= t).sum())
    assert closed != int((values <= 0).sum())
    assert sum(c["masked"] for c in shifted.masked_units.values()) == closed
    record = json.loads((tmp_path / "shifted" / "erasure.json").read_text())
    assert record["stats"]["masked_units"] == closed
    assert shifted.masked_fraction == pytest.approx(closed / values.numel())


def test_intermediate_preservation_adds_the_intermediate_latents(
    pipe: Any, tiny_train_config: Any, tmp_path: Path
) -> None:
    """Sigmoid gates are partly closed from the first step, so the preservation prompts' latents differ
    from the original model's after every step: the intermediate term makes the first step's
    preservation term larger and leaves the erase term alone; the checkpointed walk and one graph
    over the trajectory train the same logits with it."""
    logs, logits = {}, {}
    for name, extra in {
        "final": {"train__gradient_checkpointing": True},
        "steps": {"train__gradient_checkpointing": True, "loss__intermediate_preservation": 2.0},
        "steps_one_graph": {"train__gradient_checkpointing": False, "loss__intermediate_preservation": 2.0},
    }.items():
        config = tiny_train_config(mask__parameterization="sigmoid", sampling__steps=3, train__iterations=2, **extra)
        logits[name] = run(pipe, config, tmp_path / name).logits
        logs[name] = read_log(tmp_path / name / "training_log.csv")
    assert float(logs["steps"][0]["erase"]) == pytest.approx(float(logs["final"][0]["erase"]), rel=1e-6)
    assert float(logs["steps"][0]["preserve"]) > 1.01 * float(logs["final"][0]["preserve"]) > 0
    for a, b in zip(logs["steps"], logs["steps_one_graph"]):
        for column in ("erase", "preserve"):
            assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-4), column
    assert_same_logits(logits["steps"], logits["steps_one_graph"], atol=1e-4)
    assert any(not torch.equal(logits["steps"][k], logits["final"][k]) for k in logits["final"])


def test_intermediate_erasure_aims_every_step(pipe: Any, tiny_train_config: Any, tmp_path: Path) -> None:
    """At the first step every binary gate is open, so after every step the concept latents are the
    original model's and each intermediate goal (target + eta (target - concept)) lies 1 + eta times as
    far from them as the target: with eta = 1 the whole erase term, final and intermediate, is four
    times that of eta = 0; the intermediate term adds to the final one and leaves preservation alone;
    the checkpointed walk and one graph train the same logits with it."""
    first: dict[str, dict[str, str]] = {}
    logits = {}
    for name, extra in {
        "final": {"loss__negative_guidance": 0.0},
        "steps": {"loss__negative_guidance": 0.0, "loss__intermediate_erasure": 2.0},
        "steps_eta": {"loss__negative_guidance": 1.0, "loss__intermediate_erasure": 2.0},
        "steps_eta_one_graph": {
            "loss__negative_guidance": 1.0,
            "loss__intermediate_erasure": 2.0,
            "train__gradient_checkpointing": False,
        },
    }.items():
        config = tiny_train_config(
            mask__parameterization="binary", mask__init_lambda=0.2, sampling__steps=3, train__iterations=2, **extra
        )
        logits[name] = run(pipe, config, tmp_path / name).logits
        first[name] = read_log(tmp_path / name / "training_log.csv")[0]
    assert float(first["steps"]["erase"]) > 1.01 * float(first["final"]["erase"]) > 0
    assert float(first["steps"]["preserve"]) == pytest.approx(float(first["final"]["preserve"]), abs=1e-9)
    assert float(first["steps_eta"]["erase"]) == pytest.approx(4 * float(first["steps"]["erase"]), rel=1e-4)
    assert_same_logits(logits["steps_eta"], logits["steps_eta_one_graph"], atol=1e-4)
    assert any(not torch.equal(logits["steps"][k], logits["final"][k]) for k in logits["final"])


def test_adversarial_conditioning_descends_its_objective() -> None:
    """On a linear predictor the attack lowers ||W c - target||^2 step by step from where it starts, leaves
    the keys it does not attack alone, and with 0 steps returns the start unchanged."""
    from erasekit.training.adversarial import adversarial_conditioning

    torch.manual_seed(0)
    weight = torch.randn(6, 6)
    start = {"prompt_embeds": torch.randn(2, 3, 6), "pooled_prompt_embeds": torch.randn(2, 6), "ids": torch.ones(2, 3)}
    target = torch.randn(2, 3, 6)

    def predict(c: dict[str, torch.Tensor]) -> torch.Tensor:
        return c["prompt_embeds"] @ weight + c["pooled_prompt_embeds"][:, None, :]

    found, history = adversarial_conditioning(predict, start, target, steps=20, lr=0.05)
    assert len(history) == 21
    assert history[-1] < 0.5 * history[0]
    assert history[0] == pytest.approx(float((predict(start) - target).pow(2).flatten(1).mean(1).sum()))
    assert torch.equal(found["ids"], start["ids"])
    assert not torch.equal(found["prompt_embeds"], start["prompt_embeds"])
    assert not found["prompt_embeds"].requires_grad
    unchanged, none = adversarial_conditioning(predict, start, target, steps=0, lr=0.05)
    assert none == [] and all(torch.equal(unchanged[k], start[k]) for k in start)


def test_adversarial_training_attacks_the_mask_as_it_is(
    pipe: Any, tiny_train_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train.adversarial.steps``: every micro-step runs the inner attack on the concept rows against the
    current mask (its objective falls), the mask trains on what it found (other logits than without the
    attack), and the same seed trains the same mask twice."""
    histories: list[list[float]] = []
    original = trainer_module.adversarial_conditioning

    def spy(*args: Any, **kwargs: Any) -> Any:
        found, history = original(*args, **kwargs)
        histories.append(history)
        return found, history

    monkeypatch.setattr(trainer_module, "adversarial_conditioning", spy)
    extra = {"mask__parameterization": "sigmoid", "sampling__steps": 3, "train__iterations": 2}
    attacked = run(pipe, tiny_train_config(train__adversarial__steps=3, **extra), tmp_path / "a")
    assert len(histories) == 2
    for history in histories:
        assert len(history) == 4 and history[-1] < history[0]
    again = run(pipe, tiny_train_config(train__adversarial__steps=3, **extra), tmp_path / "b")
    assert_same_logits(attacked.logits, again.logits)
    plain = run(pipe, tiny_train_config(**extra), tmp_path / "plain")
    assert len(histories) == 4  # the plain run never attacked
    assert any(not torch.equal(attacked.logits[k], plain.logits[k]) for k in plain.logits)
    record = json.loads((tmp_path / "a" / "erasure.json").read_text())
    assert record["settings"]["train"]["adversarial"] == {"steps": 3, "lr": 0.1}


def test_zero_learning_rate_freezes_a_unit_kind(pipe: Any, tiny_train_config: Any, tmp_path: Path) -> None:
    config = tiny_train_config(mask__norm__lr=0.0, train__iterations=3)
    result = run(pipe, config, tmp_path / "mask")
    norm = {k: v for k, v in result.logits.items() if k.startswith("norm/")}
    neurons = {k: v for k, v in result.logits.items() if k.startswith("neurons/")}
    assert norm and neurons
    for key, value in norm.items():
        assert torch.equal(value, torch.full_like(value, INIT)), key
    assert moved(neurons)
    rows = read_log(tmp_path / "mask" / "training_log.csv")
    assert {float(r["lr_norm"]) for r in rows} == {0.0}
    assert {float(r["lr_neurons"]) for r in rows} == {2.0}


def test_without_gradient_checkpointing_the_gradients_are_the_same(
    pipe: Any,
    tiny_train_config: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    record_gradients: Callable[[], Gradients],
) -> None:
    """``train.gradient_checkpointing=false`` (one graph over the trajectory) changes speed and memory only."""
    used: list[str] = []
    for name in ("checkpointed_gradient", "naive_gradient"):
        original = getattr(trainer_module, name)
        monkeypatch.setattr(trainer_module, name, lambda *a, _f=original, _n=name, **k: used.append(_n) or _f(*a, **k))
    seen: dict[bool, Gradients] = {}
    for checkpointing in (True, False):
        seen[checkpointing] = record_gradients()
        config = tiny_train_config(train__iterations=3, train__gradient_checkpointing=checkpointing)
        run(pipe, config, tmp_path / str(checkpointing))
    assert used == ["checkpointed_gradient"] * 3 + ["naive_gradient"] * 3
    assert len(seen[True]) == len(seen[False]) == 3
    for step, (grads_a, grads_b) in enumerate(zip(seen[True], seen[False])):
        a, b = torch.cat([g.flatten() for g in grads_a]), torch.cat([g.flatten() for g in grads_b])
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=lambda m, s=step: f"gradient at step {s + 1}: {m}")
