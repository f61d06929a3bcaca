"""The two fwd+bwd designs that reach the 5N floor (README.md, "How it works"), side by side.

- recompute (afa_ext's design): the forward reads t and s and writes the small partial
  sums; the backward re-reads t and s and writes dL/dt. Nothing is held in between.
- stored gradient: the forward reads t and s and writes G = 2 W (t - s) (and the partial
  sums in the same pass); the backward scales G in place by the upstream gradient. An
  N-sized buffer is held from forward to backward.

The stored design is timed through the same compiled CPU kernels: its forward is the
pass of ``*_sqdist_backward`` (reads t and s, writes one N-sized tensor; the partial
sums ride along in registers) and its backward an in-place scale of that tensor. Both
designs are timed interleaved in one process, per op and in total.

    python bench/design_compare.py [--shape 64x512x28x28] [--rounds 15]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import cases  # noqa: E402  (first: it puts the repository on sys.path when needed)
import afa_ext  # noqa: E402
import tables  # noqa: E402
import timing  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=cases.shape_argument, default=(64, 512, 28, 28))
    parser.add_argument("--rounds", type=int, default=15)
    return parser.parse_args(argv)


def design_methods(shape):
    """Name -> a callable running one pass of one design on CPU float32 features."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(shape, generator=generator)
    source = torch.randn(shape, generator=generator)
    weights = torch.rand(shape[:2], generator=generator)
    ops = torch.ops.afa_ext
    stored = ops.channel_sqdist_backward(weights, target, source)
    return {
        "recompute forward": lambda: ops.channel_sqdist(target, source),
        "recompute backward": lambda: ops.channel_sqdist_backward(weights, target, source),
        "stored forward": lambda: ops.channel_sqdist_backward(weights, target, source),
        "stored backward": lambda: stored.mul_(1.0),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if "cpu" not in afa_ext.available_backends():
        raise SystemExit("the cpu backend is unavailable: build afa_ext._C first (make build)")
    device = torch.device("cpu")
    methods = design_methods(args.shape)
    timing.warm_up(methods, device, calls=2)
    samples = timing.interleaved_times(methods, device, args.rounds)
    ms = {name: 1e3 * timing.median(values) for name, values in samples.items()}
    bandwidth = timing.copy_bandwidth(device)
    floor_ms = 1e3 * timing.traffic_floor_seconds(cases.numel(args.shape), 4, bandwidth)
    rows = []
    for design in ("recompute", "stored"):
        forward, backward = ms[f"{design} forward"], ms[f"{design} backward"]
        held = "none" if design == "recompute" else f"{cases.numel(args.shape) * 4 / 1e6:.0f} MB"
        rows.append(
            [
                design,
                f"{forward:.2f}",
                f"{backward:.2f}",
                f"{forward + backward:.2f}",
                f"{(forward + backward) / floor_ms:.2f}",
                held,
            ]
        )
    print(timing.machine_line(timing.machine_description(device)))
    print(
        f"shape {cases.shape_text(args.shape)} float32, copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
        f"5N floor {floor_ms:.2f} ms, median of {args.rounds} interleaved rounds"
    )
    print(
        tables.markdown_table(["design", "forward ms", "backward ms", "total ms", "x 5N floor", "held fwd->bwd"], rows)
    )


if __name__ == "__main__":
    main()
