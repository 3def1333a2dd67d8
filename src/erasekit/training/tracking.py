"""A CSV tracker for accelerate, so the default log needs no extra package."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker


class CSVTracker(GeneralTracker):
    """Appends one row per ``log`` call to ``<logging_dir>/training_log.csv`` (columns fixed by the first row)."""

    name = "csv"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, logging_dir: str | Path, filename: str = "training_log.csv") -> None:
        super().__init__()
        self.path = Path(logging_dir) / filename
        self._columns: list[str] | None = None
        if self.path.is_file():  # resuming: keep the header and rows already written
            with self.path.open(newline="") as f:
                header = next(csv.reader(f), None)
            self._columns = header or None

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.with_name("hparams.json").write_text(json.dumps(values, indent=2, default=str))

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        row = {"step": step, **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._columns is None:
            self._columns = list(row)
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self._columns)
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self._columns])

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (rows of an interrupted run that a resume repeats)."""
        if not self.path.is_file():
            return
        with self.path.open(newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        kept = [rows[0]] + [r for r in rows[1:] if r and r[0] != "" and int(r[0]) <= step]
        with self.path.open("w", newline="") as f:
            csv.writer(f).writerows(kept)
