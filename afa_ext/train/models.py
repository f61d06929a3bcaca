"""Models for the AFA trainer: build a source/target CNN and read feature maps of its layers.

This module builds the networks the trainer fine-tunes (torchvision classification models
and the small ``DigitsCNN``), loads their weights (torchvision's ImageNet weights or a local
file), swaps the classifier head for the target's classes, names the layers whose feature
maps the AFA losses align (``ARCH_PRESETS``), and keeps those feature maps through forward
hooks (``FeatureHooks``).
"""

from __future__ import annotations

import difflib
import os
import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn

__all__ = [
    "ArchPreset",
    "ARCH_PRESETS",
    "DigitsCNN",
    "WeightsError",
    "LayerError",
    "available_architectures",
    "check_architecture",
    "default_image_size",
    "preset_alphas",
    "build_model",
    "head_module_name",
    "replace_head",
    "default_layers",
    "resolve_layers",
    "FeatureHooks",
    "outermost_sequential_child",
    "eval_mode",
    "layer_output_shapes",
    "feature_shapes",
]


@dataclass(frozen=True)
class ArchPreset:
    """Defaults of one architecture: hooked layers, classifier head, input side, AFA alphas."""

    layers: tuple[str, ...]
    head: str
    image_size: int
    alpha_stage1: float
    alpha_stage2: float


def _resnet_preset(layers: tuple[str, ...]) -> ArchPreset:
    return ArchPreset(layers=layers, head="fc", image_size=224, alpha_stage1=0.1, alpha_stage2=0.15)


_BASIC_BLOCK_LAYERS = ("layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2")

ARCH_PRESETS: dict[str, ArchPreset] = {
    "resnet18": _resnet_preset(_BASIC_BLOCK_LAYERS),
    "resnet34": _resnet_preset(_BASIC_BLOCK_LAYERS),
    "resnet50": _resnet_preset(("layer1.2.conv3", "layer2.3.conv3", "layer3.5.conv3", "layer4.2.conv3")),
    "resnet101": _resnet_preset(("layer1.2.conv3", "layer2.3.conv3", "layer3.22.conv3", "layer4.2.conv3")),
    "resnet152": _resnet_preset(("layer1.2.conv3", "layer2.7.conv3", "layer3.35.conv3", "layer4.2.conv3")),
    "mobilenet_v2": ArchPreset(
        layers=(
            "features.5.conv.2",
            "features.9.conv.2",
            "features.13.conv.2",
            "features.17.conv.2",
        ),
        head="classifier.1",
        image_size=224,
        alpha_stage1=0.09,
        alpha_stage2=0.04,
    ),
    "inception_v3": ArchPreset(
        layers=("Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c"),
        head="fc",
        image_size=299,
        alpha_stage1=0.1,
        alpha_stage2=0.15,
    ),
    "digits_cnn": ArchPreset(
        layers=("features.0", "features.1", "features.2"),
        head="fc",
        image_size=16,
        # The feature terms of this small net are ~100x its cross-entropy at alpha 0.1.
        alpha_stage1=0.001,
        alpha_stage2=0.001,
    ),
}

# Architectures with auxiliary classifiers: the trainer uses the main head only, so these
# sub-modules are dropped (set to None) after the weights are loaded.
_AUX_HEADS: dict[str, tuple[str, ...]] = {
    "inception_v3": ("AuxLogits",),
    "googlenet": ("aux1", "aux2"),
}

_SUGGESTIONS = 5


class WeightsError(ValueError):
    """The requested weights cannot be had (download, file) or do not fit the architecture."""


class LayerError(ValueError):
    """An unknown layer or architecture name, or a model without the expected head."""


class DigitsCNN(nn.Module):
    """Small CNN for 1-channel 16x16 digits.

    ``features`` is an ``nn.Sequential`` of 3 blocks, each ``nn.Sequential(Conv2d 3x3,
    BatchNorm2d, ReLU)`` with channels in_channels -> 16 -> 32 -> 64; the 2nd and 3rd block
    have stride 2 (16x16 -> 16x16 -> 8x8 -> 4x4). Then global average pooling, flatten and
    the linear head ``fc``. The hooked layers are the block outputs ``features.0/1/2``.
    """

    def __init__(self, num_classes: int, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, 16, stride=1),
            _conv_block(16, 32, stride=2),
            _conv_block(32, 64, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


# --------------------------------------------------------------------------- architectures


def _torchvision_architectures() -> list[str]:
    return list(torchvision.models.list_models(module=torchvision.models))


def available_architectures() -> list[str]:
    """Sorted names accepted by ``build_model``: the presets and torchvision's classifiers."""
    return sorted(set(ARCH_PRESETS) | set(_torchvision_architectures()))


def check_architecture(arch: str) -> None:
    """LayerError naming the closest known architectures unless ``build_model`` knows ``arch``."""
    names = available_architectures()
    if arch in names:
        return
    close = difflib.get_close_matches(arch, names, n=_SUGGESTIONS, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else f"available: {', '.join(names)}"
    raise LayerError(f"unknown architecture {arch!r}; {hint}")


def preset_alphas(arch: str) -> tuple[float, float]:
    """The (stage-1, stage-2) alphas of AFA for ``arch``: its preset's, else ResNet's (0.1, 0.15)."""
    preset = ARCH_PRESETS.get(arch)
    return (preset.alpha_stage1, preset.alpha_stage2) if preset else (0.1, 0.15)


def default_image_size(arch: str) -> int | None:
    """The input side of ``arch``'s preset, None for an architecture without one."""
    preset = ARCH_PRESETS.get(arch)
    return preset.image_size if preset else None


def default_layers(arch: str) -> tuple[str, ...]:
    """The preset hooked layers of ``arch``; ``LayerError`` for an architecture without one."""
    if arch not in ARCH_PRESETS:
        raise LayerError(
            f"architecture {arch!r} has no preset hooked layers (presets: "
            f"{', '.join(sorted(ARCH_PRESETS))}); pass the layers to hook with --layers, "
            "e.g. module names as listed by model.named_modules()"
        )
    return ARCH_PRESETS[arch].layers


# --------------------------------------------------------------------------- heads


def head_module_name(model: nn.Module, arch: str | None = None) -> str:
    """Name of the classifier head: the preset's for ``arch``, else the model's last nn.Linear."""
    modules = dict(model.named_modules())
    if arch in ARCH_PRESETS:
        head = ARCH_PRESETS[arch].head
        if head not in modules:
            raise LayerError(f"the model has no module {head!r}, the head of the {arch!r} preset")
        return head
    linear_names = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    if not linear_names:
        raise LayerError(
            f"cannot find the classifier head of {arch or type(model).__name__!r}: it has no "
            "nn.Linear module (e.g. squeezenet ends in a Conv2d); pick an architecture whose "
            "classifier ends in nn.Linear"
        )
    return linear_names[-1]


def replace_head(model: nn.Module, head: str, num_classes: int) -> None:
    """Replace the nn.Linear ``head`` of ``model`` by a fresh one with ``num_classes`` outputs."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    old = dict(model.named_modules()).get(head)
    if not isinstance(old, nn.Linear):
        found = "no such module" if old is None else type(old).__name__
        raise LayerError(f"head {head!r} must be an nn.Linear module, found {found}")
    new = nn.Linear(old.in_features, num_classes, bias=True)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, child_name = head.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def _head_name_of_architecture(arch: str) -> str:
    """Head of ``arch`` without building it for real where possible (meta device)."""
    if arch in ARCH_PRESETS:
        return ARCH_PRESETS[arch].head
    try:
        with torch.device("meta"):
            skeleton = _construct(arch, num_classes=1000, in_channels=3, aux_logits=False, loaded=True)
    except (NotImplementedError, RuntimeError):  # some initializers need real tensors
        skeleton = _construct(arch, num_classes=1000, in_channels=3, aux_logits=False, loaded=True)
    return head_module_name(skeleton, arch)


# --------------------------------------------------------------------------- building


def _construct(arch: str, num_classes: int, in_channels: int, aux_logits: bool, loaded: bool) -> nn.Module:
    """A randomly initialized ``arch``; ``loaded`` says weights will overwrite the init."""
    if arch == "digits_cnn":
        return DigitsCNN(num_classes, in_channels)
    kwargs = {"num_classes": num_classes}
    if arch in _AUX_HEADS:
        # With loaded weights the input transform torchvision uses for its pretrained weights.
        kwargs.update(aux_logits=aux_logits, init_weights=not loaded, transform_input=loaded)
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def _drop_aux_heads(model: nn.Module, arch: str) -> None:
    if arch not in _AUX_HEADS:
        return
    model.aux_logits = False
    for name in _AUX_HEADS[arch]:
        setattr(model, name, None)


def _check_in_channels(arch: str, in_channels: int) -> None:
    if arch != "digits_cnn" and in_channels != 3:
        raise LayerError(
            f"{arch!r} takes 3-channel images, got in_channels={in_channels}; only digits_cnn "
            "takes other channel counts (repeat a gray channel 3 times for torchvision models)"
        )


def build_model(
    arch: str,
    num_classes: int,
    weights: str,
    *,
    in_channels: int = 3,
    source_classes: int | None = None,
) -> nn.Module:
    """Build ``arch`` with ``weights`` ("imagenet", "none" or a file path) and a fresh head.

    The returned model's head is an nn.Linear with ``num_classes`` outputs; with loaded
    weights it is newly initialized, all other parameters come from the weights. A file may
    hold any number of source classes (read from its head, ``source_classes`` as fallback).
    Auxiliary classifiers (inception_v3, googlenet) are removed.
    """
    check_architecture(arch)
    _check_in_channels(arch, in_channels)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if weights == "none":
        return _construct(arch, num_classes, in_channels, aux_logits=False, loaded=False)
    if weights == "imagenet":
        model = _imagenet_model(arch)
    else:
        model = _model_from_file(arch, weights, in_channels, source_classes)
    _drop_aux_heads(model, arch)
    replace_head(model, head_module_name(model, arch), num_classes)
    return model


def _imagenet_model(arch: str) -> nn.Module:
    """``arch`` with torchvision's default pretrained weights (download or cache)."""
    if arch == "digits_cnn":
        raise WeightsError(
            "there are no ImageNet weights for digits_cnn; pass --weights PATH with a "
            "state_dict file, e.g. the demo's pretrained digits model"
        )
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return torchvision.models.get_model(arch, weights=weights)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise WeightsError(
            f"the pretrained ImageNet weights of {arch!r} ({weights}) could not be downloaded "
            f"or found in the cache {cache_dir} ({type(err).__name__}: {err}). Without network "
            "access pass a local file instead with --weights PATH, where PATH holds the model's "
            "state_dict, e.g. saved with torch.save(model.state_dict(), PATH) on a machine that "
            f"has the weights (or put torchvision's file {os.path.basename(weights.url)} into "
            "the cache)"
        ) from err


def _model_from_file(arch: str, path: str, in_channels: int, source_classes: int | None) -> nn.Module:
    """``arch`` built with the file's head size and loaded strictly from ``path``."""
    state_dict = _read_state_dict(path)
    head = _head_name_of_architecture(arch)
    file_classes = _head_classes(state_dict, head)
    if file_classes is None:
        file_classes = source_classes if source_classes is not None else 1000
    aux_prefixes = tuple(f"{name}." for name in _AUX_HEADS.get(arch, ()))
    aux_logits = any(key.startswith(aux_prefixes) for key in state_dict)
    model = _construct(arch, file_classes, in_channels, aux_logits=aux_logits, loaded=True)
    _load_strict(model, state_dict, arch, path)
    return model


def _read_state_dict(path: str) -> dict[str, Tensor]:
    """The state_dict in ``path`` (plain or under "model"/"state_dict"), DDP prefix stripped."""
    if not os.path.isfile(path):
        raise WeightsError(
            f"weights file {path!r} does not exist; --weights takes 'imagenet', 'none' or the path of a state_dict file"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise WeightsError(
            f"cannot read weights file {path!r} ({type(err).__name__}: {err}); save only the "
            "state_dict, e.g. torch.save(model.state_dict(), PATH)"
        ) from err
    state_dict = _unwrap_checkpoint(loaded, path)
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def _unwrap_checkpoint(loaded: object, path: str) -> dict[str, Tensor]:
    if isinstance(loaded, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
        if loaded and all(isinstance(value, Tensor) for value in loaded.values()):
            return dict(loaded)
    described = f"a dict with keys {list(loaded)[:8]}" if isinstance(loaded, Mapping) else type(loaded).__name__
    raise WeightsError(
        f"weights file {path!r} holds {described}; expected a state_dict (names -> tensors) "
        "or a dict holding one under 'model' or 'state_dict'"
    )


def _head_classes(state_dict: Mapping[str, Tensor], head: str) -> int | None:
    weight = state_dict.get(f"{head}.weight")
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def _load_strict(model: nn.Module, state_dict: Mapping[str, Tensor], arch: str, path: str) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise WeightsError(
            f"weights file {path!r} does not fit {arch!r}: {_state_dict_mismatch(model, state_dict) or err}"
        ) from err


def _state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, Tensor]) -> str:
    """Missing keys, unexpected keys and shape mismatches, a few of each with counts."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: model {tuple(expected[key].shape)} vs file {tuple(state_dict[key].shape)}"
        for key in expected
        if key in state_dict and expected[key].shape != state_dict[key].shape
    ]
    parts = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            more = f", ... ({len(items) - _SUGGESTIONS} more)" if len(items) > _SUGGESTIONS else ""
            parts.append(f"{len(items)} {label} ({', '.join(items[:_SUGGESTIONS])}{more})")
    return "; ".join(parts)


# --------------------------------------------------------------------------- layers


def resolve_layers(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Check that ``names`` are distinct modules of ``model``; return them as a list."""
    names = list(names)
    if not names:
        raise LayerError("no layers to hook: give at least one module name")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise LayerError(f"layers to hook must be distinct; repeated: {', '.join(duplicates)}")
    modules = dict(model.named_modules())
    for name in names:
        if name == "":
            raise LayerError("the empty layer name is the whole model; name one of its modules")
        if name not in modules:
            suggestions = ", ".join(_closest_layers(model, name))
            raise LayerError(f"unknown layer {name!r} in {type(model).__name__}; closest: {suggestions}")
    return names


def _closest_layers(model: nn.Module, name: str) -> list[str]:
    """Module names close to ``name``; failing that, leaf modules under its longest known prefix."""
    candidates = [module_name for module_name, _ in model.named_modules() if module_name]
    close = difflib.get_close_matches(name, candidates, n=_SUGGESTIONS, cutoff=0.5)
    if close:
        return close
    leaves = [
        module_name for module_name, module in model.named_modules() if module_name and not list(module.children())
    ]
    parts = name.split(".")
    for length in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:length])
        under_prefix = [leaf for leaf in leaves if leaf.startswith(prefix)]
        if under_prefix:
            return under_prefix[:_SUGGESTIONS]
    return leaves[:_SUGGESTIONS]


def outermost_sequential_child(model: nn.Module, layer_name: str) -> str | None:
    """Outermost ancestor-or-self of ``layer_name`` whose parent is an nn.Sequential, or None.

    E.g. resnet "layer1.2.conv3" -> "layer1.2", mobilenet_v2 "features.5.conv.2" ->
    "features.5", inception "Mixed_5d" -> None.
    """
    resolve_layers(model, [layer_name])
    parent = model
    parts = layer_name.split(".")
    for depth, part in enumerate(parts, start=1):
        if isinstance(parent, nn.Sequential):
            return ".".join(parts[:depth])
        parent = getattr(parent, part)
    return None


# --------------------------------------------------------------------------- features


class FeatureHooks:
    """Forward hooks that keep the outputs of the named layers of a model, in the given order.

    ``features`` gives the outputs of the last forward of ``model`` (a forward pre-hook on the
    model forgets older ones) as the live tensors, so the features of a trained model carry
    autograd; call ``clear()`` once they are used to free them. ``remove()`` takes the hooks
    off (and forgets the outputs); used as a context manager it does so on exit. The hooks sit
    on the modules found through ``model``, so they keep working once the model is wrapped in
    DDP or torch.compile. A module that runs twice in one forward keeps its last output.
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str]):
        self.layer_names: tuple[str, ...] = tuple(resolve_layers(model, layer_names))
        modules = dict(model.named_modules())
        self._outputs: dict[str, Tensor] = {}
        self._forward_count = 0
        self._removed = False
        self._handles = [model.register_forward_pre_hook(self._start_forward)]
        self._handles += [modules[name].register_forward_hook(self._keeper(name)) for name in self.layer_names]

    def _start_forward(self, module: nn.Module, inputs: object) -> None:
        self._outputs.clear()
        self._forward_count += 1

    def _keeper(self, name: str):
        def keep_output(module: nn.Module, inputs: object, output: object) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(f"hooked layer {name!r} returned {type(output).__name__}, expected a Tensor")
            self._outputs[name] = output

        return keep_output

    @property
    def features(self) -> list[Tensor]:
        """Outputs of the hooked layers in the last forward, in the order of ``layer_names``."""
        if self._removed:
            raise RuntimeError("the feature hooks were removed; create new FeatureHooks to read features")
        if self._forward_count == 0:
            raise RuntimeError("no forward of the hooked model has run yet; call the model before reading features")
        missing = [name for name in self.layer_names if name not in self._outputs]
        if missing:
            raise RuntimeError(
                f"hooked layer(s) {', '.join(missing)} did not run in the last forward of the "
                "model (or the features were cleared since); hook layers on the forward path"
            )
        return [self._outputs[name] for name in self.layer_names]

    def clear(self) -> None:
        """Forget the kept outputs (and the autograd graphs they hold on to)."""
        self._outputs.clear()

    def remove(self) -> None:
        """Take the hooks off the model and forget the kept outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs.clear()
        self._removed = True

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; each module's own train/eval flag restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def layer_output_shapes(model: nn.Module, layer_names: Sequence[str], images: Tensor) -> list[tuple[int, ...]]:
    """(C, ...) of the output of each named layer for ``images``: one forward pass in eval
    mode under no_grad, every module's train/eval mode restored afterwards."""
    with eval_mode(model), FeatureHooks(model, layer_names) as hooks, torch.no_grad():
        model(images)
        return [tuple(feature.shape[1:]) for feature in hooks.features]


def feature_shapes(
    model: nn.Module, layer_names: Sequence[str], image_size: int, in_channels: int = 3
) -> list[tuple[int, ...]]:
    """(C, H, W) of each hooked layer for a 2-image batch of side ``image_size``."""
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.get_default_dtype()
    batch = torch.zeros(2, in_channels, image_size, image_size, device=device, dtype=dtype)
    return layer_output_shapes(model, layer_names, batch)
