"""The README and bench/RESULTS.md name only files and folders that exist, and no file of
the repository sends the reader to a document outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "bench/RESULTS.md"]
# A repository path in backticks: `afa_ext/ops/schemas.py`, `tests/ops/`, `csrc/cuda`.
PATH_IN_BACKTICKS = re.compile(r"`((?:csrc|afa_ext|bench|tests)/[\w./-]*)`")
# Written by a run or a build, not tracked.
GENERATED = ("bench/out", "runs/")


def _named_paths(doc: str):
    text = (REPO / doc).read_text()
    return sorted({m.group(1).rstrip(".") for m in PATH_IN_BACKTICKS.finditer(text)})


@pytest.mark.parametrize("doc", DOCS)
def test_paths_named_in_the_docs_exist(doc):
    missing = [path for path in _named_paths(doc) if not path.startswith(GENERATED) and not (REPO / path).exists()]
    assert _named_paths(doc), f"{doc} names no path: the pattern no longer matches it"
    assert not missing, f"{doc} names paths that do not exist: {missing}"


def test_readme_layout_block_names_existing_folders():
    text = (REPO / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    top = [line.split()[0] for line in block.splitlines() if line and not line.startswith(" ")]
    assert {"csrc/", "afa_ext/", "bench/", "tests/"} <= set(top)
    for folder in top:
        assert (REPO / folder).is_dir(), folder
    for sub in ("afa_ext/nn", "afa_ext/ops", "afa_ext/ops/triton", "afa_ext/train", "tests/ops", "tests/nn"):
        assert (REPO / sub).is_dir() and f"{sub.split('/')[-1]}/" in block, sub


def test_no_file_refers_to_the_design_notebook():
    """The rules the code relies on are written in the repository, not in a notebook."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    name = "DESIGN" + ".md"  # split, so that this file does not match itself
    offenders = [
        f for f in files.stdout.split() if (REPO / f).is_file() and name in (REPO / f).read_text(errors="ignore")
    ]
    assert not offenders, offenders
