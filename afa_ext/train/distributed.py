"""Distributed set-up under torchrun: the process group, the device of each rank, and the
reductions that keep the losses' one-process meaning across processes.

``torchrun --nproc_per_node=K -m afa_ext.train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
the trainer then joins a process group (NCCL on GPUs, gloo on the CPU). ``--batch-size``
is the global batch: each rank takes its share of every global batch.

Gradients are averaged over the W ranks (DistributedDataParallel). For that average to be
the gradient of the one-process loss of the global batch of B samples, rank r, holding
b_r of them, scales its local terms:

- sums over the batch (feature-map L2, DELTA): by W;
- means over the batch (cross-entropy, AST, ACT, computed with the local 1/b_r): by W b_r / B;
- terms of the parameters alone (head L2, L2-SP): by 1.

``CrossProcessBatchNorm`` is ``--sync-bn`` on the CPU, where torch's SyncBatchNorm does not
run: batch statistics over the global batch through a differentiable all-reduce.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "Distributed",
    "setup",
    "teardown",
    "loss_scales",
    "all_reduce_sum",
    "convert_sync_batchnorm",
    "CrossProcessBatchNorm",
]


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def setup(device: str) -> Distributed:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device is available here; use --device cpu")
        target = torch.device("cuda", local_rank if world > 1 else torch.device(device).index or 0)
        torch.cuda.set_device(target)
    else:
        target = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        # Rank 0 alone estimates DELTA's channel weights while the others wait for them.
        torch.distributed.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(hours=2)
        )
    return Distributed(rank=rank, world=world, local_rank=local_rank, device=target)


def teardown(dist: Distributed) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def loss_scales(dist: Distributed, local_batch: int, global_batch: int):
    """(scale of batch means, scale of batch sums) for this rank's local terms."""
    return dist.world * local_batch / global_batch, float(dist.world)


def all_reduce_sum(dist: Distributed, tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the ranks (the tensor itself with one process)."""
    if dist.enabled:
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
    return tensor


class CrossProcessBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all ranks, for any device.

    In training: mean = sum_r sum(x_r) / N, var = sum_r sum((x_r - mean)^2) / N over the N
    elements per channel of all ranks, both through ``torch.distributed.nn``'s all-reduce,
    whose backward sums the gradients of every rank; the running variance takes the
    unbiased N / (N - 1) var, as BatchNorm does. In eval mode it is plain batch norm.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"CrossProcessBatchNorm: expected at least 2-D input, got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        synced = (
            self.training
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )
        if not synced:
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, input.dim()))
        local_count = input.numel() // input.shape[1]
        count = all_reduce(torch.tensor([float(local_count)], device=input.device))
        mean = all_reduce(input.sum(dim=dims)) / count
        shape = [1, -1] + [1] * (input.dim() - 2)
        centred = input - mean.reshape(shape)
        var = all_reduce((centred * centred).sum(dim=dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        normed = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            normed = normed * self.weight.reshape(shape) + self.bias.reshape(shape)
        return normed


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` synchronised over the ranks: torch's SyncBatchNorm on
    GPUs, CrossProcessBatchNorm elsewhere. Parameters and statistics are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _replace_batchnorms(model)


def _replace_batchnorms(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossProcessBatchNorm):
        replacement = CrossProcessBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        replacement.load_state_dict(module.state_dict())
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        setattr(module, name, _replace_batchnorms(child))
    return module
