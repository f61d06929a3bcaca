"""afa_ext.train.delta_weights: DELTA's channel weights (head training, removal and Taylor
scores, softmax(z / 5), the cache and the file formats)."""

import copy
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from afa_ext.compat import channel_weights_from_scores
from afa_ext.train import delta_weights as dw
from afa_ext.train.identity import fingerprint
from afa_ext.train.models import DigitsCNN, eval_mode, layer_output_shapes, outermost_sequential_child

TINY_LAYERS = ["stem", "features.0", "features.2.conv", "features.4"]
TINY_CHANNELS = [4, 5, 5, 6]


class Residual(nn.Module):
    """x + bn(conv(relu(x))): copies made at the conv would not reach the skip branch."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + self.bn(self.conv(torch.relu(x)))


class TinyNet(nn.Module):
    """A conv outside any nn.Sequential, then a Sequential of plain layers and a residual block."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.features = nn.Sequential(
            nn.Conv2d(4, 5, 3, padding=1),
            nn.ReLU(inplace=True),
            Residual(5),
            nn.MaxPool2d(2),
            nn.Conv2d(5, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
        )
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        return self.head(self.features(torch.relu(self.stem(x))).mean(dim=(2, 3)))


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
    return model.to(dtype)


def tiny_batches(dtype=torch.float32, count=3, rows=6, classes=3):
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(rows, 1, 8, 8, generator=generator, dtype=dtype),
            torch.randint(0, classes, (rows,), generator=generator),
        )
        for _ in range(count)
    ]


def mean_loss(model, batches):
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = sum(F.cross_entropy(model(x), y).item() for x, y in batches) / len(batches)
    model.train(was_training)
    return loss


def digits_setup():
    torch.manual_seed(0)
    model = DigitsCNN(num_classes=5)
    layers = ["features.0", "features.1.0"]  # a block's output and a conv inside a block
    generator = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(4, 1, 16, 16, generator=generator), torch.randint(0, 5, (4,), generator=generator))
        for _ in range(2)
    ]
    return model, layers, batches


# ---------------------------------------------------------------------------- removal scores


def test_tiny_model_replicates_at_the_residual_block_not_at_its_conv():
    model = tiny_model()
    assert outermost_sequential_child(model, "features.2.conv") == "features.2"
    assert outermost_sequential_child(model, "stem") is None


@torch.no_grad()
def removal_scores_naive(model, layer_names, batches):
    """The slow reference of ``removal_scores``: one full forward pass per zeroed channel and batch,
    score[l][j] = mean over batches of (L(channel j of layer l zeroed) - L), in eval mode."""
    with eval_mode(model):
        baseline = [F.cross_entropy(model(images).double(), labels) for images, labels in batches]
        scores = []
        for name in layer_names:
            count = layer_output_shapes(model, [name], batches[0][0])[0][0]
            score = torch.zeros(count, dtype=torch.float64)
            for channel in range(count):

                def zero_channel(module, inputs, output, channel=channel):
                    output = output.clone()
                    output[:, channel] = 0
                    return output

                handle = model.get_submodule(name).register_forward_hook(zero_channel)
                removed = [F.cross_entropy(model(images).double(), labels) for images, labels in batches]
                handle.remove()
                score[channel] = sum((r - b).item() for r, b in zip(removed, baseline)) / len(batches)
            scores.append(score)
    return scores


@pytest.fixture(scope="module")
def tiny_naive_scores():
    return removal_scores_naive(tiny_model(torch.float64), TINY_LAYERS, tiny_batches(torch.float64))


@pytest.mark.parametrize("max_rows", [4096, 12, 1])
def test_batched_removal_equals_one_channel_at_a_time(max_rows, tiny_naive_scores):
    model, batches = tiny_model(torch.float64), tiny_batches(torch.float64)
    model.train()
    naive = tiny_naive_scores
    batched = dw.removal_scores(model, TINY_LAYERS, batches, max_rows=max_rows)
    assert [score.shape[0] for score in batched] == TINY_CHANNELS
    for fast, slow in zip(batched, naive):
        assert fast.dtype == torch.float64
        assert slow.abs().max() > 1e-5  # channels that matter, not a comparison of zeros
        torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-12)
    assert model.training and model.features[2].bn.training  # modes restored


def test_removal_score_is_the_mean_loss_rise_of_zeroing_the_channel():
    model, batches = tiny_model(torch.float64), tiny_batches(torch.float64)
    scores = dw.removal_scores(model, ["features.4"], batches)[0]
    model.eval()
    with torch.no_grad():
        kept = mean_loss(model, batches)
        model.features[4].weight[2] = 0
        model.features[4].bias[2] = 0
        removed = mean_loss(model, batches)
    torch.testing.assert_close(scores[2].item(), removed - kept, rtol=1e-9, atol=1e-12)


def test_batched_removal_on_digits_cnn_matches_the_naive_loop():
    model, layers, batches = digits_setup()
    naive = removal_scores_naive(model, layers, batches)
    batched = dw.removal_scores(model, layers, batches, max_rows=24)
    for fast, slow in zip(batched, naive):
        scale = slow.abs().max().item()
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5 * scale)


def test_removal_rejects_unknown_layers_and_empty_batches():
    model, batches = tiny_model(), tiny_batches()
    with pytest.raises(ValueError, match="not a submodule"):
        dw.removal_scores(model, ["features.9"], batches)
    with pytest.raises(ValueError, match="at least one"):
        dw.removal_scores(model, ["stem"], [])


# ---------------------------------------------------------------------------- Taylor scores


def test_taylor_scores_are_minus_feature_times_gradient_of_the_mean_loss():
    model, batches = tiny_model(torch.float64), tiny_batches(torch.float64)
    model.eval()
    expected = [torch.zeros(c, dtype=torch.float64) for c in TINY_CHANNELS]
    for images, labels in batches:
        outputs = {}

        def keep(name):
            def hook(module, inputs, output):
                outputs[name] = output
                return output.clone()  # ReLU(inplace=True) follows features.0

            return hook

        handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in TINY_LAYERS]
        loss = F.cross_entropy(model(images.requires_grad_()), labels)
        for handle in handles:
            handle.remove()
        grads = torch.autograd.grad(loss, [outputs[name] for name in TINY_LAYERS])
        for total, name, grad in zip(expected, TINY_LAYERS, grads):
            total -= (outputs[name] * grad).sum(dim=(0, 2, 3)).detach() / len(batches)
    for score, want in zip(dw.taylor_scores(model, TINY_LAYERS, batches), expected):
        torch.testing.assert_close(score, want, rtol=1e-9, atol=1e-14)


def test_taylor_score_is_the_slope_of_the_loss_when_the_channel_is_scaled_down():
    model, batches = tiny_model(torch.float64), tiny_batches(torch.float64)
    model.eval()
    layer, step = model.features[2].conv, 1e-5

    def loss_with_channel_scaled(channel, scale):
        def hook(module, inputs, output):
            output = output.clone()
            output[:, channel] *= scale
            return output

        handle = layer.register_forward_hook(hook)
        try:
            return mean_loss(model, batches)
        finally:
            handle.remove()

    slopes = torch.tensor(
        [
            (loss_with_channel_scaled(j, 1 + step) - loss_with_channel_scaled(j, 1 - step)) / (2 * step)
            for j in range(5)
        ],
        dtype=torch.float64,
    )
    taylor = dw.taylor_scores(model, ["features.2.conv"], batches)[0]
    assert slopes.abs().max() > 1e-4
    torch.testing.assert_close(taylor, -slopes, rtol=1e-4, atol=1e-9)


def test_taylor_and_removal_rank_correlation_on_digits_cnn():
    model, layers, batches = digits_setup()
    taylor = dw.taylor_scores(model, layers, batches)
    removal = dw.removal_scores(model, layers, batches)
    assert all(param.grad is None for param in model.parameters())
    for first, second in zip(taylor, removal):
        rho = float(spearmanr(first, second).statistic)
        assert isinstance(rho, float) and -1.0 <= rho <= 1.0


# ---------------------------------------------------------------------------- head training


def test_train_head_moves_only_the_head_and_restores_flags_and_modes():
    model, batches = tiny_model(), tiny_batches()
    model.train()
    model.stem.weight.requires_grad_(False)
    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    before = copy.deepcopy(model.state_dict())
    loss_before = mean_loss(model, batches)
    seen = []

    def check_frozen(module, inputs, output):
        backbone_training = any(m.training for name, m in model.named_modules() if not name.startswith("head"))
        seen.append((inputs[0].requires_grad, backbone_training, module.training))

    handle = model.head.register_forward_hook(check_frozen)
    dw.train_head(model, "head", batches, epochs=15, lr=0.1, device="cpu")
    handle.remove()

    assert seen and set(seen) == {(False, False, True)}  # no gradient into the backbone, BN frozen
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith("head."):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key
    assert {name: param.requires_grad for name, param in model.named_parameters()} == flags
    assert all(module.training for module in model.modules())
    assert all(param.grad is None for param in model.parameters())
    assert mean_loss(model, batches) < loss_before


def test_train_head_rejects_a_missing_head():
    with pytest.raises(ValueError, match="not a submodule"):
        dw.train_head(tiny_model(), "fc", tiny_batches(), epochs=1, lr=0.1, device="cpu")


# ---------------------------------------------------------------------------- the cached pipeline


def test_cache_key_is_sha256_of_canonical_json():
    key = fingerprint(b=(1, 2), a="x")
    assert key == hashlib.sha256(b'{"a":"x","b":[1,2]}').hexdigest()
    assert key == fingerprint(a="x", b=[1, 2]) != fingerprint(a="x", b=[2, 1])
    with pytest.raises(TypeError, match="canonical JSON"):
        fingerprint(a=object())


def test_compute_channel_weights_caches_and_leaves_the_model_alone(tmp_path):
    model, batches = tiny_model(), tiny_batches()
    model.train()
    state = copy.deepcopy(model.state_dict())
    settings = dict(head_epochs=2, head_lr=0.05, score_batches=2, cache_dir=tmp_path)
    key_parts = {"seed": 0, "sizes": (8, 8)}
    weights, info = dw.compute_channel_weights(
        model, "head", TINY_LAYERS, batches, method="removal", key_parts=key_parts, **settings
    )
    assert info["cached"] is False and info["method"] == "removal" and info["seconds"] >= 0
    assert info["path"].startswith(str(tmp_path / "delta_weights_removal_"))
    assert [w.shape[0] for w in weights] == TINY_CHANNELS
    for weight in weights:
        assert weight.dtype == torch.float32 and weight.device.type == "cpu"
        torch.testing.assert_close(weight.sum().item(), 1.0, rtol=0, atol=1e-6)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in state.items())
    assert model.training

    trained = copy.deepcopy(model)
    dw.train_head(trained, "head", batches, epochs=2, lr=0.05, device="cpu")
    expected = channel_weights_from_scores(dw.removal_scores(trained, TINY_LAYERS, batches[:2]))
    for weight, want in zip(weights, expected):
        torch.testing.assert_close(weight, want)

    again, info_again = dw.compute_channel_weights(
        model, "head", TINY_LAYERS, batches, method="removal", key_parts=dict(key_parts), **settings
    )
    assert info_again["cached"] is True and info_again["path"] == info["path"]
    assert all(torch.equal(first, second) for first, second in zip(weights, again))
    saved = torch.load(info["path"], weights_only=True)
    assert saved["layers"] == TINY_LAYERS and saved["method"] == "removal"
    assert saved["key_parts"] == {"seed": 0, "sizes": [8, 8]}
    assert [s.shape[0] for s in saved["scores"]] == TINY_CHANNELS
    assert all(torch.equal(a, b) for a, b in zip(dw.load_channel_weights(info["path"]), weights))

    _, other = dw.compute_channel_weights(
        model, "head", TINY_LAYERS, batches, method="removal", key_parts={"seed": 1, "sizes": (8, 8)}, **settings
    )
    _, taylor = dw.compute_channel_weights(
        model, "head", TINY_LAYERS, batches, method="taylor", key_parts=key_parts, **settings
    )
    assert len({info["path"], other["path"], taylor["path"]}) == 3
    assert not other["cached"] and not taylor["cached"]
    assert sorted(p.name.startswith("delta_weights_") for p in tmp_path.iterdir()) == [True] * 3


def test_compute_channel_weights_is_deterministic_for_a_seeded_loader():
    model = tiny_model()
    images = torch.cat([x for x, _ in tiny_batches()])
    labels = torch.cat([y for _, y in tiny_batches()])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=6, shuffle=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(
            dw.compute_channel_weights(
                model, "head", ["features.2.conv"], loader, method="taylor", head_epochs=1, cache_dir=None, key_parts={}
            )[0]
        )
    assert torch.equal(runs[0][0], runs[1][0])


def test_compute_channel_weights_rejects_bad_settings(tmp_path):
    model, batches = tiny_model(), tiny_batches()
    with pytest.raises(ValueError, match="method"):
        dw.compute_channel_weights(model, "head", ["stem"], batches, method="fisher", cache_dir=None, key_parts={})
    with pytest.raises(ValueError, match="key_parts"):
        dw.compute_channel_weights(
            model, "head", ["stem"], batches, method="taylor", cache_dir=tmp_path, key_parts={"layers": ["x"]}
        )


# ---------------------------------------------------------------------------- loading weights


def test_load_channel_weights_reads_the_published_json_and_our_files(tmp_path):
    scores = [[0.5, 0.1, 0.9], [2.0, 2.0, 1.0, 0.0]]
    (tmp_path / "channel_wei.json").write_text(json.dumps(scores))
    loaded = dw.load_channel_weights(tmp_path / "channel_wei.json")
    for weight, want in zip(loaded, channel_weights_from_scores(scores)):
        torch.testing.assert_close(weight, want)
    assert loaded[0].argmax() == 2 and loaded[0].argmin() == 1

    weights = [torch.tensor([0.2, 0.8]), torch.tensor([1.0])]
    torch.save({"weights": weights, "layers": ["a", "b"]}, tmp_path / "ours.pt")
    torch.save(weights, tmp_path / "plain.pt")
    for name in ("ours.pt", "plain.pt"):
        assert all(torch.equal(a, b) for a, b in zip(dw.load_channel_weights(tmp_path / name), weights))


@pytest.mark.parametrize(
    "name, content",
    [
        ("missing.pt", None),
        ("broken.json", "[[0.5, 0.1"),
        ("words.json", '[["a", "b"]]'),
        ("garbage.pt", "not a torch file"),
    ],
)
def test_load_channel_weights_errors(tmp_path, name, content):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ValueError):
        dw.load_channel_weights(tmp_path / name)


def test_load_channel_weights_rejects_other_torch_contents(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "model.pt")
    torch.save([torch.zeros(2, 2)], tmp_path / "matrix.pt")
    with pytest.raises(ValueError, match="without 'weights'"):
        dw.load_channel_weights(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="1-D float tensors"):
        dw.load_channel_weights(tmp_path / "matrix.pt")
