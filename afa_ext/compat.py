"""Drop-in replacement for the regularisers of the published AFA code (xiezheng-cs/AFA).

Change ``from models.regularizer import ...`` to ``from afa_ext.compat import ...`` (and
``get_channel_weight`` from ``utils.util`` likewise): the functions keep the original
names, signatures, argument order (source maps first) and returned shapes, and the
attention modules keep the original parameters and state_dict keys, so checkpoints saved
by the original code load with ``strict=True``. The feature losses run through
``afa_ext.functional`` as one call with all hooked layers (fused kernels for the
``cpu``, ``cuda`` and ``triton`` backends, ``backend="auto"``) instead of building the
difference map and scaled copies of it layer by layer. The four feature losses take one
argument the original lacks, the keyword ``backend`` of ``afa_ext.functional``.

Notation: for a hooked layer, F_s the source model's map (detached in every distance
term), F_t the target model's map, both (B, C, H, W); P = H * W; D = F_t - F_s. Each loss
is the sum over the layers of:

- ``reg_fea_map``: 0.5 * sum_{n,j,p} D^2. No division by B.
- ``reg_att_fea_map`` (DELTA): 0.5 * sum_{n,j} C * w_j * sum_p D^2 / P, with w the fixed
  channel weights of the layer (``get_channel_weight``). Divided by H * W, but not by B.
- ``reg_pixel_att_fea_map_learn`` (AFA, spatial): (0.5 / B) * sum_{n,p} (P * a_{n,p})^2 *
  sum_j D^2, with a = ``pixel_attention``(F_s), (B, 1, P), a softmax over the P positions.
  The attention multiplies D before the norm is squared, so it enters squared.
- ``reg_channel_att_fea_map_learn`` (AFA, channel): (0.5 / B) * sum_{n,j} C * g_{n,j} *
  sum_p D^2, with g = ``channel_attention``(F_s), (B, C), a softmax over the C channels.
- ``reg_l2sp``: 0.5 * sum over parameters whose name does not start with ``fc_name`` of
  ||w - w_source||^2; ``reg_classifier``: 0.5 * sum over those that do of ||w||^2.

The attention modules read the source map as given, as the original does: when it
requires grad, the attention term sends gradient into the source model (the distance
term never does).

What is returned, as the original returns it:

- ``reg_fea_map``, ``reg_att_fea_map``, ``reg_pixel_att_fea_map_learn``, ``reg_l2sp`` and
  ``reg_classifier``: a 0-dim float32 tensor (the original's float32 accumulator), on the
  inputs' device (the original always moved it to the GPU with ``.cuda()``).
- ``reg_channel_att_fea_map_learn``: shape (1,) (the original starts from
  ``new_zeros(1)``), dtype of the first target map; float32 for float16/bfloat16 maps,
  where the original rounds the loss to the half dtype.

Differences from the original:

- Lists of different lengths (source maps, target maps, channel weights, attention
  modules) raise ``ValueError``; the original zips the maps and modules, silently dropping
  the extra layers, and ignores extra channel weights.
- Channel weights are moved to each layer's device (``get_channel_weight`` returns CPU
  tensors where the original returned CUDA ones).
- With no layers the feature losses are a zero on the CPU (the original: on the GPU, and
  an IndexError for the channel loss).
- The attention modules compute as ``afa_ext.nn``'s do (the same functions): they accept
  maps that are not contiguous (the original calls ``view``), cast maps of another dtype
  to the parameters' dtype (the original raises outside autocast), and return the
  softmax in the parameters' dtype under autocast too: float32 for float32 modules,
  where the original's is bfloat16/float16.
- ``channel_weights_from_scores`` gives uniform weights, not NaN, to a layer whose scores
  are all equal.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import functional, reference
from .nn import attention

__all__ = [
    "reg_fea_map",
    "reg_att_fea_map",
    "reg_pixel_att_fea_map_learn",
    "reg_channel_att_fea_map_learn",
    "reg_l2sp",
    "reg_classifier",
    "pixel_attention",
    "channel_attention",
    "channel_weights_from_scores",
    "get_channel_weight",
]


# --------------------------------------------------------------------------- channel weights


def _layer_scores(scores, index: int, where: str) -> Tensor:
    """One layer's scores as a 1-D float64 tensor (on the device of a tensor given)."""
    try:
        values = torch.as_tensor(scores, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"{where}: expected layer {index} to be a 1-D array of numbers, got {type(scores).__name__} ({error})"
        ) from None
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(
            f"{where}: expected layer {index} to be a non-empty 1-D array of scores, got shape {tuple(values.shape)}"
        )
    if not torch.isfinite(values).all():
        raise ValueError(f"{where}: expected finite scores, layer {index} holds NaN or infinity")
    return values


def _softmax_of_z_scores(values: Tensor) -> Tensor:
    """softmax(z / 5) with z = (x - mean) / std (population std), float32; 1/C when std = 0."""
    std = values.std(correction=0)
    if std == 0:
        return torch.full(values.shape, 1.0 / values.numel(), dtype=torch.float32, device=values.device)
    z = ((values - values.mean()) / std).to(torch.float32)
    return torch.softmax(z / 5.0, dim=0)


def _weights_from_scores(scores, where: str) -> list[Tensor]:
    expected = "a list with one 1-D array of scores per layer"
    if isinstance(scores, np.ndarray):
        raise TypeError(
            f"{where}: expected scores to be {expected}, got ndarray of shape {scores.shape} "
            f"(a single array: wrap one layer as [scores])"
        )
    layers = functional.layer_list(scores, "scores", where, expected)
    return [_softmax_of_z_scores(_layer_scores(layer, index, where)) for index, layer in enumerate(layers)]


def channel_weights_from_scores(scores: Sequence) -> list[Tensor]:
    """DELTA's channel weights from per-channel scores, one 1-D array per layer.

    For the scores x of one layer (C channels): z = (x - mean(x)) / std(x), with the
    population standard deviation (numpy's default), and w = softmax(z / 5), a float32
    tensor of shape (C,) that sums to 1. The z-scores are formed in float64, the softmax
    in float32, as the original does. Where all C scores are equal (std = 0, where the
    original divides by zero and returns NaN) the weights are uniform, 1/C each.

    ``scores`` is a list (any sequence) of per-layer arrays: lists of numbers, numpy arrays
    or tensors. The weights are CPU tensors, or on the device of a tensor given.
    """
    return _weights_from_scores(scores, "channel_weights_from_scores")


def get_channel_weight(json_path, logger=None) -> list[Tensor] | None:
    """DELTA's channel weights read from its published JSON file.

    The file holds a list with one list of per-channel scores per layer; each layer's
    weights are ``channel_weights_from_scores`` of its scores: softmax(z / 5) of the
    z-scores, float32, shape (C,). They are CPU tensors (the original returned CUDA
    tensors); ``reg_att_fea_map`` moves them to the features' device, or move them with
    ``.to(device)``. As in the original, an empty or None ``json_path`` returns None, and a
    ``logger`` given is told what was loaded.
    """
    where = "get_channel_weight"
    if not json_path:
        if logger is not None:
            logger.info("channel_weight_path is None")
        return None
    path = os.fspath(json_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: expected a JSON file of channel scores, {path!r} does not exist")
    with open(path) as file:
        try:
            layers = json.load(file)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{where}: {path!r} is not valid JSON ({error})") from None
    if not isinstance(layers, list) or not layers:
        raise ValueError(
            f"{where}: expected {path!r} to hold a non-empty list with one list of per-channel "
            f"scores per layer, got {type(layers).__name__}"
        )
    weights = _weights_from_scores(layers, f"{where} ({path!r})")
    if logger is not None:
        logger.info(f"load channel_weight_path={path} success!")
    return weights


# --------------------------------------------------------------------------- attention modules


def _flat_source(features, module: nn.Module, channels: int | None) -> Tensor:
    """Source features (B, C, *spatial) as (B, C, P), after checking P = feature_size^2 and,
    when given, C = ``channels``; the errors name the constructor's arguments."""
    where = type(module).__name__
    if not isinstance(features, Tensor):
        raise TypeError(f"{where}: expected the source feature map to be a torch.Tensor, got {type(features).__name__}")
    if features.dim() < 3:
        raise ValueError(
            f"{where}: expected a source feature map of shape (B, C, H, W), got shape {tuple(features.shape)}"
        )
    positions = module.feature_size * module.feature_size
    batch, given_channels, given_positions = features.shape[0], features.shape[1], math.prod(features.shape[2:])
    if given_positions != positions:
        raise ValueError(
            f"{where}: built for feature_size={module.feature_size} ({positions} positions), "
            f"got a map of shape {tuple(features.shape)} ({given_positions} positions)"
        )
    if channels is not None and given_channels != channels:
        raise ValueError(
            f"{where}: built for in_channels={channels}, got a map of "
            f"shape {tuple(features.shape)} ({given_channels} channels)"
        )
    return features.reshape(batch, given_channels, positions)


class pixel_attention(nn.Module):  # noqa: N801 - the original's name, for drop-in use
    """AFA's spatial attention a, (B, 1, P) with P = feature_size^2, softmax over P.

    a[n] = softmax_p(fc2(relu(fc1(m[n])))), m[n, p] = (1/C) sum_j F_s[n, j, p];
    fc1: Linear(P, feature_size) without bias, fc2: Linear(feature_size, P) with bias.
    The maths, and its dtype rules, are ``afa_ext.nn.SpatialAttention``'s with hidden
    width feature_size. Parameters and state_dict keys as the original: ``fc1.weight``,
    ``fc2.weight``, ``fc2.bias``; the same initial values under the same seed.
    ``in_channels`` is unused, as in the original (any C is accepted).
    """

    def __init__(self, in_channels: int, feature_size: int):
        super().__init__()
        self.in_channels = in_channels
        self.feature_size = feature_size
        self.fc1 = nn.Linear(feature_size * feature_size, feature_size, bias=False)
        self.fc2 = nn.Linear(feature_size, feature_size * feature_size, bias=True)

    def forward(self, source_feature: Tensor) -> Tensor:
        flat = _flat_source(source_feature, self, None)
        return attention.spatial_attention_weights(flat, self.fc1, self.fc2).unsqueeze(1)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, feature_size={self.feature_size}"


class channel_attention(nn.Module):  # noqa: N801 - the original's name, for drop-in use
    """AFA's channel attention g, (B, C) with C = in_channels, softmax over C.

    g[n] = softmax_j(fc2(relu(fc1(F_s[n, j, :]))) + bias_j); fc1: Linear(P, feature_size)
    and fc2: Linear(feature_size, 1), both without bias and shared by the channels, and a
    per-channel ``bias`` of shape (C,) initialised to 0. The maths, and its dtype rules,
    are ``afa_ext.nn.ChannelAttention``'s with hidden width feature_size. Parameters and
    state_dict keys as the original (``bias``, ``fc1.weight``, ``fc2.weight``, in that
    order); the same initial values under the same seed.
    """

    def __init__(self, in_channels: int, feature_size: int):
        super().__init__()
        self.in_channels = in_channels
        self.feature_size = feature_size
        self.fc1 = nn.Linear(feature_size * feature_size, feature_size, bias=False)
        self.fc2 = nn.Linear(feature_size, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(in_channels))

    def forward(self, source_feature: Tensor) -> Tensor:
        flat = _flat_source(source_feature, self, self.in_channels)
        return attention.channel_attention_weights(flat, self.fc1, self.fc2, self.bias)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, feature_size={self.feature_size}"


# --------------------------------------------------------------------------- feature losses


def _paired_layers(layer_outputs_source, layer_outputs_target, where: str) -> tuple[list[Tensor], list[Tensor]]:
    """(sources, targets): the maps of every hooked layer as two equally long lists, maybe empty."""
    targets, sources = functional.feature_layer_lists(
        layer_outputs_target,
        layer_outputs_source,
        where,
        names=("layer_outputs_target", "layer_outputs_source"),
        allow_empty=True,
    )
    return sources, targets


def _per_layer(values, what: str, layers: int, where: str) -> list:
    entries = functional.layer_list(values, what, where, "a list with one entry per hooked layer")
    if len(entries) != layers:
        raise ValueError(f"{where}: expected {what} for {layers} layers, as many as feature maps, got {len(entries)}")
    return entries


def _no_layers_zero(shape: tuple[int, ...] = ()) -> Tensor:
    return torch.zeros(shape, dtype=torch.float32)


def _spatial_weights(attention: Tensor, source: Tensor) -> Tensor:
    """The original's (B, 1, P) spatial attention as the (B, P) afa_ext takes; any other
    shape is passed on for afa_ext.functional to check."""
    batch, positions = source.shape[0], math.prod(source.shape[2:])
    if isinstance(attention, Tensor) and tuple(attention.shape) == (batch, 1, positions):
        return attention.reshape(batch, positions)
    return attention


def reg_fea_map(layer_outputs_source, layer_outputs_target, *, backend: str = "auto") -> Tensor:
    """Feature-map L2: sum over layers of 0.5 * sum_{n,j,p} (F_t - F_s)^2, no division by B.

    Returns a 0-dim float32 tensor on the maps' device; the source maps get no gradient.
    """
    sources, targets = _paired_layers(layer_outputs_source, layer_outputs_target, "reg_fea_map")
    if not targets:
        return _no_layers_zero()
    return functional.feature_map_loss(targets, sources, backend=backend).to(torch.float32)


def reg_att_fea_map(layer_outputs_source, layer_outputs_target, channel_weights, *, backend: str = "auto") -> Tensor:
    """DELTA: sum over layers of 0.5 * sum_{n,j} C * w_j * sum_p (F_t - F_s)^2 / (H * W).

    Divided by H * W but not by B. ``channel_weights`` holds one (C,) tensor per layer
    (``get_channel_weight``), moved to the layer's device. Returns a 0-dim float32 tensor
    on the maps' device; the source maps get no gradient.
    """
    where = "reg_att_fea_map"
    sources, targets = _paired_layers(layer_outputs_source, layer_outputs_target, where)
    weights = _per_layer(channel_weights, "channel_weights", len(targets), where)
    if not targets:
        return _no_layers_zero()
    weights = [w.to(t.device) if isinstance(w, Tensor) else w for w, t in zip(weights, targets)]
    return functional.delta_loss(targets, sources, weights, backend=backend).to(torch.float32)


def _attentions(feature_criterions, sources: list[Tensor], where: str) -> list[Tensor]:
    """Each layer's attention module applied to its source map, as given (not detached)."""
    criterions = _per_layer(feature_criterions, "feature_criterions", len(sources), where)
    return [criterion(source) for criterion, source in zip(criterions, sources)]


def reg_pixel_att_fea_map_learn(
    layer_outputs_source, layer_outputs_target, feature_criterions, *, backend: str = "auto"
) -> Tensor:
    """AFA spatial: sum over layers of (0.5 / B) * sum_{n,p} (P * a_{n,p})^2 * sum_j (F_t - F_s)^2.

    a = feature_criterions[l](F_s) of layer l, (B, 1, P) (``pixel_attention``); it enters
    squared. The attention module reads the source map as given; the distance term sends
    no gradient into it. Returns a 0-dim float32 tensor on the maps' device.
    """
    where = "reg_pixel_att_fea_map_learn"
    sources, targets = _paired_layers(layer_outputs_source, layer_outputs_target, where)
    attentions = _attentions(feature_criterions, sources, where)
    if not targets:
        return _no_layers_zero()
    weights = [_spatial_weights(a, s) for a, s in zip(attentions, sources)]
    return functional.spatial_attentive_loss(targets, sources, weights, backend=backend).to(torch.float32)


def reg_channel_att_fea_map_learn(
    layer_outputs_source, layer_outputs_target, feature_criterions, *, backend: str = "auto"
) -> Tensor:
    """AFA channel: sum over layers of (0.5 / B) * sum_{n,j} C * g_{n,j} * sum_p (F_t - F_s)^2.

    g = feature_criterions[l](F_s) of layer l, (B, C) (``channel_attention``). The
    attention module reads the source map as given; the distance term sends no gradient
    into it. Returns shape (1,), as the original, in the first target map's dtype (float32
    for float16/bfloat16 maps, where the original rounds to the half dtype).
    """
    where = "reg_channel_att_fea_map_learn"
    sources, targets = _paired_layers(layer_outputs_source, layer_outputs_target, where)
    attentions = _attentions(feature_criterions, sources, where)
    if not targets:
        return _no_layers_zero((1,))
    loss = functional.channel_attentive_loss(targets, sources, attentions, backend=backend)
    dtype = targets[0].dtype if targets[0].dtype in (torch.float32, torch.float64) else torch.float32
    return loss.to(dtype).reshape(1)


# --------------------------------------------------------------------------- weight penalties


def reg_l2sp(model: nn.Module, fc_name: str, model_source_weights) -> Tensor:
    """L2-SP: 0.5 * sum over parameters whose name does not start with ``fc_name`` of
    ||w - w_source||^2, w_source = model_source_weights[name] (a KeyError names a missing
    one). Returns a 0-dim float32 tensor on the parameters' device."""
    return reference.l2sp_loss(model, model_source_weights, exclude=(fc_name,)).to(torch.float32)


def reg_classifier(model: nn.Module, fc_name: str) -> Tensor:
    """The classifier's L2: 0.5 * sum over parameters whose name starts with ``fc_name``
    of ||w||^2. Returns a 0-dim float32 tensor on the parameters' device (a zero when no
    name matches)."""
    total = None
    for name, param in model.named_parameters():
        if name.startswith(fc_name):
            term = torch.sum(param * param)
            total = term if total is None else total + term
    if total is None:
        first = next(model.parameters(), None)
        return torch.zeros((), dtype=torch.float32, device=None if first is None else first.device)
    return (0.5 * total).to(torch.float32)
