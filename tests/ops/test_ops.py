"""The compiled ops afa_ext::channel_sqdist / spatial_sqdist and their _backward: values
against the float64 model, torch.library.opcheck, thread-count determinism and
torch.compile(fullgraph=True) through the functional losses. Skipped without afa_ext._C."""

from __future__ import annotations

import pytest
import torch

import float64_model
from loss_cases import (
    OPCHECK_CASES,
    OPCHECK_IDS,
    DTYPES,
    HALF_DTYPES,
    LAYOUT_IDS,
    LAYOUT_PAIRS,
    SHAPES,
    TOLERANCE,
    make_features,
    make_weights,
    needs_cpu,
    relative_error,
    run_loss,
    LOSSES,
)

pytestmark = needs_cpu

OPS = ("channel", "spatial")


def _op(kind, backward=False):
    name = f"{kind}_sqdist" + ("_backward" if backward else "")
    return getattr(torch.ops.afa_ext, name)


def _grad_for(kind, target, generator):
    """A random upstream gradient g for the op's (B, C) or (B, P) output."""
    shape = tuple(target.shape)
    size = shape[1] if kind == "channel" else int(torch.tensor(shape[2:]).prod())
    dtype = torch.float32 if target.dtype in HALF_DTYPES else target.dtype
    return torch.randn(shape[0], size, generator=generator, dtype=torch.float64).to(dtype)


def _op_tolerance(dtype):
    """Outputs accumulate in float32 for half inputs; the backward rounds once to dtype."""
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


def _half_eps(dtype):
    return torch.finfo(dtype).eps if dtype in HALF_DTYPES else TOLERANCE[dtype]


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("ndim", sorted(SHAPES))
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_values(kind, ndim, layouts, dtype):
    generator = torch.Generator().manual_seed(17 * ndim + LAYOUT_PAIRS.index(layouts))
    target, source = make_features(SHAPES[ndim], dtype, *layouts, generator)
    target, source = target.detach(), source.detach()
    out = _op(kind)(target, source)
    expected = float64_model.partial_sums(kind, target, source)
    assert out.dtype == (torch.float32 if dtype in HALF_DTYPES else dtype)
    assert out.shape == expected.shape
    assert relative_error(out, expected) <= _op_tolerance(dtype)

    grad = _grad_for(kind, target, generator)
    dt = _op(kind, backward=True)(grad, target, source)
    assert dt.dtype == dtype and dt.shape == target.shape
    assert relative_error(dt, float64_model.partial_sums_backward(kind, grad, target, source)) <= _half_eps(dtype)


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_empty_inputs(kind, dtype):
    for shape in [(0, 3, 4), (2, 0, 4, 5), (2, 3, 0)]:
        target = torch.zeros(shape, dtype=dtype)
        out = _op(kind)(target, target)
        assert out.shape == float64_model.partial_sums(kind, target, target).shape
        assert bool((out == 0).all())
        grad = _grad_for(kind, target, torch.Generator().manual_seed(0))
        assert _op(kind, backward=True)(grad, target, target).shape == shape


@pytest.mark.parametrize("kind", OPS)
def test_op_bad_input_raises(kind):
    """Called directly, the ops check their arguments instead of crashing."""
    op, backward = _op(kind), _op(kind, backward=True)
    name = f"afa_ext::{kind}_sqdist"
    t = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match=f"{name}: expected target of shape .* at least 3 dims, got \\[2, 3\\]"):
        op(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(RuntimeError, match=f"{name}: expected source to have the shape of target"):
        op(t, torch.randn(2, 3, 4, 6))
    with pytest.raises(RuntimeError, match=f"{name}: expected .*features, got Long"):
        op(t.long(), t.long())
    with pytest.raises(RuntimeError, match=f"{name}: expected source of dtype Float like target, got Double"):
        op(t, t.double())
    grad_shape = (2, 3) if kind == "channel" else (2, 20)
    with pytest.raises(RuntimeError, match=f"{name}_backward: expected grad of shape"):
        backward(torch.randn(2, 7), t, t)
    with pytest.raises(RuntimeError, match=f"{name}_backward: expected a floating-point grad"):
        backward(torch.ones(grad_shape, dtype=torch.int64), t, t)


@pytest.mark.parametrize("kind", OPS)
def test_op_device_mismatch_raises(kind):
    """A cpu target with a meta source must not dispatch to the fake kernel and hand back
    an uninitialised cpu tensor."""
    op, backward = _op(kind), _op(kind, backward=True)
    t = torch.randn(2, 3, 4, 5)
    grad = torch.randn((2, 3) if kind == "channel" else (2, 20))
    with pytest.raises(RuntimeError, match="device"):
        op(t, t.to("meta"))
    with pytest.raises(RuntimeError, match="device"):
        backward(grad, t, t.to("meta"))


# --------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("shape,dtype,layout", OPCHECK_CASES, ids=OPCHECK_IDS)
def test_opcheck_forward(kind, shape, dtype, layout):
    generator = torch.Generator().manual_seed(23)
    target, source = make_features(shape, dtype, layout, layout, generator)
    source = source.detach()
    torch.library.opcheck(_op(kind), (target, source))


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("shape,dtype,layout", OPCHECK_CASES, ids=OPCHECK_IDS)
def test_opcheck_backward(kind, shape, dtype, layout):
    generator = torch.Generator().manual_seed(29)
    target, source = make_features(shape, dtype, layout, layout, generator)
    target, source = target.detach().requires_grad_(True), source.detach()
    grad = _grad_for(kind, target, generator).requires_grad_(True)  # the op has a double backward
    torch.library.opcheck(_op(kind, backward=True), (grad, target, source))


# --------------------------------------------------------------------------- threads

THREAD_CASES = [
    ((2, 3, 70000), "contiguous"),  # long P: a reduction that could be split
    ((1, 4000, 50), "contiguous"),  # long C
    ((4, 64, 30, 30), "channels_last"),
    ((3, 16, 9, 20, 20), "cropped"),
]


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("shape,layout", THREAD_CASES, ids=[str(s) for s, _ in THREAD_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ops_bitwise_equal_across_thread_counts(kind, shape, layout, dtype):
    generator = torch.Generator().manual_seed(31)
    target, source = make_features(shape, dtype, layout, layout, generator)
    target, source = target.detach(), source.detach()
    grad = _grad_for(kind, target, generator)
    previous = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results[threads] = (_op(kind)(target, source), _op(kind, backward=True)(grad, target, source))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[1][0], results[2][0]), "forward differs between 1 and 2 threads"
    assert torch.equal(results[1][1], results[2][1]), "backward differs between 1 and 2 threads"


# --------------------------------------------------------------------------- compile

COMPILE_CASES = [
    (LOSSES[2], (3, 8, 5, 7), torch.float32, "channels_last"),  # ACT
    (LOSSES[4], (2, 6, 9, 5), torch.bfloat16, "cropped"),  # AST, attention (B, 1, H, W)
]


@pytest.mark.parametrize("case,shape,dtype,layout", COMPILE_CASES, ids=[c[0].id for c in COMPILE_CASES])
def test_compile_fullgraph_matches_eager(case, shape, dtype, layout):
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(37)
    target, source = make_features(shape, dtype, layout, layout, generator)
    weights = make_weights(case.weights, shape, dtype, generator)

    def loss_fn(t, s, w):
        return case.function(t, s, w, backend="cpu")

    compiled = torch.compile(loss_fn, fullgraph=True)
    eager = run_loss(case, target, source, weights, backend="cpu")

    t, w = target.detach().requires_grad_(True), weights.detach().requires_grad_(True)
    loss = compiled(t, source.detach(), w)
    (loss * 1.7).backward()
    assert loss.dtype == eager[0].dtype
    # The tiny weight maths may be fused or reordered by inductor: float32 rounding only.
    torch.testing.assert_close(loss.detach(), eager[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(t.grad, eager[1])
    torch.testing.assert_close(w.grad, eager[2])


# --------------------------------------------------------------------------- fake kernels


def test_fake_kernels_refuse_what_the_cpu_kernels_refuse():
    """On meta tensors (and under torch.compile) the fake kernels run: they must reject a
    non-float dtype and a grad of the wrong shape as the C++ kernels do."""
    integers = torch.ones(2, 3, 4, 5, dtype=torch.long, device="meta")
    features = integers.float()
    with pytest.raises(RuntimeError, match=r"expected float64, float32, bfloat16 or float16 features.*int64"):
        torch.ops.afa_ext.spatial_sqdist(integers, integers)
    with pytest.raises(RuntimeError, match=r"grad of shape \(2, 3\), got torch.float32 of shape \(2, 4\)"):
        torch.ops.afa_ext.channel_sqdist_backward(torch.ones(2, 4, device="meta"), features, features)
    with pytest.raises(RuntimeError, match=r"grad of shape \(2, 20\), got torch.float32 of shape \(2, 3\)"):
        torch.ops.afa_ext.spatial_sqdist_backward(torch.ones(2, 3, device="meta"), features, features)
