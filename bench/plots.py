"""What the benchmarks' figures share: matplotlib without a display, saving a figure, and
the places of side-by-side bars."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend, which draws into files and needs no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: Path, dpi: int) -> None:
    """Lay ``figure`` out tightly, write it to ``path`` (its folder created) and close it."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)


def bar_slots(series: int, group_width: float = 0.8) -> tuple[float, list[float]]:
    """(width of one bar, offset of each series' bar from its group's centre) for ``series``
    bars side by side in each group of a grouped bar chart, ``group_width`` wide in all."""
    width = group_width / max(series, 1)
    return width, [(index - (series - 1) / 2) * width for index in range(series)]
