"""The four losses through each GPU backend (``cuda``, ``triton``) on CUDA tensors, end to
end: values and gradients against the float64 model, lists of layers against the sum of
the reference per layer, torch.compile, and ``auto``'s measured choice between them.
Skipped without a CUDA device (the kernels' own tests are test_cuda_kernels.py and
test_triton_backend.py)."""

from __future__ import annotations

import os

import pytest
import torch

import afa_ext
import float64_model
from afa_ext import functional
from afa_ext.ops import auto_choice
from loss_cases import LOSS_IDS, LOSSES, make_features, make_weights, relative_error, run_loss
from op_checks import check_list_loss, layer_weights

GPU_BACKENDS = list(afa_ext.ops.backends.gpu_candidates())
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not GPU_BACKENDS, reason="needs a CUDA device and a GPU backend"
)
LAYER_SHAPES = [(4, 16, 14, 14), (4, 32, 7, 7), (4, 64, 4, 4), (4, 128, 2, 2)]
FUNCTIONS = ["feature_map_loss", "delta_loss", "channel_attentive_loss", "spatial_attentive_loss"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_loss_and_gradients_match_the_model(backend, case, dtype):
    generator = torch.Generator().manual_seed(21)
    target, source = make_features((4, 24, 9, 9), dtype, "channels_last", "contiguous", generator, device="cuda")
    weights = make_weights(case.weights, tuple(target.shape), dtype, generator)
    weights = None if weights is None else weights.cuda()
    loss, grad_t, grad_w = run_loss(case, target, source, weights, backend)
    expected = float64_model.loss_and_grads(
        case.model_name,
        target.detach().cpu(),
        source.detach().cpu(),
        None if weights is None else weights.detach().cpu(),
        1.7,
    )
    tolerance = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1e-2}[dtype]
    assert relative_error(loss.cpu(), expected[0]) <= tolerance
    assert relative_error(grad_t.cpu(), expected[1]) <= tolerance
    if weights is not None:
        assert relative_error(grad_w.cpu(), expected[2]) <= tolerance


def _layer_inputs(name, generator):
    targets = [torch.randn(shape, generator=generator).cuda().requires_grad_(True) for shape in LAYER_SHAPES]
    sources = [torch.randn(shape, generator=generator).cuda() for shape in LAYER_SHAPES]
    return targets, sources, layer_weights(name, targets, generator, requires_grad=True)


@pytest.mark.parametrize("backend", GPU_BACKENDS + ["auto"])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_lists_of_layers_match_the_reference_layer_by_layer(backend, name):
    targets, sources, weights = _layer_inputs(name, torch.Generator().manual_seed(22))
    check_list_loss(name, targets, sources, weights, backend)


def test_auto_remembers_a_gpu_backend_per_layer_shapes():
    targets, sources, weights = _layer_inputs("channel_attentive_loss", torch.Generator().manual_seed(23))
    functional.channel_attentive_loss(targets, sources, weights)
    choices = auto_choice._CHOICES
    key = auto_choice.layers_key("channel", targets)
    if len(GPU_BACKENDS) == 2 and not os.environ.get(auto_choice.PIN_VARIABLE):
        assert choices[key] in GPU_BACKENDS
    else:
        assert key not in choices


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    targets, sources, weights = _layer_inputs("spatial_attentive_loss", torch.Generator().manual_seed(24))

    def loss(t, s, a):
        return functional.spatial_attentive_loss(t, s, a, backend=backend)

    compiled = torch.compile(loss, fullgraph=True)
    eager_value = loss(targets, sources, weights)
    compiled_value = compiled(targets, sources, weights)
    assert relative_error(compiled_value.detach(), eager_value.detach()) <= 1e-6
    compiled_value.backward()
    assert all(t.grad is not None for t in targets)
