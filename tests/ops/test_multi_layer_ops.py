"""The multi-layer ops of the C++ library (afa_ext::grouped_*) on the CPU, and the losses'
lists of layers: equal to the single ops layer by layer, autograd, opcheck, errors."""

from __future__ import annotations

import pytest
import torch

from loss_cases import needs_cpu
from op_checks import check_multi_layer_gradients, check_list_loss, grad_for, layer_weights

pytestmark = needs_cpu
OPS = torch.ops.afa_ext
GROUPINGS = ("channel", "spatial")
SHAPES = [(2, 8, 6, 6), (2, 16, 3, 3), (2, 4, 5), (2, 32, 1, 1)]
# The four hooked ResNet layers' shapes at a quarter of their channels, with an empty layer
# among them: the multi-layer forward splits every layer's work items among the threads.
LARGE_SHAPES = [(3, 64, 56, 56), (3, 128, 28, 28), (3, 0, 14, 14), (3, 256, 14, 14), (3, 512, 7, 7)]


def _layers(dtype=torch.float32, shapes=SHAPES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    targets = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    sources = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    targets[0] = targets[0].contiguous(memory_format=torch.channels_last)
    return targets, sources


@pytest.mark.parametrize("shapes", [SHAPES, LARGE_SHAPES], ids=["small", "large"])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_multi_layer_ops_equal_the_single_ops(grouping, dtype, shapes):
    targets, sources = _layers(dtype, shapes)
    partials = getattr(OPS, f"grouped_{grouping}_sqdist")(targets, sources)
    generator = torch.Generator().manual_seed(1)
    grads = [grad_for(grouping, t, generator) for t in targets]
    gradients = getattr(OPS, f"grouped_{grouping}_sqdist_backward")(grads, targets, sources)
    for t, s, g, partial, dt in zip(targets, sources, grads, partials, gradients):
        assert torch.equal(partial, getattr(OPS, f"{grouping}_sqdist")(t, s))
        assert torch.equal(dt, getattr(OPS, f"{grouping}_sqdist_backward")(g, t, s))


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_multi_layer_gradcheck_and_gradgradcheck(grouping):
    check_multi_layer_gradients(OPS, grouping, *_layers(torch.float64, [(2, 3, 3, 2), (1, 4, 5)]))


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_multi_layer_opcheck(grouping):
    targets, sources = _layers()
    torch.library.opcheck(getattr(OPS, f"grouped_{grouping}_sqdist"), (targets, sources))
    grads = [grad_for(grouping, t, torch.Generator().manual_seed(2)) for t in targets]
    torch.library.opcheck(getattr(OPS, f"grouped_{grouping}_sqdist_backward"), (grads, targets, sources))


def test_multi_layer_ops_refuse_bad_lists():
    targets, sources = _layers()
    with pytest.raises(RuntimeError, match="expected one source per target, got 4 targets and 3 sources"):
        OPS.grouped_channel_sqdist(targets, sources[:3])
    with pytest.raises(RuntimeError, match="expected one grad per target, got 4 targets and 1 grads"):
        OPS.grouped_channel_sqdist_backward([torch.zeros(2, 8)], targets, sources)
    with pytest.raises(RuntimeError, match="expected every layer on one device with one dtype"):
        OPS.grouped_spatial_sqdist([targets[0], targets[1].double()], [sources[0], sources[1].double()])
    with pytest.raises(RuntimeError, match="non-empty list of Tensors"):  # the dispatcher's own check
        OPS.grouped_spatial_sqdist([], [])


@pytest.mark.parametrize("name", ["feature_map_loss", "delta_loss", "channel_attentive_loss", "spatial_attentive_loss"])
def test_losses_over_layers_of_mixed_dtypes(name):
    """Layers of several dtypes: one multi-layer call per dtype, the sum of the layers' losses."""
    targets, sources = _layers()
    targets[1], sources[1] = targets[1].double(), sources[1].double()
    weights = layer_weights(name, targets, torch.Generator().manual_seed(3))
    check_list_loss(name, targets, sources, weights, "cpu", tolerance=1e-6)
