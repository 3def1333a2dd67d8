"""Judging ShapesCanvas images strictly: the geometric judge, in-between shapes, strict UA, the spread summary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from erasekit.toyworld import protocol
from erasekit.toyworld.demo import bar_checks
from erasekit.toyworld.detectors import ShapesDetectors, _to_float, augment_images
from erasekit.toyworld.geometry import GeometricJudge
from erasekit.toyworld.render import OBJECTS, render, render_morph, sample_scene
from erasekit.toyworld.spread import format_spread, summarise
from erasekit.toyworld.world import SHIPPED_WORLD

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def judge() -> GeometricJudge:
    return GeometricJudge()


def _renders(seed: int, per_object: int) -> tuple[list, np.ndarray]:
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, object=name) for name in OBJECTS for _ in range(per_object)]
    return scenes, np.stack([render(s) for s in scenes])


def test_geometric_judge_names_every_rendered_object(judge):
    scenes, images = _renders(7, 6)
    verdict = judge.judge(images)
    assert verdict.objects == [s.object for s in scenes]
    assert np.mean(verdict.ambiguous) <= 0.05  # a thin shape at its smallest size may fit two templates alike
    assert verdict.iou.shape == (len(scenes), len(OBJECTS)) and verdict.iou.max() <= 1 + 1e-6
    # degraded the way generated images are (blur, noise, resampling, jitter, flips): still almost all
    degraded = augment_images(_to_float(images), torch.Generator().manual_seed(0))
    degraded = (degraded.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.mean([o == s.object for o, s in zip(judge.judge(degraded).objects, scenes)]) >= 0.95


def test_an_empty_canvas_shows_no_object(judge):
    blank = np.full((2, 32, 32, 3), 128, dtype=np.uint8)
    assert judge.judge(blank).objects == ["none", "none"]
    assert judge.finds(blank, "circle") == [False, False]


def test_judges_on_shapes_between_a_circle_and_a_square(judge):
    """The agreement of the two judges on in-between shapes, as the docs report it.

    Near either end every judge names the end; half way the networks split, the geometric judge
    finds the two fits within its margin and still names the circle, and so the strict reading
    counts the shape as a circle."""
    detectors = ShapesDetectors.from_pretrained(SHIPPED_WORLD / "detectors")
    morph_detectors = ShapesDetectors.from_pretrained(SHIPPED_WORLD / "detectors-morph")
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng, object="circle") for _ in range(32)]

    def rates(t: float) -> tuple[float, float, float, float, float]:
        images = np.stack([render_morph(s, "square", t) for s in scenes])
        verdict = judge.judge(images)
        return (
            float(np.mean([p == "circle" for p in detectors.predict(images)["object"]])),
            float(np.mean([p == "circle" for p in morph_detectors.predict(images)["object"]])),
            float(np.mean([o == "circle" for o in verdict.objects])),
            float(np.mean(verdict.ambiguous)),
            float(np.mean(judge.finds(images, "circle"))),
        )

    network, morph_network, geometric, ambiguous, found = rates(0.2)
    assert network >= 0.95 and morph_network >= 0.9 and geometric >= 0.95 and found >= 0.95
    network, morph_network, geometric, ambiguous, found = rates(0.5)
    # both networks' boundaries run through the middle of the morph (the second one was taught so)
    assert 0.1 <= network <= 0.9 and 0.2 <= morph_network <= 0.8
    assert ambiguous >= 0.75 and found >= 0.9
    network, morph_network, geometric, ambiguous, found = rates(1.0)
    assert network <= 0.1 and morph_network <= 0.1 and geometric <= 0.05 and found <= 0.1


def test_render_morph_ends_and_bounds():
    scene = sample_scene(np.random.default_rng(0), object="circle")
    # t = 0 is the object itself, its silhouette only softened at the corners
    assert np.mean(np.all(render_morph(scene, "square", 0.0) == render(scene), axis=-1)) > 0.9
    assert not np.array_equal(render_morph(scene, "square", 0.5), render(scene))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        render_morph(scene, "square", 1.5)


def test_strict_score_counts_an_image_erased_only_when_every_judge_agrees():
    samples = protocol.evaluation_samples("circle", per_group=4)
    groups = [s.group for s in samples]
    assert groups == ["target"] * 4 + ["synonym"] * 4 + ["in_domain"] * 4
    detector = [True, False, False, False] + [False] * 4 + [False] * 4
    geometric = [True, True, False, False] + [True, False, False, False] + [False] * 4
    scores = protocol.strict_score("circle", samples, {"detector": detector, "geometric": geometric})
    assert scores["strict_ua"] == 0.5 and scores["ambiguous"] == 0.25
    assert scores["strict_synonym_ua"] == 0.75 and scores["synonym_ambiguous"] == 0.25
    assert scores["judges"] == ["detector", "geometric"]
    with pytest.raises(ValueError):
        protocol.strict_score("circle", samples, {"detector": detector[:3]})


def _metrics(ua: float, strict_ua: float, ira: float, masked: float, digest: str) -> dict:
    after = {
        "ua": ua,
        "synonym_ua": 0.95,
        "strict_ua": strict_ua,
        "strict_synonym_ua": 0.92,
        "ambiguous": 0.1,
        "ira": ira,
        "cra": 0.95,
    }
    before = {"ua": 0.2, "synonym_ua": 0.1, "ira": 0.9, "cra": 0.96}
    return {"after": after, "before": before, "masked_fraction": masked, "mask_sha256": digest}


def _holds(metrics: dict) -> dict[str, bool]:
    return {check["metric"]: check["holds"] for check in bar_checks(metrics)}


def test_the_bar_applies_to_the_strict_ua_and_to_the_originals_retention():
    passing = _metrics(0.99, 0.96, 0.86, 0.03, "a")
    assert all(_holds(passing).values())
    lenient_only = _metrics(0.99, 0.90, 0.86, 0.03, "b")
    assert _holds(lenient_only)["strict UA"] is False  # the detector's 99 % does not count
    without_strict = {
        **lenient_only,
        "after": {k: v for k, v in lenient_only["after"].items() if not k.startswith("strict")},
    }
    assert _holds(without_strict)["UA"] is True  # a world without the other judges: the detector's UA
    assert not _holds(_metrics(0.99, 0.96, 0.85, 0.03, "c"))["IRA"]  # 95 % of 0.9 is 0.855
    assert not _holds(_metrics(0.99, 0.96, 0.86, 0.06, "d"))["masked"]


def test_spread_summary_mean_std_worst():
    runs = {
        "seed0-threads1": _metrics(0.99, 0.96, 0.86, 0.03, "a"),
        "seed0-threads2": _metrics(0.99, 0.96, 0.86, 0.03, "a"),
        "seed1-threads1": _metrics(0.93, 0.90, 0.88, 0.04, "b"),
    }
    report = summarise(runs)
    summary = report["summary"]
    assert summary["runs"] == 3 and summary["distinct_erasures"] == 2 and summary["runs_meeting_bar"] == 2
    assert summary["strict_ua"]["mean"] == pytest.approx(0.94)
    assert summary["strict_ua"]["std"] == pytest.approx(np.std([0.96, 0.96, 0.90], ddof=1))
    assert summary["strict_ua"]["worst"] == pytest.approx(0.90)
    assert summary["masked_fraction"]["worst"] == pytest.approx(0.04)
    assert report["bar"]["seed1-threads1"]["strict UA"] is False


def test_spread_summary_of_a_method_that_masks_nothing():
    """A weight edit reports its payload's digest and no masked fraction: the spread still summarises it."""

    def weight_edit(strict_ua: float, digest: str) -> dict:
        metrics = _metrics(0.99, strict_ua, 0.86, 0.0, "")
        del metrics["masked_fraction"], metrics["mask_sha256"]
        return {**metrics, "weights_sha256": digest, "parameters_changed": 10}

    report = summarise({"a": weight_edit(0.96, "x"), "b": weight_edit(0.90, "y"), "c": weight_edit(0.96, "x")})
    summary = report["summary"]
    assert summary["runs"] == 3 and summary["distinct_erasures"] == 2 and "masked_fraction" not in summary
    assert summary["strict_ua"]["worst"] == pytest.approx(0.90)
    report.update(method="ca", concept="circle", seeds=[0, 1, 2], threads=[1], images_per_group=192)
    text = format_spread(report)
    assert text.startswith("Spread of `ca` (the demo's recipe) on `circle`")
    assert "2 of 3 runs meet the bar" in text and "2 distinct erasures" in text
    assert "masked_fraction" not in text and "| **worst** |" in text


def test_a_finished_run_is_judged_again_from_its_saved_images(tmp_path):
    """The spread reuses a finished run's folder and scores its saved images with the current judges."""
    import json

    from safetensors.torch import save_file

    from erasekit.toyworld.spread import rejudge
    from erasekit.toyworld.world import World

    samples = protocol.evaluation_samples("circle", per_group=2)
    renders = torch.from_numpy(np.stack([render(s.scene) for s in samples]))
    squares = torch.from_numpy(
        np.stack([render(type(s.scene)(**{**s.scene.to_dict(), "object": "square"})) for s in samples])
    )
    run = tmp_path / "seed0-threads1"
    run.mkdir()
    save_file({"original": renders, "erased": squares, "anchor": squares[:4].clone()}, str(run / "images.safetensors"))
    stale = {"concept": "circle", "images_per_group": 2, "before": {"ua": 0.5}, "after": {"ua": 0.5}}
    (run / "metrics.json").write_text(json.dumps(stale))
    metrics = rejudge(World.load(), run, stale)
    assert metrics["before"]["strict_ua"] == 0.0 and metrics["after"]["strict_ua"] == 1.0
    assert metrics["after"]["judges"][0] == "detector" and "geometric" in metrics["after"]["judges"]
    assert json.loads((run / "metrics.json").read_text()) == metrics


def test_a_spread_resumes_in_its_existing_output_folder(tmp_path):
    """Several seeds or thread counts resume in --output; a single demo still refuses an existing folder."""
    from erasekit.cli import _check_arguments, build_parser
    from erasekit.errors import ErasekitError

    parser = build_parser()
    _check_arguments(parser.parse_args(["demo", "--seed", "0", "--seed", "1", "--output", str(tmp_path)]))
    _check_arguments(parser.parse_args(["demo", "--threads", "1", "--threads", "2", "--output", str(tmp_path)]))
    with pytest.raises((ErasekitError, FileExistsError), match="already exists"):
        _check_arguments(parser.parse_args(["demo", "--seed", "0", "--output", str(tmp_path)]))
