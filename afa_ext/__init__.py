"""afa_ext: fused kernels for the attention-weighted feature-distance losses of AFA.

The package in layers, each calling only the one below it:

- ``afa_ext.functional`` (the four losses, with a choice of backend) and
  ``afa_ext.reference`` (the pure-PyTorch ground truth): the public API;
- ``afa_ext.nn``: the attention modules and the loss modules a trainer holds;
- ``afa_ext.ops``: everything below autograd, the only code that touches ``torch.ops``
  (the compiled extension, the op schemas, fake kernels and autograd formulas, the backend
  choice, and ``afa_ext.ops.triton``, imported only when the Triton backend is used).
``afa_ext.compat`` keeps the names and signatures of the published AFA/DELTA regulariser
code, and ``afa_ext.train`` is the AFA trainer (``python -m afa_ext.train``); neither is
imported here.
"""

from . import functional, nn, reference
from .nn import *  # noqa: F403  (the modules nn.__all__ lists, re-exported here)
from .ops import BACKEND_CHOICES, BackendUnavailableError, available_backends, build_info, empty_cache

__version__ = "0.1.0"

__all__ = [
    "functional",
    "nn",
    "reference",
    "available_backends",
    "BACKEND_CHOICES",
    "BackendUnavailableError",
    "build_info",
    "empty_cache",
] + nn.__all__
