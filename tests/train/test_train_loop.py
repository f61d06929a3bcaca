"""afa_ext.train.loop: one training step against losses and SGD updates computed by hand,
the AST -> ACT hand-over of two-stage AFA, the files a run leaves in --out, backend
agreement, and the bf16 / channels_last / torch.compile paths.

Every run uses the embedded digits data (digits_cnn, 16x16 gray images, 5 classes) with a
few shots per class, on the CPU, and one cache folder for the whole session, where the
digits source model is pretrained once.
"""

import copy
import csv
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import afa_ext
from afa_ext.train import distributed, loop
from afa_ext.train.config import Stage, TrainConfig, from_dict, load_toml
from afa_ext.train.data import load_data
from afa_ext.train.models import DigitsCNN
from afa_ext.train.outputs import METRIC_COLUMNS
from afa_ext.train.pretrain import digits_source_path, digits_source_weights

DIGITS_LAYERS = ["features.0", "features.1", "features.2"]
DIGITS_CHANNELS = (16, 32, 64)
SHOTS = 4
BATCH = 10
# The documented defaults for digits_cnn: 0.01 for l2sp / fea_map / delta, the arch's
# stage-1 alpha (0.001) for ast and afa's first stage, its stage-2 alpha (0.001) for act.
DEFAULT_ALPHA = {"none": 0.0, "l2sp": 0.01, "fea_map": 0.01, "delta": 0.01, "ast": 0.001, "act": 0.001, "afa": 0.001}
DEFAULT_LR = 0.01
REGS = ("none", "l2sp", "fea_map", "delta", "ast", "act", "afa")


# ----------------------------------------------------------------------------- helpers


def tiny_config(out, cache_dir, reg, **settings) -> TrainConfig:
    values = dict(
        data="digits",
        reg=reg,
        epochs=1,
        batch_size=BATCH,
        shots=SHOTS,
        seed=0,
        device="cpu",
        cache_dir=cache_dir,
        out=str(out),
    )
    values.update(settings)
    return TrainConfig(**values)


def train(config: TrainConfig) -> dict:
    return loop.run(config, log=lambda message: None, progress=False)


def make_run(config: TrainConfig) -> loop.Run:
    resolved = loop.resolve_config(config)
    return loop.Run(resolved, distributed.setup("cpu"), lambda message: None, False)


def read_metrics(out) -> list:
    with open(Path(out) / "metrics.csv", newline="") as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames) == METRIC_COLUMNS
        return list(reader)


def read_result(out) -> dict:
    return json.loads((Path(out) / "result.json").read_text())


def number(row, key) -> float:
    return float(row[key])


def write_delta_pt(path) -> list:
    """A .pt of known per-layer weights (a softmax of random scores); returns them in float64."""
    generator = torch.Generator().manual_seed(11)
    weights = [torch.softmax(torch.randn(c, generator=generator), dim=0) for c in DIGITS_CHANNELS]
    torch.save(weights, path)
    return [w.double() for w in weights]


def write_delta_json(path) -> list:
    """DELTA's JSON of per-layer channel scores; returns softmax(z / 5) of each layer, by hand."""
    generator = torch.Generator().manual_seed(12)
    scores = [(torch.rand(c, generator=generator, dtype=torch.float64) * 3).tolist() for c in DIGITS_CHANNELS]
    Path(path).write_text(json.dumps(scores))
    weights = []
    for layer in scores:
        s = torch.tensor(layer, dtype=torch.float64)
        z = (s - s.mean()) / s.std(unbiased=False)
        weights.append(torch.softmax(z / 5, dim=0))
    return weights


def first_global_batch(run: loop.Run):
    """The images and labels of the first global batch of epoch 0, as the loop draws them."""
    run.sampler.set_epoch(0)
    run.data.train.set_epoch(0)
    batch = run.sampler.global_batches()[0]
    assert len(batch) == BATCH
    samples = [run.data.train[index] for index in batch]
    return torch.stack([image for image, _ in samples]), torch.tensor([label for _, label in samples])


def float64_digits_cnn(state_dict, training: bool) -> DigitsCNN:
    model = DigitsCNN(num_classes=5, in_channels=1)
    model.load_state_dict(state_dict)
    return model.double().train(training)


def block_outputs(model: DigitsCNN, images):
    """The outputs of features.0, .1, .2 (the hooked layers) and the logits."""
    maps, x = [], images
    for block in model.features:
        x = block(x)
        maps.append(x)
    return maps, model.fc(torch.flatten(x.mean(dim=(2, 3)), 1))


def hand_losses(kind, model, source, attention, weights, images, labels, alpha, beta):
    """CE + alpha * R + beta * 0.5 * ||head||^2, R from its formula, all in float64."""
    x = images.double()
    with torch.no_grad():
        source_maps, _ = block_outputs(source, x)
    target_maps, logits = block_outputs(model, x)
    ce = F.cross_entropy(logits, labels)
    batch = x.shape[0]
    reg = torch.zeros((), dtype=torch.float64)
    if kind == "l2sp":
        anchors = dict(source.named_parameters())
        reg = 0.5 * sum(
            ((p - anchors[name]) ** 2).sum() for name, p in model.named_parameters() if not name.startswith("fc.")
        )
    for layer, (t, s) in enumerate(zip(target_maps, source_maps)):
        d2 = (t - s) ** 2  # (B, C, H, W)
        channels, positions = d2.shape[1], d2.shape[2] * d2.shape[3]
        if kind == "fea_map":
            reg = reg + 0.5 * d2.sum()
        elif kind == "delta":
            reg = reg + 0.5 * (channels * weights[layer][None, :] * d2.sum(dim=(2, 3)) / positions).sum()
        elif kind == "ast":
            a = attention[layer](s)  # (B, P)
            reg = reg + (0.5 / batch) * ((positions * a) ** 2 * d2.sum(dim=1).flatten(1)).sum()
        elif kind == "act":
            g = attention[layer](s)  # (B, C)
            reg = reg + (0.5 / batch) * (channels * g * d2.sum(dim=(2, 3))).sum()
    head = 0.5 * (model.fc.weight**2).sum() + 0.5 * (model.fc.bias**2).sum()
    return SimpleNamespace(total=ce + alpha * reg + beta * head, ce=ce, feature=reg, head=head)


# ----------------------------------------------------------------------------- 1. the first step by hand


@pytest.mark.parametrize("case", ["none", "l2sp", "fea_map", "delta-pt", "delta-json", "ast", "act", "afa"])
def test_first_step_loss_and_sgd_update_match_a_hand_computation(case, tmp_path, cache_dir):
    reg = case.split("-")[0]
    settings = {"beta": 0.05}
    weights = None
    if case == "delta-pt":
        weights = write_delta_pt(tmp_path / "weights.pt")
        settings["delta_weights"] = str(tmp_path / "weights.pt")
    elif case == "delta-json":
        weights = write_delta_json(tmp_path / "scores.json")
        settings["delta_weights"] = str(tmp_path / "scores.json")
    run = make_run(tiny_config(tmp_path / "out", cache_dir, reg, **settings))
    assert run.layers == DIGITS_LAYERS and run.head == "fc"
    run._setup_stage(0)
    stage = run.stages[0]
    kind = "ast" if reg == "afa" else reg
    assert stage == Stage(kind, DEFAULT_LR, DEFAULT_ALPHA[reg])
    assert not (Path(tmp_path) / "out").exists()

    # Move the target away from the source, so that L2-SP (and every D) is far from 0.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    run.model.train()
    if run.current.term is not None:
        run.current.term.train()
    images, labels = first_global_batch(run)

    model64 = float64_digits_cnn(run.model.state_dict(), training=True)
    source64 = float64_digits_cnn(run.source.state_dict(), training=False)
    attention64 = None
    if kind in ("ast", "act"):
        attention64 = copy.deepcopy(run.current.term.attention).double()
        assert len(attention64) == len(DIGITS_LAYERS)
    hand = hand_losses(kind, model64, source64, attention64, weights, images, labels, stage.alpha, 0.05)
    if kind != "none":
        assert hand.feature.item() > 1e-3  # the regulariser is really exercised

    model_params = dict(run.model.named_parameters())
    term_params = {} if run.current.term is None else dict(run.current.term.named_parameters())
    hand_params = dict(model64.named_parameters())
    if attention64 is not None:
        hand_params.update({f"attention.{name}": p for name, p in attention64.named_parameters()})
    assert set(hand_params) == set(model_params) | set(term_params)
    names = sorted(hand_params)
    grads = torch.autograd.grad(hand.total, [hand_params[n] for n in names], allow_unused=True)
    before = {name: p.detach().clone() for name, p in {**model_params, **term_params}.items()}
    source_before = copy.deepcopy(run.source.state_dict())

    losses = run.train_step(images, labels, len(labels))

    assert losses.total.item() == pytest.approx(hand.total.item(), rel=1e-5)
    assert losses.ce.item() == pytest.approx(hand.ce.item(), rel=1e-5)
    assert losses.head.item() == pytest.approx(hand.head.item(), rel=1e-5)
    assert losses.regularizer.item() == pytest.approx(hand.feature.item(), rel=1e-5, abs=1e-12)

    # SGD, momentum 0.9, no weight decay: the first step's buffer is the gradient itself.
    after = {**model_params, **term_params}
    largest_update = 0.0
    for name, grad in zip(names, grads):
        grad = torch.zeros_like(hand_params[name]) if grad is None else grad
        expected = before[name].double() - stage.lr * grad
        torch.testing.assert_close(
            after[name].detach().double(), expected, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )
        largest_update = max(largest_update, (after[name].detach() - before[name]).abs().max().item())
    assert largest_update > 1e-3
    if kind in ("ast", "act"):
        assert any(not torch.equal(after[n].detach(), before[n]) for n in term_params)
    # The source model is frozen: parameters and batch-norm statistics bitwise unchanged.
    for key, value in run.source.state_dict().items():
        assert torch.equal(value, source_before[key]), key


# ----------------------------------------------------------------------------- 2-3. two stages, files


@pytest.fixture(scope="module")
def handover(tmp_path_factory, cache_dir):
    """A two-stage afa run (2 epochs per stage) and an ast run with afa's stage-1 settings."""
    base = tmp_path_factory.mktemp("handover")
    afa_config = tiny_config(base / "afa", cache_dir, "afa", epochs=2, stage2_lr=0.002, stage2_alpha=0.05)
    afa_result = train(afa_config)
    stage1 = afa_result["stages"][0]
    ast_config = tiny_config(base / "ast", cache_dir, "ast", epochs=2, alpha=stage1["alpha"], lr=stage1["lr"])
    ast_result = train(ast_config)
    return SimpleNamespace(
        afa_config=afa_config,
        afa_out=base / "afa",
        afa_result=afa_result,
        ast_config=ast_config,
        ast_out=base / "ast",
        ast_result=ast_result,
    )


def test_afa_stage_one_is_an_ast_run_whose_best_model_becomes_the_source(handover):
    saved = torch.load(handover.afa_out / "checkpoint.pt", map_location="cpu", weights_only=False)
    ast_model = torch.load(handover.ast_out / "model.pt", map_location="cpu", weights_only=True)
    assert list(saved["source"]) == list(ast_model)
    for key, value in ast_model.items():
        assert torch.equal(saved["source"][key], value), key
    # ... and that source is not the pretrained model any more.
    pretrained = torch.load(digits_source_weights(handover.afa_config.cache_dir, 16), weights_only=True)
    assert not torch.equal(saved["source"]["features.0.0.weight"], pretrained["features.0.0.weight"])

    afa_rows, ast_rows = read_metrics(handover.afa_out), read_metrics(handover.ast_out)
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in afa_rows]
    assert strip[:2] == [{k: v for k, v in row.items() if k != "seconds"} for row in ast_rows]
    assert [row["reg"] for row in afa_rows] == ["ast", "ast", "act", "act"]
    assert number(afa_rows[2], "lr") == pytest.approx(0.002, rel=1e-6)
    assert number(afa_rows[3], "lr") == pytest.approx(0.0002, rel=1e-6)  # x0.1 after round(0.67 * 2) epochs

    stages = handover.afa_result["stages"]
    assert len(stages) == 2
    assert stages[0] == handover.ast_result["stages"][0]
    assert {k: stages[1][k] for k in ("reg", "lr", "alpha", "epochs")} == {
        "reg": "act",
        "lr": 0.002,
        "alpha": 0.05,
        "epochs": 2,
    }
    # Stage 2 starts from the best stage-1 model and never hands back a worse one.
    assert stages[1]["best_val_acc"] >= stages[0]["best_val_acc"]
    assert handover.afa_result["best_val_acc"] == stages[1]["best_val_acc"]
    afa_model = torch.load(handover.afa_out / "model.pt", map_location="cpu", weights_only=True)
    same_as_stage1 = all(torch.equal(afa_model[k], v) for k, v in ast_model.items())
    assert same_as_stage1 == (stages[1]["best_val_acc"] == stages[0]["best_val_acc"])


@pytest.fixture(scope="module")
def two_stage_fea_map(tmp_path_factory, cache_dir):
    """fea_map on AFA's two-stage schedule (--stages 2), and the one-stage run of its stage 1."""
    base = tmp_path_factory.mktemp("two_stages")
    settings = dict(epochs=2, alpha=0.003, lr=0.02, stage2_lr=0.002)
    two = train(tiny_config(base / "two", cache_dir, "fea_map", stages=2, **settings))
    one = train(tiny_config(base / "one", cache_dir, "fea_map", **settings))
    return SimpleNamespace(two=two, two_out=base / "two", one=one, one_out=base / "one")


def test_a_regulariser_on_two_stages_restarts_from_its_best_stage_one_model(two_stage_fea_map):
    runs = two_stage_fea_map
    stages = runs.two["stages"]
    assert [{k: s[k] for k in ("reg", "lr", "alpha", "epochs")} for s in stages] == [
        {"reg": "fea_map", "lr": 0.02, "alpha": 0.003, "epochs": 2},
        {"reg": "fea_map", "lr": 0.002, "alpha": 0.003, "epochs": 2},
    ]  # stage-2 alpha: the stage-1 alpha
    assert stages[0] == runs.one["stages"][0]
    two_rows, one_rows = read_metrics(runs.two_out), read_metrics(runs.one_out)
    strip = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert strip(two_rows)[:2] == strip(one_rows)
    assert [row["stage"] for row in two_rows] == ["1", "1", "2", "2"]
    # Stage 2's start and source model: the best stage-1 model, which the one-stage run hands back.
    saved = torch.load(runs.two_out / "checkpoint.pt", map_location="cpu", weights_only=False)
    one_model = torch.load(runs.one_out / "model.pt", map_location="cpu", weights_only=True)
    for key, value in one_model.items():
        assert torch.equal(saved["source"][key], value), key
    assert stages[1]["best_val_acc"] >= stages[0]["best_val_acc"]
    assert from_dict(load_toml(str(runs.two_out / "config.toml")), "config.toml").stages == 2


def test_none_on_two_stages_takes_exactly_the_steps_of_afa(two_stage_fea_map, handover, tmp_path, cache_dir):
    none2 = train(tiny_config(tmp_path / "none2", cache_dir, "none", stages=2, epochs=2))
    steps = 2 * 2 * (5 * SHOTS // BATCH)  # stages x epochs x batches
    assert none2["steps"] == handover.afa_result["steps"] == two_stage_fea_map.two["steps"] == steps
    assert none2["epochs_run"] == handover.afa_result["epochs_run"] == 4
    assert two_stage_fea_map.one["steps"] == steps // 2


def test_curves_plot_the_metrics_of_the_run(handover):
    from afa_ext.train import plots

    rows = [{k: (v if k == "reg" else float(v)) for k, v in row.items()} for row in read_metrics(handover.afa_out)]
    for row in rows:
        row["stage"] = int(row["stage"])
    alphas = [stage["alpha"] for stage in handover.afa_result["stages"]]
    figure = plots.curves_figure(rows, alphas, handover.afa_config.beta)
    losses, accuracy = figure.axes
    lines = {
        line.get_label(): list(line.get_ydata())
        for line in losses.get_lines() + accuracy.get_lines()
        if not line.get_label().startswith("_")
    }
    assert lines["cross-entropy"] == [row["ce"] for row in rows]
    assert lines["alpha * regulariser"] == pytest.approx([alphas[row["stage"] - 1] * row["feature"] for row in rows])
    assert lines["total"] == [row["total"] for row in rows]
    assert lines["validation"] == [row["val_acc"] for row in rows]
    assert lines["train"] == [row["train_acc"] for row in rows]
    # One dashed line where stage 2 starts, in each panel.
    assert [line.get_xdata()[0] for line in losses.get_lines() if line.get_linestyle() == "--"] == [2.5]
    assert (handover.afa_out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def evaluate_by_hand(state_dict, seed=0) -> tuple:
    model = DigitsCNN(num_classes=5, in_channels=1)
    model.load_state_dict(state_dict)  # strict
    model.eval()
    test = load_data("digits", image_size=16, val_fraction=0.1, seed=seed, shots=SHOTS).test
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 4 * BATCH):
            samples = [test[i] for i in range(start, min(start + 4 * BATCH, len(test)))]
            images = torch.stack([image for image, _ in samples])
            labels = torch.tensor([label for _, label in samples])
            correct += int((model(images).argmax(dim=1) == labels).sum())
    return correct, len(test)


@pytest.mark.parametrize("which", ["afa", "ast"])
def test_out_folder_files(handover, which):
    out = getattr(handover, f"{which}_out")
    config = getattr(handover, f"{which}_config")
    result = getattr(handover, f"{which}_result")
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "config.toml",
        "curves.png",
        "metrics.csv",
        "model.pt",
        "result.json",
    ]

    # config.toml: the resolved configuration, every default filled in, which loads back into a TrainConfig.
    assert from_dict(load_toml(str(out / "config.toml")), "config.toml") == dataclasses.replace(
        config,
        arch="digits_cnn",
        stages=2 if which == "afa" else 1,
        image_size=16,
        layers=DIGITS_LAYERS,
        weights=digits_source_path(config.cache_dir, 16),
        lr=DEFAULT_LR,
        alpha=DEFAULT_ALPHA[which],
        eval_batch_size=4 * BATCH,
        workers=0,
    )

    # metrics.csv: one row per stage and epoch; total = ce + alpha * feature + beta * head.
    rows = read_metrics(out)
    stages = result["stages"]
    expected = [(s + 1, e + 1) for s in range(len(stages)) for e in range(2)]
    assert [(int(row["stage"]), int(row["epoch"])) for row in rows] == expected
    best = -1.0
    for row in rows:
        stage = stages[int(row["stage"]) - 1]
        assert row["reg"] == stage["reg"]
        lr = stage["lr"] * (1 if row["epoch"] == "1" else 0.1)
        assert number(row, "lr") == pytest.approx(lr, rel=1e-6)
        values = {key: number(row, key) for key in METRIC_COLUMNS if key not in ("reg",)}
        assert all(math.isfinite(v) for v in values.values())
        assert values["ce"] > 0 and values["feature"] > 0 and values["head_l2"] > 0
        assert values["total"] == pytest.approx(
            values["ce"] + stage["alpha"] * values["feature"] + config.beta * values["head_l2"], rel=1e-5
        )
        assert round(values["train_acc"] * 2 * BATCH) == pytest.approx(values["train_acc"] * 2 * BATCH, abs=1e-3)
        best = max(best, values["val_acc"])
        assert values["best_val_acc"] == pytest.approx(best, abs=1e-6)
        assert values["seconds"] > 0

    # checkpoint.pt: the state after the last epoch, with the same rows.
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert (saved["state"].stage, saved["state"].epoch) == (len(stages) - 1, 2)
    assert len(saved["state"].records) == len(rows)
    for row, saved_row in zip(rows, saved["state"].records):
        assert number(row, "ce") == pytest.approx(saved_row.ce, rel=1e-5)
    for key in ("model", "source", "optimizer", "scheduler", "rng", "config"):
        assert key in saved

    # model.pt: a state_dict of DigitsCNN whose test accuracy is result.json's test_acc.
    correct, total = evaluate_by_hand(torch.load(out / "model.pt", map_location="cpu", weights_only=True))
    assert total == result["images"]["test"]
    assert result["test_acc"] == pytest.approx(correct / total, abs=1e-12)

    on_disk = read_result(out)
    assert on_disk == json.loads(json.dumps(result))
    assert 0.0 <= on_disk["test_acc"] <= 1.0
    assert on_disk["best_val_acc"] == pytest.approx(max(number(r, "val_acc") for r in rows), abs=1e-6)
    assert on_disk["best_val_acc"] == stages[-1]["best_val_acc"]
    assert on_disk["method"] == which
    assert on_disk["epochs_per_stage"] == 2 and on_disk["epochs_run"] == 2 * len(stages)
    steps_per_epoch = 5 * SHOTS // BATCH
    assert [stage["steps"] for stage in stages] == [2 * steps_per_epoch] * len(stages)
    assert on_disk["steps"] == 2 * steps_per_epoch * len(stages)
    assert on_disk["wall_time_s"] >= sum(number(r, "seconds") for r in rows) > 0
    assert on_disk["backend"] == "auto"
    assert on_disk["arch"] == "digits_cnn" and on_disk["layers"] == DIGITS_LAYERS
    assert on_disk["images"]["train"] == 5 * SHOTS
    assert on_disk["world_size"] == 1 and on_disk["seed"] == 0 and on_disk["test_is_val"] is False


# ----------------------------------------------------------------------------- 4. backends


@pytest.mark.skipif("cpu" not in afa_ext.available_backends(), reason="the cpu backend is not built")
def test_reference_and_cpu_backends_give_the_same_first_epoch(tmp_path, cache_dir):
    rows = {}
    for backend in ("reference", "cpu"):
        result = train(tiny_config(tmp_path / backend, cache_dir, "ast", backend=backend))
        assert result["backend"] == backend
        rows[backend] = read_metrics(tmp_path / backend)
    assert len(rows["cpu"]) == len(rows["reference"]) == 1
    for key in ("ce", "feature", "head_l2", "total"):
        assert number(rows["cpu"][0], key) == pytest.approx(number(rows["reference"][0], key), rel=1e-5), key
    assert number(rows["cpu"][0], "feature") > 1.0


# ----------------------------------------------------------------------------- 5. amp, channels_last, compile


@pytest.mark.parametrize("reg", REGS)
def test_bf16_channels_last_runs_and_stays_close_to_float32(reg, tmp_path, cache_dir):
    settings = {}
    if reg == "delta":
        write_delta_pt(tmp_path / "weights.pt")
        settings["delta_weights"] = str(tmp_path / "weights.pt")
    train(tiny_config(tmp_path / "fp32", cache_dir, reg, **settings))
    result = train(tiny_config(tmp_path / "bf16", cache_dir, reg, amp="bf16", channels_last=True, **settings))
    assert 0.0 <= result["test_acc"] <= 1.0
    low, full = read_metrics(tmp_path / "bf16"), read_metrics(tmp_path / "fp32")
    assert len(low) == len(full) == (2 if reg == "afa" else 1)
    for row, reference in zip(low, full):
        for key in ("ce", "feature", "head_l2", "total", "val_acc"):
            assert math.isfinite(number(row, key)), key
        for key in ("ce", "feature", "head_l2", "total"):
            assert number(row, key) == pytest.approx(number(reference, key), rel=5e-2, abs=1e-9), key
    assert from_dict(load_toml(str(tmp_path / "bf16" / "config.toml")), "x").amp == "bf16"


def test_torch_compile_run_matches_the_eager_run(tmp_path, cache_dir):
    train(tiny_config(tmp_path / "eager", cache_dir, "fea_map"))
    result = train(tiny_config(tmp_path / "compiled", cache_dir, "fea_map", compile=True))
    assert 0.0 <= result["test_acc"] <= 1.0
    compiled, eager = read_metrics(tmp_path / "compiled"), read_metrics(tmp_path / "eager")
    assert len(compiled) == len(eager) == 1
    for key in ("ce", "feature", "head_l2", "total"):
        assert math.isfinite(number(compiled[0], key))
        assert number(compiled[0], key) == pytest.approx(number(eager[0], key), rel=1e-4), key
    # model.pt holds the plain model's names (no _orig_mod. prefix).
    correct, total = evaluate_by_hand(torch.load(tmp_path / "compiled" / "model.pt", weights_only=True))
    assert result["test_acc"] == pytest.approx(correct / total, abs=1e-12)


def test_data_workers_do_not_change_the_result(tmp_path, cache_dir):
    """Augmentation is drawn per sample from (seed, epoch, index): two loader workers train
    bitwise the same model as loading in the main process."""
    results, models = [], []
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        results.append(train(tiny_config(out, cache_dir, "ast", epochs=2, workers=workers)))
        models.append(torch.load(out / "model.pt", weights_only=True))
    assert results[0]["test_acc"] == results[1]["test_acc"]
    assert list(models[0]) == list(models[1])
    for key in models[0]:
        assert torch.equal(models[0][key], models[1][key]), key
    # The augmentation is really on: a training sample differs between epochs.
    run = make_run(tiny_config(tmp_path / "probe", cache_dir, "none"))
    run.data.train.set_epoch(0)
    first = run.data.train[0][0]
    run.data.train.set_epoch(1)
    assert not torch.equal(first, run.data.train[0][0])
