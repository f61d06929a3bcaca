"""The fair-comparison protocol of ``afa-compare``: selection on validation, then paired
statistics on test.

For each method, every grid point (alpha) runs on every seed. The selected point is the
one with the highest mean validation accuracy over the seeds (ties: the smaller alpha);
a point is eligible only when every seed finished there (a diverged run disqualifies
its point). Test accuracy is read only at the selected point. Against a baseline B the
paired difference per seed is d_s = test(method, s) - test(B, s) over the seeds both
have; the report gives mean(d), its 95% t-interval mean(d) ± t(0.975, n - 1) * sd(d) / sqrt(n)
and the number of seeds with d_s > 0 (wins).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from collections.abc import Sequence

__all__ = [
    "FINISHED",
    "DIVERGED",
    "FAILED",
    "UNFINISHED",
    "MISSING",
    "RunRecord",
    "GridPoint",
    "Selection",
    "PairedDifference",
    "select",
    "paired_difference",
]

FINISHED = "finished"
DIVERGED = "diverged"  # the trainer's non-finite stop: recorded, never selected, never re-run
FAILED = "failed"  # any other error: re-run by --resume
UNFINISHED = "unfinished"  # started, killed or interrupted: continued by --resume
MISSING = "missing"  # not started


@dataclass
class RunRecord:
    """One trainer run of a sweep and what it left (accuracies only when finished)."""

    method: str
    alpha: float | None  # None for a method without a grid
    seed: int
    status: str = MISSING
    lr: float | None = None
    best_val_acc: float | None = None
    test_acc: float | None = None
    epochs_run: int | None = None
    steps: int | None = None
    wall_time_s: float | None = None
    out: str = ""
    message: str = ""  # why a run diverged or failed


@dataclass
class GridPoint:
    """One alpha of a method over the seeds."""

    alpha: float | None
    runs: list[RunRecord]

    @property
    def complete(self) -> bool:
        return bool(self.runs) and all(run.status == FINISHED for run in self.runs)

    @property
    def val_accs(self) -> list[float]:
        return [run.best_val_acc for run in self.runs if run.status == FINISHED]

    @property
    def val_acc_mean(self) -> float | None:
        return statistics.mean(self.val_accs) if self.val_accs else None

    @property
    def val_acc_sd(self) -> float | None:
        return _sd(self.val_accs) if self.val_accs else None


@dataclass
class Selection:
    """A method's grid, and the point chosen on validation (None when no point is complete)."""

    method: str
    points: list[GridPoint]
    selected: GridPoint | None

    @property
    def at_grid_edge(self) -> bool:
        """The selected alpha is the smallest or largest of a grid of two or more: widen it."""
        if self.selected is None or len(self.points) < 2:
            return False
        return self.selected is self.points[0] or self.selected is self.points[-1]

    @property
    def test_by_seed(self) -> dict[int, float]:
        return {} if self.selected is None else {run.seed: run.test_acc for run in self.selected.runs}

    @property
    def test_acc_mean(self) -> float | None:
        return statistics.mean(self.test_by_seed.values()) if self.selected is not None else None

    @property
    def test_acc_sd(self) -> float | None:
        return _sd(list(self.test_by_seed.values())) if self.selected is not None else None


@dataclass
class PairedDifference:
    """test(method) - test(baseline) over the seeds both have."""

    seeds: list[int]
    differences: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.differences) if self.differences else None

    @property
    def ci95(self) -> tuple[float | None, float | None]:
        """mean ± t(0.975, n - 1) * sd / sqrt(n); undefined below two seeds."""
        if self.n < 2:
            return None, None
        from scipy.stats import t

        half = t.ppf(0.975, self.n - 1) * _sd(self.differences) / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def wins(self) -> int:
        return sum(1 for d in self.differences if d > 0)


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def select(method: str, records: Sequence[RunRecord], alphas: Sequence[float | None]) -> Selection:
    """The grid of ``method`` (its records at each alpha, in grid order) and the point with
    the highest mean validation accuracy among the complete ones; ties go to the smaller alpha.
    Test accuracy plays no part."""
    points = [GridPoint(alpha, [r for r in records if r.method == method and r.alpha == alpha]) for alpha in alphas]
    best: GridPoint | None = None
    for point in points:  # ascending alpha: a later point must be strictly better
        if point.complete and (best is None or point.val_acc_mean > best.val_acc_mean):
            best = point
    return Selection(method, points, best)


def paired_difference(method: Selection, baseline: Selection) -> PairedDifference:
    """Per seed, the method's test accuracy minus the baseline's, both at their selected points."""
    mine, theirs = method.test_by_seed, baseline.test_by_seed
    seeds = [seed for seed in mine if seed in theirs]
    return PairedDifference(seeds, [mine[seed] - theirs[seed] for seed in seeds])
