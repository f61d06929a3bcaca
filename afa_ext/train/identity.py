"""What identifies the inputs of a cached or recorded result: fingerprints of settings and files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["canonical_json", "fingerprint", "file_identity"]


def _json_default(value):
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(
        f"fingerprint: a {type(value).__name__} has no canonical JSON form; "
        f"pass numbers, strings, booleans, None, lists or dicts"
    )


def canonical_json(value) -> str:
    """JSON with sorted keys, no spaces, ASCII only, tuples as lists and paths as strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default)


def fingerprint(**parts) -> str:
    """sha256 (hex) of the canonical JSON of ``parts``."""
    return hashlib.sha256(canonical_json(parts).encode("ascii")).hexdigest()


def file_identity(path: str | Path, root: Path | None = None) -> list:
    """[path, size in bytes, mtime in ns] of a file: its path relative to ``root``, or its
    absolute path without one."""
    path = Path(path)
    stat = path.stat()
    name = path.relative_to(root).as_posix() if root is not None else str(path.resolve())
    return [name, stat.st_size, stat.st_mtime_ns]
