"""bench/train_step.py end to end at its tiniest: MobileNetV2 at 64 px, batch 2, one round,
on the CPU with one torch thread (two threads on a shared 2-core machine can run 10x
slower), into a temporary history and a copy of RESULTS.md. DELTA runs all three
implementations (its torch.compile is quick), AST the two eager ones. Checks the CSV rows,
that the implementations' losses agree with each other and with float64, that the
gradient-split check ran, and that the plot and the RESULTS.md section were written."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch

import train_step

COMMON = [
    "--device",
    "cpu",
    "--models",
    "mobilenet_v2",
    "--size",
    "64",
    "--batch",
    "2",
    "--rounds",
    "1",
    "--threads",
    "1",
]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_step_tiny_run(tmp_path, capsys, restore_threads):
    history, results, plot = tmp_path / "history.csv", tmp_path / "RESULTS.md", tmp_path / "step.png"
    shutil.copy(train_step.DEFAULT_RESULTS, results)
    before = results.read_text()
    paths = ["--history", str(history), "--results", str(results), "--plot", str(plot)]
    assert train_step.main(COMMON + ["--regs", "delta"] + paths) == 0
    assert train_step.main(COMMON + ["--regs", "ast", "--no-compile"] + paths) == 0

    rows = list(csv.DictReader(open(history)))
    assert [(r["reg"], r["implementation"]) for r in rows] == [
        ("delta", "original"),
        ("delta", "original+compile"),
        ("delta", "fused"),
        ("ast", "original"),
        ("ast", "fused"),
    ]
    for row in rows:
        assert row["model"] == "mobilenet_v2" and row["batch"] == "2" and row["device"] == "cpu", row
        assert row["commit"] and row["command"].startswith("python bench/train_step.py") and row["machine"], row
        assert float(row["step_ms_q1"]) <= float(row["step_ms_median"]) <= float(row["step_ms_q3"]), row
        assert float(row["feature_fwd_ms"]) > 0 and float(row["feature_bwd_ms"]) > 0, row
        assert 0 < float(row["feature_share"]) < 1, row
        assert float(row["speedup_vs_original"]) > 0 and float(row["first_step_s"]) > 0, row
        assert row["grad_split_rel_err"] != "" and float(row["grad_split_rel_err"]) <= 1e-4, row  # the check ran
        assert float(row["feature_rel_err_f64"]) < 1e-5, row  # against the original in float64
        assert float(row["total_rel_diff_vs_original"]) < 1e-5, row  # the implementations agree
    for reg in ("delta", "ast"):
        values = {float(r["total_loss"]) for r in rows if r["reg"] == reg}
        assert max(values) - min(values) <= 1e-5 * max(abs(v) for v in values), (reg, values)

    assert plot.stat().st_size > 10_000
    text = results.read_text()
    kept = before.split(train_step.BEGIN)[0] if train_step.BEGIN in before else before.rstrip("\n")
    assert text.startswith(kept) and text.count(train_step.BEGIN) == 1 and train_step.END in text  # the rest kept
    assert "| mobilenet_v2 | ast | fused |" in text and "](step.png)" in text
    printed = capsys.readouterr().out
    assert "- command: `python bench/train_step.py --device cpu" in printed and "- machine: " in printed

    # --report alone rewrites the section in place (not a second one)
    assert train_step.main(["--report"] + paths) == 0
    assert results.read_text().count(train_step.BEGIN) == 1
