"""The attention modules of AFA, which weight the feature losses per position or channel.

Both read a source feature map of shape (B, C, *spatial) with P = prod(spatial) positions
and return float weights that sum to 1 along one axis: spatial attention a[n, p] over the
P positions, channel attention g[n, j] over the C channels. They compute in their
parameters' dtype (float32 unless converted): features of another dtype are cast to it on
entry, and the softmax returns that dtype even under ``torch.autocast``.

``spatial_attention_weights`` and ``channel_attention_weights`` are that maths given the
layers; the modules here and the drop-in modules of ``afa_ext.compat`` (the original's
parameter names) both call them.

The hidden width k defaults to round(sqrt(P)), at least 1. For square maps that is the
side length the original code uses (56/28/14/7 for 224 px input to a ResNet).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "SpatialAttention",
    "ChannelAttention",
    "default_hidden",
    "spatial_attention_weights",
    "channel_attention_weights",
]


def default_hidden(positions: int) -> int:
    """round(sqrt(P)), at least 1: the side length of a square map of P positions."""
    return max(1, round(math.sqrt(positions)))


def _check_size(value, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: expected {what} to be a positive int, got {value!r}")
    return value


def _flatten(features, channels: int | None, positions: int, where: str) -> Tensor:
    """Features (B, C, *spatial) as (B, C, P), after checking C (when given) and P."""
    if not isinstance(features, Tensor):
        raise TypeError(f"{where}: expected source features to be a torch.Tensor, got {type(features).__name__}")
    if features.dim() < 3:
        raise ValueError(
            f"{where}: expected source features of shape (B, C, *spatial) with at least 3 dims, "
            f"got shape {tuple(features.shape)}"
        )
    given_positions = math.prod(features.shape[2:])
    if given_positions != positions or (channels is not None and features.shape[1] != channels):
        expected = f"{positions} positions" if channels is None else f"{channels} channels and {positions} positions"
        raise ValueError(
            f"{where}: the module was built for features with {expected}, got shape "
            f"{tuple(features.shape)} ({features.shape[1]} channels, {given_positions} positions)"
        )
    return features.reshape(features.shape[0], features.shape[1], positions)


def spatial_attention_weights(flat: Tensor, reduce: nn.Linear, expand: nn.Linear) -> Tensor:
    """a = softmax_p(expand(relu(reduce(m)))), m[n, p] = (1/C) sum_j flat[n, j, p]; (B, P).

    ``flat`` holds source features as (B, C, P). The mean is taken in the dtype of the
    layers' parameters, casting on the fly (no full-size copy of half features), and the
    softmax returns that dtype.
    """
    dtype = expand.weight.dtype
    logits = expand(torch.relu(reduce(flat.mean(dim=1, dtype=dtype))))
    return torch.softmax(logits, dim=1, dtype=dtype)


def channel_attention_weights(flat: Tensor, reduce: nn.Linear, score: nn.Linear, bias: Tensor) -> Tensor:
    """g[n] = softmax_j(score(relu(reduce(flat[n, j, :]))) + bias_j); (B, C).

    ``flat`` holds source features as (B, C, P); ``reduce`` (P -> k) and ``score`` (k -> 1)
    are shared by the channels, ``bias`` has shape (C,). The features are cast to the
    dtype of ``bias`` (under autocast the linear layers then cast them to autocast's), and
    the softmax returns that dtype.
    """
    dtype = bias.dtype
    logits = score(torch.relu(reduce(flat.to(dtype)))).squeeze(-1) + bias
    return torch.softmax(logits, dim=1, dtype=dtype)


class SpatialAttention(nn.Module):
    """Spatial attention a of shape (B, P), softmax over the P positions.

    a = softmax_p(W2 relu(W1 m) + b2), with m[n, p] = (1/C) sum_j F_s[n, j, p],
    W1: (k, P) without bias, W2: (P, k) with bias b2. k defaults to round(sqrt(P)).
    """

    def __init__(self, positions: int, hidden: int | None = None):
        super().__init__()
        self.positions = _check_size(positions, "positions", "SpatialAttention")
        self.hidden = default_hidden(positions) if hidden is None else _check_size(hidden, "hidden", "SpatialAttention")
        self.reduce = nn.Linear(self.positions, self.hidden, bias=False)
        self.expand = nn.Linear(self.hidden, self.positions, bias=True)

    def forward(self, source_features: Tensor) -> Tensor:
        flat = _flatten(source_features, None, self.positions, "SpatialAttention")
        return spatial_attention_weights(flat, self.reduce, self.expand)

    def extra_repr(self) -> str:
        return f"positions={self.positions}, hidden={self.hidden}"


class ChannelAttention(nn.Module):
    """Channel attention g of shape (B, C), softmax over the C channels.

    g[n, :] = softmax_j(w2 relu(W1 F_s[n, j, :]) + b_j), with W1: (k, P) and w2: (1, k)
    both without bias, shared by all channels, and a learnable per-channel bias b of
    shape (C,) initialised to 0. k defaults to round(sqrt(P)).
    """

    def __init__(self, channels: int, positions: int, hidden: int | None = None):
        super().__init__()
        self.channels = _check_size(channels, "channels", "ChannelAttention")
        self.positions = _check_size(positions, "positions", "ChannelAttention")
        self.hidden = default_hidden(positions) if hidden is None else _check_size(hidden, "hidden", "ChannelAttention")
        self.reduce = nn.Linear(self.positions, self.hidden, bias=False)
        self.score = nn.Linear(self.hidden, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(self.channels))

    def forward(self, source_features: Tensor) -> Tensor:
        flat = _flatten(source_features, self.channels, self.positions, "ChannelAttention")
        return channel_attention_weights(flat, self.reduce, self.score, self.bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, positions={self.positions}, hidden={self.hidden}"
