"""Several concepts in one erasure: the prompts, the CLI flags and concepts file, the methods that erase them
together (mask, uce, esd, ca, concept-prune on the tiny FLUX pipeline), the ones that refuse, and the
ShapesCanvas demo's per-concept scores."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from erasekit.arch import architecture_for
from erasekit.cli import main
from erasekit.config import ConceptConfig, load_config
from erasekit.data import build_concept_prompts, concept_entries, read_concepts_file
from erasekit.errors import ErasekitError, PromptError
from erasekit.methods import available_methods, get_method, load_erasure
from erasekit.tiny import build_tiny_flux_pipeline
from erasekit.toyworld import protocol
from erasekit.toyworld.prompts import find_value
from erasekit.toyworld.world import SHIPPED_WORLD

pytestmark = pytest.mark.usefixtures("one_thread")

needs_world = pytest.mark.skipif(
    not (SHIPPED_WORLD / "world.json").is_file(), reason="the shipped ShapesCanvas world is not in this checkout"
)


# --------------------------------------------------------------------------- prompts
def test_one_concept_builds_the_prompts_it_always_did() -> None:
    prompts = build_concept_prompts(ConceptConfig(concept="cat", anchor="dog", synonyms=["kitty"]))
    assert prompts.concept == [
        "a photo of cat",
        "a photo of kitty",
        "an image of cat",
        "an image of kitty",
        "a painting of cat",
        "a painting of kitty",
        "cat",
        "kitty",
    ]
    assert prompts.target == ["a photo of dog"] * 2 + ["an image of dog"] * 2 + ["a painting of dog"] * 2 + ["dog"] * 2


def test_several_concepts_take_turns_each_with_its_own_anchor() -> None:
    cfg = ConceptConfig(
        concept="cat",
        anchor="dog",
        synonyms=["kitty"],
        more_concepts=["dog", "red car"],
        more_anchors=["cat", "a car"],
        templates=["a photo of {concept}"],
        prompts=["a cat and a red car"],
    )
    prompts = build_concept_prompts(cfg)
    assert list(zip(prompts.concept, prompts.target)) == [
        ("a photo of cat", "a photo of dog"),
        ("a photo of kitty", "a photo of dog"),
        # one pass: the dog that the cat became is not turned into a cat again, and back
        ("a photo of dog", "a photo of cat"),
        ("a photo of red car", "a photo of a car"),
        ("a cat and a red car", "a dog and a a car"),
    ]
    assert concept_entries(cfg) == [("cat", "dog"), ("dog", "cat"), ("red car", "a car")]
    # one anchor for all: more_anchors left empty
    shared = ConceptConfig(concept="cat", anchor="an animal", more_concepts=["bird"], templates=["{concept}"])
    assert build_concept_prompts(shared).target == ["an animal", "an animal"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"concept": "cat", "more_concepts": ["  "]}, "one of the concepts is empty"),
        ({"concept": "cat", "more_concepts": ["bird"], "more_anchors": ["x", "y"]}, "3 anchors for 2 concepts"),
        ({"concept": "cat", "more_concepts": ["Cat"]}, "the concept 'Cat' is given twice"),
        ({"concept": "", "more_concepts": ["bird"]}, "the concept is empty"),
    ],
)
def test_bad_concept_lists_are_refused_in_one_line(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(PromptError, match=message) as info:
        build_concept_prompts(ConceptConfig(**fields))
    assert "\n" not in str(info.value)


def test_the_concepts_file(tmp_path: Path) -> None:
    file = tmp_path / "concepts.txt"
    file.write_text("# erased together\ncat => a dog\n\n  bird  \nred car=>a car\n", encoding="utf-8")
    assert read_concepts_file(file) == [("cat", "a dog"), ("bird", None), ("red car", "a car")]
    file.write_text("=> a dog\n")
    with pytest.raises(PromptError, match="names no concept before '=>'"):
        read_concepts_file(file)
    file.write_text("# only a comment\n")
    with pytest.raises(PromptError, match="names no concept"):
        read_concepts_file(file)


# --------------------------------------------------------------------------- the CLI refuses in one line
QUICK = [
    "--steps", "1", "--resolution", "32", "--iterations", "1",
    "--set", "model.device=cpu", "--set", "model.dtype=float32", "--set", "sampling.max_sequence_length=16",
    "--set", "train.trackers=[]",
]  # fmt: skip


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["erase", *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("erasekit erase: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--concept", "cat", "--concept", "bird", "--anchor", "a", "--anchor", "b", "--anchor", "c"], "3 --anchor"),
        (["--concept", "cat", "--concept", ""], "one of the concepts is empty"),
        (["--concept", "cat", "--concept", "bird", "--method", "sld"], "method 'sld' erases one concept at a time"),
        (["--concept", "cat", "--concept", "bird", "--method", "flowedit"], "erases one concept at a time"),
    ],
)
def test_bad_concept_flags_exit_2_before_loading_anything(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    # the model does not exist: these are refused before it would be loaded
    line = _fails(capsys, "--model", str(tmp_path / "no-model"), *flags, *QUICK, "--output", str(out))
    assert message in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_refusal_names_the_methods_that_can(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _fails(capsys, "--model", "x", "--concept", "a", "--concept", "b", "--method", "sld", "--output", "o")
    able = [n for n in available_methods() if get_method(n).several_concepts]
    assert {"mask", "esd", "uce"} <= set(able) and "sld" not in able and "flowedit" not in able
    assert f"({', '.join(able)})" in line


def test_a_concepts_file_and_concept_flags_do_not_mix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "concepts.txt"
    file.write_text("cat\nbird\n")
    line = _fails(capsys, "--model", "x", "--concepts", str(file), "--concept", "cat", "--output", "o")
    assert "not both" in line
    line = _fails(capsys, "--model", "x", "--concepts", str(file), "--anchor", "a", "--anchor", "b", "--output", "o")
    assert "at most one --anchor" in line
    line = _fails(capsys, "--model", "x", "--concepts", str(tmp_path / "none.txt"), "--output", "o")
    assert "concepts file" in line and "does not exist" in line


# --------------------------------------------------------------------------- methods on the tiny FLUX pipeline
#: Two concepts, each its own prompt ("cat", "bird") aimed at its own anchor ("dog", "fish").
TWO = {
    "concept__more_concepts": "[bird]",
    "concept__more_anchors": "[fish]",
    "concept__templates": "['{concept}']",
    "train__trackers": "[]",
}
#: Per method: a fit of seconds that reads both concepts' prompts (two rows: one of each concept).
FITS: dict[str, list[str]] = {
    "mask": ["train.iterations=1", "train.batch_size=2"],
    "esd": ["train.iterations=2", "esd.lr=1e-3"],
    "advunlearn": ["train.iterations=2", "advunlearn.lr=1e-3", "advunlearn.attack_steps=1"],
    "uce": [],
    "ca": ["train.iterations=2", "ca.anchor_images=2"],
    "concept-prune": ["concept_prune.top_share=0.05"],
}
#: What each method encodes: the concept prompts always; their targets (anchors) where it reads them.
READS_TARGETS = {"mask": True, "esd": False, "advunlearn": False, "uce": True, "ca": True, "concept-prune": False}


@pytest.mark.parametrize("name", sorted(FITS))
def test_two_concepts_reach_the_fit_and_the_artefact(
    name: str, tiny_train_overrides: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = build_tiny_flux_pipeline(seed=0)
    arch = architecture_for(pipe)
    encoded: list[str] = []
    encode = type(arch).encode_prompts

    def recording(self: Any, pipe: Any, prompts: list[str], *args: Any, **kwargs: Any) -> Any:
        encoded.extend(prompts)
        return encode(self, pipe, prompts, *args, **kwargs)

    monkeypatch.setattr(type(arch), "encode_prompts", recording)
    config = load_config(None, [f"method={name}", *tiny_train_overrides(**TWO), *FITS[name]])
    method = get_method(name)
    method.check_concepts(1 + len(config.concept.more_concepts))
    method.validate(config)
    method.fit(pipe, config, tmp_path / name)
    assert {"cat", "bird"} <= set(encoded)
    if READS_TARGETS[name]:
        assert {"dog", "fish"} <= set(encoded)
    record = json.loads((tmp_path / name / "erasure.json").read_text())
    assert (record["concept"], record["anchor"]) == ("cat", "dog")
    assert record["concepts"] == ["cat", "bird"] and record["anchors"] == ["dog", "fish"]
    assert load_erasure(tmp_path / name).record["concepts"] == ["cat", "bird"]


def test_one_concept_records_what_it_always_did(tiny_train_overrides: Any, tmp_path: Path) -> None:
    config = load_config(None, ["method=uce", *tiny_train_overrides(train__trackers="[]")])
    get_method("uce").fit(build_tiny_flux_pipeline(seed=0), config, tmp_path / "one")
    record = json.loads((tmp_path / "one" / "erasure.json").read_text())
    assert (record["concept"], record["concepts"], record["anchor"]) == ("cat", ["cat"], "dog")
    assert "anchors" not in record


def test_the_cli_erases_the_concepts_of_a_file(
    tiny_flux_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "concepts.txt"
    file.write_text("cat => a dog\nbird\n")
    out = tmp_path / "uce"
    argv = ["erase", "--method", "uce", "--model", tiny_flux_path, "--concepts", str(file), "--anchor", "a fish"]
    assert main([*argv, *QUICK, "--output", str(out)]) == 0, capsys.readouterr().err
    record = json.loads((out / "erasure.json").read_text())
    # a line without '=>' takes the one --anchor
    assert record["concepts"] == ["cat", "bird"] and record["anchors"] == ["a dog", "a fish"]
    assert record["settings"]["concept"]["more_concepts"] == ["bird"]


# --------------------------------------------------------------------------- the ShapesCanvas protocol and demo
def test_the_protocol_leaves_the_other_erased_values_out_of_what_it_keeps() -> None:
    alone = protocol.evaluation_samples("circle", per_group=12)
    together = protocol.evaluation_samples("circle", per_group=12, exclude=["star"])
    # the concept's own scenes and noise do not change; the kept objects no longer include the star
    assert [s for s in alone if s.group != "in_domain"] == [s for s in together if s.group != "in_domain"]
    assert any(s.scene.object == "star" for s in alone if s.group == "in_domain")
    assert all(s.scene.object not in ("circle", "star") for s in together if s.group == "in_domain")
    _, anchors, preserve = protocol.erasure_prompts("circle", count=12, exclude=["star"])
    assert not any("star" in p for p in preserve + anchors)
    assert protocol.check_concepts(["disc", "star"], ["square", None]) == [("object", "circle"), ("object", "star")]
    for concepts, anchors_, message in (
        (["circle", "red"], [None, None], "of different attributes"),
        (["circle", "disc"], [None, None], "given twice"),
        (["circle", "star"], ["star", None], "is erased too"),
        (["circle", "star"], [None, "purple"], "use another object"),
    ):
        with pytest.raises(ErasekitError, match=message):
            protocol.check_concepts(concepts, anchors_)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--concept", "circle", "--concept", "star", "--method", "flowedit"], "erases one concept at a time"),
        (["--concept", "circle", "--concept", "red"], "of different attributes"),
        (["--concept", "circle", "--concept", "star", "--anchor", "a", "--anchor", "b", "--anchor", "c"], "3 anchors"),
        (["--concept", "circle", "--concept", "star", "--seed", "0", "--seed", "1"], "spread of one concept"),
    ],
)
def test_the_demo_refuses_bad_concept_sets_in_one_line(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", *flags, "--output", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("erasekit demo: error: ") and message in lines[0], lines
    assert not out.exists()


def _block(concept: str, anchor: str, ua: float, ira: float) -> dict[str, Any]:
    return {
        "concept": concept,
        "anchor": anchor,
        "before": {"ua": 0.01, "synonym_ua": 0.02, "ira": 0.9, "cra": 0.96},
        "after": {"ua": ua, "synonym_ua": 0.95, "ira": ira, "cra": 0.95},
        "anchor_images": {"ua": 1.0, "synonym_ua": 1.0},
        "fidelity": {"psnr": 30.0, "ssim": 0.9},
    }


def test_the_set_is_summed_up_by_its_worst_concept() -> None:
    from erasekit.toyworld.demo import format_table, set_summary

    metrics: dict[str, Any] = {
        "concepts": ["circle", "star"],
        "per_concept": {"circle": _block("circle", "square", 0.97, 0.88), "star": _block("star", "cross", 0.9, 0.9)},
        "masked_fraction": 0.03,
        "seconds": 10.0,
        "method": "mask",
    }
    metrics["set"] = summary = set_summary(metrics)
    assert summary["worst"]["ua"] == {"value": 0.9, "concept": "star"}
    assert summary["worst"]["ira_of_original"] == {"value": pytest.approx(0.88 / 0.9), "concept": "circle"}
    assert summary["worst"]["cra_of_original"]["value"] == pytest.approx(0.95 / 0.96)
    assert summary["bar_holds"] is False  # star's UA 90 % < 95 %
    table = format_table(metrics)
    assert "circle -> square:" in table and "star -> cross:" in table
    assert "the bar, star: below the bar: UA" in table and "the bar, circle: every number meets the bar" in table
    assert "worst UA 90.0% (star)" in table


@needs_world
def test_the_demo_config_of_two_concepts_trains_both_and_keeps_the_rest() -> None:
    from erasekit.toyworld.demo import erasure_config
    from erasekit.toyworld.world import World

    config = erasure_config(World.load(), ["circle", "star"], anchor=["square", "cross"], prompts=6)
    c = config.concept
    assert (c.concept, c.anchor, c.more_concepts, c.more_anchors) == ("circle", "square", ["star"], ["cross"])
    prompts = build_concept_prompts(c)
    assert len(prompts.concept) == len(prompts.target) == 12
    # in turn: circle's prompts at even rows, star's at odd rows, each aimed at its own anchor
    for k, (prompt, target) in enumerate(zip(prompts.concept, prompts.target)):
        shape, anchor = (("circle", "square"), ("star", "cross"))[k % 2]
        assert find_value("object", prompt) == shape and find_value("object", target) == anchor
    assert not any(find_value("object", p) in ("circle", "star") for p in prompts.preservation)


@needs_world
@pytest.mark.slow
def test_the_demo_scores_each_concept_of_one_erasure(tmp_path: Path) -> None:
    """Two concepts erased by one (training-free, seconds) UCE edit; each scored by the protocol."""
    from erasekit.toyworld.demo import run_demo

    out = tmp_path / "demo"
    metrics = run_demo(["circle", "star"], out, per_group=4, anchor=["square", "cross"], method="uce", progress=False)
    assert metrics["concepts"] == ["circle", "star"] and metrics["anchors"] == ["square", "cross"]
    for concept in ("circle", "star"):
        block = metrics["per_concept"][concept]
        assert block["concept"] == concept and {"strict_ua", "ira", "cra"} <= set(block["after"])
        assert {c["metric"] for c in block["bar"]} >= {"strict UA", "IRA", "CRA"}
    worst = min(metrics["per_concept"][c]["after"]["strict_ua"] for c in ("circle", "star"))
    assert metrics["set"]["worst"]["ua"]["value"] == worst
    written = json.loads((out / "metrics.json").read_text())
    assert written["per_concept"] == metrics["per_concept"] and written["set"] == metrics["set"]
    assert load_erasure(out / "uce").record["concepts"] == ["circle", "star"]
    report = (out / "report.html").read_text()
    assert "circle &rarr; square" in report and "star &rarr; cross" in report
