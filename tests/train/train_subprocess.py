"""The environment of the trainer subprocesses that tests start."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Variables torchrun sets: a subprocess started from a test must not inherit them.
DISTRIBUTED_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def subprocess_env(cache: Path) -> dict:
    """The environment of a trainer subprocess: this checkout importable, the session's
    cache, no inherited torchrun variables, one thread per process (the same arithmetic
    in every run, whatever runs beside it)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in DISTRIBUTED_VARIABLES and not key.startswith("TORCHELASTIC")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env["AFA_EXT_CACHE"] = str(cache)
    env["OMP_NUM_THREADS"] = "1"
    return env
