"""``auto`` on CUDA tensors: whichever of the ``cuda`` and ``triton`` backends is faster.

The first time ``auto`` meets a (grouping, dtype, layer shapes and strides) on a GPU
where both backends are available, it times one forward and backward of each on the
actual inputs and keeps the winner for that key, as Triton's autotuner does for block
sizes (that first call synchronises the device; later ones do not). Under torch.compile,
or for a key not yet measured while tracing, the first candidate is taken.
AFA_EXT_AUTO_CUDA=cuda or =triton pins the choice; it is read at each call.

In a torch.distributed job of several processes, only rank 0 measures, and every rank
takes its winner (rank_zero.py), so that all ranks run the same backend and sum in the
same order. That measurement is a collective: every rank must make the first call for a
key together, as a DDP step does (same layer shapes on every rank, in the same order, and
the same backends installed everywhere). The pinned choice and the first-candidate choice
while tracing are taken by each rank alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable, Mapping, Sequence

import torch

from .rank_zero import decided_by_rank_zero

PIN_VARIABLE = "AFA_EXT_AUTO_CUDA"
REPEATS = 3

_CHOICES: dict[Hashable, str] = {}


def _seconds(run: Callable[[], object], synchronize: Callable[[], None]) -> float:
    run()  # warm-up: compiles Triton kernels, fills caches
    synchronize()
    start = time.perf_counter()
    for _ in range(REPEATS):
        run()
    synchronize()
    return (time.perf_counter() - start) / REPEATS


def _fastest(candidates: Mapping[str, Callable[[], object]], synchronize: Callable[[], None]) -> str:
    """The name of the candidate whose pass takes the least time here."""
    timings = {name: _seconds(run, synchronize) for name, run in candidates.items()}
    return min(timings, key=timings.__getitem__)


def choose_fastest(
    key: Hashable, candidates: Mapping[str, Callable[[], object]], synchronize: Callable[[], None]
) -> str:
    """The candidate AFA_EXT_AUTO_CUDA names, if any; else the name of the fastest of
    ``candidates`` (callables doing one pass each) for ``key``, measured once (on rank 0
    of a distributed job) and remembered; the first candidate when tracing."""
    names = list(candidates)
    pinned = os.environ.get(PIN_VARIABLE)
    if pinned in candidates:
        return pinned
    if key in _CHOICES:
        return _CHOICES[key]
    if len(names) == 1 or torch.compiler.is_compiling():
        return names[0]
    winner = decided_by_rank_zero(lambda: _fastest(candidates, synchronize))
    # Rank 0's winner is missing here only when the ranks' installations differ.
    _CHOICES[key] = winner if winner in candidates else names[0]
    return _CHOICES[key]


def layers_key(grouping: str, targets: Sequence[torch.Tensor]) -> Hashable:
    return (grouping, targets[0].dtype, str(targets[0].device), tuple((tuple(t.shape), t.stride()) for t in targets))
