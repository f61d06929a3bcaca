"""The loss terms of a training step, built on afa_ext's public losses.

Total loss = CE + alpha * R + beta * 0.5 * ||W_head||^2 (the head's weight and bias), with
R the stage's regulariser, summed over the hooked layers where it reads features
(D = F_t - F_s per layer, B the batch, C channels, P positions):

- ``none``:    R = 0
- ``l2sp``:    R = 0.5 * sum over non-head parameters of ||w - w_source||^2
- ``fea_map``: R = 0.5 * sum_{n,j,p} D^2                          (a sum over the batch)
- ``delta``:   R = 0.5 * sum_{n,j} C * w_j * sum_p D^2 / P         (a sum over the batch)
- ``ast``:     R = (0.5 / B) * sum_{n,p} (P * a[n,p])^2 * sum_j D^2 (a mean over the batch)
- ``act``:     R = (0.5 / B) * sum_{n,j} C * g[n,j] * sum_p D^2     (a mean over the batch)

The feature terms are afa_ext's loss modules (fused kernels, one call for all layers);
their attention modules (AST, ACT) are trained with the model.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import afa_ext
from afa_ext import reference

__all__ = ["FEATURE_TERMS", "BATCH_SUMS", "feature_term", "check_channel_weights", "head_l2", "l2sp_term", "source_anchors"]

FEATURE_TERMS = ("fea_map", "delta", "ast", "act")
# Feature terms that sum over the batch instead of averaging (see distributed.py).
BATCH_SUMS = ("fea_map", "delta")


def feature_term(kind: str, *, backend: str, feature_shapes: Sequence[Tuple[int, ...]],
                 channel_weights: Optional[List[Tensor]] = None) -> Optional[nn.Module]:
    """The loss module of a feature regulariser, or None for ``none`` and ``l2sp``.

    ``feature_shapes``: (C, H, W) of each hooked layer, so that the attention modules
    exist (and can be given to the optimizer) before the first step.
    """
    if kind == "fea_map":
        return afa_ext.FeatureMapAlignment(backend=backend)
    if kind == "delta":
        if channel_weights is None:
            raise ValueError("feature_term: delta needs channel_weights")
        check_channel_weights(channel_weights, feature_shapes)
        return afa_ext.DeltaAlignment(channel_weights, backend=backend)
    if kind == "ast":
        return afa_ext.AttentiveSpatialAlignment(backend=backend, feature_shapes=feature_shapes)
    if kind == "act":
        return afa_ext.AttentiveChannelAlignment(backend=backend, feature_shapes=feature_shapes)
    return None


def check_channel_weights(channel_weights: Sequence[Tensor], feature_shapes: Sequence[Tuple[int, ...]]) -> None:
    """ValueError unless there is one (C,) weight vector per hooked layer of C channels."""
    if len(channel_weights) != len(feature_shapes):
        raise ValueError(f"expected DELTA channel weights for {len(feature_shapes)} layers, got {len(channel_weights)}")
    for index, (weights, shape) in enumerate(zip(channel_weights, feature_shapes)):
        if tuple(weights.shape) != (shape[0],):
            raise ValueError(f"layer {index} has {shape[0]} channels, so its DELTA channel weights must have shape "
                             f"({shape[0]},), got {tuple(weights.shape)}")


def head_parameters(model: nn.Module, head: str) -> List[Tensor]:
    return list(model.get_submodule(head).parameters())


def head_l2(model: nn.Module, head: str) -> Tensor:
    """0.5 * sum over the head's parameters p of ||p||^2."""
    return 0.5 * sum(torch.sum(p.float() ** 2) for p in head_parameters(model, head))


def source_anchors(source: nn.Module, head: str) -> Dict[str, Tensor]:
    """The source model's non-head parameters, detached copies: L2-SP's anchor."""
    prefix = head + "."
    return {name: p.detach().clone() for name, p in source.named_parameters() if not name.startswith(prefix)}


def l2sp_term(model: nn.Module, anchors: Dict[str, Tensor], head: str) -> Tensor:
    """0.5 * sum over non-head parameters of ||w - w_source||^2."""
    return reference.l2sp_loss(model, anchors, exclude=(head + ".",))
