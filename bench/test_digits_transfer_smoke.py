"""bench/digits_transfer.py end to end with few rounds: every loss timed on both sides,
and DELTA's two estimates timed with one rank correlation per hooked layer."""

from __future__ import annotations

import re

import digits_transfer


def test_digits_transfer_small_run(capsys, tmp_path):
    assert digits_transfer.main(["--rounds", "2", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for loss in ("fea_map", "delta", "ast", "act"):
        row = re.search(rf"^\| {loss} \| ([0-9.]+) \| ([0-9.]+|-) \| ([0-9.]+x|-) \|$", out, re.MULTILINE)
        assert row is not None and float(row.group(1)) > 0, out
    rhos = re.search(r"Spearman rank correlation per layer: (.*)$", out, re.MULTILINE).group(1).split(", ")
    assert [r.split()[0] for r in rhos] == ["features.0", "features.1", "features.2"]
    assert all(-1 <= float(r.split()[1]) <= 1 for r in rhos)
