"""An independent float64 model of the four AFA feature losses and of the partial-sum ops
behind them (formulas: the docstring of afa_ext/functional.py; ops: README.md, "How it
works").

Written from the formulas with einsum and explicit sums, deliberately not reusing any
package code, so that it can judge both the reference backend and the compiled ones.
Inputs of any float dtype are upcast exactly to float64 first. ``loss_and_grads`` returns
the loss and its gradients w.r.t. the target and the weights (or attention) for a given
upstream gradient, computed analytically (dL/dt = 2 W (t - s) with W the weight of each
partial sum times the upstream gradient), not by autograd.

Notation: t, s of shape (B, C, *spatial), P = prod(spatial), D = t - s viewed as (B, C, P).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOSS_NAMES = ("feature_map", "delta", "channel_attentive", "spatial_attentive")


def _difference(target: Tensor, source: Tensor) -> Tensor:
    """D = t - s in float64, viewed as (B, C, P)."""
    t = target.to(torch.float64)
    s = source.to(torch.float64)
    return (t - s).reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def channel_distance(target: Tensor, source: Tensor) -> Tensor:
    """d[n, j] = sum_p D[n, j, p]^2, shape (B, C), float64."""
    diff = _difference(target, source)
    return torch.einsum("njp,njp->nj", diff, diff)


def spatial_distance(target: Tensor, source: Tensor) -> Tensor:
    """e[n, p] = sum_j D[n, j, p]^2, shape (B, P), float64."""
    diff = _difference(target, source)
    return torch.einsum("njp,njp->np", diff, diff)


def partial_sums(grouping: str, target: Tensor, source: Tensor) -> Tensor:
    """The ops' output: d (grouping "channel") or e ("spatial"), float64 on the CPU."""
    distance = channel_distance if grouping == "channel" else spatial_distance
    return distance(target.detach().cpu(), source.detach().cpu())


def partial_sums_backward(grouping: str, grad: Tensor, target: Tensor, source: Tensor) -> Tensor:
    """The backward ops' output: dt = 2 * g (t - s), g of shape (B, C) broadcast over P
    (channel) or (B, P) broadcast over C (spatial); float64 on the CPU, shaped like t."""
    shape = tuple(target.shape)
    diff = _difference(target.detach().cpu(), source.detach().cpu())
    pattern = "nj,njp->njp" if grouping == "channel" else "np,njp->njp"
    return (2.0 * torch.einsum(pattern, grad.detach().cpu().to(torch.float64), diff)).reshape(shape)


def channel_weight_matrix(name: str, shape, weights: Tensor | None) -> Tensor:
    """W[n, j] of the losses of grouping "channel" (loss = sum_{n,j} W[n, j] d[n, j]), float64
    (B, C)."""
    batch, channels = shape[0], shape[1]
    positions = math.prod(shape[2:])
    if name == "feature_map":
        return torch.full((batch, channels), 0.5, dtype=torch.float64)
    w = weights.to(torch.float64)
    if name == "delta":
        return (0.5 * channels / positions) * w.reshape(1, channels).expand(batch, channels)
    if name == "channel_attentive":
        return (0.5 * channels / max(batch, 1)) * w
    raise ValueError(name)


def spatial_weight_matrix(shape, attention: Tensor) -> Tensor:
    """V[n, p] = (0.5 / B) * (P * a[n, p])^2 of AST, float64 (B, P)."""
    batch = shape[0]
    positions = math.prod(shape[2:])
    a = attention.to(torch.float64).reshape(batch, positions)
    return (0.5 / max(batch, 1)) * (positions * a) ** 2


def loss(name: str, target: Tensor, source: Tensor, weights: Tensor | None = None) -> Tensor:
    """The float64 loss value (differentiable, so its analytic gradients can be checked)."""
    shape = tuple(target.shape)
    if name == "spatial_attentive":
        v = spatial_weight_matrix(shape, weights)
        return torch.einsum("np,np->", v, spatial_distance(target, source))
    w = channel_weight_matrix(name, shape, weights)
    return torch.einsum("nj,nj->", w, channel_distance(target, source))


def loss_and_grads(
    name: str, target: Tensor, source: Tensor, weights: Tensor | None, upstream: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(loss, dL/dt, dL/dweights) in float64 for the scalar upstream gradient ``upstream``.

    dL/dt = 2 * W (t - s) (or V); dL/dW = d (or dL/dV = e) chained through the weights'
    own formula. dL/dweights has the shape of ``weights`` (None for feature_map).
    """
    target, source = target.detach(), source.detach()
    weights = None if weights is None else weights.detach()
    shape = tuple(target.shape)
    batch, channels = shape[0], shape[1]
    positions = math.prod(shape[2:])
    diff = _difference(target, source)
    value = loss(name, target, source, weights)
    if name == "spatial_attentive":
        v = spatial_weight_matrix(shape, weights)
        grad_t = 2.0 * upstream * torch.einsum("np,njp->njp", v, diff)
        # V = (0.5 / B) * P^2 * a^2  ->  dV/da = (1 / B) * P^2 * a
        a = weights.to(torch.float64).reshape(batch, positions)
        dv_da = (positions**2 / max(batch, 1)) * a
        grad_w = upstream * dv_da * spatial_distance(target, source)
        return value, grad_t.reshape(shape), grad_w.reshape(weights.shape)
    w = channel_weight_matrix(name, shape, weights)
    grad_t = 2.0 * upstream * torch.einsum("nj,njp->njp", w, diff)
    d = channel_distance(target, source)
    if name == "feature_map":
        grad_w = None
    elif name == "delta":
        grad_w = upstream * (0.5 * channels / positions) * d.sum(dim=0)
    else:
        grad_w = upstream * (0.5 * channels / max(batch, 1)) * d
    return value, grad_t.reshape(shape), grad_w
