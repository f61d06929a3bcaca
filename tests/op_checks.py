"""Checks shared by the tests of each backend's op library (the ops of
afa_ext/ops/schemas.py): a random upstream gradient, the tolerances, and one op pair
(forward and backward) against the float64 model, and features far apart in memory."""

from __future__ import annotations

import math

import pytest

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


def check_multi_layer_gradients(ops, grouping, targets, sources):
    """gradcheck and gradgradcheck of ``ops.grouped_<grouping>_sqdist`` in the targets
    (float64 layers)."""
    targets = [t.detach().requires_grad_(True) for t in targets]
    op = getattr(ops, f"grouped_{grouping}_sqdist")

    def partial_sums(*layer_targets):
        return tuple(op(list(layer_targets), sources))

    assert torch.autograd.gradcheck(partial_sums, tuple(targets))
    assert torch.autograd.gradgradcheck(partial_sums, tuple(targets))


def layer_weights(name, targets, generator, requires_grad=False):
    """Softmax weights of the shape the loss ``name`` asks for, one per layer, on each
    layer's device: (C,) for delta_loss, (B, C) channel attention, (B, P) spatial attention
    (and a (1,) placeholder for feature_map_loss, which takes none)."""
    weights = []
    for target in targets:
        batch, channels, positions = target.shape[0], target.shape[1], math.prod(target.shape[2:])
        size = {
            "delta_loss": (channels,),
            "channel_attentive_loss": (batch, channels),
            "spatial_attentive_loss": (batch, positions),
        }.get(name, (1,))
        weight = torch.rand(size, generator=generator).softmax(-1).to(target.device)
        weights.append(weight.requires_grad_(requires_grad))
    return weights


def check_list_loss(name, targets, sources, weights, backend, tolerance=2e-5):
    """The functional loss ``name`` given lists of layers equals the sum of the reference
    loss over the layers, in value and in the gradients of the leaves that require one."""
    from afa_ext import functional

    function = getattr(functional, name)
    extra = () if name == "feature_map_loss" else (weights,)
    leaves = [t for t in targets + (weights if extra else []) if t.requires_grad]
    loss = function(targets, sources, *extra, backend=backend)
    expected = sum(
        function(t, s, *((w,) if extra else ()), backend="reference") for t, s, w in zip(targets, sources, weights)
    )
    assert relative_error(loss.detach(), expected.detach()) <= tolerance
    if leaves:
        for actual, wanted in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
            assert relative_error(actual, wanted) <= tolerance


# 64-bit indexing: the features are a few elements of a 4 GiB (virtual) storage, placed with
# as_strided at both ends of it; untouched pages are never backed by memory.
FAR = 2**31 + 5  # elements between the two channels: more than a 32-bit offset can hold
POSITIONS = 48


def far_apart_features(seed: int):
    """(1, 2, POSITIONS) bfloat16 features whose channel 1 starts FAR elements after channel 0."""
    try:
        storage = torch.empty(FAR + POSITIONS, dtype=torch.bfloat16)
    except RuntimeError as error:  # a machine that will not even reserve 4 GiB of addresses
        pytest.skip(f"cannot reserve 4 GiB of address space: {error}")
    generator = torch.Generator().manual_seed(seed)
    near = torch.randn(POSITIONS, generator=generator).bfloat16()
    far = (torch.randn(POSITIONS, generator=generator) + 3).bfloat16()
    storage[:POSITIONS] = near
    storage[FAR:] = far
    features = storage.as_strided((1, 2, POSITIONS), (0, FAR, 1))
    dense = torch.stack([near, far]).unsqueeze(0)
    return features, dense


def check_ops_read_beyond_2_31(ops, backward_rtol=0.0):
    """The forward ops and the channel backward of an op library (torch.ops.<namespace>)
    on features whose channels lie FAR elements apart, against a dense copy."""
    target, dense_target = far_apart_features(0)
    source, dense_source = far_apart_features(1)
    diff = dense_target.double() - dense_source.double()
    torch.testing.assert_close(ops.channel_sqdist(target, source).double(), (diff**2).sum(2), rtol=1e-5, atol=0)
    torch.testing.assert_close(ops.spatial_sqdist(target, source).double(), (diff**2).sum(1), rtol=1e-5, atol=0)
    grad = torch.tensor([[0.5, 2.0]])
    dt = ops.channel_sqdist_backward(grad, target, source)
    expected = (2 * grad[:, :, None].double() * diff).bfloat16().double()
    torch.testing.assert_close(dt.double(), expected, rtol=backward_rtol, atol=0)


# ----------------------------------------- layouts beyond the CUDA kernels' layer descriptor


def stored_in_order(values, order, cropped):
    """``values`` in a storage whose dims go in ``order`` (outermost first), each spatial
    dim cropped by one (NaN around it) when ``cropped``."""
    margin = int(cropped)
    padded = torch.full(
        [values.shape[d] + (margin if d >= 2 else 0) for d in order],
        float("nan"),
        dtype=values.dtype,
        device=values.device,
    )
    view = padded.permute([order.index(d) for d in range(values.dim())])
    view = view[(slice(None), slice(None)) + (slice(margin, None),) * (values.dim() - 2)]
    view.copy_(values)
    return view


CHANNELS_LAST_5D, CHANNELS_LAST_6D, SCRAMBLED_7D = (0, 2, 3, 4, 1), (0, 2, 3, 4, 5, 1), (0, 1, 5, 3, 6, 2, 4)
# (grouping, shape, target storage order, source storage order, cropped): plans with more
# outer dims than a CUDA LayerDesc holds (cropped dims do not merge, nor do dims stored in
# another order in the source), so the host code walks dense copies and copies dt back
# into empty_like(target)'s layout (tests/ops/test_cuda_emulated.py checks each does).
UNFITTING_LAYERS = [
    ("spatial", (2, 3, 3, 4, 5), CHANNELS_LAST_5D, CHANNELS_LAST_5D, True),
    ("spatial", (2, 3, 3, 4, 5), CHANNELS_LAST_5D, tuple(range(5)), True),
    ("channel", (2, 3, 2, 3, 2, 3), CHANNELS_LAST_6D, CHANNELS_LAST_6D, True),
    ("spatial", (2, 3, 2, 3, 2, 3), tuple(range(6)), tuple(range(6)), True),
    ("channel", (2, 3, 2, 3, 2, 3, 2), SCRAMBLED_7D, tuple(range(7)), False),
    ("spatial", (2, 3, 2, 3, 2, 3, 2), SCRAMBLED_7D, tuple(range(7)), False),
]


def _order_name(order):
    return "contiguous" if order == tuple(range(len(order))) else "channels_last" if order[-1] == 1 else "scrambled"


UNFITTING_IDS = [
    f"{grouping}-{len(shape)}d-{_order_name(t)}-vs-{_order_name(s)}{'-cropped' if cropped else ''}"
    for grouping, shape, t, s, cropped in UNFITTING_LAYERS
]
