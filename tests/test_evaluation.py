"""``erasekit evaluate`` on a tiny FLUX pipeline, the real NudeNet model, a tiny CLIP, and bad inputs."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erasekit.cli import main
from erasekit.errors import ErasekitError
from reference_data import DATA, data_file, needs_data

I2P = "prompts/i2p_4703.csv"
needs_i2p = needs_data(I2P)
# small and fast: 2 prompts, 1 step, 32 px
SAMPLE_FLAGS = [
    "--steps",
    "1",
    "--resolution",
    "32",
    "--max-sequence-length",
    "16",
    "--device",
    "cpu",
    "--dtype",
    "float32",
]


def run_cli(*args: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def without_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "timing"}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def mask_dir(work: Path, tiny_flux_path: str) -> Path:
    """A real (2-iteration) erasure of "cat" from the tiny pipeline."""
    target = work / "mask-cat"
    code, _, err = run_cli(
        "erase", "--model", tiny_flux_path, "--concept", "cat", "--anchor", "dog", "--steps", "1", "--resolution", "32",
        "--iterations", "2", "--set", "model.device=cpu", "--set", "model.dtype=float32",
        "--set", "sampling.max_sequence_length=16",
        "--set", "mask.init_lambda=0.3", "--set", "mask.neurons.lr=2", "--set", "mask.norm.lr=2", "--output", target,
    )  # fmt: skip
    assert code == 0, err
    return target


@pytest.fixture(scope="module")
def evaluation(work: Path, tiny_flux_path: str, mask_dir: Path) -> Path:
    if not data_file(I2P).is_file():
        pytest.skip(f"reference data {I2P} not found; set ERASEKIT_DATA to the data folder")
    target = work / "eval-1"
    code, out, err = run_cli(
        "evaluate",
        "--model",
        tiny_flux_path,
        "--masks",
        mask_dir,
        "--prompts",
        "i2p-sexual",
        "--data-root",
        DATA,
        "--limit",
        "2",
        *SAMPLE_FLAGS,
        "--output",
        target,
    )
    assert code == 0, err
    assert f"evaluation written to {target}" in out and "report.html" in out
    return target


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random CLIPModel with the real CLIP tokenizer (built offline) and an image processor, saved."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    from erasekit.tiny._common import clip_config
    from erasekit.tiny.tokenizers import build_clip_tokenizer

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    config = CLIPConfig(
        text_config=clip_config(32, projection=16, layers=1).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer()).save_pretrained(folder)
    return str(folder)


# --------------------------------------------------------------------------- the journey
@needs_i2p
def test_evaluate_writes_results_summary_grid_and_report(evaluation: Path, mask_dir: Path, tiny_flux_path: str) -> None:
    assert sorted(p.name for p in evaluation.iterdir()) == [
        "grid.png",
        "images",
        "report.html",
        "results.jsonl",
        "summary.json",
    ]
    assert not list(evaluation.parent.glob(f".{evaluation.name}.*")), "the staging folder became the output"
    summary = json.loads((evaluation / "summary.json").read_text())
    results = [json.loads(line) for line in (evaluation / "results.jsonl").read_text().splitlines()]

    # I2P's own seeds and guidance, the first two prompts of the nudity subset, original and erased
    assert [(r["variant"], r["prompt_index"], r["seed"], r["guidance"]) for r in results] == [
        ("original", 250, 2467279400, 11.0), ("original", 362, 2838474763, 9.0),
        ("mask-cat", 250, 2467279400, 11.0), ("mask-cat", 362, 2838474763, 9.0),
    ]  # fmt: skip
    for r in results:
        image = evaluation / r["image"]
        assert image.is_file() and (evaluation / r["original_image"]).parts[-2] == "original"
        assert Image.open(image).size == (32, 32)
        assert set(r["detector"]) == {"detected", "score", "classes", "boxes"}
    # the erased image differs from the original of the same (prompt, seed), but not by much
    a, b = (np.asarray(Image.open(evaluation / r["image"]), dtype=np.int16) for r in (results[0], results[2]))
    assert 0 < np.abs(a - b).mean() < 40

    assert summary["erasekit_version"] == "0.1.0"
    assert summary["model"]["id"] == tiny_flux_path and summary["model"]["denoiser_class"] == "FluxTransformer2DModel"
    assert len(summary["model"]["files_sha256"]) == 64
    [mask] = summary["variants"][1]["masks"]
    assert mask["path"] == str(mask_dir)
    import hashlib

    assert mask["sha256"] == hashlib.sha256((mask_dir / "masks.safetensors").read_bytes()).hexdigest()
    ps = summary["prompt_set"]
    assert (ps["name"], ps["count"], ps["limit"], ps["filter"]) == ("i2p-sexual", 2, 2, "nudity_percentage >= 50")
    assert ps["file_sha256"] == hashlib.sha256(data_file(I2P).read_bytes()).hexdigest()
    detector = summary["detector"]
    assert (detector["name"], detector["model"], detector["threshold"]) == ("nudenet", "320n.onnx", 0.6)
    assert "FEMALE_BREAST_EXPOSED" in detector["classes"] and "FACE_FEMALE" not in detector["classes"]
    assert summary["generation"]["steps"] == 1 and summary["generation"]["resolution"] == 32
    assert summary["metric_names"] == ["detection", "ssim", "psnr", "cost"]

    original, erased = summary["metrics"]["original"], summary["metrics"]["mask-cat"]
    # random tiny-model images have no nudity
    assert (original["images"], original["detected"], original["detection_rate"], original["ua"]) == (2, 0, 0.0, 1.0)
    assert 0.5 < erased["ssim"] < 1.0 and 10 < erased["psnr"] < 60
    assert erased["artifact_bytes"] == sum(p.stat().st_size for p in mask_dir.iterdir())
    assert 0 < erased["masks"][0]["masked_fraction"] < 1 and original["artifact_bytes"] == 0
    timing = summary["timing"]
    assert timing["images_generated"] == {"original": 2, "mask-cat": 2} and timing["processes"] == 1
    assert set(summary["images_sha256"]) == {"original", "mask-cat"}

    report = (evaluation / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 4 and "mask-cat" in report and "ssim" in report
    assert "src='images/" not in report  # self-contained
    assert Image.open(evaluation / "grid.png").size == (2 * 128, 16 + 2 * 128)


@needs_i2p
def test_a_second_run_gives_the_same_summary(evaluation: Path, work: Path, tiny_flux_path: str, mask_dir: Path) -> None:
    target = work / "eval-2"
    code, _, err = run_cli(
        "evaluate",
        "--model",
        tiny_flux_path,
        "--masks",
        mask_dir,
        "--prompts",
        "i2p-sexual",
        "--data-root",
        DATA,
        "--limit",
        "2",
        *SAMPLE_FLAGS,
        "--output",
        target,
    )
    assert code == 0, err
    first = json.loads((evaluation / "summary.json").read_text())
    second = json.loads((target / "summary.json").read_text())
    assert without_timing(first) == without_timing(second)
    assert (evaluation / "results.jsonl").read_bytes() == (target / "results.jsonl").read_bytes()


@needs_i2p
def test_resume_keeps_finished_images(evaluation: Path, work: Path, tiny_flux_path: str, mask_dir: Path) -> None:
    from erasekit.evaluation import EvaluationConfig, run_evaluation, staging_path

    target = work / "eval-resumed"
    staging = staging_path(target)
    # an interrupted run: one original image finished
    done = evaluation / "images" / "original"
    (staging / "images" / "original").mkdir(parents=True)
    name = sorted(p.name for p in done.iterdir())[0]
    (staging / "images" / "original" / name).write_bytes((done / name).read_bytes())
    config = EvaluationConfig(
        model=tiny_flux_path,
        prompts="i2p-sexual",
        output=str(target),
        masks=[[str(mask_dir)]],
        data_root=str(DATA),
        limit=2,
        steps=1,
        resolution=32,
        max_sequence_length=16,
        device="cpu",
        dtype="float32",
        progress=False,
    )
    result = run_evaluation(config)
    assert result is not None and not staging.exists()
    assert result.summary["timing"]["images_skipped"] == {"original": 1, "mask-cat": 0}
    assert result.summary["timing"]["images_generated"] == {"original": 1, "mask-cat": 2}
    first = json.loads((evaluation / "summary.json").read_text())
    assert without_timing(result.summary) == without_timing(first)


def test_combined_masks_and_explicit_seeds(work: Path, tiny_flux_path: str, mask_dir: Path) -> None:
    target = work / "eval-combined"
    code, _, err = run_cli(
        "evaluate",
        "--model",
        tiny_flux_path,
        "--masks",
        f"{mask_dir},{mask_dir}",
        "--prompts",
        "concept:cat",
        "--limit",
        "1",
        "--seed",
        "3",
        "--seed",
        "4",
        "--metrics",
        "psnr,cost",
        *SAMPLE_FLAGS,
        "--output",
        target,
    )
    assert code == 0, err
    summary = json.loads((target / "summary.json").read_text())
    assert [v["name"] for v in summary["variants"]] == ["original", "mask-cat+mask-cat"]
    assert summary["seeds"] == [3, 4] and summary["detector"] is None
    names = sorted(p.name for p in (target / "images" / "mask-cat+mask-cat").iterdir())
    assert names == ["0000-a-photo-of-cat-seed3.png", "0000-a-photo-of-cat-seed4.png"]
    row = summary["metrics"]["mask-cat+mask-cat"]
    assert set(row) == {"psnr", "artifact_bytes", "masks"} and len(row["masks"]) == 2


# --------------------------------------------------------------------------- detectors
def test_nudenet_on_a_real_photo_finds_a_face_and_no_nudity(tmp_path: Path) -> None:
    pytest.importorskip("nudenet")
    skimage_data = pytest.importorskip("skimage.data")
    from erasekit.evaluation import get_detector

    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    detector = get_detector("nudenet")
    [record] = detector.detect([photo])
    assert record["detected"] is False and record["score"] == 0.0 and record["classes"] == []
    [face] = [b for b in record["boxes"] if b["class"] == "FACE_FEMALE"]
    assert face["score"] == pytest.approx(0.72, abs=0.03)
    x, y, w, h = face["box"]  # Eileen Collins' face, upper middle of the 512x512 photo
    assert 150 < x + w / 2 < 260 and 90 < y + h / 2 < 170
    provenance = detector.provenance()
    assert provenance["model"] == "320n.onnx" and len(provenance["model_sha256"]) == 64 and provenance["version"]


def test_clip_detector_and_metrics_with_a_tiny_clip(tiny_clip: str, tmp_path: Path) -> None:
    from erasekit.evaluation import get_detector
    from erasekit.evaluation.metrics import clip_scores, feature_extractor, fid_kid

    rng = np.random.default_rng(0)
    paths = []
    for k in range(4):
        path = tmp_path / f"{k}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    detector = get_detector("clip", concept="cat", model=tiny_clip)
    records = detector.detect(paths)
    assert len(records) == 4 and all(0 <= r["score"] <= 1 and r["detected"] == (r["score"] >= 0.5) for r in records)
    assert detector.detect(paths) == records
    assert detector.provenance()["texts"] == ["a photo of cat", "a photo"]

    score = clip_scores(paths, ["a cat"] * 4, tiny_clip)
    assert 0 <= score <= 100 and clip_scores(paths, ["a cat"] * 4, tiny_clip) == score
    extractor = feature_extractor(tiny_clip)
    same = fid_kid(paths, paths, ["fid"], extractor)
    other = fid_kid(paths[:2], paths[2:], ["fid", "kid"], extractor)
    assert abs(same["fid"]) < 1e-4 and other["fid"] > same["fid"] and "kid" in other


def test_clip_detector_offline_without_a_local_model_fails_clearly() -> None:
    from erasekit.evaluation import get_detector

    with pytest.raises(
        ErasekitError,
        match="could not load the CLIP model 'openai/clip-vit-large-patch14'.*offline, pass a local folder",
    ):
        get_detector("clip", concept="cat", model="openai/clip-vit-large-patch14")


def test_shapes_detector_needs_the_shipped_world() -> None:
    from erasekit.evaluation.detectors import get_detector
    from erasekit.toyworld.world import SHIPPED_WORLD

    SHAPES_DETECTORS_DIR = SHIPPED_WORLD / "detectors"

    if SHAPES_DETECTORS_DIR.is_dir():
        pytest.importorskip("erasekit.toyworld.detectors")
        assert get_detector("shapes", concept="circle").provenance()["attribute"] == "object"
    else:
        with pytest.raises(ErasekitError, match="ShapesCanvas detectors .* do not exist"):
            get_detector("shapes", concept="circle")


# --------------------------------------------------------------------------- bad input
BAD_INPUTS = {
    "missing set": (
        ["--prompts", "no-such-set"],
        "prompt set 'no-such-set' is neither a known name nor an existing file",
    ),
    "unknown detector": (
        ["--prompts", "concept:cat", "--detector", "yolo"],
        "unknown detector 'yolo'; choose one of nudenet, shapes, clip",
    ),
    "unknown metric": (["--prompts", "concept:cat", "--metrics", "fid,bleu"], "unknown metric bleu"),
    "fid without reference": (
        ["--prompts", "concept:cat", "--metrics", "fid"],
        "metric 'fid' needs real images: pass --reference DIR",
    ),
    "hub set offline": (["--prompts", "mma"], "needs the Hugging Face Hub"),
    "missing data root": (
        ["--prompts", "i2p", "--data-root", "/nonexistent/data"],
        "data root '/nonexistent/data' does not exist",
    ),
    "missing mask": (
        ["--prompts", "concept:cat", "--masks", "/nonexistent/mask"],
        "erasure folder '/nonexistent/mask' does not exist",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_output(case: str, tmp_path: Path, tiny_flux_path: str) -> None:
    if case == "hub set offline":
        pytest.importorskip("datasets")
    flags, message = BAD_INPUTS[case]
    target = tmp_path / "out"
    code, out, err = run_cli("evaluate", "--model", tiny_flux_path, *flags, *SAMPLE_FLAGS, "--output", target)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("erasekit evaluate: error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []  # neither the output nor a staging folder


@pytest.mark.parametrize("case", ["empty set", "missing column"])
def test_bad_prompt_files(case: str, tmp_path: Path, tiny_flux_path: str) -> None:
    prompts = tmp_path / "inputs" / "prompts.csv"
    prompts.parent.mkdir()
    prompts.write_text("prompt\n" if case == "empty set" else "prompt\na cat\n")
    extra = ["--prompt-column", "caption"] if case == "missing column" else []
    code, _, err = run_cli(
        "evaluate", "--model", tiny_flux_path, "--prompts", prompts, *extra, *SAMPLE_FLAGS, "--output", tmp_path / "out"
    )
    expected = (
        "has no prompts"
        if case == "empty set"
        else "has no column 'caption' (columns: 'prompt'); pass --prompt-column NAME"
    )
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_existing_output_is_refused(tmp_path: Path, tiny_flux_path: str) -> None:
    code, _, err = run_cli(
        "evaluate", "--model", tiny_flux_path, "--prompts", "concept:cat", *SAMPLE_FLAGS, "--output", tmp_path
    )
    assert code == 2 and "already exists; choose another --output" in err


def test_the_shapes_detector_is_registered_by_name_and_imported_on_first_use():
    from erasekit.evaluation import DETECTORS, detector_factory, detector_prompt_set
    from erasekit.evaluation.detectors import Detector
    from erasekit.toyworld.evaluation import ShapesDetector

    assert detector_factory("shapes") is ShapesDetector and DETECTORS["shapes"] is ShapesDetector
    assert issubclass(ShapesDetector, Detector)
    circles = detector_prompt_set("shapes", "round dot")  # a synonym: the canonical value's set
    assert circles.name == "shapes:circle" and circles.kind == "shapes" and circles.extra["per_group"] == 192
    assert [item.group for item in circles.items[:1]] == ["target"] and len(circles.items) == 3 * 192
    with pytest.raises(ErasekitError, match="^the nudenet detector has no prompt sets of its own$"):
        detector_prompt_set("nudenet", "nudity")
    with pytest.raises(ErasekitError, match="unknown detector 'yolo'; choose one of nudenet, shapes, clip"):
        detector_factory("yolo")
