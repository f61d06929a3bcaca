"""The benchmark cases: inputs for the four AFA losses, the loss function of each method
(eager reference, torch.compile of it, a compiled backend), one forward+backward step,
and error measures. Shared by compare_backends.py, report.py and test_bench_losses.py."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("afa_ext") is None:  # run from a checkout without installing it
    sys.path.insert(0, str(REPO_ROOT))

import afa_ext  # noqa: E402
from afa_ext import functional, reference  # noqa: E402
from afa_ext.ops import backends  # noqa: E402

LOSS_NAMES = ("feature_map_loss", "delta_loss", "channel_attentive_loss", "spatial_attentive_loss")
SHORT_NAMES = {
    "feature_map_loss": "fea_map",
    "delta_loss": "DELTA",
    "channel_attentive_loss": "ACT (channel)",
    "spatial_attentive_loss": "AST (spatial)",
}
EAGER = "eager"  # the reference loss run eagerly
COMPILE = "compile"  # torch.compile of the reference loss

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


# --------------------------------------------------------------------------- shapes


def parse_shape(text: str) -> tuple[int, ...]:
    """ "64x512x28x28" -> (64, 512, 28, 28)."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected a shape like 64x512x28x28, got {text!r}") from None
    if len(shape) < 3 or min(shape) < 1:
        raise ValueError(f"expected a shape (B, C, *spatial) of positive sizes, got {text!r}")
    return shape


def shape_argument(text: str) -> tuple[int, ...]:
    """parse_shape for argparse, which then prints the reason of a bad shape."""
    try:
        return parse_shape(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(size) for size in shape)


def numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- inputs


@dataclass
class LossInputs:
    """Features and weights of one loss call. ``weights`` is None for fea_map, the fixed
    DELTA channel weights (no gradient), or an attention map that requires a gradient."""

    loss_name: str
    target: Tensor
    source: Tensor
    weights: Tensor | None

    def args(self) -> tuple:
        return (self.target, self.source) if self.weights is None else (self.target, self.source, self.weights)

    def grad_leaves(self) -> list[Tensor]:
        return [tensor for tensor in (self.target, self.weights) if tensor is not None and tensor.requires_grad]

    def converted(self, dtype: torch.dtype) -> LossInputs:
        """A detached copy in ``dtype`` (features and weights), with the same leaves requiring grad."""

        def convert(tensor: Tensor | None) -> Tensor | None:
            if tensor is None:
                return None
            return tensor.detach().to(dtype).requires_grad_(tensor.requires_grad)

        return LossInputs(self.loss_name, convert(self.target), convert(self.source), convert(self.weights))


def weights_dtype(features_dtype: torch.dtype) -> torch.dtype:
    """Attention and channel weights stay float32 for half features, as under AMP."""
    return torch.float32 if features_dtype in (torch.float16, torch.bfloat16) else features_dtype


def make_weights(loss_name: str, shape: Sequence[int], dtype: torch.dtype, device, generator) -> Tensor | None:
    batch, channels, positions = shape[0], shape[1], numel(shape[2:])
    if loss_name == "feature_map_loss":
        return None
    if loss_name == "delta_loss":
        logits = torch.randn(channels, generator=generator)
        return torch.softmax(logits, dim=0).to(device=device, dtype=dtype)
    if loss_name == "channel_attentive_loss":
        logits = torch.randn(batch, channels, generator=generator)
    elif loss_name == "spatial_attentive_loss":
        logits = torch.randn(batch, positions, generator=generator)
    else:
        raise ValueError(f"unknown loss {loss_name!r}; expected one of {', '.join(LOSS_NAMES)}")
    return torch.softmax(logits, dim=1).to(device=device, dtype=dtype).requires_grad_(True)


def make_inputs(loss_name: str, shape: Sequence[int], dtype: torch.dtype, device, seed: int = 0) -> LossInputs:
    """Source ~ N(0, 1), target = source + 0.5 * N(0, 1) (fine-tuned features stay near
    the source's), and softmax weights of the shape the loss asks for."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(tuple(shape), generator=generator)
    target = source + 0.5 * torch.randn(tuple(shape), generator=generator)
    target = target.to(device=device, dtype=dtype).requires_grad_(True)
    source = source.to(device=device, dtype=dtype)
    weights = make_weights(loss_name, shape, weights_dtype(dtype), device, generator)
    return LossInputs(loss_name, target, source, weights)


# --------------------------------------------------------------------------- methods


def backends_on(device: torch.device, include_reference: bool = True) -> list[str]:
    """Available backends that compute on ``device``, in afa_ext's fixed order."""
    names = []
    for name in afa_ext.available_backends():
        devices = backends.backend_devices(name)
        if name == "reference" and not include_reference:
            continue
        if devices is None or device.type in devices:
            names.append(name)
    return names


def reference_loss(loss_name: str) -> Callable[..., Tensor]:
    return getattr(reference, loss_name)


def compiled_reference_loss(loss_name: str) -> Callable[..., Tensor]:
    """torch.compile of the reference loss, static shapes (no automatic dynamic shapes
    when a later case has another shape)."""
    return torch.compile(reference_loss(loss_name), dynamic=False)


def backend_loss(loss_name: str, backend: str) -> Callable[..., Tensor]:
    return functools.partial(getattr(functional, loss_name), backend=backend)


def loss_function(loss_name: str, method: str) -> Callable[..., Tensor]:
    """``eager`` / ``compile`` (the reference loss) or a backend name (the functional API)."""
    if method == EAGER:
        return reference_loss(loss_name)
    if method == COMPILE:
        return compiled_reference_loss(loss_name)
    return backend_loss(loss_name, method)


def clear_grads(inputs: LossInputs) -> None:
    """Drop the leaves' gradients (as zero_grad(set_to_none=True) does), freeing their memory."""
    for leaf in inputs.grad_leaves():
        leaf.grad = None


def forward_backward(loss_fn: Callable[..., Tensor], inputs: LossInputs) -> Tensor:
    """One training-step's worth of the loss: fresh grads, forward, backward. Returns the loss."""
    clear_grads(inputs)
    loss = loss_fn(*inputs.args())
    loss.backward()
    return loss.detach()


def step(loss_fn: Callable[..., Tensor], inputs: LossInputs) -> Callable[[], Tensor]:
    """forward_backward bound to its arguments, for the timing helpers."""
    return functools.partial(forward_backward, loss_fn, inputs)


# --------------------------------------------------------------------------- errors


@dataclass
class Evaluation:
    loss: Tensor
    target_grad: Tensor
    weights_grad: Tensor | None


def evaluate(loss_fn: Callable[..., Tensor], inputs: LossInputs) -> Evaluation:
    """Loss and gradients of one forward+backward, detached copies."""
    loss = forward_backward(loss_fn, inputs)
    weights = inputs.weights
    weights_grad = weights.grad.detach().clone() if weights is not None and weights.requires_grad else None
    return Evaluation(loss.clone(), inputs.target.grad.detach().clone(), weights_grad)


def float64_reference(inputs: LossInputs) -> Evaluation:
    """The reference loss evaluated in float64 on a copy of ``inputs``: the ground truth."""
    return evaluate(reference_loss(inputs.loss_name), inputs.converted(torch.float64))


def relative_error(value: Tensor | None, expected: Tensor | None) -> float | None:
    """||value - expected|| / ||expected|| in float64 (absolute error when expected is 0)."""
    if value is None or expected is None:
        return None
    value, expected = value.detach().double().cpu(), expected.detach().double().cpu()
    scale = torch.linalg.vector_norm(expected).item()
    error = torch.linalg.vector_norm(value - expected).item()
    return error / scale if scale > 0 else error
