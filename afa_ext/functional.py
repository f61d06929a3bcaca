"""The four AFA feature losses, with a choice of backend.

For features t (target) and s (source) of shape (B, C, *spatial), P spatial positions
and D = t - s, the losses are (DESIGN.md section 1, the original code's normalisations):

- ``feature_map_loss``:        0.5 * sum_{n,j,p} D^2
- ``delta_loss``:              0.5 * sum_{n,j} C * w_j * sum_p D^2 / P
- ``channel_attentive_loss``:  (0.5 / B) * sum_{n,j} C * g[n,j] * sum_p D^2
- ``spatial_attentive_loss``:  (0.5 / B) * sum_{n,p} (P * a[n,p])^2 * sum_j D^2

The compiled backends reduce t and s to the small partial sums d[n,j] = sum_p D^2 or
e[n,p] = sum_j D^2 in one fused pass; the weights' maths here is tiny and stays in
PyTorch, so autograd carries gradients on into the attention modules. The source is
detached. The loss is float32 for float16/bfloat16 features, else the features' dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._validation import check_features, check_weights, spatial_positions
from .backends import resolve_backend

__all__ = [
    "feature_map_loss",
    "delta_loss",
    "channel_attentive_loss",
    "spatial_attentive_loss",
]


def _channel_sqdist(target: Tensor, source: Tensor) -> Tensor:
    """d[n, j] = sum_p (t - s)^2 from the compiled op (it dispatches on the device)."""
    return torch.ops.afa_ext.channel_sqdist(target, source.detach())


def _spatial_sqdist(target: Tensor, source: Tensor) -> Tensor:
    """e[n, p] = sum_j (t - s)^2 from the compiled op (it dispatches on the device)."""
    return torch.ops.afa_ext.spatial_sqdist(target, source.detach())


def feature_map_loss(target: Tensor, source: Tensor, *, backend: str = "auto") -> Tensor:
    """Plain feature-map L2: 0.5 * sum_{n,j,p} (t - s)^2, no division by B."""
    where = "feature_map_loss"
    check_features(target, source, where)
    name = resolve_backend(backend, target.device, where)
    if name == "reference":
        return reference.feature_map_loss(target, source)
    return 0.5 * torch.sum(_channel_sqdist(target, source))


def delta_loss(target: Tensor, source: Tensor, channel_weights: Tensor, *, backend: str = "auto") -> Tensor:
    """DELTA: 0.5 * sum_{n,j} C * w_j * sum_p (t - s)^2 / P, with w of shape (C,)."""
    where = "delta_loss"
    check_features(target, source, where)
    channels = target.shape[1]
    check_weights(channel_weights, "channel_weights", [(channels,)], target, where)
    name = resolve_backend(backend, target.device, where)
    if name == "reference":
        return reference.delta_loss(target, source, channel_weights)
    distance = _channel_sqdist(target, source)
    weights = channel_weights.to(distance.dtype)
    return (0.5 * channels / max(spatial_positions(target), 1)) * torch.sum(weights * distance)


def channel_attentive_loss(target: Tensor, source: Tensor, attention: Tensor, *, backend: str = "auto") -> Tensor:
    """Attentive channel (ACT): (0.5 / B) * sum_{n,j} C * g[n,j] * sum_p (t - s)^2, g (B, C)."""
    where = "channel_attentive_loss"
    check_features(target, source, where)
    batch, channels = target.shape[0], target.shape[1]
    check_weights(attention, "attention", [(batch, channels)], target, where)
    name = resolve_backend(backend, target.device, where)
    if name == "reference":
        return reference.channel_attentive_loss(target, source, attention)
    distance = _channel_sqdist(target, source)
    weights = attention.to(distance.dtype)
    return (0.5 * channels / max(batch, 1)) * torch.sum(weights * distance)


def spatial_attentive_loss(target: Tensor, source: Tensor, attention: Tensor, *, backend: str = "auto") -> Tensor:
    """Attentive spatial (AST): (0.5 / B) * sum_{n,p} (P * a[n,p])^2 * sum_j (t - s)^2.

    ``attention`` is (B, P) or (B, 1, *spatial).
    """
    where = "spatial_attentive_loss"
    check_features(target, source, where)
    batch, positions = target.shape[0], spatial_positions(target)
    shapes = [(batch, positions), (batch, 1) + tuple(target.shape[2:])]
    check_weights(attention, "attention", shapes, target, where)
    name = resolve_backend(backend, target.device, where)
    if name == "reference":
        return reference.spatial_attentive_loss(target, source, attention)
    distance = _spatial_sqdist(target, source)
    scaled = attention.reshape(batch, positions).to(distance.dtype) * positions
    return (0.5 / max(batch, 1)) * torch.sum(scaled * scaled * distance)
