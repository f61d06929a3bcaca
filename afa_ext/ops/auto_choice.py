"""``auto`` on CUDA tensors: whichever of the ``cuda`` and ``triton`` backends is faster.

The first time ``auto`` meets a (grouping, dtype, layer shapes and strides) on a GPU
where both backends are available, it times one forward and backward of each on the
actual inputs and keeps the winner for that key, as Triton's autotuner does for block
sizes (that first call synchronises the device; later ones do not). Under torch.compile,
or for a key not yet measured while tracing, the first candidate is taken.
AFA_EXT_AUTO_CUDA=cuda or =triton pins the choice.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, Hashable, Mapping, Sequence

import torch

PINNED = os.environ.get("AFA_EXT_AUTO_CUDA") or None
REPEATS = 3

_CHOICES: Dict[Hashable, str] = {}


def measured_choices() -> Dict[Hashable, str]:
    """What ``auto`` has measured so far: key -> backend name (a copy)."""
    return dict(_CHOICES)


def _seconds(run: Callable[[], object], synchronize: Callable[[], None]) -> float:
    run()  # warm-up: compiles Triton kernels, fills caches
    synchronize()
    start = time.perf_counter()
    for _ in range(REPEATS):
        run()
    synchronize()
    return (time.perf_counter() - start) / REPEATS


def choose_fastest(key: Hashable, candidates: Mapping[str, Callable[[], object]],
                   synchronize: Callable[[], None]) -> str:
    """The name of the fastest of ``candidates`` (callables doing one pass each) for
    ``key``, measured once and remembered; the first candidate when tracing."""
    names = list(candidates)
    if PINNED in candidates:
        return PINNED
    if key in _CHOICES:
        return _CHOICES[key]
    if len(names) == 1 or torch.compiler.is_compiling():
        return names[0]
    timings = {name: _seconds(run, synchronize) for name, run in candidates.items()}
    _CHOICES[key] = min(names, key=timings.__getitem__)
    return _CHOICES[key]


def layers_key(grouping: str, targets: Sequence[torch.Tensor]) -> Hashable:
    return (grouping, targets[0].dtype, str(targets[0].device),
            tuple((tuple(t.shape), t.stride()) for t in targets))
