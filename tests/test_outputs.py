"""Output folders: the usual permissions (umask), whatever wrote the files (safetensors makes them 0600)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from erasekit.cli import main
from erasekit.outputs import atomic_directory, commit_directory


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(folder: Path) -> set[tuple[str, int]]:
    """``("dir" | "file", permission bits)`` of ``folder`` and everything in it."""
    found = {("dir", folder.stat().st_mode & 0o777)}
    for path in folder.rglob("*"):
        found.add(("dir" if path.is_dir() else "file", path.stat().st_mode & 0o777))
    return found


def test_commit_gives_the_umask_permissions(tmp_path, umask_022):
    import torch
    from safetensors.torch import save_file

    tmp = atomic_directory(tmp_path / "out")
    assert tmp.stat().st_mode & 0o777 == 0o700  # tempfile.mkdtemp's: fixed on commit
    save_file({"x": torch.ones(2)}, str(tmp / "w.safetensors"))
    (tmp / "sub").mkdir(mode=0o700)
    (tmp / "sub" / "a.txt").write_text("a")
    commit_directory(tmp, tmp_path / "out")
    assert modes(tmp_path / "out") == {("dir", 0o755), ("file", 0o644)}


def test_command_outputs_are_readable_by_others(tiny_flux_path, tmp_path, umask_022, capsys):
    assert main(["tiny-model", "--output", str(tmp_path / "tiny")]) == 0
    assert (
        main(
            [
                "erase",
                "--model",
                tiny_flux_path,
                "--concept",
                "cat",
                "--steps",
                "1",
                "--resolution",
                "32",
                "--iterations",
                "1",
                "--set",
                "model.device=cpu",
                "--set",
                "sampling.max_sequence_length=16",
                "--output",
                str(tmp_path / "mask"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "generate",
                "--model",
                tiny_flux_path,
                "--masks",
                str(tmp_path / "mask"),
                "--prompt",
                "a cat",
                "--steps",
                "1",
                "--resolution",
                "32",
                "--output",
                str(tmp_path / "images"),
            ]
        )
        == 0
    )
    assert (
        main(
            ["fold", "--model", tiny_flux_path, "--masks", str(tmp_path / "mask"), "--output", str(tmp_path / "folded")]
        )
        == 0
    )
    capsys.readouterr()
    for name in ("tiny", "mask", "images", "folded"):
        assert modes(tmp_path / name) == {("dir", 0o755), ("file", 0o644)}, name


def test_write_atomically_replaces_whole_files_with_the_umask_mode(tmp_path, umask_022):
    from erasekit.outputs import write_atomically

    target = tmp_path / "report.md"
    assert write_atomically(target, "circlé\n") == target
    assert target.read_bytes() == "circlé\n".encode()
    assert target.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    write_atomically(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # no temporary file left


def test_write_atomically_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    from erasekit.outputs import write_atomically

    target = tmp_path / "metrics.json"
    target.write_text("old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        write_atomically(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def _hashed_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "model_index.json").write_text('{"a": 1}')
    (root / "sub" / "w.safetensors").write_bytes(bytes(range(256)))
    (root / "sub" / "notes.txt").write_text("ignored é")
    return root


# The digests below were computed with the code each helper replaced (demo._logits_digest,
# image_cache.world_hash, the evaluation's folder, prompt-set and denoiser-config hashes): records
# written before the helpers existed (mask_sha256, the shipped image cache's entry names) stay valid.


def test_tensors_sha256_is_the_demo_mask_digest():
    import torch

    from erasekit.outputs import tensors_sha256

    logits = {
        "norm/b.x": torch.linspace(-2, 3, 7),
        "heads/a.attn": torch.arange(6, dtype=torch.float64).reshape(2, 3) - 2.5,  # hashed as float32
    }
    digest = "2ba774ea8eaea602306531747a100424b44d4c8cd8398cc6c4dcbb65ec91001a"
    assert tensors_sha256(logits) == digest
    assert tensors_sha256(dict(reversed(logits.items()))) == digest  # name order, not insertion order
    assert tensors_sha256({**logits, "norm/b.x": torch.linspace(-2, 3, 7).flip(0)}) != digest


def test_file_and_folder_digests_are_unchanged(tmp_path):
    import hashlib

    from erasekit.outputs import file_sha256, folder_sha256

    root = _hashed_folder(tmp_path / "model")
    assert file_sha256(root / "sub" / "w.safetensors") == hashlib.sha256(bytes(range(256))).hexdigest()
    # hex entries (the evaluation's detector and model-folder records), all files and the weights/configs
    assert folder_sha256(root) == "4ff6c7606e94b62384661373964b8dc4f0e29811853856726bbeceb8bf42848e"
    weights_and_configs = folder_sha256(root, lambda p: p.suffix in (".safetensors", ".bin", ".json"))
    assert weights_and_configs == "24e09f0e981de40462f5a53435e25eecacbc2c9f9a1d1f9a4cb006befc829c1a"
    # raw entries: the ShapesCanvas world hash that names the image cache's entries
    assert folder_sha256(root, raw_digests=True) == "87f7ed6c923609a42e53a0ca3c116bba12f99e0c8e242c3384b7c3a6473f4c97"


def test_world_hash_and_record_digests_are_unchanged(tmp_path):
    from types import SimpleNamespace

    from torch import nn

    from erasekit.evaluation.prompts import PromptItem, PromptSet
    from erasekit.methods.base import denoiser_config_hash
    from erasekit.toyworld import image_cache

    world = SimpleNamespace(pipeline_path=str(_hashed_folder(tmp_path / "world")))
    assert image_cache.world_hash(world) == "87f7ed6c923609a42e53a0ca3c116bba12f99e0c8e242c3384b7c3a6473f4c97"

    class Denoiser(nn.Module):
        config = {"b": (1, 2), "a": "é", "_private": 3}  # a tuple (default=list) and non-ASCII (escaped)

    assert denoiser_config_hash(Denoiser()) == "57f4e1d8cc6a33fd1f876acb50cd2b0c33c0b1f4f703fc0e29a11bb65a3650d1"
    prompts = PromptSet(name="x", source="y", kind="file", items=[PromptItem(index=0, prompt="a circlé", seed=3)])
    assert prompts.sha256 == "4bb57fc6b3ca22c65635bfbb005ef9b8b741d2d7ec5a8f90b133fa860d26ff1c"
