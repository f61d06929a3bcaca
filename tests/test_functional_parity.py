"""Every available backend against the independent float64 model: the four losses, loss
value and gradients (target, weights/attention), every dtype, 3-D/4-D/5-D features in
many memory layouts, within the tolerances of loss_cases.py (float32: relative error
<= 2e-5; bfloat16/float16: at most twice the pure-PyTorch loss's error in that dtype)."""

from __future__ import annotations

import pytest
import torch

import float64_model
from loss_cases import (
    BACKENDS,
    DTYPES,
    LAYOUT_IDS,
    LAYOUT_PAIRS,
    LOSS_IDS,
    LOSSES,
    SHAPES,
    UPSTREAM,
    assert_matches_model,
    loss_dtype,
    make_features,
    make_weights,
    run_loss,
)

LAYOUTS_MEDIUM = ["contiguous", "channels_last", "channels_last_cropped"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("ndim", sorted(SHAPES))
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_model(backend, case, ndim, layouts, dtype):
    shape = SHAPES[ndim]
    generator = torch.Generator().manual_seed(1000 * ndim + LAYOUT_PAIRS.index(layouts))
    target, source = make_features(shape, dtype, *layouts, generator)
    weights = make_weights(case.weights, shape, dtype, generator)
    assert_matches_model(case, backend, target, source, weights)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 1, 1), (2, 1, 5, 3), (1, 4, 1, 1, 1)], ids=str)
def test_degenerate_sizes(backend, case, shape):
    """Single channel, single position, single sample."""
    generator = torch.Generator().manual_seed(7)
    target, source = make_features(shape, torch.float32, "contiguous", "contiguous", generator)
    weights = make_weights(case.weights, shape, torch.float32, generator)
    assert_matches_model(case, backend, target, source, weights)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("layout", LAYOUTS_MEDIUM)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vector_sized_shapes(backend, case, layout, dtype):
    """C and P past any SIMD width, with odd tails, so vector loops and their tails run.
    Unscaled values: the float16 sums of squares exceed float16's max, so this also checks
    that every backend, the reference included, sums half features in float32."""
    shape = (3, 37, 19, 23)
    generator = torch.Generator().manual_seed(LAYOUTS_MEDIUM.index(layout))
    target, source = make_features(shape, dtype, layout, "contiguous", generator)
    weights = make_weights(case.weights, shape, dtype, generator)
    assert_matches_model(case, backend, target, source, weights)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("shape", [(2, 3, 70000), (2, 3000, 5)], ids=["long_P", "long_C"])
def test_long_reductions_float32(backend, case, shape):
    generator = torch.Generator().manual_seed(11)
    target, source = make_features(shape, torch.float32, "contiguous", "contiguous", generator)
    weights = make_weights(case.weights, shape, torch.float32, generator)
    assert_matches_model(case, backend, target, source, weights)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5)], ids=["B0", "C0", "P0"])
def test_empty_features_give_zero(backend, case, dtype, shape):
    """An empty batch (and, likewise, no channels or no positions) is an empty sum: 0,
    never NaN or an exception."""
    generator = torch.Generator().manual_seed(3)
    target, source = make_features(shape, dtype, "contiguous", "contiguous", generator)
    weights = make_weights(case.weights, shape, dtype, generator)
    loss, grad_t, grad_w = run_loss(case, target, source, weights, backend)
    assert loss.dtype == loss_dtype(dtype)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert grad_t.shape == shape
    if weights is not None:
        assert grad_w.shape == weights.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_in_target_propagates(backend, case, dtype):
    shape = (2, 3, 4, 5)
    generator = torch.Generator().manual_seed(5)
    target, source = make_features(shape, dtype, "contiguous", "contiguous", generator)
    with torch.no_grad():
        target[1, 2, 3, 1] = float("nan")
    weights = make_weights(case.weights, shape, dtype, generator)
    loss = case.call(target, source, weights, backend)
    assert torch.isnan(loss), f"{case.id} backend={backend}: loss {loss.item()} hides a NaN"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
def test_source_gets_no_gradient_even_through_weights(backend, case):
    """The loss never differentiates into the source, also when source requires grad."""
    shape = (2, 3, 4, 5)
    generator = torch.Generator().manual_seed(9)
    target, source = make_features(shape, torch.float64, "contiguous", "contiguous", generator)
    weights = make_weights(case.weights, shape, torch.float64, generator)
    loss = case.call(target, source, weights, backend)
    inputs = [target, source] + ([weights] if weights is not None else [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    assert grads[1] is None or bool((grads[1] == 0).all())
    assert grads[0] is not None


def test_float64_model_gradients_match_its_own_autograd():
    """The model's analytic gradients agree with autograd of its loss formula."""
    shape = (2, 3, 4, 5)
    generator = torch.Generator().manual_seed(13)
    for case in LOSSES:
        target, source = make_features(shape, torch.float64, "contiguous", "contiguous", generator)
        weights = make_weights(case.weights, shape, torch.float64, generator)
        value, grad_t, grad_w = float64_model.loss_and_grads(case.model_name, target, source, weights, UPSTREAM)
        loss = float64_model.loss(case.model_name, target, source, weights)
        inputs = [target] + ([weights] if weights is not None else [])
        auto = torch.autograd.grad(loss * UPSTREAM, inputs)
        torch.testing.assert_close(loss.detach(), value, rtol=1e-14, atol=0)
        torch.testing.assert_close(auto[0], grad_t, rtol=1e-13, atol=1e-14)
        if weights is not None:
            torch.testing.assert_close(auto[1], grad_w, rtol=1e-13, atol=1e-14)


def test_float64_model_known_values():
    """Hand-computed numbers pin the model's normalisations (B=2, C=2, P=2)."""
    target = torch.tensor([[[1.0, 2.0], [0.0, 3.0]], [[1.0, 1.0], [2.0, 0.0]]], dtype=torch.float64)
    source = torch.zeros_like(target)
    # d[n, j] = [[5, 9], [2, 4]]; e[n, p] = [[1, 13], [5, 1]]
    assert float64_model.loss("feature_map", target, source).item() == pytest.approx(0.5 * 20)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    # 0.5 * C / P * sum_n sum_j w_j d[n,j] = 0.5 * (0.25*7 + 0.75*13)
    assert float64_model.loss("delta", target, source, w).item() == pytest.approx(0.5 * (1.75 + 9.75))
    g = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    # (0.5 / B) * C * sum g d = 0.25 * 2 * (2.5 + 4.5 + 2)
    assert float64_model.loss("channel_attentive", target, source, g).item() == pytest.approx(4.5)
    a = torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=torch.float64)
    # (0.5 / B) * sum (P a)^2 e = 0.25 * (1 + 13 + 0.25 * 5 + 2.25 * 1)
    assert float64_model.loss("spatial_attentive", target, source, a).item() == pytest.approx(4.375)
