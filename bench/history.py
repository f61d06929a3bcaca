"""Where a benchmark's results go: CSV files of rows, a history of runs kept in one, the
command and commit a run came from, and the generated section of bench/RESULTS.md."""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
from pathlib import Path
from collections.abc import Sequence

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent


# --------------------------------------------------------------------------- provenance


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The shell command that reruns ``script`` (a path) with ``argv`` (default: this
    process's arguments) from the repository root, e.g. "python bench/report.py --quick"."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    relative = Path(os.path.relpath(Path(script).resolve(), REPO_ROOT)).as_posix()
    return shlex.join(["python", relative, *map(str, arguments)])


def git_commit() -> str:
    """The checkout's short commit, "unknown" outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"


# --------------------------------------------------------------------------- CSV files


def cell(value) -> str:
    """A CSV cell: "" for None, floats to 6 significant digits, anything else as str()."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def has_rows(path: Path, fields: Sequence[str]) -> bool:
    """Whether the CSV file ``path`` holds rows already; SystemExit when its columns are not ``fields``."""
    if not (path.is_file() and path.stat().st_size > 0):
        return False
    with open(path, newline="") as handle:
        header = next(csv.reader(handle), None)
    if tuple(header or ()) != tuple(fields):
        raise SystemExit(f"{path}: its columns are not this script's ({', '.join(fields)}); write to another file")
    return True


def write_rows(rows: Sequence[dict], path: Path, fields: Sequence[str], append: bool = False) -> None:
    """Write ``rows`` (missing keys as empty cells) to the CSV file ``path`` with columns
    ``fields``; with ``append``, after the rows it holds (whose columns must be ``fields``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = append and has_rows(path, fields)
    with open(path, "a" if keep else "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        if not keep:
            writer.writeheader()
        for row in rows:
            writer.writerow({key: cell(row.get(key)) for key in fields})


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of the CSV file ``path`` as dicts of strings; [] when there is no such file."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def number(text: str | None) -> float | None:
    """A CSV cell's float, None for an empty cell."""
    return None if text in ("", None) else float(text)


# --------------------------------------------------------------------------- a history of runs


def machine_key(row: dict[str, str]) -> tuple:
    """What makes two history rows the same (machine, device): the "device_name" and the CPU
    part of the "machine" line (timing.machine_line: model, logical CPUs, torch threads);
    not the platform string, which names the kernel build and changes from one VM to the next."""
    parts = [part for part in row["machine"].split("; ") if part.startswith("CPU ")]
    return row["device_name"], parts[0] if parts else row["machine"]


def latest_runs(history: Sequence[dict[str, str]]) -> list[list[dict[str, str]]]:
    """The rows of the latest run (by "datetime") of each (machine, device), oldest group first."""
    latest: dict[tuple, str] = {}
    for row in history:
        latest[machine_key(row)] = max(latest.get(machine_key(row), ""), row["datetime"])
    groups = [
        [row for row in history if machine_key(row) == key and row["datetime"] == when] for key, when in latest.items()
    ]
    return sorted(groups, key=lambda group: group[0]["datetime"])


# --------------------------------------------------------------------------- RESULTS.md


def relative_link(path: Path, document: Path) -> str:
    """``path`` relative to the folder of the markdown file ``document``, for a link in it."""
    return Path(os.path.relpath(Path(path).resolve(), Path(document).resolve().parent)).as_posix()


def section_markers(name: str) -> tuple:
    """The (begin, end) HTML comments around the generated section ``name`` of a markdown file."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def rewrite_section(document: Path, name: str, title: str, text: str) -> None:
    """Put ``text`` between the markers of section ``name`` in the markdown file ``document``;
    add the section (``title`` and markers) at the end when the file lacks it, and create the
    file when it does not exist."""
    begin, end = section_markers(name)
    block = f"{begin}\n{text}\n{end}"
    content = document.read_text() if document.is_file() else ""
    if begin in content and end in content and content.index(begin) < content.index(end):
        before, rest = content.split(begin, 1)
        after = rest.split(end, 1)[1]
        content = before + block + after
    else:
        content = content.rstrip("\n") + ("\n\n" if content else "") + f"{title}\n\n{block}\n"
    document.parent.mkdir(parents=True, exist_ok=True)
    document.write_text(content)
