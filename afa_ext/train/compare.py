"""``afa-compare`` / ``python -m afa_ext.train.compare``: methods compared by a fair protocol.

Every method runs every alpha of its grid on every seed, each run an ordinary ``afa-train``
run in its own folder (``DIR/runs/<method>-alpha<a>-seed<s>``). For each method the alpha
with the best mean validation accuracy over the seeds is selected; test accuracy is read
only there, and is reported per seed, as mean ± sd, and against each baseline as the paired
per-seed difference with its 95% t-interval and wins (protocol.py, report.py).

A method is a trainer ``--reg`` value, or ``REG:2`` for that regulariser on AFA's two-stage
schedule (``--stages 2``): ``none:2`` is plain fine-tuning with AFA's number of steps. Grids
default to 0.1x, 1x and 10x the method's default alpha; for a two-stage method the grid's
alpha is stage 1's and stage 2 takes the same multiple of its own default (unless
``--stage2-alpha`` is among the trainer flags).

``--resume`` skips finished and diverged runs, re-runs failed ones and continues killed
ones through the trainer's ``--resume``. ``--jobs K`` runs K at once, in worker processes
of cores/K threads each (OMP_NUM_THREADS when set; with ``--devices``, one device per
worker); thread counts change float rounding, so keep them when resuming for bitwise
reruns. ``--shard I/N`` runs
the I-th of N fixed shares (run i belongs to share i mod N + 1) over a shared ``--out``, as
a job array does; ``--report`` runs nothing and writes the summary of what has finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import traceback
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Sequence

from .checkpoint import atomic_write_json
from .config import REGULARIZERS, ConfigError, default_stages, method_slug, resolve
from .outputs import CONFIG, RESULT
from .protocol import DIVERGED, FAILED, FINISHED, UNFINISHED, RunRecord

__all__ = ["main", "Method", "SweepPlan", "RunSpec", "parse_method", "read_record"]

PROG = "afa-compare"
SWEEP_FILE = "sweep.json"
INTERRUPTED = "interrupted"
GRID_FACTORS = (0.1, 1.0, 10.0)
# Trainer settings the sweep itself sets for every run.
OWN_SETTINGS = {
    "reg": "--methods",
    "stages": "--methods (REG:2)",
    "alpha": "--alphas",
    "seed": "--seeds",
    "out": "--out",
    "resume": "--resume",
    "data": "--data",
    "arch": "--arch",
}


class UsageError(ValueError):
    """Bad input to afa-compare, reported in one line before anything runs."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


@dataclass(frozen=True)
class Method:
    """A trainer regulariser and its number of stages; ``name`` as written (``none:2``)."""

    name: str
    reg: str
    stages: int

    @property
    def slug(self) -> str:
        return method_slug(self.reg, self.stages)

    @property
    def has_grid(self) -> bool:
        return self.reg != "none"


def parse_method(text: str) -> Method:
    reg, colon, stages = text.partition(":")
    if reg not in REGULARIZERS:
        raise UsageError(
            f"--methods: unknown method {text!r}; expected one of {', '.join(REGULARIZERS)}, "
            f"each optionally as REG:2 (two stages)"
        )
    if not colon:
        return Method(text, reg, default_stages(reg))
    if stages != "2":
        raise UsageError(f"--methods: {text!r}: the only stage suffix is :2 (AFA's two-stage schedule)")
    if reg == "afa":
        raise UsageError("--methods: 'afa:2': afa is two stages already; write afa")
    return Method(text, reg, 2)


@dataclass
class SweepPlan:
    """What a sweep runs; ``sweep.json`` holds it, so that resumes, shards and reports agree."""

    data: str
    arch: str
    methods: list[str]
    seeds: list[int]
    alphas: dict[str, list[float]]  # the grid of each method that has one
    stage2_ratios: dict[str, float | None]  # stage-2 alpha = ratio * grid alpha (None: the trainer's)
    baselines: list[str]
    trainer_flags: list[str] = field(default_factory=list)

    def grid(self, method: str) -> list[float | None]:
        return self.alphas.get(method, [None])

    def runs(self, out: Path) -> list[RunSpec]:
        """Every run, in the fixed order method, alpha, seed (shards cut this list)."""
        specs = []
        for name in self.methods:
            method = parse_method(name)
            for alpha in self.grid(name):
                ratio = self.stage2_ratios.get(name)
                stage2 = None if alpha is None or ratio is None else float(f"{alpha * ratio:.12g}")
                for seed in self.seeds:
                    folder = (
                        f"{method.slug}-seed{seed}" if alpha is None else f"{method.slug}-alpha{alpha:g}-seed{seed}"
                    )
                    specs.append(RunSpec(method, alpha, stage2, seed, out / "runs" / folder))
        return specs


@dataclass(frozen=True)
class RunSpec:
    method: Method
    alpha: float | None
    stage2_alpha: float | None
    seed: int
    folder: Path

    @property
    def log(self) -> Path:
        return self.folder.with_name(self.folder.name + ".log")

    @property
    def outcome(self) -> Path:
        return self.folder.with_name(self.folder.name + ".outcome.json")

    def argv(self, plan: SweepPlan, device: str | None = None, resume: bool = False) -> list[str]:
        """The afa-train flags of this run."""
        flags = list(plan.trainer_flags) + [
            "--data",
            plan.data,
            "--arch",
            plan.arch,
            "--reg",
            self.method.reg,
            "--stages",
            str(self.method.stages),
            "--seed",
            str(self.seed),
            "--out",
            str(self.folder),
        ]
        if self.alpha is not None:
            flags += ["--alpha", repr(self.alpha)]
        if self.stage2_alpha is not None:
            flags += ["--stage2-alpha", repr(self.stage2_alpha)]
        if device is not None:
            flags += ["--device", device]
        return flags + (["--resume"] if resume else [])

    def describe(self) -> str:
        alpha = "" if self.alpha is None else f" alpha {self.alpha:g}"
        return f"{self.method.name}{alpha} seed {self.seed}"


# ----------------------------------------------------------------------------- the command line


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="Everything after -- goes unchanged to every afa-train run, e.g. -- --epochs 10.",
    )
    add = parser.add_argument
    add("--data", help="as afa-train's --data: 'digits' or an image folder")
    add("--arch", help="as afa-train's --arch")
    add("--methods", help="comma-separated: none, l2sp, fea_map, delta, ast, act, afa, each optionally REG:2")
    add("--seeds", nargs="+", help="the seeds every grid point runs on (at least one)")
    add(
        "--alphas",
        action="append",
        default=[],
        metavar="METHOD=a1,a2,...",
        help="the alpha grid of a method (default: 0.1x, 1x, 10x its default alpha); repeat per method",
    )
    add(
        "--baseline",
        action="append",
        default=None,
        metavar="METHOD",
        help="a method the others are compared with, pairwise per seed; repeat for several "
        "(default: none and none:2, those of them in --methods)",
    )
    add("--jobs", type=int, default=None, help="runs at once (default: 1, or one per --devices entry)")
    add("--devices", help="comma-separated devices, one per job, e.g. cuda:0,cuda:1")
    exclusive = parser.add_mutually_exclusive_group()
    exclusive.add_argument("--shard", help="I/N: run only the I-th of N shares of the runs (1 <= I <= N)")
    exclusive.add_argument(
        "--report",
        action="store_true",
        help="run nothing: write the summary and plot of the finished runs, naming what is missing",
    )
    add("--out", required=True, help="the sweep's folder")
    add("--resume", action="store_true", help="continue the sweep in --out")
    return parser


def _split_trainer_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1 :]
    return argv, []


def _parse_seeds(values: Sequence[str]) -> list[int]:
    seeds = []
    for value in values:
        try:
            seed = int(value)
        except ValueError:
            raise UsageError(f"--seeds: expected whole numbers, got {value!r}") from None
        if seed < 0:
            raise UsageError(f"--seeds: expected seeds of 0 or more, got {seed}")
        if seed in seeds:
            raise UsageError(f"--seeds: seed {seed} is given twice")
        seeds.append(seed)
    return seeds


def _parse_alpha_grids(entries: Sequence[str], methods: dict[str, Method]) -> dict[str, list[float]]:
    grids = {}
    for entry in entries:
        name, equals, values = entry.partition("=")
        if not equals or not values:
            raise UsageError(f"--alphas: expected METHOD=a1,a2,..., got {entry!r}")
        if name not in methods:
            raise UsageError(f"--alphas {entry}: {name!r} is not among --methods ({', '.join(methods)})")
        if not methods[name].has_grid:
            raise UsageError(f"--alphas {entry}: {name} has no alpha (plain fine-tuning); it has no grid")
        if name in grids:
            raise UsageError(f"--alphas: the grid of {name} is given twice")
        alphas = []
        for text in values.split(","):
            try:
                alpha = float(text)
            except ValueError:
                raise UsageError(f"--alphas {entry}: {text!r} is not a number") from None
            if not math.isfinite(alpha) or alpha < 0:
                raise UsageError(f"--alphas {entry}: expected finite alphas of 0 or more, got {text}")
            alphas.append(alpha)
        grids[name] = sorted(set(alphas))
    return grids


def _trainer_config(flags: list[str], data: str, arch: str, method: Method):
    """The TrainConfig of a run of ``method`` (without its alpha, seed and folder), resolved."""
    from .cli import parse_config

    config = parse_config(
        flags
        + ["--data", data, "--arch", arch, "--reg", method.reg, "--stages", str(method.stages), "--out", os.devnull],
        parser_class=_Parser,
    )
    return resolve(config, cuda_available=False)


def _given_trainer_settings(flags: list[str], devices: list[str] | None) -> dict:
    """The settings the trainer flags give, checked against the sweep's own."""
    from .cli import given_settings

    try:
        given = given_settings(flags, parser_class=_Parser)
    except UsageError as error:
        raise UsageError(f"trainer flags after --: {error}") from None
    for key, flag in OWN_SETTINGS.items():
        if key in given:
            raise UsageError(
                f"trainer flags after --: --{key.replace('_', '-')} is set by the sweep itself ({flag}); leave it out"
            )
    if devices and "device" in given:
        raise UsageError("trainer flags after --: --device conflicts with --devices; give one of them")
    return given


def _default_grid(config, stage2_alpha_given: bool) -> tuple[list[float], float | None]:
    """0.1x, 1x and 10x the method's default (stage-1) alpha, and the stage-2 ratio."""
    ratio = None
    if config.stages == 2 and not stage2_alpha_given and config.alpha > 0:
        ratio = config.stage2_alpha / config.alpha
    return [factor * config.alpha for factor in GRID_FACTORS], ratio


def plan_from_arguments(args, trainer_flags: list[str], devices: list[str] | None) -> SweepPlan:
    """The sweep the arguments ask for, every part checked (UsageError) before anything runs."""
    missing = [
        flag
        for flag, value in (
            ("--data", args.data),
            ("--arch", args.arch),
            ("--methods", args.methods),
            ("--seeds", args.seeds),
        )
        if not value
    ]
    if missing:
        raise UsageError(f"{', '.join(missing)} required")
    names = [name.strip() for name in args.methods.split(",") if name.strip()]
    if not names:
        raise UsageError("--methods: expected at least one method")
    methods = {}
    for name in names:
        if name in methods:
            raise UsageError(f"--methods: {name} is given twice")
        methods[name] = parse_method(name)
    seeds = _parse_seeds(args.seeds)
    grids = _parse_alpha_grids(args.alphas, methods)
    baselines = args.baseline if args.baseline is not None else [m for m in ("none", "none:2") if m in methods]
    for baseline in baselines:
        if baseline not in methods:
            raise UsageError(f"--baseline {baseline}: not among --methods ({', '.join(methods)})")
    given = _given_trainer_settings(trainer_flags, devices)
    from .models import LayerError, available_architectures

    if args.arch not in available_architectures():
        raise UsageError(f"--arch: unknown architecture {args.arch!r}")
    ratios = {}
    for name, method in methods.items():
        try:
            config = _trainer_config(trainer_flags, args.data, args.arch, method)
        except (ConfigError, LayerError, UsageError) as error:
            raise UsageError(f"trainer flags after --: {error}") from None
        if method.has_grid:
            default, ratios[name] = _default_grid(config, "stage2_alpha" in given)
            grids.setdefault(name, [float(f"{alpha:.12g}") for alpha in default])
    _check_device(devices or [given.get("device", "cpu")])
    _check_data(config, seeds[0])
    return SweepPlan(args.data, args.arch, names, seeds, grids, ratios, baselines, list(trainer_flags))


def _check_data(config, seed: int) -> None:
    """Load the data once, with the settings the runs will load it with, so that a bad
    folder is reported before any run."""
    from .data import DataError, load_data

    try:
        load_data(
            config.data, image_size=config.image_size, val_fraction=config.val_fraction, seed=seed, shots=config.shots
        )
    except DataError as error:
        raise UsageError(f"--data {config.data}: {error}") from None


def _check_device(wanted: list[str]) -> None:
    if any(device.startswith("cuda") for device in wanted):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"device {', '.join(wanted)}: no CUDA device is available here; use cpu")


def _devices(args) -> list[str] | None:
    if not args.devices:
        return None
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    for device in devices:
        if device.split(":")[0] not in ("cpu", "cuda"):
            raise UsageError(f"--devices: expected cpu or cuda[:N] entries, got {device!r}")
    return devices


def _jobs(args, devices: list[str] | None) -> int:
    jobs = args.jobs if args.jobs is not None else (len(devices) if devices else 1)
    if jobs < 1:
        raise UsageError(f"--jobs: expected 1 or more, got {jobs}")
    if devices and jobs > len(devices):
        raise UsageError(f"--jobs {jobs}: each job needs its own device, and --devices names {len(devices)}")
    return jobs


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    index, slash, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise UsageError(f"--shard: expected I/N (e.g. 2/8), got {text!r}") from None
    if not slash or not 1 <= index <= count:
        raise UsageError(f"--shard: expected I/N with 1 <= I <= N, got {text!r}")
    return index, count


# ----------------------------------------------------------------------------- the runs' state


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_record(spec: RunSpec) -> RunRecord:
    """What a run's folder says of it: finished (result.json), diverged or failed (the
    sweep's outcome file), unfinished (a started run) or missing."""
    record = RunRecord(spec.method.name, spec.alpha, spec.seed, out=str(spec.folder))
    result = _read_json(spec.folder / RESULT)
    if result is not None:
        record.status = FINISHED
        record.lr = result["stages"][0]["lr"]
        record.best_val_acc, record.test_acc = result["best_val_acc"], result["test_acc"]
        record.epochs_run, record.steps, record.wall_time_s = (
            result["epochs_run"],
            result["steps"],
            result["wall_time_s"],
        )
        return record
    outcome = _read_json(spec.outcome)
    if outcome is not None:
        record.status, record.message = outcome["status"], outcome["message"]
    elif (spec.folder / CONFIG).is_file():
        record.status = UNFINISHED
    return record


def run_one(spec: RunSpec, argv: list[str]) -> str:
    """The afa-train run ``argv`` of ``spec`` in this process, its log appended to
    ``spec.log``; a diverged or failed run leaves ``spec.outcome``. Returns the status."""
    from .cli import parse_config
    from .loop import Diverged, Interrupted, run

    spec.folder.parent.mkdir(parents=True, exist_ok=True)
    with open(spec.log, "a") as log:
        print("$ afa-train " + " ".join(argv), file=log, flush=True)
        try:
            run(parse_config(argv), log=lambda message: print(message, file=log, flush=True), progress=False)
            return FINISHED
        except Interrupted as interruption:
            print(interruption, file=log, flush=True)
            return INTERRUPTED
        except Diverged as divergence:
            status, message = DIVERGED, str(divergence)
        except Exception as error:  # recorded and re-run by --resume; the sweep goes on
            traceback.print_exc(file=log)
            status, message = FAILED, " ".join(f"{type(error).__name__}: {error}".split())
        print(f"{status}: {message}", file=log, flush=True)
    atomic_write_json(spec.outcome, {"status": status, "message": message})
    return status


def _init_worker(threads: int, parent: int) -> None:
    """A job's worker: dies with the sweep (a SIGKILLed sweep leaves no run behind), leaves
    Ctrl-C to the trainer (which checkpoints), and uses its share of the cores."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(threads)


def _threads_per_job(jobs: int) -> int:
    """OMP_NUM_THREADS when set, else this process's cores shared out over the jobs."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


class _InProcess:
    """The one-job executor: each run in this process, at once."""

    def submit(self, function, *args) -> Future:
        future = Future()
        future.set_result(function(*args))
        return future

    def shutdown(self, **_):
        pass

    def signal(self, signum) -> None:
        pass


class _Worker:
    """A job of its own: one worker process, started once, running run after run."""

    def __init__(self, threads: int):
        import multiprocessing

        self.threads = threads
        self.pool = ProcessPoolExecutor(
            1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(threads, os.getpid()),
        )

    def submit(self, function, *args) -> Future:
        return self.pool.submit(function, *args)

    def shutdown(self, **kwargs):
        self.pool.shutdown(**kwargs)

    def signal(self, signum) -> None:
        for process in list(getattr(self.pool, "_processes", {}).values()):
            try:
                os.kill(process.pid, signum)
            except (ProcessLookupError, AttributeError):
                pass


class _StopRequest:
    """SIGTERM or Ctrl-C to the sweep: start no more runs; the running ones checkpoint."""

    def __init__(self, workers):
        self.signum: int | None = None
        self.workers = workers

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.signum = self.signum or signum
        for worker in self.workers:
            worker.signal(signal.SIGTERM)

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _execute(
    plan: SweepPlan, specs: list[RunSpec], jobs: int, devices: list[str] | None, done_before: int, total: int
) -> int | None:
    """Run ``specs``, K at once; returns the signal that stopped the sweep, if one did."""
    from tqdm import tqdm

    if jobs == 1:
        workers = [_InProcess()]
    else:
        threads = _threads_per_job(jobs)
        workers = [_Worker(threads) for _ in range(jobs)]
    slot_devices = devices or [None] * jobs
    bar = tqdm(
        total=total, initial=done_before, desc=PROG, unit="run", dynamic_ncols=True, disable=not sys.stderr.isatty()
    )
    pending, running, free = deque(specs), {}, list(range(jobs))
    finished = done_before
    with _StopRequest(workers) as stop:
        try:
            while running or (pending and stop.signum is None):
                while pending and free and stop.signum is None:
                    spec, slot = pending.popleft(), free.pop(0)
                    resume = (spec.folder / CONFIG).is_file()
                    spec.outcome.unlink(missing_ok=True)
                    bar.set_postfix_str(spec.describe())
                    started = time.perf_counter()
                    future = workers[slot].submit(run_one, spec, spec.argv(plan, slot_devices[slot], resume))
                    running[future] = (spec, slot, started)
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    spec, slot, started = running.pop(future)
                    free.append(slot)
                    try:
                        status = future.result()
                    except BrokenProcessPool:  # the worker died (killed, out of memory): a new one
                        workers[slot] = _Worker(workers[slot].threads)
                        status = FAILED
                        atomic_write_json(spec.outcome, {"status": FAILED, "message": "the worker process died"})
                    if status == INTERRUPTED:
                        stop.signum = stop.signum or signal.SIGTERM
                        continue
                    finished += 1
                    bar.update(1)
                    if bar.disable:
                        record = read_record(spec)  # test accuracy waits for the selection
                        detail = (
                            f"best val acc {record.best_val_acc:.4f}" if status == FINISHED else record.message[:200]
                        )
                        print(
                            f"[{finished}/{total}] {spec.describe()}: {status}, {detail} "
                            f"({time.perf_counter() - started:.1f} s)",
                            flush=True,
                        )
        finally:
            bar.close()
            for worker in workers:
                worker.shutdown(wait=True, cancel_futures=True)
    return stop.signum


# ----------------------------------------------------------------------------- the sweep


def _load_plan(out: Path) -> SweepPlan | None:
    saved = _read_json(out / SWEEP_FILE)
    return None if saved is None else SweepPlan(**saved)


def _check_out(out: Path, plan: SweepPlan, saved: SweepPlan | None, joining: bool) -> None:
    if saved is not None and saved != plan:
        differing = [key for key, value in asdict(plan).items() if asdict(saved)[key] != value]
        raise UsageError(
            f"--out {out} holds another sweep (its {', '.join(differing)} differ); "
            f"give the same settings or choose another --out"
        )
    if not joining and out.exists() and any(out.iterdir()):
        raise UsageError(
            f"--out {out}: the folder exists and is not empty; pass --resume to continue the sweep "
            f"in it, or choose another --out (nothing in it was touched)"
        )


def report(out: Path, plan: SweepPlan):
    """The comparison of the sweep's runs as they are now, its files written; returns it and
    its Markdown table."""
    from .report import compare_runs, write_report

    records = [read_record(spec) for spec in plan.runs(out)]
    comparison = compare_runs(
        plan.methods, plan.seeds, {m: plan.grid(m) for m in plan.methods}, plan.baselines, records
    )
    title = f"{plan.data} · {plan.arch} · {len(plan.seeds)} seeds"
    return comparison, write_report(out, comparison, title)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        own, trainer_flags = _split_trainer_flags(argv)
        args = build_parser().parse_args(own)
        out = Path(args.out)
        devices = _devices(args)
        jobs = _jobs(args, devices)
        shard = _shard(args.shard)
        saved = _load_plan(out)
        if args.report and saved is None:
            raise UsageError(f"--report: {out} holds no sweep ({SWEEP_FILE} is missing)")
        if args.report and not (args.data or args.methods or args.seeds or trainer_flags):
            plan = saved
        else:
            plan = plan_from_arguments(args, trainer_flags, devices)
            _check_out(out, plan, saved, joining=args.report or args.resume or shard is not None)
    except UsageError as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2

    specs = plan.runs(out)
    if not args.report:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / SWEEP_FILE, asdict(plan))
        share = specs if shard is None else [s for i, s in enumerate(specs) if i % shard[1] == shard[0] - 1]
        todo = [s for s in share if read_record(s).status not in (FINISHED, DIVERGED)]
        where = "" if shard is None else f" (share {shard[0]}/{shard[1]} of {len(specs)})"
        print(
            f"{PROG}: {len(share)} runs{where} in {out}, {len(share) - len(todo)} already done; {jobs} at a time",
            flush=True,
        )
        signum = _execute(plan, todo, jobs, devices, len(share) - len(todo), len(share))
        if signum is not None:
            print(
                f"{PROG}: stopped by {signal.Signals(signum).name}; the running runs wrote checkpoints. "
                f"Continue with the same command and --resume",
                file=sys.stderr,
            )
            return 128 + signum
        if shard is not None:
            print(f"{PROG}: share {shard[0]}/{shard[1]} done. When every share is done: {PROG} --report --out {out}")
            return 0
    comparison, markdown = report(out, plan)
    missing = comparison.unfinished
    print(markdown)
    if missing:
        shown = ", ".join(
            f"{r.method}{'' if r.alpha is None else f' alpha {r.alpha:g}'} seed {r.seed} ({r.status})"
            for r in missing[:8]
        )
        print(
            f"{PROG}: {len(missing)} of {len(specs)} runs have not finished: {shown}"
            + (", ..." if len(missing) > 8 else ""),
            file=sys.stderr,
        )
    print(f"Files: {out / 'summary.md'}, summary.csv, selection.csv, runs.csv, comparison.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
