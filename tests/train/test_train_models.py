"""Tests of afa_ext.train.models: presets, building and weights, layer names, feature hooks."""

import os
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from afa_ext.train.models import (
    ARCH_PRESETS,
    DigitsCNN,
    FeatureHooks,
    LayerError,
    WeightsError,
    available_architectures,
    build_model,
    default_layers,
    feature_shapes,
    head_module_name,
    outermost_sequential_child,
    replace_head,
    resolve_layers,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tiny forwards are many times slower when threads contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digits_model(num_classes=10):
    torch.manual_seed(0)
    return DigitsCNN(num_classes)


def _resnet18_state_dict(num_classes=1000):
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=num_classes).state_dict()


def _save(obj, tmp_path, name="weights.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("arch", sorted(ARCH_PRESETS))
def test_preset_layers_and_head_exist_in_the_built_model(arch):
    in_channels = 1 if arch == "digits_cnn" else 3
    model = build_model(arch, 5, "none", in_channels=in_channels)
    preset = ARCH_PRESETS[arch]
    assert default_layers(arch) == preset.layers
    assert resolve_layers(model, preset.layers) == list(preset.layers)
    head = dict(model.named_modules())[head_module_name(model, arch)]
    assert isinstance(head, nn.Linear) and head.out_features == 5
    if arch == "inception_v3":
        assert model.AuxLogits is None and not model.aux_logits


def test_preset_values():
    assert ARCH_PRESETS["resnet18"].layers == ARCH_PRESETS["resnet34"].layers
    assert ARCH_PRESETS["resnet101"].layers[2] == "layer3.22.conv3"
    assert ARCH_PRESETS["resnet152"].layers[1:3] == ("layer2.7.conv3", "layer3.35.conv3")
    assert (
        ARCH_PRESETS["mobilenet_v2"].alpha_stage1,
        ARCH_PRESETS["mobilenet_v2"].alpha_stage2,
    ) == (0.09, 0.04)
    assert (ARCH_PRESETS["resnet50"].alpha_stage1, ARCH_PRESETS["resnet50"].alpha_stage2) == (
        0.1,
        0.15,
    )
    assert ARCH_PRESETS["inception_v3"].image_size == 299
    assert ARCH_PRESETS["digits_cnn"].image_size == 16
    assert ARCH_PRESETS["resnet50"].image_size == 224


def test_available_architectures_has_presets_and_torchvision_models():
    names = available_architectures()
    assert names == sorted(names)
    assert set(ARCH_PRESETS) <= set(names)
    assert {"efficientnet_b0", "shufflenet_v2_x0_5", "vit_b_16"} <= set(names)


def test_default_layers_without_preset_asks_for_layers():
    with pytest.raises(LayerError, match="--layers"):
        default_layers("efficientnet_b0")


# --------------------------------------------------------------------------- DigitsCNN and hooks


def test_digits_cnn_shapes():
    model = _digits_model(10)
    assert model(torch.randn(3, 1, 16, 16)).shape == (3, 10)
    assert feature_shapes(model, default_layers("digits_cnn"), 16, in_channels=1) == [
        (16, 16, 16),
        (32, 8, 8),
        (64, 4, 4),
    ]


def test_feature_hooks_keep_the_block_outputs_in_the_given_order():
    model = _digits_model().eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        block0 = model.features[0](x)
        block1 = model.features[1](block0)
        block2 = model.features[2](block1)
    names = ["features.2", "features.0", "features.1"]
    with FeatureHooks(model, names) as hooks, torch.no_grad():
        model(x)
        features = hooks.features
    assert len(features) == 3
    for feature, expected in zip(features, [block2, block0, block1]):
        torch.testing.assert_close(feature, expected, rtol=0, atol=0)


def test_feature_hooks_features_carry_gradients():
    model = _digits_model().train()
    with FeatureHooks(model, default_layers("digits_cnn")) as hooks:
        model(torch.randn(4, 1, 16, 16))
        features = hooks.features
        assert all(feature.requires_grad for feature in features)
        sum(feature.square().mean() for feature in features).backward()
    first_conv = model.features[0][0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert model.fc.weight.grad is None  # the head is after the hooked layers


def test_feature_hooks_follow_the_inner_modules_of_a_wrapped_model():
    model = _digits_model().eval()
    hooks = FeatureHooks(model, ["features.1"])
    wrapper = nn.Sequential(model)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        wrapper(x)
        expected = model.features[1](model.features[0](x))
    torch.testing.assert_close(hooks.features[0], expected, rtol=0, atol=0)
    hooks.remove()


def test_feature_hooks_remove_takes_the_hooks_off():
    model = _digits_model()
    hooks = FeatureHooks(model, ["features.0", "fc"])
    assert len(model.features[0]._forward_hooks) == 1 and len(model.fc._forward_hooks) == 1
    model(torch.randn(2, 1, 16, 16))
    hooks.remove()
    assert not model.features[0]._forward_hooks and not model.fc._forward_hooks
    assert not model._forward_pre_hooks
    with pytest.raises(RuntimeError, match="removed"):
        hooks.features
    with FeatureHooks(model, ["features.2"]):
        assert len(model.features[2]._forward_hooks) == 1
    assert not model.features[2]._forward_hooks


class _Branchy(nn.Module):
    """A model whose second layer runs only on request."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x, use_second=True):
        x = self.first(x)
        return self.second(x) if use_second else x


def test_feature_hooks_error_when_a_layer_did_not_run():
    model = _Branchy()
    hooks = FeatureHooks(model, ["first", "second"])
    with pytest.raises(RuntimeError, match="no forward"):
        hooks.features
    model(torch.randn(2, 4))
    assert [f.shape for f in hooks.features] == [(2, 4), (2, 4)]
    model(torch.randn(2, 4), use_second=False)  # the stale output of "second" must not be served
    with pytest.raises(RuntimeError, match="second"):
        hooks.features
    model(torch.randn(2, 4))
    hooks.clear()
    with pytest.raises(RuntimeError, match="first, second"):
        hooks.features
    hooks.remove()
    with FeatureHooks(model, ["unused"]) as unused_hooks:
        model(torch.randn(2, 4))
        with pytest.raises(RuntimeError, match="unused"):
            unused_hooks.features


def test_feature_hooks_reject_unknown_layers():
    with pytest.raises(LayerError, match="features.1"):
        FeatureHooks(_digits_model(), ["features.10"])


# --------------------------------------------------------------------------- layer names


@pytest.fixture(scope="module")
def resnet50():
    return torchvision.models.resnet50()


@pytest.mark.parametrize(
    "typo, closest",
    [
        ("layer1.2.conv4", "layer1.2.conv3"),
        ("layer3.5.conv", "layer3.5.conv3"),
        ("layr4.2.bn2", "layer4.2.bn2"),
    ],
)
def test_resolve_layers_typo_names_the_closest_layers(resnet50, typo, closest):
    with pytest.raises(LayerError) as info:
        resolve_layers(resnet50, ["layer1.0.conv1", typo])
    message = str(info.value)
    assert repr(typo) in message and closest in message


def test_resolve_layers_without_close_match_lists_real_leaf_layers(resnet50):
    with pytest.raises(LayerError) as info:
        resolve_layers(resnet50, ["zzzz"])
    suggested = str(info.value).split("closest: ")[1].split(", ")
    modules = dict(resnet50.named_modules())
    assert suggested and all(name in modules for name in suggested)


def test_resolve_layers_rejects_duplicates_and_empty(resnet50):
    assert resolve_layers(resnet50, ("layer2.3.conv3", "layer1.2.conv3")) == [
        "layer2.3.conv3",
        "layer1.2.conv3",
    ]
    with pytest.raises(LayerError, match="layer1.2.conv3"):
        resolve_layers(resnet50, ["layer1.2.conv3", "layer2.3.conv3", "layer1.2.conv3"])
    with pytest.raises(LayerError, match="at least one"):
        resolve_layers(resnet50, [])
    with pytest.raises(LayerError, match="whole model"):
        resolve_layers(resnet50, [""])


def test_outermost_sequential_child():
    resnet18 = torchvision.models.resnet18()
    assert outermost_sequential_child(resnet18, "layer1.1.conv2") == "layer1.1"
    assert outermost_sequential_child(resnet18, "layer4.1") == "layer4.1"
    assert outermost_sequential_child(resnet18, "layer1") is None
    mobilenet = torchvision.models.mobilenet_v2()
    assert outermost_sequential_child(mobilenet, "features.5.conv.2") == "features.5"
    assert outermost_sequential_child(mobilenet, "classifier.1") == "classifier.1"
    inception = torchvision.models.inception_v3(init_weights=False, aux_logits=False)
    assert outermost_sequential_child(inception, "Mixed_5d") is None
    assert outermost_sequential_child(inception, "Mixed_5d.branch1x1.conv") is None
    digits = _digits_model()
    assert outermost_sequential_child(digits, "features.1") == "features.1"
    assert outermost_sequential_child(digits, "features.1.0") == "features.1"
    with pytest.raises(LayerError, match="layer1.1.conv2"):
        outermost_sequential_child(resnet18, "layer1.1.conv9")


def test_feature_shapes_restores_modes_and_leaves_statistics():
    model = build_model("resnet18", 3, "none").train()
    model.layer2.eval()
    running_mean = model.bn1.running_mean.clone()
    shapes = feature_shapes(model, default_layers("resnet18"), 64)
    assert shapes == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert model.training and model.layer1.training and model.bn1.training
    assert not model.layer2.training and not model.layer2[0].bn1.training
    torch.testing.assert_close(model.bn1.running_mean, running_mean, rtol=0, atol=0)
    assert not model._forward_pre_hooks and not model.layer1[1].conv2._forward_hooks


# --------------------------------------------------------------------------- heads


@pytest.mark.parametrize(
    "arch, head",
    [
        ("resnet18", "fc"),
        ("mobilenet_v2", "classifier.1"),
        ("digits_cnn", "fc"),
        ("efficientnet_b0", "classifier.1"),
        ("shufflenet_v2_x0_5", "fc"),
    ],
)
def test_head_module_name_and_replace_head(arch, head):
    in_channels = 1 if arch == "digits_cnn" else 3
    model = build_model(arch, 4, "none", in_channels=in_channels).eval()
    assert head_module_name(model, arch) == head
    assert head_module_name(model) == head  # the last nn.Linear
    old = model.get_submodule(head)
    replace_head(model, head, 9)
    new = model.get_submodule(head)
    assert isinstance(new, nn.Linear) and new is not old
    assert (new.in_features, new.out_features) == (old.in_features, 9) and new.bias is not None
    side = 16 if arch == "digits_cnn" else 32
    with torch.no_grad():
        assert model(torch.randn(2, in_channels, side, side)).shape == (2, 9)


def test_head_module_name_without_linear_head():
    model = build_model("squeezenet1_0", 4, "none")
    with pytest.raises(LayerError, match="nn.Linear"):
        head_module_name(model, "squeezenet1_0")
    with pytest.raises(LayerError, match="nn.Linear"):
        replace_head(model, "classifier.1", 3)


# --------------------------------------------------------------------------- build_model


def test_build_model_none_is_seeded_and_sized():
    torch.manual_seed(3)
    first = build_model("resnet18", 7, "none")
    torch.manual_seed(3)
    second = build_model("resnet18", 7, "none")
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert first.fc.out_features == 7


def _assert_backbone_loaded(model, saved, head="fc"):
    loaded = model.state_dict()
    backbone = [key for key in saved if not key.startswith(f"{head}.")]
    assert backbone
    for key in backbone:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {"state_dict": sd},
        lambda sd: {f"module.{key}": value for key, value in sd.items()},
    ],
    ids=["plain", "model-key", "state_dict-key", "ddp-prefix"],
)
def test_build_model_from_file(tmp_path, wrap):
    saved = _resnet18_state_dict(1000)
    model = build_model("resnet18", 7, _save(wrap(saved), tmp_path))
    _assert_backbone_loaded(model, saved)
    assert isinstance(model.fc, nn.Linear) and (model.fc.in_features, model.fc.out_features) == (
        512,
        7,
    )


def test_build_model_from_file_with_any_source_head(tmp_path):
    saved = _resnet18_state_dict(10)
    model = build_model("resnet18", 3, _save(saved, tmp_path), source_classes=50)
    _assert_backbone_loaded(model, saved)
    assert model.fc.out_features == 3


def test_build_model_from_file_of_a_non_preset_architecture(tmp_path):
    torch.manual_seed(0)
    saved = torchvision.models.shufflenet_v2_x0_5(num_classes=20).state_dict()
    model = build_model("shufflenet_v2_x0_5", 6, _save(saved, tmp_path))
    _assert_backbone_loaded(model, saved)
    assert model.fc.out_features == 6


def test_build_model_digits_from_file(tmp_path):
    saved = _digits_model(10).state_dict()
    model = build_model("digits_cnn", 4, _save(saved, tmp_path), in_channels=1)
    _assert_backbone_loaded(model, saved)
    assert isinstance(model, DigitsCNN) and model.fc.out_features == 4
    with pytest.raises(WeightsError, match="PATH"):
        build_model("digits_cnn", 4, "imagenet", in_channels=1)


def test_build_model_inception_from_file_drops_aux_logits(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.inception_v3(num_classes=12, aux_logits=True, init_weights=False)
    saved = source.state_dict()
    model = build_model("inception_v3", 5, _save(saved, tmp_path))
    _assert_backbone_loaded(model, {k: v for k, v in saved.items() if not k.startswith("AuxLogits.")})
    assert model.AuxLogits is None and not model.aux_logits  # train-mode forward gives one tensor
    assert model.transform_input  # as torchvision's pretrained inception_v3
    assert model.fc.out_features == 5


@pytest.mark.parametrize(
    "source_arch, target_arch, label",
    [("resnet34", "resnet18", "96 unexpected keys"), ("resnet18", "resnet34", "96 missing keys")],
)
def test_build_model_rejects_a_file_of_another_architecture(tmp_path, source_arch, target_arch, label):
    saved = torchvision.models.get_model(source_arch).state_dict()
    with pytest.raises(WeightsError) as info:
        build_model(target_arch, 7, _save(saved, tmp_path))
    message = str(info.value)
    assert label in message and "layer1.2.conv1.weight" in message and "(91 more)" in message
    assert "shape mismatches" not in message and repr(target_arch) in message


def test_build_model_names_shape_mismatches(tmp_path):
    saved = _resnet18_state_dict()
    saved["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(
        WeightsError,
        match=r"1 shape mismatches \(conv1.weight: model \(64, 3, 7, 7\) vs file \(64, 3, 5, 5\)\)",
    ):
        build_model("resnet18", 7, _save(saved, tmp_path))


def test_build_model_bad_files(tmp_path):
    missing = str(tmp_path / "nowhere.pt")
    with pytest.raises(WeightsError, match="nowhere.pt"):
        build_model("resnet18", 7, missing)
    with pytest.raises(WeightsError, match="expected a state_dict"):
        build_model("resnet18", 7, _save({"epoch": 3, "lr": 0.1}, tmp_path))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="garbage.pt"):
        build_model("resnet18", 7, str(garbage))


def test_build_model_unknown_architecture_suggests_names():
    with pytest.raises(LayerError) as info:
        build_model("resnet5", 7, "none")
    assert "resnet50" in str(info.value) and "'resnet5'" in str(info.value)


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="in_channels=1"):
        build_model("resnet18", 7, "none", in_channels=1)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18", 0, "none")


def _assert_helpful_imagenet_error(message):
    assert "resnet18" in message and "could not be downloaded" in message
    assert "--weights PATH" in message and "torch.save(model.state_dict(), PATH)" in message


def test_build_model_imagenet_without_network_raises_weights_error():
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if os.path.exists(cached):
        pytest.skip(f"the ImageNet weights are cached at {cached}")
    with pytest.raises(WeightsError) as info:
        build_model("resnet18", 7, "imagenet")
    _assert_helpful_imagenet_error(str(info.value))


def test_build_model_imagenet_download_failure_is_a_weights_error(monkeypatch):
    def fail_download(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fail_download)
    with pytest.raises(WeightsError) as info:
        build_model("resnet18", 7, "imagenet")
    _assert_helpful_imagenet_error(str(info.value))
    assert "no network" in str(info.value)
