"""One decision for every process of a torch.distributed job: rank 0's.

``auto``'s choice between the GPU backends and the Triton kernels' autotuned block sizes
are measured, so two processes can decide differently (and then sum in different orders).
When torch.distributed is initialised with more than one process, ``decided_by_rank_zero``
runs the decision on rank 0 only and broadcasts its result to every rank.

Every rank must call it at the same points, in the same order (as a DDP step does): it is
a collective, like the all-reduce of the gradients. A decision taken while torch.compile
traces is taken locally: a trace does not run collectives.
"""

from __future__ import annotations

from typing import TypeVar
from collections.abc import Callable

import torch

T = TypeVar("T")


def distributed_world() -> bool:
    """torch.distributed is initialised with more than one process."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def decided_by_rank_zero(decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 and its (picklable) result given to every rank; simply
    ``decide()`` outside a multi-process job."""
    if torch.compiler.is_compiling() or not distributed_world():
        return decide()
    box = [decide() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
