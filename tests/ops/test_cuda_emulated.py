"""The CUDA kernels' logic on the CPU: csrc/cuda compiled by the host compiler with the
emulation of tests/ops/cuda_emulation/ (one thread per CUDA thread, barriers for
__syncthreads and the warp shuffles), checked against the float64 model.

This is how a machine without a GPU (CI) tests what the CUDA kernels compute: every
layout through the vector and the strided paths, the reductions, multi-layer launches of
more layers than one launch holds, 64-bit offsets. What it cannot test (timing, memory
coalescing, the inline-PTX store, streams) is left to test_cuda_kernels.py on a GPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import float64_model
from loss_cases import DTYPES, LAYOUT_IDS, LAYOUT_PAIRS, SHAPES, make_features, relative_error
from op_checks import (
    UNFITTING_IDS,
    UNFITTING_LAYERS,
    backward_tolerance,
    check_op_pair,
    forward_tolerance,
    grad_for,
    stored_in_order,
)

REPO = Path(__file__).resolve().parents[2]
GROUPINGS = ("channel", "spatial")
# Four ResNet-like layers (C x4, side /2 per stage), scaled down.
RESNET_LIKE = [(3, 8, 24, 24), (3, 16, 12, 12), (3, 32, 6, 6), (3, 64, 3, 3)]

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler to build the emulation"
)


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    """torch.ops.afa_ext_cuda_emulated, built on first use into this session's temporary
    folder (a few seconds): torch's shared cache folder would be kept across torch versions,
    and a run killed while building there leaves a lock that every later run waits on."""
    from torch.utils import cpp_extension

    from afa_ext.ops.schemas import define_ops

    define_ops("afa_ext_cuda_emulated")  # the schemas; the library registers the kernels
    cpp_extension.load(
        name="afa_ext_cuda_emulation",
        sources=[str(REPO / "tests" / "ops" / "cuda_emulation" / "emulated_cuda_ops.cpp")],
        extra_include_paths=[str(REPO / "csrc")],
        # The stable ABI of torch 2.10, as afa_ext._C (setup.py's TORCH_TARGET_VERSION).
        extra_cflags=[
            "-O2",
            "-std=c++20",
            "-Wall",
            "-Wextra",
            "-Wno-unused-parameter",
            "-Wno-unknown-pragmas",
            "-DTORCH_TARGET_VERSION=0x020a000000000000",
        ],
        is_python_module=False,
        build_directory=str(tmp_path_factory.mktemp("cuda_emulation")),
    )
    return torch.ops.afa_ext_cuda_emulated


def _features(shape, dtype, layouts=("contiguous", "contiguous"), seed=0):
    target, source = make_features(shape, dtype, *layouts, torch.Generator().manual_seed(seed))
    return target.detach(), source.detach()


def _misaligned(values):
    """``values`` one element past a 16-byte boundary: no vector path can take it."""
    storage = torch.empty(values.numel() + 1, dtype=values.dtype)
    view = storage[1:].view(values.shape)
    view.copy_(values)
    return view


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("ndim", sorted(SHAPES))
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids=LAYOUT_IDS)
def test_op_values_in_every_layout(ops, grouping, ndim, layouts):
    target, source = _features(SHAPES[ndim], torch.float32, layouts, seed=ndim)
    check_op_pair(ops, grouping, target, source, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "layouts",
    [("contiguous", "contiguous"), ("channels_last", "channels_last"), ("cropped", "channels_last")],
    ids=lambda p: "-".join(p),
)
def test_op_values_in_every_dtype(ops, grouping, dtype, layouts):
    target, source = _features((3, 16, 6, 8), dtype, layouts, seed=2)
    check_op_pair(ops, grouping, target, source, torch.Generator().manual_seed(3))


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1), (2, 3, 1), (1, 40, 7, 7), (3, 1, 50), (2, 5, 3, 3, 3), (2, 8, 3000), (1, 300, 2)], ids=str
)
def test_op_odd_shapes(ops, grouping, shape):
    target, source = _features(shape, torch.float32, seed=4)
    check_op_pair(ops, grouping, target, source, torch.Generator().manual_seed(5))


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_misaligned_base_pointer(ops, grouping, dtype):
    target, source = _features((2, 16, 8, 8), dtype, seed=6)
    check_op_pair(ops, grouping, _misaligned(target), _misaligned(source), torch.Generator().manual_seed(7))


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("count", [4, 11], ids=["4-layers", "11-layers"])
def test_multi_layer_ops_match_the_model(ops, grouping, dtype, count):
    """All layers at once, including more than one launch holds (8) and an empty one."""
    shapes = (RESNET_LIKE * 3)[:count]
    shapes[1] = (3, 16, 0, 12)
    pairs = [
        _features(shape, dtype, ("channels_last", "contiguous") if i % 2 else ("contiguous",) * 2, seed=i)
        for i, shape in enumerate(shapes)
    ]
    targets, sources = [t for t, _ in pairs], [s for _, s in pairs]
    partials = getattr(ops, f"grouped_{grouping}_sqdist")(targets, sources)
    for partial, target, source in zip(partials, targets, sources):
        expected = float64_model.partial_sums(grouping, target, source)
        assert relative_error(partial, expected) <= forward_tolerance(dtype)
    generator = torch.Generator().manual_seed(8)
    grads = [grad_for(grouping, target, generator) for target in targets]
    gradients = getattr(ops, f"grouped_{grouping}_sqdist_backward")(grads, targets, sources)
    for dt, grad, target, source in zip(gradients, grads, targets, sources):
        expected = float64_model.partial_sums_backward(grouping, grad, target, source)
        assert dt.shape == target.shape and relative_error(dt, expected) <= torch.finfo(dtype).eps


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize(
    "layouts", [("contiguous", "contiguous"), ("channels_last", "cropped")], ids=lambda p: "-".join(p)
)
def test_backward_is_bitwise_the_cpu_kernels(ops, grouping, layouts):
    """Both compute dt = 2 g (t - s) with the shared maths of csrc/common/sqdist_math.h."""
    target, source = _features((3, 16, 6, 8), torch.bfloat16, layouts, seed=9)
    grad = grad_for(grouping, target, torch.Generator().manual_seed(10))
    emulated = getattr(ops, f"{grouping}_sqdist_backward")(grad, target, source)
    cpu = getattr(torch.ops.afa_ext, f"{grouping}_sqdist_backward")(grad, target, source)
    assert torch.equal(emulated, cpu)


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_two_runs_are_bitwise_equal(ops, grouping):
    target, source = _features((4, 32, 14, 14), torch.float32, ("channels_last", "contiguous"), seed=11)
    op = getattr(ops, f"{grouping}_sqdist")
    assert torch.equal(op(target, source), op(target, source))


def test_64_bit_offsets(ops):
    from op_checks import check_ops_read_beyond_2_31

    check_ops_read_beyond_2_31(ops)


def test_bad_input_raises_the_cpu_kernels_errors(ops):
    target, source = _features((2, 3, 4, 4), torch.float32)
    with pytest.raises(RuntimeError, match=r"expected source to have the shape of target"):
        ops.channel_sqdist(target, source[:, :2])
    with pytest.raises(RuntimeError, match=r"expected grad of shape \[2, 16\]"):
        ops.spatial_sqdist_backward(torch.zeros(2, 3), target, source)


# ------------------------------------------------- gradients written into given tensors


def _backward_into(ops, op, grads, targets, sources, gradients):
    ops.sqdist_backward_into(op, list(grads), list(targets), list(sources), list(gradients))


def _check_gradient(grouping, dt, grad, target, source):
    expected = float64_model.partial_sums_backward(grouping, grad, target, source)
    assert relative_error(dt, expected) <= backward_tolerance(dt.dtype)


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_backward_into_a_gradient_apart_from_the_inputs(ops, grouping):
    """A gradient in a layout of its own, and one that ends where the target's storage
    begins: both apart from every input, both get dt = 2 g (t - s)."""
    op = f"{grouping}_sqdist_backward"
    target, source = _features((2, 8, 6, 5), torch.float32, ("cropped", "channels_last"), seed=14)
    grad = grad_for(grouping, target, torch.Generator().manual_seed(15))
    transposed = torch.full((2, 8, 5, 6), float("nan")).transpose(-1, -2)
    _backward_into(ops, op, [grad], [target], [source], [transposed])
    _check_gradient(grouping, transposed, grad, target, source)

    storage = torch.randn(2 * target.numel())
    adjacent_target, after_target = storage[: target.numel()].view(target.shape), storage[target.numel() :]
    adjacent_target.copy_(target)
    gradient = after_target.view(target.shape)
    _backward_into(ops, op, [grad], [adjacent_target], [source], [gradient])
    _check_gradient(grouping, gradient, grad, target, source)


def _overlapping_view(tensor, shift):
    """A view of ``tensor``'s shape starting ``shift`` elements into a storage shared with it."""
    storage = torch.randn(tensor.numel() + abs(shift))
    first, second = (0, shift) if shift >= 0 else (-shift, 0)
    view = storage[first : first + tensor.numel()].view(tensor.shape)
    view.copy_(tensor)
    return view, storage[second : second + tensor.numel()].view(tensor.shape)


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("aliased", ["target", "target-shifted-view", "source", "grad"])
def test_backward_into_rejects_a_gradient_sharing_memory_with_an_input(ops, grouping, aliased):
    """The kernels read the inputs through the read-only cache while storing dt: a gradient
    that overlaps an input is refused before the launch, naming the op and the layer."""
    op = f"{grouping}_sqdist_backward"
    target, source = _features((2, 8, 6, 5), torch.float32, seed=16)
    grad = grad_for(grouping, target, torch.Generator().manual_seed(17))
    if aliased == "target":
        gradient = target
    elif aliased == "target-shifted-view":
        target, gradient = _overlapping_view(target, 3)
    elif aliased == "source":
        source, gradient = _overlapping_view(source, -1)
    else:
        storage = torch.randn(target.numel())
        storage[: grad.numel()].copy_(grad.flatten())
        grad, gradient = storage[: grad.numel()].view(grad.shape), storage.view(target.shape)
    name = aliased.split("-")[0]
    with pytest.raises(RuntimeError, match=rf"afa_ext::{op}: the gradient of layer 0 overlaps the {name} of layer 0"):
        _backward_into(ops, op, [grad], [target], [source], [gradient])


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_multi_layer_backward_into_rejects_a_gradient_sharing_another_layers_input(ops, grouping):
    """One launch reads every layer: layer 1's gradient may not overlap layer 0's target."""
    op = f"grouped_{grouping}_sqdist_backward"
    pairs = [_features((2, 8, 6, 5), torch.float32, seed=seed) for seed in (18, 19)]
    targets, sources = [t for t, _ in pairs], [s for _, s in pairs]
    grads = [grad_for(grouping, t, torch.Generator().manual_seed(20)) for t in targets]
    gradients = [torch.empty_like(targets[0]), targets[0]]
    with pytest.raises(RuntimeError, match=rf"afa_ext::{op}: the gradient of layer 1 overlaps the target of layer 0"):
        _backward_into(ops, op, grads, targets, sources, gradients)
    gradients[1] = torch.empty_like(targets[1])
    _backward_into(ops, op, grads, targets, sources, gradients)
    for dt, grad, target, source in zip(gradients, grads, targets, sources):
        _check_gradient(grouping, dt, grad, target, source)


# ----------------------------------------- features copied dense: the gradient's layout


def _unfitting_layer(ops, case, seed):
    grouping, shape, target_order, source_order, cropped = case
    generator = torch.Generator().manual_seed(seed)
    target = stored_in_order(torch.randn(shape, generator=generator), target_order, cropped)
    source = stored_in_order(torch.randn(shape, generator=generator), source_order, cropped)
    assert not ops.plan_fits_descriptor(grouping, target, source), "the layout must need the dense copies"
    return target, source


def _check_fallback_gradient(grouping, dt, grad, target, source):
    """The fake's layout (torch.empty_like(target)), the CPU kernels' values and layout, and
    the float64 model's values."""
    assert dt.stride() == torch.empty_like(target).stride()
    on_cpu = getattr(torch.ops.afa_ext, f"{grouping}_sqdist_backward")(grad, target, source)
    assert on_cpu.stride() == dt.stride() and torch.equal(on_cpu, dt)
    _check_gradient(grouping, dt, grad, target, source)


@pytest.mark.parametrize("case", UNFITTING_LAYERS, ids=UNFITTING_IDS)
def test_copied_layers_keep_the_fakes_gradient_layout(ops, case):
    grouping = case[0]
    target, source = _unfitting_layer(ops, case, seed=21)
    check_op_pair(ops, grouping, target, source, torch.Generator().manual_seed(22))
    grad = grad_for(grouping, target, torch.Generator().manual_seed(23))
    dt = getattr(ops, f"{grouping}_sqdist_backward")(grad, target, source)
    _check_fallback_gradient(grouping, dt, grad, target, source)


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_multi_layer_copied_layers_keep_the_fakes_gradient_layout(ops, grouping):
    """Copied layers between layers walked in place, in one launch."""
    cases = [case for case in UNFITTING_LAYERS if case[0] == grouping]
    layers = [_unfitting_layer(ops, case, seed=24 + i) for i, case in enumerate(cases)]
    layers.insert(1, _features((2, 8, 6, 5), torch.float32, ("channels_last", "cropped"), seed=30))
    targets, sources = [t for t, _ in layers], [s for _, s in layers]
    generator = torch.Generator().manual_seed(31)
    grads = [grad_for(grouping, target, generator) for target in targets]
    partials = getattr(ops, f"grouped_{grouping}_sqdist")(targets, sources)
    for partial, target, source in zip(partials, targets, sources):
        assert relative_error(partial, float64_model.partial_sums(grouping, target, source)) <= forward_tolerance(
            torch.float32
        )
    gradients = getattr(ops, f"grouped_{grouping}_sqdist_backward")(grads, targets, sources)
    for dt, grad, target, source in zip(gradients, grads, targets, sources):
        _check_fallback_gradient(grouping, dt, grad, target, source)


def test_backward_into_rejects_a_gradient_unlike_the_target(ops):
    target, source = _features((2, 3, 4, 5), torch.float32, seed=32)
    grad = grad_for("channel", target, torch.Generator().manual_seed(33))
    for gradient, error in [
        (torch.empty(2, 3, 5, 4), "expected the gradient of layer 0 to be of shape"),
        (torch.empty_like(target, dtype=torch.float64), "to be of shape .*, Float on cpu"),
        (torch.empty(2, 3, 4, 1).expand(2, 3, 4, 5), "stores some elements at one address"),
    ]:
        with pytest.raises(RuntimeError, match=rf"afa_ext::channel_sqdist_backward: .*{error}"):
            _backward_into(ops, "channel_sqdist_backward", [grad], [target], [source], [gradient])
