"""Figures people would rather look at than read: a run's training curves (``curves.png``)
and a comparison's accuracies and paired differences (``comparison.png``).

Each ``*_figure`` function returns the matplotlib Figure (so its data can be checked);
``save`` writes one atomically and closes it.
"""

from __future__ import annotations

import io
from pathlib import Path
from collections.abc import Sequence

from .checkpoint import atomic_write_bytes

__all__ = ["curves_figure", "comparison_figure", "save"]

_COLOURS = ("#1f5f8b", "#c0504d", "#4f8f3a", "#8064a2", "#d08a1e")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    _pyplot().close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def curves_figure(rows: Sequence[dict], alphas: Sequence[float], beta: float, title: str = ""):
    """Left: the terms of the loss as they enter the total (CE, alpha * R, beta * head L2 and
    their sum) per epoch; right: train and validation accuracy. Epochs are counted across
    stages, with a dashed line where a stage starts."""
    plt = _pyplot()
    epochs = list(range(1, len(rows) + 1))
    figure, (losses, accuracy) = plt.subplots(1, 2, figsize=(10, 3.8))
    terms = {
        "cross-entropy": [row["ce"] for row in rows],
        "alpha * regulariser": [alphas[row["stage"] - 1] * row["feature"] for row in rows],
        "beta * head L2": [beta * row["head_l2"] for row in rows],
        "total": [row["total"] for row in rows],
    }
    for (label, values), colour in zip(terms.items(), _COLOURS):
        losses.plot(epochs, values, label=label, color=colour, linewidth=2.2 if label == "total" else 1.4)
    accuracy.plot(epochs, [row["train_acc"] for row in rows], label="train", color=_COLOURS[0])
    accuracy.plot(epochs, [row["val_acc"] for row in rows], label="validation", color=_COLOURS[1])
    for axes in (losses, accuracy):
        for index in range(1, len(rows)):
            if rows[index]["stage"] != rows[index - 1]["stage"]:
                axes.axvline(index + 0.5, color="0.6", linestyle="--", linewidth=1)
        axes.set_xlabel("epoch (all stages)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    losses.set_ylabel("mean over the epoch's steps")
    losses.set_title("loss terms")
    accuracy.set_ylabel("top-1 accuracy")
    accuracy.set_title("accuracy")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def comparison_figure(
    methods: Sequence[str], accuracies: dict[str, tuple], differences: dict[str, dict[str, tuple]], title: str = ""
):
    """Left: test accuracy per method, ``accuracies[method] = (per-seed values, mean, sd)``,
    each seed a point, mean ± sd as a bar. Right: per baseline, each method's mean paired
    difference (points of accuracy) with its 95% interval,
    ``differences[baseline][method] = (mean, low, high)``; a line at zero."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(11, 0.55 * len(methods) + 2.4), gridspec_kw={"width_ratios": [1.1, 1]}
    )
    rows = list(range(len(methods)))[::-1]  # first method on top
    for row, method in zip(rows, methods):
        if method not in accuracies:
            left.text(
                0.5,
                row,
                "no finished grid point",
                va="center",
                transform=left.get_yaxis_transform(),
                fontsize=8,
                color="0.4",
            )
            continue
        accs, mean, sd = accuracies[method]
        left.errorbar([mean], [row], xerr=[sd], fmt="s", color=_COLOURS[0], capsize=4, markersize=6)
        left.scatter(accs, [row + 0.18] * len(accs), s=12, color="0.25", zorder=3)
    left.set_yticks(rows, methods)
    left.set_xlabel("test accuracy (squares: mean ± sd; dots: seeds)")
    left.grid(axis="x", alpha=0.3)
    baselines = list(differences)
    spread = 0.6 / max(len(baselines), 1)
    for index, (baseline, colour) in enumerate(zip(baselines, _COLOURS[1:])):
        offset = (index - (len(baselines) - 1) / 2) * spread
        for row, method in zip(rows, methods):
            value = differences[baseline].get(method)
            if value is None or value[0] is None:
                continue
            mean, low, high = (100 * v if v is not None else None for v in value)
            xerr = [[mean - low], [high - mean]] if low is not None else None
            right.errorbar([mean], [row + offset], xerr=xerr, fmt="o", color=colour, capsize=3, label=f"vs {baseline}")
    right.axvline(0, color="0.3", linewidth=1)
    right.set_yticks(rows, methods)
    right.set_xlabel("paired test difference, points (95% t-interval)")
    right.grid(axis="x", alpha=0.3)
    handles, labels = right.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        right.legend(unique.values(), unique.keys(), fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure
