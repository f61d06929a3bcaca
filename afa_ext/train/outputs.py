"""What a run leaves in ``--out``: the folder guard, ``config.toml``, ``metrics.csv``,
``model.pt``, ``result.json`` and ``curves.png``, each written atomically.

An existing non-empty folder is only ever continued (``--resume``), never overwritten.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

from .checkpoint import atomic_write_json, atomic_write_text
from .config import ConfigError
from .state import EpochRecord

__all__ = [
    "METRIC_COLUMNS",
    "check_out_folder",
    "write_metrics",
    "write_result",
    "CHECKPOINT",
    "MODEL",
    "RESULT",
    "CONFIG",
    "METRICS",
    "CURVES",
]

CONFIG = "config.toml"
METRICS = "metrics.csv"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
RESULT = "result.json"
CURVES = "curves.png"

METRIC_COLUMNS = tuple(field.name for field in dataclasses.fields(EpochRecord))


def check_out_folder(out: Path, resume: bool) -> None:
    """Refuse a non-empty folder without ``--resume``, and ``--resume`` without a run."""
    if resume:
        if not (out / CONFIG).is_file():
            raise ConfigError(f"--resume: {out} holds no run to resume (no {CONFIG}); leave out --resume to start one")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"--out {out}: the folder exists and is not empty; pass --resume to continue the run in it, "
            f"or choose another --out (nothing in it was touched)"
        )


def write_metrics(out: Path, records: list[EpochRecord]) -> None:
    """metrics.csv: one row per stage and epoch, every loss term apart."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({key: _format(value) for key, value in dataclasses.asdict(record).items()})
    atomic_write_text(out / METRICS, buffer.getvalue())


def _format(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def write_result(out: Path, result: dict) -> None:
    atomic_write_json(out / RESULT, result)
