"""Registers, spills and shared memory of each CUDA kernel, from a build log.

setup.py compiles the CUDA kernels with -Xptxas=-v, so the build log holds, per kernel and
architecture, lines such as

    ptxas info    : Compiling entry function '_ZN7afa_ext4cuda29grouped_...' for 'sm_90'
    ptxas info    : Function properties for _ZN7afa_ext4cuda29grouped_...
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 80 registers, used 1 barriers, 8192 bytes smem

Usage: python bench/cuda_resource_usage.py BUILD_LOG   (prints a markdown table; exits
with status 1 when a kernel spills to local memory).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
FRAME = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
    r"(?P<loads>\d+) bytes spill loads"
)
USED = re.compile(r"Used (?P<registers>\d+) registers")
SHARED = re.compile(r"(?P<smem>\d+) bytes smem")


@dataclass
class KernelUsage:
    name: str
    arch: str
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0


def parse(log: str) -> list[KernelUsage]:
    """One entry per (kernel, architecture), in the order ptxas compiled them."""
    kernels: list[KernelUsage] = []
    for line in log.splitlines():
        if entry := ENTRY.search(line):
            kernels.append(KernelUsage(entry["name"], entry["arch"]))
        elif kernels and (frame := FRAME.search(line)):
            kernels[-1].stack = int(frame["stack"])
            kernels[-1].spill_stores = int(frame["stores"])
            kernels[-1].spill_loads = int(frame["loads"])
        elif kernels and (used := USED.search(line)):
            kernels[-1].registers = int(used["registers"])
            shared = SHARED.search(line)
            kernels[-1].shared = int(shared["smem"]) if shared else 0
    return kernels


def short_names(mangled: list[str]) -> dict[str, str]:
    """'grouped_sqdist_forward_kernel<float>' for each mangled name (c++filt when present)."""
    demangled = mangled
    if shutil.which("c++filt") and mangled:
        result = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True, check=False)
        if result.returncode == 0:
            demangled = result.stdout.splitlines()
    shorter = {}
    for name, full in zip(mangled, demangled):
        full = re.sub(r"\(.*\)$", "", full)  # the parameter list
        full = re.sub(r"\b(?:afa_ext::cuda|c10)::", "", full)
        shorter[name] = full.replace("void ", "", 1)
    return shorter


def markdown_table(kernels: list[KernelUsage]) -> str:
    names = short_names(sorted({k.name for k in kernels}))
    rows = [
        "| kernel | arch | registers | spill stores / loads (bytes) | stack (bytes) | shared memory (bytes) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for k in sorted(kernels, key=lambda k: (names[k.name], k.arch)):
        rows.append(
            f"| `{names[k.name]}` | {k.arch} | {k.registers} | {k.spill_stores} / {k.spill_loads} "
            f"| {k.stack} | {k.shared} |"
        )
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python bench/cuda_resource_usage.py BUILD_LOG", file=sys.stderr)
        return 2
    kernels = parse(Path(argv[1]).read_text(errors="replace"))
    if not kernels:
        print(f"no 'ptxas info' lines in {argv[1]}: was the CUDA build run with -Xptxas=-v?", file=sys.stderr)
        return 2
    print(markdown_table(kernels))
    spilling = [k for k in kernels if k.spill_stores or k.spill_loads]
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
