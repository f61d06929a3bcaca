"""torch.func transforms through the losses: grad, jacrev and vmap over a gradient, for the
compiled CPU backend against the pure-PyTorch reference, in float64."""

import pytest
import torch

import afa_ext
from afa_ext import functional as F

BACKENDS = [name for name in ("cpu",) if name in afa_ext.available_backends()]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="the compiled CPU backend is not built")


def _inputs(seed: int, layers: int):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(2, 3, 4, 5), (2, 5, 3, 3)][:layers]
    targets = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    sources = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    channel = [torch.softmax(torch.randn(s[0], s[1], generator=generator, dtype=torch.float64), 1) for s in shapes]
    spatial = [
        torch.softmax(torch.randn(s[0], s[2] * s[3], generator=generator, dtype=torch.float64), 1) for s in shapes
    ]
    delta = [torch.softmax(torch.randn(s[1], generator=generator, dtype=torch.float64), 0) for s in shapes]
    return targets, sources, {"fea_map": None, "delta": delta, "act": channel, "ast": spatial}


def _loss(kind, targets, sources, weights, backend):
    if kind == "fea_map":
        return F.feature_map_loss(targets, sources, backend=backend)
    function = {"delta": F.delta_loss, "act": F.channel_attentive_loss, "ast": F.spatial_attentive_loss}[kind]
    return function(targets, sources, weights, backend=backend)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("kind", ["fea_map", "delta", "act", "ast"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_jacrev_and_vmap_of_grad_match_the_reference(backend, kind, layers):
    targets, sources, weights = _inputs(layers, layers)
    weight = weights[kind]

    def loss_of(backend_name):
        return lambda first, *rest: _loss(kind, [first, *rest], sources, weight, backend_name)

    for transform in (torch.func.grad, torch.func.jacrev):
        expected = transform(loss_of("reference"), argnums=tuple(range(layers)))(*targets)
        given = transform(loss_of(backend), argnums=tuple(range(layers)))(*targets)
        for want, got in zip(expected, given):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            assert got.abs().max() > 0

    batch = torch.stack([targets[0], 2 * targets[0], targets[0] - 1])
    expected = torch.func.vmap(torch.func.grad(loss_of("reference")), in_dims=(0,) + (None,) * (layers - 1))(
        batch, *targets[1:]
    )
    given = torch.func.vmap(torch.func.grad(loss_of(backend)), in_dims=(0,) + (None,) * (layers - 1))(
        batch, *targets[1:]
    )
    torch.testing.assert_close(given, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(given[0], given[1])  # each entry got its own gradient


@pytest.mark.parametrize("kind", ["delta", "act", "ast"])
def test_grad_with_respect_to_the_weights(kind):
    targets, sources, weights = _inputs(7, 2)

    def loss_of(backend_name):
        return lambda *w: _loss(kind, targets, sources, list(w), backend_name)

    expected = torch.func.grad(loss_of("reference"), argnums=(0, 1))(*weights[kind])
    given = torch.func.grad(loss_of(BACKENDS[0]), argnums=(0, 1))(*weights[kind])
    for want, got in zip(expected, given):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
