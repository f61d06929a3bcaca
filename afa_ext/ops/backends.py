"""Which backends exist in this installation, and which one ``auto`` picks.

A backend that is not built or cannot run here is absent from ``available_backends()``;
asking for it by name raises an error that says why.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional

import torch

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
# Fastest first: what ``auto`` tries for tensors of each device type.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
# Triton's interpreter (TRITON_INTERPRET=1) runs the Triton kernels on CPU tensors, slowly:
# it is for testing them without a GPU, so ``auto`` never picks it.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The device types each backend computes on.
BACKEND_DEVICES = {
    "reference": None,
    "cpu": ("cpu",),
    "triton": ("cpu",) if TRITON_INTERPRETED else ("cuda",),
    "cuda": ("cuda",),
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but is not built or cannot run here."""


def _find_reasons() -> Dict[str, Optional[str]]:
    """Backend name -> None when available, else why it is not."""
    from . import extension

    reasons: Dict[str, Optional[str]] = {"reference": None}
    reasons["cpu"] = None if extension.extension_error() is None else (
        f"the compiled extension afa_ext._C did not load: {extension.extension_error()}"
    )
    reasons["triton"] = _triton_reason()
    if extension.extension_error() is not None:
        reasons["cuda"] = reasons["cpu"]
    elif not extension.build_info().get("cuda_archs"):
        reasons["cuda"] = (
            "afa_ext._C was built without CUDA kernels (no nvcc or a CPU-only torch at "
            "build time, or AFA_EXT_CUDA=0)"
        )
    elif not torch.cuda.is_available():
        reasons["cuda"] = "afa_ext._C has CUDA kernels but torch sees no CUDA device"
    else:
        reasons["cuda"] = None
    return reasons


def _triton_reason() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if not TRITON_INTERPRETED and not torch.cuda.is_available():
        return ("torch sees no CUDA device (TRITON_INTERPRET=1 runs the Triton kernels on CPU "
                "tensors through Triton's interpreter, slowly, for testing)")
    try:
        from .triton import library  # noqa: F401  (registers the afa_ext_triton ops)
    except Exception as error:  # a broken triton install must not break the other backends
        return f"the Triton kernels did not load: {type(error).__name__}: {error}"
    return None


# Decided once at import, so that torch.compile traces only a dict lookup.
_REASONS = _find_reasons()


def available_backends() -> List[str]:
    """Names of the backends that can run in this installation, in a fixed order."""
    reasons = _REASONS
    return [name for name in BACKEND_NAMES if reasons[name] is None]


def check_backend_name(backend, where: str) -> str:
    """``backend`` when it is "auto" or a known backend name, else a ValueError."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKEND_NAMES):
        known = ", ".join(("auto",) + BACKEND_NAMES)
        raise ValueError(f"{where}: unknown backend {backend!r}; expected one of {known}")
    return backend


def resolve_backend(backend: str, device: torch.device, where: str) -> str:
    """The concrete backend for ``backend`` ("auto" or a name) and tensors on ``device``."""
    check_backend_name(backend, where)
    reasons = _REASONS
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if reasons[name] is None:
                return name
        return "reference"
    if reasons[backend] is not None:
        raise BackendUnavailableError(f"{where}: backend {backend!r} is unavailable: {reasons[backend]}")
    devices = BACKEND_DEVICES[backend]
    if devices is not None and device.type not in devices:
        raise ValueError(
            f"{where}: backend {backend!r} computes on {' or '.join(devices)} tensors, "
            f"got tensors on {device}"
        )
    return backend
