"""afa_ext.compat against the published pure-PyTorch regularisers: fwd+bwd time.

The workload is the AFA trainer's: each regulariser summed over ResNet-50's four hooked
layers, (C, H, W) = (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7) at batch
--batch, float32, target maps requiring grad, source maps frozen. "original" is a
transcription of the published AFA code (xiezheng-cs/AFA; bench/original_losses.py): per
layer, the difference map, its scaled copies and torch.norm, accumulated into a zero
tensor; "afa_ext.compat" is the drop-in replacement on the given backend (one call
with all layers). The attentive losses include their attention modules (the same
weights in both) and the backward into their parameters. Methods are timed round-robin
in one process; the table gives medians, the speed-up, and each loss value's relative
error against the transcription run in float64.

    python bench/compat_speed.py                 # batch 16, cpu backend
    python bench/compat_speed.py --batch 64 --budget 20
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import sys
from pathlib import Path
from collections.abc import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import history  # noqa: E402
import tables  # noqa: E402
import timing  # noqa: E402
from afa_ext import compat  # noqa: E402
from original_losses import (
    ORIGINAL_LOSSES,
    OriginalChannelAttention,  # noqa: E402
    OriginalPixelAttention,
)

RESNET50_LAYERS = ((256, 56), (512, 28), (1024, 14), (2048, 7))  # (C, side) at 224 px input
LOSSES = ("reg_fea_map", "reg_att_fea_map", "reg_pixel_att_fea_map_learn", "reg_channel_att_fea_map_learn")
ORIGINAL, COMPAT = "original", "afa_ext.compat"


ATTENTION_MODULES = {
    "reg_pixel_att_fea_map_learn": (OriginalPixelAttention, compat.pixel_attention),
    "reg_channel_att_fea_map_learn": (OriginalChannelAttention, compat.channel_attention),
}


# --------------------------------------------------------------------------- the workload


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--backend", default="cpu", help="the afa_ext backend of compat (default cpu)")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--rounds", type=int, help="timed rounds (default: fit --budget, 5 to 100)")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timed rounds per loss")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    return parser.parse_args(argv)


def feature_maps(batch: int):
    """Frozen source maps and target maps that require grad, one pair per hooked layer."""
    generator = torch.Generator().manual_seed(0)
    sources, targets = [], []
    for channels, side in RESNET50_LAYERS:
        source = torch.randn(batch, channels, side, side, generator=generator)
        drift = torch.rand(1, channels, 1, 1, generator=generator) + 0.05
        sources.append(source)
        targets.append((source + drift * torch.randn(source.shape, generator=generator)).requires_grad_())
    return sources, targets


def third_arguments(loss: str):
    """What follows the maps in the call, for the original and for compat: the channel
    weights, the attention modules (compat's loaded from the original's state_dict), or nothing."""
    torch.manual_seed(0)
    if loss == "reg_att_fea_map":
        weights = [torch.softmax(torch.randn(c), dim=0) for c, _ in RESNET50_LAYERS]
        return [weights], [weights]
    if loss in ATTENTION_MODULES:
        original_class, compat_class = ATTENTION_MODULES[loss]
        original = nn.ModuleList(original_class(c, side) for c, side in RESNET50_LAYERS)
        ours = nn.ModuleList(compat_class(c, side) for c, side in RESNET50_LAYERS)
        ours.load_state_dict(original.state_dict(), strict=True)
        return [original], [ours]
    return [], []


def forward_backward(loss_fn: Callable, sources, targets, extra) -> torch.Tensor:
    """One training step's regulariser: the loss and its backward, gradients reset first."""
    for target in targets:
        target.grad = None
    for module in (e for e in extra if isinstance(e, nn.Module)):
        module.zero_grad(set_to_none=True)
    loss = loss_fn(sources, targets, *extra)
    loss.sum().backward()
    return loss.detach()


def float64_value(loss: str, sources, targets, original_extra) -> torch.Tensor:
    """The transcription's loss in float64: what the errors are measured against."""
    extra = [copy.deepcopy(e).double() if isinstance(e, nn.Module) else [w.double() for w in e] for e in original_extra]
    with torch.no_grad():
        value = ORIGINAL_LOSSES[loss]([s.double() for s in sources], [t.double() for t in targets], *extra)
    return value.double().sum()


def time_loss(loss: str, sources, targets, args, device) -> dict:
    original_extra, compat_extra = third_arguments(loss)
    steps: dict[str, Callable] = {
        ORIGINAL: functools.partial(forward_backward, ORIGINAL_LOSSES[loss], sources, targets, original_extra),
        COMPAT: functools.partial(
            forward_backward,
            functools.partial(getattr(compat, loss), backend=args.backend),
            sources,
            targets,
            compat_extra,
        ),
    }
    exact = float64_value(loss, sources, targets, original_extra)
    errors = {name: abs((step().double().sum() - exact) / exact).item() for name, step in steps.items()}
    timing.warm_up(steps, device, 2)
    one_round = sum(timing.time_once(step, device) for step in steps.values())
    rounds = args.rounds or timing.rounds_for_budget(one_round, args.budget, 5, 100)
    medians = {
        name: timing.median(samples) for name, samples in timing.interleaved_times(steps, device, rounds).items()
    }
    return {
        "loss": loss,
        "rounds": rounds,
        "original_s": medians[ORIGINAL],
        "compat_s": medians[COMPAT],
        "original_error": errors[ORIGINAL],
        "compat_error": errors[COMPAT],
    }


def markdown(rows: list[dict]) -> str:
    headers = [
        "loss (4 ResNet-50 layers)",
        "original ms",
        "afa_ext.compat ms",
        "speed-up",
        "original rel. err.",
        "compat rel. err.",
        "rounds",
    ]
    body = [
        [
            r["loss"],
            tables.milliseconds(r["original_s"]),
            tables.milliseconds(r["compat_s"]),
            tables.ratio(r["original_s"] / r["compat_s"]),
            tables.scientific(r["original_error"]),
            tables.scientific(r["compat_error"]),
            str(r["rounds"]),
        ]
        for r in rows
    ]
    return tables.markdown_table(headers, body)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.backend not in ("cpu", "reference"):
        raise SystemExit(
            f"--backend: expected a backend that runs on CPU tensors (cpu, reference), got {args.backend!r}"
        )
    warning = timing.busy_machine_warning(torch.get_num_threads())
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    sources, targets = feature_maps(args.batch)
    rows = [time_loss(loss, sources, targets, args, device) for loss in args.losses]
    print(f"command: {history.command_line(__file__, argv)}")
    print(f"machine: {timing.machine_line(timing.machine_description(device))}")
    print(
        f"date: {datetime.date.today().isoformat()}; fwd+bwd, float32, batch {args.batch}, "
        f"compat backend {args.backend!r}, medians of interleaved rounds\n"
    )
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
