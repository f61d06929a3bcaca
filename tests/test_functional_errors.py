"""Bad input gets a clear error naming the function, what was expected and what was given,
for every loss and before any backend runs."""

from __future__ import annotations

import re

import pytest
import torch

import afa_ext
from loss_cases import BACKENDS, HAS_CPU, LOSS_IDS, LOSSES, make_weights

SHAPE = (2, 3, 4, 5)
WEIGHTED = [case for case in LOSSES if case.weights is not None]
FUNCTION_NAMES = {
    "feature_map": "feature_map_loss",
    "delta": "delta_loss",
    "ACT": "channel_attentive_loss",
    "AST_flat": "spatial_attentive_loss",
    "AST_map": "spatial_attentive_loss",
}


def _features(shape=SHAPE, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator).to(dtype), torch.randn(shape, generator=generator).to(dtype)


def _good_weights(case, shape=SHAPE):
    return make_weights(case.weights, shape, torch.float32, torch.Generator().manual_seed(1))


def _raises(case, error, message, target, source, weights="good", backend="auto"):
    """Call ``case`` and check the error type and that the message names the function
    and matches ``message`` (a regex)."""
    if weights == "good":
        weights = _good_weights(case, tuple(target.shape) if isinstance(target, torch.Tensor) else SHAPE)
    with pytest.raises(error, match=re.escape(FUNCTION_NAMES[case.id]) + ": " + message):
        case.call(target, source, weights, backend)


# --------------------------------------------------------------------------- features


@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
def test_non_tensor_target_and_source(case):
    target, source = _features()
    _raises(
        case,
        TypeError,
        r"expected target to be a torch\.Tensor or a list of Tensors, one per layer; "
        r"got a list of list",
        target.tolist(),
        source,
    )
    _raises(case, TypeError, r"expected source to be a torch\.Tensor, got ndarray", target, source.numpy())


@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("shape", [(6,), (2, 3)], ids=str)
def test_fewer_than_three_dims(case, shape):
    target, source = _features(shape)
    with pytest.raises(
        ValueError,
        match=re.escape(f"expected target of shape (B, C, *spatial) with at least 3 dims, got shape {shape}"),
    ):
        case.call(target, source, None if case.weights is None else torch.ones(3), "auto")


@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
def test_mismatched_shapes(case):
    target, _ = _features()
    source = torch.zeros(2, 3, 4, 6)
    _raises(
        case,
        ValueError,
        re.escape("expected source to have the shape of target (2, 3, 4, 5), got (2, 3, 4, 6)"),
        target,
        source,
    )


@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("which", ["target", "source"])
def test_integer_features(case, which):
    target, source = _features()
    if which == "target":
        target = target.to(torch.int64)
    else:
        source = source.to(torch.int32)
    given = "int64" if which == "target" else "int32"
    _raises(
        case,
        TypeError,
        rf"expected {which} to have a floating-point dtype \(float64, float32, bfloat16, "
        rf"float16\), got {given}",
        target,
        source,
    )


@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
def test_mismatched_dtypes(case):
    target, source = _features()
    _raises(
        case,
        TypeError,
        re.escape("expected source to have the dtype of target (float32), got float64"),
        target,
        source.double(),
    )
    _raises(
        case,
        TypeError,
        re.escape("expected source to have the dtype of target (bfloat16), got float16"),
        target.bfloat16(),
        source.half(),
    )


@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
def test_features_on_different_devices(case):
    target, source = _features()
    _raises(
        case,
        ValueError,
        "expected target and source on one device, got target on cpu and source on meta",
        target,
        source.to("meta"),
    )


# --------------------------------------------------------------------------- weights

WRONG_WEIGHT_SHAPES = {
    "delta": ((2, 3), "channel_weights", r"\(3,\)"),
    "ACT": ((3, 2), "attention", r"\(2, 3\)"),
    "AST_flat": ((2, 19), "attention", r"\(2, 20\) or \(2, 1, 4, 5\)"),
    "AST_map": ((2, 3, 4, 5), "attention", r"\(2, 20\) or \(2, 1, 4, 5\)"),
}


@pytest.mark.parametrize("case", WEIGHTED, ids=[c.id for c in WEIGHTED])
def test_wrong_weight_shape(case):
    target, source = _features()
    shape, what, expected = WRONG_WEIGHT_SHAPES[case.id]
    given = re.escape(str(shape))
    _raises(
        case,
        ValueError,
        rf"expected {what} of shape {expected} for features of shape \(2, 3, 4, 5\), "
        rf"got {given}",
        target,
        source,
        torch.ones(shape),
    )


@pytest.mark.parametrize("case", WEIGHTED, ids=[c.id for c in WEIGHTED])
def test_non_tensor_weights(case):
    target, source = _features()
    what = "channel_weights" if case.id == "delta" else "attention"
    _raises(
        case,
        TypeError,
        rf"expected {what} to be a torch\.Tensor, got list",
        target,
        source,
        _good_weights(case).tolist(),
    )


@pytest.mark.parametrize("case", WEIGHTED, ids=[c.id for c in WEIGHTED])
def test_integer_weights(case):
    target, source = _features()
    what = "channel_weights" if case.id == "delta" else "attention"
    weights = torch.ones(_good_weights(case).shape, dtype=torch.int32)
    _raises(
        case, TypeError, rf"expected {what} to have a floating-point dtype \(.*\), got int32", target, source, weights
    )


@pytest.mark.parametrize("case", WEIGHTED, ids=[c.id for c in WEIGHTED])
def test_weights_on_other_device(case):
    target, source = _features()
    what = "channel_weights" if case.id == "delta" else "attention"
    weights = _good_weights(case).detach().to("meta")
    _raises(case, ValueError, rf"expected {what} on the features' device cpu, got meta", target, source, weights)


# --------------------------------------------------------------------------- backends


@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("name", ["fast", "CPU", "", None])
def test_unknown_backend(case, name):
    target, source = _features()
    _raises(
        case,
        ValueError,
        rf"unknown backend {re.escape(repr(name))}; expected one of auto, reference, cpu, "
        rf"triton, cuda",
        target,
        source,
        backend=name,
    )


@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("name", [n for n in ("triton", "cuda", "cpu") if n not in afa_ext.available_backends()])
def test_unavailable_backend_says_why(case, name):
    target, source = _features()
    reasons = {
        "triton": r"(the triton package is not installed|torch sees no CUDA device \(TRITON_INTERPRET=1 runs "
        r"the Triton kernels on CPU tensors|the Triton kernels did not load: .+)",
        "cuda": "(afa_ext._C was built without CUDA kernels|afa_ext._C has CUDA kernels but torch sees no CUDA "
        "device|the compiled extension afa_ext._C did not load: .+)",
        "cpu": "the compiled extension afa_ext._C did not load: .+",
    }
    assert issubclass(afa_ext.BackendUnavailableError, RuntimeError)
    _raises(
        case,
        afa_ext.BackendUnavailableError,
        rf"backend '{name}' is unavailable: {reasons[name]}",
        target,
        source,
        backend=name,
    )


@pytest.mark.skipif(not HAS_CPU, reason="backend 'cpu' unavailable")
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
def test_cpu_backend_refuses_other_devices(case):
    target, source = _features()
    target, source = target.to("meta"), source.to("meta")
    weights = None if case.weights is None else _good_weights(case).detach().to("meta")
    _raises(
        case,
        ValueError,
        "backend 'cpu' computes on cpu tensors, got tensors on meta",
        target,
        source,
        weights,
        backend="cpu",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_checks_come_before_the_backend(backend):
    """Every available backend validates: a bad shape never reaches a kernel."""
    case = LOSSES[2]  # ACT
    target, source = _features()
    _raises(
        case, ValueError, r"expected attention of shape \(2, 3\)", target, source, torch.ones(2, 4), backend=backend
    )


# --------------------------------------------------------------------------- lists of layers


def test_lists_of_layers_are_checked_layer_by_layer():
    targets = [torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 2, 2)]
    sources = [torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 2, 3)]
    attention = [torch.zeros(2, 3), torch.zeros(2, 5)]
    F = afa_ext.functional
    with pytest.raises(
        ValueError,
        match=re.escape(
            "channel_attentive_loss (layer 1): expected source to have "
            "the shape of target (2, 5, 2, 2), got (2, 5, 2, 3)"
        ),
    ):
        F.channel_attentive_loss(targets, sources, attention)
    sources[1] = torch.zeros(2, 5, 2, 2)
    with pytest.raises(
        TypeError,
        match="channel_attentive_loss: expected attention to be a list with one entry "
        "per layer like target, got Tensor",
    ):
        F.channel_attentive_loss(targets, sources, attention[0])
    with pytest.raises(
        ValueError, match="channel_attentive_loss: expected 2 layers of attention, as many as of target, got 1"
    ):
        F.channel_attentive_loss(targets, sources, attention[:1])
    with pytest.raises(
        ValueError,
        match=re.escape("spatial_attentive_loss (layer 1): expected attention of shape (2, 4) or (2, 1, 2, 2)"),
    ):
        F.spatial_attentive_loss(targets, sources, [torch.zeros(2, 16), torch.zeros(2, 5)])
    with pytest.raises(ValueError, match="feature_map_loss: expected at least one layer, got an empty target list"):
        F.feature_map_loss([], [])
    with pytest.raises(
        ValueError,
        match=re.escape(
            "feature_map_loss (layer 1): expected every layer on one device, got layer 0 on cpu and this one on meta"
        ),
    ):
        F.feature_map_loss([targets[0], targets[1].to("meta")], [sources[0], sources[1].to("meta")])


def test_a_one_layer_list_is_the_single_tensor():
    target, source = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    attention = torch.softmax(torch.randn(2, 3), dim=1)
    single = afa_ext.functional.channel_attentive_loss(target, source, attention)
    listed = afa_ext.functional.channel_attentive_loss([target], [source], [attention])
    assert torch.equal(single, listed)
