"""DELTA's channel weights: how much the classification loss rises without each channel.

DELTA weights the feature-map distance of each hooked layer l per output
channel j. The weights come from the target data and the pretrained backbone:

1. Head training. The classifier head is trained alone on the target data, with the backbone
   truly frozen: every parameter outside the head has ``requires_grad=False`` and the model is
   in eval mode (the head alone in train mode), so batch-norm running statistics do not move
   either; only the head's parameters are in the optimizer (SGD, momentum 0.9, no weight
   decay; the original trains 10 epochs at lr 0.01). The published copies of this step set
   ``module.requires_grad = False``, an attribute that freezes nothing; here the backbone is
   bitwise unchanged afterwards.
2. Scores, by channel removal (``method="removal"``). With the model in eval mode and L the
   mean cross-entropy of a batch,

       score[l][j] = mean over batches b of ( L_b(channel j of layer l zeroed) - L_b ),

   where "zeroed" sets channel j of the layer's output to 0 for every sample (for a conv
   without bias, the same as zeroing its filter j). The original uses 4 batches of 32.
   Or by a first-order (Taylor) estimate of the same rise (``method="taylor"``): with F the
   layer's output (N, C, ...) and g = dL/dF the gradient of the batch-mean loss (so g
   already carries the 1/N of the mean),

       score[l][j] = mean over batches of  sum over n, p of  -F[n, j, p] * g[n, j, p],

   which is the mean over the samples n of each sample's estimate -sum_p F * dCE_n/dF_n.
   Zeroing channel j changes F by -F[:, j], hence the sign. One forward and one backward pass
   per batch, instead of one forward per channel.
3. Weights. Per layer, z = (score - mean) / std (population std) and w = softmax(z / 5),
   a float32 vector that sums to 1 (``afa_ext.compat.channel_weights_from_scores``; uniform
   when every score of the layer is equal).

Batched removal. Zeroing one channel changes nothing upstream of the layer, so instead of C
full forward passes per batch, ``removal_scores`` replicates the batch k times at the input of
the layer's outermost enclosing block (``afa_ext.train.models.outermost_sequential_child``: the
ancestor-or-self of the layer whose parent is an ``nn.Sequential``; the model's input when
there is none) and zeroes channel j_i in copy i at the layer's output; only the rest of the
network runs on the k*B rows, and the logits give the k losses at once. The copies are made
at the block's input, not at the layer, so that a residual block (x + f(x)) sees the copies on
both of its branches. k is chosen so that k*B <= ``max_rows``.

``compute_channel_weights`` runs the three steps on a deep copy of the model and caches the
result in a file named by a hash of everything that determines it.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afa_ext.compat import channel_weights_from_scores, get_channel_weight
from afa_ext.train import checkpoint
from afa_ext.train.config import DELTA_ESTIMATES
from afa_ext.train.identity import canonical_json, fingerprint
from afa_ext.train.models import eval_mode, layer_output_shapes, outermost_sequential_child

__all__ = [
    "METHODS",
    "train_head",
    "removal_scores",
    "taylor_scores",
    "compute_channel_weights",
    "load_channel_weights",
]

METHODS = DELTA_ESTIMATES
HEAD_MOMENTUM = 0.9


# ---------------------------------------------------------------------------- helpers


def _submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{what} {name!r} is not a submodule of {type(model).__name__}") from None


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _to_device(batches: Iterable, device) -> list[tuple[Tensor, Tensor]]:
    moved = [(images.to(device), labels.to(device)) for images, labels in batches]
    if not moved:
        raise ValueError("expected at least one (images, labels) batch to score, got none")
    return moved


@contextmanager
def _hooks(*handles) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _layer_output(output, layer_name: str) -> Tensor:
    if not isinstance(output, Tensor) or output.dim() < 2:
        raise TypeError(
            f"layer {layer_name!r} must return a tensor of shape (N, C, ...) to be "
            f"weighted per channel, got {type(output).__name__}"
            + (f" of shape {tuple(output.shape)}" if isinstance(output, Tensor) else "")
        )
    return output


def _mean_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy in float64 (so that small rises are not lost to rounding)."""
    return F.cross_entropy(logits.double(), labels)


def _channel_counts(model: nn.Module, layer_names: Sequence[str], images: Tensor) -> list[int]:
    """Output channels of each layer, from one forward pass."""
    shapes = layer_output_shapes(model, layer_names, images)
    for name, shape in zip(layer_names, shapes):
        if not shape:
            raise TypeError(
                f"layer {name!r} must return a tensor of shape (N, C, ...) to be weighted per "
                f"channel, got one of shape (N,)"
            )
    return [shape[0] for shape in shapes]


def _layer_names(layer_names: Sequence[str]) -> list[str]:
    names = [layer_names] if isinstance(layer_names, str) else list(layer_names)
    if not names:
        raise ValueError("expected at least one layer name, got none")
    return names


# ---------------------------------------------------------------------------- step 1: head


def train_head(
    model: nn.Module, head_name: str, batches: Iterable[tuple[Tensor, Tensor]], *, epochs: int, lr: float, device
) -> None:
    """Train the head ``model.<head_name>`` alone, the rest of the model frozen, in place.

    For ``epochs`` passes over ``batches`` (re-iterable, e.g. a DataLoader, of (images,
    labels), moved to ``device``, where the model must already be): the mean cross-entropy of
    the model's logits, one SGD step (momentum 0.9) on the head's parameters. During training
    every other parameter has ``requires_grad=False`` and the model is in eval mode except the
    head, so the backbone's parameters and buffers stay bitwise unchanged. Afterwards each
    parameter's ``requires_grad``, each module's train/eval mode and the head's ``.grad`` are
    as before.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    head = _submodule(model, head_name, "head")
    head_params = list(head.parameters())
    if not head_params:
        raise ValueError(f"head {head_name!r} has no parameters to train")
    with _only_trainable(model, head_params), eval_mode(model):
        head.train()
        optimizer = torch.optim.SGD(head_params, lr=lr, momentum=HEAD_MOMENTUM)
        for _ in range(epochs):
            for images, labels in batches:
                loss = F.cross_entropy(model(images.to(device)), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()


@contextmanager
def _only_trainable(model: nn.Module, trainable: list[nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` only for ``trainable`` (their ``.grad`` cleared) inside the block;
    every flag and those ``.grad`` restored afterwards."""
    trainable_ids = {id(param) for param in trainable}
    flags = [(param, param.requires_grad) for param in model.parameters()]
    grads = [(param, param.grad) for param in trainable]
    try:
        for param in model.parameters():
            param.requires_grad_(id(param) in trainable_ids)
        for param in trainable:
            param.grad = None
        yield
    finally:
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)
        for param, grad in grads:
            param.grad = grad


# ---------------------------------------------------------------------------- step 2: removal


def _zero_channels(output: Tensor, channels: Tensor) -> Tensor:
    """``output`` (k*B, C, ...) with channel ``channels[i]`` of copy i (rows i*B..(i+1)*B) zeroed."""
    copies = channels.numel()
    by_copy = output.reshape(copies, output.shape[0] // copies, *output.shape[1:])
    mask = torch.zeros(copies, 1, output.shape[1], dtype=torch.bool, device=output.device)
    mask[torch.arange(copies, device=output.device), 0, channels.to(output.device)] = True
    mask = mask.reshape(*mask.shape, *([1] * (output.dim() - 2)))
    return by_copy.masked_fill(mask, 0).reshape(output.shape)


def _replicate(value, copies: int, rows: int):
    """``value`` repeated ``copies`` times along dim 0 (copy-major) if it is a batch tensor."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    return value


def _removed_losses(
    model: nn.Module,
    block: nn.Module | None,
    layer: nn.Module,
    layer_name: str,
    images: Tensor,
    labels: Tensor,
    channels: Tensor,
) -> Tensor:
    """Mean CE of the batch with channel ``channels[i]`` of the layer zeroed, for each i, (k,) float64.

    The batch is replicated k times at the input of ``block`` (the model's input when None),
    so the layers before it run once on B rows and the rest on k*B rows.
    """
    copies, rows = channels.numel(), images.shape[0]
    replicated = []

    def replicate_input(module, args, kwargs):
        if replicated:  # a block called twice sees the copies already
            return None
        replicated.append(True)
        return (
            tuple(_replicate(arg, copies, rows) for arg in args),
            {key: _replicate(value, copies, rows) for key, value in kwargs.items()},
        )

    def zero_channels(module, inputs, output):
        output = _layer_output(output, layer_name)
        if output.shape[0] != copies * rows:
            raise RuntimeError(
                f"batched removal: layer {layer_name!r} got {output.shape[0]} rows, "
                f"expected {copies} copies of {rows}; the block around it is not "
                f"a plain stage of its nn.Sequential"
            )
        return _zero_channels(output, channels)

    handles = [layer.register_forward_hook(zero_channels)]
    if block is not None:
        handles.append(block.register_forward_pre_hook(replicate_input, with_kwargs=True))
        inputs = images
    else:
        inputs = _replicate(images, copies, rows)
    with _hooks(*handles):
        logits = model(inputs)
    if logits.shape[0] != copies * rows:
        raise RuntimeError(
            f"batched removal at layer {layer_name!r}: the model returned "
            f"{logits.shape[0]} rows, expected {copies} copies of {rows}"
        )
    per_row = F.cross_entropy(logits.double(), labels.repeat(copies), reduction="none")
    return per_row.reshape(copies, rows).mean(dim=1)


@torch.no_grad()
def removal_scores(
    model: nn.Module, layer_names: Sequence[str], batches: Sequence[tuple[Tensor, Tensor]], *, max_rows: int = 4096
) -> list[Tensor]:
    """Per layer, the rise of the mean cross-entropy when each output channel is zeroed.

    score[l][j] = mean over batches of (L(channel j of layer l zeroed) - L), as a (C,) float64
    CPU tensor per layer, the model in eval mode (its modes restored afterwards) and the
    batches moved to the model's device. Batched: the batch is replicated k times at the
    layer's outermost enclosing block (see the module docstring), k*B <= ``max_rows``
    (at least one copy); equal, up to rounding, to one full forward pass per zeroed channel.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    names = _layer_names(layer_names)
    layers = [_submodule(model, name, "layer") for name in names]
    blocks = [outermost_sequential_child(model, name) for name in names]
    blocks = [None if block is None else _submodule(model, block, "block") for block in blocks]
    batches = _to_device(batches, _model_device(model))
    with eval_mode(model):
        counts = _channel_counts(model, names, batches[0][0])
        totals = [torch.zeros(count, dtype=torch.float64) for count in counts]
        for images, labels in batches:
            baseline = _mean_cross_entropy(model(images), labels)
            copies = max(1, max_rows // images.shape[0])
            for name, layer, block, total in zip(names, layers, blocks, totals):
                for start in range(0, total.numel(), copies):
                    channels = torch.arange(start, min(start + copies, total.numel()))
                    losses = _removed_losses(model, block, layer, name, images, labels, channels)
                    total[start : start + channels.numel()] += (losses - baseline).cpu()
    return [total / len(batches) for total in totals]


# ---------------------------------------------------------------------------- step 2: Taylor


def taylor_scores(
    model: nn.Module, layer_names: Sequence[str], batches: Sequence[tuple[Tensor, Tensor]]
) -> list[Tensor]:
    """First-order estimate of the removal scores, one forward and backward pass per batch.

    With F the layer's output (N, C, ...) and g = dL/dF the gradient of the batch-mean
    cross-entropy L (so g carries the 1/N of the mean):

        score[l][j] = mean over batches of  sum over n, p of  -F[n, j, p] * g[n, j, p],

    the linear estimate of L(channel j zeroed) - L, since zeroing changes F[:, j] by -F[:, j].
    (C,) float64 CPU tensors, the model in eval mode (restored afterwards); no parameter's
    ``.grad`` is touched.
    """
    names = _layer_names(layer_names)
    layers = [_submodule(model, name, "layer") for name in names]
    batches = _to_device(batches, _model_device(model))
    totals: list[Tensor | None] = [None] * len(names)
    with eval_mode(model), torch.enable_grad():
        for images, labels in batches:
            features: dict[str, Tensor] = {}

            def capture(name):
                def hook(module, inputs, output):
                    # Where nothing upstream requires grad, F becomes a leaf that does; later
                    # layers depend on it, so their outputs require grad too. The clone lets
                    # in-place ops after the layer (ReLU(inplace=True)) leave F intact.
                    feature = _layer_output(output, name)
                    if not feature.requires_grad:
                        feature = feature.detach().requires_grad_(True)
                    features[name] = feature
                    return feature.clone()

                return hook

            with _hooks(*[layer.register_forward_hook(capture(name)) for name, layer in zip(names, layers)]):
                loss = _mean_cross_entropy(model(images), labels)
            missing = [name for name in names if name not in features]
            if missing:
                raise ValueError(f"layers {missing} are not called in the model's forward pass")
            outputs = [features[name] for name in names]
            grads = torch.autograd.grad(loss, outputs, allow_unused=True)
            for index, (output, grad) in enumerate(zip(outputs, grads)):
                if grad is None:
                    raise ValueError(f"layer {names[index]!r} does not reach the model's output")
                dims = [dim for dim in range(output.dim()) if dim != 1]
                rise = -(output.detach().double() * grad.double()).sum(dim=dims).cpu()
                totals[index] = rise if totals[index] is None else totals[index] + rise
    return [total / len(batches) for total in totals]


# ---------------------------------------------------------------------------- the whole pipeline, cached


def _cache_path(cache_dir, method: str, layers: list[str], key_parts: dict) -> Path:
    reserved = {"method", "layers"} & set(key_parts)
    if reserved:
        raise ValueError(f"key_parts must not hold {sorted(reserved)}: the cache key adds them itself")
    key = fingerprint(method=method, layers=layers, **key_parts)
    return Path(cache_dir) / f"delta_weights_{method}_{key[:16]}.pt"


def _load_cached(path: Path, method: str, layers: list[str]) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("method") != method or payload.get("layers") != layers:
        raise ValueError(
            f"cached DELTA weights {path} do not hold method {method!r} for layers "
            f"{layers}; delete the file to recompute them"
        )
    return payload


def _scores(method: str, model: nn.Module, layers: list[str], batches, max_rows: int) -> list[Tensor]:
    if method == "removal":
        return removal_scores(model, layers, batches, max_rows=max_rows)
    return taylor_scores(model, layers, batches)


def compute_channel_weights(
    model: nn.Module,
    head_name: str,
    layer_names: Sequence[str],
    train_batches: Iterable[tuple[Tensor, Tensor]],
    *,
    method: str,
    head_epochs: int = 10,
    head_lr: float = 0.01,
    score_batches: int = 4,
    device="cpu",
    cache_dir: str | os.PathLike | None,
    key_parts: dict,
    max_rows: int = 4096,
) -> tuple[list[Tensor], dict]:
    """DELTA's channel weights of ``layer_names``: head training, scores, softmax(z / 5).

    On a deep copy of ``model`` moved to ``device`` (the caller's model is untouched):
    ``train_head`` for ``head_epochs`` epochs of ``train_batches`` at ``head_lr``, then
    ``removal_scores`` or ``taylor_scores`` (``method``) of the head-trained copy on the first
    ``score_batches`` batches of a fresh pass over ``train_batches``, then
    ``channel_weights_from_scores``; ``max_rows`` bounds the replicated batch of the
    removal estimate (``removal_scores``). Returns (one float32 CPU weight tensor per layer, info)
    with info = {"method", "seconds" (this call), "cached", "path" (None without cache)}.

    With a ``cache_dir``, the result lives in
    ``<cache_dir>/delta_weights_<method>_<fingerprint(method=..., layers=..., **key_parts)[:16]>.pt``
    (weights, scores, layers, method, key_parts), written atomically and loaded instead of
    recomputed when present. ``key_parts`` must name everything else the weights depend on
    (model weights, data, seed, settings).
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if score_batches < 1:
        raise ValueError(f"score_batches must be >= 1, got {score_batches}")
    layers = _layer_names(layer_names)
    path = None if cache_dir is None else _cache_path(cache_dir, method, layers, key_parts)
    if path is not None and path.exists():
        payload = _load_cached(path, method, layers)
        info = {"method": method, "seconds": time.perf_counter() - started, "cached": True, "path": str(path)}
        return [weight.float() for weight in payload["weights"]], info

    working = copy.deepcopy(model).to(device)
    train_head(working, head_name, train_batches, epochs=head_epochs, lr=head_lr, device=device)
    batches = list(itertools.islice(iter(train_batches), score_batches))
    scores = _scores(method, working, layers, batches, max_rows)
    weights = [weight.float().cpu() for weight in channel_weights_from_scores(scores)]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.save(
            path,
            {
                "weights": weights,
                "scores": scores,
                "layers": layers,
                "method": method,
                "key_parts": json.loads(canonical_json(key_parts)),
            },
        )
    info = {
        "method": method,
        "seconds": time.perf_counter() - started,
        "cached": False,
        "path": None if path is None else str(path),
    }
    return weights, info


def _checked_weights(weights, path) -> list[Tensor]:
    if (
        not isinstance(weights, (list, tuple))
        or not weights
        or not all(
            isinstance(weight, Tensor) and weight.dim() == 1 and weight.is_floating_point() for weight in weights
        )
    ):
        raise ValueError(
            f"{path} does not hold DELTA channel weights: expected a non-empty list of 1-D float tensors, one per layer"
        )
    return [weight.float().cpu() for weight in weights]


def load_channel_weights(path) -> list[Tensor]:
    """Channel weights from a file, one float32 CPU tensor per layer.

    A ``.json`` file is DELTA's published format, a list of per-layer score lists, turned into
    weights by ``afa_ext.compat.get_channel_weight`` (softmax(z / 5) per layer). Any other file
    is a torch file: one written by ``compute_channel_weights`` (its "weights") or a plain
    list of 1-D tensors. ValueError for a missing or unreadable file or other contents.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"channel weights file {path} does not exist")
    if path.suffix.lower() == ".json":
        try:
            weights = get_channel_weight(path)
        except (UnicodeDecodeError, TypeError) as error:  # compat raises ValueError itself otherwise
            raise ValueError(f"{path} is not DELTA's JSON of per-layer channel scores ({error})") from None
        return _checked_weights(list(weights), path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds for a file that is not its own
        raise ValueError(
            f"{path} is neither a .json of channel scores nor a torch file of "
            f"channel weights ({type(error).__name__}: {error})"
        ) from None
    if isinstance(payload, dict):
        if "weights" not in payload:
            raise ValueError(f"{path} holds a dict without 'weights' (keys: {sorted(map(str, payload))})")
        payload = payload["weights"]
    return _checked_weights(payload, path)
