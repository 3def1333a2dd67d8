"""``erasekit bench``: cell keys, flags, the quick benchmark end to end, reruns, interruptions, two processes.

The tests that load the ShapesCanvas world share one (module fixture) and are marked slow.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from erasekit.bench import cell_key, make_settings, run_bench
from erasekit.bench import run as bench_run
from erasekit.bench.cells import CELL_FILE, CELLS, plan
from erasekit.cli import main as cli
from erasekit.config import config_to_dict
from erasekit.errors import ErasekitError
from erasekit.toyworld.demo import erasure_config as demo_erasure_config

#: A cell's inputs as the plan builds them (shortened), to mutate one leaf at a time.
INPUTS: dict[str, Any] = {
    "kind": "erasure",
    "format": 1,
    "erasekit": "0.1.0",
    "code": "ab" * 32,
    "world": {"pipeline_sha256": "cd" * 32, "morph_detectors_sha256": None, "sampling": {"steps": 12, "cfg": 6.0}},
    "numerics": {"torch": "2.13.0", "cpu_capability": "AVX2"},
    "method": "uce",
    "concepts": ["circle"],
    "recipe": {"uce": {"lam": 0.5, "concepts": []}, "train": {"gradient_checkpointing": False}},
    "protocol": {"images_per_group": 16, "seed": 1_000_003},
}


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _leaves(item, (*path, key))]
    return [path]


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, "x"]
    return "x"  # None


def test_the_key_changes_when_any_input_changes_and_not_with_the_order_of_keys():
    base = cell_key(INPUTS)
    leaves = _leaves(INPUTS)
    assert len(leaves) == 17
    keys = set()
    for path in leaves:
        mutated = copy.deepcopy(INPUTS)
        holder = mutated
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = _changed(holder[path[-1]])
        keys.add(cell_key(mutated))
    assert base not in keys and len(keys) == len(leaves)
    assert cell_key(dict(reversed(list(INPUTS.items())))) == base


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--concepts", "hexagon"], "'hexagon' is not a ShapesCanvas concept"),
        (["--attacks", "nope"], "unknown attack 'nope'"),
        (["--concepts", "circle+red"], "the concept set circle+red: the concepts 'circle', 'red' are of different"),
        (
            ["--concepts", "circle+star+circle"],
            "the concept set circle+star+circle: the concept 'circle' is given twice",
        ),
        (["--images", "0"], "images must be a positive integer"),
        (["--attack-seeds", "17"], "at most 16 attack seeds"),
        (["--threads", "0"], "--threads must be at least 1"),
    ],
)
def test_bad_flags_exit_2_in_one_line_before_anything_is_written(tmp_path, capsys, argv, message):
    output = tmp_path / "bench"
    assert cli(["bench", *argv, "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("erasekit bench: error:") and message in err, err
    assert not output.exists()


def test_a_world_that_is_none_is_refused_before_the_folder_exists(tmp_path, capsys):
    output = tmp_path / "bench"
    assert cli(["bench", "--quick", "--world", str(tmp_path), "--output", str(output)]) == 2
    assert "is not a ShapesCanvas world" in capsys.readouterr().err and not output.exists()


def test_a_folder_of_something_else_is_refused(tmp_path):
    (tmp_path / "other" / "file.txt").parent.mkdir()
    (tmp_path / "other" / "file.txt").write_text("mine")
    with pytest.raises(ErasekitError, match="folder of something else"):
        run_bench(make_settings(quick=True), tmp_path / "other")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["file.txt"]


def test_the_quick_set_and_its_flags():
    quick = make_settings(quick=True)
    assert (quick.methods, quick.concept_sets, quick.attacks) == (("uce", "flowedit"), (("circle",),), ("completion",))
    assert (quick.images, quick.attack_budget, len(quick.attack_seeds)) == (16, 4, 4)
    default = make_settings()
    assert default.concept_sets == (("circle",), ("star",), ("red",), ("checkered",), ("circle", "star"))
    assert {"mask", "uce", "flowedit"} <= set(default.methods) and "soft-prompt" in default.attacks
    assert default.attack_budget is None and len(default.attack_seeds) == 16
    mixed = make_settings(quick=True, methods=["sld"], concepts=["disc"])  # flags replace the quick choices
    assert (mixed.methods, mixed.concept_sets, mixed.images) == (("sld",), (("circle",),), 16)


def test_the_launcher_variables_give_the_rank_and_are_hidden_from_the_cells(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert bench_run.process_rank() == (1, 2)
    with bench_run.one_process():
        assert bench_run.process_rank() == (0, 1)
        assert "MASTER_ADDR" not in os.environ
    assert bench_run.process_rank() == (1, 2) and os.environ["MASTER_ADDR"] == "127.0.0.1"


# --------------------------------------------------------------------------- on the world
@pytest.fixture(scope="module")
def world():
    import torch

    from erasekit.toyworld.world import World

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield World.load()
    torch.set_num_threads(threads)


def _keys(cells: list[Any]) -> dict[str, str]:
    return {cell.label: cell.key for cell in cells}


@pytest.mark.slow
def test_the_plan_keys_follow_the_recipe_the_draw_and_the_attack_settings(world, tmp_path, monkeypatch):
    from erasekit.toyworld import demo

    base = _keys(plan(world, make_settings(quick=True)))
    assert list(base) == [
        "erasure-uce-circle",
        "erasure-flowedit-circle",
        "attack-completion-uce-circle",
        "attack-completion-flowedit-circle",
    ]
    assert base == _keys(plan(world, make_settings(quick=True)))  # the same inputs, the same keys
    images = _keys(plan(world, make_settings(quick=True, images=8)))
    assert all(images[k] != base[k] for k in base)  # the draw changes every erasure, and so its attacks
    for changed in (make_settings(quick=True, attack_budget=5), make_settings(quick=True, attack_seeds=3)):
        keys = _keys(plan(world, changed))
        assert [k for k in base if keys[k] != base[k]] == [k for k in base if k.startswith("attack")]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(demo.RECIPE.read_text().replace("lam: 0.5", "lam: 0.25"))
    monkeypatch.setattr(demo, "RECIPE", recipe)
    keys = _keys(plan(world, make_settings(quick=True)))
    assert [k for k in base if keys[k] != base[k]] == ["erasure-uce-circle", "attack-completion-uce-circle"]


@pytest.mark.slow
def test_a_concept_set_is_one_fit_of_every_concept_and_attacked_per_concept(world):
    cells = plan(world, make_settings(quick=True, methods=["uce"], concepts=["circle+star"]))
    assert [cell.label for cell in cells] == [
        "erasure-uce-circle+star",
        "attack-completion-uce-circle+star-circle",
        "attack-completion-uce-circle+star-star",
    ]
    erasure = cells[0].config
    assert erasure is not None
    assert (erasure.concept.concept, erasure.concept.more_concepts) == ("circle", ["star"])
    # the demo's recipe for the same two concepts, anchors and prompts included
    demo_recipe = demo_erasure_config(world, ["circle", "star"])
    demo_recipe.method = "uce"
    assert config_to_dict(erasure) == config_to_dict(demo_recipe)
    assert cells[1].erasure is cells[0] and cells[2].inputs["erasure"] == cells[0].key


def _without_measured(board: dict[str, Any]) -> dict[str, Any]:
    board = copy.deepcopy(board)
    for row in board["rows"]:
        row.pop("measured")
    return board


@pytest.mark.slow
def test_the_quick_bench_end_to_end_then_a_rerun_computes_nothing_and_an_interruption_loses_one_cell(
    world, tmp_path, monkeypatch
):
    output = tmp_path / "bench"
    lines: list[str] = []
    first = run_bench(make_settings(quick=True), output, world=world, log=lines.append)
    assert len(first.computed) == 4 and first.reused == []
    assert sorted(p.name for p in first.files) == ["leaderboard.json", "leaderboard.md", "report.html"]
    board = json.loads((output / "leaderboard.json").read_text())
    rows = {row["method"]: row for row in board["rows"]}
    assert sorted(rows) == ["flowedit", "uce"] and all(row["error"] is None for row in rows.values())
    original = board["original"]["circle"]
    # UCE maps circle onto square in the text projections: nearly every circle goes (98 % on the full draw)
    assert rows["uce"]["scores"]["strict_ua"] >= original["strict_ua"] + 0.5
    assert rows["uce"]["cost"]["parameters_changed"] > 0 and rows["uce"]["cost"]["artifact_bytes"] > 0
    # FlowEdit edits only prompts naming the concept: the other values' images are the original's, bit for bit
    assert rows["flowedit"]["scores"]["ira"] == original["ira"] and rows["flowedit"]["scores"]["cra"] == original["cra"]
    assert rows["flowedit"]["fidelity"] == {"psnr": None, "ssim": pytest.approx(1.0)}
    assert rows["flowedit"]["cost"]["extra_denoiser_calls_per_step"] > 0
    attack = rows["uce"]["attacks"]["completion"]
    assert attack["budget"] == 4 and 0 <= attack["pre_attack_rate"] <= attack["post_attack_rate"] <= 1
    # the attacks step the trajectory themselves, which an inference-time erasure's sampling never reaches:
    # refused in one line, and the cell is finished with that error
    assert "changes how images are sampled" in rows["flowedit"]["attacks"]["completion"]["error"]
    for row in rows.values():
        assert row["measured"]["fit_seconds"] >= 0 and row["measured"]["peak_memory_bytes"] > 100e6
    markdown = (output / "leaderboard.md").read_text()
    assert "| original model | circle |" in markdown and "| uce | circle |" in markdown
    assert (output / "report.html").read_text().count("data:image/png;base64,") == 3
    cell_folders = sorted((output / CELLS).iterdir())
    assert len(cell_folders) == 4 and all((f / CELL_FILE).is_file() for f in cell_folders)
    assert sum((f / "erasure" / "erasure.json").is_file() for f in cell_folders) == 2
    assert sum((f / "attack" / "summary.json").is_file() for f in cell_folders) == 1

    def nothing_to_compute(*args: Any) -> Any:
        raise AssertionError("a finished cell was computed again")

    from erasekit.toyworld.world import World

    lazy = World.load(pipeline=False)  # as the command loads it: the pipeline only once a cell is computed
    with monkeypatch.context() as patch:
        patch.setattr(bench_run, "compute_cell", nothing_to_compute)
        again = run_bench(make_settings(quick=True), output, world=lazy, log=lines.append)
    assert again.computed == [] and sorted(again.reused) == sorted(f.name for f in cell_folders)
    assert lazy.pipe is None, "a rerun with every cell finished loaded the pipeline"
    assert json.loads((output / "leaderboard.json").read_text()) == board

    # an interruption (Ctrl-C) in the middle of a cell: that cell is lost, nothing half-written stays
    lost = next(f for f in cell_folders if f.name.startswith("attack-completion-uce"))
    for path in sorted(lost.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    lost.rmdir()

    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(bench_run, "compute_cell", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_bench(make_settings(quick=True), output, world=world, log=lines.append)
    assert sorted(p.name for p in (output / CELLS).iterdir()) == sorted(f.name for f in cell_folders if f != lost)
    # a killed process (SIGKILL) leaves its cell's temporary folder: the next run ignores it, then removes it
    (output / CELLS / f".{lost.name}.abc123.partial").mkdir()
    resumed = run_bench(make_settings(quick=True), output, world=world, log=lines.append)
    assert resumed.computed == [lost.name] and len(resumed.reused) == 3
    assert sorted(p.name for p in (output / CELLS).iterdir()) == sorted(f.name for f in cell_folders)
    assert _without_measured(json.loads((output / "leaderboard.json").read_text())) == _without_measured(board)


@pytest.mark.slow
def test_two_processes_write_the_leaderboard_of_one(world, tmp_path):
    flags = ["--methods", "uce", "flowedit", "--concepts", "circle", "--attacks", "completion"]
    flags += ["--images", "4", "--attack-budget", "4", "--attack-seeds", "2"]
    settings = make_settings(
        methods=["uce", "flowedit"], concepts=["circle"], attacks=["completion"], images=4, attack_budget=4,
        attack_seeds=2,
    )  # fmt: skip
    one = run_bench(settings, tmp_path / "one", world=world, log=lambda line: None)
    assert len(one.computed) == 4
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MASTER_", "ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))
    }
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "erasekit.cli", "bench", *flags, "--threads", "1", "--output", str(tmp_path / "two"),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-8000:]}"
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "two" / CELLS).glob(f"*/{CELL_FILE}"))]
    assert sorted(r["rank"] for r in records) == [0, 0, 1, 1] and {r["processes"] for r in records} == {2}
    single = json.loads((tmp_path / "one" / "leaderboard.json").read_text())
    double = json.loads((tmp_path / "two" / "leaderboard.json").read_text())
    assert double["cells"] == single["cells"]  # the same keys
    assert _without_measured(double) == _without_measured(single)


def test_a_cell_that_refuses_its_input_is_finished_with_its_error_and_an_interrupted_one_leaves_nothing(tmp_path):
    from erasekit.bench.cells import Cell, read_cell, write_cell
    from erasekit.bench.report import leaderboard, markdown, report_html
    from erasekit.errors import UnsupportedError

    cell = Cell("erasure", "sld", ("circle",), {**INPUTS, "method": "sld"})
    (tmp_path / CELLS).mkdir()

    def interrupted(folder: Path) -> dict[str, Any]:
        (folder / "half-written").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_cell(tmp_path, cell, interrupted)
    assert list((tmp_path / CELLS).iterdir()) == [] and read_cell(tmp_path, cell) is None

    def refuses(folder: Path) -> dict[str, Any]:
        raise UnsupportedError("method 'sld' does not support the dit family")

    record = write_cell(tmp_path, cell, refuses, {"rank": 0})
    assert record["error"] == "method 'sld' does not support the dit family" and record["result"] == {}
    assert read_cell(tmp_path, cell) == json.loads(json.dumps(record))  # finished: a rerun reads it back
    settings = make_settings(methods=["sld"], concepts=["circle"], attacks=["completion"])
    board = leaderboard(settings, [read_cell(tmp_path, cell)])
    assert board["rows"][0]["error"] == record["error"] and board["original"] == {}
    assert f"| sld | circle | failed: {record['error']} |" in markdown(board)
    assert "failed: method &#x27;sld&#x27;" in report_html(board)  # the plots leave the failed row out
