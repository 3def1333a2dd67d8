"""ShapesCanvas detectors: training, saving, loading, inputs and (when shipped) accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import erasekit.toyworld
from erasekit.errors import ModelLoadError
from erasekit.toyworld.detectors import (
    HEADS,
    NONE,
    ShapesDetectorNet,
    ShapesDetectors,
    augment_images,
    evaluate_detectors,
    train_detectors,
)
from erasekit.toyworld.render import ATTRIBUTES, render, render_none, sample_scene

SHIPPED = Path(erasekit.toyworld.__file__).parent / "shapes_canvas" / "detectors"
# A budget that only exercises the code paths (a few seconds); the detector it gives is poor.
TINY = dict(steps=15, batch_size=16, width=8, pool_size=120, refresh_per_step=2, eval_n=40, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny networks, one torch thread


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_detectors(tmp_path_factory.mktemp("detectors") / "out", seed=3, **TINY)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.stack([render(sample_scene(rng)) for _ in range(6)] + [render_none(rng, 32, "blob")])


def test_saved_folder(trained: Path) -> None:
    assert sorted(p.name for p in trained.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(trained.parent.glob(".*tmp*")), "the staging folder must be gone"
    config = json.loads((trained / "config.json").read_text())
    assert config["classes"] == {name: list(values) for name, values in HEADS.items()}
    assert config["classes"]["object"][-1] == NONE
    assert config["architecture"]["width"] == 8
    assert config["training"]["seed"] == 3 and config["training"]["steps"] == 15
    for key in ("accuracy", "accuracy_augmented"):
        assert set(config[key]) == {*ATTRIBUTES, NONE}
        assert all(0.0 <= value <= 1.0 for value in config[key].values())


def test_default_network_is_small() -> None:
    net = ShapesDetectorNet({name: len(values) for name, values in HEADS.items()})
    assert sum(p.numel() for p in net.parameters()) * 4 < 1_000_000
    out = net.eval()(torch.rand(2, 3, 32, 32))
    assert {name: tuple(t.shape) for name, t in out.items()} == {n: (2, len(v)) for n, v in HEADS.items()}


def test_round_trip(trained: Path, images: np.ndarray) -> None:
    first, second = ShapesDetectors.from_pretrained(trained), ShapesDetectors.from_pretrained(trained)
    stored = load_file(str(trained / "model.safetensors"))
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, stored[key]), key
    p1, p2 = first.predict_proba(images), second.predict_proba(images)
    for name in HEADS:
        assert torch.equal(p1[name], p2[name])
        assert p1[name].shape == (len(images), len(HEADS[name]))
        assert torch.allclose(p1[name].sum(dim=-1), torch.ones(len(images)), atol=1e-5)
    assert first.predict(images) == second.predict(images)
    assert first.classes == {name: list(values) for name, values in HEADS.items()}


def test_same_seed_same_weights_and_empty_folder_accepted(trained: Path, tmp_path: Path) -> None:
    (tmp_path / "again").mkdir()  # an existing empty folder is fine
    again = train_detectors(tmp_path / "again", seed=3, **TINY)
    a, b = load_file(str(trained / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_predict_input_kinds(trained: Path, images: np.ndarray) -> None:
    detectors = ShapesDetectors.from_pretrained(trained)
    reference = detectors.predict_proba(images)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    pil = [Image.fromarray(image) for image in images]
    for other in (detectors.predict_proba(tensor), detectors.predict_proba(pil)):
        for name in HEADS:
            assert torch.allclose(other[name], reference[name], atol=1e-5)
    # One HWC image, and larger inputs (resized to 32).
    assert {k: v[0] for k, v in detectors.predict(images[0]).items()} == {
        k: v[0] for k, v in detectors.predict(images[:1]).items()
    }
    big_pil = [image.resize((64, 64), Image.NEAREST) for image in pil]
    big_tensor = torch.nn.functional.interpolate(tensor, size=64, mode="nearest")
    for big in (big_pil, big_tensor):
        labels = detectors.predict(big, batch_size=3)
        assert {name: len(values) for name, values in labels.items()} == {name: len(images) for name in HEADS}
        assert all(label in HEADS[name] for name, values in labels.items() for label in values)
    with pytest.raises(TypeError):
        detectors.predict("not images")


def test_refuses_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty") as info:
        train_detectors(tmp_path, **TINY)
    assert "\n" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_load_errors_are_one_line(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        ShapesDetectors.from_pretrained(tmp_path / "missing")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(trained, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="corrupt") as info:
        ShapesDetectors.from_pretrained(corrupt)
    assert "\n" not in str(info.value)
    (corrupt / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json") as info:
        ShapesDetectors.from_pretrained(corrupt)
    assert "\n" not in str(info.value)
    mismatch = tmp_path / "mismatch"
    shutil.copytree(trained, mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    config["architecture"]["width"] = 12
    (mismatch / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="do not match") as info:
        ShapesDetectors.from_pretrained(mismatch)
    assert "\n" not in str(info.value)


def test_augment_images() -> None:
    images = torch.rand(8, 3, 32, 32)
    a = augment_images(images, torch.Generator().manual_seed(0))
    b = augment_images(images, torch.Generator().manual_seed(0))
    assert a.shape == images.shape and torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.equal(a, images)


def test_evaluate_keys(trained: Path) -> None:
    scores = evaluate_detectors(ShapesDetectors.from_pretrained(trained), n=20, augment=True)
    assert set(scores) == {*ATTRIBUTES, NONE} and all(0.0 <= v <= 1.0 for v in scores.values())


@pytest.mark.skipif(not SHIPPED.is_dir(), reason=f"no shipped detectors at {SHIPPED}")
def test_shipped_detectors_accuracy() -> None:
    scores = evaluate_detectors(ShapesDetectors.from_pretrained(SHIPPED), n=500)
    assert all(value >= 0.98 for value in scores.values()), scores


def test_morph_examples_carry_soft_object_targets() -> None:
    from erasekit.toyworld.detectors import _render_examples

    plain_images, plain_labels, plain_targets = _render_examples(np.random.default_rng(4), 40, 0.1)
    # without morphs the targets are the labels, one-hot
    assert np.array_equal(plain_targets.argmax(1), plain_labels[:, 0]) and set(np.unique(plain_targets)) <= {0.0, 1.0}
    images, labels, targets = _render_examples(np.random.default_rng(4), 40, 0.0, morph_fraction=1.0)
    assert np.allclose(targets.sum(1), 1.0)
    assert ((targets > 0).sum(1) == 2).mean() > 0.9  # two objects share each target (t = 0 or 1 almost never)
    assert np.array_equal(targets.argmax(1), labels[:, 0])  # the label is the nearer end
    assert not np.array_equal(images, plain_images)


def test_training_with_morphs_records_it(tmp_path: Path) -> None:
    out = train_detectors(tmp_path / "morph", seed=3, morph_fraction=0.5, **TINY)
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["morph_fraction"] == 0.5
    ShapesDetectors.from_pretrained(out).predict(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="morph_fraction"):
        train_detectors(tmp_path / "bad", morph_fraction=1.5, **TINY)
