"""Output folders: checked before any work, written under a temporary name, renamed when complete.

Every command that creates a folder goes through these helpers, so that a bad ``--output`` is
refused before a model is loaded, and a failed run leaves nothing behind: the folder appears only
once everything in it is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import ErasekitError


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
