"""erasekit sweep: the space file, the Optuna study (resume, several workers, the front), the report,
and one real trial of the mask objective on ShapesCanvas."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from optuna.trial import TrialState
from PIL import Image

from erasekit.errors import ConfigError
from erasekit.sweep import SweepError, load_space, load_study, parse_space, rescore_front, run_sweep
from erasekit.sweep.command import base_overrides, flatten, main

SOURCE = Path(__file__).resolve().parent.parent / "src"

SPACE = {
    "loss.erase_weight": {"type": "float", "low": 1.0, "high": 10.0, "log": True},
    "loss.preserve_weight": {"type": "float", "low": 0.0, "high": 4.0},
    "loss.distance": {"type": "categorical", "choices": ["mse", "l1"]},
}


def synthetic(params: dict, folder: Path) -> dict:
    """A trade-off like erasure vs retention: more erase weight erases more and keeps less."""
    erase = params["loss.erase_weight"] / 10
    keep = 1 - erase**2 + 0.05 * params["loss.preserve_weight"] + (0.02 if params["loss.distance"] == "l1" else 0)
    (folder / "seen.json").write_text(json.dumps(params))
    return {"strict_ua": erase, "ira": keep, "pid": os.getpid()}


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def dominates(a, b) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


# ---- the space file --------------------------------------------------------------------------------


def test_a_space_file_is_read_with_its_types(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "loss.erase_weight: {type: float, low: 2, high: 12, log: true}\n"
        "train.preservation_batch_size: {type: int, low: 2, high: 6, step: 2}\n"
        "mask.heads.lr: {type: float, low: 0.05, high: 0.2, step: 0.05}\n"
        "loss.distance: {type: categorical, choices: [mse, l1]}\n"
    )
    space = load_space(path)
    assert space.keys == ["loss.erase_weight", "train.preservation_batch_size", "mask.heads.lr", "loss.distance"]
    weight = space.parameters[0]
    assert (weight.type, weight.low, weight.high, weight.log) == ("float", 2, 12, True)
    assert space.parameters[1].grid() == [2, 4, 6]
    assert space.parameters[2].grid() == [0.05, 0.1, 0.15, 0.2]
    assert space.parameters[3].grid() == ["mse", "l1"]
    with pytest.raises(ConfigError, match="grid needs a finite set"):
        space.grid()  # the log range has no grid


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"loss.erase_weight": {"type": "normal", "low": 1, "high": 2}},
            "type 'normal' is not one of float, int, categorical",
        ),
        ({"loss.erase_weight": {"type": "float", "low": 2, "high": 2}}, r"low \(2\) must be below high \(2\)"),
        (
            {"loss.erase_wieght": {"type": "float", "low": 1, "high": 2}},
            "'loss.erase_wieght' is not an erase config key",
        ),
        ({"loss": {"type": "float", "low": 1, "high": 2}}, "'loss' is a section, not a setting"),
        ({"loss.erase_weight.x": {"type": "float", "low": 1, "high": 2}}, "loss.erase_weight is a setting"),
        ({"train.iterations": {"type": "float", "low": 0.5, "high": 2}}, "train.iterations: expected an integer"),
        ({"train.iterations": {"type": "int", "low": 1.5, "high": 2}}, "an int range needs integer low and high"),
        ({"loss.distance": {"type": "categorical", "choices": ["mse", "cosine"]}}, "'cosine' is not one of mse, l1"),
        ({"loss.distance": {"type": "categorical", "choices": []}}, "needs a non-empty list of choices"),
        ({"loss.erase_weight": {"type": "float", "low": 0, "high": 2, "log": True}}, "a log range needs low > 0"),
        ({"loss.erase_weight": {"type": "float", "low": 1, "high": 2, "choices": [1]}}, "choices not allowed"),
        ({"loss.erase_weight": {"type": "float", "low": 1}}, "needs low and high"),
        ({"loss.erase_weight": 3}, "expected a mapping"),
        ({}, "expected a mapping of config keys"),
    ],
)
def test_a_bad_space_entry_is_a_one_line_error_naming_it(entry, message):
    with pytest.raises(ConfigError, match=message) as caught:
        parse_space(entry)
    assert "\n" not in str(caught.value)


def test_a_missing_or_broken_space_file_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML") as caught:
        load_space(tmp_path / "bad.yaml")
    assert "\n" not in str(caught.value)


# ---- the study ---------------------------------------------------------------------------------------


def test_a_sweep_writes_its_report_and_the_front_is_the_non_dominated_trials(tmp_path):
    out = tmp_path / "sweep"
    result = run_sweep(synthetic, parse_space(SPACE), trials=12, output=out, metric_names=("strict_ua", "ira"), seed=3)
    done = result.study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 12 and (out / "study.db").is_file()
    front = {t.number for t in result.front}
    assert front
    for t in done:
        beaten = any(dominates(o.values, t.values) for o in done)
        assert beaten == (t.number not in front), t.number  # on the front exactly when nothing beats it
    table = rows(out / "trials.csv")
    assert [r["number"] for r in table] == [str(t.number) for t in done]
    first = done[0]
    assert float(table[0]["strict_ua"]) == pytest.approx(first.values[0])
    assert float(table[0]["loss.erase_weight"]) == pytest.approx(first.params["loss.erase_weight"])
    assert table[0]["state"] == "COMPLETE" and float(table[0]["seconds"]) >= 0 and table[0]["pid"] == str(os.getpid())
    assert json.loads((out / table[0]["folder"] / "seen.json").read_text()) == first.params
    markdown = (out / "front.md").read_text()
    assert f"{len(front)} of 12 completed trials are on the front" in markdown
    assert sum(line.startswith("| ") for line in markdown.splitlines()) == 2 + len(front)  # header + rule + rows
    image = Image.open(out / "front.png")
    assert image.size == (480, 480)
    red = sum(1 for p in image.convert("RGB").get_flattened_data() if p == (255, 0, 0))
    assert red > 20 * len(front)  # the front's points are drawn


def test_an_interrupted_sweep_resumes_and_completes_the_requested_trials(tmp_path):
    out, space, calls = tmp_path / "sweep", parse_space(SPACE), []

    def interrupted(params, folder):
        calls.append(params)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return synthetic(params, folder)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(interrupted, space, trials=5, output=out, metric_names=("strict_ua", "ira"))
    study = load_study(out)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    assert [r["state"] for r in rows(out / "trials.csv")] == ["COMPLETE", "COMPLETE", "FAIL"]  # reported first
    result = run_sweep(synthetic, space, trials=5, output=out, metric_names=("strict_ua", "ira"))
    states = [t.state for t in result.study.trials]
    assert states.count(TrialState.COMPLETE) == 5 and len(states) == 6  # 2 kept, the failed one recorded, 3 new
    table = rows(out / "trials.csv")
    assert table[2]["state"] == "FAIL" and table[2]["note"].startswith("KeyboardInterrupt")
    # a rerun of the finished study does nothing new
    again = run_sweep(synthetic, space, trials=5, output=out, metric_names=("strict_ua", "ira"))
    assert len(again.study.trials) == 6
    # nor does it redraw the parameters of trials it already has (the sampler is seeded per trial)
    drawn = [tuple(sorted(t.params.items())) for t in result.study.trials]
    assert len(set(drawn)) == len(drawn)


WORKER = """
import json, os, sys, time
from pathlib import Path
from erasekit.sweep import parse_space, run_sweep

space = parse_space(json.loads(sys.argv[1]))
out, trials, seed, mode = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

def objective(params, folder):
    if mode == "die" and int(folder.name) == 1:
        os.kill(os.getpid(), 9)  # killed mid-trial: no exception, no goodbye
    time.sleep(0.5)  # long enough that the workers' trials overlap
    return {"strict_ua": params["loss.erase_weight"] / 10, "ira": 1 - params["loss.preserve_weight"] / 8,
            "pid": os.getpid()}

run_sweep(objective, space, trials=trials, output=out, metric_names=("strict_ua", "ira"), seed=seed,
          heartbeat_interval=1, grace_period=3, poll_seconds=0.2)
"""


def _worker(tmp_path: Path, out: Path, trials: int, seed: int, mode: str = "run") -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps(SPACE), str(out), str(trials), str(seed), mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_worker_processes_share_one_study(tmp_path):
    out = tmp_path / "sweep"
    workers = [_worker(tmp_path, out, trials=10, seed=0) for _ in range(2)]  # the same seed, on purpose
    for worker in workers:
        _, err = worker.communicate(timeout=240)
        assert worker.returncode == 0, err[-2000:]
    study = load_study(out)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 10
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)  # pruned: surplus only
    assert all(t.user_attrs.get("surplus") for t in study.trials if t.state == TrialState.PRUNED)
    numbers = [t.number for t in study.trials]
    assert len(set(numbers)) == len(numbers)
    drawn = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(drawn)) == 10  # per-trial seeds: the same seed in two workers draws no trial twice
    assert len({t.user_attrs["extra:pid"] for t in done}) == 2  # both worked
    assert len({t.user_attrs["folder"] for t in done}) == 10


def test_a_killed_workers_trial_is_marked_failed_and_retried(tmp_path):
    out = tmp_path / "sweep"
    killed = _worker(tmp_path, out, trials=4, seed=0, mode="die")
    killed.communicate(timeout=120)
    assert killed.returncode == -9
    study = load_study(out)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    lost = study.trials[1].params
    resumed = _worker(tmp_path, out, trials=4, seed=0)
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-2000:]
    study = load_study(out)
    assert study.trials[1].state == TrialState.FAIL
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == lost
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    table = {r["number"]: r for r in rows(out / "trials.csv")}
    assert table["1"]["note"].startswith("no heartbeat") and table[str(retry[0].number)]["retried_from"] == "1"


def test_a_grid_sweep_tries_each_combination_once(tmp_path):
    space = parse_space(
        {
            "loss.erase_weight": {"type": "float", "low": 2.0, "high": 6.0, "step": 2.0},
            "loss.preserve_weight": {"type": "int", "low": 1, "high": 2},
            "loss.distance": {"type": "categorical", "choices": ["mse"]},
        }
    )
    result = run_sweep(
        synthetic, space, trials=50, output=tmp_path / "grid", sampler="grid", metric_names=("strict_ua", "ira")
    )
    drawn = sorted((t.params["loss.erase_weight"], t.params["loss.preserve_weight"]) for t in result.study.trials)
    assert drawn == [(w, p) for w in (2.0, 4.0, 6.0) for p in (1, 2)]


def test_a_study_is_not_continued_with_another_space_or_sampler(tmp_path):
    out = tmp_path / "sweep"
    run_sweep(synthetic, parse_space(SPACE), trials=1, output=out, metric_names=("strict_ua", "ira"))
    other = {**SPACE, "loss.preserve_weight": {"type": "float", "low": 0.0, "high": 8.0}}
    with pytest.raises(SweepError, match="was started with another space"):
        run_sweep(synthetic, parse_space(other), trials=2, output=out, metric_names=("strict_ua", "ira"))
    with pytest.raises(ConfigError, match="sampler 'random' is not one of tpe, grid"):
        run_sweep(synthetic, parse_space(SPACE), trials=2, output=out, sampler="random")
    with pytest.raises(SweepError, match="cannot open the study storage"):
        run_sweep(synthetic, parse_space(SPACE), trials=2, output=out, storage="nosuchdb://x")
    with pytest.raises(ConfigError, match="trials must be a positive integer"):
        run_sweep(synthetic, parse_space(SPACE), trials=0, output=out)


def test_the_front_is_rescored_once_and_reported(tmp_path):
    out = tmp_path / "sweep"
    result = run_sweep(synthetic, parse_space(SPACE), trials=6, output=out, metric_names=("strict_ua", "ira"))
    calls = []

    def rescore(params, folder):
        calls.append(folder.name)
        return {"strict_ua": 0.5 if params else 0.25, "ira": 0.75, "detail": {"dropped": True}}

    scores = rescore_front(result.study, rescore, out, baseline=True)
    assert set(scores) == {t.number for t in result.front} and len(calls) == len(result.front) + 1
    assert calls[-1] == "base" and all(s == {"strict_ua": 0.5, "ira": 0.75} for s in scores.values())
    record = json.loads((out / "rescored.json").read_text())
    assert record["base"] == {"strict_ua": 0.25, "ira": 0.75}
    markdown = (out / "front.md").read_text()
    assert "strict_ua (rescored)" in markdown and "| base |" in markdown
    rescore_front(load_study(out), rescore, out, baseline=True)
    assert len(calls) == len(result.front) + 1  # stored in the study: nothing scored twice


# ---- the command's body --------------------------------------------------------------------------------


def test_a_base_recipe_becomes_overrides_and_is_checked(tmp_path):
    assert flatten({"loss": {"erase_weight": 3.0, "distance": "l1"}, "train": {"trackers": ["csv"]}}) == [
        "loss.erase_weight=3.0",
        "loss.distance=l1",
        "train.trackers=[csv]",
    ]
    recipe = tmp_path / "base.yaml"
    recipe.write_text("loss:\n  erase_weight: 4\n  negative_guidance: 0.5\n")
    assert base_overrides(recipe) == ["loss.erase_weight=4", "loss.negative_guidance=0.5"]
    recipe.write_text("loss:\n  erase_wieght: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'loss.erase_wieght'"):
        base_overrides(recipe)


def test_the_command_refuses_an_unknown_method_and_a_bad_space_before_any_work(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("loss.erase_weight: {type: float, low: 3, high: 1}\n")
    with pytest.raises(ConfigError, match="method 'esd' has no sweep objective yet; use one of: mask"):
        main(method="esd", space=space, trials=2, output=tmp_path / "out")
    with pytest.raises(ConfigError, match="low \\(3\\) must be below high \\(1\\)"):
        main(method="mask", space=space, trials=2, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_one_real_mask_trial_on_shapescanvas_through_the_command(tmp_path):
    from erasekit.toyworld import protocol

    base, space = tmp_path / "base.yaml", tmp_path / "space.yaml"
    base.write_text("train: {iterations: 2}\nsampling: {steps: 2}\n")
    space.write_text("loss.erase_weight: {type: float, low: 1.0, high: 8.0}\n")
    out, lines = tmp_path / "sweep", []
    result = main(
        method="mask", config=base, space=space, trials=1, output=out, images=2, evaluation_images=2, log=lines.append
    )
    (trial,) = result.study.trials
    assert trial.state == TrialState.COMPLETE and [t.number for t in result.front] == [0]
    folder = out / "trials" / "0000"
    scores = json.loads((folder / "scores.json").read_text())
    assert list(trial.values) == [scores["strict_ua"], scores["ira"]]
    assert 0 <= scores["strict_ua"] <= scores["ua"] + 1e-9 and scores["ira"] in (0.0, 0.5, 1.0)  # 2 in-domain images
    trained = json.loads((folder / "mask" / "erasure.json").read_text())
    assert json.dumps(trained).count(repr(trial.params["loss.erase_weight"])) >= 1  # the trial's value was trained
    assert 'iterations": 2' in json.dumps(trained)  # and the base recipe's
    # the front and the base recipe, rescored on the evaluation draw (disjoint from the tuning draw)
    record = json.loads((out / "rescored.json").read_text())
    assert set(record["front"]) == {"0"} and 0 <= record["front"]["0"]["ira"] <= 1 and record["base"] is not None
    assert (out / "base" / "mask" / "masks.safetensors").is_file()
    assert "| base |" in (out / "front.md").read_text() and len(lines) == 2
    tuning = {s.seed for s in protocol.tuning_samples("circle", per_group=2)}
    assert not tuning & {s.seed for s in protocol.evaluation_samples("circle", per_group=2)}


def test_the_cli_runs_the_sweep_command_and_a_bad_space_exits_2_in_one_line(tmp_path, capsys):
    from erasekit.cli import main as cli

    space = tmp_path / "space.yaml"
    space.write_text("loss.erase_weight: {type: float, low: 2.0, high: 1.0}\n")
    code = cli(["sweep", "--space", str(space), "--trials", "2", "--output", str(tmp_path / "sweep")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("erasekit sweep: error:") and "loss.erase_weight" in err
    assert not (tmp_path / "sweep").exists()
    assert (
        cli(["sweep", "--method", "nope", "--space", str(space), "--trials", "1", "--output", str(tmp_path / "s")]) == 2
    )
    assert "mask" in capsys.readouterr().err
