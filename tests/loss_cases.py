"""Shared helpers of the functional-loss and op tests: inputs in many layouts, the loss
table, running a loss with backward, and the error metrics and tolerances of the parity
tests."""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import afa_ext
from afa_ext import functional, reference

import float64_model

# The backends that compute on CPU tensors at full speed; the GPU backends (and Triton's
# interpreter) have their own test files: test_triton_backend.py, test_cuda_kernels.py.
BACKENDS = [name for name in afa_ext.available_backends() if name in ("reference", "cpu")]
HAS_CPU = "cpu" in BACKENDS
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="afa_ext._C is not built: backend 'cpu' unavailable")

HALF_DTYPES = (torch.bfloat16, torch.float16)
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
UPSTREAM = 1.7  # a non-unit upstream gradient: (loss * UPSTREAM).backward()

# Relative error bounds against the float64 model: float32 within 2e-5 (float64 within
# 1e-12). Half dtypes are judged against twice the error of the reference loss run in
# the same dtype, plus a small floor so an exactly-right reference does not make a test
# flaky.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}
HALF_FLOOR = 2e-5
REFERENCE_SANITY_EPS = 8


# --------------------------------------------------------------------------- losses


@dataclass(frozen=True)
class LossCase:
    """One loss, with how its weights are shaped. ``weights`` is None, "delta" (C,),
    "channel" (B, C), "spatial_flat" (B, P) or "spatial_map" (B, 1, *spatial)."""

    id: str
    model_name: str
    function: Callable
    reference: Callable
    weights: str | None

    def call(self, target, source, weights, backend):
        if self.weights is None:
            return self.function(target, source, backend=backend)
        return self.function(target, source, weights, backend=backend)

    def call_reference(self, target, source, weights):
        if self.weights is None:
            return self.reference(target, source)
        return self.reference(target, source, weights)


LOSSES = (
    LossCase("feature_map", "feature_map", functional.feature_map_loss, reference.feature_map_loss, None),
    LossCase("delta", "delta", functional.delta_loss, reference.delta_loss, "delta"),
    LossCase(
        "ACT", "channel_attentive", functional.channel_attentive_loss, reference.channel_attentive_loss, "channel"
    ),
    LossCase(
        "AST_flat",
        "spatial_attentive",
        functional.spatial_attentive_loss,
        reference.spatial_attentive_loss,
        "spatial_flat",
    ),
    LossCase(
        "AST_map",
        "spatial_attentive",
        functional.spatial_attentive_loss,
        reference.spatial_attentive_loss,
        "spatial_map",
    ),
)
LOSS_IDS = [case.id for case in LOSSES]


def weight_dtype(feature_dtype: torch.dtype) -> torch.dtype:
    """Weights are float32 with half features (AMP), else the features' dtype."""
    return torch.float32 if feature_dtype in HALF_DTYPES else feature_dtype


def make_weights(kind: str | None, shape, dtype: torch.dtype, generator: torch.Generator):
    """Channel weights (positive, summing to 1) or softmax attention, as a grad leaf."""
    if kind is None:
        return None
    batch, channels = shape[0], shape[1]
    positions = math.prod(shape[2:])
    dtype = weight_dtype(dtype)
    if kind == "delta":
        logits = torch.randn(channels, generator=generator, dtype=torch.float64)
        weights = torch.softmax(logits, dim=0)
    elif kind == "channel":
        logits = torch.randn(batch, channels, generator=generator, dtype=torch.float64)
        weights = torch.softmax(logits, dim=1)
    else:
        logits = torch.randn(batch, positions, generator=generator, dtype=torch.float64)
        weights = torch.softmax(logits, dim=1)
        if kind == "spatial_map":
            weights = weights.reshape((batch, 1) + tuple(shape[2:]))
    return weights.to(dtype).requires_grad_(True)


# --------------------------------------------------------------------------- layouts

LAYOUTS = (
    "contiguous",
    "channels_last",  # (B, L, C) storage for 3-D, channels_last / channels_last_3d
    "cropped",  # spatial crop such as x[..., 1:-1, 2:]
    "channel_strided",  # x[:, ::2]
    "batch_sliced",  # x[1::2]: offset and stride on the batch
    "channels_last_cropped",
    "spatial_transposed",  # last two dims swapped in memory (3-D: same as channels_last)
    "expanded",  # one sample broadcast over the batch: batch stride 0
)


# Odd-sized 3-D (B, C, L), 4-D and 5-D features.
SHAPES = {3: (3, 5, 7), 4: (3, 5, 7, 9), 5: (2, 3, 5, 3, 7)}

# (target layout, source layout): each layout for both, then target and source differing.
LAYOUT_PAIRS = [(layout, layout) for layout in LAYOUTS if layout != "expanded"] + [
    ("contiguous", "expanded"),
    ("expanded", "channels_last"),
    ("channels_last", "contiguous"),
    ("contiguous", "cropped"),
    ("channel_strided", "channels_last"),
    ("batch_sliced", "channels_last_cropped"),
]
LAYOUT_IDS = [t if t == s else f"{t}-vs-{s}" for t, s in LAYOUT_PAIRS]

# (shape, dtype, layout) of the torch.library.opcheck tests of each op library.
OPCHECK_CASES = [
    ((2, 3, 4, 5), torch.float32, "contiguous"),
    ((2, 3, 4, 5), torch.bfloat16, "channels_last"),
    ((3, 4, 7), torch.float64, "cropped"),
    ((2, 3, 2, 3, 4), torch.float16, "channel_strided"),
]
OPCHECK_IDS = [f"{len(s)}d-{str(d).split('.')[1]}-{layout}" for s, d, layout in OPCHECK_CASES]


def _channels_last(base: Tensor) -> Tensor:
    if base.dim() == 4:
        return base.contiguous(memory_format=torch.channels_last)
    if base.dim() == 5:
        return base.contiguous(memory_format=torch.channels_last_3d)
    return base.transpose(1, 2).contiguous().transpose(1, 2)  # 3-D: C has stride 1


def _crop(base: Tensor) -> Tensor:
    """Crop the first spatial dim by [1:-1] and the last (when another) by [2:]."""
    index = [slice(None)] * base.dim()
    index[2] = slice(1, -1)
    if base.dim() > 3:
        index[-1] = slice(2, None)
    return base[tuple(index)]


def _crop_padding(shape) -> list:
    padded = list(shape)
    padded[2] += 2
    if len(shape) > 3:
        padded[-1] += 2
    return padded


def layout_tensor(values: Tensor, layout: str) -> Tensor:
    """A tensor equal to ``values`` (any dtype) stored in ``layout`` ("expanded": equal
    to ``values[:1]`` broadcast over the batch); a leaf that can take requires_grad. Sliced
    layouts fill the unused memory with NaN, so a kernel that reads outside the view shows it."""
    shape = tuple(values.shape)
    if layout == "contiguous":
        return values.clone()
    if layout == "channels_last":
        return _channels_last(values)
    if layout == "spatial_transposed":
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "expanded":
        return values[:1].clone().expand(shape)
    if layout in ("cropped", "channels_last_cropped"):
        base = torch.full(_crop_padding(shape), float("nan"), dtype=values.dtype, device=values.device)
        if layout == "channels_last_cropped":
            base = _channels_last(base)
        view = _crop(base)
        view.copy_(values)
        return view
    if layout == "channel_strided":
        base = torch.full((shape[0], 2 * shape[1]) + shape[2:], float("nan"), dtype=values.dtype, device=values.device)
        view = base[:, ::2]
        view.copy_(values)
        return view
    if layout == "batch_sliced":
        base = torch.full((2 * shape[0] + 1,) + shape[1:], float("nan"), dtype=values.dtype, device=values.device)
        view = base[1::2]
        view.copy_(values)
        return view
    raise ValueError(layout)


def make_features(shape, dtype, target_layout, source_layout, generator, scale=1.0, device="cpu"):
    """(target, source) leaves of ``shape`` on ``device`` in the given layouts, scale * N(0, 1)
    values (drawn on the CPU); both require grad (the losses must leave the source's grad None)."""
    target = (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(device, dtype)
    source = (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(device, dtype)
    target = layout_tensor(target, target_layout).requires_grad_(True)
    source = layout_tensor(source, source_layout).requires_grad_(True)
    return target, source


# --------------------------------------------------------------------------- running


def run_loss(case: LossCase, target, source, weights, backend=None):
    """Loss value and (grad target, grad weights) after (loss * UPSTREAM).backward().

    ``backend`` None runs ``afa_ext.reference`` directly. Works on fresh leaves so the
    same inputs can be run several times; asserts the source gets no gradient."""
    target = _fresh_leaf(target)
    source = _fresh_leaf(source)
    weights = None if weights is None else _fresh_leaf(weights)
    if backend is None:
        loss = case.call_reference(target, source, weights)
    else:
        loss = case.call(target, source, weights, backend)
    (loss * UPSTREAM).backward()
    assert source.grad is None, "the source features must get no gradient"
    return loss.detach(), target.grad, None if weights is None else weights.grad


def _fresh_leaf(tensor: Tensor) -> Tensor:
    """A new leaf requiring grad on the same memory (same strides, same NaN padding)."""
    return tensor.detach().requires_grad_(True)


def model_results(case: LossCase, target, source, weights):
    return float64_model.loss_and_grads(case.model_name, target, source, weights, UPSTREAM)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| over the whole tensor, in float64."""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    if expected.numel() == 0:
        return 0.0
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    return error / scale if scale > 0 else error


def loss_dtype(feature_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if feature_dtype in HALF_DTYPES else feature_dtype


def _reference_error(reference_value: Tensor, expected: Tensor, dtype: torch.dtype) -> float:
    """The error of the pure-PyTorch loss in a half dtype; a sanity bound keeps a broken
    reference from loosening the bound it sets (it measures at most ~2.5 eps here)."""
    error = relative_error(reference_value, expected)
    assert error <= REFERENCE_SANITY_EPS * torch.finfo(dtype).eps, (
        f"the reference loss itself is off by {error:.3g} in {dtype}"
    )
    return error


def assert_matches_model(case, backend, target, source, weights):
    """Loss, dL/dt and dL/dweights of ``backend`` within the tolerances above (TOLERANCE,
    or twice the reference loss's error for half dtypes)."""
    dtype = target.dtype
    loss, grad_t, grad_w = run_loss(case, target, source, weights, backend)
    assert loss.dim() == 0
    assert loss.dtype == loss_dtype(dtype), f"loss dtype {loss.dtype} for {dtype} features"
    assert grad_t.dtype == dtype and grad_t.shape == target.shape
    if weights is not None:
        assert grad_w.dtype == weights.dtype and grad_w.shape == weights.shape
    expected = model_results(case, target, source, weights)
    actual = (loss, grad_t, grad_w)
    if dtype in HALF_DTYPES:
        bounds = [
            None if want is None else 2 * _reference_error(got, want, dtype) + HALF_FLOOR
            for got, want in zip(run_loss(case, target, source, weights), expected)
        ]
    else:
        bounds = [TOLERANCE[dtype]] * 3
    for what, got, want, bound in zip(("loss", "grad target", "grad weights"), actual, expected, bounds):
        if want is None:
            continue
        error = relative_error(got, want)
        assert error <= bound, f"{case.id} backend={backend} {dtype}: {what} relative error {error:.3g} > {bound:.3g}"
