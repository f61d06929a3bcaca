"""afa_ext.compat against a plain-PyTorch transcription of the published AFA regularisers.

The transcription below (``original_*`` and the ``Original*Attention`` modules) follows the
published code line by line: the same accumulators (a float32 zero, ``new_zeros(1)`` for
the channel loss), the same norms and the same parameter names, with ``.cuda()`` left out.
Every loss is compared on the hooked layers of ResNet-50 and MobileNetV2 at batch 2: its
value, and the gradients of the target maps, of the source maps (which only the attention
reaches) and of the attention modules' parameters.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import afa_ext
from afa_ext import compat

BATCH = 2
NETWORK_LAYERS = {
    "resnet50": ((256, 56), (512, 28), (1024, 14), (2048, 7)),
    "mobilenet_v2": ((32, 28), (64, 14), (96, 14), (320, 7)),
}
BACKENDS = [name for name in afa_ext.available_backends() if name in ("reference", "cpu")]
LOSSES = ("reg_fea_map", "reg_att_fea_map", "reg_pixel_att_fea_map_learn", "reg_channel_att_fea_map_learn")
# Backends innermost: consecutive cases share the transcription's result (original_result).
CASES = [(loss, network, backend) for loss in LOSSES for network in NETWORK_LAYERS for backend in BACKENDS]


# --------------------------------------------------------------------------- the transcription


def flatten_outputs(fea):
    return torch.reshape(fea, (fea.shape[0], fea.shape[1], fea.shape[2] * fea.shape[3]))


class OriginalPixelAttention(nn.Module):
    def __init__(self, in_channels, feature_size):
        super().__init__()
        self.fc1 = nn.Linear(feature_size * feature_size, feature_size, bias=False)
        self.relu1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(feature_size, feature_size * feature_size, bias=True)
        self.softmax = nn.Softmax(dim=1)  # the original's nn.Softmax() picks dim 1 for 2-D input

    def forward(self, target_feature):
        b, c, h, w = target_feature.shape
        p_f = torch.mean(target_feature.view(b, c, h * w), dim=1)
        p_f = self.fc2(self.relu1(self.fc1(p_f)))
        return self.softmax(p_f.view(b, h * w)).reshape(b, 1, h * w)


class OriginalChannelAttention(nn.Module):
    def __init__(self, in_channels, feature_size):
        super().__init__()
        self.fc1 = nn.Linear(feature_size * feature_size, feature_size, bias=False)
        self.relu1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(feature_size, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(in_channels))
        self.softmax = nn.Softmax(dim=1)

    def forward(self, target_feature):
        b, c, h, w = target_feature.shape
        c_f = self.fc2(self.relu1(self.fc1(target_feature.view(b, c, h * w))))
        return self.softmax(c_f.view(b, c) + self.bias)


def original_reg_fea_map(layer_outputs_source, layer_outputs_target):
    fea_loss = torch.tensor(0.0)
    for fm_src, fm_tgt in zip(layer_outputs_source, layer_outputs_target):
        fea_loss += 0.5 * (torch.norm(fm_tgt - fm_src.detach()) ** 2)
    return fea_loss


def original_reg_att_fea_map(layer_outputs_source, layer_outputs_target, channel_weights):
    fea_loss = torch.tensor(0.0)
    for i, (fm_src, fm_tgt) in enumerate(zip(layer_outputs_source, layer_outputs_target)):
        b, c, h, w = fm_src.shape
        distance = torch.norm(flatten_outputs(fm_tgt) - flatten_outputs(fm_src).detach(), 2, 2)
        distance = c * torch.mul(channel_weights[i], distance**2) / (h * w)
        fea_loss += 0.5 * torch.sum(distance)
    return fea_loss


def original_reg_pixel_att_fea_map_learn(layer_outputs_source, layer_outputs_target, feature_criterions):
    fea_loss = torch.tensor(0.0)
    for fm_src, fm_tgt, feature_criterion in zip(layer_outputs_source, layer_outputs_target, feature_criterions):
        pixel_attention_weight = feature_criterion(fm_src)
        b, c, h, w = fm_src.shape
        diff = flatten_outputs(fm_tgt) - flatten_outputs(fm_src).detach()
        diff = torch.mul(pixel_attention_weight, diff) * (h * w)
        distance = torch.norm(diff, 2, 1) ** 2
        fea_loss += 0.5 * torch.sum(distance) / b
    return fea_loss


def original_reg_channel_att_fea_map_learn(layer_outputs_source, layer_outputs_target, feature_criterions):
    fea_loss = layer_outputs_target[0].new_zeros(1)
    for fm_src, fm_tgt, feature_criterion in zip(layer_outputs_source, layer_outputs_target, feature_criterions):
        channel_attention_weight = feature_criterion(fm_src)
        b, c, h, w = fm_src.shape
        distance = torch.norm(flatten_outputs(fm_tgt) - flatten_outputs(fm_src).detach(), 2, 2)
        distance = torch.mul(channel_attention_weight, distance**2) * c
        fea_loss += 0.5 * torch.sum(distance) / b
    return fea_loss


ORIGINAL_LOSSES = {
    "reg_fea_map": original_reg_fea_map,
    "reg_att_fea_map": original_reg_att_fea_map,
    "reg_pixel_att_fea_map_learn": original_reg_pixel_att_fea_map_learn,
    "reg_channel_att_fea_map_learn": original_reg_channel_att_fea_map_learn,
}
ORIGINAL_MODULES = {"pixel": OriginalPixelAttention, "channel": OriginalChannelAttention}
COMPAT_MODULES = {"pixel": compat.pixel_attention, "channel": compat.channel_attention}
ATTENTION_OF_LOSS = {"reg_pixel_att_fea_map_learn": "pixel", "reg_channel_att_fea_map_learn": "channel"}


# --------------------------------------------------------------------------- inputs


def feature_maps(network, seed=0):
    """Float32 (source, target) maps of every hooked layer, target = source + noise of a
    random scale per channel."""
    generator = torch.Generator().manual_seed(seed)
    sources, targets = [], []
    for channels, side in NETWORK_LAYERS[network]:
        source = torch.randn(BATCH, channels, side, side, generator=generator)
        # Channels that drift apart by different amounts, as real ones do.
        drift = torch.rand(1, channels, 1, 1, generator=generator) + 0.05
        sources.append(source)
        targets.append(source + drift * torch.randn(BATCH, channels, side, side, generator=generator))
    return sources, targets


def leaves(maps, dtype):
    return [m.detach().to(dtype).requires_grad_() for m in maps]


def original_attention_modules(kind, network, seed=0):
    """Original-style modules with random biases, so that every parameter shapes the result."""
    torch.manual_seed(seed)
    modules = nn.ModuleList(ORIGINAL_MODULES[kind](c, side) for c, side in NETWORK_LAYERS[network])
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in modules.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return modules


def compat_attention_modules(kind, network, original):
    modules = nn.ModuleList(COMPAT_MODULES[kind](c, side) for c, side in NETWORK_LAYERS[network])
    modules.load_state_dict(original.state_dict(), strict=True)
    return modules


def delta_weights(network, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(c, generator=generator), dim=0) for c, _ in NETWORK_LAYERS[network]]


def loss_arguments(loss, network, compat_dtype=torch.float32, original_dtype=torch.float64):
    """The third argument, if any, for compat (in ``compat_dtype``) and for the
    transcription (in ``original_dtype``), as lists of what follows the feature maps."""
    if loss == "reg_att_fea_map":
        weights = delta_weights(network)
        return [[w.to(compat_dtype) for w in weights]], [[w.to(original_dtype) for w in weights]]
    if loss in ATTENTION_OF_LOSS:
        kind = ATTENTION_OF_LOSS[loss]
        original = original_attention_modules(kind, network)
        return [compat_attention_modules(kind, network, original).to(compat_dtype)], [original.to(original_dtype)]
    return [], []


def relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm()).item()


def gradients(sources, targets, extra):
    """Target and source gradients, and those of the attention parameters by name."""
    grads = {f"target {i}": t.grad for i, t in enumerate(targets)}
    grads.update({f"source {i}": s.grad for i, s in enumerate(sources)})
    if extra and isinstance(extra[0], nn.Module):
        grads.update({name: p.grad for name, p in extra[0].named_parameters()})
    return grads


def run(loss_fn, sources, targets, extra, dtype, **options):
    """The loss of leaf copies of the maps in ``dtype`` (under bfloat16 autocast for
    bfloat16), after its backward: (value, gradients by name)."""
    sources, targets = leaves(sources, dtype), leaves(targets, dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        value = loss_fn(sources, targets, *extra, **options)
    value.sum().backward()
    return value, gradients(sources, targets, extra)


def float32_copy(extra):
    return [copy.deepcopy(e).float() if isinstance(e, nn.Module) else [w.float() for w in e] for e in extra]


def rounded_maps(network, dtype):
    sources, targets = feature_maps(network)
    return [s.to(dtype) for s in sources], [t.to(dtype) for t in targets]


@functools.lru_cache(maxsize=2)
def original_result(loss, network, dtype):
    """The transcription's value and gradients in float64, on the maps rounded to ``dtype``,
    and the gradients' allowed relative errors: rtol_grad; under bfloat16 autocast, where
    the original itself errs more (its attention runs in bfloat16 too, and ReLU and softmax
    amplify the rounding), up to 1.5 times the original's own error under autocast. Shared
    by the backends (they come one after another)."""
    sources, targets = rounded_maps(network, dtype)
    _, original_extra = loss_arguments(loss, network)
    expected, expected_grads = run(ORIGINAL_LOSSES[loss], sources, targets, original_extra, torch.float64)
    own_errors = {}
    if dtype == torch.bfloat16:
        _, autocast_grads = run(ORIGINAL_LOSSES[loss], sources, targets, float32_copy(original_extra), dtype)
        own_errors = {
            name: relative_error(autocast_grads[name], grad)
            for name, grad in expected_grads.items()
            if grad is not None
        }
    return expected, expected_grads, own_errors


def compare_with_original(loss, network, backend, dtype, rtol_value, rtol_grad):
    """compat in ``dtype`` against the transcription in float64 of the same maps (rounded to
    ``dtype`` first): the value, and every gradient by its relative (Frobenius) error."""
    sources, targets = rounded_maps(network, dtype)
    compat_extra, _ = loss_arguments(loss, network)
    value, actual_grads = run(getattr(compat, loss), sources, targets, compat_extra, dtype, backend=backend)
    expected, expected_grads, own_errors = original_result(loss, network, dtype)

    assert relative_error(value, expected) < rtol_value, (value.item(), expected.item())
    assert actual_grads.keys() == expected_grads.keys()
    for name, expected_grad in expected_grads.items():
        if expected_grad is None:
            assert actual_grads[name] is None, f"{name}: the original sends it no gradient"
            continue
        assert actual_grads[name] is not None, f"{name}: the original sends it a gradient"
        error = relative_error(actual_grads[name], expected_grad)
        allowed = max(rtol_grad, 1.5 * own_errors.get(name, 0.0))
        assert error < allowed, f"{name}: relative error {error:.2e}, allowed {allowed:.2e}"
    return expected_grads


# --------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("loss, network, backend", CASES)
def test_float32_matches_the_original_in_float64(loss, network, backend):
    grads = compare_with_original(loss, network, backend, torch.float32, rtol_value=2e-5, rtol_grad=2e-5)
    # Only the attention reads the source maps with autograd on.
    assert (grads["source 0"] is not None) == (loss in ATTENTION_OF_LOSS)


@pytest.mark.parametrize("loss, network, backend", CASES)
def test_bfloat16_maps_under_autocast_match_the_original_in_float64(loss, network, backend):
    # afa_ext sums the bfloat16 maps' squares in float32: the value stays close.
    compare_with_original(loss, network, backend, torch.bfloat16, rtol_value=1e-3, rtol_grad=2e-2)


@pytest.mark.parametrize("container", [list, tuple, nn.ModuleList])
def test_feature_criterions_may_be_any_indexable_sequence(container):
    sources, targets = feature_maps("mobilenet_v2")
    original = original_attention_modules("channel", "mobilenet_v2")
    criterions = container(list(compat_attention_modules("channel", "mobilenet_v2", original)))
    value = compat.reg_channel_att_fea_map_learn(sources, targets, criterions)
    expected = original_reg_channel_att_fea_map_learn(sources, targets, original)
    assert relative_error(value, expected) < 2e-5


# --------------------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss", LOSSES)
def test_returns_the_original_shape_and_dtype(loss, dtype):
    sources, targets = feature_maps("mobilenet_v2")
    compat_extra, original_extra = loss_arguments(loss, "mobilenet_v2", dtype, dtype)
    sources, targets = leaves(sources, dtype), leaves(targets, dtype)
    value = getattr(compat, loss)(sources, targets, *compat_extra)
    expected = ORIGINAL_LOSSES[loss](sources, targets, *original_extra)
    assert (value.shape, value.dtype, value.device) == (expected.shape, expected.dtype, expected.device)
    assert value.shape == ((1,) if loss == "reg_channel_att_fea_map_learn" else ())


def test_channel_loss_of_bfloat16_maps_is_float32_of_shape_1():
    sources, targets = feature_maps("mobilenet_v2")
    original = original_attention_modules("channel", "mobilenet_v2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = compat.reg_channel_att_fea_map_learn(
            leaves(sources, torch.bfloat16),
            leaves(targets, torch.bfloat16),
            compat_attention_modules("channel", "mobilenet_v2", original),
        )
    assert (value.shape, value.dtype) == ((1,), torch.float32)


@pytest.mark.parametrize("loss", LOSSES)
def test_no_layers_give_a_zero_of_the_original_shape(loss):
    extra = [[]] if loss != "reg_fea_map" else []
    value = getattr(compat, loss)([], [], *extra)
    assert value.dtype == torch.float32 and value.shape == ((1,) if loss == "reg_channel_att_fea_map_learn" else ())
    assert value.abs().sum().item() == 0


def test_lists_of_different_lengths_are_refused():
    sources, targets = feature_maps("mobilenet_v2")
    with pytest.raises(ValueError, match="4 source and 3 target maps"):
        compat.reg_fea_map(sources, targets[:3])
    with pytest.raises(ValueError, match="channel_weights for 4 layers.*got 3"):
        compat.reg_att_fea_map(sources, targets, delta_weights("mobilenet_v2")[:3])
    criterions = compat_attention_modules("pixel", "mobilenet_v2", original_attention_modules("pixel", "mobilenet_v2"))
    with pytest.raises(ValueError, match="feature_criterions for 4 layers.*got 2"):
        compat.reg_pixel_att_fea_map_learn(sources, targets, criterions[:2])
    with pytest.raises(TypeError, match="single Tensor"):
        compat.reg_fea_map(sources[0], targets[0])


# --------------------------------------------------------------------------- attention modules


@pytest.mark.parametrize("network", NETWORK_LAYERS)
@pytest.mark.parametrize("kind", ["pixel", "channel"])
def test_checkpoint_of_original_modules_loads_strict_and_gives_the_same_attention(tmp_path, kind, network):
    original = original_attention_modules(kind, network)
    torch.save(original.state_dict(), tmp_path / "feature_criterions.pt")
    loaded = nn.ModuleList(COMPAT_MODULES[kind](c, side) for c, side in NETWORK_LAYERS[network])
    loaded.load_state_dict(torch.load(tmp_path / "feature_criterions.pt"), strict=True)

    assert list(loaded.state_dict()) == list(original.state_dict())
    assert [name for name, _ in loaded.named_parameters()] == [name for name, _ in original.named_parameters()]
    sources, _ = feature_maps(network, seed=5)
    for source, ours, theirs in zip(sources, loaded, original):
        expected = theirs(source)
        attention = ours(source)
        assert attention.shape == expected.shape
        assert expected.shape == (
            (BATCH, 1, source.shape[2] * source.shape[3]) if kind == "pixel" else (BATCH, source.shape[1])
        )
        torch.testing.assert_close(attention, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["pixel", "channel"])
def test_same_seed_gives_the_original_initial_parameters(kind):
    torch.manual_seed(7)
    original = ORIGINAL_MODULES[kind](64, 14)
    torch.manual_seed(7)
    ours = COMPAT_MODULES[kind](64, 14)
    for (name, expected), (our_name, actual) in zip(original.state_dict().items(), ours.state_dict().items()):
        assert name == our_name
        assert torch.equal(actual, expected), name


@pytest.mark.parametrize("kind", ["pixel", "channel"])
def test_attention_reads_channels_last_maps(kind):
    source = torch.randn(BATCH, 64, 14, 14)
    module = COMPAT_MODULES[kind](64, 14)
    expected = module(source)
    torch.testing.assert_close(module(source.to(memory_format=torch.channels_last)), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["pixel", "channel"])
def test_bfloat16_modules_give_bfloat16_attention_as_the_original(kind):
    source = torch.randn(BATCH, 64, 14, 14).bfloat16()
    original = original_attention_modules(kind, "mobilenet_v2")[1]
    ours = COMPAT_MODULES[kind](64, 14)
    ours.load_state_dict(original.state_dict(), strict=True)
    expected = original.bfloat16()(source)
    attention = ours.bfloat16()(source)
    assert attention.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(attention, expected, rtol=1e-2, atol=0)


def test_attention_names_the_expected_size():
    with pytest.raises(ValueError, match=r"feature_size=14 \(196 positions\).*\(784 positions\)"):
        compat.pixel_attention(64, 14)(torch.randn(1, 64, 28, 28))
    with pytest.raises(ValueError, match="in_channels=64.*32 channels"):
        compat.channel_attention(64, 14)(torch.randn(1, 32, 14, 14))


# --------------------------------------------------------------------------- channel weights


def numpy_delta_weights(scores):
    x = np.array(scores)
    z = ((x - np.mean(x)) / np.std(x)).astype(np.float32).astype(np.float64)
    e = np.exp(z / 5.0)
    return e / e.sum()


def test_get_channel_weight_reads_the_json_scores(tmp_path):
    rng = np.random.default_rng(0)
    scores = [(rng.random(c) * 10).tolist() for c, _ in NETWORK_LAYERS["resnet50"]]
    path = tmp_path / "channel_weights.json"
    path.write_text(json.dumps(scores))

    weights = compat.get_channel_weight(path)
    assert len(weights) == len(scores)
    for weight, layer_scores in zip(weights, scores):
        assert (weight.dtype, weight.device, weight.shape) == (torch.float32, torch.device("cpu"), (len(layer_scores),))
        np.testing.assert_allclose(weight.numpy(), numpy_delta_weights(layer_scores), rtol=1e-6)
    assert compat.get_channel_weight(None) is None and compat.get_channel_weight("") is None


def test_channel_weights_from_scores_takes_arrays_and_tensors():
    scores = np.random.default_rng(1).normal(size=96)
    expected = numpy_delta_weights(scores)
    for layer in (scores, scores.tolist(), torch.from_numpy(scores), torch.from_numpy(scores).float()):
        (weight,) = compat.channel_weights_from_scores([layer])
        assert weight.dtype == torch.float32
        np.testing.assert_allclose(weight.numpy(), expected, rtol=2e-6)


def test_equal_scores_give_uniform_weights(tmp_path):
    path = tmp_path / "equal.json"
    path.write_text(json.dumps([[3.0] * 4, [7.5]]))
    for weights in (compat.get_channel_weight(path), compat.channel_weights_from_scores([[3.0] * 4, [7.5]])):
        torch.testing.assert_close(weights[0], torch.full((4,), 0.25), rtol=0, atol=0)
        torch.testing.assert_close(weights[1], torch.ones(1), rtol=0, atol=0)


def test_channel_weight_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        compat.get_channel_weight(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for text, error, message in [
        ("{not json", ValueError, "not valid JSON"),
        ('{"layer": [1, 2]}', ValueError, "got dict"),
        ("[[1, 2], []]", ValueError, "layer 1 to be a non-empty 1-D"),
        ('[[1, "x"]]', TypeError, "layer 0 to be a 1-D array of numbers"),
        ("[[1, NaN]]", ValueError, "layer 0 holds NaN"),
    ]:
        bad.write_text(text)
        with pytest.raises(error, match=message):
            compat.get_channel_weight(bad)
    bad.write_bytes(b"\x80\x81\xfe PK")
    with pytest.raises(ValueError, match="not valid JSON"):
        compat.get_channel_weight(bad)
    with pytest.raises(TypeError, match="wrap one layer"):
        compat.channel_weights_from_scores(torch.ones(3))


# --------------------------------------------------------------------------- weight penalties


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)


def test_reg_l2sp_by_hand():
    torch.manual_seed(0)
    model = TinyNet()
    source = {name: p.detach() + torch.randn_like(p) for name, p in model.named_parameters()}
    value = compat.reg_l2sp(model, "fc.", source)
    value.backward()
    by_hand = 0.5 * sum(
        ((p.detach().double() - source[n].double()) ** 2).sum()
        for n, p in model.named_parameters()
        if not n.startswith("fc.")
    )
    assert (value.shape, value.dtype) == ((), torch.float32)
    assert abs(value.item() - by_hand.item()) <= 1e-6 * by_hand.item()
    torch.testing.assert_close(model.conv1.weight.grad, model.conv1.weight.detach() - source["conv1.weight"])
    assert model.fc.weight.grad is None
    with pytest.raises(KeyError, match="conv1.bias"):
        compat.reg_l2sp(model, "fc.", {k: v for k, v in source.items() if k != "conv1.bias"})


def test_reg_classifier_by_hand():
    torch.manual_seed(0)
    model = TinyNet().double()
    value = compat.reg_classifier(model, "fc.")
    value.backward()
    by_hand = 0.5 * ((model.fc.weight**2).sum() + (model.fc.bias**2).sum()).item()
    assert (value.shape, value.dtype) == ((), torch.float32)
    assert abs(value.item() - by_hand) <= 1e-6 * by_hand
    torch.testing.assert_close(model.fc.weight.grad, model.fc.weight.detach())
    assert model.conv1.weight.grad is None
    assert compat.reg_classifier(model, "classifier.").item() == 0


# --------------------------------------------------------------------------- the module itself


def test_compat_imports_only_the_public_api():
    tree = ast.parse(Path(compat.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("afa_ext")):
            imported |= {".".join(filter(None, [node.module, alias.name])) for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names if alias.name.startswith("afa_ext")}
    assert imported == {"functional", "nn.attention", "reference"}


def test_importing_compat_does_not_import_triton():
    code = "import sys, afa_ext.compat; assert 'triton' not in sys.modules, 'triton imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
