"""What the kernels buy in a real training step: one AFA trainer step, three loss implementations.

One step as afa_ext/train/loop.py runs it: the source forward (no grad, the frozen source
model in eval mode) and the target forward (train mode) with the hooked layers' features
kept by FeatureHooks, the four-layer feature term R with its attention modules,
cross-entropy, the head L2 term, one backward and an SGD step (momentum 0.9) over the
target model and the attention modules; total = CE + alpha * R + beta * 0.5 * ||W_head||^2
(afa_ext/train/step.py), alpha the trainer's default for the regulariser. Models are
torchvision's ResNet-50 and MobileNetV2 from afa_ext.train.models with random weights:
the source's batch-norm statistics are set from the batch, and the target is the source
with every parameter moved by 5% of its spread (a fine-tuned model stays near its
source), so that the feature distances are not zero. Regularisers: ast
(reg_pixel_att_fea_map_learn), act (reg_channel_att_fea_map_learn) and delta
(reg_att_fea_map with fixed random softmax channel weights). Implementations:
  - original:          the published pure-PyTorch loss (bench/original_losses.py), eagerly
  - original+compile:  torch.compile of that same loss function, attention modules inside
  - fused:             afa_ext.compat's drop-in function on the afa_ext backend (default
                       cpu on CPU tensors, auto on CUDA), its attention modules loaded from
                       the original's state_dict, so all three compute the same numbers.

Each implementation has its own copy of the target model, attention modules and optimizer,
from the same start. The steps are timed round-robin (bench/timing.interleaved_times).
Inside the step, the device is synchronised between phases, and the backward runs in two
measured phases that together do the work of the one backward: A = torch.autograd.grad of
alpha * R with respect to the hooked target features (the feature term reads them through
detached aliases, no copy, so that A stops there) and the attention parameters (the
feature term's backward), B = torch.autograd.backward of CE + head term together with the
hooked features fed their phase-A gradients (the backbone's backward); the attention
parameters' gradients are then put in .grad. Once per case the resulting gradients are
checked against a plain total.backward() (asserted). Reported per case: median step time
and quartiles, the feature term's forward and backward (phase A) times and their share
of the step, the step's peak memory, the speed-up over "original", and the first step's
loss values (all implementations from the same state) with the feature term's relative
error against the original evaluated in float64.

Rows are appended to a CSV history (default bench/data/train_step.csv); after each run,
and with --report alone, the history gives a markdown table of the latest run per
(machine, device), the plot bench/data/train_step.png, and the section of bench/RESULTS.md
between <!-- train_step:begin --> and <!-- train_step:end -->.

    python bench/train_step.py                        # quick: CPU, batch 2, few rounds (~5 min on 2 cores)
    python bench/train_step.py --device cuda --full   # batch 64, more rounds: on a GPU
    python bench/train_step.py --report               # only regenerate table, plot and RESULTS.md section
    python bench/train_step.py --models mobilenet_v2 --regs ast --size 64 --rounds 1 --no-compile
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import cases  # noqa: E402  (first: it puts the repository on sys.path when needed)
import afa_ext  # noqa: E402
import history  # noqa: E402
import plots  # noqa: E402
import tables  # noqa: E402
import timing  # noqa: E402
from afa_ext import compat  # noqa: E402
from afa_ext.train.config import DEFAULT_LR  # noqa: E402
from afa_ext.train.models import (
    ARCH_PRESETS,
    preset_alphas,
    FeatureHooks,
    build_model,
    default_layers,  # noqa: E402
    feature_shapes,
    head_module_name,
    resolve_layers,
)
from afa_ext.train.regularizers import REGULARIZERS, head_l2  # noqa: E402
from original_losses import ORIGINAL_LOSSES, OriginalChannelAttention, OriginalPixelAttention  # noqa: E402

BENCH = Path(__file__).resolve().parent
DEFAULT_HISTORY = BENCH / "data" / "train_step.csv"
DEFAULT_RESULTS = BENCH / "RESULTS.md"
SECTION = "train_step"  # the name in the markers of its RESULTS.md section
BEGIN, END = history.section_markers(SECTION)
SECTION_TITLE = "## A whole training step (`bench/train_step.py`)"

MODELS = ("resnet50", "mobilenet_v2")
REGS = ("ast", "act", "delta")
ORIGINAL, COMPILED, FUSED = "original", "original+compile", "fused"
IMPLEMENTATIONS = (ORIGINAL, COMPILED, FUSED)
LOSS_NAMES = {"ast": "reg_pixel_att_fea_map_learn", "act": "reg_channel_att_fea_map_learn", "delta": "reg_att_fea_map"}
ATTENTION = {
    "ast": (OriginalPixelAttention, compat.pixel_attention),
    "act": (OriginalChannelAttention, compat.channel_attention),
}
NUM_CLASSES = 200  # outputs of the target's classifier head
BETA = 0.01  # the trainer's default head-L2 weight
TARGET_DRIFT = 0.05  # the target's parameters = the source's + this * their spread * N(0, 1)
GRAD_TOLERANCE = {"cpu": 1e-4, "cuda": 1e-3}  # split vs plain backward, relative per parameter
QUICK = {"batch": 2, "budget": 6.0, "least": 5, "most": 15}
FULL = {"batch": 64, "budget": 30.0, "least": 10, "most": 50}

FIELDS = (
    "datetime",
    "commit",
    "command",
    "machine",
    "load_avg",
    "device",
    "device_name",
    "torch",
    "triton",
    "model",
    "reg",
    "implementation",
    "backend",
    "batch",
    "image_size",
    "dtype",
    "rounds",
    "step_ms_median",
    "step_ms_q1",
    "step_ms_q3",
    "feature_fwd_ms",
    "feature_bwd_ms",
    "feature_share",
    "peak_mb",
    "speedup_vs_original",
    "first_step_s",
    "total_loss",
    "feature_loss",
    "total_rel_diff_vs_original",
    "feature_rel_err_f64",
    "grad_split_rel_err",
)


# --------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--regs", nargs="+", choices=REGS, default=list(REGS))
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument(
        "--full",
        action="store_true",
        help=f"batch {FULL['batch']}, {FULL['budget']:.0f} s of rounds per case (for a GPU); "
        f"default quick: batch {QUICK['batch']}, {QUICK['budget']:.0f} s",
    )
    parser.add_argument("--batch", type=int, help="images per step (default: by mode)")
    parser.add_argument("--size", type=int, help="image side in px (default: the model's preset, 224)")
    parser.add_argument("--rounds", type=int, help="timed rounds per case (default: fit --budget)")
    parser.add_argument("--budget", type=float, help="seconds of timed rounds per (model, reg) case")
    parser.add_argument("--backend", help="afa_ext backend of 'fused' (default: cpu on CPU, auto on CUDA)")
    parser.add_argument("--no-compile", action="store_true", help="leave 'original+compile' out")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--history", type=Path, default=DEFAULT_HISTORY, help="CSV history the rows are appended to")
    parser.add_argument("--plot", type=Path, help="plot written from the history (default: the history's .png)")
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help="markdown file whose train_step section is rewritten (created if missing)",
    )
    parser.add_argument("--report", action="store_true", help="measure nothing: regenerate table, plot and section")
    args = parser.parse_args(argv)
    mode = FULL if args.full else QUICK
    args.batch = args.batch or mode["batch"]
    args.budget = mode["budget"] if args.budget is None else args.budget
    args.least, args.most = mode["least"], mode["most"]
    args.plot = args.plot or args.history.with_suffix(".png")
    return args


# --------------------------------------------------------------------------- provenance


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return str(triton.__version__)


def device_name(device: torch.device, description: dict[str, str]) -> str:
    return description["gpu"] if device.type == "cuda" else f"CPU {description['cpu']}"


# --------------------------------------------------------------------------- models and data


@dataclass
class Case:
    """What the implementations of one (model, reg) share: the frozen source model and its
    hooks, the target's starting weights, the batch, the terms' weights and the original's
    attention modules / channel weights (the start of every implementation's)."""

    arch: str
    reg: str
    source: nn.Module
    source_hooks: FeatureHooks
    target: nn.Module
    layers: list[str]
    shapes: list[tuple]  # (C, H, W) of each hooked layer
    head: str
    images: torch.Tensor
    labels: torch.Tensor
    alpha: float
    extra: object  # nn.ModuleList of original attention modules, or the list of DELTA channel weights


def synthetic_batch(batch: int, size: int, device, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return images.to(device), labels.to(device)


@torch.no_grad()
def calibrate_batch_norm(model: nn.Module, images: torch.Tensor) -> None:
    """Set every batch norm's running statistics to those of ``images`` (one train-mode
    forward with a cumulative average), so that the eval-mode source behaves like a
    trained model's on this batch instead of passing unnormalised activations on."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    model(images)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


@torch.no_grad()
def drifted_copy(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every floating parameter p moved by TARGET_DRIFT * std(p) * N(0, 1)."""
    copied = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for parameter in copied.parameters():
        spread = parameter.std().item() if parameter.numel() > 1 else 0.0
        noise = torch.randn(parameter.shape, generator=generator).to(parameter.device)
        parameter.add_(TARGET_DRIFT * (spread or 1.0) * noise)
    return copied


def default_alpha(arch: str, reg: str) -> float:
    """The trainer's alpha for a single-stage run of ``reg`` (regularizers.REGULARIZERS)."""
    return REGULARIZERS[reg].default_alpha(preset_alphas(arch))


def original_extra(reg: str, shapes, device, seed: int):
    """The original's third argument: its attention modules (ast, act) or fixed random
    softmax channel weights (delta), one per hooked layer."""
    torch.manual_seed(seed)
    if reg == "delta":
        return [torch.softmax(torch.randn(c), dim=0).to(device) for c, _, _ in shapes]
    module_class = ATTENTION[reg][0]
    for c, h, w in shapes:
        if h != w:
            raise SystemExit(f"the original attention modules need square maps, got {c}x{h}x{w}")
    return nn.ModuleList(module_class(c, h) for c, h, _ in shapes).to(device)


def build_case(arch: str, reg: str, source: nn.Module, target: nn.Module, images, labels, device, seed) -> Case:
    layers = resolve_layers(source, default_layers(arch))
    shapes = feature_shapes(source, layers, images.shape[-1])
    return Case(
        arch=arch,
        reg=reg,
        source=source,
        source_hooks=FeatureHooks(source, layers),
        target=target,
        layers=layers,
        shapes=shapes,
        head=head_module_name(source, arch),
        images=images,
        labels=labels,
        alpha=default_alpha(arch, reg),
        extra=original_extra(reg, shapes, device, seed),
    )


def build_models(arch: str, batch: int, size: int, device, seed: int):
    """(source, target start, images, labels) of one architecture."""
    torch.manual_seed(seed)
    images, labels = synthetic_batch(batch, size, device, seed)
    source = build_model(arch, NUM_CLASSES, "none").to(device)
    calibrate_batch_norm(source, images)
    target = drifted_copy(source, seed + 1).train()
    source.eval().requires_grad_(False)
    return source, target, images, labels


# --------------------------------------------------------------------------- the step


PHASES = ("source fwd", "target fwd", "feature fwd", "CE+head fwd", "feature bwd", "backbone bwd", "optimizer")


@dataclass
class Forward:
    sources: list[torch.Tensor]
    targets: list[torch.Tensor]  # the hooked features
    inputs: list[torch.Tensor]  # what the feature term read: the features or their detached aliases
    feature: torch.Tensor  # alpha * R, 0-dim
    rest: torch.Tensor  # CE + beta * head L2, 0-dim


class TrainStep:
    """One implementation's training step on its own target copy, attention modules and
    optimizer. Calling it runs one timed step (phases in ``phases``, seconds)."""

    def __init__(self, case: Case, implementation: str, loss_fn: Callable, extra, device: torch.device):
        self.case, self.implementation, self.loss_fn, self.device = case, implementation, loss_fn, device
        self.extra = extra
        self.target = copy.deepcopy(case.target)
        self.hooks = FeatureHooks(self.target, case.layers)
        self.attention: list[nn.Parameter] = list(extra.parameters()) if isinstance(extra, nn.Module) else []
        parameters = list(self.target.parameters()) + self.attention
        self.optimizer = torch.optim.SGD(parameters, lr=DEFAULT_LR, momentum=0.9)
        self.phases: list[list[float]] = []

    def forward(self, split: bool, mark: Callable[[], None] = lambda: None) -> Forward:
        """Source forward, target forward, feature term, CE + head term (``mark`` after each).
        With ``split`` the feature term reads detached aliases of the hooked features (no
        copy): autograd.grad into all four layers would otherwise run the backbone between
        them (a later layer's feature has a path to an earlier one's)."""
        case = self.case
        with torch.no_grad():
            case.source(case.images)
            sources = [f.detach() for f in case.source_hooks.features]
        mark()
        logits = self.target(case.images)
        targets = self.hooks.features
        inputs = [t.detach().requires_grad_() for t in targets] if split else targets
        mark()
        feature = case.alpha * self.loss_fn(sources, inputs, self.extra).reshape(())
        mark()
        rest = F.cross_entropy(logits.float(), case.labels) + BETA * head_l2(self.target, case.head)
        mark()
        return Forward(sources, targets, inputs, feature, rest)

    def split_backward(self, forward: Forward, mark: Callable[[], None] = lambda: None) -> None:
        """Phase A: the feature term's backward into the hooked features (their aliases) and
        the attention parameters; phase B: the backbone's backward from CE + head term and
        the features' phase-A gradients. Together: the one backward of the total loss."""
        count = len(forward.targets)
        grads = torch.autograd.grad(forward.feature, forward.inputs + self.attention)
        mark()
        torch.autograd.backward([forward.rest] + forward.targets, [None] + list(grads[:count]))
        for parameter, grad in zip(self.attention, grads[count:]):
            parameter.grad = grad if parameter.grad is None else parameter.grad + grad
        mark()

    def release(self) -> None:
        """Drop the gradients and the kept features (the step's memory)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.hooks.clear()
        self.case.source_hooks.clear()

    def __call__(self) -> None:
        marks = [time.perf_counter()]

        def mark() -> None:
            timing.synchronize(self.device)
            marks.append(time.perf_counter())

        self.optimizer.zero_grad(set_to_none=True)
        forward = self.forward(True, mark)
        self.split_backward(forward, mark)
        self.optimizer.step()
        mark()
        self.hooks.clear()
        self.case.source_hooks.clear()
        self.phases.append([later - earlier for earlier, later in zip(marks, marks[1:])])

    def gradients(self, split: bool):
        """(Forward, detached gradients of every trained parameter) of one backward from the
        current weights, split in the two phases or a plain total.backward(); no optimizer step.
        The random numbers are seeded alike for every call (MobileNetV2's dropout)."""
        self.release()
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            forward = self.forward(split)
        if split:
            self.split_backward(forward)
        else:
            (forward.rest + forward.feature).backward()
        grads = [
            None if p.grad is None else p.grad.detach().clone()
            for group in self.optimizer.param_groups
            for p in group["params"]
        ]
        self.release()
        return forward, grads


def relative_difference(value: torch.Tensor | None, expected: torch.Tensor | None) -> float:
    """||value - expected|| / ||expected|| in float64 (absolute where expected is 0; 0 when both are None)."""
    if value is None or expected is None:
        return 0.0 if value is None and expected is None else float("inf")
    return cases.relative_error(value, expected)


def gradient_split_error(step: TrainStep, split: list, plain: list) -> float:
    """Largest relative difference over the trained parameters between the split backward's
    gradients and a plain total.backward()'s (both from the same weights); asserted small."""
    error = max(relative_difference(a, b) for a, b in zip(split, plain))
    tolerance = GRAD_TOLERANCE.get(step.device.type, 1e-3)
    assert error <= tolerance, (
        f"{step.case.arch}/{step.case.reg}/{step.implementation}: the split backward's "
        f"gradients differ from total.backward()'s by {error:.2e} (> {tolerance:.0e})"
    )
    return error


def float64_feature(case: Case, forward: Forward) -> torch.Tensor:
    """alpha * R of the original transcription in float64 on the features of ``forward``."""
    extra = case.extra
    extra = copy.deepcopy(extra).double() if isinstance(extra, nn.Module) else [w.double() for w in extra]
    with torch.no_grad():
        value = ORIGINAL_LOSSES[LOSS_NAMES[case.reg]](
            [s.double() for s in forward.sources], [t.detach().double() for t in forward.targets], extra
        )
    return case.alpha * value.double().sum()


def implementations(case: Case, names: Sequence[str], backend: str, device) -> dict[str, TrainStep]:
    """The steps of each implementation; their attention modules all start from the original's."""
    loss_name = LOSS_NAMES[case.reg]
    steps = {}
    for name in names:
        if name == FUSED:
            fused = getattr(compat, loss_name)
            loss_fn = lambda s, t, e, fused=fused: fused(s, t, e, backend=backend)  # noqa: E731
            if isinstance(case.extra, nn.Module):
                extra = nn.ModuleList(ATTENTION[case.reg][1](c, h) for c, h, _ in case.shapes).to(device)
                extra.load_state_dict(case.extra.state_dict(), strict=True)
            else:
                extra = case.extra
        else:
            loss_fn = ORIGINAL_LOSSES[loss_name]
            if name == COMPILED:
                loss_fn = torch.compile(loss_fn, dynamic=False)
            extra = copy.deepcopy(case.extra) if isinstance(case.extra, nn.Module) else case.extra
        steps[name] = TrainStep(case, name, loss_fn, extra, device)
    return steps


# --------------------------------------------------------------------------- measuring


def first_steps(steps: dict[str, TrainStep], case: Case) -> dict[str, tuple]:
    """Per implementation, from the common starting weights: the first (plain) backward's
    seconds (torch.compile compiles there), then a split one; the loss values, the feature
    term's error against float64, and the gradient-split check."""
    first = {}
    for name, step in steps.items():
        started = time.perf_counter()
        _, plain = step.gradients(split=False)
        seconds = time.perf_counter() - started
        forward, split = step.gradients(split=True)
        feature = forward.feature.detach().double()
        first[name] = (
            seconds,
            feature,
            (forward.rest.detach() + forward.feature.detach()).double(),
            relative_difference(feature, float64_feature(case, forward)),
            gradient_split_error(step, split, plain),
        )
    return first


def measure_case(case: Case, names: Sequence[str], args, device, backend: str) -> list[dict]:
    """The rows of one (model, reg): every implementation checked, then timed interleaved."""
    steps = implementations(case, names, backend, device)
    first = first_steps(steps, case)
    warm = timing.warm_up(steps, device, 1)
    rounds = args.rounds or timing.rounds_for_budget(
        sum(v[0] for v in warm.values()), args.budget, args.least, args.most
    )
    for step in steps.values():
        step.phases.clear()
    samples = timing.interleaved_times(steps, device, rounds)
    memory = {}
    for name, step in steps.items():
        step.release()
        afa_ext.empty_cache()
        memory[name] = timing.peak_memory_growth(step, device)
    medians = {name: timing.median(values) for name, values in samples.items()}
    rows = []
    for name, step in steps.items():
        phases = list(zip(*step.phases))
        fwd, bwd = phases[PHASES.index("feature fwd")], phases[PHASES.index("feature bwd")]
        shares = [(f + b) / total for f, b, total in zip(fwd, bwd, samples[name])]
        q1, q3 = timing.quartiles(samples[name])
        first_seconds, feature, total, f64_error, grad_error = first[name]
        rows.append(
            {
                "model": case.arch,
                "reg": case.reg,
                "implementation": name,
                "backend": backend if name == FUSED else "-",
                "rounds": rounds,
                "step_ms_median": 1e3 * medians[name],
                "step_ms_q1": 1e3 * q1,
                "step_ms_q3": 1e3 * q3,
                "feature_fwd_ms": 1e3 * statistics.median(fwd),
                "feature_bwd_ms": 1e3 * statistics.median(bwd),
                "feature_share": statistics.median(shares),
                "peak_mb": None if memory[name] is None else memory[name] / 2**20,
                "speedup_vs_original": medians[ORIGINAL] / medians[name] if ORIGINAL in medians else None,
                "first_step_s": first_seconds,
                "total_loss": total.item(),
                "feature_loss": feature.item(),
                "total_rel_diff_vs_original": (
                    relative_difference(total, first[ORIGINAL][2]) if ORIGINAL in first else None
                ),
                "feature_rel_err_f64": f64_error,
                "grad_split_rel_err": grad_error,
            }
        )
    for step in steps.values():
        step.hooks.remove()
    return rows


def run(args, argv) -> list[dict]:
    device = timing.resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    backend = args.backend or ("cpu" if device.type == "cpu" else "auto")
    names = [n for n in IMPLEMENTATIONS if not (args.no_compile and n == COMPILED)]
    warning = timing.busy_machine_warning(torch.get_num_threads())
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    description = timing.machine_description(device)
    common = {
        "datetime": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": history.git_commit(),
        "command": history.command_line(__file__, argv),
        "machine": timing.machine_line(description),
        "load_avg": timing.load_average(),
        "device": device.type,
        "device_name": device_name(device, description),
        "torch": torch.__version__,
        "triton": triton_version(),
        "batch": args.batch,
        "dtype": "float32",
    }
    rows = []
    for arch in args.models:
        size = args.size or ARCH_PRESETS[arch].image_size
        source, target, images, labels = build_models(arch, args.batch, size, device, args.seed)
        for reg in args.regs:
            started = time.perf_counter()
            case = build_case(arch, reg, source, target, images, labels, device, args.seed)
            case_rows = measure_case(case, names, args, device, backend)
            case.source_hooks.remove()
            print(
                f"{arch}/{reg}: {case_rows[0]['rounds']} rounds, {time.perf_counter() - started:.0f} s", file=sys.stderr
            )
            rows += [dict(common, image_size=size, **row) for row in case_rows]
    return rows


# --------------------------------------------------------------------------- report


def run_header(group: list[dict]) -> list[str]:
    """Lines naming the run: device, date, command, machine, versions, the settings."""
    row = group[0]
    load = f"{float(row['load_avg']):.1f}" if row["load_avg"] else "-"
    rounds = sorted({int(r["rounds"]) for r in group})
    rounds = str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}"
    return [
        f"- device: {row['device_name']} ({row['device']}); run {row['datetime']}, commit {row['commit']}, "
        f"torch {row['torch']}, Triton {row['triton']}; 1-minute load average {load} at the start",
        f"- command: `{row['command']}`",
        f"- machine: {row['machine']}",
        f"- step: float32, batch {row['batch']}, {row['image_size']} px, {NUM_CLASSES} classes, SGD momentum 0.9; "
        f"fused backend '{next((r['backend'] for r in group if r['backend'] != '-'), '-')}'; "
        f"median and quartiles (IQR) of {rounds} interleaved rounds per case",
    ]


def markdown(group: list[dict]) -> str:
    headers = [
        "model",
        "reg",
        "implementation",
        "step ms",
        "IQR ms",
        "feature fwd ms",
        "feature bwd ms",
        "feature share",
        "peak MB",
        "vs original",
        "total loss",
        "vs original loss",
        "feature vs f64",
        "grad split",
    ]
    body = []
    for r in group:
        seconds = {
            key: history.number(r[key]) / 1e3
            for key in ("step_ms_median", "step_ms_q1", "step_ms_q3", "feature_fwd_ms", "feature_bwd_ms")
        }
        body.append(
            [
                r["model"],
                r["reg"],
                r["implementation"],
                tables.milliseconds(seconds["step_ms_median"]),
                tables.millisecond_range(seconds["step_ms_q1"], seconds["step_ms_q3"]),
                tables.milliseconds(seconds["feature_fwd_ms"]),
                tables.milliseconds(seconds["feature_bwd_ms"]),
                tables.percent(history.number(r["feature_share"]), decimals=1),
                tables.megabytes(None if r["peak_mb"] == "" else history.number(r["peak_mb"]) * 2**20),
                tables.ratio(history.number(r["speedup_vs_original"])),
                f"{history.number(r['total_loss']):.6g}",
                tables.scientific(history.number(r["total_rel_diff_vs_original"])),
                tables.scientific(history.number(r["feature_rel_err_f64"])),
                tables.scientific(history.number(r["grad_split_rel_err"])),
            ]
        )
    return tables.markdown_table(headers, body, right_align_from=3)


INTRODUCTION = [
    "One AFA training step as the trainer runs it (source forward, target forward with the hooked features, "
    "the four-layer feature term with its attention modules, CE, head L2, backward, SGD step), with the "
    "feature term computed by the published pure-PyTorch loss (original), torch.compile of it "
    "(original+compile), and afa_ext.compat on the fused kernels (fused); torchvision ResNet-50 and "
    "MobileNetV2 with random weights, float32. Reproduce with `python bench/train_step.py` (quick, CPU) or "
    "`python bench/train_step.py --device cuda --full` (batch 64, on a GPU; `bash bench/gpu_check.sh` runs "
    "it); the module docstring says how the phases are measured.",
]
LEGEND = [
    "- step ms: wall time of the whole step (source fwd, target fwd, feature term, CE + head, the two backward "
    "phases, SGD step; the device synchronised between phases); IQR: 25th-75th percentile",
    "- feature fwd / bwd ms: the feature term alpha * R with its attention modules, forward and its backward "
    "(phase A: autograd.grad into the hooked features and attention parameters), medians; feature share = "
    "(fwd + bwd) / step, median over the rounds",
    "- peak MB: the step's peak memory above what is live before it (weights, optimizer state, batch); cpu: "
    "RSS high-water mark (VmHWM reset via /proc/self/clear_refs after malloc_trim), cuda: "
    "torch.cuda.max_memory_allocated",
    "- total loss: CE + alpha * R + beta * head L2 of the first step, all implementations from the same weights; "
    "vs original loss: its relative difference from original's; feature vs f64: relative error of alpha * R "
    "against the original evaluated in float64 on the same features; grad split: largest relative difference "
    "of a parameter's gradient, split backward vs total.backward() (asserted below 1e-4 on cpu, 1e-3 on cuda)",
]


def report_text(rows: list[dict], history_path: Path, results_path: Path, plot_path: Path) -> str:
    """The generated part of the RESULTS.md section: each (machine, device)'s latest run."""
    lines = [
        f"Generated by `bench/train_step.py` (after each run, or with `--report`) from the history "
        f"`{history.relative_link(history_path, results_path)}`: the latest run per (machine, device); "
        "do not edit by hand.",
        "",
    ]
    lines += INTRODUCTION + [""]
    if not rows:
        return "\n".join(lines + ["No runs recorded yet."])
    lines += LEGEND + [""]
    for group in history.latest_runs(rows):
        lines += [f"### {group[0]['device_name']}, {group[0]['datetime'][:10]}", ""] + run_header(group) + [""]
        lines += [markdown(group), ""]
    lines.append(f"![step time and peak memory per implementation]({history.relative_link(plot_path, results_path)})")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Per latest run of each (machine, device): step time per implementation for each model
    (the feature term's fwd + bwd hatched), and peak memory per implementation."""
    plt = plots.pyplot()
    groups = history.latest_runs(rows)
    if not groups:
        return
    models = [sorted({r["model"] for r in group}, key=_model_order) for group in groups]
    columns = max(len(m) for m in models) + 1
    figure, axes = plt.subplots(len(groups), columns, figsize=(5.2 * columns, 4.4 * len(groups)), squeeze=False)
    colours = {ORIGINAL: "tab:red", COMPILED: "tab:orange", FUSED: "tab:blue"}
    for row_axes, group, group_models in zip(axes, groups, models):
        title = f"{group[0]['device_name']}, batch {group[0]['batch']}, {group[0]['image_size']} px"
        for axis, model in zip(row_axes, group_models):
            _bars(axis, [r for r in group if r["model"] == model], colours, step=True)
            axis.set_title(f"{model}: step time ({title}); in the bars: speed-up", fontsize=9)
        for axis in row_axes[len(group_models) : -1]:
            axis.axis("off")
        _bars(row_axes[-1], group, colours, step=False)
        row_axes[-1].set_title(f"peak memory of the step ({group[0]['device']})", fontsize=9)
    plots.save(figure, path, dpi=110)


SHORT_MODELS = {"resnet50": "ResNet-50", "mobilenet_v2": "MobileNetV2"}


def _model_order(model: str) -> int:
    return MODELS.index(model) if model in MODELS else len(MODELS)


def _bars(axis, rows: list[dict], colours: dict[str, str], step: bool) -> None:
    """Grouped bars: x = (model/)reg, one bar per implementation."""
    names = [n for n in IMPLEMENTATIONS if any(r["implementation"] == n for r in rows)]
    label = (lambda r: r["reg"]) if step else (lambda r: f"{SHORT_MODELS.get(r['model'], r['model'])}\n{r['reg']}")
    keys = []
    for r in rows:
        if label(r) not in keys:
            keys.append(label(r))
    width, offsets = plots.bar_slots(len(names))
    for index, name in enumerate(names):
        chosen = {label(r): r for r in rows if r["implementation"] == name}
        xs = [k + offsets[index] for k, key in enumerate(keys) if key in chosen]
        picked = [chosen[key] for key in keys if key in chosen]
        if step:
            medians = [history.number(r["step_ms_median"]) for r in picked]
            spread = [
                [m - history.number(r["step_ms_q1"]) for m, r in zip(medians, picked)],
                [history.number(r["step_ms_q3"]) - m for m, r in zip(medians, picked)],
            ]
            axis.bar(xs, medians, width, yerr=spread, capsize=3, color=colours[name], label=name)
            feature = [history.number(r["feature_fwd_ms"]) + history.number(r["feature_bwd_ms"]) for r in picked]
            axis.bar(
                xs,
                feature,
                width,
                color="none",
                edgecolor="black",
                hatch="//",
                linewidth=0.5,
                label="feature term fwd+bwd" if index == 0 else None,
            )
            for x, m, r in zip(xs, medians, picked):  # the speed-up over original, inside the bar
                axis.text(
                    x,
                    m / 2,
                    tables.ratio(history.number(r["speedup_vs_original"])),
                    ha="center",
                    va="center",
                    rotation=90,
                    fontsize=8,
                    color="white",
                    fontweight="bold",
                )
        else:
            values = [history.number(r["peak_mb"]) or 0.0 for r in picked]
            axis.bar(xs, values, width, color=colours[name], label=name)
    axis.set_xticks(range(len(keys)), keys, fontsize=8 if step else 7)
    axis.set_ylabel("ms per step (median, IQR)" if step else "MB above live (peak)")
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1 if step else -0.16), ncol=4, frameon=False)
    axis.margins(y=0.12)
    if step:
        _clip_outliers(axis, rows)


def _clip_outliers(axis, rows: list[dict]) -> None:
    """Keep the bars readable when a noisy round stretches an IQR: the y axis stops at twice
    the largest median, and the title says so."""
    top = 2 * max(history.number(r["step_ms_median"]) for r in rows)
    if max(history.number(r["step_ms_q3"]) for r in rows) > top:
        axis.set_ylim(0, top)
        axis.text(
            0.99,
            0.98,
            "IQR clipped at 2x the largest median",
            transform=axis.transAxes,
            ha="right",
            va="top",
            fontsize=7,
        )


def write_report(history_path: Path, results_path: Path, plot_path: Path) -> str:
    """Regenerate the plot and the RESULTS section from the history; returns the section text."""
    rows = history.read_rows(history_path)
    plot(rows, plot_path)
    text = report_text(rows, history_path, results_path, plot_path)
    history.rewrite_section(results_path, SECTION, SECTION_TITLE, text)
    return text


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.report:
        history.has_rows(args.history, FIELDS)  # its columns checked before the run, not after it
        started = time.perf_counter()
        rows = run(args, argv)
        history.write_rows(rows, args.history, FIELDS, append=True)
        group = history.latest_runs(history.read_rows(args.history))
        group = next(
            g for g in group if g[0]["datetime"] == rows[0]["datetime"] and g[0]["machine"] == rows[0]["machine"]
        )
        print("\n".join(run_header(group)))
        print(f"- wall time of the run: {time.perf_counter() - started:.0f} s\n")
        print(markdown(group))
    write_report(args.history, args.results, args.plot)
    if args.report:
        for group in history.latest_runs(history.read_rows(args.history)):
            print("\n".join(run_header(group)) + "\n\n" + markdown(group) + "\n")
    print(f"\nhistory: {args.history}; plot: {args.plot}; section rewritten in {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
