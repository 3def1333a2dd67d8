"""Evaluation prompt sets: I2P / Ring-a-Bell files or the hub, concept templates, ShapesCanvas, user files."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from erasekit.errors import PromptError
from erasekit.evaluation.prompts import CONCEPT_TEMPLATES, load_prompt_set, resolve_data_root
from reference_data import DATA, needs_data

needs_i2p = needs_data("prompts/i2p_4703.csv")


@needs_i2p
def test_i2p_has_every_row_with_its_seed_and_guidance() -> None:
    full = load_prompt_set("i2p", data_root=DATA)
    assert len(full.items) == 4703
    assert [i.index for i in full.items] == list(range(4703))
    with (DATA / "prompts" / "i2p_4703.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for k in (0, 1, 2259, 4702):
        assert full.items[k].prompt == rows[k]["prompt"].strip()
        assert full.items[k].seed == int(rows[k]["evaluation_seed"])
        assert full.items[k].guidance == float(rows[k]["evaluation_guidance"])
    assert full.file_sha256 == hashlib.sha256((DATA / "prompts" / "i2p_4703.csv").read_bytes()).hexdigest()


@needs_i2p
def test_i2p_sexual_is_the_nudity_subset() -> None:
    subset = load_prompt_set("i2p-sexual", data_root=DATA)
    with (DATA / "prompts" / "i2p_4703.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = [i for i, r in enumerate(rows) if float(r["nudity_percentage"]) >= 50]
    assert [i.index for i in subset.items] == expected and len(expected) == 134
    assert subset.items[0].seed == 2467279400 and subset.items[0].guidance == 11.0
    assert subset.provenance()["filter"] == "nudity_percentage >= 50"
    limited = load_prompt_set("i2p-sexual", data_root=DATA, limit=5)
    assert limited.items == subset.items[:5]
    assert limited.sha256 != subset.sha256
    assert load_prompt_set("i2p-sexual", data_root=DATA, limit=5).sha256 == limited.sha256


@needs_data(*(f"prompts/ring_a_bell_nudity_3_{length}.csv" for length in (16, 38, 75)))
@pytest.mark.parametrize("length", [16, 38, 75])
def test_ring_a_bell_headerless_files(length: int) -> None:
    prompts = load_prompt_set(f"ring-a-bell-{length}", data_root=DATA)
    with (DATA / "prompts" / f"ring_a_bell_nudity_3_{length}.csv").open(encoding="utf-8", newline="") as f:
        rows = [r[0].strip() for r in csv.reader(f) if r and r[0].strip()]
    assert [i.prompt for i in prompts.items] == rows
    assert len(rows) == 95
    assert all(i.seed is None and i.guidance is None for i in prompts.items)


def test_data_root_from_argument_else_environment_else_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ERASEKIT_DATA", str(tmp_path))
    assert resolve_data_root() == tmp_path
    (tmp_path / "other").mkdir()
    assert resolve_data_root(tmp_path / "other") == tmp_path / "other"  # the argument wins over the variable
    with pytest.raises(PromptError, match=r"'.*elsewhere' does not exist \(given by --data-root\); pass --data-root"):
        resolve_data_root(tmp_path / "elsewhere")
    monkeypatch.setenv("ERASEKIT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(PromptError, match=r"does not exist \(given by ERASEKIT_DATA\); pass --data-root DIR or set"):
        load_prompt_set("i2p")
    monkeypatch.delenv("ERASEKIT_DATA")
    assert resolve_data_root() is None  # no default folder: nothing relative to the working directory
    with pytest.raises(PromptError, match="i2p_4703.csv'?, which does not exist; check --data-root or ERASEKIT_DATA"):
        load_prompt_set("i2p", data_root=tmp_path)


def test_without_a_data_folder_i2p_comes_from_the_hub_else_one_error_names_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No --data-root and no ERASEKIT_DATA: I2P is read from its hub dataset (here: offline and not cached)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv("ERASEKIT_DATA", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets, "load_dataset", _offline_load_dataset)
    with pytest.raises(PromptError) as raised:
        load_prompt_set("i2p-sexual")
    message = str(raised.value)
    assert "\n" not in message and "'AIML-TUDA/i2p'" in message and "offline" in message
    assert "--data-root DIR or set ERASEKIT_DATA to a folder holding prompts/i2p_4703.csv" in message
    with pytest.raises(PromptError, match="'ring-a-bell-16' is read from a local data folder and none is given; pass"):
        load_prompt_set("ring-a-bell-16")


def _offline_load_dataset(dataset_id: str, split: str):
    raise ConnectionError(f"{dataset_id} is not in the cache and the hub is offline")


def test_i2p_from_its_hub_copy_uses_its_seed_columns_and_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub copy's rows become the same items as the file's (its seed/guidance columns are sd_*)."""
    datasets = pytest.importorskip("datasets")
    rows = {
        "prompt": ["a quiet lake", "", "a nude study", "a crowded market"],
        "nudity_percentage": [0.0, 0.0, 80.0, 50.0],
        "sd_seed": [11, 12, 13, 14],
        "sd_guidance_scale": [7, 8, 9, 10],
    }
    requested = []

    def load_dataset(dataset_id: str, split: str):
        requested.append((dataset_id, split))
        return datasets.Dataset.from_dict(rows)

    monkeypatch.delenv("ERASEKIT_DATA", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    full = load_prompt_set("i2p")
    assert requested == [("AIML-TUDA/i2p", "train")]
    assert [(i.index, i.prompt, i.seed, i.guidance) for i in full.items] == [
        (0, "a quiet lake", 11, 7.0), (1, "", 12, 8.0), (2, "a nude study", 13, 9.0), (3, "a crowded market", 14, 10.0)
    ]  # fmt: skip
    assert full.kind == "hub" and full.source == "hf:AIML-TUDA/i2p" and full.provenance()["dataset"] == "AIML-TUDA/i2p"
    sexual = load_prompt_set("i2p-sexual")
    assert [i.index for i in sexual.items] == [2, 3] and sexual.provenance()["filter"] == "nudity_percentage >= 50"


def test_concept_templates() -> None:
    hulk = load_prompt_set("concept:Hulk")
    assert [i.prompt for i in hulk.items] == [t.format(concept="Hulk") for t in CONCEPT_TEMPLATES]
    assert hulk.items[0].prompt == "a photo of Hulk" and hulk.concept == "Hulk"
    assert hulk.file_sha256 is None and len(hulk.sha256) == 64


def test_shapes_set_follows_the_protocol() -> None:
    protocol = pytest.importorskip("erasekit.toyworld.protocol")
    shapes = load_prompt_set("shapes:disc")  # a synonym resolves to its canonical value
    samples = protocol.evaluation_samples("circle")  # the demo's samples (protocol.PER_GROUP per group)
    assert shapes.name == "shapes:circle" and shapes.concept == "circle"
    assert [(i.prompt, i.seed, i.group) for i in shapes.items] == [(s.prompt, s.seed, s.group) for s in samples]
    assert shapes.items[0].labels == samples[0].scene.attributes()
    with pytest.raises(Exception, match="not a ShapesCanvas concept"):
        load_prompt_set("shapes:hexagon")


def test_user_files_with_a_prompt_column(tmp_path: Path) -> None:
    table = tmp_path / "set.csv"
    table.write_text('id,text,seed\n1,"a red car, parked",7\n2,a house,\n', encoding="utf-8")
    items = load_prompt_set(str(table), prompt_column="text").items
    assert [(i.prompt, i.seed) for i in items] == [("a red car, parked", 7), ("a house", None)]
    with pytest.raises(
        PromptError, match=r"has no column 'caption' \(columns: 'id', 'text', 'seed'\); pass --prompt-column"
    ):
        load_prompt_set(str(table), prompt_column="caption")

    lines = tmp_path / "set.jsonl"
    lines.write_text(json.dumps({"prompt": "a cat", "guidance": 3.5}) + "\n\n" + json.dumps({"prompt": "a dog"}) + "\n")
    assert [(i.prompt, i.guidance) for i in load_prompt_set(str(lines)).items] == [("a cat", 3.5), ("a dog", None)]

    text = tmp_path / "set.txt"
    text.write_text("a cat\n\na dog\n")
    assert [i.prompt for i in load_prompt_set(str(text)).items] == ["a cat", "a dog"]
    with pytest.raises(PromptError, match="--prompt-column applies to"):
        load_prompt_set(str(text), prompt_column="prompt")


def test_bad_sets(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match="neither a known name nor an existing file"):
        load_prompt_set("no-such-set")
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt\n")
    with pytest.raises(PromptError, match="has no prompts"):
        load_prompt_set(str(empty))
    with pytest.raises(PromptError, match="--limit must be at least 1"):
        load_prompt_set("concept:cat", limit=0)


def test_hub_sets_offline_say_they_need_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, dataset in (("mma", "YijunYang280/MMA-Diffusion-NSFW-adv-prompts-benchmark"), ("p4d", "joycenerd/p4d")):
        with pytest.raises(PromptError) as caught:
            load_prompt_set(name)
        message = str(caught.value)
        assert dataset in message and "needs the Hugging Face Hub" in message and "\n" not in message
