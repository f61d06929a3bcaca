"""The compiled ops of afa_ext._C: loading, fake (meta) kernels and autograd formulas.

The C++ library declares (csrc/ops.cpp), for features t, s of shape (B, C, *spatial)
with P spatial positions:

- ``afa_ext::channel_sqdist(t, s) -> d``, d[n, j] = sum_p (t - s)^2, shape (B, C)
- ``afa_ext::spatial_sqdist(t, s) -> e``, e[n, p] = sum_j (t - s)^2, shape (B, P)
- ``afa_ext::channel_sqdist_backward(g, t, s)``, dt = 2 * g[n, j] * (t - s)
- ``afa_ext::spatial_sqdist_backward(g, t, s)``, dt = 2 * g[n, p] * (t - s)

and ``grouped_<op>`` of each, which take the lists of target and source maps (and
grads) of all hooked layers of a model, one dtype and device, and return one result per
layer: one kernel launch per pass on a GPU instead of one per layer.

d and e are float32 for half features, else the features' dtype. The source gets no
gradient. The backward re-reads t and s instead of holding anything between passes.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import List, Optional

import torch
from torch import Tensor

from ._validation import FLOAT_DTYPES, spatial_positions


def _unsupported_cpu_isa() -> Optional[str]:
    """The instruction set afa_ext._C was compiled for when this CPU lacks it (its code
    would die on an illegal instruction, so it must not even be loaded), else None."""
    try:
        from ._build_config import CPU_ISA
    except ImportError:  # not built: importing _C below says so
        return None
    supported = {
        "avx2": getattr(torch.cpu, "_is_avx2_supported", lambda: True),
        "avx512": getattr(torch.cpu, "_is_avx512_supported", lambda: True),
    }
    return CPU_ISA if not supported.get(CPU_ISA, lambda: True)() else None


_C = None
_LOAD_ERROR: Optional[str] = None
_MISSING_ISA = _unsupported_cpu_isa()
if _MISSING_ISA is not None:
    _LOAD_ERROR = (
        f"afa_ext._C was compiled for {_MISSING_ISA} instructions, which this CPU "
        "lacks; rebuild it here (AFA_EXT_CPU_ISA=default makes a build for any x86-64 CPU)"
    )
else:
    try:
        from . import _C  # noqa: F401  (loading it registers the ops)
    except ImportError as error:  # the extension is optional: the reference backend still works
        _LOAD_ERROR = f"{type(error).__name__}: {error}"


def extension_error() -> Optional[str]:
    """None when afa_ext._C loaded, else why it did not."""
    return _LOAD_ERROR


def build_info() -> dict:
    """How afa_ext._C was built (torch version, CUDA archs, OpenMP), {} when not loaded."""
    return dict(_C.build_info()) if _C is not None else {}


def empty_cache() -> int:
    """Hands the CPU backward's cached gradient blocks back to the system.

    The cpu backend keeps the storage of dead gradients above 32 MiB (up to 1 GiB in all)
    to write the next step's gradient into memory that is already mapped. Returns the
    number of bytes freed (0 when afa_ext._C is not loaded).
    """
    return int(_C.empty_cache()) if _C is not None else 0


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_fake_inputs(op: str, target: Tensor, source: Tensor, grad: Optional[Tensor] = None,
                       grad_shape: Optional[tuple] = None) -> None:
    """The checks of the C++ kernels (csrc/sqdist_checks.h), for the fake (meta) kernels:
    under torch.compile, or with a meta tensor mixed with real ones, these run instead."""
    tensors = (target, source) if grad is None else (grad, target, source)
    devices = {str(t.device) for t in tensors}
    if len(devices) != 1:
        raise RuntimeError(f"afa_ext::{op}: expected all tensors on one device, got {sorted(devices)}")
    if target.dim() < 3 or source.shape != target.shape:
        raise RuntimeError(
            f"afa_ext::{op}: expected target and source of one shape (B, C, *spatial), got "
            f"{tuple(target.shape)} and {tuple(source.shape)}"
        )
    if target.dtype not in FLOAT_DTYPES or source.dtype != target.dtype:
        raise RuntimeError(
            f"afa_ext::{op}: expected float64, float32, bfloat16 or float16 features of one dtype, "
            f"got {target.dtype} and {source.dtype}"
        )
    if grad is not None and (tuple(grad.shape) != grad_shape or not grad.is_floating_point()):
        raise RuntimeError(
            f"afa_ext::{op}: expected a floating-point grad of shape {grad_shape}, got "
            f"{grad.dtype} of shape {tuple(grad.shape)}"
        )


def _check_fake_layers(op: str, targets, sources, grads=None) -> None:
    """The list checks of the grouped C++ ops (check_layer_lists), for their fake kernels."""
    if len(targets) == 0:
        raise RuntimeError(f"afa_ext::{op}: expected at least one layer, got empty lists")
    if len(sources) != len(targets):
        raise RuntimeError(
            f"afa_ext::{op}: expected one source per target, got {len(targets)} targets and "
            f"{len(sources)} sources"
        )
    if grads is not None and len(grads) != len(targets):
        raise RuntimeError(
            f"afa_ext::{op}: expected one grad per target, got {len(targets)} targets and {len(grads)} grads"
        )
    first = targets[0]
    for layer, target in enumerate(targets):
        if target.dtype != first.dtype or target.device != first.device:
            raise RuntimeError(
                f"afa_ext::{op}: expected every layer on one device with one dtype, got layer 0 as "
                f"{first.dtype} on {first.device} and layer {layer} as {target.dtype} on {target.device}"
            )


def _channel_shape(target: Tensor) -> tuple:
    return (target.shape[0], target.shape[1])


def _spatial_shape(target: Tensor) -> tuple:
    return (target.shape[0], spatial_positions(target))


if _C is not None:

    @torch.library.register_fake("afa_ext::channel_sqdist")
    def _channel_sqdist_fake(target: Tensor, source: Tensor) -> Tensor:
        _check_fake_inputs("channel_sqdist", target, source)
        return target.new_empty(_channel_shape(target), dtype=accumulate_dtype(target.dtype))

    @torch.library.register_fake("afa_ext::spatial_sqdist")
    def _spatial_sqdist_fake(target: Tensor, source: Tensor) -> Tensor:
        _check_fake_inputs("spatial_sqdist", target, source)
        return target.new_empty(_spatial_shape(target), dtype=accumulate_dtype(target.dtype))

    @torch.library.register_fake("afa_ext::channel_sqdist_backward")
    def _channel_sqdist_backward_fake(grad: Tensor, target: Tensor, source: Tensor) -> Tensor:
        _check_fake_inputs("channel_sqdist_backward", target, source, grad, _channel_shape(target))
        return torch.empty_like(target)

    @torch.library.register_fake("afa_ext::spatial_sqdist_backward")
    def _spatial_sqdist_backward_fake(grad: Tensor, target: Tensor, source: Tensor) -> Tensor:
        _check_fake_inputs("spatial_sqdist_backward", target, source, grad, _spatial_shape(target))
        return torch.empty_like(target)

    def _save_features(ctx, inputs, output) -> None:
        target, source = inputs
        ctx.save_for_backward(target, source)

    def _channel_sqdist_grad(ctx, grad: Tensor):
        target, source = ctx.saved_tensors
        return torch.ops.afa_ext.channel_sqdist_backward(grad, target, source), None

    def _spatial_sqdist_grad(ctx, grad: Tensor):
        target, source = ctx.saved_tensors
        return torch.ops.afa_ext.spatial_sqdist_backward(grad, target, source), None

    torch.library.register_autograd(
        "afa_ext::channel_sqdist", _channel_sqdist_grad, setup_context=_save_features
    )
    torch.library.register_autograd(
        "afa_ext::spatial_sqdist", _spatial_sqdist_grad, setup_context=_save_features
    )

    # Double backward (gradient penalties, meta-learning): dt = 2 w (t - s) is linear in w
    # and in t, so d/dw = sum over the reduced dims of 2 (t - s) u and d/dt = 2 w u for an
    # upstream u. It is rare, so plain PyTorch does it. The source stays a constant.

    def _weights_like_features(weights: Tensor, target: Tensor, channel: bool) -> Tensor:
        """(B, C) weights as (B, C, 1, ...), or (B, P) weights as (B, 1, *spatial)."""
        if channel:
            return weights.reshape(tuple(weights.shape) + (1,) * (target.dim() - 2))
        return weights.reshape((weights.shape[0], 1) + tuple(target.shape[2:]))

    def _sum_to_weights(values: Tensor, channel: bool) -> Tensor:
        """Features (B, C, *spatial) summed over the spatial dims, or over C."""
        return values.flatten(2).sum(2) if channel else values.sum(1).flatten(1)

    def _save_backward_inputs(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def _sqdist_backward_grad(channel: bool):
        def grad_of_backward(ctx, upstream: Tensor):
            weights, target, source = ctx.saved_tensors
            upstream = upstream.to(weights.dtype)
            diff = target.to(weights.dtype) - source.to(weights.dtype)
            d_weights = _sum_to_weights(2 * diff * upstream, channel)
            d_target = (2 * _weights_like_features(weights, target, channel) * upstream).to(target.dtype)
            return d_weights, d_target, None

        return grad_of_backward

    torch.library.register_autograd(
        "afa_ext::channel_sqdist_backward", _sqdist_backward_grad(True), setup_context=_save_backward_inputs
    )
    torch.library.register_autograd(
        "afa_ext::spatial_sqdist_backward", _sqdist_backward_grad(False), setup_context=_save_backward_inputs
    )

    def _grouped_forward_fake(op: str, shape_of):
        def fake(targets: List[Tensor], sources: List[Tensor]) -> List[Tensor]:
            _check_fake_layers(op, targets, sources)
            for target, source in zip(targets, sources):
                _check_fake_inputs(op, target, source)
            return [t.new_empty(shape_of(t), dtype=accumulate_dtype(t.dtype)) for t in targets]

        return fake

    def _grouped_backward_fake(op: str, shape_of):
        def fake(grads: List[Tensor], targets: List[Tensor], sources: List[Tensor]) -> List[Tensor]:
            _check_fake_layers(op, targets, sources, grads)
            for grad, target, source in zip(grads, targets, sources):
                _check_fake_inputs(op, target, source, grad, shape_of(target))
            return [torch.empty_like(t) for t in targets]

        return fake

    for _grouping, _shape_of in (("channel", _channel_shape), ("spatial", _spatial_shape)):
        _op = f"grouped_{_grouping}_sqdist"
        torch.library.register_fake(f"afa_ext::{_op}", _grouped_forward_fake(_op, _shape_of))
        torch.library.register_fake(
            f"afa_ext::{_op}_backward", _grouped_backward_fake(f"{_op}_backward", _shape_of)
        )

    def _save_layer_lists(ctx, inputs, output) -> None:
        targets, sources = inputs
        ctx.layers = len(targets)
        ctx.save_for_backward(*targets, *sources)

    def _grouped_sqdist_grad(backward_op):
        def grad_of_grouped(ctx, grads: List[Tensor]):
            saved = ctx.saved_tensors
            targets, sources = list(saved[: ctx.layers]), list(saved[ctx.layers:])
            return backward_op(list(grads), targets, sources), [None] * ctx.layers

        return grad_of_grouped

    torch.library.register_autograd(
        "afa_ext::grouped_channel_sqdist",
        _grouped_sqdist_grad(torch.ops.afa_ext.grouped_channel_sqdist_backward),
        setup_context=_save_layer_lists,
    )
    torch.library.register_autograd(
        "afa_ext::grouped_spatial_sqdist",
        _grouped_sqdist_grad(torch.ops.afa_ext.grouped_spatial_sqdist_backward),
        setup_context=_save_layer_lists,
    )

    def _save_grouped_backward_inputs(ctx, inputs, output) -> None:
        grads, targets, sources = inputs
        ctx.layers = len(targets)
        ctx.save_for_backward(*grads, *targets, *sources)

    def _grouped_sqdist_backward_grad(channel: bool):
        layer_grad = _sqdist_backward_grad(channel)

        def grad_of_grouped_backward(ctx, upstreams: List[Tensor]):
            saved, layers = ctx.saved_tensors, ctx.layers
            d_grads, d_targets = [], []
            for layer, upstream in enumerate(upstreams):
                one_layer = SimpleNamespace(saved_tensors=saved[layer::layers])
                d_grad, d_target, _ = layer_grad(one_layer, upstream)
                d_grads.append(d_grad)
                d_targets.append(d_target)
            return d_grads, d_targets, [None] * layers

        return grad_of_grouped_backward

    torch.library.register_autograd(
        "afa_ext::grouped_channel_sqdist_backward",
        _grouped_sqdist_backward_grad(True),
        setup_context=_save_grouped_backward_inputs,
    )
    torch.library.register_autograd(
        "afa_ext::grouped_spatial_sqdist_backward",
        _grouped_sqdist_backward_grad(False),
        setup_context=_save_grouped_backward_inputs,
    )
