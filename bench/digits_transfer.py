"""The digits demo's own workload: the fused feature losses against the pure-PyTorch loss,
and DELTA's two channel-weight estimates.

1. fwd+bwd of each feature loss over digits_cnn's three hooked layers, on the features of
   the demo's source model (pretrained on digits 0-4, cached) for its 50 training images
   of digits 5-9, target maps = source + noise; fused backend against ``reference``,
   sampled round-robin; medians and the speed-up.
2. DELTA's channel weights by channel removal and by the first-order (Taylor) estimate,
   uncached: seconds each and the Spearman rank correlation of the two per layer.

    python bench/digits_transfer.py            # seed 0, 20 rounds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402,F401  (first: it puts the repository on sys.path when needed)
import tables  # noqa: E402
import timing  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import afa_ext  # noqa: E402
from afa_ext import functional  # noqa: E402
from afa_ext.train.cli import parse_config  # noqa: E402
from afa_ext.train.config import default_cache_dir  # noqa: E402
from afa_ext.train.data import DIGITS_IMAGE_SIZE, GlobalBatchSampler, load_data  # noqa: E402
from afa_ext.train.delta_weights import METHODS, compute_channel_weights  # noqa: E402
from afa_ext.train.demo import DEMO_TRAINER_FLAGS  # noqa: E402
from afa_ext.train.models import FeatureHooks, build_model, default_layers, head_module_name  # noqa: E402
from afa_ext.train.pretrain import digits_source_weights  # noqa: E402

DEMO = parse_config(DEMO_TRAINER_FLAGS + ["--data", "digits"])  # the demo's settings of every run


def demo_source_model(cache_dir: str, seed: int):
    """The demo's target data for a seed, its source model with a fresh 5-way head, and the hooked layers."""
    data = load_data("digits", image_size=None, val_fraction=DEMO.val_fraction, seed=seed, shots=DEMO.shots)
    weights = digits_source_weights(cache_dir, DIGITS_IMAGE_SIZE, log=lambda message: None)
    model = build_model("digits_cnn", data.num_classes, weights, in_channels=1)
    return data, model, list(default_layers("digits_cnn"))


def loss_times(cache_dir: str, seed: int, rounds: int) -> list:
    data, model, layers = demo_source_model(cache_dir, seed)
    images = torch.stack([data.train[i][0] for i in range(len(data.train))])
    with FeatureHooks(model, layers) as hooks:
        model.eval()
        with torch.no_grad():
            model(images)
            sources = [f.clone() for f in hooks.features]
    generator = torch.Generator().manual_seed(seed)
    targets = [(s + 0.1 * torch.randn(s.shape, generator=generator)).requires_grad_(True) for s in sources]
    batch = images.shape[0]
    channel_attention = [torch.softmax(torch.randn(batch, t.shape[1], generator=generator), dim=1) for t in targets]
    spatial_attention = [
        torch.softmax(torch.randn(batch, t[0, 0].numel(), generator=generator), dim=1) for t in targets
    ]
    channel_weights = [torch.softmax(torch.randn(t.shape[1], generator=generator), dim=0) for t in targets]
    losses = {
        "fea_map": lambda b: functional.feature_map_loss(targets, sources, backend=b),
        "delta": lambda b: functional.delta_loss(targets, sources, channel_weights, backend=b),
        "ast": lambda b: functional.spatial_attentive_loss(targets, sources, spatial_attention, backend=b),
        "act": lambda b: functional.channel_attentive_loss(targets, sources, channel_attention, backend=b),
    }
    fused = next((b for b in ("cpu", "triton") if b in afa_ext.available_backends()), None)
    backends = ["reference"] + ([fused] if fused else [])

    def step(loss, backend):
        def call():
            loss(backend).backward()
            for t in targets:
                t.grad = None

        return call

    methods = {(name, backend): step(loss, backend) for name, loss in losses.items() for backend in backends}
    device = torch.device("cpu")
    timing.warm_up(methods, device, calls=3)
    samples = timing.interleaved_times(methods, device, rounds)
    rows = []
    for name in losses:
        reference = timing.median(samples[(name, "reference")])
        fused_time = timing.median(samples[(name, fused)]) if fused else None
        rows.append(
            [
                name,
                tables.milliseconds(reference),
                tables.milliseconds(fused_time),
                tables.ratio(None if fused_time is None else reference / fused_time),
            ]
        )
    return rows, fused


def delta_estimates(cache_dir: str, seed: int) -> dict:
    data, model, layers = demo_source_model(cache_dir, seed)
    loader = torch.utils.data.DataLoader(
        data.train, batch_sampler=GlobalBatchSampler(len(data.train), DEMO.batch_size, seed=seed, shuffle=True)
    )
    seconds, weights = {}, {}
    for method in METHODS:
        started = time.perf_counter()
        weights[method], _ = compute_channel_weights(
            model,
            head_module_name(model, "digits_cnn"),
            layers,
            loader,
            method=method,
            head_epochs=DEMO.delta_head_epochs,
            head_lr=DEMO.lr,
            score_batches=DEMO.delta_batches,
            cache_dir=None,
            key_parts={},
        )
        seconds[method] = time.perf_counter() - started
    rhos = [float(spearmanr(a, b).statistic) for a, b in zip(weights["removal"], weights["taylor"])]
    return {"seconds": seconds, "rank_correlation": rhos, "layers": layers}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or default_cache_dir()
    rows, fused = loss_times(cache_dir, args.seed, args.rounds)
    print(
        f"Feature loss fwd+bwd over digits_cnn's 3 hooked layers, the demo's {DEMO.shots * 5} training images "
        f"(seed {args.seed}), median of {args.rounds} interleaved rounds, {torch.get_num_threads()} threads:\n"
    )
    print(tables.markdown_table(["loss", "pure PyTorch ms", f"{fused or 'no fused backend'} ms", "speed-up"], rows))
    delta = delta_estimates(cache_dir, args.seed)
    rhos = ", ".join(f"{layer} {rho:.2f}" for layer, rho in zip(delta["layers"], delta["rank_correlation"]))
    print(
        f"\nDELTA channel weights (uncached): removal {delta['seconds']['removal']:.2f} s, taylor "
        f"{delta['seconds']['taylor']:.2f} s; Spearman rank correlation per layer: {rhos}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
