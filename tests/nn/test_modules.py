"""Attention and loss modules against an independent float64 model written here.

The model re-implements the attention modules and the four losses (the formulas in the
docstring of afa_ext/functional.py) with float64 tensor ops, using only the modules'
parameter values; it never calls afa_ext.
"""

import pytest
import torch

import afa_ext
from afa_ext import (
    AttentiveChannelAlignment,
    AttentiveSpatialAlignment,
    ChannelAttention,
    DeltaAlignment,
    FeatureMapAlignment,
    SpatialAttention,
)

# The features here live on the CPU, so only backends that compute on it.
BACKENDS = [name for name in afa_ext.available_backends() if name in ("reference", "cpu")]
BATCH = 3
# (C, *spatial) of three hooked layers: two maps and one 1-D sequence.
SHAPES = [(6, 5, 4), (10, 3, 3), (4, 7)]
ATTENTIVE = [AttentiveSpatialAlignment, AttentiveChannelAlignment]


# ---------------------------------------------------------------- the float64 model


def flat64(x):
    return x.double().reshape(x.shape[0], x.shape[1], -1)


def softmax64(z):
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def spatial_attention64(source, reduce, expand, expand_bias):
    mean = flat64(source.detach()).mean(dim=1)  # (B, P)
    hidden = torch.clamp(mean @ reduce.T, min=0)
    return softmax64(hidden @ expand.T + expand_bias)


def channel_attention64(source, reduce, score, bias):
    hidden = torch.clamp(flat64(source.detach()) @ reduce.T, min=0)  # (B, C, k)
    return softmax64((hidden @ score.T).squeeze(-1) + bias)


def squared64(target, source):
    """D^2 as (B, C, P) in float64; the target may carry a float64 graph."""
    return (flat64(target) - flat64(source.detach())) ** 2


def fea_map64(target, source):
    return 0.5 * squared64(target, source).sum()


def delta64(target, source, w):
    sq = squared64(target, source)
    channels, positions = sq.shape[1], sq.shape[2]
    return 0.5 * (channels * w.double() * sq.sum(dim=2) / positions).sum()


def act64(target, source, g):
    sq = squared64(target, source)
    batch, channels = sq.shape[0], sq.shape[1]
    return 0.5 / batch * (channels * g * sq.sum(dim=2)).sum()


def ast64(target, source, a):
    sq = squared64(target, source)
    batch, positions = sq.shape[0], sq.shape[2]
    return 0.5 / batch * ((positions * a) ** 2 * sq.sum(dim=1)).sum()


def params64(attention):
    """The attention's parameters as float64 leaves, in the model's argument order."""
    if isinstance(attention, SpatialAttention):
        values = [attention.reduce.weight, attention.expand.weight, attention.expand.bias]
    else:
        values = [attention.reduce.weight, attention.score.weight, attention.bias]
    return [v.detach().double().requires_grad_() for v in values]


def module_params(attention):
    if isinstance(attention, SpatialAttention):
        return [attention.reduce.weight, attention.expand.weight, attention.expand.bias]
    return [attention.reduce.weight, attention.score.weight, attention.bias]


def attentive64(kind, target, source, params):
    if kind is AttentiveSpatialAlignment:
        return ast64(target, source, spatial_attention64(source, *params))
    return act64(target, source, channel_attention64(source, *params))


# ---------------------------------------------------------------- helpers


def features(dtype=torch.float32, shapes=SHAPES, batch=BATCH):
    targets = [torch.randn(batch, *shape).to(dtype).requires_grad_() for shape in shapes]
    sources = [torch.randn(batch, *shape).to(dtype).requires_grad_() for shape in shapes]
    return targets, sources


def perturb(module):
    """Move every parameter off its initial value (the channel bias starts at 0)."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.3 * torch.randn_like(param))


def assert_close(actual, expected, rtol=2e-5):
    expected = expected.detach()
    atol = rtol * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=atol)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- attention modules


@pytest.mark.parametrize("shape", SHAPES)
def test_spatial_attention_matches_model(shape):
    positions = torch.Size(shape[1:]).numel()
    attention = SpatialAttention(positions)
    perturb(attention)
    source = torch.randn(BATCH, *shape)
    a = attention(source)
    assert a.shape == (BATCH, positions) and a.dtype == torch.float32
    assert_close(a.sum(dim=1), torch.ones(BATCH, dtype=torch.float64))
    assert_close(a, spatial_attention64(source, *params64(attention)))


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_attention_matches_model(shape):
    channels, positions = shape[0], torch.Size(shape[1:]).numel()
    attention = ChannelAttention(channels, positions)
    perturb(attention)
    source = torch.randn(BATCH, *shape)
    g = attention(source)
    assert g.shape == (BATCH, channels) and g.dtype == torch.float32
    assert_close(g.sum(dim=1), torch.ones(BATCH, dtype=torch.float64))
    assert_close(g, channel_attention64(source, *params64(attention)))


def test_attention_hidden_width():
    assert SpatialAttention(56 * 56).hidden == 56
    assert SpatialAttention(7 * 7).hidden == 7
    assert ChannelAttention(8, 15).hidden == 4
    assert SpatialAttention(1).hidden == 1
    attention = ChannelAttention(8, 15, hidden=5)
    assert attention.reduce.weight.shape == (5, 15) and attention.score.weight.shape == (1, 5)
    assert torch.equal(attention.bias, torch.zeros(8))
    with pytest.raises(ValueError, match="hidden"):
        SpatialAttention(9, hidden=0)


def test_attention_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"9 positions.*\(2, 4, 4, 4\)"):
        SpatialAttention(9)(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"4 channels and 9 positions.*\(2, 5, 3, 3\)"):
        ChannelAttention(4, 9)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="at least 3 dims"):
        ChannelAttention(4, 9)(torch.randn(4, 9))


@pytest.mark.parametrize("cls", [SpatialAttention, ChannelAttention])
def test_attention_half_features(cls):
    shape = SHAPES[0]
    positions = torch.Size(shape[1:]).numel()
    attention = cls(positions) if cls is SpatialAttention else cls(shape[0], positions)
    perturb(attention)
    source = torch.randn(BATCH, *shape).to(torch.bfloat16)
    model = spatial_attention64 if cls is SpatialAttention else channel_attention64
    a = attention(source)
    assert a.dtype == torch.float32
    assert_close(a, model(source, *params64(attention)), rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = attention(source)
    assert a.dtype == torch.float32
    assert_close(a.sum(dim=1), torch.ones(BATCH, dtype=torch.float64))


# ---------------------------------------------------------------- loss modules


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_map_alignment(backend):
    targets, sources = features()
    loss = FeatureMapAlignment(backend=backend)(targets, sources)
    loss.backward()
    leaves = [t.detach().double().requires_grad_() for t in targets]
    expected = sum(fea_map64(t, s) for t, s in zip(leaves, sources))
    expected.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, expected)
    for target, source, leaf in zip(targets, sources, leaves):
        assert_close(target.grad, leaf.grad)
        assert source.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_alignment(backend):
    weights = [torch.softmax(torch.randn(shape[0]), dim=0) for shape in SHAPES]
    module = DeltaAlignment(weights, backend=backend)
    assert list(module.parameters()) == []
    assert len(list(module.buffers())) == len(SHAPES)
    targets, sources = features()
    loss = module(targets, sources)
    loss.backward()
    leaves = [t.detach().double().requires_grad_() for t in targets]
    expected = sum(delta64(t, s, w) for t, s, w in zip(leaves, sources, weights))
    expected.backward()
    assert_close(loss, expected)
    for target, source, leaf in zip(targets, sources, leaves):
        assert_close(target.grad, leaf.grad)
        assert source.grad is None


@pytest.mark.parametrize("kind", ATTENTIVE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attentive_alignment(kind, backend):
    module = kind(backend=backend, feature_shapes=SHAPES)
    perturb(module)
    targets, sources = features()
    loss = module(targets, sources)
    loss.backward()

    leaves = [t.detach().double().requires_grad_() for t in targets]
    params = [params64(attention) for attention in module.attention]
    expected = sum(attentive64(kind, t, s, p) for t, s, p in zip(leaves, sources, params))
    expected.backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, expected)
    for target, source, leaf in zip(targets, sources, leaves):
        assert_close(target.grad, leaf.grad)
        assert source.grad is None
    for attention, model_params in zip(module.attention, params):
        for param, model_param in zip(module_params(attention), model_params):
            assert param.grad is not None
            assert_close(param.grad, model_param.grad)
    assert all(param.grad.abs().sum() > 0 for param in module.parameters())


@pytest.mark.parametrize("kind", ATTENTIVE)
def test_lazy_materialisation(kind):
    targets, sources = features()
    eager = kind(feature_shapes=SHAPES)
    count = sum(p.numel() for p in eager.parameters())
    assert count > 0 and eager.feature_shapes == SHAPES

    lazy = kind()
    assert list(lazy.parameters()) == [] and lazy.feature_shapes is None
    with torch.no_grad():
        lazy(targets, sources)
    assert sum(p.numel() for p in lazy.parameters()) == count
    assert lazy.feature_shapes == SHAPES and len(lazy.attention) == len(SHAPES)
    assert all(p.requires_grad for p in lazy.parameters())

    other = kind(hidden=2)
    other.materialize(sources)
    assert all(attention.hidden == 2 for attention in other.attention)
    other.materialize(sources)  # a second call only checks
    assert len(other.attention) == len(SHAPES)


@pytest.mark.parametrize("kind", ATTENTIVE)
def test_shape_errors(kind):
    module = kind(feature_shapes=SHAPES)
    targets, sources = features()
    with pytest.raises(ValueError, match="3 layers.*got 2 layers"):
        module(targets[:2], sources[:2])
    other_targets, other_sources = features(shapes=[(6, 4, 4), (10, 3, 3), (4, 7)])
    with pytest.raises(ValueError, match=r"\(6, 5, 4\).*\(6, 4, 4\)"):
        module(other_targets, other_sources)
    with pytest.raises(ValueError, match="3 layers"):
        module.materialize(sources[1:])
    with pytest.raises(ValueError, match="feature_shapes"):
        kind(feature_shapes=[])


@pytest.mark.parametrize(
    "make",
    [
        FeatureMapAlignment,
        lambda: DeltaAlignment([torch.full((shape[0],), 1.0 / shape[0]) for shape in SHAPES]),
        AttentiveSpatialAlignment,
        AttentiveChannelAlignment,
    ],
)
def test_bad_layer_lists(make):
    module = make()
    targets, sources = features()
    with pytest.raises(ValueError, match="as many source as target layers"):
        module(targets, sources[:2])
    with pytest.raises(ValueError, match="empty"):
        module([], [])
    with pytest.raises(TypeError, match="list of feature maps"):
        module(targets[0], sources[0])
    with pytest.raises(TypeError, match=r"layer 1 of targets to be a Tensor .* got str"):
        module([targets[0], "layer", targets[2]], sources)
    with pytest.raises(ValueError, match=r"layer 0 of sources .* got shape \(3, 6\)"):
        module(targets, [sources[0][:, :, 0, 0]] + sources[1:])


def test_delta_weight_errors():
    with pytest.raises(
        TypeError, match=r"channel_weights\[0\] to be a float tensor of shape \(C,\), got a torch.int64"
    ):
        DeltaAlignment([torch.ones(3, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"channel_weights\[1\] .* got shape \(2, 3\)"):
        DeltaAlignment([torch.ones(3), torch.ones(2, 3)])


@pytest.mark.parametrize("kind", ATTENTIVE)
def test_state_dict_round_trip(kind):
    targets, sources = features()
    trained = kind()
    trained.materialize(sources)
    perturb(trained)
    state = trained.state_dict()

    restored = kind(feature_shapes=SHAPES)
    restored.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(restored(targets, sources), trained(targets, sources))
    with pytest.raises(RuntimeError, match="materialize"):
        kind().load_state_dict(state)


def test_delta_state_dict_round_trip():
    weights = [torch.softmax(torch.randn(shape[0]), dim=0) for shape in SHAPES]
    restored = DeltaAlignment([torch.zeros(shape[0]) for shape in SHAPES])
    restored.load_state_dict(DeltaAlignment(weights).state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.layer_weights(), weights))


@pytest.mark.parametrize("name", ["fea_map", "delta", "spatial", "channel"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_features(name, backend):
    targets, sources = features(torch.bfloat16)
    weights = [torch.softmax(torch.randn(shape[0]), dim=0) for shape in SHAPES]
    if name == "fea_map":
        module = FeatureMapAlignment(backend=backend)
        expected = sum(fea_map64(t, s) for t, s in zip(targets, sources))
    elif name == "delta":
        module = DeltaAlignment(weights, backend=backend)
        expected = sum(delta64(t, s, w) for t, s, w in zip(targets, sources, weights))
    else:
        kind = AttentiveSpatialAlignment if name == "spatial" else AttentiveChannelAlignment
        module = kind(backend=backend, feature_shapes=SHAPES)
        expected = sum(attentive64(kind, t, s, params64(a)) for t, s, a in zip(targets, sources, module.attention))
    loss = module(targets, sources)
    assert loss.dtype == torch.float32
    assert_close(loss, expected, rtol=1e-2)
    loss.backward()
    for target, source in zip(targets, sources):
        assert target.grad is not None and target.grad.dtype == torch.bfloat16
        assert source.grad is None
