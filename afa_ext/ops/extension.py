"""The compiled extension afa_ext._C: loading it, and its ops' fake kernels and autograd.

The ops of schemas.py are declared here under the namespace ``afa_ext``; loading
afa_ext._C registers their CPU kernels (csrc/cpu) and, when built with nvcc, their CUDA
kernels (csrc/cuda). Whether it loads is decided once, at import: a process cannot
unload a library, so rebuilding the extension takes a new process. This is the one part
of the backends' availability (backends.py) that does not follow the process's state at
each call: the ``cpu`` and ``cuda`` backends are as this import left them.
"""

from __future__ import annotations


import torch

from .formulas import accumulate_dtype, register_formulas
from .schemas import define_ops


def _unsupported_cpu_isa() -> str | None:
    """The instruction set afa_ext._C was compiled for when this CPU lacks it (its code
    would die on an illegal instruction, so it must not even be loaded), else None."""
    try:
        from .._build_config import CPU_ISA
    except ImportError:  # not built: importing _C below says so
        return None
    supported = {
        "avx2": getattr(torch.cpu, "_is_avx2_supported", lambda: True),
        "avx512": getattr(torch.cpu, "_is_avx512_supported", lambda: True),
    }
    return CPU_ISA if not supported.get(CPU_ISA, lambda: True)() else None


def _torch_too_old() -> str | None:
    """Why this torch cannot load afa_ext._C (older than the stable ABI it was built for),
    else None."""
    try:
        from .._build_config import TORCH_MIN_VERSION
    except ImportError:  # not built, or by a setup.py that wrote no minimum
        return None
    running = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if running >= tuple(TORCH_MIN_VERSION):
        return None
    oldest = ".".join(map(str, TORCH_MIN_VERSION))
    return f"afa_ext._C serves torch {oldest} and later (its stable ABI); this is torch {torch.__version__}"


def _load_refusal() -> str | None:
    """Why afa_ext._C must not be loaded here, else None."""
    missing_isa = _unsupported_cpu_isa()
    if missing_isa is not None:
        return (
            f"afa_ext._C was compiled for {missing_isa} instructions, which this CPU "
            "lacks; rebuild it here (AFA_EXT_CPU_ISA=default makes a build for any x86-64 CPU)"
        )
    return _torch_too_old()


_C = None
_LOAD_ERROR: str | None = _load_refusal()
if _LOAD_ERROR is None:
    define_ops("afa_ext")
    try:
        from .. import _C  # noqa: F401  (loading it registers the ops' kernels)
    except ImportError as error:  # the extension is optional: the reference backend still works
        _LOAD_ERROR = f"{type(error).__name__}: {error}"


def extension_error() -> str | None:
    """None when afa_ext._C loaded, else why it did not."""
    return _LOAD_ERROR


def build_info() -> dict:
    """How afa_ext._C was built, {} when not loaded: the torch it was built against
    (torch_version), its ABI ("stable": LibTorch's stable ABI) and the oldest torch that ABI
    serves (torch_min_version), the oldest CPython of its limited API (python_limited_api),
    CUDA archs and the CPU kernels' vector instructions (cpu_vector_isa)."""
    return dict(_C.build_info()) if _C is not None else {}


def empty_cache() -> int:
    """Hands the CPU backward's cached gradient blocks back to the system.

    The cpu backend keeps the storage of dead gradients above 4 MiB (up to 1 GiB in all)
    to write the next step's gradient into memory that is already mapped. Returns the
    number of bytes freed (0 when afa_ext._C is not loaded).
    """
    return int(_C.empty_cache()) if _C is not None else 0


__all__ = ["accumulate_dtype", "build_info", "empty_cache", "extension_error"]

if _C is not None:
    register_formulas("afa_ext")
