"""Runs a piece of code in two gloo processes (ranks 0 and 1 of one torch.distributed job)
and returns what each rank saved: for tests of decisions that every rank must share."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

_PROLOGUE = """
import sys
import torch
rank, folder = int(sys.argv[1]), sys.argv[2]
torch.distributed.init_process_group("gloo", init_method="file://" + folder + "/store", rank=rank, world_size=2)
"""
_EPILOGUE = """
torch.save(result, folder + "/rank%d.pt" % rank)
torch.distributed.barrier()  # neither rank tears gloo down while the other still uses it
torch.distributed.destroy_process_group()
"""


def run_two_ranks(body: str, folder: Path, env: dict = None, timeout: float = 180) -> list[object]:
    """Runs ``body`` (Python source that sees ``rank`` and ``folder`` and sets ``result``,
    anything torch.save can store) in two processes of one gloo job; returns their results,
    rank 0's first. A rank that fails or hangs fails the test with its output."""
    folder = Path(folder)
    script = folder / "two_ranks_worker.py"
    script.write_text(_PROLOGUE + textwrap.dedent(body) + _EPILOGUE)
    environment = dict(os.environ, **(env or {}))
    environment.setdefault("OMP_NUM_THREADS", "1")
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(folder)],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for rank, process in enumerate(processes):
            output, _ = process.communicate(timeout=timeout)
            outputs.append(output)
            assert process.returncode == 0, f"rank {rank} exited with {process.returncode}:\n{output}"
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
