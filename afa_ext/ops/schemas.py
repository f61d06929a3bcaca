"""The schemas of the eight squared-distance ops, written once for every library.

For features t, s of shape (B, C, *spatial) with P spatial positions, and a "grouping"
that names the axis kept in the partial sums (channel: B and C kept, spatial dims
reduced; spatial: B and the spatial dims kept, C reduced):

- ``channel_sqdist(t, s) -> d``, d[n, j] = sum_p (t - s)^2, shape (B, C)
- ``spatial_sqdist(t, s) -> e``, e[n, p] = sum_j (t - s)^2, shape (B, P)
- ``channel_sqdist_backward(g, t, s)``, dt = 2 * g[n, j] * (t - s)
- ``spatial_sqdist_backward(g, t, s)``, dt = 2 * g[n, p] * (t - s)
- ``grouped_<op>``: the same over lists holding all hooked layers of a model (one dtype
  and device, any shapes), one result per layer, in one kernel launch per pass. The
  ``grouped_`` prefix of these op names is kept for compatibility; in the code they are
  "the multi-layer ops" and their arguments "layers".

Every backend library declares them with ``define_ops``: the C++ library ``afa_ext``
(whose compiled kernels only register implementations, csrc/ops.cpp), the Triton library
``afa_ext_triton`` and the tests' CPU emulation of the CUDA kernels.
"""

from __future__ import annotations


import torch

GROUPINGS = ("channel", "spatial")

OP_SCHEMAS = {
    "channel_sqdist": "(Tensor target, Tensor source) -> Tensor",
    "spatial_sqdist": "(Tensor target, Tensor source) -> Tensor",
    "channel_sqdist_backward": "(Tensor grad, Tensor target, Tensor source) -> Tensor",
    "spatial_sqdist_backward": "(Tensor grad, Tensor target, Tensor source) -> Tensor",
    "grouped_channel_sqdist": "(Tensor[] targets, Tensor[] sources) -> Tensor[]",
    "grouped_spatial_sqdist": "(Tensor[] targets, Tensor[] sources) -> Tensor[]",
    "grouped_channel_sqdist_backward": "(Tensor[] grads, Tensor[] targets, Tensor[] sources) -> Tensor[]",
    "grouped_spatial_sqdist_backward": "(Tensor[] grads, Tensor[] targets, Tensor[] sources) -> Tensor[]",
}

# The libraries defined in this process: a torch.library.Library must stay referenced for
# its definitions to stay registered.
_LIBRARIES: dict[str, torch.library.Library] = {}


def define_ops(namespace: str) -> torch.library.Library:
    """Declares the eight ops under ``namespace`` (once per process) and returns the library."""
    if namespace not in _LIBRARIES:
        library = torch.library.Library(namespace, "DEF")
        for name, schema in OP_SCHEMAS.items():
            library.define(name + schema)
        _LIBRARIES[namespace] = library
    return _LIBRARIES[namespace]
