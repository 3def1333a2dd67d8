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
