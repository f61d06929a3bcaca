"""Checks shared by the tests of each backend's op library (the ops of
afa_ext/_op_formulas.py): a random upstream gradient, the tolerances, and one op pair
(forward and backward) against the float64 model."""
from __future__ import annotations

import math

import torch

import float64_model
from loss_cases import HALF_DTYPES, TOLERANCE, relative_error


def grad_for(grouping, target, generator):
    """A random upstream gradient of the (B, C) or (B, P) partial sums, on target's device."""
    size = target.shape[1] if grouping == "channel" else math.prod(target.shape[2:])
    dtype = torch.float32 if target.dtype in HALF_DTYPES else target.dtype
    values = torch.randn(target.shape[0], size, generator=generator, dtype=torch.float64)
    return values.to(target.device, dtype)


def forward_tolerance(dtype):
    """Partial sums accumulate exactly-converted inputs in float32 (float64 for float64)."""
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


def backward_tolerance(dtype):
    """dt is rounded once to the features' dtype."""
    return torch.finfo(dtype).eps if dtype in HALF_DTYPES else TOLERANCE[dtype]


def check_op_pair(ops, grouping, target, source, generator):
    """``ops.<grouping>_sqdist`` and its backward against the float64 model: values,
    dtypes, shapes, and a dense layout of the target kept by the gradient."""
    dtype = target.dtype
    out = getattr(ops, f"{grouping}_sqdist")(target, source)
    expected = float64_model.partial_sums(grouping, target, source)
    assert out.dtype == (torch.float32 if dtype in HALF_DTYPES else dtype)
    assert out.shape == expected.shape and out.device == target.device
    assert relative_error(out.cpu(), expected) <= forward_tolerance(dtype)

    grad = grad_for(grouping, target, generator)
    dt = getattr(ops, f"{grouping}_sqdist_backward")(grad, target, source)
    assert dt.dtype == dtype and dt.shape == target.shape
    if target.dim() == 4 and target.is_contiguous(memory_format=torch.channels_last):
        assert dt.stride() == target.stride(), "the gradient keeps a dense layout of the target"
    model = float64_model.partial_sums_backward(grouping, grad, target, source)
    assert relative_error(dt.cpu(), model) <= backward_tolerance(dtype)
