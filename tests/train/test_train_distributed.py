"""The AFA trainer under torchrun on the CPU, and afa_ext.train.distributed's pieces.

A two-process run (gloo, ``--sync-bn`` = CrossProcessBatchNorm) of a global batch must train
the model a one-process run of the same global batch trains, up to float rounding: the ranks'
shares of every step together are the one-process batch, the loss terms are scaled so that
the averaged gradient is the one-process gradient (batch means and batch sums differ), and
batch norm takes its statistics over the global batch. The ground truth is the one-process
run, a separate process.

The ranks' shares of GlobalBatchSampler are checked in test_train_data.py.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
from train_subprocess import subprocess_env
import torch
from torch import nn

from afa_ext.train import distributed
from afa_ext.train.distributed import CrossProcessBatchNorm, Distributed, convert_sync_batchnorm, loss_scales

TIMEOUT = 300  # seconds; no run here may take longer, so nothing hangs
OUTPUT_FILES = ["checkpoint.pt", "config.toml", "curves.png", "metrics.csv", "model.pt", "result.json"]


# ----------------------------------------------------------------------------- helpers


def _start(command, folder: Path, name: str, env: dict):
    log = open(folder / f"{name}.log", "wb")
    try:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=env), log
    except BaseException:
        log.close()
        raise


def _finish(process, log, what: str) -> str:
    try:
        process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=60)
    finally:
        log.close()
    text = Path(log.name).read_text()
    assert process.returncode == 0, f"{what}: exit status {process.returncode}\n{text[-4000:]}"
    return text


def _stop(started) -> None:
    """Kill whatever of the (process, log) pairs still runs, and close the logs."""
    for process, log in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
        log.close()


def _metric_rows(out: Path):
    with open(out / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


# ----------------------------------------------------------------------------- torchrun vs one process

CASES = {
    # afa: AST then ACT, terms that average over the batch (and attention modules under DDP).
    "afa": ["--reg", "afa"],
    # DELTA: a term that sums over the batch, with channel weights each process estimates.
    "delta": ["--reg", "delta", "--delta-weights", "taylor"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_what_one_process_trains(case, tmp_path, train_cache):
    # --lr 0.002: at the default 0.01 the AST loss on digits leaps (26 -> 600 in three steps) and
    # float rounding differences of 1e-7 between the two runs grow to 1e-3 in the weights, though
    # both compute the same gradient at the same weights to 1e-6; at 0.002 training is smooth
    # and the two runs stay within 1e-5.
    flags = [
        "--data",
        "digits",
        *CASES[case],
        "--epochs",
        "2",
        "--batch-size",
        "10",
        "--shots",
        "10",
        "--lr",
        "0.002",
        "--seed",
        "6",
        "--sync-bn",
        "--device",
        "cpu",
    ]
    # Each run its own cache with the source model in it: the DELTA weights are estimated by
    # both runs, not read back from the other one's cache.
    caches = {}
    for name in ("D1", "D2"):
        caches[name] = tmp_path / f"cache_{name}"
        caches[name].mkdir()
        for source_model in train_cache.glob("digits_cnn_source_*.pt"):
            shutil.copy(source_model, caches[name])
    one = [
        sys.executable,
        "-m",
        "afa_ext.train",
        *flags,
        "--cache-dir",
        str(caches["D1"]),
        "--out",
        str(tmp_path / "D1"),
    ]
    two = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "afa_ext.train",
        *flags,
        "--cache-dir",
        str(caches["D2"]),
        "--out",
        str(tmp_path / "D2"),
    ]
    started = []
    try:
        started.append(_start(two, tmp_path, "D2", subprocess_env(caches["D2"])))
        started.append(_start(one, tmp_path, "D1", subprocess_env(caches["D1"])))
        log2 = _finish(*started[0], "torchrun --nproc_per_node=2")
        _finish(*started[1], "one process")
    finally:
        _stop(started)
    d1, d2 = tmp_path / "D1", tmp_path / "D2"

    # Only rank 0 writes, and it writes everything; only rank 0 logs.
    assert sorted(p.name for p in d2.iterdir()) == OUTPUT_FILES
    assert sorted(p.name for p in d1.iterdir()) == OUTPUT_FILES
    first_epoch = [line for line in log2.splitlines() if " epoch 1/2:" in line and line.startswith("stage 1/")]
    assert len(first_epoch) == 1, log2
    assert sum(line.startswith("test accuracy") for line in log2.splitlines()) == 1, log2

    result1, result2 = (json.loads((d / "result.json").read_text()) for d in (d1, d2))
    assert (result1["world_size"], result2["world_size"]) == (1, 2)
    assert result1["epochs_run"] == result2["epochs_run"] == (4 if case == "afa" else 2)
    one_sample = 1.0 / result1["images"]["test"]
    assert abs(result1["test_acc"] - result2["test_acc"]) <= one_sample + 1e-12, (result1, result2)

    model1 = torch.load(d1 / "model.pt", map_location="cpu", weights_only=True)
    model2 = torch.load(d2 / "model.pt", map_location="cpu", weights_only=True)
    assert list(model1) == list(model2)
    assert any(key.endswith("running_var") for key in model1)
    for key in model1:
        if model1[key].is_floating_point():
            torch.testing.assert_close(model2[key], model1[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(model2[key], model1[key]), key
    # The model moved away from the source model, so the comparison has something to see.
    source = torch.load(next(train_cache.glob("digits_cnn_source_*.pt")), map_location="cpu", weights_only=True)
    moved = max(
        (model1[k].double() - source[k].double()).abs().max().item()
        for k in model1
        if not k.startswith("fc.") and model1[k].is_floating_point()
    )
    assert moved > 1e-3

    rows1, rows2 = _metric_rows(d1), _metric_rows(d2)
    assert len(rows1) == len(rows2) == result1["epochs_run"]
    for row1, row2 in zip(rows1, rows2):
        assert [row1[k] for k in ("stage", "reg", "epoch", "lr")] == [row2[k] for k in ("stage", "reg", "epoch", "lr")]
        for key in ("ce", "feature", "head_l2", "total"):
            assert float(row2[key]) == pytest.approx(float(row1[key]), rel=1e-4, abs=1e-7), (key, row1, row2)
        for key in ("train_acc", "val_acc"):
            assert abs(float(row1[key]) - float(row2[key])) <= 0.021, (key, row1, row2)
    assert float(rows1[0]["feature"]) > 0

    if case == "delta":
        weights1 = torch.load(d1 / "checkpoint.pt", map_location="cpu", weights_only=False)["state"].channel_weights
        weights2 = torch.load(d2 / "checkpoint.pt", map_location="cpu", weights_only=False)["state"].channel_weights
        assert len(weights1) == len(weights2) == 3
        for w1, w2 in zip(weights1, weights2):
            torch.testing.assert_close(w2, w1, rtol=1e-5, atol=1e-7)
        assert result2["delta_weights"]["method"] == "taylor" and result2["delta_weights"]["cached"] is False


# ----------------------------------------------------------------------------- loss scales


@pytest.mark.parametrize(
    "world, local, global_batch, expected",
    [
        (1, 10, 10, (1.0, 1.0)),
        (2, 5, 10, (1.0, 2.0)),
        (4, 3, 12, (1.0, 4.0)),
        (2, 3, 7, (6 / 7, 2.0)),
        (2, 4, 7, (8 / 7, 2.0)),
    ],
)
def test_loss_scales_arithmetic(world, local, global_batch, expected):
    dist = Distributed(rank=world - 1, world=world)
    assert loss_scales(dist, local, global_batch) == pytest.approx(expected, rel=1e-15)


def _tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(body=nn.Linear(4, 6), act=nn.Tanh(), fc=nn.Linear(6, 3))).double()


@pytest.mark.parametrize("reg", ["ast", "fea_map"])
def test_scaled_rank_losses_average_to_the_one_process_gradient(reg):
    """(1/W) sum over ranks of the gradient of each rank's scaled total is the one-process
    gradient of the global batch, and the reported terms sum to the one-process terms, with
    uneven shares (3 and 4 of 7) so the batch-mean scale is not 1."""
    from afa_ext.train.regularizers import REGULARIZERS
    from afa_ext.train.step import step_losses

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (7,), generator=generator)
    anchor = torch.randn(6, generator=generator, dtype=torch.float64)

    def losses(model, x, y, dist):
        hidden = model.body(x)
        logits = model.fc(model.act(hidden))
        squared = 0.5 * ((hidden - anchor) ** 2).sum()
        feature = squared if reg == "fea_map" else squared / len(x)  # a batch sum, or a batch mean
        mean_scale, sum_scale = loss_scales(dist, len(x), len(images))
        return step_losses(
            logits,
            y,
            feature,
            regularizer=REGULARIZERS[reg],
            alpha=0.3,
            beta=0.01,
            model=model,
            head="fc",
            source_values=None,
            mean_scale=mean_scale,
            sum_scale=sum_scale,
            world=dist.world,
        )

    model = _tiny_model(1)
    one = losses(model, images, labels, Distributed())
    one.total.backward()
    expected = [p.grad.clone() for p in model.parameters()]

    shares = [slice(0, 3), slice(3, 7)]
    model = _tiny_model(1)
    averaged = [torch.zeros_like(p) for p in model.parameters()]
    reported = torch.zeros(3, dtype=torch.float64)
    for rank, share in enumerate(shares):
        model.zero_grad()
        rank_losses = losses(model, images[share], labels[share], Distributed(rank=rank, world=2))
        rank_losses.total.backward()
        for total, p in zip(averaged, model.parameters()):
            total += p.grad / len(shares)  # DistributedDataParallel averages over the ranks
        reported += torch.stack([rank_losses.ce, rank_losses.regularizer, rank_losses.head]).double()
    # Cross-entropy and the head term are computed in float32 (step_losses), hence the tolerance;
    # a wrong scale is off by a share's fraction (3/7, 4/7) or a factor of the world (2).
    for got, want in zip(averaged, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(
        reported, torch.stack([one.ce, one.regularizer, one.head]).double(), rtol=1e-6, atol=1e-8
    )


def test_all_reduce_sum_in_one_process_is_the_tensor():
    tensor = torch.arange(4.0)
    assert torch.equal(distributed.all_reduce_sum(Distributed(), tensor), torch.arange(4.0))


# ----------------------------------------------------------------------------- batch norm, one process


def _random_batchnorm(kind, channels: int, seed: int, **kwargs):
    torch.manual_seed(seed)
    layer = kind(channels, **kwargs)
    with torch.no_grad():
        if layer.affine:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
        if layer.track_running_stats:
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    return layer


@pytest.mark.parametrize("momentum", [0.1, None])
def test_cross_process_batchnorm_alone_is_batchnorm2d(momentum):
    reference = _random_batchnorm(nn.BatchNorm2d, 3, 0, momentum=momentum)
    layer = CrossProcessBatchNorm(3, momentum=momentum)
    layer.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):  # training steps: outputs, gradients and running statistics
        x = torch.randn(5, 3, 4, 6, generator=generator) * 2 + 1
        upstream = torch.randn(5, 3, 4, 6, generator=generator)
        grads = []
        for module in (reference, layer):
            module.train()
            module.zero_grad()
            inputs = x.clone().requires_grad_(True)
            out = module(inputs)
            (out * upstream).sum().backward()
            grads.append((out.detach(), inputs.grad, module.weight.grad, module.bias.grad))
        for want, got in zip(*grads):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        for name, buffer in reference.named_buffers():
            assert torch.equal(getattr(layer, name), buffer), name
    x = torch.randn(2, 3, 4, 6, generator=generator)
    reference.eval(), layer.eval()
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)


def test_convert_sync_batchnorm_keeps_parameters_buffers_and_modes():
    from afa_ext.train.models import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN(num_classes=5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.num_batches_tracked.fill_(7)
    original = {key: value.clone() for key, value in model.state_dict().items()}
    reference = DigitsCNN(num_classes=5)
    reference.load_state_dict(original)
    for net in (model, reference):
        net.features[1][1].eps = 1e-3
        net.features[2][1].momentum = 0.3
        net.train()
        net.features[0][1].eval()

    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 3 and all(type(m) is CrossProcessBatchNorm for m in norms)
    assert list(converted.state_dict()) == list(original)
    for key, value in converted.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert [m.training for m in norms] == [False, True, True]
    assert norms[1].eps == 1e-3 and norms[2].momentum == 0.3 and norms[0].momentum == 0.1
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(converted(x), reference(x), rtol=0, atol=0)
    converted.eval(), reference.eval()
    torch.testing.assert_close(converted(x), reference(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- batch norm, two processes

_BATCHNORM_WORKER = textwrap.dedent("""
    import sys
    import torch
    from afa_ext.train.distributed import CrossProcessBatchNorm

    rank, store, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.distributed.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    setup = torch.load(folder + "/setup.pt")
    share = slice(*setup["shares"][rank])
    layer = CrossProcessBatchNorm(3)
    layer.load_state_dict(setup["state"])
    layer.train()
    x = setup["x"][share].clone().requires_grad_(True)
    out = layer(x)
    (out * setup["upstream"][share]).sum().backward()
    layer.eval()
    evaluated = layer(setup["x"][share])
    torch.save({"out": out.detach(), "x_grad": x.grad, "weight_grad": layer.weight.grad,
                "bias_grad": layer.bias.grad, "buffers": dict(layer.named_buffers()), "eval": evaluated.detach()},
               folder + "/rank%d.pt" % rank)
    torch.distributed.barrier()  # neither rank tears gloo down while the other still uses it
    torch.distributed.destroy_process_group()
""")


def test_cross_process_batchnorm_over_two_processes_is_batchnorm_of_the_whole_batch(tmp_path, train_cache):
    """Two gloo processes holding 2 and 4 of 6 samples: outputs, input gradients, the summed
    weight gradients and the running statistics are those of BatchNorm2d on all 6."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 5, 4, generator=generator) * 3 - 1
    upstream = torch.randn(6, 3, 5, 4, generator=generator)
    reference = _random_batchnorm(nn.BatchNorm2d, 3, 5)
    bounds = [(0, 2), (2, 6)]
    shares = [slice(*b) for b in bounds]
    torch.save({"x": x, "upstream": upstream, "state": reference.state_dict(), "shares": bounds}, tmp_path / "setup.pt")
    (tmp_path / "worker.py").write_text(_BATCHNORM_WORKER)

    env = subprocess_env(train_cache)
    processes = []
    try:
        for rank in range(2):
            processes.append(
                _start(
                    [sys.executable, str(tmp_path / "worker.py"), str(rank), str(tmp_path / "store"), str(tmp_path)],
                    tmp_path,
                    f"rank{rank}",
                    env,
                )
            )
        for rank, (process, log) in enumerate(processes):
            _finish(process, log, f"batch-norm worker {rank}")
    finally:
        _stop(processes)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]

    reference.train()
    inputs = x.clone().requires_grad_(True)
    out = reference(inputs)
    (out * upstream).sum().backward()
    tolerance = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(), **tolerance)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), inputs.grad, **tolerance)
    torch.testing.assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], reference.weight.grad, **tolerance)
    torch.testing.assert_close(ranks[0]["bias_grad"] + ranks[1]["bias_grad"], reference.bias.grad, **tolerance)
    for rank in ranks:
        for name, buffer in reference.named_buffers():
            torch.testing.assert_close(rank["buffers"][name], buffer, **tolerance)
    reference.eval()
    with torch.no_grad():
        evaluated = reference(x)
    torch.testing.assert_close(torch.cat([r["eval"] for r in ranks]), evaluated, **tolerance)
    # Each share alone would normalise differently: the statistics really were shared.
    alone = nn.functional.batch_norm(
        x[shares[0]], None, None, reference.weight.detach(), reference.bias.detach(), training=True
    )
    assert (alone - ranks[0]["out"]).abs().max() > 1e-2
