"""Which backends exist in this installation, and which one ``auto`` picks.

A backend that is not built or cannot run here is absent from ``available_backends()``;
asking for it by name raises an error that says why.

Availability is looked up at each call of ``available_backends()`` and
``resolve_backend()``, so it follows the state of the process (a CUDA device that torch
stops or starts seeing, triton installed later). The lookups are cheap: the extension's
state and triton's import are held by their modules, and ``importlib`` searches for
triton only while it is not imported. Three things are fixed once:

- whether afa_ext._C loaded, at import (a process cannot unload a library; extension.py);
- whether the Triton kernels run in Triton's interpreter: TRITON_INTERPRET is read until
  the Triton backend's modules are imported, and from then on their mode holds, since
  Triton fixes it when it defines the kernels;
- a failure to load the Triton kernels, which is not retried.

While torch.compile traces, the lookups are not repeated: a trace reads the last answer
computed eagerly (at the latest eager call; before any, what import found without
loading the Triton kernels), a dict lookup.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import NamedTuple

import torch

from . import extension

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
# What a ``backend=`` argument accepts.
BACKEND_CHOICES = ("auto",) + BACKEND_NAMES
# Fastest first: what ``auto`` tries for tensors of each device type.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
# The backends ``auto`` chooses between on CUDA tensors, by measuring (auto_choice.py).
GPU_CANDIDATES = ("cuda", "triton")
_TRITON_LAUNCH_MODULE = "afa_ext.ops.triton.launch"

Devices = tuple[str, ...] | None  # the device types a backend computes on; None: any


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but is not built or cannot run here."""


class Availability(NamedTuple):
    """What one lookup found about a backend."""

    reason: str | None  # None when the backend can run, else why it cannot
    devices: Devices


def triton_interpreted() -> bool:
    """Whether the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1), which
    runs them on CPU tensors, slowly: it is for testing them without a GPU, so ``auto``
    never picks it. Once the Triton backend's modules are imported, their mode; before,
    the environment's."""
    launch = sys.modules.get(_TRITON_LAUNCH_MODULE)
    interpreted = getattr(launch, "INTERPRETED", None)
    if interpreted is not None:
        return bool(interpreted)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_FIXED_DEVICES: dict[str, Devices] = {"reference": None, "cpu": ("cpu",), "cuda": ("cuda",)}


def backend_devices(name: str) -> Devices:
    """The device types backend ``name`` computes on (None: any), looked up now. The
    interpreter reads tensors through host addresses, so it cannot take CUDA tensors."""
    if name == "triton":
        return ("cpu",) if triton_interpreted() else ("cuda",)
    return _FIXED_DEVICES[name]


def _extension_reason() -> str | None:
    error = extension.extension_error()
    return None if error is None else f"the compiled extension afa_ext._C did not load: {error}"


@functools.cache  # how afa_ext._C was built cannot change in a process
def _cuda_kernels_built() -> bool:
    return bool(extension.build_info().get("cuda_archs"))


def _cuda_reason() -> str | None:
    extension_reason = _extension_reason()
    if extension_reason is not None:
        return extension_reason
    if not _cuda_kernels_built():
        return (
            "afa_ext._C was built without CUDA kernels (no nvcc or a CPU-only torch at build time, or AFA_EXT_CUDA=0)"
        )
    if not torch.cuda.is_available():
        return "afa_ext._C has CUDA kernels but torch sees no CUDA device"
    return None


def _triton_installed() -> bool:
    if sys.modules.get("triton") is not None:
        return True
    return "triton" not in sys.modules and importlib.util.find_spec("triton") is not None


def _triton_reason_before_loading() -> str | None:
    """Why the triton backend cannot run, as far as is known without loading its kernels."""
    if not _triton_installed():
        return "the triton package is not installed"
    if not triton_interpreted() and not torch.cuda.is_available():
        return (
            "torch sees no CUDA device (TRITON_INTERPRET=1 runs the Triton kernels on CPU "
            "tensors through Triton's interpreter, slowly, for testing)"
        )
    return None


def _triton_reason() -> str | None:
    return _triton_reason_before_loading() or _triton_load_error()


@functools.cache
def _triton_load_error() -> str | None:
    """None once the Triton kernels are loaded (their ops registered), else why they
    could not be; a failed load is remembered, not tried again."""
    try:
        from .triton import library  # noqa: F401  (registers the afa_ext_triton ops)
    except Exception as error:  # a broken triton install must not break the other backends
        return f"the Triton kernels did not load: {type(error).__name__}: {error}"
    return None


_REASON_FINDERS = {
    "reference": lambda: None,
    "cpu": _extension_reason,
    "triton": _triton_reason,
    "cuda": _cuda_reason,
}
# The last availability computed eagerly, per backend: what a torch.compile trace reads.
_LAST_FOUND: dict[str, Availability] = {}


def _availability(name: str) -> Availability:
    """``name``'s availability, looked up now; the last eager answer while tracing."""
    if torch.compiler.is_compiling():
        return _LAST_FOUND[name]
    found = Availability(_REASON_FINDERS[name](), backend_devices(name))
    _LAST_FOUND[name] = found
    return found


def available_backends() -> list[str]:
    """Names of the backends that can run here now, in a fixed order."""
    return [name for name in BACKEND_NAMES if _availability(name).reason is None]


def gpu_candidates() -> tuple[str, ...]:
    """The available backends that ``auto`` measures against each other on CUDA tensors."""
    found = [(name, _availability(name)) for name in GPU_CANDIDATES]
    return tuple(name for name, (reason, devices) in found if reason is None and "cuda" in devices)


def check_backend_name(backend, where: str) -> str:
    """``backend`` when it is "auto" or a known backend name, else a ValueError."""
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"{where}: unknown backend {backend!r}; expected one of {', '.join(BACKEND_CHOICES)}")
    return backend


def _runs_on(devices: Devices, device: torch.device) -> bool:
    return devices is None or device.type in devices


def resolve_backend(backend: str, device: torch.device, where: str) -> str:
    """The concrete backend for ``backend`` ("auto" or a name) and tensors on ``device``."""
    check_backend_name(backend, where)
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            reason, devices = _availability(name)
            if reason is None and _runs_on(devices, device):
                return name
        return "reference"
    reason, devices = _availability(backend)
    if reason is not None:
        raise BackendUnavailableError(f"{where}: backend {backend!r} is unavailable: {reason}")
    if not _runs_on(devices, device):
        raise ValueError(
            f"{where}: backend {backend!r} computes on {' or '.join(devices)} tensors, got tensors on {device}"
        )
    return backend


def _answers_without_loading_triton() -> dict[str, Availability]:
    """Every backend's availability as far as it is known without importing triton (whose
    kernels load at the first eager lookup of the triton backend): what a trace reads until
    an eager call computes a newer answer. Importing afa_ext must not import triton."""
    answers = {
        name: Availability(_REASON_FINDERS[name](), backend_devices(name)) for name in BACKEND_NAMES if name != "triton"
    }
    answers["triton"] = Availability(_triton_reason_before_loading(), backend_devices("triton"))
    return answers


_LAST_FOUND.update(_answers_without_loading_triton())
