"""The CUDA kernels' logic on the CPU: csrc/cuda compiled by the host compiler with the
emulation of tests/cuda_emulation/ (one thread per CUDA thread, barriers for
__syncthreads and the warp shuffles), checked against the float64 model.

This is how a machine without a GPU (CI) tests what the CUDA kernels compute: every
layout through the vector and the strided paths, the reductions, grouped launches of
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
from op_checks import check_op_pair, forward_tolerance, grad_for

REPO = Path(__file__).resolve().parents[2]
GROUPINGS = ("channel", "spatial")
# Four ResNet-like layers (C x4, side /2 per stage), scaled down.
RESNET_LIKE = [(3, 8, 24, 24), (3, 16, 12, 12), (3, 32, 6, 6), (3, 64, 3, 3)]

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler to build the emulation")


@pytest.fixture(scope="module")
def ops():
    """torch.ops.afa_ext_cuda_emulated, built on first use (cached by torch between runs)."""
    from torch.utils import cpp_extension

    from afa_ext.ops.schemas import define_ops

    define_ops("afa_ext_cuda_emulated")  # the schemas; the library registers the kernels
    cpp_extension.load(
        name="afa_ext_cuda_emulation",
        sources=[str(REPO / "tests" / "ops" / "cuda_emulation" / "emulated_cuda_ops.cpp")],
        extra_include_paths=[str(REPO / "csrc")],
        extra_cflags=["-O2", "-std=c++20", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas"],
        is_python_module=False,
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
@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                     ("cropped", "channels_last")], ids=lambda p: "-".join(p))
def test_op_values_in_every_dtype(ops, grouping, dtype, layouts):
    target, source = _features((3, 16, 6, 8), dtype, layouts, seed=2)
    check_op_pair(ops, grouping, target, source, torch.Generator().manual_seed(3))


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1), (1, 40, 7, 7), (3, 1, 50), (2, 5, 3, 3, 3),
                                   (2, 8, 3000), (1, 300, 2)], ids=str)
def test_op_odd_shapes(ops, grouping, shape):
    target, source = _features(shape, torch.float32, seed=4)
    check_op_pair(ops, grouping, target, source, torch.Generator().manual_seed(5))


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_misaligned_base_pointer(ops, grouping, dtype):
    target, source = _features((2, 16, 8, 8), dtype, seed=6)
    check_op_pair(ops, grouping, _misaligned(target), _misaligned(source), torch.Generator().manual_seed(7))


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_op_features_with_many_unmergeable_dims(ops, grouping):
    """7-D features with scrambled strides: more dims than a layer descriptor holds, so the
    host code copies them dense (and copies the gradient back into the target's layout)."""
    order = (0, 1, 5, 3, 6, 2, 4)
    inverse = [order.index(d) for d in range(7)]
    target, source = _features((2, 3, 2, 3, 2, 3, 2), torch.float32, seed=12)
    target = target.permute(order).contiguous().permute(inverse)
    source = source.permute(order).contiguous().permute(inverse)
    check_op_pair(ops, grouping, target, source, torch.Generator().manual_seed(13))


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("count", [4, 11], ids=["4-layers", "11-layers"])
def test_grouped_ops_match_the_model(ops, grouping, dtype, count):
    """All layers at once, including more than one launch holds (8) and an empty one."""
    shapes = (RESNET_LIKE * 3)[:count]
    shapes[1] = (3, 16, 0, 12)
    pairs = [_features(shape, dtype, ("channels_last", "contiguous") if i % 2 else ("contiguous",) * 2, seed=i)
             for i, shape in enumerate(shapes)]
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
@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("channels_last", "cropped")],
                         ids=lambda p: "-".join(p))
def test_backward_is_bitwise_the_cpu_kernels(ops, grouping, layouts):
    """Both compute dt = 2 w (t - s) with the shared maths of csrc/common/sqdist_math.h."""
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
