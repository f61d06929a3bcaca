"""torch.autograd.gradcheck and gradgradcheck in float64 of every loss and backend, w.r.t.
the target and the weights/attention, and bitwise determinism of loss and gradients."""

from __future__ import annotations

import pytest
import torch

from loss_cases import BACKENDS, LOSS_IDS, LOSSES, make_features, make_weights, run_loss

GRADCHECK_CASES = [((2, 3, 4, 5), "contiguous"), ((2, 3, 5), "cropped"), ((1, 2, 3, 2, 2), "channels_last")]


@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck], ids=["grad", "gradgrad"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("shape,layout", GRADCHECK_CASES, ids=[layout for _, layout in GRADCHECK_CASES])
def test_gradcheck(check, backend, case, shape, layout):
    """First derivatives, and second ones (gradient penalties, meta-learning) through the
    backward op."""
    generator = torch.Generator().manual_seed(41)
    target, source = make_features(shape, torch.float64, layout, layout, generator)
    source = source.detach()
    weights = make_weights(case.weights, shape, torch.float64, generator)
    if weights is None:
        assert check(lambda t: case.call(t, source, None, backend), (target,))
    else:
        assert check(lambda t, w: case.call(t, source, w, backend), (target, weights))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bitwise_deterministic(backend, case, dtype):
    shape = (4, 32, 17, 19)
    generator = torch.Generator().manual_seed(43)
    target, source = make_features(shape, dtype, "channels_last", "contiguous", generator)
    weights = make_weights(case.weights, shape, dtype, generator)
    first = run_loss(case, target, source, weights, backend)
    second = run_loss(case, target, source, weights, backend)
    for a, b in zip(first, second):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b), f"{case.id} backend={backend}: two runs differ"
