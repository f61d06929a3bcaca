"""afa-train / ``python -m afa_ext.train``: the folder guard, bad input reported as one line
(exit 2) before anything is written, --config files and their precedence, and an
image-folder run end to end.

Most cases call ``afa_ext.train.cli.main`` in-process (it returns the exit status); the
folder guard and the end-to-end run go through a real ``python -m afa_ext.train``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_subprocess import REPO, subprocess_env
import torch
import torchvision
from PIL import Image

from afa_ext.train import cli
from afa_ext.train.config import from_dict, load_toml
from afa_ext.train.data import load_data

TINY = ["--data", "digits", "--epochs", "1", "--batch-size", "10", "--shots", "4", "--device", "cpu"]
CLASSES = ("cat", "dog", "owl")


def call_main(argv, capsys):
    """cli.main in-process: (exit status, stdout, stderr); argparse's errors exit."""
    try:
        code = cli.main([str(arg) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_module(argv, cache_dir, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "afa_ext.train", *map(str, argv)],
        cwd=REPO,
        env=subprocess_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_png(path, seed, size=24):
    pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(path)


def make_folder(root, splits=(("train", 6), ("test", 2)), classes=CLASSES):
    for s, (split, count) in enumerate(splits):
        for c, name in enumerate(classes):
            for i in range(count):
                write_png(root / split / name / f"{i}.png", seed=1000 * s + 100 * c + i)
    return root


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory) -> Path:
    """A random-init torchvision resnet18 state_dict saved with torch.save."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def snapshot(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_one_line_error(code, err, out_dir):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("afa-train: error: ")
    assert "Traceback" not in err
    assert not Path(out_dir).exists()
    return lines[0]


# ----------------------------------------------------------------------------- 1. the folder guard


def test_an_existing_out_folder_is_refused_without_resume_and_left_untouched(tmp_path, cache_dir):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me\n")
    (out / "sub" / "model.pt").write_bytes(b"\x00\x01not a model")
    os.utime(out / "notes.txt", ns=(1_000_000_000, 1_000_000_000))
    before = snapshot(out)

    completed = run_module([*TINY, "--reg", "fea_map", "--out", out], cache_dir)
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("afa-train: error: ")
    assert "--resume" in lines[0] and str(out) in lines[0]
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"]


# ----------------------------------------------------------------------------- 2. bad input


def _bad_input(name, tmp_path, weights):
    """(extra argv, text the message must hold) of one kind of bad input."""
    if name == "negative-alpha":
        return ["--alpha", "-0.5"], ["--alpha", "-0.5"]
    if name == "missing-data":
        return ["--data", tmp_path / "nowhere", "--arch", "resnet18", "--weights", "none", "--image-size", "32"], [
            str(tmp_path / "nowhere")
        ]
    if name == "no-train-split":
        make_folder(tmp_path / "data", splits=(("test", 2),))
        return ["--data", tmp_path / "data", "--arch", "resnet18", "--weights", "none", "--image-size", "32"], [
            str(tmp_path / "data" / "train")
        ]
    if name == "empty-class":
        make_folder(tmp_path / "data", splits=(("train", 3),), classes=("cat", "dog"))
        (tmp_path / "data" / "train" / "owl").mkdir()
        return ["--data", tmp_path / "data", "--arch", "resnet18", "--weights", "none", "--image-size", "32"], [
            str(tmp_path / "data" / "train" / "owl")
        ]
    if name == "unreadable-image":
        make_folder(tmp_path / "data", splits=(("train", 3),))
        (tmp_path / "data" / "train" / "dog" / "broken.png").write_bytes(b"this is not a png")
        return ["--data", tmp_path / "data", "--arch", "resnet18", "--weights", "none", "--image-size", "32"], [
            "broken.png"
        ]
    if name == "unknown-arch":
        return ["--arch", "resnet181"], ["resnet181"]
    if name == "unknown-layer":
        return ["--layers", "features.0,features.9"], ["features.9", "features.1"]
    if name == "weights-of-another-arch":
        return ["--weights", weights], [str(weights), "digits_cnn"]
    if name == "config-unknown-key":
        (tmp_path / "settings.toml").write_text('reg = "ast"\nlearning_rate = 0.1\n')
        return ["--config", tmp_path / "settings.toml"], ["learning_rate"]
    if name == "resume-without-run":
        return ["--resume"], ["--resume"]
    if name == "afa-in-one-stage":
        return ["--reg", "afa", "--stages", "1"], ["--stages 1", "afa", "--reg ast"]
    # Found while writing these tests: a traceback, or a message of several lines.
    if name == "unreadable-weights-file":
        (tmp_path / "weights.pt").write_bytes(b"garbage, not a torch file")
        return ["--weights", tmp_path / "weights.pt"], [str(tmp_path / "weights.pt")]
    if name == "unreadable-delta-weights":
        (tmp_path / "weights.pt").write_bytes(b"garbage, not a torch file")
        return ["--reg", "delta", "--delta-weights", tmp_path / "weights.pt"], ["--delta-weights"]
    if name == "torchvision-arch-on-gray-digits":
        return ["--arch", "resnet18"], ["resnet18"]
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name",
    [
        "negative-alpha",
        "missing-data",
        "no-train-split",
        "empty-class",
        "unreadable-image",
        "unknown-arch",
        "unknown-layer",
        "weights-of-another-arch",
        "config-unknown-key",
        "resume-without-run",
        "afa-in-one-stage",
        "unreadable-weights-file",
        "unreadable-delta-weights",
        "torchvision-arch-on-gray-digits",
    ],
)
def test_bad_input_is_one_line_exit_2_before_anything_is_written(name, tmp_path, capsys, resnet18_weights):
    extra, expected = _bad_input(name, tmp_path, resnet18_weights)
    out = tmp_path / "out"
    code, _, err = call_main([*TINY, "--out", out, *extra], capsys)
    message = assert_one_line_error(code, err, out)
    for text in expected:
        assert text in message, message
    if name == "unknown-arch":  # a suggestion, besides the name given
        assert "resnet18" in message.replace("resnet181", ""), message


def test_unknown_regulariser_is_an_argparse_error(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = call_main([*TINY, "--reg", "l3sp", "--out", out], capsys)
    assert code == 2
    assert "--reg" in err.strip().splitlines()[-1] and "l3sp" in err
    assert not out.exists()


def test_a_diverging_run_stops_with_one_line_and_keeps_the_checkpoint_before(tmp_path, capsys, cache_dir):
    out = tmp_path / "out"
    code, _, err = call_main(
        [*TINY, "--epochs", "3", "--reg", "fea_map", "--alpha", "1e6", "--lr", "10", "--out", out], capsys
    )
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("afa-train: error: stage 1 (fea_map) epoch ") and "not finite" in lines[0]
    assert "--lr" in lines[0] and "--alpha" in lines[0]
    assert not (out / "result.json").exists()
    epoch = int(lines[0].split(" epoch ")[1].split(":")[0])
    if epoch > 1:  # the epochs before the divergent one were checkpointed with finite weights
        state = torch.load(out / "checkpoint.pt", weights_only=False)
        assert state["state"].epoch == epoch - 1
        assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())
        assert "the checkpoint of the epoch before is kept" in lines[0]
    else:
        assert not (out / "checkpoint.pt").exists() and "no checkpoint had been written" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_reported_as_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [arg if arg != "cpu" else "cuda" for arg in TINY]
    code, _, err = call_main([*argv, "--out", out], capsys)
    message = assert_one_line_error(code, err, out)
    assert "--device" in message


@pytest.mark.parametrize(
    "line, flag",
    [
        ("arch = 5", "--arch"),
        ('channels_last = "false"', "--channels-last"),
        ('layers = "features.1"', "--layers"),
        ("delta_weights = 3", "--delta-weights"),
    ],
)
def test_config_file_values_of_the_wrong_type_are_refused(line, flag, tmp_path, capsys):
    (tmp_path / "settings.toml").write_text(f'reg = "fea_map"\n{line}\n')
    out = tmp_path / "out"
    code, _, err = call_main([*TINY, "--config", tmp_path / "settings.toml", "--out", out], capsys)
    message = assert_one_line_error(code, err, out)
    assert flag in message


# ----------------------------------------------------------------------------- 3. --config


def test_config_file_settings_apply_and_flags_override_them(tmp_path, capsys, cache_dir):
    settings = tmp_path / "settings.toml"
    settings.write_text(
        "\n".join(
            [
                'data = "digits"',
                'reg = "fea_map"',
                "alpha = 0.02",
                "beta = 0.03",
                "shots = 4",
                "epochs = 1",
                "batch_size = 10",
                "seed = 2",
                'device = "cpu"',
                'layers = ["features.1", "features.2"]',
                f"cache_dir = {json.dumps(cache_dir)}",
                "lr = 0.005",
            ]
        )
        + "\n"
    )
    out = tmp_path / "out"
    code, _, err = call_main(["--config", settings, "--alpha", "0.04", "--seed", "1", "--out", out], capsys)
    assert code == 0, err

    written = from_dict(load_toml(str(out / "config.toml")), "config.toml")
    assert (written.reg, written.beta, written.shots, written.epochs, written.batch_size) == ("fea_map", 0.03, 4, 1, 10)
    assert written.layers == ["features.1", "features.2"] and written.lr == 0.005 and written.cache_dir == cache_dir
    assert written.alpha == 0.04 and written.seed == 1  # the flags won
    assert written.out == str(out) and written.arch == "digits_cnn"

    result = json.loads((out / "result.json").read_text())
    assert result["seed"] == 1 and result["layers"] == ["features.1", "features.2"]
    assert result["stages"] == [dict(result["stages"][0], reg="fea_map", lr=0.005, alpha=0.04)]
    header, row = (out / "metrics.csv").read_text().splitlines()[:2]
    values = dict(zip(header.split(","), row.split(",")))
    assert float(values["lr"]) == pytest.approx(0.005)
    assert float(values["total"]) == pytest.approx(
        float(values["ce"]) + 0.04 * float(values["feature"]) + 0.03 * float(values["head_l2"]), rel=1e-5
    )


# ----------------------------------------------------------------------------- 4. an image folder, end to end


def test_image_folder_run_end_to_end(tmp_path, resnet18_weights, tmp_path_factory):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "out"
    cache = tmp_path_factory.mktemp("folder_cache")  # DELTA's weights land here, through AFA_EXT_CACHE
    completed = run_module(
        [
            "--data",
            data,
            "--arch",
            "resnet18",
            "--weights",
            resnet18_weights,
            "--reg",
            "delta",
            "--delta-weights",
            "taylor",
            "--epochs",
            "1",
            "--batch-size",
            "6",
            "--image-size",
            "32",
            "--delta-head-epochs",
            "1",
            "--delta-batches",
            "1",
            "--device",
            "cpu",
            "--out",
            out,
        ],
        str(cache),
    )
    assert completed.returncode == 0, completed.stderr

    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "delta" and result["arch"] == "resnet18"
    assert result["layers"] == ["layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"]
    # 6 images per class, 1 of each held out for validation (val_fraction 0.1); test/ has 2 per class.
    assert result["images"] == {"train": 15, "val": 3, "test": 6}
    assert result["test_is_val"] is False
    assert result["stages"][0]["reg"] == "delta" and result["stages"][0]["alpha"] == 0.01
    assert result["epochs_run"] == 1 and result["world_size"] == 1
    assert result["delta_weights"]["method"] == "taylor" and result["delta_weights"]["cached"] is False

    cached = list(Path(cache).glob("delta_weights_taylor_*.pt"))
    assert len(cached) == 1
    weights = torch.load(cached[0], weights_only=True)["weights"]
    assert [tuple(w.shape) for w in weights] == [(64,), (128,), (256,), (512,)]
    for w in weights:
        assert w.sum().item() == pytest.approx(1.0, abs=1e-5) and (w > 0).all()

    # model.pt is a resnet18 state_dict with a 3-class head; its test accuracy is result.json's.
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    model.eval()
    test = load_data(str(data), image_size=32, val_fraction=0.1, seed=0).test
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        correct = int((model(images).argmax(dim=1) == labels).sum())
    assert result["test_acc"] == pytest.approx(correct / 6, abs=1e-12)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "config.toml",
        "curves.png",
        "metrics.csv",
        "model.pt",
        "result.json",
    ]


def test_inception_v3_on_an_image_folder_loads_the_images_at_its_preset_size(tmp_path, capsys):
    """Without --image-size the folder is read at inception_v3's 299 px, the size its AST
    attention modules are built for (it was once read at 224 px, and the first step failed)."""
    data = make_folder(tmp_path / "data", splits=(("train", 3),))
    out = tmp_path / "out"
    code, _, err = call_main(
        [
            "--data",
            data,
            "--arch",
            "inception_v3",
            "--weights",
            "none",
            "--reg",
            "ast",
            "--epochs",
            "1",
            "--batch-size",
            "6",
            "--device",
            "cpu",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    assert from_dict(load_toml(str(out / "config.toml")), "config.toml").image_size == 299
    result = json.loads((out / "result.json").read_text())
    assert result["layers"] == ["Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c"]
    assert result["epochs_run"] == 1 and result["images"]["train"] == 6


class _ClassOfAnotherVersion:
    """Stands for a class the checkpoint of another trainer version pickled and this one lacks."""


def test_resuming_a_checkpoint_of_another_trainer_version_is_refused_in_one_line(
    tmp_path, capsys, cache_dir, monkeypatch
):
    out = tmp_path / "out"
    code, _, err = call_main([*TINY, "--reg", "none", "--out", out], capsys)
    assert code == 0, err
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    torch.save(dict(saved, version=1), out / "checkpoint.pt")
    code, _, err = call_main([*TINY, "--reg", "none", "--out", out, "--resume"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "another version of the trainer" in lines[0], err

    torch.save(dict(saved, state=_ClassOfAnotherVersion()), out / "checkpoint.pt")
    monkeypatch.delattr(sys.modules[__name__], "_ClassOfAnotherVersion")
    code, _, err = call_main([*TINY, "--reg", "none", "--out", out, "--resume"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "another version of the trainer" in lines[0], err
