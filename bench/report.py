"""Side-by-side speed of the AFA losses, in one process, interleaved.

For each loss (default: channel_attentive_loss and spatial_attentive_loss), shape and
dtype, times forward+backward of
  - eager:    the pure-PyTorch reference loss run eagerly,
  - compile:  torch.compile of the reference loss (warm-up, i.e. compilation, excluded),
  - each available compiled backend for the device (cpu; triton / cuda on a GPU),
round-robin, median of the rounds. The machine's copy bandwidth (dst.copy_(src) on a
256 MB float32 tensor, 2 * size bytes) gives the 5N floor = 5 * N * itemsize / bandwidth
(the least traffic of a separate forward and backward: README.md, "How it works"); every
time is also shown as a multiple of that floor and as
speed-ups over eager and over compile.

Writes bench/out/results.csv and bench/out/speed.png, prints a markdown table for
bench/RESULTS.md on stdout (progress goes to stderr).

    python bench/report.py                      # (64,512,28,28) and (32,256,28,28) float32, cpu
    python bench/report.py --quick              # small shapes only: a smoke test
    python bench/report.py --shapes 8x64x56x56 --dtypes float32 bfloat16 --device cuda
    python bench/report.py --preset resnet101-b64 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cases  # noqa: E402  (first: it puts the repository on sys.path when needed)
import afa_ext  # noqa: E402
import history  # noqa: E402
import plots  # noqa: E402
import tables  # noqa: E402
import timing  # noqa: E402

DEFAULT_SHAPES = ("64x512x28x28", "32x256x28x28")
QUICK_SHAPES = ("8x64x28x28", "4x128x14x14")
PRESETS = {
    # ResNet-101's four hooked layers (the last conv of each stage, see
    # afa_ext/train/models.py) at batch 64, 224 px input
    "resnet101-b64": ("64x256x56x56", "64x512x28x28", "64x1024x14x14", "64x2048x7x7"),
}
DEFAULT_LOSSES = ("channel_attentive_loss", "spatial_attentive_loss")
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
TARGET_BANDWIDTH_FRACTION = 0.6  # the CPU backend's target: >= 60% of copy bandwidth on 5N
LOSS_TOLERANCE = 1e-4  # relative difference from eager above which a method's loss is flagged


# --------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes", nargs="+", type=cases.shape_argument, help=f"B x C x H x W ... (default {' '.join(DEFAULT_SHAPES)})"
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named set of shapes, added to --shapes")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(cases.DTYPES), default=["float32"])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, or auto")
    parser.add_argument("--losses", nargs="+", choices=cases.LOSS_NAMES, default=list(DEFAULT_LOSSES))
    parser.add_argument("--rounds", type=int, help="timed rounds per case (default: fit --budget, 5 to 50)")
    parser.add_argument(
        "--budget", type=float, default=12.0, help="seconds of timed rounds per case when --rounds is not given"
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed fwd+bwd calls per method first (the first compiles)"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before anything runs")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile of the reference out")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument(
        "--quick", action="store_true", help=f"small shapes only ({' '.join(QUICK_SHAPES)}), short budget"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for results.csv and speed.png")
    args = parser.parse_args(argv)
    args.shapes = chosen_shapes(args)
    if args.quick:
        args.budget = min(args.budget, 1.5)
    return args


def chosen_shapes(args) -> list[tuple]:
    if args.quick:
        return [cases.parse_shape(text) for text in QUICK_SHAPES]
    shapes = list(args.shapes or [])
    if args.preset:
        shapes += [cases.parse_shape(text) for text in PRESETS[args.preset]]
    return shapes or [cases.parse_shape(text) for text in DEFAULT_SHAPES]


# --------------------------------------------------------------------------- measuring


@dataclass
class MethodResult:
    loss_name: str
    shape: tuple
    dtype: torch.dtype
    method: str
    samples: list[float]
    first_call_s: float  # for compile: compilation of forward and backward included
    peak_bytes: int | None
    loss_rel_diff: float | None  # relative difference of its loss from eager's

    @property
    def median_s(self) -> float:
        return timing.median(self.samples)


@dataclass
class Run:
    device: torch.device
    machine: dict[str, str]
    bandwidth_before: float
    bandwidth_after: float = 0.0
    results: list[MethodResult] = field(default_factory=list)

    @property
    def bandwidth(self) -> float:
        """The higher of the two measurements: the stricter (lower) floor."""
        return max(self.bandwidth_before, self.bandwidth_after)


def method_names(device: torch.device, include_compile: bool) -> list[str]:
    names = [cases.EAGER] + ([cases.COMPILE] if include_compile else [])
    return names + cases.backends_on(device, include_reference=False)


def loss_differences(steps, reference_method: str) -> dict[str, float]:
    """Relative difference of each method's loss from the reference method's, one call each."""
    losses = {name: step() for name, step in steps.items()}
    return {name: cases.relative_error(loss, losses[reference_method]) for name, loss in losses.items()}


def peak_memory(step, inputs: cases.LossInputs, device: torch.device) -> int | None:
    """Peak memory of one fwd+bwd above the inputs alone: the previous call's gradients are
    freed first (an optimizer's zero_grad(set_to_none=True)), and the cpu backend's cache
    of gradient blocks is emptied, so the new gradients count."""
    cases.clear_grads(inputs)
    afa_ext.empty_cache()
    return timing.peak_memory_growth(step, device)


def measure_case(loss_name: str, shape: tuple, dtype: torch.dtype, device: torch.device, args) -> list[MethodResult]:
    """Time every method on one (loss, shape, dtype), interleaved; then their peak memory."""
    torch._dynamo.reset()  # every case compiles afresh, with static shapes
    inputs = cases.make_inputs(loss_name, shape, dtype, device)
    names = method_names(device, include_compile=not args.no_compile)
    steps = {name: cases.step(cases.loss_function(loss_name, name), inputs) for name in names}
    warm = timing.warm_up(steps, device, calls=max(1, args.warmup))
    seconds_per_round = sum(times[-1] for times in warm.values())
    rounds = args.rounds or timing.rounds_for_budget(seconds_per_round, args.budget, least=5, most=50)
    samples = timing.interleaved_times(steps, device, rounds)
    differences = loss_differences(steps, cases.EAGER)
    peaks = {name: None if args.no_memory else peak_memory(step, inputs, device) for name, step in steps.items()}
    return [
        MethodResult(loss_name, tuple(shape), dtype, name, samples[name], warm[name][0], peaks[name], differences[name])
        for name in names
    ]


def measure_all(args, device: torch.device) -> Run:
    run = Run(device, timing.machine_description(device), timing.copy_bandwidth(device))
    plan = [(dtype, shape, loss) for dtype in args.dtypes for shape in args.shapes for loss in args.losses]
    progress = tqdm(plan, desc="cases", file=sys.stderr)
    for dtype_name, shape, loss_name in progress:
        progress.set_postfix_str(f"{cases.SHORT_NAMES[loss_name]} {cases.shape_text(shape)} {dtype_name}")
        run.results += measure_case(loss_name, shape, cases.DTYPES[dtype_name], device, args)
    progress.close()
    run.bandwidth_after = timing.copy_bandwidth(device)
    return run


# --------------------------------------------------------------------------- summarising


def summary_rows(run: Run) -> list[dict]:
    """One dict per method and case: times, floor multiples, speed-ups, memory."""
    medians = {(r.loss_name, r.shape, r.dtype, r.method): r.median_s for r in run.results}
    rows = []
    for result in run.results:
        case = (result.loss_name, result.shape, result.dtype)
        floor = timing.traffic_floor_seconds(cases.numel(result.shape), result.dtype.itemsize, run.bandwidth)
        eager = medians.get(case + (cases.EAGER,))
        compiled = medians.get(case + (cases.COMPILE,))
        q1, q3 = timing.quartiles(result.samples)
        rows.append(
            {
                "loss": result.loss_name,
                "shape": cases.shape_text(result.shape),
                "dtype": cases.dtype_name(result.dtype),
                "device": str(run.device),
                "method": result.method,
                "median_ms": result.median_s * 1e3,
                "q1_ms": q1 * 1e3,
                "q3_ms": q3 * 1e3,
                "min_ms": min(result.samples) * 1e3,
                "rounds": len(result.samples),
                "first_call_s": result.first_call_s,
                "floor_5n_ms": floor * 1e3,
                "x_floor": result.median_s / floor,
                "bandwidth_fraction": floor / result.median_s,
                "speedup_vs_eager": eager / result.median_s if eager else None,
                "speedup_vs_compile": compiled / result.median_s if compiled else None,
                "peak_extra_mb": None if result.peak_bytes is None else result.peak_bytes / 2**20,
                "loss_rel_diff_vs_eager": result.loss_rel_diff,
                "copy_bandwidth_gbps": run.bandwidth / 1e9,
                "threads": run.machine["torch_threads"],
                "torch": run.machine["torch"],
            }
        )
    return rows


def plot_speed(rows: Sequence[dict], path: Path) -> None:
    """Bars of time / 5N floor per method, grouped by shape and dtype, one panel per loss."""
    plt = plots.pyplot()
    losses = list(dict.fromkeys(row["loss"] for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    groups = list(dict.fromkeys((row["shape"], row["dtype"]) for row in rows))
    figure, axes = plt.subplots(
        1, len(losses), figsize=(max(6, 3 + 2.2 * len(groups)) * len(losses), 4.8), squeeze=False
    )
    width, offsets = plots.bar_slots(len(methods))
    for axis, loss_name in zip(axes[0], losses):
        by_key = {
            (row["shape"], row["dtype"], row["method"]): row["x_floor"] for row in rows if row["loss"] == loss_name
        }
        for index, method in enumerate(methods):
            positions = [g + offsets[index] for g in range(len(groups))]
            heights = [by_key.get(group + (method,), 0.0) for group in groups]
            bars = axis.bar(positions, heights, width, label=method)
            axis.bar_label(bars, labels=[f"{h:.1f}" if h else "" for h in heights], fontsize=7, padding=1)
        axis.axhline(1.0, color="black", linewidth=1, label="5N floor")
        axis.axhline(1 / TARGET_BANDWIDTH_FRACTION, color="gray", linestyle="--", linewidth=1, label="60% of copy BW")
        axis.set_yscale("log")
        axis.set_xticks(range(len(groups)), [f"{shape}\n{dtype}" for shape, dtype in groups])
        axis.set_ylabel("fwd+bwd time / 5N floor (lower is better)")
        axis.set_title(cases.SHORT_NAMES[loss_name])
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"afa_ext fwd+bwd on {rows[0]['device']}, relative to 5N bytes at copy bandwidth")
    plots.save(figure, path, dpi=120)


MARKDOWN_HEADERS = [
    "loss",
    "shape",
    "dtype",
    "method",
    "median ms",
    "IQR ms",
    "x 5N floor",
    "% copy BW",
    "vs eager",
    "vs compile",
    "peak extra MB",
]


def markdown_row(row: dict) -> list[str]:
    return [
        cases.SHORT_NAMES[row["loss"]],
        row["shape"],
        row["dtype"],
        row["method"],
        tables.milliseconds(row["median_ms"] / 1e3),
        tables.millisecond_range(row["q1_ms"] / 1e3, row["q3_ms"] / 1e3),
        f"{row['x_floor']:.2f}",
        tables.percent(row["bandwidth_fraction"]),
        tables.ratio(row["speedup_vs_eager"]),
        tables.ratio(row["speedup_vs_compile"]),
        tables.megabytes(None if row["peak_extra_mb"] is None else row["peak_extra_mb"] * 2**20, decimal_below_10=True),
    ]


def markdown_report(run: Run, rows: Sequence[dict], args) -> str:
    floors = dict.fromkeys(f"{row['shape']} {row['dtype']}: {row['floor_5n_ms']:.2f} ms" for row in rows)
    compile_times = [
        f"{row['shape']} {cases.SHORT_NAMES[row['loss']]} {row['first_call_s']:.1f} s"
        for row in rows
        if row["method"] == cases.COMPILE
    ]
    lines = [
        f"### {datetime.date.today().isoformat()}: {run.device}, {', '.join(args.dtypes)}",
        "",
        f"- machine: {timing.machine_line(run.machine)}",
        f"- command: `{history.command_line(__file__)}`",
        f"- copy bandwidth (dst.copy_(src), 256 MB float32, 2 x size bytes): "
        f"{run.bandwidth_before / 1e9:.1f} GB/s before, {run.bandwidth_after / 1e9:.1f} GB/s after; "
        f"floors use {run.bandwidth / 1e9:.1f} GB/s",
        f"- 5N floor (5 x N x itemsize / bandwidth): {'; '.join(floors)}",
        "- time: median of interleaved fwd+bwd rounds after warm-up (IQR = 25th-75th percentile); "
        "'% copy BW' = floor / time; 'vs eager', 'vs compile' = their time / this time",
        f"- peak extra MB: {timing.PEAK_MEMORY_MEANING.get(run.device.type, 'not measured')}",
    ]
    if compile_times:
        lines.append(f"- torch.compile first call (excluded from the times): {'; '.join(compile_times)}")
    lines += ["", tables.markdown_table(MARKDOWN_HEADERS, [markdown_row(row) for row in rows], right_align_from=4)]
    return "\n".join(lines)


def flagged_losses(rows: Sequence[dict]) -> list[str]:
    return [
        f"{row['method']} {row['loss']} {row['shape']} {row['dtype']}: "
        f"loss differs from eager by {row['loss_rel_diff_vs_eager']:.1e}"
        for row in rows
        if row["loss_rel_diff_vs_eager"] is not None and row["loss_rel_diff_vs_eager"] > LOSS_TOLERANCE
    ]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = timing.resolve_device(args.device)
    busy = timing.busy_machine_warning(torch.get_num_threads())
    if busy:
        print(f"WARNING: {busy}", file=sys.stderr)
    run = measure_all(args, device)
    rows = summary_rows(run)
    history.write_rows(rows, args.out / "results.csv", fields=list(rows[0]))
    plot_speed(rows, args.out / "speed.png")
    for warning in flagged_losses(rows):
        print(f"WARNING: {warning}", file=sys.stderr)
    report = markdown_report(run, rows, args)
    print(report if not busy else report + f"\n\nWARNING: {busy}")
    print(f"\nwrote {args.out / 'results.csv'} and {args.out / 'speed.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
