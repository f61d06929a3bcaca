"""The modules a trainer holds: the attention modules of AFA (attention.py) and the loss
modules that sum one feature loss over all hooked layers (losses.py)."""

from .attention import ChannelAttention, SpatialAttention
from .losses import (
    AttentiveChannelAlignment,
    AttentiveSpatialAlignment,
    DeltaAlignment,
    FeatureMapAlignment,
)

__all__ = [
    "SpatialAttention",
    "ChannelAttention",
    "AttentiveSpatialAlignment",
    "AttentiveChannelAlignment",
    "DeltaAlignment",
    "FeatureMapAlignment",
]
