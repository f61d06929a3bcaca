"""``make demo``: the offline digits transfer, every method over several seeds, one table.

A small CNN pretrained on scikit-learn's digits 0-4 (cached) is transferred to digits 5-9
from a few labelled images per class, with plain fine-tuning, L2-SP, feature-map L2,
DELTA and two-stage AFA, each over the same seeds. It prints test accuracy (mean, spread
and per seed) and time per method, then what it measured in the same process: how long
DELTA's two channel-weight estimates take and how well their rankings agree, and the
fused loss's fwd+bwd speed against the pure-PyTorch loss on the run's own features. The
table goes to ``summary.csv`` (and ``runs.csv``, one row per run) and a bar chart with
error bars to ``accuracy.png`` in the output folder; each run's own files are in a
sub-folder.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Dict, List

import torch

import afa_ext
from afa_ext import functional

from .config import TrainConfig, default_cache_dir
from .data import GlobalBatchSampler, load_data
from .delta_weights import compute_channel_weights, rank_correlation
from .loop import run
from .models import ARCH_PRESETS, FeatureHooks, build_model, default_layers, head_module_name
from .pretrain import digits_source_weights

__all__ = ["main", "DEMO_METHODS", "demo_config"]

DEMO_METHODS = ("none", "l2sp", "fea_map", "delta", "afa")
LABELS = {"none": "fine-tune", "l2sp": "L2-SP", "fea_map": "feature-map L2", "delta": "DELTA", "afa": "AFA (AST+ACT)"}
# The demo's schedule: 50 labelled images, batch 10, 30 epochs per stage (150 steps), one
# learning rate throughout and one alpha for every feature term, so that the methods differ
# only in their regulariser. The ImageNet-scale alphas (0.1 and more) let the feature terms
# of this small network outweigh the cross-entropy a hundredfold; 0.001 keeps them
# comparable. L2-SP's term is a distance between weights, not features: its alpha is 0.01.
DEMO_SETTINGS = dict(data="digits", arch="digits_cnn", batch_size=10, eval_batch_size=1024, epochs=30, lr=0.02,
                     stage2_lr=0.02, alpha=0.001, stage2_alpha=0.001, shots=10, delta_head_epochs=10,
                     delta_batches=4)
DEMO_ALPHA = {"l2sp": 0.01}


def demo_config(method: str, seed: int, out: Path, cache_dir: str, **overrides) -> TrainConfig:
    settings = dict(DEMO_SETTINGS, reg=method, seed=seed, out=str(out / f"{method}-seed{seed}"),
                    cache_dir=cache_dir, device="cpu")
    if method in DEMO_ALPHA:
        settings["alpha"] = DEMO_ALPHA[method]
    settings.update(overrides)
    return TrainConfig(**settings)


def _median_seconds(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _demo_source_model(cache_dir: str, seed: int):
    """The demo's target data for a seed, its source model with a fresh 5-way head, and the
    hooked layers."""
    data = load_data("digits", image_size=None, val_fraction=0.1, seed=seed, shots=DEMO_SETTINGS["shots"])
    weights = digits_source_weights(cache_dir, ARCH_PRESETS["digits_cnn"].image_size, log=lambda m: None)
    model = build_model("digits_cnn", data.num_classes, weights, in_channels=1)
    return data, model, list(default_layers("digits_cnn"))


def loss_speed(cache_dir: str, seed: int, repeats: int = 20) -> List[Dict]:
    """fwd+bwd time of each feature loss over the hooked layers, fused vs pure PyTorch, on
    the features of the demo's own source model and a batch of its own training images."""
    data, model, layers = _demo_source_model(cache_dir, seed)
    images = torch.stack([data.train[i][0] for i in range(len(data.train))])
    with FeatureHooks(model, layers) as hooks:
        model.eval()
        with torch.no_grad():
            model(images)
            sources = [f.clone() for f in hooks.features]
    targets = [(s + 0.1 * torch.randn_like(s)).requires_grad_(True) for s in sources]
    batch = images.shape[0]
    attention_c = [torch.softmax(torch.randn(batch, t.shape[1]), dim=1) for t in targets]
    attention_s = [torch.softmax(torch.randn(batch, t.shape[2] * t.shape[3]), dim=1) for t in targets]
    channel_w = [torch.softmax(torch.randn(t.shape[1]), dim=0) for t in targets]
    losses = {
        "fea_map": lambda b: functional.feature_map_loss(targets, sources, backend=b),
        "delta": lambda b: functional.delta_loss(targets, sources, channel_w, backend=b),
        "ast": lambda b: functional.spatial_attentive_loss(targets, sources, attention_s, backend=b),
        "act": lambda b: functional.channel_attentive_loss(targets, sources, attention_c, backend=b),
    }
    fused = "cpu" if "cpu" in afa_ext.available_backends() else None
    rows = []
    for name, loss in losses.items():
        def step(backend, loss=loss):
            value = loss(backend)
            value.backward()
            for t in targets:
                t.grad = None
        reference = _median_seconds(lambda: step("reference"), repeats)
        fused_time = _median_seconds(lambda: step(fused), repeats) if fused else float("nan")
        rows.append({"loss": name, "reference_ms": 1e3 * reference, "fused_ms": 1e3 * fused_time,
                     "speedup": reference / fused_time if fused else float("nan")})
    return rows


def delta_estimates(cache_dir: str, seed: int) -> Dict:
    """Time of DELTA's removal and Taylor estimates (no cache) and the rank agreement of
    their channel weights per layer, on the demo's source model and training images."""
    config = demo_config("delta", seed, Path("."), cache_dir)
    data, model, layers = _demo_source_model(cache_dir, seed)
    loader = torch.utils.data.DataLoader(
        data.train, batch_sampler=GlobalBatchSampler(len(data.train), config.batch_size, seed=seed, shuffle=True))
    results = {}
    for method in ("removal", "taylor"):
        started = time.perf_counter()
        channel_weights, _ = compute_channel_weights(
            model, head_module_name(model, "digits_cnn"), layers, loader, method=method,
            head_epochs=config.delta_head_epochs, head_lr=config.lr, score_batches=config.delta_batches,
            cache_dir=None, key_parts={})
        results[method] = (time.perf_counter() - started, channel_weights)
    rhos = [rank_correlation(a, b) for a, b in zip(results["removal"][1], results["taylor"][1])]
    return {"removal_s": results["removal"][0], "taylor_s": results["taylor"][0], "rank_correlation": rhos,
            "layers": layers}


def _summary(runs: List[Dict], seeds: List[int]) -> List[Dict]:
    rows = []
    for method in DEMO_METHODS:
        mine = [r for r in runs if r["method"] == method]
        accs = [r["test_acc"] for r in mine]
        row = {"method": method, "label": LABELS[method], "test_acc_mean": statistics.mean(accs),
               "test_acc_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "time_s_mean": statistics.mean(r["wall_time_s"] for r in mine)}
        for r in mine:
            row[f"seed_{r['seed']}"] = r["test_acc"]
        rows.append(row)
    return rows


def _print_table(summary: List[Dict], seeds: List[int]) -> None:
    head = f"{'method':<16}{'test acc (mean ± sd)':>22}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds)
    print(head + f"{'time/run':>10}")
    print("-" * len(head + " " * 10))
    for row in summary:
        cells = "".join(f"{row[f'seed_{s}']:>9.3f}" for s in seeds)
        print(f"{row['label']:<16}{row['test_acc_mean']:>14.3f} ± {row['test_acc_sd']:.3f}{cells}"
              f"{row['time_s_mean']:>9.1f}s")


def _write_csv(path: Path, rows: List[Dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot(path: Path, summary: List[Dict], runs: List[Dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    positions = range(len(summary))
    axes.bar(positions, [r["test_acc_mean"] for r in summary], yerr=[r["test_acc_sd"] for r in summary],
             capsize=6, color="#7aa6c2", edgecolor="#2d4e63")
    for index, row in enumerate(summary):
        accs = [r["test_acc"] for r in runs if r["method"] == row["method"]]
        axes.scatter([index] * len(accs), accs, color="#1b2a35", s=14, zorder=3)
    axes.set_xticks(list(positions), [r["label"] for r in summary])
    low = min(r["test_acc"] for r in runs)
    axes.set_ylim(max(0.0, low - 0.1), 1.0)
    axes.set_ylabel("test accuracy (digits 5-9)")
    axes.set_title("Digits 0-4 -> 5-9, 10 labelled images per class: mean ± sd over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m afa_ext.train.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default=None, help="output folder (default runs/demo-<date>-<time>)")
    parser.add_argument("--epochs", type=int, default=DEMO_SETTINGS["epochs"])
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    out = Path(args.out or f"runs/demo-{datetime.now():%Y%m%d-%H%M%S}")
    if out.exists() and any(out.iterdir()):
        print(f"demo: error: {out} exists and is not empty; choose another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = args.cache_dir or default_cache_dir()
    from tqdm import tqdm

    digits_source_weights(cache_dir, ARCH_PRESETS["digits_cnn"].image_size)  # says so when it trains it
    runs = []
    bar = tqdm(total=len(DEMO_METHODS) * len(args.seeds), desc="digits transfer", unit="run",
               disable=not sys.stderr.isatty())
    started = time.perf_counter()
    for seed in args.seeds:
        for method in DEMO_METHODS:
            bar.set_postfix_str(f"{method} seed {seed}")
            config = demo_config(method, seed, out, cache_dir, epochs=args.epochs)
            result = run(config, log=lambda message: None, progress=False)
            runs.append({"method": method, "seed": seed, "test_acc": result["test_acc"],
                         "best_val_acc": result["best_val_acc"], "wall_time_s": result["wall_time_s"]})
            bar.update(1)
            if bar.disable:
                print(f"[{len(runs)}/{bar.total}] {LABELS[method]}, seed {seed}: test accuracy "
                      f"{result['test_acc']:.3f} ({result['wall_time_s']:.1f} s)", flush=True)
    bar.close()
    summary = _summary(runs, args.seeds)
    print(f"\nDigits transfer (source: digits 0-4; target: digits 5-9, {DEMO_SETTINGS['shots']} labelled images "
          f"per class; {len(args.seeds)} seeds; {torch.get_num_threads()} CPU threads)\n")
    _print_table(summary, args.seeds)
    _write_csv(out / "summary.csv", summary)
    _write_csv(out / "runs.csv", runs)
    _plot(out / "accuracy.png", summary, runs)

    delta = delta_estimates(cache_dir, args.seeds[0])
    rhos = ", ".join(f"{rho:.2f}" for rho in delta["rank_correlation"])
    print(f"\nDELTA channel weights (seed {args.seeds[0]}): removal {delta['removal_s']:.2f} s, taylor "
          f"{delta['taylor_s']:.2f} s; Spearman rank correlation per layer: {rhos}")
    speed = loss_speed(cache_dir, args.seeds[0])
    print(f"\nFeature loss fwd+bwd over the 3 hooked layers of the run's own features (batch of "
          f"{DEMO_SETTINGS['shots'] * 5} images), median of 20:")
    for row in speed:
        print(f"  {row['loss']:<8} pure PyTorch {row['reference_ms']:7.3f} ms   fused {row['fused_ms']:7.3f} ms   "
              f"x{row['speedup']:.2f}")
    _write_csv(out / "loss_speed.csv", speed)
    print(f"\nTotal {time.perf_counter() - started:.0f} s. Table: {out / 'summary.csv'}, plot: {out / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
