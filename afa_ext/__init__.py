"""afa_ext: fused kernels for the attention-weighted feature-distance losses of AFA.

``afa_ext.functional`` holds the four losses with backend dispatch, ``afa_ext.reference``
the pure-PyTorch ground truth, and the modules below wrap them for a trainer.
``afa_ext.compat`` keeps the names and signatures of the published AFA/DELTA regulariser
code, and ``afa_ext.train`` is the AFA trainer (``python -m afa_ext.train``); neither is
imported here.
"""
from . import functional, reference
from .backends import BackendUnavailableError, available_backends
from .attention import ChannelAttention, SpatialAttention
from .losses import (
    AttentiveChannelAlignment,
    AttentiveSpatialAlignment,
    DeltaAlignment,
    FeatureMapAlignment,
)
from ._ops import build_info, empty_cache

__version__ = "0.1.0"

__all__ = [
    "functional",
    "reference",
    "available_backends",
    "BackendUnavailableError",
    "build_info",
    "empty_cache",
    "SpatialAttention",
    "ChannelAttention",
    "AttentiveSpatialAlignment",
    "AttentiveChannelAlignment",
    "DeltaAlignment",
    "FeatureMapAlignment",
]
