"""The fair-comparison protocol (afa_ext.train.protocol) and the files of its report
(afa_ext.train.report), on run records built by hand: selection on validation only,
ties, diverged points, the paired difference and its interval against a hand computation.
"""

import csv
import math

import pytest

from afa_ext.train import report
from afa_ext.train.protocol import DIVERGED, FINISHED, RunRecord, paired_difference, select

SEEDS = (0, 1, 2)
T_975 = {2: 4.302652729911275, 4: 2.7764451051977987}  # Student's t, 0.975 quantile, by degrees of freedom


def record(method, alpha, seed, val, test, status=FINISHED, steps=100):
    return RunRecord(
        method,
        alpha,
        seed,
        status=status,
        lr=0.01,
        best_val_acc=val,
        test_acc=test,
        epochs_run=10,
        steps=steps,
        wall_time_s=1.0,
        out=f"runs/{method}-{alpha}-{seed}",
    )


def grid_records(method, by_alpha):
    """``by_alpha[alpha] = (val per seed, test per seed)``."""
    return [
        record(method, alpha, seed, val[i], test[i])
        for alpha, (val, test) in by_alpha.items()
        for i, seed in enumerate(SEEDS)
    ]


def test_selection_reads_validation_only_where_test_would_choose_another_point():
    records = grid_records(
        "delta",
        {
            0.01: ([0.80, 0.82, 0.81], [0.95, 0.96, 0.97]),  # the best test accuracy: never looked at
            0.1: ([0.90, 0.91, 0.89], [0.70, 0.72, 0.71]),  # the best validation accuracy
            1.0: ([0.85, 0.86, 0.84], [0.90, 0.90, 0.90]),
        },
    )
    selection = select("delta", records, [0.01, 0.1, 1.0])
    assert selection.selected.alpha == 0.1
    assert selection.selected.val_acc_mean == pytest.approx(0.90)
    assert selection.test_by_seed == {0: 0.70, 1: 0.72, 2: 0.71}
    assert not selection.at_grid_edge


def test_a_tie_goes_to_the_smaller_alpha_and_an_edge_is_flagged():
    same = ([0.9, 0.8, 0.7], [0.5, 0.5, 0.5])
    records = grid_records("l2sp", {0.001: ([0.1, 0.1, 0.1], [0.9, 0.9, 0.9]), 0.01: same, 0.1: same})
    assert select("l2sp", records, [0.001, 0.01, 0.1]).selected.alpha == 0.01
    at_edge = select("l2sp", records, [0.01, 0.1])
    assert at_edge.selected.alpha == 0.01 and at_edge.at_grid_edge
    assert not select("l2sp", records, [0.01]).at_grid_edge  # a single alpha has no edge to widen


def test_a_point_with_a_diverged_seed_is_never_selected():
    records = grid_records("fea_map", {0.001: ([0.80, 0.80, 0.80], [0.8, 0.8, 0.8])})
    records += [
        record("fea_map", 0.01, 0, 0.99, 0.99),
        record("fea_map", 0.01, 1, 0.99, 0.99),
        record("fea_map", 0.01, 2, None, None, status=DIVERGED),
    ]
    selection = select("fea_map", records, [0.001, 0.01])
    assert selection.selected.alpha == 0.001
    diverged = [r for r in records if r.status == DIVERGED]
    assert select("fea_map", diverged, [0.01]).selected is None


def test_the_paired_interval_matches_a_hand_computation():
    method_tests = [0.93, 0.91, 0.885, 0.95, 0.925]
    baseline_tests = [0.91, 0.90, 0.89, 0.92, 0.91]
    seeds = [0, 1, 2, 3, 4]
    method = select("afa", [record("afa", 0.1, s, 0.5, t) for s, t in zip(seeds, method_tests)], [0.1])
    baseline = select("none", [record("none", None, s, 0.5, t) for s, t in zip(seeds, baseline_tests)], [None])
    difference = paired_difference(method, baseline)
    # d = 0.02, 0.01, -0.005, 0.03, 0.015: mean 0.014, squared deviations sum to 6.7e-4
    assert difference.differences == pytest.approx([0.02, 0.01, -0.005, 0.03, 0.015])
    assert difference.mean == pytest.approx(0.014)
    half = T_975[4] * math.sqrt(6.7e-4 / 4) / math.sqrt(5)
    low, high = difference.ci95
    assert low == pytest.approx(0.014 - half, rel=1e-9) and high == pytest.approx(0.014 + half, rel=1e-9)
    assert difference.wins == 4 and difference.n == 5


def test_pairs_only_the_seeds_both_have_and_needs_two_for_an_interval():
    method = select("afa", [record("afa", 0.1, 0, 0.5, 0.9), record("afa", 0.1, 1, 0.5, 0.8)], [0.1])
    baseline = select("none", [record("none", None, 1, 0.5, 0.7), record("none", None, 2, 0.5, 0.6)], [None])
    difference = paired_difference(method, baseline)
    assert difference.seeds == [1] and difference.mean == pytest.approx(0.1)
    assert difference.ci95 == (None, None)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_report_files_hold_the_selected_points_and_the_paired_differences(tmp_path):
    records = grid_records("none", {None: ([0.8, 0.8, 0.8], [0.80, 0.82, 0.78])})
    records += grid_records(
        "afa", {0.001: ([0.85, 0.86, 0.87], [0.90, 0.81, 0.80]), 0.01: ([0.90, 0.88, 0.90], [0.84, 0.86, 0.85])}
    )
    records.append(record("afa", 0.1, 0, None, None, status=DIVERGED))
    records += [record("afa", 0.1, s, 0.99, 0.99) for s in (1, 2)]
    comparison = report.compare_runs(
        ["none", "afa"], list(SEEDS), {"none": [None], "afa": [0.001, 0.01, 0.1]}, ["none"], records
    )
    markdown = report.write_report(tmp_path, comparison, "hand-made")
    summary = {row["method"]: row for row in read_csv(tmp_path / "summary.csv")}
    assert list(summary["afa"])[:12] == [
        "method",
        "selected_alpha",
        "val_acc_mean",
        "test_acc_mean",
        "test_acc_sd",
        "n_seeds",
        "steps",
        "at_grid_edge",
        "diff_vs_none",
        "ci95_low_vs_none",
        "ci95_high_vs_none",
        "wins_vs_none",
    ]
    afa = summary["afa"]
    assert float(afa["selected_alpha"]) == 0.01 and afa["at_grid_edge"] == "false"
    assert float(afa["test_acc_mean"]) == pytest.approx(0.85, abs=1e-6)
    differences = [0.04, 0.04, 0.07]
    mean = sum(differences) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 2)
    assert float(afa["diff_vs_none"]) == pytest.approx(mean, abs=1e-6)
    assert float(afa["ci95_low_vs_none"]) == pytest.approx(mean - T_975[2] * sd / math.sqrt(3), abs=1e-6)
    assert afa["wins_vs_none"] == "3" and afa["n_seeds"] == "3" and afa["steps"] == "100"
    assert summary["none"]["diff_vs_none"] == ""
    selection = read_csv(tmp_path / "selection.csv")
    assert [(r["method"], r["alpha"], r["selected"], r["diverged"]) for r in selection] == [
        ("none", "", "true", "0"),
        ("afa", "0.001", "false", "0"),
        ("afa", "0.01", "true", "0"),
        ("afa", "0.1", "false", "1"),
    ]
    runs = read_csv(tmp_path / "runs.csv")
    assert list(runs[0]) == list(report.RUN_COLUMNS) and len(runs) == len(records)
    assert "Diverged" in markdown and "afa alpha 0.1 seed 0" in markdown
    assert "| afa | 0.01 | 100 | 0.893 | 0.850 ± 0.010 |" in markdown
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
