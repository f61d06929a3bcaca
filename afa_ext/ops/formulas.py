"""Fake (meta) kernels and autograd formulas of the squared-distance ops (schemas.py).

d and e are float32 for half features, else the features' dtype. The source gets no
gradient; the backward re-reads t and s instead of holding anything between passes.
``register_formulas(namespace)`` gives one library's ops their fakes and autograd.
"""

from __future__ import annotations


import torch
from torch import Tensor

from .schemas import GROUPINGS
from .validation import FLOAT_DTYPES, spatial_positions


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def partial_sum_shape(target: Tensor, grouping: str) -> tuple:
    """(B, C) for the channel grouping, (B, P) for the spatial one."""
    second = target.shape[1] if grouping == "channel" else spatial_positions(target)
    return (target.shape[0], second)


def check_inputs(
    op: str, target: Tensor, source: Tensor, grad: Tensor | None = None, grad_shape: tuple | None = None
) -> None:
    """The checks of the kernels (csrc/sqdist_checks.h), raised as the kernels raise them;
    the fake kernels run these under torch.compile or with meta tensors."""
    tensors = (target, source) if grad is None else (grad, target, source)
    devices = {str(t.device) for t in tensors}
    if len(devices) != 1:
        raise RuntimeError(f"{op}: expected all tensors on one device, got {sorted(devices)}")
    if target.dim() < 3 or source.shape != target.shape:
        raise RuntimeError(
            f"{op}: expected target and source of one shape (B, C, *spatial), got "
            f"{tuple(target.shape)} and {tuple(source.shape)}"
        )
    if target.dtype not in FLOAT_DTYPES or source.dtype != target.dtype:
        raise RuntimeError(
            f"{op}: expected float64, float32, bfloat16 or float16 features of one dtype, "
            f"got {target.dtype} and {source.dtype}"
        )
    if grad is not None and (tuple(grad.shape) != grad_shape or not grad.is_floating_point()):
        raise RuntimeError(
            f"{op}: expected a floating-point grad of shape {grad_shape}, got {grad.dtype} of shape {tuple(grad.shape)}"
        )


def check_layers(op: str, targets, sources, grads=None) -> None:
    """The list checks of the multi-layer ops (check_layer_lists in csrc/sqdist_checks.h)."""
    if len(targets) == 0:
        raise RuntimeError(f"{op}: expected at least one layer, got empty lists")
    if len(sources) != len(targets):
        raise RuntimeError(
            f"{op}: expected one source per target, got {len(targets)} targets and {len(sources)} sources"
        )
    if grads is not None and len(grads) != len(targets):
        raise RuntimeError(f"{op}: expected one grad per target, got {len(targets)} targets and {len(grads)} grads")
    first = targets[0]
    for layer, target in enumerate(targets):
        if target.dtype != first.dtype or target.device != first.device:
            raise RuntimeError(
                f"{op}: expected every layer on one device with one dtype, got layer 0 as "
                f"{first.dtype} on {first.device} and layer {layer} as {target.dtype} on {target.device}"
            )


def check_layer_inputs(op: str, targets, sources, grads=None, grouping: str = "channel") -> None:
    """check_layers, then check_inputs for every layer."""
    check_layers(op, targets, sources, grads)
    for layer, (target, source) in enumerate(zip(targets, sources)):
        if grads is None:
            check_inputs(op, target, source)
        else:
            check_inputs(op, target, source, grads[layer], partial_sum_shape(target, grouping))


# Double backward (gradient penalties, meta-learning): the backward dt = 2 g (t - s), g the
# gradient of the partial sums, is linear in g and in t, so for an upstream gradient u of dt
# d/dg = sum over the reduced dims of 2 (t - s) u and d/dt = 2 g u. It is rare, so plain
# PyTorch does it. The source stays a constant.


def _like_features(grad_partial_sums: Tensor, target: Tensor, grouping: str) -> Tensor:
    """A (B, C) gradient as (B, C, 1, ...), or a (B, P) one as (B, 1, *spatial)."""
    if grouping == "channel":
        return grad_partial_sums.reshape(tuple(grad_partial_sums.shape) + (1,) * (target.dim() - 2))
    return grad_partial_sums.reshape((grad_partial_sums.shape[0], 1) + tuple(target.shape[2:]))


def _sum_reduced_dims(values: Tensor, grouping: str) -> Tensor:
    """Features (B, C, *spatial) summed over the spatial dims, or over C: the partial sums' shape."""
    return values.flatten(2).sum(2) if grouping == "channel" else values.sum(1).flatten(1)


def grad_of_backward(grouping: str, grad_partial_sums: Tensor, target: Tensor, source: Tensor, upstream: Tensor):
    """(d/dg, d/dt) of dt = 2 g (t - s), g = ``grad_partial_sums``, for the upstream gradient u of dt."""
    dtype = grad_partial_sums.dtype
    upstream = upstream.to(dtype)
    diff = target.to(dtype) - source.to(dtype)
    d_grad_partial_sums = _sum_reduced_dims(2 * diff * upstream, grouping)
    d_target = (2 * _like_features(grad_partial_sums, target, grouping) * upstream).to(target.dtype)
    return d_grad_partial_sums, d_target


def register_formulas(namespace: str) -> None:
    """Fake kernels and autograd (first and second order) for the eight ops of a library."""
    ops = getattr(torch.ops, namespace)
    for grouping in GROUPINGS:
        _register_single(namespace, ops, grouping)
        _register_multi_layer(namespace, ops, grouping)


def _register_single(namespace: str, ops, grouping: str) -> None:
    name = f"{grouping}_sqdist"
    qualified = f"{namespace}::{name}"
    backward_op = getattr(ops, f"{name}_backward")

    def forward_fake(target: Tensor, source: Tensor) -> Tensor:
        check_inputs(qualified, target, source)
        return target.new_empty(partial_sum_shape(target, grouping), dtype=accumulate_dtype(target.dtype))

    def backward_fake(grad: Tensor, target: Tensor, source: Tensor) -> Tensor:
        check_inputs(f"{qualified}_backward", target, source, grad, partial_sum_shape(target, grouping))
        return torch.empty_like(target)

    def save_features(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def forward_grad(ctx, grad: Tensor):
        target, source = ctx.saved_tensors
        return backward_op(grad, target, source), None

    def backward_grad(ctx, upstream: Tensor):
        grad, target, source = ctx.saved_tensors
        return (*grad_of_backward(grouping, grad, target, source, upstream), None)

    torch.library.register_fake(qualified, forward_fake)
    torch.library.register_fake(f"{qualified}_backward", backward_fake)
    torch.library.register_autograd(qualified, forward_grad, setup_context=save_features)
    torch.library.register_autograd(f"{qualified}_backward", backward_grad, setup_context=save_features)


def _register_multi_layer(namespace: str, ops, grouping: str) -> None:
    name = f"grouped_{grouping}_sqdist"
    qualified = f"{namespace}::{name}"
    backward_op = getattr(ops, f"{name}_backward")

    def forward_fake(targets: list[Tensor], sources: list[Tensor]) -> list[Tensor]:
        check_layer_inputs(qualified, targets, sources)
        return [t.new_empty(partial_sum_shape(t, grouping), dtype=accumulate_dtype(t.dtype)) for t in targets]

    def backward_fake(grads: list[Tensor], targets: list[Tensor], sources: list[Tensor]) -> list[Tensor]:
        check_layer_inputs(f"{qualified}_backward", targets, sources, grads, grouping)
        return [torch.empty_like(t) for t in targets]

    def save_lists(ctx, inputs, output) -> None:
        ctx.layers = len(inputs[-1])
        ctx.save_for_backward(*(tensor for tensors in inputs for tensor in tensors))

    def forward_grad(ctx, grads: list[Tensor]):
        saved, layers = ctx.saved_tensors, ctx.layers
        targets, sources = list(saved[:layers]), list(saved[layers:])
        return backward_op(list(grads), targets, sources), [None] * layers

    def backward_grad(ctx, upstreams: list[Tensor]):
        saved, layers = ctx.saved_tensors, ctx.layers
        d_grads, d_targets = [], []
        for layer, upstream in enumerate(upstreams):
            grad, target, source = saved[layer::layers]
            d_grad, d_target = grad_of_backward(grouping, grad, target, source, upstream)
            d_grads.append(d_grad)
            d_targets.append(d_target)
        return d_grads, d_targets, [None] * layers

    torch.library.register_fake(qualified, forward_fake)
    torch.library.register_fake(f"{qualified}_backward", backward_fake)
    torch.library.register_autograd(qualified, forward_grad, setup_context=save_lists)
    torch.library.register_autograd(f"{qualified}_backward", backward_grad, setup_context=save_lists)
