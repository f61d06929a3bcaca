"""The command line: ``afa-train`` / ``python -m afa_ext.train``.

Settings come from the defaults, then ``--config FILE.toml``, then the flags given (flags
win). Bad settings and bad data are reported as one line on stderr, with exit status 2,
before anything is written.
"""

from __future__ import annotations

import argparse
import sys

from .config import (
    AMP_DTYPES,
    BACKENDS,
    DELTA_ESTIMATES,
    DEVICES,
    MAX_DEFAULT_WORKERS,
    REGULARIZERS,
    STAGE_COUNTS,
    ConfigError,
    TrainConfig,
    from_dict,
    load_toml,
)

__all__ = ["main", "parse_config", "given_settings", "build_parser"]


def _layer_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def build_parser(parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = parser_class(
        prog="afa-train",
        description="Fine-tune a pretrained CNN on a target data set with a feature-alignment regulariser "
        "(AFA, DELTA, feature-map L2, L2-SP), the feature terms computed by afa_ext's fused losses.",
        argument_default=argparse.SUPPRESS,
    )
    add = parser.add_argument
    add("--config", help="TOML file of settings (flag names with _); flags given override it")
    add("--data", help="'digits' (the embedded offline demo) or an image folder with train/ [val/] [test/]")
    add(
        "--arch",
        help="resnet18/34/50/101/152, mobilenet_v2, inception_v3, digits_cnn, or any torchvision "
        "classification model with --layers",
    )
    add("--layers", type=_layer_list, help="comma-separated module names to align (default: the arch's preset)")
    add(
        "--weights",
        help="imagenet | none | PATH of a state_dict or checkpoint (default: imagenet; digits_cnn: "
        "the cached model pretrained on digits 0-4)",
    )
    add("--reg", choices=tuple(REGULARIZERS), help="regulariser (default afa: AST stage, then ACT stage)")
    add(
        "--stages",
        type=int,
        choices=STAGE_COUNTS,
        help="2: AFA's two-stage schedule with any regulariser (stage 2 from the best stage-1 model, which "
        "becomes the source, at --stage2-lr); default 2 for afa, else 1",
    )
    add("--alpha", type=float, help="weight of the regulariser (stage 1 of afa)")
    add("--beta", type=float, help="weight of the head L2 term 0.5*||W_head||^2 (default 0.01)")
    add("--lr", type=float, help="learning rate (stage 1 of afa; default 0.01)")
    add(
        "--stage2-alpha",
        dest="stage2_alpha",
        type=float,
        help="stage-2 alpha (afa: ACT's, default the arch's; other regularisers with --stages 2: default --alpha)",
    )
    add("--stage2-lr", dest="stage2_lr", type=float, help="stage-2 learning rate (default 0.001)")
    add("--batch-size", dest="batch_size", type=int, help="global batch size, whatever the number of processes")
    add(
        "--eval-batch-size",
        dest="eval_batch_size",
        type=int,
        help="batch size of evaluation and of DELTA's batched channel removal (default 4x --batch-size)",
    )
    add("--max-iter", dest="max_iter", type=int, help="iterations per stage, turned into epochs (default 4500)")
    add("--epochs", type=int, help="epochs per stage (overrides --max-iter)")
    add("--image-size", dest="image_size", type=int, help="input side in pixels (default: the arch's)")
    add(
        "--val-fraction",
        dest="val_fraction",
        type=float,
        help="share of each class of train/ held out for validation when there is no val/ (default 0.1)",
    )
    add("--shots", type=int, help="digits: labelled training images per class (default 10)")
    add("--seed", type=int, help="the one seed of the run (default 0)")
    add(
        "--workers",
        type=int,
        help=f"data-loading worker processes (default: 0 on the CPU; on CUDA one per "
        f"usable core, at most {MAX_DEFAULT_WORKERS})",
    )
    add("--device", help=f"{' | '.join(DEVICES)} (default: cuda when available)")
    add("--backend", choices=BACKENDS, help="afa_ext backend of the feature terms; reference = the pure-PyTorch loss")
    add("--amp", choices=AMP_DTYPES, help="mixed precision")
    add("--channels-last", dest="channels_last", action="store_true", help="channels_last memory format")
    add("--compile", action="store_true", help="torch.compile the target model")
    add("--sync-bn", dest="sync_bn", action="store_true", help="batch norm over the global batch under torchrun")
    add(
        "--delta-weights",
        dest="delta_weights",
        help=f"DELTA channel weights: {' | '.join(DELTA_ESTIMATES)} | PATH (.json of the original, or .pt)",
    )
    add(
        "--delta-head-epochs",
        dest="delta_head_epochs",
        type=int,
        help="DELTA weights: epochs of head-only training (default 10)",
    )
    add("--delta-batches", dest="delta_batches", type=int, help="DELTA weights: batches scored (default 4)")
    add(
        "--cache-dir",
        dest="cache_dir",
        help="cache of DELTA weights and the digits source model (default $AFA_EXT_CACHE or ~/.cache/afa_ext)",
    )
    add("--out", help="output folder (default runs/<data>-<arch>-<reg>-seed<seed>)")
    add("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    return parser


def given_settings(argv: list[str] | None, parser_class=argparse.ArgumentParser) -> dict:
    """The settings the flags give (no defaults), by config key."""
    return vars(build_parser(parser_class).parse_args(argv))


def parse_config(argv: list[str] | None = None, parser_class=argparse.ArgumentParser) -> TrainConfig:
    """Defaults < --config file < flags."""
    given = given_settings(argv, parser_class)
    values = {}
    config_file = given.pop("config", None)
    if config_file is not None:
        values.update(load_toml(config_file))
    values.update(given)
    return from_dict(values, "afa-train")


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .loop import Diverged, Interrupted, run
    from .models import LayerError, WeightsError

    try:
        config = parse_config(argv)
        run(config)
    except (ConfigError, DataError, LayerError, WeightsError) as error:
        message = " ".join(str(error).split())  # one line, even where a library's message has several
        print(f"afa-train: error: {message}", file=sys.stderr)
        return 2
    except Diverged as divergence:
        print(f"afa-train: error: {divergence}", file=sys.stderr)
        return 1
    except Interrupted as interruption:
        print(f"afa-train: {interruption}", file=sys.stderr)
        return 128 + interruption.signum
    return 0
