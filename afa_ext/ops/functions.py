"""The partial sums of every layer as autograd Functions that torch.func can transform.

The ops' own autograd formulas (``formulas.register_formulas``) serve callers of the
ops; torch.func's transforms (``grad``, ``jacrev``, ``vmap`` over a gradient) need
Functions with ``setup_context`` and a ``vmap`` rule, which ``torch.library`` does not
generate. These two Functions call the same ops:

- ``Sqdist``: d[n, j] = sum_p (t - s)^2 (grouping "channel") or e[n, p] = sum_j (t - s)^2
  ("spatial") of each layer, one op call for all layers of one dtype;
- ``SqdistBackward``: dL/dt = 2 g (t - s) of each layer for the gradients g of its
  partial sums, whose own derivatives (d/dg = sum 2 (t - s) u, d/dt = 2 g u) are plain
  PyTorch.

The source gets no gradient. Under ``vmap`` each Function runs its ops once per batch entry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .formulas import grad_of_backward

__all__ = ["layer_partial_sums", "op_library"]


def op_library(backend: str):
    """The torch.library namespace of a compiled backend's ops."""
    return torch.ops.afa_ext_triton if backend == "triton" else torch.ops.afa_ext


def _forward_op(backend: str, grouping: str, targets: list[Tensor], sources: list[Tensor]) -> list[Tensor]:
    ops = op_library(backend)
    if len(targets) == 1:
        return [getattr(ops, f"{grouping}_sqdist")(targets[0], sources[0])]
    return list(getattr(ops, f"grouped_{grouping}_sqdist")(targets, sources))


def _backward_op(
    backend: str, grouping: str, grads: list[Tensor], targets: list[Tensor], sources: list[Tensor]
) -> list[Tensor]:
    ops = op_library(backend)
    if len(targets) == 1:
        return [getattr(ops, f"{grouping}_sqdist_backward")(grads[0], targets[0], sources[0])]
    return list(getattr(ops, f"grouped_{grouping}_sqdist_backward")(grads, targets, sources))


def _below_autograd():
    """A context in which op calls go straight to the backend's kernel: inside a Function's
    forward the Function is the autograd node, and the ops' own autograd kernels (written in
    Python by torch.library) would only check that and redispatch, at tens of us a call."""
    return torch._C._AutoDispatchBelowADInplaceOrView()


def _split(tensors: Sequence[Tensor], parts: int) -> list[list[Tensor]]:
    """``tensors`` cut into ``parts`` equally long lists (targets, sources, ...)."""
    layers = len(tensors) // parts
    return [list(tensors[k * layers : (k + 1) * layers]) for k in range(parts)]


def _loop_over_vmapped_dim(forward, info, in_dims: Sequence, tensors: Sequence[Tensor]):
    """Run ``forward(*tensors) -> tuple of tensors`` once per entry of the vmapped
    dimension and stack the results along dim 0."""
    results = []
    for index in range(info.batch_size):
        entry = [t if dim is None else t.select(dim, index) for t, dim in zip(tensors, in_dims)]
        results.append(forward(*entry))
    outputs = [torch.stack([result[k] for result in results]) for k in range(len(results[0]))]
    return tuple(outputs), tuple(0 for _ in outputs)


def _make_functions(backend: str, grouping: str):
    """The (Sqdist, SqdistBackward) Function classes of one backend and grouping; their
    ``apply`` takes tensors only."""

    class Sqdist(torch.autograd.Function):
        """apply(*targets, *sources) -> one partial-sum tensor per layer."""

        @staticmethod
        def forward(*tensors: Tensor):
            with _below_autograd():
                return tuple(_forward_op(backend, grouping, *_split(tensors, 2)))

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, *grads: Tensor):
            saved = ctx.saved_tensors
            d_targets = SqdistBackward.apply(*grads, *saved)
            return (*d_targets, *([None] * (len(saved) // 2)))

        @staticmethod
        def vmap(info, in_dims, *tensors):
            return _loop_over_vmapped_dim(Sqdist.forward, info, in_dims, tensors)

    class SqdistBackward(torch.autograd.Function):
        """apply(*grads, *targets, *sources) -> dL/dt per layer."""

        @staticmethod
        def forward(*tensors: Tensor):
            with _below_autograd():
                return tuple(_backward_op(backend, grouping, *_split(tensors, 3)))

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, *upstreams: Tensor):
            grads, targets, sources = _split(ctx.saved_tensors, 3)
            d_grads, d_targets = [], []
            for upstream, grad, target, source in zip(upstreams, grads, targets, sources):
                d_grad, d_target = grad_of_backward(grouping, grad, target, source, upstream)
                d_grads.append(d_grad)
                d_targets.append(d_target)
            return (*d_grads, *d_targets, *([None] * len(sources)))

        @staticmethod
        def vmap(info, in_dims, *tensors):
            return _loop_over_vmapped_dim(SqdistBackward.forward, info, in_dims, tensors)

    return Sqdist, SqdistBackward


_FUNCTIONS = {
    (backend, grouping): _make_functions(backend, grouping)
    for backend in ("cpu", "cuda", "triton")
    for grouping in ("channel", "spatial")
}


def layer_partial_sums(
    backend: str, grouping: str, targets: Sequence[Tensor], sources: Sequence[Tensor]
) -> list[Tensor]:
    """The partial sums of each layer (one op call for all), differentiable in the targets,
    also under torch.func transforms. The sources must be detached.

    Under torch.compile the ops are called directly: it traces them, with their own
    autograd formulas, and would not trace these Functions' nested use."""
    if torch.compiler.is_compiling():
        return _forward_op(backend, grouping, list(targets), list(sources))
    return list(_FUNCTIONS[backend, grouping][0].apply(*targets, *sources))
