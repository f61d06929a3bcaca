"""Compare every available afa_ext backend with the pure-PyTorch loss (backend "reference").

For each of the four losses at one moderate shape: the loss value, the relative error of
the loss, of dL/d(target) and (where the weights are learned) of dL/d(weights) against a
float64 evaluation of the reference, and the forward+backward time (median of a few
interleaved runs) with the speed-up over the reference backend. Under a minute on 2 cores.

    python bench/compare_backends.py [--shape 16x256x28x28] [--device auto] [--repeats 7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cases  # noqa: E402
import tables  # noqa: E402
import timing  # noqa: E402

HEADERS = ["loss", "backend", "loss value", "rel err loss", "rel err dL/dt", "rel err dL/dw", "fwd+bwd ms", "speed-up"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape", type=cases.shape_argument, default=(16, 256, 28, 28), help="B x C x H x W (default 16x256x28x28)"
    )
    parser.add_argument("--dtype", choices=sorted(cases.DTYPES), default="float32")
    parser.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--repeats", type=int, default=7, help="timed fwd+bwd runs per backend (median)")
    return parser.parse_args(argv)


def compare_one_loss(loss_name: str, args, device: torch.device, backends: list[str]) -> list[list[str]]:
    """Rows of the table for one loss: accuracy of each backend, then its timing."""
    inputs = cases.make_inputs(loss_name, args.shape, cases.DTYPES[args.dtype], device)
    truth = cases.float64_reference(inputs)
    functions = {name: cases.loss_function(loss_name, name) for name in backends}
    evaluations = {name: cases.evaluate(fn, inputs) for name, fn in functions.items()}
    steps = {name: cases.step(fn, inputs) for name, fn in functions.items()}
    timing.warm_up(steps, device, calls=1)
    seconds = {
        name: timing.median(times) for name, times in timing.interleaved_times(steps, device, args.repeats).items()
    }
    rows = []
    for name in backends:
        result = evaluations[name]
        rows.append(
            [
                cases.SHORT_NAMES[loss_name],
                name,
                f"{result.loss.item():.6e}",
                tables.scientific(cases.relative_error(result.loss, truth.loss)),
                tables.scientific(cases.relative_error(result.target_grad, truth.target_grad)),
                tables.scientific(cases.relative_error(result.weights_grad, truth.weights_grad)),
                tables.milliseconds(seconds[name]),
                tables.ratio(seconds["reference"] / seconds[name]),
            ]
        )
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    device = timing.resolve_device(args.device)
    backends = cases.backends_on(device, include_reference=True)
    print(f"machine: {timing.machine_line(timing.machine_description(device))}")
    print(
        f"shape {cases.shape_text(args.shape)} {args.dtype} on {device}; backends: {', '.join(backends)}; "
        f"errors vs the reference in float64; time = median of {args.repeats} fwd+bwd; "
        f"speed-up vs backend 'reference'"
    )
    rows: list[list[str]] = []
    for loss_name in tqdm(cases.LOSS_NAMES, desc="losses", leave=False):
        rows += compare_one_loss(loss_name, args, device, backends)
    print(tables.text_table(HEADERS, rows, right_align_from=2))
    print("dL/dw: gradient of the attention map (ACT, AST); '-' where the weights are fixed or absent.")


if __name__ == "__main__":
    main()
