"""Input checks shared by every backend: clear errors instead of crashes or wrong numbers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def spatial_positions(features: Tensor):
    """P, the product of the spatial sizes of features (B, C, *spatial)."""
    positions = 1
    for size in features.shape[2:]:
        positions *= size
    return positions


def check_tensor(value, what: str, where: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{where}: expected {what} to be a torch.Tensor, got {type(value).__name__}")


def check_float(value: Tensor, what: str, where: str) -> None:
    if value.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(_dtype_name(d) for d in FLOAT_DTYPES)
        raise TypeError(
            f"{where}: expected {what} to have a floating-point dtype ({allowed}), got {_dtype_name(value.dtype)}"
        )


def check_features(target, source, where: str) -> None:
    """Target and source: same shape (B, C, *spatial) with >= 3 dims, dtype and device."""
    check_tensor(target, "target", where)
    check_tensor(source, "source", where)
    if target.dim() < 3:
        raise ValueError(
            f"{where}: expected target of shape (B, C, *spatial) with at least 3 dims, got shape {tuple(target.shape)}"
        )
    if source.shape != target.shape:
        raise ValueError(
            f"{where}: expected source to have the shape of target {tuple(target.shape)}, got {tuple(source.shape)}"
        )
    check_float(target, "target", where)
    check_float(source, "source", where)
    if source.dtype != target.dtype:
        raise TypeError(
            f"{where}: expected source to have the dtype of target "
            f"({_dtype_name(target.dtype)}), got {_dtype_name(source.dtype)}"
        )
    if source.device != target.device:
        raise ValueError(
            f"{where}: expected target and source on one device, got target on "
            f"{target.device} and source on {source.device}"
        )


def check_weights(weights, what: str, shapes: Sequence[tuple], target: Tensor, where: str) -> None:
    """Weights or attention: a float tensor on target's device with one of ``shapes``."""
    check_tensor(weights, what, where)
    if tuple(weights.shape) not in [tuple(s) for s in shapes]:
        expected = " or ".join(str(tuple(s)) for s in shapes)
        raise ValueError(
            f"{where}: expected {what} of shape {expected} for features of shape "
            f"{tuple(target.shape)}, got {tuple(weights.shape)}"
        )
    check_float(weights, what, where)
    if weights.device != target.device:
        raise ValueError(f"{where}: expected {what} on the features' device {target.device}, got {weights.device}")
