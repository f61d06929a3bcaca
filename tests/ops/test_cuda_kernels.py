"""The hand-written CUDA kernels (csrc/cuda/) of the eight afa_ext ops: values against the
float64 model in every dtype and layout, odd shapes, multi-layer launches, gradcheck and
gradgradcheck, determinism, opcheck and errors on CUDA tensors.

All but the first test need a CUDA device; the first checks, on any machine, that a build
with CUDA kernels registered them for every op.
"""

from __future__ import annotations

import pytest
import torch

import afa_ext
import float64_model
from loss_cases import (
    OPCHECK_CASES,
    OPCHECK_IDS,
    DTYPES,
    LAYOUT_IDS,
    LAYOUT_PAIRS,
    SHAPES,
    make_features,
    relative_error,
)
from op_checks import backward_tolerance as _backward_tolerance
from op_checks import UNFITTING_IDS, UNFITTING_LAYERS, check_op_pair, grad_for, stored_in_order
from op_checks import forward_tolerance as _forward_tolerance

OP_NAMES = [
    f"{prefix}{grouping}_sqdist{backward}"
    for prefix in ("", "grouped_")
    for grouping in ("channel", "spatial")
    for backward in ("", "_backward")
]
GROUPINGS = ("channel", "spatial")
HAS_CUDA_KERNELS = torch.cuda.is_available() and "cuda" in afa_ext.available_backends()
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA_KERNELS, reason="needs a CUDA device and afa_ext._C built with its CUDA kernels"
)
OPS = torch.ops.afa_ext
# Four layers shaped like ResNet's hooked ones (C x4, side /2 per stage), scaled down.
RESNET_LIKE = [(3, 8, 24, 24), (3, 16, 12, 12), (3, 32, 6, 6), (3, 64, 3, 3)]


@pytest.mark.skipif(not afa_ext.build_info().get("cuda_archs"), reason="afa_ext._C was built without CUDA kernels")
@pytest.mark.parametrize("name", OP_NAMES)
def test_cuda_build_registers_every_op(name):
    """Runs without a GPU: a build that compiled csrc/cuda/ must have registered them."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"afa_ext::{name}", "CUDA")


# --------------------------------------------------------------------------- helpers


def _features(shape, dtype, layouts=("contiguous", "contiguous"), seed=0):
    target, source = make_features(shape, dtype, *layouts, torch.Generator().manual_seed(seed), device="cuda")
    return target.detach(), source.detach()


def _grad_for(grouping, target, seed=0):
    """A random upstream gradient of the (B, C) or (B, P) partial sums, on the GPU."""
    return grad_for(grouping, target, torch.Generator().manual_seed(seed))


def _check_op_pair(grouping, target, source, seed=0):
    """Forward and backward of one layer against the model (op_checks.check_op_pair); the
    gradient laid out as empty_like(target), and the backward (one rounding of the same
    formula) bit for bit equal to the CPU kernel's."""
    check_op_pair(OPS, grouping, target, source, torch.Generator().manual_seed(seed))
    grad = _grad_for(grouping, target, seed)
    dt = getattr(OPS, f"{grouping}_sqdist_backward")(grad, target, source)
    assert dt.device == target.device and dt.stride() == torch.empty_like(target).stride()
    on_cpu = getattr(OPS, f"{grouping}_sqdist_backward")(grad.cpu(), target.cpu(), source.cpu())
    assert torch.equal(dt.cpu(), on_cpu)


def _misaligned(values):
    """``values`` stored one element past a 16-byte boundary: the kernels' scalar path."""
    storage = torch.full((values.numel() + 1,), float("nan"), dtype=values.dtype, device=values.device)
    view = storage[1:].view(values.shape)
    view.copy_(values)
    return view


# --------------------------------------------------------------------------- single ops


@needs_cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("ndim", sorted(SHAPES))
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_values_in_every_layout_and_dtype(grouping, ndim, layouts, dtype):
    target, source = _features(SHAPES[ndim], dtype, layouts, seed=17 * ndim + LAYOUT_PAIRS.index(layouts))
    _check_op_pair(grouping, target, source, seed=ndim)


ODD_SHAPES = [
    (2, 8, 7, 7),  # P = 49: rows of 196 bytes (float), not 16-byte aligned
    (2, 16, 14, 14),  # P = 196: aligned for float, not for half
    (2, 16, 28, 28),
    (2, 4, 1, 1),  # 1x1 spatial
    (2, 1, 5, 6),  # C = 1
    (1, 3, 4, 4),  # B = 1
    (3, 5, 5, 5),  # nothing aligned
    (2, 12, 6, 4),
    (2, 3, 7000),  # long rows: a row's threads span warps
    (1, 400, 50),  # long columns: many slices of the reduced rows
    (1, 2, 3, 20000),  # a row cut into several backward tiles
    (1, 1, 1, 1),
    (2, 3, 1, 1, 1),
]


@needs_cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "cropped"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_odd_shapes(grouping, shape, layout, dtype):
    target, source = _features(shape, dtype, (layout, layout), seed=5)
    _check_op_pair(grouping, target, source)


@needs_cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    "index",
    [(Ellipsis, slice(0, 13)), (slice(None), slice(0, 11)), (slice(None), slice(0, 9), slice(None), slice(0, 3))],
    ids=["last-13-of-16", "channels-11-of-16", "both"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_aligned_rows_with_a_tail(grouping, memory_format, index, dtype):
    """Slices whose rows start 16-byte aligned but end mid-chunk: 16-byte loads, then a tail."""
    generator = torch.Generator().manual_seed(7)
    bases = [
        torch.randn(3, 16, 5, 16, generator=generator, dtype=torch.float64)
        .to("cuda", dtype)
        .contiguous(memory_format=memory_format)
        for _ in range(2)
    ]
    _check_op_pair(grouping, bases[0][index], bases[1][index])


@needs_cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_misaligned_base_pointer(grouping, dtype):
    target, source = _features((2, 8, 8, 8), dtype)
    _check_op_pair(grouping, _misaligned(target), source)
    _check_op_pair(grouping, target, _misaligned(source))


def _copied_layer(case, seed=0):
    _, shape, target_order, source_order, cropped = case
    target, source = _features(shape, torch.float32, seed=seed)
    return stored_in_order(target, target_order, cropped), stored_in_order(source, source_order, cropped)


@needs_cuda
@pytest.mark.parametrize("case", UNFITTING_LAYERS, ids=UNFITTING_IDS)
def test_op_features_with_many_unmergeable_dims(case):
    """More outer dims than a layer descriptor holds: the dense copies' gradient comes back
    in the fake's layout, torch.empty_like(target)."""
    _check_op_pair(case[0], *_copied_layer(case))


@needs_cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_multi_layer_ops_with_copied_layers(grouping):
    layers = [_copied_layer(case, seed) for seed, case in enumerate(UNFITTING_LAYERS) if case[0] == grouping]
    layers.insert(1, _features((2, 8, 6, 5), torch.float32, ("channels_last", "cropped"), seed=9))
    targets, sources = [t for t, _ in layers], [s for _, s in layers]
    grads = [_grad_for(grouping, target, seed) for seed, target in enumerate(targets)]
    gradients = getattr(OPS, f"grouped_{grouping}_sqdist_backward")(grads, targets, sources)
    for dt, grad, target, source in zip(gradients, grads, targets, sources):
        assert dt.stride() == torch.empty_like(target).stride()
        assert torch.equal(dt, getattr(OPS, f"{grouping}_sqdist_backward")(grad, target, source))


@needs_cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_empty_inputs(grouping, dtype):
    for shape in [(0, 3, 4), (2, 0, 4, 5), (2, 3, 0)]:
        target = torch.zeros(shape, dtype=dtype, device="cuda")
        out = getattr(OPS, f"{grouping}_sqdist")(target, target)
        assert out.shape == float64_model.partial_sums(grouping, target, target).shape and bool((out == 0).all())
        dt = getattr(OPS, f"{grouping}_sqdist_backward")(_grad_for(grouping, target), target, target)
        assert dt.shape == shape and dt.device == target.device


@needs_cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_op_grad_of_another_dtype_and_layout(grouping):
    """The upstream gradient is converted to the accumulation type and made contiguous."""
    target, source = _features((2, 6, 5, 4), torch.float16)
    grad = _grad_for(grouping, target).double().t().contiguous().t()  # float64, column-major
    dt = getattr(OPS, f"{grouping}_sqdist_backward")(grad, target, source)
    expected = float64_model.partial_sums_backward(grouping, grad.float(), target, source)
    assert relative_error(dt.cpu(), expected) <= _backward_tolerance(torch.float16)


@needs_cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_op_runs_on_the_current_stream(grouping):
    target, source = _features((4, 32, 17, 19), torch.float32, ("channels_last", "contiguous"))
    expected = getattr(OPS, f"{grouping}_sqdist")(target, source)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = getattr(OPS, f"{grouping}_sqdist")(target, source)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(out, expected)


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_op_on_a_second_device(grouping):
    target, source = _features((2, 8, 6, 6), torch.float32)
    on_second = [t.to("cuda:1") for t in (target, source)]
    out = getattr(OPS, f"{grouping}_sqdist")(*on_second)
    assert out.device == on_second[0].device
    assert torch.equal(out.cpu(), getattr(OPS, f"{grouping}_sqdist")(target, source).cpu())
    grad = _grad_for(grouping, target).to("cuda:1")
    assert getattr(OPS, f"{grouping}_sqdist_backward")(grad, *on_second).device == on_second[0].device


@needs_cuda
def test_64_bit_offsets():
    """Two channels 2^31 + 5 elements apart in one 4 GiB bfloat16 storage."""
    far, positions = 2**31 + 5, 48
    try:
        storage = torch.zeros(far + positions, dtype=torch.bfloat16, device="cuda")
    except torch.cuda.OutOfMemoryError:
        pytest.skip("cannot allocate 4 GiB on the GPU")
    generator = torch.Generator().manual_seed(0)
    near_values = torch.randn(positions, generator=generator).bfloat16()
    far_values = (torch.randn(positions, generator=generator) + 3).bfloat16()
    storage[:positions] = near_values.cuda()
    storage[far:] = far_values.cuda()
    target = storage.as_strided((1, 2, positions), (0, far, 1))
    source = torch.zeros(1, 2, positions, dtype=torch.bfloat16, device="cuda")
    dense = torch.stack([near_values, far_values]).unsqueeze(0).double()
    torch.testing.assert_close(OPS.channel_sqdist(target, source).cpu().double(), (dense**2).sum(2), rtol=1e-5, atol=0)
    torch.testing.assert_close(OPS.spatial_sqdist(target, source).cpu().double(), (dense**2).sum(1), rtol=1e-5, atol=0)
    grad = torch.tensor([[0.5, 2.0]], device="cuda")
    dt = OPS.channel_sqdist_backward(grad, target, source)
    expected = (2 * grad.cpu()[:, :, None].double() * dense).bfloat16()
    assert torch.equal(dt.cpu(), expected)
    del storage, target
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------- multi-layer ops


def _layers(shapes, dtype, layouts, seed=0):
    pairs = [_features(shape, dtype, layouts[i % len(layouts)], seed=seed + i) for i, shape in enumerate(shapes)]
    return [t for t, _ in pairs], [s for _, s in pairs]


MIXED_LAYOUTS = [
    ("contiguous", "contiguous"),
    ("channels_last", "channels_last"),
    ("cropped", "channels_last"),
    ("batch_sliced", "contiguous"),
]


@needs_cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_layer_ops_match_the_model_and_the_single_ops(grouping, dtype):
    """Four ResNet-like layers, each in another layout, in one launch per pass: every
    layer's result is bit for bit the single op's (one launch walks each layer alike)."""
    targets, sources = _layers(RESNET_LIKE, dtype, MIXED_LAYOUTS)
    partials = getattr(OPS, f"grouped_{grouping}_sqdist")(targets, sources)
    assert len(partials) == len(targets)
    grads = [_grad_for(grouping, target, seed) for seed, target in enumerate(targets)]
    gradients = getattr(OPS, f"grouped_{grouping}_sqdist_backward")(grads, targets, sources)
    for partial, dt, grad, target, source in zip(partials, gradients, grads, targets, sources):
        assert relative_error(
            partial.cpu(), float64_model.partial_sums(grouping, target, source)
        ) <= _forward_tolerance(dtype)
        assert torch.equal(partial, getattr(OPS, f"{grouping}_sqdist")(target, source))
        assert dt.shape == target.shape and dt.dtype == dtype
        assert dt.stride() == torch.empty_like(target).stride()
        assert relative_error(
            dt.cpu(), float64_model.partial_sums_backward(grouping, grad, target, source)
        ) <= _backward_tolerance(dtype)
        assert torch.equal(dt, getattr(OPS, f"{grouping}_sqdist_backward")(grad, target, source))


@needs_cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_multi_layer_ops_more_layers_than_one_launch_holds_and_empty_ones(grouping):
    shapes = [RESNET_LIKE[i % 4] for i in range(11)] + [(2, 3, 0, 4), (1, 7, 5), (2, 1, 1, 1)]
    targets, sources = _layers(shapes, torch.float32, MIXED_LAYOUTS, seed=20)
    partials = getattr(OPS, f"grouped_{grouping}_sqdist")(targets, sources)
    grads = [_grad_for(grouping, target, seed) for seed, target in enumerate(targets)]
    gradients = getattr(OPS, f"grouped_{grouping}_sqdist_backward")(grads, targets, sources)
    for partial, dt, grad, target, source in zip(partials, gradients, grads, targets, sources):
        assert relative_error(partial.cpu(), float64_model.partial_sums(grouping, target, source)) <= 2e-5
        assert dt.shape == target.shape
        assert relative_error(dt.cpu(), float64_model.partial_sums_backward(grouping, grad, target, source)) <= 2e-5


# --------------------------------------------------------------------------- autograd


GRADCHECK_CASES = [((2, 3, 4, 5), "contiguous"), ((2, 3, 5), "cropped"), ((1, 2, 3, 2, 2), "channels_last")]


@needs_cuda
@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck], ids=["grad", "gradgrad"])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("shape,layout", GRADCHECK_CASES, ids=[layout for _, layout in GRADCHECK_CASES])
def test_gradcheck_single_op(check, grouping, shape, layout):
    target, source = _features(shape, torch.float64, (layout, layout), seed=41)
    op = getattr(OPS, f"{grouping}_sqdist")
    assert check(lambda t: op(t, source), (target.requires_grad_(True),))


@needs_cuda
@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck], ids=["grad", "gradgrad"])
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_gradcheck_multi_layer_op(check, grouping):
    targets, sources = _layers(
        [(2, 3, 3, 2), (1, 4, 5), (1, 2, 3, 2, 2)],
        torch.float64,
        [("contiguous", "contiguous"), ("cropped", "cropped"), ("channels_last", "contiguous")],
    )
    op = getattr(OPS, f"grouped_{grouping}_sqdist")

    def partial_sums(*layer_targets):
        return tuple(op(list(layer_targets), sources))

    assert check(partial_sums, tuple(t.requires_grad_(True) for t in targets))


# --------------------------------------------------------------------------- determinism


DETERMINISM_CASES = [
    ((2, 3, 70000), "contiguous"),  # rows reduced across the warps of a block
    ((1, 4000, 50), "contiguous"),  # columns reduced across slices in shared memory
    ((4, 64, 30, 30), "channels_last"),
    ((3, 16, 9, 20, 20), "cropped"),
]


@needs_cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("shape,layout", DETERMINISM_CASES, ids=[str(s) for s, _ in DETERMINISM_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_runs_are_bitwise_equal(grouping, shape, layout, dtype):
    target, source = _features(shape, dtype, (layout, layout), seed=31)
    grad = _grad_for(grouping, target)
    runs = [
        (
            getattr(OPS, f"{grouping}_sqdist")(target, source),
            getattr(OPS, f"{grouping}_sqdist_backward")(grad, target, source),
            getattr(OPS, f"grouped_{grouping}_sqdist")([target, source], [source, target])[1],
        )
        for _ in range(2)
    ]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# --------------------------------------------------------------------------- opcheck


@needs_cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("shape,dtype,layout", OPCHECK_CASES, ids=OPCHECK_IDS)
def test_opcheck(grouping, shape, dtype, layout):
    target, source = _features(shape, dtype, (layout, layout), seed=23)
    grad = _grad_for(grouping, target)
    torch.library.opcheck(getattr(OPS, f"{grouping}_sqdist"), (target.requires_grad_(True), source))
    torch.library.opcheck(
        getattr(OPS, f"{grouping}_sqdist_backward"),
        (grad.requires_grad_(True), target.detach().requires_grad_(True), source),
    )
    other_target, other_source = _features((2, 5, 3), dtype, seed=24)
    targets = [target.detach().requires_grad_(True), other_target.requires_grad_(True)]
    torch.library.opcheck(getattr(OPS, f"grouped_{grouping}_sqdist"), (targets, [source, other_source]))
    grads = [grad.detach(), _grad_for(grouping, other_target)]
    torch.library.opcheck(
        getattr(OPS, f"grouped_{grouping}_sqdist_backward"),
        (grads, [t.detach() for t in targets], [source, other_source]),
    )


# --------------------------------------------------------------------------- errors


@needs_cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_cpu_tensor_mixed_with_cuda_tensor_raises(grouping):
    op, backward = getattr(OPS, f"{grouping}_sqdist"), getattr(OPS, f"{grouping}_sqdist_backward")
    layers_op = getattr(OPS, f"grouped_{grouping}_sqdist")
    name = f"afa_ext::{grouping}_sqdist"
    target, source = _features((2, 3, 4, 5), torch.float32)
    grad = _grad_for(grouping, target)
    with pytest.raises(
        RuntimeError, match=f"{name}: expected target and source on one CUDA device, got cuda:0 and cpu"
    ):
        op(target, source.cpu())
    with pytest.raises(
        RuntimeError, match=f"{name}: expected target and source on one CUDA device, got cpu and cuda:0"
    ):
        op(target.cpu(), source)
    with pytest.raises(RuntimeError, match=f"{name}_backward: expected grad on cuda:0, got cpu"):
        backward(grad.cpu(), target, source)
    with pytest.raises(RuntimeError, match=f"{name}: expected target and source on one CUDA device"):
        layers_op([target, target], [source, source.cpu()])
    with pytest.raises(RuntimeError, match="expected every layer on one device with one dtype"):
        layers_op([target, target.cpu()], [source, source.cpu()])


@needs_cuda
def test_bad_input_raises_like_the_cpu_kernels():
    target = torch.randn(2, 3, 4, 5, device="cuda")
    for device in ("cpu", "cuda"):
        t = target.to(device)
        with pytest.raises(RuntimeError, match="afa_ext::channel_sqdist: expected source to have the shape of target"):
            OPS.channel_sqdist(t, t[..., :4])
        with pytest.raises(RuntimeError, match="afa_ext::spatial_sqdist: expected source of dtype Float like target"):
            OPS.spatial_sqdist(t, t.double())
        with pytest.raises(RuntimeError, match=r"afa_ext::channel_sqdist_backward: expected grad of shape \[2, 3\]"):
            OPS.channel_sqdist_backward(torch.ones(2, 4, device=device), t, t)
