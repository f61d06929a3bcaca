"""The trainer's real workload: one AFA loss summed over all hooked layers, fwd+bwd.

The GPU target is the four-layer ResNet-101 batch-64 loss: within 1.2x of the 5N floor
(README.md, "How it works") at the measured bandwidth, >= 3x the eager pure-PyTorch loss
and >= 1.2x its torch.compile version, one launch per pass for all layers. For each loss
and dtype this times, side by side in one process, round-robin, median of the rounds:
  - eager:            the reference loss of every layer, summed, run eagerly
  - compile:          torch.compile of that sum (compilation excluded)
  - <backend>:        the functional loss given the lists of all layers (one multi-layer op)
  - <backend>/layer:  the same backend called layer by layer and summed (what the
                      multi-layer launch saves)
and reports each as ms, as a multiple of the 5N floor, as speed-ups over eager and
compile, its peak extra memory, the page faults of one call (CPU: memory the OS maps
afresh, a fault and a zeroed page per 4 KiB, paid inside the call), and its loss's
relative error against the float64 reference. The floor is measured, not computed from a
bandwidth taken once: a copy that moves 5 * sum_l N_l elements (read + write) is timed in the same interleaved rounds as
the losses, so it meets the same state of the machine (on the 2-core VMs the copy
bandwidth reads anywhere from 22 to 36 GB/s from one measurement to the next).

The eager loss is timed in rounds of its own after the others: on the 2-core VM, with it
in the rounds, the fused loss and the floor copy ran 10-20% slower for several calls after
each eager call (its ~800 MB of temporaries, mapped and unmapped at every call), so the
ratios to the floor depended on where eager happened to fall. Run alone, the others meet
the machine in the state a training loop that calls one loss would leave it in.

Writes <out>/multilayer.csv and <out>/multilayer.png, prints a markdown table.

    python bench/multilayer.py --device cuda                    # ResNet-101 batch 64, float32
    python bench/multilayer.py --device cuda --dtypes float32 bfloat16
    python bench/multilayer.py --quick                          # batch 2 on the CPU: a smoke test
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from collections.abc import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cases  # noqa: E402  (first: it puts the repository on sys.path when needed)
import history  # noqa: E402
import plots  # noqa: E402
import tables  # noqa: E402
import timing  # noqa: E402
from afa_ext import functional, reference  # noqa: E402

# ResNet-101's four hooked layers (the last conv of each stage, afa_ext/train/models.py) at
# 224 px input, as (C, H, W).
LAYERS = {"resnet101": ((256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))}
DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(LAYERS), default="resnet101")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(cases.DTYPES), default=["float32"])
    parser.add_argument(
        "--losses", nargs="+", choices=cases.LOSS_NAMES, default=["channel_attentive_loss", "spatial_attentive_loss"]
    )
    parser.add_argument("--rounds", type=int, help="timed rounds (default: fit --budget, 5 to 100)")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timed rounds per case")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile of the reference out")
    parser.add_argument(
        "--settle",
        type=int,
        default=1,
        help="untimed calls of a method right before each timed one (default 1; see timing.interleaved_times)",
    )
    parser.add_argument("--quick", action="store_true", help="batch 2, short budget: a smoke test")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.budget = 2, min(args.budget, 1.0)
    return args


def make_layers(loss_name: str, shapes, dtype, device) -> list[cases.LossInputs]:
    return [cases.make_inputs(loss_name, shape, dtype, device, seed=index) for index, shape in enumerate(shapes)]


def _columns(layers: list[cases.LossInputs]):
    targets = [layer.target for layer in layers]
    sources = [layer.source for layer in layers]
    weights = [layer.weights for layer in layers]
    return targets, sources, (None if weights[0] is None else weights)


def summed_reference(loss_name: str) -> Callable:
    loss = getattr(reference, loss_name)

    def total(targets, sources, weights):
        extra = [()] * len(targets) if weights is None else [(w,) for w in weights]
        return sum(loss(t, s, *e) for t, s, e in zip(targets, sources, extra))

    return total


def multi_layer_backend(loss_name: str, backend: str) -> Callable:
    loss = functools.partial(getattr(functional, loss_name), backend=backend)
    return lambda targets, sources, weights: (
        loss(targets, sources) if weights is None else loss(targets, sources, weights)
    )


def per_layer_backend(loss_name: str, backend: str) -> Callable:
    loss = functools.partial(getattr(functional, loss_name), backend=backend)

    def total(targets, sources, weights):
        extra = [()] * len(targets) if weights is None else [(w,) for w in weights]
        return sum(loss(t, s, *e) for t, s, e in zip(targets, sources, extra))

    return total


def methods_for(loss_name: str, device: torch.device, with_compile: bool) -> dict[str, Callable]:
    methods = {cases.EAGER: summed_reference(loss_name)}
    if with_compile:
        methods[cases.COMPILE] = torch.compile(summed_reference(loss_name), dynamic=False)
    for backend in cases.backends_on(device, include_reference=False):
        methods[backend] = multi_layer_backend(loss_name, backend)
        methods[f"{backend}/layer"] = per_layer_backend(loss_name, backend)
    return methods


def forward_backward(fn: Callable, layers: list[cases.LossInputs]) -> torch.Tensor:
    for layer in layers:
        cases.clear_grads(layer)
    loss = fn(*_columns(layers))
    loss.backward()
    return loss.detach()


def float64_loss(loss_name: str, layers: list[cases.LossInputs]) -> torch.Tensor:
    converted = [layer.converted(torch.float64) for layer in layers]
    return forward_backward(summed_reference(loss_name), converted)


FLOOR_COPY = "5N copy"


def floor_copy(elements: int, dtype: torch.dtype, device: torch.device) -> Callable[[], object]:
    """dst.copy_(src) over 2.5 N elements: 5 N elements of memory traffic (read + write),
    the floor of a fwd+bwd pair, to be timed beside the losses in the same rounds."""
    numel = (5 * elements + 1) // 2
    source = torch.ones(numel, dtype=dtype, device=device)
    destination = torch.empty_like(source)
    return functools.partial(destination.copy_, source)


def run_case(loss_name, dtype, shapes, device, args, bandwidth) -> list[dict]:
    layers = make_layers(loss_name, shapes, dtype, device)
    methods = methods_for(loss_name, device, not args.no_compile)
    steps = {name: functools.partial(forward_backward, fn, layers) for name, fn in methods.items()}
    expected = float64_loss(loss_name, layers)
    errors = {name: cases.relative_error(step(), expected) for name, step in steps.items()}  # also warms up
    elements = sum(cases.numel(shape) for shape in shapes)
    timed = dict(steps, **{FLOOR_COPY: floor_copy(elements, dtype, device)})
    timing.warm_up(timed, device, 2)
    # The eager loss is timed in rounds of its own, after the others': its hundreds of MB
    # of temporaries slowed whatever ran in the next few calls (see the module docstring).
    eager = {cases.EAGER: timed.pop(cases.EAGER)}
    one_round = sum(timing.time_once(step, device) for step in timed.values())
    rounds = args.rounds or timing.rounds_for_budget(one_round * (1 + args.settle), args.budget, 5, 100)
    samples = timing.interleaved_times(timed, device, rounds, settle=args.settle)
    eager_rounds = args.rounds or timing.rounds_for_budget(
        timing.time_once(eager[cases.EAGER], device), args.budget / 4, 3, 20
    )
    samples.update(timing.interleaved_times(eager, device, eager_rounds))
    memory = {name: timing.peak_memory_growth(step, device) for name, step in steps.items()}
    faults = {name: timing.page_faults_per_call(step, device) for name, step in steps.items()}
    floor = timing.median(samples[FLOOR_COPY])
    medians = {name: timing.median(samples[name]) for name in steps}
    rows = []
    for name, seconds in medians.items():
        rows.append(
            {
                "loss": loss_name,
                "dtype": cases.dtype_name(dtype),
                "method": name,
                "layers": " + ".join(cases.shape_text(s) for s in shapes),
                "elements": elements,
                "median_ms": 1e3 * seconds,
                "x_floor": seconds / floor,
                "floor_ms": 1e3 * floor,
                "speedup_vs_eager": medians[cases.EAGER] / seconds,
                "speedup_vs_compile": medians[cases.COMPILE] / seconds if cases.COMPILE in medians else None,
                "peak_extra_mb": None if memory[name] is None else memory[name] / 2**20,
                "page_faults": faults[name],
                "loss_rel_error": errors[name],
                "rounds": eager_rounds if name == cases.EAGER else rounds,
                "floor_bandwidth_gbs": 5 * elements * torch.empty((), dtype=dtype).element_size() / floor / 1e9,
            }
        )
    return rows


def floor_bandwidths(rows: list[dict]) -> str:
    """The bandwidth each case's floor copy reached, e.g. "ACT float32: 31.2 GB/s"."""
    firsts = [r for r in rows if r["method"] == cases.EAGER]
    return ", ".join(
        f"{cases.SHORT_NAMES.get(r['loss'], r['loss'])} {r['dtype']}: {r['floor_bandwidth_gbs']:.1f} GB/s"
        for r in firsts
    )


def markdown(rows: list[dict]) -> str:
    headers = [
        "loss",
        "dtype",
        "method",
        "ms",
        "x 5N floor",
        "vs eager",
        "vs compile",
        "peak extra MB",
        "page faults",
        "loss rel. err",
    ]
    body = [
        [
            cases.SHORT_NAMES.get(r["loss"], r["loss"]),
            r["dtype"],
            r["method"],
            f"{r['median_ms']:.3f}",
            f"{r['x_floor']:.2f}",
            tables.ratio(r["speedup_vs_eager"]),
            tables.ratio(r["speedup_vs_compile"]),
            tables.megabytes(None if r["peak_extra_mb"] is None else r["peak_extra_mb"] * 2**20),
            "-" if r["page_faults"] is None else str(r["page_faults"]),
            tables.scientific(r["loss_rel_error"]),
        ]
        for r in rows
    ]
    return tables.markdown_table(headers, body, right_align_from=3)


def plot(rows: list[dict], path: Path) -> None:
    plt = plots.pyplot()
    groups = sorted({(r["loss"], r["dtype"]) for r in rows})
    figure, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for axis, (loss, dtype) in zip(axes[0], groups):
        chosen = [r for r in rows if r["loss"] == loss and r["dtype"] == dtype]
        axis.bar([r["method"] for r in chosen], [r["median_ms"] for r in chosen], color="tab:blue")
        axis.axhline(chosen[0]["floor_ms"], color="tab:red", linestyle="--", label="5N floor")
        axis.set_title(f"{cases.SHORT_NAMES.get(loss, loss)} {dtype}, all layers fwd+bwd")
        axis.set_ylabel("ms (median)")
        axis.tick_params(axis="x", rotation=45)
        axis.legend()
    plots.save(figure, path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = timing.resolve_device(args.device)
    shapes = [(args.batch,) + layer for layer in LAYERS[args.model]]
    bandwidth = timing.copy_bandwidth(device)
    description = timing.machine_description(device)
    print(f"machine: {timing.machine_line(description)}", file=sys.stderr)
    print(f"copy bandwidth before the cases: {bandwidth / 1e9:.1f} GB/s (read + write)", file=sys.stderr)
    rows = []
    work = [(loss, cases.DTYPES[name]) for loss in args.losses for name in args.dtypes]
    for loss_name, dtype in tqdm(work, desc="cases", file=sys.stderr):
        rows += run_case(loss_name, dtype, shapes, device, args, bandwidth)
    history.write_rows(rows, args.out / "multilayer.csv", fields=list(rows[0]))
    plot(rows, args.out / "multilayer.png")
    print(
        f"{args.model} hooked layers at batch {args.batch}: {' + '.join(cases.shape_text(s) for s in shapes)}; "
        f"{description.get('gpu', description['cpu'])}; copy bandwidth {bandwidth / 1e9:.1f} GB/s before the cases; "
        f"each case's 5N floor is a copy of 5N elements' traffic timed in its rounds ({floor_bandwidths(rows)})\n"
    )
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
