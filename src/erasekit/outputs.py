"""Files and folders erasekit writes, and the hashes that pin what it reads: the bottom layer.

Output folders are checked before any work, written under a temporary name and renamed when
complete. Every command that creates a folder goes through these helpers, so that a bad ``--output``
is refused before a model is loaded, and a failed run leaves nothing behind: the folder appears only
once everything in it is written. Single files written beside finished ones (reports, cache
entries, images of a resumable run) go through :func:`write_atomically` for the same reason.

The sha256 helpers give every digest erasekit records (files, folders, JSON records, tensors) one
definition each, so two records of the same thing can be compared.

This module imports nothing of erasekit but :mod:`erasekit.errors`: every layer may use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ErasekitError

if TYPE_CHECKING:  # torch is imported only where tensors are hashed: the CLI checks --output before loading it
    import torch


def _writable(folder: Path) -> bool:
    """Whether this process may create entries in ``folder`` (a read-only file system counts, even for root)."""
    return os.access(folder, os.W_OK | os.X_OK)


def check_output(path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Refuse an output folder that cannot be created, before any work is done.

    Refused: an existing ``path`` (unless ``overwrite``), a ``path`` under an existing file, and a
    ``path`` whose nearest existing parent folder this process cannot write in.

    Raises:
        ErasekitError: naming the problem and the fix.
    """
    target = Path(path)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise ErasekitError(f"output {str(target)!r} already exists; choose another --output or remove it")
        if not target.is_dir():
            raise ErasekitError(f"output {str(target)!r} is a file, not a folder; choose another --output or remove it")
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ErasekitError(
            f"output {str(target)!r} cannot be created: {str(parent)!r} is a file, not a folder; "
            "choose another --output"
        )
    if not _writable(parent):
        raise ErasekitError(
            f"output {str(target)!r} cannot be created: no permission to write in {str(parent)!r}; "
            "choose another --output"
        )
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_directory(path: Path) -> Path:
    """``mkdir -p`` whose failure (a file in the way, no permission) is a one-line :class:`ErasekitError`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ErasekitError(
            f"cannot create folder {str(path)!r}: {exc.strerror or exc}; choose another --output"
        ) from None
    return path


def atomic_directory(target: Path) -> Path:
    """A fresh temporary folder beside ``target`` to be renamed onto it with :func:`commit_directory`
    (which gives it the usual permissions: ``tempfile.mkdtemp`` makes it 0700)."""
    make_directory(target.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as exc:
        raise ErasekitError(f"cannot create {str(target)!r}: {exc.strerror or exc}; choose another --output") from None
    return tmp


def usual_permissions(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions the user's umask gives new files and folders.

    safetensors' ``save_file`` (which diffusers' ``save_pretrained`` uses too) creates its files owner-only
    (0600), ``tempfile.mkdtemp`` its folder 0700: a report or mask nobody else could read.
    """
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            (Path(root) / name).chmod(0o777 & ~mask)
        for name in files:
            file = Path(root) / name
            executable = file.stat().st_mode & 0o111
            file.chmod((0o777 if executable else 0o666) & ~mask)


def commit_directory(tmp: Path, target: Path, overwrite: bool = False) -> None:
    """Move a finished temporary folder onto ``target`` (replacing it only when ``overwrite``), with the
    usual permissions (:func:`usual_permissions`)."""
    usual_permissions(tmp)
    if target.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"output {str(target)!r} already exists; choose another --output or remove it")
        shutil.rmtree(target)
    os.replace(tmp, target)


def write_atomically(path: str | os.PathLike[str], data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write ``data`` (``str`` is encoded with ``encoding``) to ``path`` under a temporary name in the same
    folder, then rename it onto ``path``; returns ``path``.

    A reader (or a resumed run deciding what is finished) sees the old file or the complete new one,
    never a truncated one. The file gets the usual permissions (the umask's), not ``mkstemp``'s 0600.
    The folder must exist; an ``OSError`` leaves no temporary file behind.
    """
    target = Path(path)
    blob = data.encode(encoding) if isinstance(data, str) else data
    # a unique temporary name: two processes writing the same file do not write into each other's
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(blob)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's bytes, read in blocks (model weights need not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(
    folder: str | os.PathLike[str],
    select: Callable[[Path], bool] | None = None,
    *,
    raw_digests: bool = False,
) -> str:
    """sha256 (hex) of the files under ``folder`` (those ``select`` accepts), by relative name and content.

    Each file, in sorted path order, adds its ``/``-separated path relative to ``folder``, a NUL
    byte and its :func:`file_sha256` as hex text, or with ``raw_digests`` its 32 raw digest bytes:
    the ShapesCanvas world hash was defined that way, and the shipped image cache's entry names
    depend on it, so both forms stay.
    """
    root = Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and (select is None or select(p))):
        content = file_sha256(file)
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(bytes.fromhex(content) if raw_digests else content.encode())
    return digest.hexdigest()


def json_sha256(value: Any, *, ensure_ascii: bool = False, default: Callable[[Any], Any] | None = None) -> str:
    """sha256 (hex) of ``value`` as JSON with sorted keys, UTF-8 encoded: the same record, the same digest.

    ``ensure_ascii`` and ``default`` are passed to :func:`json.dumps`; the denoiser config hash that
    mask artefacts record was defined with ``ensure_ascii=True`` and ``default=list``.
    """
    blob = json.dumps(value, sort_keys=True, ensure_ascii=ensure_ascii, default=default)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of named tensors: each name, then the tensor's float32 bytes, in name order.

    Equal digests, equal values (as float32): the demo records its mask logits' so that two runs
    can be told to have trained the same mask.
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
