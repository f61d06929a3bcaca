"""The Triton backend against the float64 model: ops, multi-layer launches, losses, autograd.

On a machine with a CUDA GPU these run on it. Without one, ``make test`` runs this file
a second time with TRITON_INTERPRET=1, which makes ``triton`` available for CPU tensors
through Triton's interpreter (slow, so the shapes are small); otherwise it is skipped.
"""

from __future__ import annotations


import pytest
import torch

import afa_ext
import float64_model
from afa_ext import functional
from loss_cases import (
    DTYPES,
    LAYOUT_IDS,
    LAYOUT_PAIRS,
    LOSS_IDS,
    LOSSES,
    SHAPES,
    make_features,
    make_weights,
    relative_error,
    run_loss,
)
from op_checks import backward_tolerance as _backward_tolerance
from op_checks import check_multi_layer_gradients, check_list_loss, check_op_pair, grad_for, layer_weights
from op_checks import forward_tolerance as _forward_tolerance

pytestmark = pytest.mark.skipif(
    "triton" not in afa_ext.available_backends(),
    reason="backend 'triton' unavailable (no CUDA device; TRITON_INTERPRET=1 runs it on the CPU)",
)

if "triton" in afa_ext.available_backends():
    from afa_ext.ops.triton import launch as triton_launch

DEVICE = "cpu" if afa_ext.ops.backends.triton_interpreted() else "cuda"
OPS = torch.ops.afa_ext_triton
GROUPINGS = ("channel", "spatial")
# Four layers shaped like ResNet's hooked ones (C x4, side /2 per stage), scaled down.
RESNET_LIKE = [(2, 8, 12, 12), (2, 16, 6, 6), (2, 32, 3, 3), (2, 64, 2, 2)]


def _grad_for(grouping, target, generator):
    return grad_for(grouping, target, generator)


def _features(shape, dtype, layouts=("contiguous", "contiguous"), seed=0):
    generator = torch.Generator().manual_seed(seed)
    target, source = make_features(shape, dtype, *layouts, generator, device=DEVICE)
    return target.detach(), source.detach()


def _check_op_pair(grouping, target, source, generator):
    check_op_pair(OPS, grouping, target, source, generator)


# --------------------------------------------------------------------------- ops


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("ndim", sorted(SHAPES))
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids=LAYOUT_IDS)
def test_op_values_in_every_layout(grouping, ndim, layouts):
    generator = torch.Generator().manual_seed(31 * ndim + LAYOUT_PAIRS.index(layouts))
    target, source = _features(SHAPES[ndim], torch.float32, layouts, seed=ndim)
    _check_op_pair(grouping, target, source, generator)


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "layouts",
    [("contiguous", "contiguous"), ("channels_last", "channels_last"), ("cropped", "channels_last")],
    ids=lambda p: "-".join(p),
)
def test_op_values_in_every_dtype(grouping, dtype, layouts):
    target, source = _features((3, 6, 5, 8), dtype, layouts, seed=3)
    _check_op_pair(grouping, target, source, torch.Generator().manual_seed(4))


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1), (1, 40, 7, 7), (3, 1, 50), (2, 5, 3, 3, 3)], ids=str)
def test_op_odd_shapes(grouping, shape):
    target, source = _features(shape, torch.float32, seed=5)
    _check_op_pair(grouping, target, source, torch.Generator().manual_seed(6))


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_op_empty_inputs(grouping):
    for shape in [(0, 3, 4), (2, 0, 4, 5), (2, 3, 0)]:
        target = torch.zeros(shape, device=DEVICE)
        out = getattr(OPS, f"{grouping}_sqdist")(target, target)
        assert out.shape == float64_model.partial_sums(grouping, target, target).shape and bool((out == 0).all())
        grad = _grad_for(grouping, target, torch.Generator().manual_seed(0))
        assert getattr(OPS, f"{grouping}_sqdist_backward")(grad, target, target).shape == shape


def _sliced_channels_last_3d(generator):
    """Channels-last 3-d features cropped in every spatial dim: (B, D, H, W) cannot be
    merged into three row levels."""
    base = torch.randn(2, 6, 5, 4, 6, generator=generator).to(memory_format=torch.channels_last_3d)
    return base[:, 1:5, 1:4, 1:3, 1:5]


def _permuted_dense_6d(generator):
    """Dense features whose four spatial dims lie in memory in another order: neither
    they nor (B, *spatial) merge into three levels."""
    return torch.randn(2, 3, 4, 5, 6, 7, generator=generator).permute(0, 1, 3, 2, 5, 4)


# (grouping, features) that only a copy into a dense layout can index
UNINDEXABLE_IN_PLACE = [
    ("spatial", _sliced_channels_last_3d),
    ("spatial", _permuted_dense_6d),
    ("channel", _permuted_dense_6d),
]


@pytest.mark.parametrize(
    "grouping, make_target",
    UNINDEXABLE_IN_PLACE,
    ids=lambda value: value if isinstance(value, str) else value.__name__.strip("_"),
)
def test_a_copied_layout_gives_the_gradient_the_fake_kernel_promises(grouping, make_target):
    """The backward of a layout the kernels cannot index in place has the strides of
    torch.empty_like(target) (the fake kernel's), in the single and the multi-layer op."""
    generator = torch.Generator().manual_seed(21)
    target = make_target(generator).to(DEVICE)
    source = torch.randn(target.shape, generator=generator).to(DEVICE)
    assert triton_launch.plan_layer(target, source, torch.empty_like(target), grouping).target is not target
    other_target, other_source = _features((2, 3, 4, 4), torch.float32, seed=22)
    grads = [_grad_for(grouping, t, generator) for t in (target, other_target)]
    single = getattr(OPS, f"{grouping}_sqdist_backward")(grads[0], target, source)
    layers = getattr(OPS, f"grouped_{grouping}_sqdist_backward")(grads, [target, other_target], [source, other_source])
    for gradient, grad, t, s in [
        (single, grads[0], target, source),
        (layers[0], grads[0], target, source),
        (layers[1], grads[1], other_target, other_source),
    ]:
        assert gradient.stride() == torch.empty_like(t).stride()
        expected = float64_model.partial_sums_backward(grouping, grad, t, s)
        assert relative_error(gradient.cpu(), expected) <= 2e-6


# --------------------------------------------------------------------------- multi-layer launches


def _layers(shapes, dtype, layouts=("contiguous", "contiguous")):
    pairs = [_features(shape, dtype, layouts, seed=index) for index, shape in enumerate(shapes)]
    return [t for t, _ in pairs], [s for _, s in pairs]


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "layouts", [("contiguous", "contiguous"), ("channels_last", "contiguous")], ids=lambda p: "-".join(p)
)
def test_multi_layer_ops_match_the_model_layer_by_layer(grouping, dtype, layouts):
    targets, sources = _layers(RESNET_LIKE, dtype, layouts)
    partials = getattr(OPS, f"grouped_{grouping}_sqdist")(targets, sources)
    assert len(partials) == len(targets)
    for partial, target, source in zip(partials, targets, sources):
        assert relative_error(
            partial.cpu(), float64_model.partial_sums(grouping, target, source)
        ) <= _forward_tolerance(dtype)
    generator = torch.Generator().manual_seed(8)
    grads = [_grad_for(grouping, target, generator) for target in targets]
    gradients = getattr(OPS, f"grouped_{grouping}_sqdist_backward")(grads, targets, sources)
    for dt, grad, target, source in zip(gradients, grads, targets, sources):
        assert dt.shape == target.shape and dt.dtype == dtype
        assert relative_error(
            dt.cpu(), float64_model.partial_sums_backward(grouping, grad, target, source)
        ) <= _backward_tolerance(dtype)


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_multi_layer_ops_mix_empty_and_odd_layers(grouping):
    shapes = [(2, 3, 0, 4), (1, 7, 5), (3, 2, 4, 4), (2, 1, 1, 1)]
    targets, sources = _layers(shapes, torch.float32)
    for partial, target, source in zip(getattr(OPS, f"grouped_{grouping}_sqdist")(targets, sources), targets, sources):
        assert relative_error(partial.cpu(), float64_model.partial_sums(grouping, target, source)) <= 2e-5


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_split_forward_is_exact_and_deterministic(grouping, dtype, monkeypatch):
    """Cutting K into many slices, summed in slice order by the last program, gives the
    model's sums, bit for bit the same on every run."""
    targets, sources = _layers([(2, 24, 9, 9), (1, 96, 5), (2, 64, 3, 3)], dtype)
    many = triton_launch.SplitPolicy(target_programs=4096, min_k_per_split=1)
    monkeypatch.setattr(triton_launch, "default_policy", lambda device: many)
    first = getattr(OPS, f"grouped_{grouping}_sqdist")(targets, sources)
    again = getattr(OPS, f"grouped_{grouping}_sqdist")(targets, sources)
    plans = [triton_launch.plan_layer(t, s, None, grouping) for t, s in zip(targets, sources)]
    assert any(splits > 1 for splits, _ in triton_launch._splits(plans, plans[0].rows_fast, many))
    for a, b, target, source in zip(first, again, targets, sources):
        assert torch.equal(a, b)
        assert relative_error(a.cpu(), float64_model.partial_sums(grouping, target, source)) <= _forward_tolerance(
            dtype
        )


def test_multi_layer_ops_refuse_bad_lists():
    target, source = _features((2, 3, 4, 4), torch.float32)
    with pytest.raises(RuntimeError, match="non-empty list of Tensors"):  # the dispatcher's own check
        OPS.grouped_channel_sqdist([], [])
    with pytest.raises(RuntimeError, match="expected one source per target, got 2 targets and 1 sources"):
        OPS.grouped_channel_sqdist([target, target], [source])
    with pytest.raises(RuntimeError, match="expected every layer on one device with one dtype"):
        OPS.grouped_spatial_sqdist([target, target.double()], [source, source.double()])
    with pytest.raises(RuntimeError, match=r"expected a floating-point grad of shape \(2, 16\)"):
        OPS.grouped_spatial_sqdist_backward([torch.zeros(2, 3, device=DEVICE)], [target], [source])


@pytest.mark.skipif(DEVICE != "cpu", reason="only the interpreter refuses CUDA tensors")
def test_interpreter_names_its_device():
    assert afa_ext.ops.backends.backend_devices("triton") == ("cpu",)


# --------------------------------------------------------------------------- losses and autograd


@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_losses_match_the_model(case, dtype):
    generator = torch.Generator().manual_seed(11)
    target, source = make_features((3, 6, 5, 5), dtype, "contiguous", "channels_last", generator, device=DEVICE)
    weights = make_weights(case.weights, tuple(target.shape), dtype, generator)
    weights = None if weights is None else weights.to(DEVICE)
    loss, grad_t, grad_w = run_loss(case, target, source, weights, "triton")
    expected = float64_model.loss_and_grads(
        case.model_name,
        target.detach().cpu(),
        source.detach().cpu(),
        None if weights is None else weights.detach().cpu(),
        1.7,
    )
    tolerance = 2e-5 if dtype == torch.float32 else 2e-3
    assert relative_error(loss.cpu(), expected[0]) <= tolerance
    assert relative_error(grad_t.cpu(), expected[1]) <= tolerance
    if weights is not None:
        assert relative_error(grad_w.cpu(), expected[2]) <= tolerance


@pytest.mark.parametrize("name", ["feature_map_loss", "delta_loss", "channel_attentive_loss", "spatial_attentive_loss"])
def test_multi_layer_losses_match_the_sum_of_reference_layers(name):
    targets, sources = _layers(RESNET_LIKE, torch.float32)
    targets = [t.requires_grad_(True) for t in targets]
    weights = layer_weights(name, targets, torch.Generator().manual_seed(12), requires_grad=True)
    check_list_loss(name, targets, sources, weights, "triton")


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_gradcheck_and_gradgradcheck_multi_layer(grouping):
    check_multi_layer_gradients(OPS, grouping, *_layers([(2, 3, 3, 2), (1, 4, 5)], torch.float64))


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_opcheck(grouping):
    targets, sources = _layers([(2, 3, 4, 2), (2, 5, 3)], torch.float32)
    torch.library.opcheck(getattr(OPS, f"{grouping}_sqdist"), (targets[0], sources[0]))
    torch.library.opcheck(getattr(OPS, f"grouped_{grouping}_sqdist"), (targets, sources))
    grads = [_grad_for(grouping, t, torch.Generator().manual_seed(1)) for t in targets]
    torch.library.opcheck(getattr(OPS, f"grouped_{grouping}_sqdist_backward"), (grads, targets, sources))


def test_compile_fullgraph_matches_eager():
    targets, sources = _layers([(2, 4, 3, 3), (2, 8, 2, 2)], torch.float32)
    attentions = [torch.rand(2, 4, device=DEVICE).softmax(-1), torch.rand(2, 8, device=DEVICE).softmax(-1)]

    def loss(t, s, a):
        return functional.channel_attentive_loss(t, s, a, backend="triton")

    compiled = torch.compile(loss, fullgraph=True)
    assert relative_error(compiled(targets, sources, attentions), loss(targets, sources, attentions)) <= 1e-6


def test_64_bit_offsets():
    """Channels more than 2^31 elements apart (op_checks.far_apart_features builds them cheaply)."""
    if DEVICE != "cpu":
        pytest.skip("the far-apart features are built in host memory")
    from op_checks import check_ops_read_beyond_2_31

    # one bfloat16 ulp: Triton's interpreter rounds float32 to bfloat16 by truncation
    check_ops_read_beyond_2_31(OPS, backward_rtol=2**-7)


# --------------------------------------------------------------------------- host planning


def _offsets_of(levels, tensor):
    """Every element offset an axis of index levels reaches in one tensor."""
    offsets = [0]
    for size, strides in levels:
        offsets = [o + i * strides[tensor] for o in offsets for i in range(size)]
    return offsets


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_alignment_promises_hold(grouping, layouts, dtype):
    """When the host promises ALIGN > 1 (16-byte vector loads on a GPU, where a false
    promise reads misaligned memory), every address, every stride off the fast axis and
    every length along it really is a multiple of ALIGN elements."""
    target, source = _features((2, 8, 4, 8), dtype, layouts)
    for output in (None, torch.empty_like(target)):
        plan = triton_launch.plan_layer(target, source, output, grouping)
        rows_fast, fast_unit = triton_launch._launch_flags([plan])
        splits = triton_launch._splits([plan], rows_fast, triton_launch.SplitPolicy(64, 8))
        if not triton_launch._aligned_layers([plan], splits, rows_fast, fast_unit, target.element_size())[0]:
            continue
        align = 16 // target.element_size()
        tensors = 3 if output is not None else 2
        assert all(t.data_ptr() % 16 == 0 for t in (plan.target, plan.source, plan.output) if t is not None)
        slow = plan.reduced_levels + plan.kept_levels[:-1] if rows_fast else plan.kept_levels
        for tensor in range(tensors):
            assert all(offset % align == 0 for offset in _offsets_of(slow, tensor))
        fast_length = plan.kept_levels[-1][0] if rows_fast else plan.k
        assert fast_length % align == 0 and (rows_fast or splits[0][1] % align == 0 or splits[0][0] == 1)


def test_each_layer_of_a_launch_is_aligned_on_its_own():
    """ResNet-like layers where one map (3x3) breaks 16-byte alignment: the others keep
    their vector loads (the kernels choose the aligned or plain loop per layer)."""
    targets, sources = _layers(RESNET_LIKE, torch.float32)
    plans = [triton_launch.plan_layer(t, s, None, "channel") for t, s in zip(targets, sources)]
    rows_fast, fast_unit = triton_launch._launch_flags(plans)
    splits = triton_launch._splits(plans, rows_fast, triton_launch.SplitPolicy(1, 8))
    aligned = triton_launch._aligned_layers(plans, splits, rows_fast, fast_unit, 4)
    assert fast_unit and not rows_fast
    assert aligned == [True, True, False, True]
    assert triton_launch._vector_width(aligned, 4) == 4
