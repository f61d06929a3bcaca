"""The four AFA feature losses, with a choice of backend.

For features t (target) and s (source) of shape (B, C, *spatial), P spatial positions
and D = t - s, the losses are (with the normalisations of the published AFA code):

- ``feature_map_loss``:        0.5 * sum_{n,j,p} D^2
- ``delta_loss``:              0.5 * sum_{n,j} C * w_j * sum_p D^2 / P
- ``channel_attentive_loss``:  (0.5 / B) * sum_{n,j} C * g[n,j] * sum_p D^2
- ``spatial_attentive_loss``:  (0.5 / B) * sum_{n,p} (P * a[n,p])^2 * sum_j D^2

Each argument is a tensor, or a list with one entry per hooked layer (layers may differ
in C and spatial size; they share one device): the loss is then the sum over layers, and
the compiled backends compute every layer's partial sums in one kernel launch per pass.

The compiled backends reduce t and s to the small partial sums d[n,j] = sum_p D^2 or
e[n,p] = sum_j D^2 in one fused pass; the weights' maths here is tiny and stays in
PyTorch, so autograd carries gradients on into the attention modules. The source is
detached. The loss is float32 for float16/bfloat16 features, else the features' dtype.

torch.func's ``grad``, ``jacrev`` and ``vmap`` over a gradient work with every backend
(under ``vmap`` the compiled ops run once per entry); transforms of a gradient's gradient
(``jacrev(jacrev(...))``, ``hessian``) work with the ``reference`` backend only. Plain
autograd gives second derivatives with every backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence

import torch
from torch import Tensor

from . import reference
from .ops import auto_choice
from .ops.backends import gpu_candidates, resolve_backend
from .ops.functions import layer_partial_sums, op_library
from .ops.validation import check_features, check_weights, spatial_positions

__all__ = [
    "feature_map_loss",
    "delta_loss",
    "channel_attentive_loss",
    "spatial_attentive_loss",
]


def _partial_sums(targets: Sequence[Tensor], sources: Sequence[Tensor], grouping: str, backend: str) -> list[Tensor]:
    """The partial sums of every layer from a compiled backend (``backend`` resolved, inputs
    checked): d[n, j] = sum_p (t - s)^2 for grouping "channel", e[n, p] = sum_j (t - s)^2 for
    "spatial". Layers of one dtype share one launch; the sources get no gradient."""
    sources = [source.detach() for source in sources]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, target in enumerate(targets):
        by_dtype.setdefault(target.dtype, []).append(index)
    results: list[Tensor] = [targets[0]] * len(targets)
    for indices in by_dtype.values():
        partials = layer_partial_sums(backend, grouping, [targets[i] for i in indices], [sources[i] for i in indices])
        for index, partial in zip(indices, partials):
            results[index] = partial
    return results


def _one_pass(backend: str, targets: list[Tensor], sources: list[Tensor], grouping: str) -> None:
    """One forward and one backward of the partial sums, without autograd: what ``auto``
    times to choose a GPU backend."""
    ops = op_library(backend)
    with torch.no_grad():
        partials = getattr(ops, f"grouped_{grouping}_sqdist")(targets, sources)
        getattr(ops, f"grouped_{grouping}_sqdist_backward")(partials, targets, sources)


def _backend_for(backend: str, targets: list[Tensor], sources: list[Tensor], grouping: str, where: str) -> str:
    """The backend to run: ``backend`` resolved, and for ``auto`` on CUDA tensors the
    faster of the GPU backends for these layers."""
    device = targets[0].device
    name = resolve_backend(backend, device, where)
    if backend != "auto" or device.type != "cuda" or len({t.dtype for t in targets}) > 1:
        return name
    names = gpu_candidates()
    if name not in names or len(names) < 2:
        return name
    detached = [source.detach() for source in sources]
    candidates = {candidate: (lambda c=candidate: _one_pass(c, targets, detached, grouping)) for candidate in names}
    return auto_choice.choose_fastest(
        auto_choice.layers_key(grouping, targets), candidates, lambda: torch.cuda.synchronize(device)
    )


def layer_list(value, what: str, where: str, expected: str = "a list with one entry per layer") -> list:
    """``value``, an argument with one entry per layer, as a list.

    A list, tuple or other indexable sequence (an ``nn.ModuleList``) gives its entries. A
    single Tensor, a string, a mapping, or anything without ``len`` and ``[i]`` raises
    TypeError: "{where}: expected {what} to be {expected}, got ...". The one check of a
    per-layer argument for ``afa_ext.functional``, ``afa_ext.nn`` and ``afa_ext.compat``.
    """
    if isinstance(value, Tensor):
        raise TypeError(
            f"{where}: expected {what} to be {expected}, got Tensor of shape {tuple(value.shape)} "
            f"(a single Tensor: wrap one layer as [{what}])"
        )
    if not isinstance(value, (str, bytes, Mapping)):
        try:
            return [value[index] for index in range(len(value))]
        except TypeError:
            pass
    raise TypeError(f"{where}: expected {what} to be {expected}, got {type(value).__name__}")


def feature_layers(value, what: str, where: str, allow_empty: bool = False) -> list[Tensor]:
    """``layer_list`` of feature maps: one Tensor of shape (B, C, *spatial) per layer, at
    least one unless ``allow_empty``."""
    layers = layer_list(value, what, where, "a list of feature maps, one per layer")
    if not layers and not allow_empty:
        raise ValueError(f"{where}: expected at least one layer, got an empty {what} list")
    for index, layer in enumerate(layers):
        expected = f"{where}: expected layer {index} of {what} to be a Tensor of shape (B, C, *spatial), got"
        if not isinstance(layer, Tensor):
            raise TypeError(f"{expected} {type(layer).__name__}")
        if layer.dim() < 3:
            raise ValueError(f"{expected} shape {tuple(layer.shape)}")
    return layers


def feature_layer_lists(
    targets, sources, where: str, names: tuple[str, str] = ("targets", "sources"), allow_empty: bool = False
) -> tuple[list[Tensor], list[Tensor]]:
    """Target and source ``feature_layers`` as two equally long lists; ``names`` are the
    arguments' names in the errors."""
    target_layers = feature_layers(targets, names[0], where, allow_empty)
    source_layers = feature_layers(sources, names[1], where, allow_empty)
    if len(source_layers) != len(target_layers):
        raise ValueError(
            f"{where}: expected as many source as target layers, got {len(source_layers)} source "
            f"and {len(target_layers)} target maps"
        )
    return target_layers, source_layers


def _layer_lists(where: str, target, source, *weights) -> tuple[list[Tensor], ...]:
    """Target, source and each (name, value) weight argument as equally long lists, one
    entry per layer (a single target Tensor is one layer); every layer's features checked
    and on one device."""
    if isinstance(target, (list, tuple)):
        for entry in target:
            if not isinstance(entry, Tensor):
                raise TypeError(
                    f"{where}: expected target to be a torch.Tensor or a list of Tensors, one "
                    f"per layer; got a {type(target).__name__} of {type(entry).__name__}"
                )
        lists = list(feature_layer_lists(target, source, where, names=("target", "source")))
        for name, weight in weights:
            entries = layer_list(weight, name, where, "a list with one entry per layer like target")
            if len(entries) != len(lists[0]):
                raise ValueError(
                    f"{where}: expected {len(lists[0])} layers of {name}, as many as of target, got {len(entries)}"
                )
            lists.append(entries)
    else:
        lists = [[target], [source]] + [[weight] for _, weight in weights]
    for index, (t, s) in enumerate(zip(lists[0], lists[1])):
        prefix = _layer_name(where, index, lists[0])
        check_features(t, s, prefix)
        if t.device != lists[0][0].device:
            raise ValueError(
                f"{prefix}: expected every layer on one device, got layer 0 on "
                f"{lists[0][0].device} and this one on {t.device}"
            )
    return tuple(lists)


def _layer_name(where: str, index: int, layers: list[Tensor]) -> str:
    """What an error names: the function, and the layer when there are several."""
    return f"{where} (layer {index})" if len(layers) > 1 else where


def _total(losses) -> Tensor:
    total = None
    for loss in losses:
        total = loss if total is None else total + loss
    return total


def feature_map_loss(target, source, *, backend: str = "auto") -> Tensor:
    """Plain feature-map L2: 0.5 * sum_{n,j,p} (t - s)^2, no division by B."""
    where = "feature_map_loss"
    targets, sources = _layer_lists(where, target, source)
    name = _backend_for(backend, targets, sources, "channel", where)
    if name == "reference":
        return _total(reference.feature_map_loss(t, s) for t, s in zip(targets, sources))
    return _total(0.5 * torch.sum(d) for d in _partial_sums(targets, sources, "channel", name))


def delta_loss(target, source, channel_weights, *, backend: str = "auto") -> Tensor:
    """DELTA: 0.5 * sum_{n,j} C * w_j * sum_p (t - s)^2 / P, with w of shape (C,)."""
    where = "delta_loss"
    targets, sources, weights = _layer_lists(where, target, source, ("channel_weights", channel_weights))
    for index, (t, w) in enumerate(zip(targets, weights)):
        check_weights(w, "channel_weights", [(t.shape[1],)], t, _layer_name(where, index, targets))
    name = _backend_for(backend, targets, sources, "channel", where)
    if name == "reference":
        return _total(reference.delta_loss(t, s, w) for t, s, w in zip(targets, sources, weights))
    distances = _partial_sums(targets, sources, "channel", name)
    return _total(
        (0.5 * t.shape[1] / max(spatial_positions(t), 1)) * torch.sum(w.to(d.dtype) * d)
        for t, w, d in zip(targets, weights, distances)
    )


def channel_attentive_loss(target, source, attention, *, backend: str = "auto") -> Tensor:
    """Attentive channel (ACT): (0.5 / B) * sum_{n,j} C * g[n,j] * sum_p (t - s)^2, g (B, C)."""
    where = "channel_attentive_loss"
    targets, sources, attentions = _layer_lists(where, target, source, ("attention", attention))
    for index, (t, g) in enumerate(zip(targets, attentions)):
        check_weights(g, "attention", [(t.shape[0], t.shape[1])], t, _layer_name(where, index, targets))
    name = _backend_for(backend, targets, sources, "channel", where)
    if name == "reference":
        return _total(reference.channel_attentive_loss(t, s, g) for t, s, g in zip(targets, sources, attentions))
    distances = _partial_sums(targets, sources, "channel", name)
    return _total(
        (0.5 * t.shape[1] / max(t.shape[0], 1)) * torch.sum(g.to(d.dtype) * d)
        for t, g, d in zip(targets, attentions, distances)
    )


def spatial_attentive_loss(target, source, attention, *, backend: str = "auto") -> Tensor:
    """Attentive spatial (AST): (0.5 / B) * sum_{n,p} (P * a[n,p])^2 * sum_j (t - s)^2.

    ``attention`` is (B, P) or (B, 1, *spatial).
    """
    where = "spatial_attentive_loss"
    targets, sources, attentions = _layer_lists(where, target, source, ("attention", attention))
    for index, (t, a) in enumerate(zip(targets, attentions)):
        shapes = [(t.shape[0], spatial_positions(t)), (t.shape[0], 1) + tuple(t.shape[2:])]
        check_weights(a, "attention", shapes, t, _layer_name(where, index, targets))
    name = _backend_for(backend, targets, sources, "spatial", where)
    if name == "reference":
        return _total(reference.spatial_attentive_loss(t, s, a) for t, s, a in zip(targets, sources, attentions))
    losses = []
    for t, a, e in zip(targets, attentions, _partial_sums(targets, sources, "spatial", name)):
        batch, positions = t.shape[0], spatial_positions(t)
        scaled = a.reshape(batch, positions).to(e.dtype) * positions
        losses.append((0.5 / max(batch, 1)) * torch.sum(scaled * scaled * e))
    return _total(losses)
