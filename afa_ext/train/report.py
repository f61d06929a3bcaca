"""What ``afa-compare`` writes from its runs: ``runs.csv``, ``selection.csv``, ``summary.csv``,
``summary.md`` and ``comparison.png``. Everything is computed from the run records by
protocol.py's selection and paired differences; nothing here reads test accuracy before
a point is selected."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence

from . import plots
from .checkpoint import atomic_write_text
from .protocol import DIVERGED, FAILED, FINISHED, PairedDifference, RunRecord, Selection, paired_difference, select

__all__ = ["Comparison", "compare_runs", "write_report", "RUN_COLUMNS", "SUMMARY_COLUMNS"]

RUN_COLUMNS = (
    "method",
    "alpha",
    "lr",
    "seed",
    "status",
    "best_val_acc",
    "test_acc",
    "epochs_run",
    "steps",
    "wall_time_s",
    "out",
)
SUMMARY_COLUMNS = (
    "method",
    "selected_alpha",
    "val_acc_mean",
    "test_acc_mean",
    "test_acc_sd",
    "n_seeds",
    "steps",
    "at_grid_edge",
)
BASELINE_COLUMNS = ("diff_vs_{}", "ci95_low_vs_{}", "ci95_high_vs_{}", "wins_vs_{}")


@dataclass
class Comparison:
    """A sweep's selections and its paired differences against each baseline."""

    methods: list[str]
    seeds: list[int]
    baselines: list[str]
    records: list[RunRecord]
    selections: dict[str, Selection]
    differences: dict[str, dict[str, PairedDifference]]  # [baseline][method]

    def steps(self, method: str) -> int | None:
        selected = self.selections[method].selected
        return None if selected is None else selected.runs[0].steps

    @property
    def unfinished(self) -> list[RunRecord]:
        return [r for r in self.records if r.status not in (FINISHED, DIVERGED)]


def compare_runs(
    methods: Sequence[str],
    seeds: Sequence[int],
    grids: dict[str, list[float | None]],
    baselines: Sequence[str],
    records: Sequence[RunRecord],
) -> Comparison:
    selections = {m: select(m, records, grids[m]) for m in methods}
    differences = {
        b: {m: paired_difference(selections[m], selections[b]) for m in methods if m != b} for b in baselines
    }
    return Comparison(list(methods), list(seeds), list(baselines), list(records), selections, differences)


def _number(value, digits: int = 6) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _csv(rows: list[dict], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _number(row.get(key)) for key in columns})
    return buffer.getvalue()


def _summary_rows(comparison: Comparison) -> tuple[list[dict], list[str]]:
    columns = list(SUMMARY_COLUMNS)
    for baseline in comparison.baselines:
        columns += [name.format(baseline) for name in BASELINE_COLUMNS]
    columns += [f"test_acc_seed_{seed}" for seed in comparison.seeds]
    rows = []
    for method in comparison.methods:
        selection = comparison.selections[method]
        point = selection.selected
        row = {
            "method": method,
            "selected_alpha": None if point is None else point.alpha,
            "val_acc_mean": None if point is None else point.val_acc_mean,
            "test_acc_mean": selection.test_acc_mean,
            "test_acc_sd": selection.test_acc_sd,
            "n_seeds": len(selection.test_by_seed),
            "steps": comparison.steps(method),
            "at_grid_edge": selection.at_grid_edge,
        }
        for baseline in comparison.baselines:
            difference = comparison.differences[baseline].get(method)
            if difference is None or not difference.n:
                continue
            low, high = difference.ci95
            row.update(
                {
                    f"diff_vs_{baseline}": difference.mean,
                    f"ci95_low_vs_{baseline}": low,
                    f"ci95_high_vs_{baseline}": high,
                    f"wins_vs_{baseline}": difference.wins,
                }
            )
        for seed, acc in selection.test_by_seed.items():
            row[f"test_acc_seed_{seed}"] = acc
        rows.append(row)
    return rows, columns


def _selection_rows(comparison: Comparison) -> list[dict]:
    rows = []
    for method in comparison.methods:
        selection = comparison.selections[method]
        for point in selection.points:
            statuses = [run.status for run in point.runs]
            rows.append(
                {
                    "method": method,
                    "alpha": point.alpha,
                    "val_acc_mean": point.val_acc_mean,
                    "val_acc_sd": point.val_acc_sd,
                    "finished": statuses.count(FINISHED),
                    "diverged": statuses.count(DIVERGED),
                    "seeds": len(comparison.seeds),
                    "selected": point is selection.selected,
                }
            )
    return rows


def _points(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.1f}"


def _markdown(comparison: Comparison, title: str) -> str:
    seeds = comparison.seeds
    head = [
        "method",
        "alpha",
        "steps",
        "val acc",
        "test acc (mean ± sd)",
        "per seed (" + " ".join(map(str, seeds)) + ")",
    ]
    head += [f"vs {b}: Δ pts [95% CI] wins" for b in comparison.baselines]
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in comparison.methods:
        selection = comparison.selections[method]
        point = selection.selected
        if point is None:
            cells = [method, "", "", "", "no finished grid point", ""] + ["" for _ in comparison.baselines]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        tests = selection.test_by_seed
        alpha = "" if point.alpha is None else f"{point.alpha:g}" + (" (edge)" if selection.at_grid_edge else "")
        cells = [
            method,
            alpha,
            str(comparison.steps(method)),
            f"{point.val_acc_mean:.3f}",
            f"{selection.test_acc_mean:.3f} ± {selection.test_acc_sd:.3f}",
            " ".join(f"{tests[s]:.3f}" for s in seeds if s in tests),
        ]
        for baseline in comparison.baselines:
            difference = comparison.differences[baseline].get(method)
            if difference is None or not difference.n:
                cells.append("—")
                continue
            low, high = difference.ci95
            interval = "" if low is None else f" [{_points(low)}, {_points(high)}]"
            cells.append(f"{_points(difference.mean)}{interval} {difference.wins}/{difference.n}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Each method ran every alpha of its grid on every seed ({len(seeds)} seeds); the alpha with the best "
        "mean validation accuracy over the seeds was selected (ties: the smaller), and test accuracy was read "
        "only there. Δ: the method's test accuracy minus the baseline's, per seed, in points; its mean, 95% "
        "t-interval and the seeds on which the method was ahead. An interval that contains 0 is a difference "
        "inside the noise of these seeds. `REG:2` is REG on AFA's two-stage schedule (the same steps as afa).",
    ]
    edges = [m for m in comparison.methods if comparison.selections[m].at_grid_edge]
    if edges:
        lines += ["", "Selected at the edge of its grid (widen the grid): " + ", ".join(edges) + "."]
    diverged = [r for r in comparison.records if r.status == DIVERGED]
    if diverged:
        lines += [
            "",
            "Diverged (non-finite loss; never selected): "
            + ", ".join(f"{r.method} alpha {r.alpha:g} seed {r.seed}" for r in diverged)
            + ".",
        ]
    unfinished = comparison.unfinished
    if unfinished:
        failed = sum(1 for r in unfinished if r.status == FAILED)
        lines += [
            "",
            f"Not finished: {len(unfinished)} runs ({failed} failed); the table uses the grid points "
            "whose seeds all finished.",
        ]
    return "\n".join(lines) + "\n"


def write_report(out: Path, comparison: Comparison, title: str) -> str:
    """Write the five files into ``out``; returns the Markdown table."""
    runs = [
        {
            "method": r.method,
            "alpha": r.alpha,
            "lr": r.lr,
            "seed": r.seed,
            "status": r.status,
            "best_val_acc": r.best_val_acc,
            "test_acc": r.test_acc,
            "epochs_run": r.epochs_run,
            "steps": r.steps,
            "wall_time_s": r.wall_time_s,
            "out": r.out,
        }
        for r in comparison.records
    ]
    atomic_write_text(out / "runs.csv", _csv(runs, RUN_COLUMNS))
    atomic_write_text(
        out / "selection.csv",
        _csv(
            _selection_rows(comparison),
            ("method", "alpha", "val_acc_mean", "val_acc_sd", "finished", "diverged", "seeds", "selected"),
        ),
    )
    rows, columns = _summary_rows(comparison)
    atomic_write_text(out / "summary.csv", _csv(rows, columns))
    markdown = _markdown(comparison, title)
    atomic_write_text(out / "summary.md", markdown)
    differences = {
        b: {m: (d.mean, *d.ci95) for m, d in by_method.items() if d.n}
        for b, by_method in comparison.differences.items()
    }
    accuracies = {
        m: (list(s.test_by_seed.values()), s.test_acc_mean, s.test_acc_sd)
        for m, s in comparison.selections.items()
        if s.selected is not None
    }
    figure = plots.comparison_figure(comparison.methods, accuracies, differences, title)
    plots.save(figure, out / "comparison.png")
    return markdown
