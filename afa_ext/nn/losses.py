"""Loss modules: the AFA feature losses summed over all hooked layers.

Each module is called as ``loss(targets, sources)`` with two equally long lists of feature
maps, one entry per hooked layer, each of shape (B, C_l, *spatial_l); layers may differ in
channels and spatial size, and a layer may be 1-D (B, C, L). The result is the sum over
layers of the per-layer loss of ``afa_ext.functional`` (formulas in its docstring), computed
by one call with all layers (one kernel launch per pass on a GPU), with
D = F_t - F_s and P = prod(spatial). The source maps get no gradient.

The attentive modules own one attention module per layer, which reads the (detached)
source map. They are built from ``feature_shapes`` at construction, or else from the
features of the first call (or of ``materialize``), on those features' device. Build the
optimizer, and load a state_dict, only once they exist.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import functional
from ..ops.backends import check_backend_name
from .attention import ChannelAttention, SpatialAttention

__all__ = [
    "FeatureMapAlignment",
    "DeltaAlignment",
    "AttentiveSpatialAlignment",
    "AttentiveChannelAlignment",
]


class FeatureMapAlignment(nn.Module):
    """Plain feature-map L2: sum over layers of 0.5 * sum_{n,j,p} D^2 (no division by B)."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend_name(backend, type(self).__name__)

    def forward(self, targets: Sequence[Tensor], sources: Sequence[Tensor]) -> Tensor:
        targets, sources = functional.feature_layer_lists(targets, sources, type(self).__name__)
        return functional.feature_map_loss(targets, sources, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class DeltaAlignment(nn.Module):
    """DELTA: sum over layers of 0.5 * sum_{n,j} C * w_j * sum_p D^2 / P (no division by B).

    ``channel_weights`` holds one fixed weight vector w of shape (C_l,) per layer (in
    DELTA they sum to 1). They are kept as buffers ``channel_weights_<l>``: saved in the
    state_dict and moved by ``.to()``, never trained.
    """

    def __init__(self, channel_weights: Sequence[Tensor], backend: str = "auto"):
        super().__init__()
        where = type(self).__name__
        self.backend = check_backend_name(backend, where)
        weights = functional.layer_list(
            channel_weights, "channel_weights", where, "a list of (C,) tensors, one per layer"
        )
        if not weights:
            raise ValueError(f"{where}: expected channel weights for at least one layer, got an empty list")
        for index, weight in enumerate(weights):
            expected = f"{where}: expected channel_weights[{index}] to be a float tensor of shape (C,), got"
            if not isinstance(weight, Tensor) or not weight.is_floating_point():
                given = f"a {weight.dtype} tensor" if isinstance(weight, Tensor) else type(weight).__name__
                raise TypeError(f"{expected} {given}")
            if weight.dim() != 1:
                raise ValueError(f"{expected} shape {tuple(weight.shape)}")
            self.register_buffer(f"channel_weights_{index}", weight.detach().clone())
        self.num_layers = len(weights)

    def layer_weights(self) -> list[Tensor]:
        """The per-layer weight vectors, in layer order."""
        return [getattr(self, f"channel_weights_{index}") for index in range(self.num_layers)]

    def forward(self, targets: Sequence[Tensor], sources: Sequence[Tensor]) -> Tensor:
        where = type(self).__name__
        targets, sources = functional.feature_layer_lists(targets, sources, where)
        if len(targets) != self.num_layers:
            raise ValueError(
                f"{where}: expected {self.num_layers} layers, as many as channel weights, got {len(targets)}"
            )
        return functional.delta_loss(targets, sources, self.layer_weights(), backend=self.backend)

    def extra_repr(self) -> str:
        return f"layers={self.num_layers}, backend={self.backend!r}"


class _AttentiveAlignment(nn.Module):
    """One attention module per layer, reading the detached source map of that layer.

    The attention modules (``self.attention``, one per layer) are built from
    ``feature_shapes`` (one (C, *spatial) tuple per layer, batch left out) when it is
    given, else by ``materialize(source_features)`` or the first call, on the features'
    device and for any input resolution. Until then the module has no parameters: build
    the optimizer, and load a state_dict, only after they exist. Later calls must bring
    the same number of layers of the same shapes.
    """

    def __init__(self, hidden: int | None = None, backend: str = "auto", feature_shapes=None):
        super().__init__()
        where = type(self).__name__
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"{where}: expected hidden to be None or a positive int, got {hidden!r}")
        self.hidden = hidden
        self.backend = check_backend_name(backend, where)
        self.attention = nn.ModuleList()
        self._feature_shapes: list[tuple[int, ...]] | None = None
        self.register_load_state_dict_pre_hook(_require_materialized)
        if feature_shapes is not None:
            self._build(self._check_shapes(feature_shapes), device=None)

    @property
    def feature_shapes(self) -> list[tuple[int, ...]] | None:
        """The per-layer (C, *spatial) the attention modules were built for, or None."""
        return None if self._feature_shapes is None else list(self._feature_shapes)

    @property
    def materialized(self) -> bool:
        """Whether the attention modules exist."""
        return self._feature_shapes is not None

    def materialize(self, source_features: Sequence[Tensor]) -> None:
        """Build the attention modules for these per-layer features, on their device.

        Does nothing but check the shapes when the modules exist already.
        """
        layers = functional.feature_layers(source_features, "source_features", type(self).__name__)
        shapes = [tuple(layer.shape[1:]) for layer in layers]
        if self._feature_shapes is None:
            self._build(shapes, device=layers[0].device)
        elif shapes != self._feature_shapes:
            raise ValueError(
                f"{type(self).__name__}: the attention modules were built for {len(self._feature_shapes)} "
                f"layers of (C, *spatial) {self._feature_shapes}, got {len(shapes)} layers of {shapes}"
            )

    def forward(self, targets: Sequence[Tensor], sources: Sequence[Tensor]) -> Tensor:
        targets, sources = functional.feature_layer_lists(targets, sources, type(self).__name__)
        self.materialize(sources)
        attentions = [attention(source.detach()) for source, attention in zip(sources, self.attention)]
        return self._loss(targets, sources, attentions)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, backend={self.backend!r}"

    def _check_shapes(self, feature_shapes) -> list[tuple[int, ...]]:
        try:
            shapes = [tuple(shape) for shape in feature_shapes]
        except TypeError:
            shapes = []
        valid = bool(shapes) and all(
            len(shape) >= 2 and all(isinstance(size, int) and size > 0 for size in shape) for shape in shapes
        )
        if not valid:
            raise ValueError(
                f"{type(self).__name__}: expected feature_shapes to be a non-empty list of "
                f"(C, *spatial) tuples of positive ints, one per layer, got {feature_shapes!r}"
            )
        return shapes

    def _build(self, shapes: list[tuple[int, ...]], device) -> None:
        # Parameters made under inference_mode could never be trained.
        with torch.inference_mode(False):
            for shape in shapes:
                attention = self._make_attention(shape[0], math.prod(shape[1:]))
                self.attention.append(attention.to(device))
        self._feature_shapes = shapes

    def _make_attention(self, channels: int, positions: int) -> nn.Module:
        raise NotImplementedError

    def _loss(self, targets: list[Tensor], sources: list[Tensor], attentions: list[Tensor]) -> Tensor:
        raise NotImplementedError


def _require_materialized(module, state_dict, prefix, *args) -> None:
    has_attention = any(key.startswith(prefix + "attention.") for key in state_dict)
    if has_attention and not module.materialized:
        raise RuntimeError(
            f"{type(module).__name__}: cannot load attention weights before the attention "
            f"modules exist; pass feature_shapes=... or call materialize(source_features) first"
        )


class AttentiveSpatialAlignment(_AttentiveAlignment):
    """AST: sum over layers of (0.5 / B) * sum_{n,p} (P * a[n,p])^2 * sum_j D^2.

    a = SpatialAttention(source map), (B, P), softmax over P; it enters squared. ``hidden``
    is the attention's hidden width (default round(sqrt(P)) per layer).

    Its attention modules are built from ``feature_shapes``, by ``materialize`` or at the
    first call; build the optimizer and load a state_dict only after that.
    """

    def _make_attention(self, channels: int, positions: int) -> nn.Module:
        return SpatialAttention(positions, self.hidden)

    def _loss(self, targets: list[Tensor], sources: list[Tensor], attentions: list[Tensor]) -> Tensor:
        return functional.spatial_attentive_loss(targets, sources, attentions, backend=self.backend)


class AttentiveChannelAlignment(_AttentiveAlignment):
    """ACT: sum over layers of (0.5 / B) * sum_{n,j} C * g[n,j] * sum_p D^2.

    g = ChannelAttention(source map), (B, C), softmax over C. ``hidden`` is the
    attention's hidden width (default round(sqrt(P)) per layer).

    Its attention modules are built from ``feature_shapes``, by ``materialize`` or at the
    first call; build the optimizer and load a state_dict only after that.
    """

    def _make_attention(self, channels: int, positions: int) -> nn.Module:
        return ChannelAttention(channels, positions, self.hidden)

    def _loss(self, targets: list[Tensor], sources: list[Tensor], attentions: list[Tensor]) -> Tensor:
        return functional.channel_attentive_loss(targets, sources, attentions, backend=self.backend)
