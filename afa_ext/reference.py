"""Pure-PyTorch AFA feature losses, written the way the original AFA code writes them.

This is "the pure-Python loss" the compiled backends replace, and the ground truth of the
``reference`` backend. Every function materialises the difference map D = F_t - F_s (and
scaled copies of it) exactly as the authors' code does; the formulas are those in the
docstring of ``afa_ext.functional``, with B the batch size, C the channels and P the
number of spatial positions of one feature map.

The source features are detached: the source model gets no gradient. For float16 and
bfloat16 features D is formed in the features' dtype and then squared and summed in
float32 (the sums of squares of a real feature map overflow float16), so the loss is a
float32 scalar, as it is from every backend.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = [
    "feature_map_loss",
    "delta_loss",
    "channel_attentive_loss",
    "spatial_attentive_loss",
    "l2sp_loss",
]


def _flat_difference(target: Tensor, source: Tensor) -> Tensor:
    """D = F_t - F_s viewed as (B, C, P), in float32 for half features: the sums of
    squares of a feature map overflow float16, and every backend accumulates in float32."""
    diff = (target - source.detach()).to(_loss_dtype(target))
    return diff.reshape(diff.shape[0], diff.shape[1], math.prod(diff.shape[2:]))


def _batch_scale(batch: int) -> float:
    """0.5 / B, with an empty batch giving a zero loss instead of 0 * inf."""
    return 0.5 / max(batch, 1)


def _loss_dtype(features: Tensor) -> torch.dtype:
    return torch.float32 if features.dtype in (torch.float16, torch.bfloat16) else features.dtype


def feature_map_loss(target: Tensor, source: Tensor) -> Tensor:
    """Plain feature-map L2: 0.5 * sum_{n,j,p} D[n,j,p]^2 (no division by B)."""
    diff = _flat_difference(target, source)
    return 0.5 * torch.sum(diff**2)


def delta_loss(target: Tensor, source: Tensor, channel_weights: Tensor) -> Tensor:
    """DELTA: 0.5 * sum_{n,j} C * w_j * sum_p D[n,j,p]^2 / P (no division by B)."""
    diff = _flat_difference(target, source)
    channels, positions = diff.shape[1], diff.shape[2]
    distance = torch.norm(diff, 2, 2) ** 2  # (B, C), as the original computes it
    weighted = channels * torch.mul(channel_weights.to(diff.dtype), distance) / max(positions, 1)
    return 0.5 * torch.sum(weighted)


def channel_attentive_loss(target: Tensor, source: Tensor, attention: Tensor) -> Tensor:
    """Attentive channel (ACT): (0.5 / B) * sum_{n,j} C * g[n,j] * sum_p D[n,j,p]^2."""
    diff = _flat_difference(target, source)
    batch, channels = diff.shape[0], diff.shape[1]
    distance = torch.sum(diff**2, dim=2)  # (B, C)
    weighted = channels * torch.mul(attention.to(diff.dtype), distance)
    return _batch_scale(batch) * torch.sum(weighted)


def spatial_attentive_loss(target: Tensor, source: Tensor, attention: Tensor) -> Tensor:
    """Attentive spatial (AST): (0.5 / B) * sum_{n,p} (P * a[n,p])^2 * sum_j D[n,j,p]^2.

    ``attention`` is (B, P) or (B, 1, *spatial). The attention multiplies D before the
    norm is taken, so it enters squared.
    """
    diff = _flat_difference(target, source)
    batch, positions = diff.shape[0], diff.shape[2]
    scaled_attention = attention.reshape(batch, 1, positions).to(diff.dtype) * positions
    attended = diff * scaled_attention  # a second full-size copy of D, as in the original
    return _batch_scale(batch) * torch.sum(attended**2)


def l2sp_loss(
    model: torch.nn.Module,
    source_state: Mapping[str, Tensor],
    exclude: Iterable[str] = (),
) -> Tensor:
    """L2-SP: 0.5 * sum over parameters not excluded of ||w - w_source||^2.

    ``exclude`` holds name prefixes (for example ``("fc.",)`` for a ResNet head) whose
    parameters are skipped. Every other parameter must have a tensor of the same shape in
    ``source_state`` (a frozen one adds a constant); buffers such as batch-norm statistics
    are not parameters and do not count.
    """
    prefixes = tuple(exclude)
    total = None
    for name, param in model.named_parameters():
        if prefixes and name.startswith(prefixes):
            continue
        if name not in source_state:
            raise KeyError(
                f"l2sp_loss: parameter {name!r} has no source value in source_state; "
                f"pass exclude=(...) with its prefix to skip it"
            )
        source_value = source_state[name]
        if source_value.shape != param.shape:
            raise ValueError(
                f"l2sp_loss: parameter {name!r} has shape {tuple(param.shape)} but its "
                f"source value has shape {tuple(source_value.shape)}"
            )
        term = torch.sum((param - source_value.to(device=param.device, dtype=param.dtype)) ** 2)
        total = term if total is None else total + term
    if total is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else None
        return torch.zeros((), device=device)
    return 0.5 * total
