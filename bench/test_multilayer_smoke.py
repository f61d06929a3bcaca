"""bench/multilayer.py end to end at batch 2 on the CPU: it runs, writes its CSV and plot,
and every method's loss agrees with the float64 reference."""

from __future__ import annotations

import csv

import multilayer


def test_multilayer_quick_run(tmp_path, capsys):
    assert (
        multilayer.main(
            [
                "--quick",
                "--device",
                "cpu",
                "--no-compile",
                "--rounds",
                "2",
                "--losses",
                "spatial_attentive_loss",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "multilayer.csv")))
    methods = {row["method"] for row in rows}
    assert {"eager"} <= methods and (tmp_path / "multilayer.png").stat().st_size > 0
    for row in rows:
        assert float(row["loss_rel_error"]) < 1e-5, row
        assert float(row["median_ms"]) > 0 and float(row["x_floor"]) > 0
    assert "| AST (spatial) | float32 | eager |" in capsys.readouterr().out
