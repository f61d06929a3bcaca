"""Measurement helpers shared by the bench scripts: timing, copy bandwidth, peak memory
and a description of the machine. Nothing here knows about AFA's losses."""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch

try:
    import resource
except ImportError:  # not on Windows
    resource = None


# --------------------------------------------------------------------------- devices


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when torch sees a GPU, else cpu; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- timing


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``fn``, with the device synchronised around it."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def quartiles(values: Sequence[float]) -> tuple:
    """(first quartile, third quartile); both equal the value for fewer than 2 samples."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def warm_up(methods: Mapping[str, Callable[[], object]], device: torch.device, calls: int) -> dict[str, list[float]]:
    """Call each method ``calls`` times; returns the seconds of each call (first = compile)."""
    return {name: [time_once(fn, device) for _ in range(calls)] for name, fn in methods.items()}


def interleaved_times(
    methods: Mapping[str, Callable[[], object]],
    device: torch.device,
    rounds: int,
    on_round: Callable[[], None] | None = None,
    settle: int = 0,
) -> dict[str, list[float]]:
    """Seconds per call of each method, sampled round-robin so that drift in the
    machine's speed hits every method alike. Each round runs the methods in a fresh
    (seeded) random order: a fixed rotation would always run a method right after the
    same neighbour, and one that floods the caches or the allocator (the eager loss)
    would slow down whichever method follows it.

    ``settle`` untimed calls of a method come right before each timed one, so that a
    sample is the method in its steady state (as in a loop that calls it every step)
    rather than the first call after a neighbour: on the 2-core VMs, the first call after
    the eager loss's hundreds of MB of temporaries runs up to 2x slower whatever it is,
    and after an idle moment the second core wakes milliseconds late."""
    names = list(methods)
    order = random.Random(0)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            for _ in range(settle):
                methods[name]()
            samples[name].append(time_once(methods[name], device))
        if on_round is not None:
            on_round()
    return samples


def rounds_for_budget(seconds_per_round: float, budget_s: float, least: int, most: int) -> int:
    """How many interleaved rounds fit in ``budget_s``, clamped to [least, most]."""
    if seconds_per_round <= 0:
        return most
    return max(least, min(most, int(budget_s / seconds_per_round)))


# --------------------------------------------------------------------------- bandwidth


def copy_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 10) -> float:
    """Bytes per second of ``dst.copy_(src)`` on float32 tensors of ``megabytes`` MB,
    counting 2 * size bytes per copy (one read, one write); median of ``repeats``."""
    numel = megabytes * 2**20 // 4
    source = torch.ones(numel, dtype=torch.float32, device=device)
    destination = torch.zeros(numel, dtype=torch.float32, device=device)
    copy = functools.partial(destination.copy_, source)
    for _ in range(2):
        time_once(copy, device)
    seconds = median([time_once(copy, device) for _ in range(repeats)])
    del copy, source, destination
    return 2 * numel * 4 / seconds


def traffic_floor_seconds(numel: int, itemsize: int, bandwidth: float, passes: int = 5) -> float:
    """Seconds to move ``passes`` * N elements at ``bandwidth``: the 5N floor (README.md,
    "How it works")."""
    return passes * numel * itemsize / bandwidth


# --------------------------------------------------------------------------- memory


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _release_freed_heap() -> None:
    """Give freed heap pages back to the OS, so that reusing them shows in the RSS again."""
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def cpu_peak_growth(fn: Callable[[], object]) -> int | None:
    """Peak RSS during ``fn`` minus the RSS before it, in bytes; None off Linux."""
    _release_freed_heap()
    before = _proc_status_kib("VmRSS")
    if before is None or not _reset_peak_rss():
        return None
    fn()
    peak = _proc_status_kib("VmHWM")
    return None if peak is None else max(0, peak - before) * 1024


def cuda_peak_growth(fn: Callable[[], object], device: torch.device) -> int:
    """torch.cuda.max_memory_allocated during ``fn`` minus what was allocated before, in bytes."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_memory_growth(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes of memory ``fn`` needs above what is live before it (see the two helpers)."""
    if device.type == "cuda":
        return cuda_peak_growth(fn, device)
    if device.type == "cpu":
        return cpu_peak_growth(fn)
    return None


def page_faults_per_call(fn: Callable[[], object], device: torch.device, calls: int = 3) -> int | None:
    """The process's minor page faults during one call of ``fn`` (median of ``calls``
    calls in a row, after one untimed call), on the CPU; None on other devices or without
    getrusage. A fault is a page the kernel maps on first touch: freshly mapped memory
    costs a fault and a page of zeroing per 4 KiB, which shows up in the time of whatever
    allocates it."""
    if device.type != "cpu" or resource is None:
        return None
    fn()
    counts = []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return int(median(counts))


PEAK_MEMORY_MEANING = {
    "cuda": "torch.cuda.max_memory_allocated during one fwd+bwd minus the memory allocated before it "
    "(inputs only; the new gradients count)",
    "cpu": "peak RSS growth during one fwd+bwd over the RSS before it (inputs only; the new gradients "
    "count), via VmHWM reset by /proc/self/clear_refs after malloc_trim; approximate (page-touched memory)",
}


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> float | None:
    """The 1-minute load average, None where the OS does not say."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_machine_warning(threads: int) -> str | None:
    """A warning when other processes already keep the CPUs busy (timings would be noise)."""
    load = load_average()
    if load is None or load < 1.0:
        return None
    return (
        f"the 1-minute load average is {load:.1f} before the benchmark starts, with {threads} torch "
        f"threads on {os.cpu_count()} logical CPUs: other processes may compete and make the times noisy"
    )


def machine_description(device: torch.device) -> dict[str, str]:
    description = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cpus": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
        description["cuda"] = str(torch.version.cuda)
    return description


def machine_line(description: Mapping[str, str]) -> str:
    """One line naming the machine, for the head of a report."""
    text = (
        f"{description['platform']}; CPU {description['cpu']} ({description['logical_cpus']} logical CPUs, "
        f"torch threads {description['torch_threads']}); torch {description['torch']}, "
        f"Python {description['python']}"
    )
    if "gpu" in description:
        text += f"; GPU {description['gpu']} (CUDA {description['cuda']})"
    return text
