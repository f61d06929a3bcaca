"""The trainer's settings: one dataclass, its defaults, TOML files and validation.

A run is fully described by a ``TrainConfig``. ``--config FILE.toml`` fills it from a
file (flags override the file). Settings left at ``None`` take the default of the
architecture and regulariser in ``resolve``, the one place defaults are filled in; the
resolved configuration is what ``config.toml`` records and what everything downstream
(data, model, stages, step) reads:

- architecture: digits_cnn for the digits data, else resnet101; image size, hooked layers
  and AFA alphas: the architecture's preset (models.ARCH_PRESETS; 224 px without one);
- weights: imagenet (digits_cnn: the cached model pretrained on digits 0-4);
- learning rate 0.01 (stage 2: 0.001), SGD momentum 0.9, no weight decay, lr x0.1 after
  67% of each stage's epochs;
- alpha: the regulariser's default (regularizers.REGULARIZERS: ``ast`` and stage 1 of
  ``afa`` the architecture's stage-1 alpha, ``act`` and stage 2 of ``afa`` its stage-2
  alpha; ``l2sp``, ``fea_map`` and ``delta`` 0.01); beta 0.01 (head L2) for every one;
- epochs per stage = round(max_iter * batch_size / training images), at least 1, unless
  ``epochs`` is given (the original: 4500 iterations at batch 64);
- stages: 2 for ``afa`` (AST, then ACT), else 1. ``stages = 2`` with another regulariser
  runs it on AFA's two-stage schedule: stage 2 starts from the best stage-1 model (which
  also becomes the source model) at ``stage2_lr``, with ``stage2_alpha`` (default: the
  stage-1 alpha). ``none`` with 2 stages is plain fine-tuning with AFA's number of steps;
- evaluation batch 4x the training batch; data workers 0 on the CPU, and on CUDA one per
  core this process may run on, at most 8.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import afa_ext

from .data import FOLDER_IMAGE_SIZE
from .regularizers import REGULARIZERS

STAGE_COUNTS = (1, 2)
BACKENDS = afa_ext.BACKEND_CHOICES
AMP_DTYPES = ("bf16", "fp16")
DELTA_ESTIMATES = ("removal", "taylor")
DEVICES = ("cpu", "cuda")
DEFAULT_LR = 0.01
DEFAULT_STAGE2_LR = 0.001
MAX_DEFAULT_WORKERS = 8


class ConfigError(ValueError):
    """A setting that cannot work, found before anything is written."""


@dataclass
class TrainConfig:
    """Every setting of a run; ``None`` means "the default for this arch and regulariser"."""

    data: str = "digits"
    arch: str | None = None  # digits_cnn for digits, else resnet101
    layers: list[str] | None = None  # the architecture's preset
    weights: str | None = None  # imagenet | none | PATH; digits_cnn: the cached digits 0-4 model
    reg: str = "afa"
    stages: int | None = None  # 2 for afa, else 1
    alpha: float | None = None
    beta: float = 0.01
    lr: float | None = None
    stage2_alpha: float | None = None
    stage2_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_decay_at: float = 0.67
    lr_gamma: float = 0.1
    batch_size: int = 64
    eval_batch_size: int | None = None  # 4 * batch_size; also bounds DELTA's batched removal
    max_iter: int | None = 4500
    epochs: int | None = None
    image_size: int | None = None
    val_fraction: float = 0.1
    shots: int = 10  # digits: labelled training images per class
    seed: int = 0
    workers: int | None = None  # CPU: 0; CUDA: one per usable core, at most 8
    device: str | None = None  # cuda when available, else cpu
    backend: str = "auto"
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    delta_weights: str = "removal"  # removal | taylor | PATH
    delta_head_epochs: int = 10
    delta_batches: int = 4
    out: str | None = None
    resume: bool = False
    cache_dir: str | None = None  # AFA_EXT_CACHE, else ~/.cache/afa_ext

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings that may differ between a run and its resumption.
RESUME_FREE = ("resume", "workers", "out", "cache_dir")


def config_keys() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def from_dict(values: dict, where: str) -> TrainConfig:
    """A TrainConfig from a mapping; an unknown key is an error naming the known ones."""
    known = set(config_keys())
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(known))}"
        )
    config = TrainConfig(**values)
    return config


def load_toml(path: str) -> dict:
    """The settings of a TOML file (flat ``key = value`` pairs, flag names with ``_``)."""
    import tomllib

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config: no such file {path!r}")
    try:
        with open(file, "rb") as handle:
            values = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config {path}: not valid TOML: {error}") from None
    from_dict(values, f"--config {path}")  # checks the keys
    return values


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(config: TrainConfig) -> str:
    """The configuration as TOML; unset (None) settings are left out."""
    lines = ["# afa_ext.train: the resolved configuration of this run"]
    for key, value in config.to_dict().items():
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def default_cache_dir() -> str:
    return os.environ.get("AFA_EXT_CACHE") or str(Path.home() / ".cache" / "afa_ext")


def default_stages(reg: str) -> int:
    return REGULARIZERS[reg].default_stages


def method_slug(reg: str, stages: int) -> str:
    """``reg``, or ``reg-x2`` for a regulariser on a number of stages not its own: the run's
    part of a folder name."""
    return reg if stages == default_stages(reg) else f"{reg}-x{stages}"


@dataclass(frozen=True)
class Stage:
    """One stage of a run: its regulariser, learning rate and alpha."""

    reg: str
    lr: float
    alpha: float


def stage_regularizers(reg: str, stages: int) -> tuple[str, ...]:
    """The regulariser of each stage: ``afa``'s own (AST, ACT), else ``reg`` in every stage."""
    return REGULARIZERS[reg].stage_regularizers or (reg,) * stages


def stage_plan(config: TrainConfig) -> list[Stage]:
    """The stages of a resolved run: stage 1 at (lr, alpha), stage 2 at (stage2_lr, stage2_alpha)."""
    settings = [(config.lr, config.alpha), (config.stage2_lr, config.stage2_alpha)]
    return [Stage(reg, lr, alpha) for reg, (lr, alpha) in zip(stage_regularizers(config.reg, config.stages), settings)]


def epochs_per_stage(config: TrainConfig, train_images: int) -> int:
    """``epochs``, else round(max_iter * batch_size / training images), at least 1."""
    if config.epochs is not None:
        return config.epochs
    return max(1, round(config.max_iter * config.batch_size / max(train_images, 1)))


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"--{name.replace('_', '-')}: expected one of {', '.join(map(str, choices))}, got {value!r}")


@dataclass(frozen=True)
class Bounds:
    """The numbers a numeric setting accepts: at least ``minimum`` (above it when
    ``open_min``), at most ``maximum``, whole when ``integer``."""

    minimum: float | None = None
    maximum: float | None = None
    integer: bool = False
    open_min: bool = False


NUMBER_BOUNDS = {
    "stages": Bounds(integer=True),
    "alpha": Bounds(0),
    "stage2_alpha": Bounds(0),
    "beta": Bounds(0),
    "lr": Bounds(0, open_min=True),
    "stage2_lr": Bounds(0, open_min=True),
    "momentum": Bounds(0, 1),
    "weight_decay": Bounds(0),
    "lr_decay_at": Bounds(0, 1),
    "lr_gamma": Bounds(0, open_min=True),
    "batch_size": Bounds(1, integer=True),
    "eval_batch_size": Bounds(1, integer=True),
    "max_iter": Bounds(1, integer=True),
    "epochs": Bounds(1, integer=True),
    "image_size": Bounds(1, integer=True),
    "val_fraction": Bounds(0, 1, open_min=True),
    "shots": Bounds(1, integer=True),
    "seed": Bounds(0, integer=True),
    "workers": Bounds(0, integer=True),
    "delta_head_epochs": Bounds(0, integer=True),
    "delta_batches": Bounds(1, integer=True),
}
FLAGS = ("channels_last", "compile", "sync_bn", "resume")
TEXTS = ("data", "arch", "weights", "device", "delta_weights", "out", "cache_dir")


def _check_number(name: str, value, bounds: Bounds) -> None:
    flag = "--" + name.replace("_", "-")
    kind = int if bounds.integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not bounds.integer and not math.isfinite(value)):
        raise ConfigError(f"{flag}: expected a {'whole' if bounds.integer else 'finite'} number, got {value!r}")
    low, high = bounds.minimum, bounds.maximum
    if low is not None and (value < low or (bounds.open_min and value == low)):
        raise ConfigError(
            f"{flag}: expected a number {'greater than' if bounds.open_min else 'at least'} {low}, got {value!r}"
        )
    if high is not None and value > high:
        raise ConfigError(f"{flag}: expected a number at most {high}, got {value!r}")


def validate(config: TrainConfig) -> None:
    """Raise ConfigError for any setting that cannot work (before anything is written)."""
    for name in FLAGS:
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"--{name.replace('_', '-')}: expected true or false, got {getattr(config, name)!r}")
    for name in TEXTS:
        value = getattr(config, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"--{name.replace('_', '-')}: expected a string, got {value!r}")
    optional = {field.name for field in fields(TrainConfig) if field.default is None}
    for name, bounds in NUMBER_BOUNDS.items():
        value = getattr(config, name)
        if value is not None or name not in optional:
            _check_number(name, value, bounds)
    _check_choice("reg", config.reg, REGULARIZERS)
    own_stages = REGULARIZERS[config.reg].stage_regularizers
    if config.stages is not None:
        _check_choice("stages", config.stages, STAGE_COUNTS)
        if own_stages and config.stages != len(own_stages):
            first = own_stages[0]
            raise ConfigError(
                f"--stages {config.stages}: {config.reg} is {len(own_stages)} stages "
                f"({', then '.join(reg.upper() for reg in own_stages)}); "
                f"use --reg {first} for one {first.upper()} stage"
            )
    _check_choice("backend", config.backend, BACKENDS)
    if config.amp is not None:
        _check_choice("amp", config.amp, AMP_DTYPES)
    if config.device is not None and config.device.split(":")[0] not in DEVICES:
        raise ConfigError(f"--device: expected {' or '.join(DEVICES)}, got {config.device!r}")
    if config.epochs is None and config.max_iter is None:
        raise ConfigError("--max-iter / --epochs: give one of them")
    if config.val_fraction >= 1:
        raise ConfigError(f"--val-fraction: expected a fraction below 1, got {config.val_fraction!r}")
    if config.delta_weights not in DELTA_ESTIMATES and not Path(config.delta_weights).is_file():
        raise ConfigError(
            f"--delta-weights: expected {', '.join(DELTA_ESTIMATES)} or an existing file, got {config.delta_weights!r}"
        )
    if config.layers is not None and (
        not isinstance(config.layers, (list, tuple))
        or not config.layers
        or not all(isinstance(n, str) and n for n in config.layers)
    ):
        raise ConfigError(f"--layers: expected a comma-separated list of layer names, got {config.layers!r}")
    if not isinstance(config.data, str) or not config.data:
        raise ConfigError(f"--data: expected a folder or 'digits', got {config.data!r}")


def default_workers(device: str) -> int:
    """Data-loading workers: none on the CPU (the model, not decoding, is the bottleneck there);
    on CUDA one per core this process may run on, at most MAX_DEFAULT_WORKERS."""
    if not device.startswith("cuda"):
        return 0
    return min(MAX_DEFAULT_WORKERS, len(os.sched_getaffinity(0)))


def resolve(config: TrainConfig, cuda_available: bool) -> TrainConfig:
    """The configuration checked (ConfigError) and with every default filled in.

    Resolving a resolved configuration changes nothing, so a run's ``config.toml`` (or one
    written before a setting existed) resolves to what the run used.
    """
    from .models import check_architecture, default_image_size, default_layers, preset_alphas
    from .pretrain import digits_source_path

    validate(config)
    resolved = dataclasses.replace(config)
    digits = resolved.data == "digits"
    if resolved.arch is None:
        resolved.arch = "digits_cnn" if digits else "resnet101"
    check_architecture(resolved.arch)
    if resolved.device is None:
        resolved.device = "cuda" if cuda_available else "cpu"
    if resolved.cache_dir is None:
        resolved.cache_dir = default_cache_dir()
    if resolved.stages is None:
        resolved.stages = default_stages(resolved.reg)
    if resolved.image_size is None:
        resolved.image_size = default_image_size(resolved.arch) or FOLDER_IMAGE_SIZE
    if resolved.layers is None:
        resolved.layers = list(default_layers(resolved.arch))
    if resolved.weights is None:
        resolved.weights = (
            digits_source_path(resolved.cache_dir, resolved.image_size) if resolved.arch == "digits_cnn" else "imagenet"
        )
    if resolved.lr is None:
        resolved.lr = DEFAULT_LR
    regs = stage_regularizers(resolved.reg, resolved.stages)
    alphas = preset_alphas(resolved.arch)
    if resolved.alpha is None:
        resolved.alpha = REGULARIZERS[regs[0]].default_alpha(alphas)
    if resolved.stages == 2:
        if resolved.stage2_lr is None:
            resolved.stage2_lr = DEFAULT_STAGE2_LR
        if resolved.stage2_alpha is None:
            # The same regulariser again keeps stage 1's alpha; another one takes its own default.
            resolved.stage2_alpha = (
                resolved.alpha if regs[1] == regs[0] else REGULARIZERS[regs[1]].default_alpha(alphas)
            )
    if resolved.eval_batch_size is None:
        resolved.eval_batch_size = 4 * resolved.batch_size
    if resolved.workers is None:
        resolved.workers = default_workers(resolved.device)
    if resolved.out is None:
        data_name = "digits" if digits else Path(resolved.data).name
        method = method_slug(resolved.reg, resolved.stages)
        resolved.out = str(Path("runs") / f"{data_name}-{resolved.arch}-{method}-seed{resolved.seed}")
    return resolved


__all__ = [
    "TrainConfig",
    "ConfigError",
    "REGULARIZERS",
    "load_toml",
    "to_toml",
    "from_dict",
    "validate",
    "resolve",
    "Stage",
    "stage_plan",
    "stage_regularizers",
    "default_stages",
    "method_slug",
    "STAGE_COUNTS",
    "epochs_per_stage",
    "config_keys",
]
