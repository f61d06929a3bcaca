"""The trainer's settings: one dataclass, its defaults, TOML files and validation.

A run is fully described by a ``TrainConfig``. ``--config FILE.toml`` fills it from a
file (flags override the file), and the resolved configuration is written to
``config.toml`` in the output folder. Settings left at ``None`` take the default of the
architecture and regulariser when the run is resolved (``resolve``):

- learning rate 0.01 (stage 2 of ``afa``: 0.001), SGD momentum 0.9, no weight decay,
  lr x0.1 after 67% of each stage's epochs;
- alpha: ``afa``/``ast`` take the architecture's stage-1 alpha (0.1; MobileNetV2 0.09),
  stage 2 of ``afa`` and ``act`` its stage-2 alpha (0.15; MobileNetV2 0.04); ``l2sp``,
  ``fea_map`` and ``delta`` 0.01; beta 0.01 (head L2) for every regulariser;
- epochs per stage = round(max_iter * batch_size / training images), at least 1, unless
  ``epochs`` is given (the original: 4500 iterations at batch 64);
- stages: 2 for ``afa`` (AST, then ACT), else 1. ``stages = 2`` with another regulariser
  runs it on AFA's two-stage schedule: stage 2 starts from the best stage-1 model (which
  also becomes the source model) at ``stage2_lr``, with ``stage2_alpha`` (default: the
  stage-1 alpha). ``none`` with 2 stages is plain fine-tuning with AFA's number of steps.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Optional

REGULARIZERS = ("none", "l2sp", "fea_map", "delta", "ast", "act", "afa")
STAGE_COUNTS = (1, 2)
BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
AMP_DTYPES = ("bf16", "fp16")
DELTA_ESTIMATES = ("removal", "taylor")
SINGLE_STAGE_ALPHA = {"none": 0.0, "l2sp": 0.01, "fea_map": 0.01, "delta": 0.01}
DEFAULT_LR = 0.01
DEFAULT_STAGE2_LR = 0.001


class ConfigError(ValueError):
    """A setting that cannot work, found before anything is written."""


@dataclass
class TrainConfig:
    """Every setting of a run; ``None`` means "the default for this arch and regulariser"."""

    data: str = "digits"
    arch: Optional[str] = None            # digits_cnn for digits, else resnet101
    layers: Optional[List[str]] = None    # the architecture's preset
    weights: Optional[str] = None         # imagenet | none | PATH; digits_cnn: the cached digits 0-4 model
    reg: str = "afa"
    stages: Optional[int] = None          # 2 for afa, else 1
    alpha: Optional[float] = None
    beta: float = 0.01
    lr: Optional[float] = None
    stage2_alpha: Optional[float] = None
    stage2_lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_decay_at: float = 0.67
    lr_gamma: float = 0.1
    batch_size: int = 64
    eval_batch_size: Optional[int] = None  # 4 * batch_size; also bounds DELTA's batched removal
    max_iter: Optional[int] = 4500
    epochs: Optional[int] = None
    image_size: Optional[int] = None
    val_fraction: float = 0.1
    shots: int = 10                       # digits: labelled training images per class
    seed: int = 0
    workers: int = 0
    device: Optional[str] = None          # cuda when available, else cpu
    backend: str = "auto"
    amp: Optional[str] = None
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    delta_weights: str = "removal"        # removal | taylor | PATH
    delta_head_epochs: int = 10
    delta_batches: int = 4
    out: Optional[str] = None
    resume: bool = False
    cache_dir: Optional[str] = None       # AFA_EXT_CACHE, else ~/.cache/afa_ext

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings that may differ between a run and its resumption.
RESUME_FREE = ("resume", "workers", "out", "cache_dir")


def config_keys() -> List[str]:
    return [f.name for f in fields(TrainConfig)]


def from_dict(values: dict, where: str) -> TrainConfig:
    """A TrainConfig from a mapping; an unknown key is an error naming the known ones."""
    known = set(config_keys())
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(known))}")
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
    return 2 if reg == "afa" else 1


def method_slug(reg: str, stages: int) -> str:
    """``reg``, or ``reg-x2`` for a regulariser on a number of stages not its own: the run's
    part of a folder name."""
    return reg if stages == default_stages(reg) else f"{reg}-x{stages}"


def stage_plan(config: TrainConfig, alpha_stage1: float, alpha_stage2: float) -> List[dict]:
    """The stages of the run: (regulariser, lr, alpha) of each.

    ``afa`` is AST at (lr, alpha), then ACT at (stage2_lr, stage2_alpha). Any other
    regulariser runs once at (lr, alpha), and with ``stages = 2`` a second time at
    (stage2_lr, stage2_alpha, which defaults to the stage-1 alpha).
    """
    lr = DEFAULT_LR if config.lr is None else config.lr
    lr2 = DEFAULT_STAGE2_LR if config.stage2_lr is None else config.stage2_lr
    if config.reg == "afa":
        alpha1 = alpha_stage1 if config.alpha is None else config.alpha
        alpha2 = alpha_stage2 if config.stage2_alpha is None else config.stage2_alpha
        return [{"reg": "ast", "lr": lr, "alpha": alpha1}, {"reg": "act", "lr": lr2, "alpha": alpha2}]
    if config.alpha is not None:
        alpha = config.alpha
    elif config.reg == "ast":
        alpha = alpha_stage1
    elif config.reg == "act":
        alpha = alpha_stage2
    else:
        alpha = SINGLE_STAGE_ALPHA[config.reg]
    plan = [{"reg": config.reg, "lr": lr, "alpha": alpha}]
    if (config.stages or default_stages(config.reg)) == 2:
        alpha2 = alpha if config.stage2_alpha is None else config.stage2_alpha
        plan.append({"reg": config.reg, "lr": lr2, "alpha": alpha2})
    return plan


def epochs_per_stage(config: TrainConfig, train_images: int) -> int:
    """``epochs``, else round(max_iter * batch_size / training images), at least 1."""
    if config.epochs is not None:
        return config.epochs
    return max(1, round(config.max_iter * config.batch_size / max(train_images, 1)))


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"--{name.replace('_', '-')}: expected one of {', '.join(map(str, choices))}, got {value!r}")


def _check_number(name: str, value, *, minimum=None, maximum=None, integer=False, open_min=False) -> None:
    flag = "--" + name.replace("_", "-")
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        raise ConfigError(f"{flag}: expected a {'whole' if integer else 'finite'} number, got {value!r}")
    if minimum is not None and (value < minimum or (open_min and value == minimum)):
        bound = f"greater than {minimum}" if open_min else f"at least {minimum}"
        raise ConfigError(f"{flag}: expected a number {bound}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{flag}: expected a number at most {maximum}, got {value!r}")


def validate(config: TrainConfig) -> None:
    """Raise ConfigError for any setting that cannot work (before anything is written)."""
    for name in ("channels_last", "compile", "sync_bn", "resume"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"--{name.replace('_', '-')}: expected true or false, got {getattr(config, name)!r}")
    for name in ("data", "arch", "weights", "device", "delta_weights", "out", "cache_dir"):
        value = getattr(config, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"--{name.replace('_', '-')}: expected a string, got {value!r}")
    _check_choice("reg", config.reg, REGULARIZERS)
    if config.stages is not None:
        _check_number("stages", config.stages, integer=True)
        _check_choice("stages", config.stages, STAGE_COUNTS)
        if config.reg == "afa" and config.stages != 2:
            raise ConfigError(f"--stages {config.stages}: afa is two stages (AST, then ACT); "
                              f"use --reg ast for one AST stage")
    _check_choice("backend", config.backend, BACKENDS)
    if config.amp is not None:
        _check_choice("amp", config.amp, AMP_DTYPES)
    if config.device is not None and config.device.split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError(f"--device: expected cpu or cuda, got {config.device!r}")
    for name in ("alpha", "stage2_alpha"):
        value = getattr(config, name)
        if value is not None:
            _check_number(name, value, minimum=0)
    _check_number("beta", config.beta, minimum=0)
    for name in ("lr", "stage2_lr"):
        value = getattr(config, name)
        if value is not None:
            _check_number(name, value, minimum=0, open_min=True)
    _check_number("momentum", config.momentum, minimum=0, maximum=1)
    _check_number("weight_decay", config.weight_decay, minimum=0)
    _check_number("lr_decay_at", config.lr_decay_at, minimum=0, maximum=1)
    _check_number("lr_gamma", config.lr_gamma, minimum=0, open_min=True)
    _check_number("batch_size", config.batch_size, minimum=1, integer=True)
    if config.eval_batch_size is not None:
        _check_number("eval_batch_size", config.eval_batch_size, minimum=1, integer=True)
    if config.epochs is not None:
        _check_number("epochs", config.epochs, minimum=1, integer=True)
    elif config.max_iter is None:
        raise ConfigError("--max-iter / --epochs: give one of them")
    else:
        _check_number("max_iter", config.max_iter, minimum=1, integer=True)
    if config.image_size is not None:
        _check_number("image_size", config.image_size, minimum=1, integer=True)
    _check_number("val_fraction", config.val_fraction, minimum=0, maximum=1, open_min=True)
    if config.val_fraction >= 1:
        raise ConfigError(f"--val-fraction: expected a fraction below 1, got {config.val_fraction!r}")
    _check_number("shots", config.shots, minimum=1, integer=True)
    _check_number("seed", config.seed, minimum=0, integer=True)
    _check_number("workers", config.workers, minimum=0, integer=True)
    _check_number("delta_head_epochs", config.delta_head_epochs, minimum=0, integer=True)
    _check_number("delta_batches", config.delta_batches, minimum=1, integer=True)
    if config.delta_weights not in DELTA_ESTIMATES and not Path(config.delta_weights).is_file():
        raise ConfigError(f"--delta-weights: expected removal, taylor or an existing file, got {config.delta_weights!r}")
    if config.layers is not None and (not isinstance(config.layers, (list, tuple)) or not config.layers
                                      or not all(isinstance(n, str) and n for n in config.layers)):
        raise ConfigError(f"--layers: expected a comma-separated list of layer names, got {config.layers!r}")
    if not isinstance(config.data, str) or not config.data:
        raise ConfigError(f"--data: expected a folder or 'digits', got {config.data!r}")


def with_defaults(config: TrainConfig, cuda_available: bool) -> TrainConfig:
    """The configuration with the defaults that do not need the model filled in."""
    resolved = dataclasses.replace(config)
    if resolved.arch is None:
        resolved.arch = "digits_cnn" if resolved.data == "digits" else "resnet101"
    if resolved.device is None:
        resolved.device = "cuda" if cuda_available else "cpu"
    if resolved.cache_dir is None:
        resolved.cache_dir = default_cache_dir()
    if resolved.stages is None and resolved.reg in REGULARIZERS:
        resolved.stages = default_stages(resolved.reg)
    if resolved.out is None:
        data_name = "digits" if resolved.data == "digits" else Path(resolved.data).name
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
    "with_defaults",
    "stage_plan",
    "default_stages",
    "method_slug",
    "STAGE_COUNTS",
    "epochs_per_stage",
    "config_keys",
]
