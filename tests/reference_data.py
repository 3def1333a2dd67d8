"""Where the tests find the reference data that is not part of the repository (``$ERASEKIT_DATA``).

``conftest.py`` sets ``ERASEKIT_DATA`` when it is unset and the developers' data folder exists;
without it, the tests that need a file skip with a reason that says how to provide it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: The data folder (``prompts/``, ``reference_masks/``), or ``None`` when ``ERASEKIT_DATA`` is unset.
DATA: Path | None = Path(os.environ["ERASEKIT_DATA"]) if os.environ.get("ERASEKIT_DATA") else None


def data_file(relative: str) -> Path:
    """The path of ``relative`` under the data folder (a path that does not exist when there is none)."""
    return (DATA or Path("ERASEKIT_DATA-is-unset")) / relative


def needs_data(*relative: str) -> pytest.MarkDecorator:
    """Skip unless every one of ``relative`` exists under ``$ERASEKIT_DATA``."""
    missing = [r for r in relative if not data_file(r).is_file()]
    where = f"under ERASEKIT_DATA={DATA}" if DATA else "because ERASEKIT_DATA is unset"
    reason = f"reference data {', '.join(missing)} not found {where}; set ERASEKIT_DATA to the data folder"
    return pytest.mark.skipif(bool(missing), reason=reason)
