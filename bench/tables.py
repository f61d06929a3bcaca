"""Plain-text and markdown tables, and number formats for them."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right_align_from: int = 1) -> str:
    """Columns padded to their widest cell; columns from ``right_align_from`` on are right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        parts = []
        for index, (cell, width) in enumerate(zip(cells, widths)):
            parts.append(str(cell).rjust(width) if index >= right_align_from else str(cell).ljust(width))
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule] + [line(row) for row in rows])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right_align_from: int = 1) -> str:
    align = [":--" if index < right_align_from else "--:" for index in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def milliseconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def millisecond_range(low_seconds: float | None, high_seconds: float | None) -> str:
    """A range of times as "low-high" in ms, e.g. an interquartile range."""
    return f"{milliseconds(low_seconds)}-{milliseconds(high_seconds)}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def scientific(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def megabytes(num_bytes: float | None, decimal_below_10: bool = False) -> str:
    """MiB without decimals; with ``decimal_below_10``, one decimal under 10 MiB."""
    if num_bytes is None:
        return "-"
    mib = num_bytes / 2**20
    return f"{mib:.1f}" if decimal_below_10 and mib < 10 else f"{mib:.0f}"


def percent(value: float | None, decimals: int = 0) -> str:
    return "-" if value is None else f"{100 * value:.{decimals}f}%"
