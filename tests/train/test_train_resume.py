"""Checkpoints and --resume of the AFA trainer, on real subprocesses.

A run killed at any moment (SIGKILL, between epoch-end checkpoints) or stopped by SIGTERM /
Ctrl-C (a checkpoint after the current step, exit status 128 + signal) and then continued with
``--resume`` must end bitwise where the same run ends uninterrupted (on the CPU): model.pt
tensor for tensor, result.json's accuracies and metrics.csv but for its wall-clock column.
The ground truth is a separate, uninterrupted process of the same command.

Every run uses the embedded digits data (afa: an AST stage, then an ACT stage whose attention
modules are drawn from the global RNG when stage 2 starts) and one cache folder for the whole
session, so the digits source model is pretrained once.
"""

from __future__ import annotations

import csv
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_subprocess import subprocess_env
import torch

TIMEOUT = 300  # seconds; no run here may take longer, so nothing hangs
POLL = 0.005


# ----------------------------------------------------------------------------- helpers


class Trainer:
    """``python -m afa_ext.train ARGS --out OUT`` in the background, its output in files."""

    def __init__(self, args, out: Path, cache: Path, *, resume: bool = False, tag: str = ""):
        self.out = Path(out)
        self.args = list(args)
        name = self.out.name + (f".{tag}" if tag else "") + (".resume" if resume else "")
        self.stdout_path = self.out.parent / f"{name}.stdout"
        self.stderr_path = self.out.parent / f"{name}.stderr"
        command = [
            sys.executable,
            "-m",
            "afa_ext.train",
            *self.args,
            "--cache-dir",
            str(cache),
            "--device",
            "cpu",
            "--out",
            str(self.out),
        ] + (["--resume"] if resume else [])
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                command, stdout=stdout, stderr=stderr, cwd=self.out.parent, env=subprocess_env(cache)
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def describe(self) -> str:
        return f"{' '.join(self.process.args)}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"the run did not end within {timeout} s:\n{self.describe()}") from None

    def finish(self) -> Trainer:
        """Wait for the run and insist that it ended well."""
        returncode = self.wait()
        assert returncode == 0, f"exit status {returncode}:\n{self.describe()}"
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)


def _signal_at_moments(plan, timeout: float = TIMEOUT) -> None:
    """Watch several runs at once; send each its signal ``delay`` seconds after its moment.

    ``plan``: (trainer, moment(out) -> bool, what the moment is, delay, signal) tuples."""
    pending = {index: None for index in range(len(plan))}  # index -> time to send, once known
    deadline = time.monotonic() + timeout
    while pending:
        now = time.monotonic()
        for index in list(pending):
            trainer, moment, what, delay, signum = plan[index]
            if pending[index] is None and moment(trainer.out):
                pending[index] = now + delay
            if pending[index] is not None and now >= pending[index]:
                trainer.process.send_signal(signum)
                del pending[index]
            elif pending[index] is None and trainer.process.poll() is not None:
                del pending[index]  # it ended before its moment: the test reports its exit status
        if now > deadline:
            raise AssertionError(f"not every moment came within {timeout} s")
        time.sleep(POLL)


def _metric_rows(out: Path):
    with open(out / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def _has_stage2_row(out: Path) -> bool:
    path = out / "metrics.csv"
    if not path.is_file():
        return False
    return any(row["stage"] == "2" for row in _metric_rows(out))


def _checkpoint_position(out: Path):
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    return saved["state"].stage, saved["state"].epoch, saved["state"].step


def _load_model(out: Path):
    return torch.load(out / "model.pt", map_location="cpu", weights_only=True)


def _result(out: Path) -> dict:
    import json

    return json.loads((out / "result.json").read_text())


def _differences(expected: Path, actual: Path):
    """What differs between two finished runs: model.pt tensor for tensor, result.json's
    accuracies, metrics.csv without its seconds column."""
    problems = []
    want, got = _load_model(expected), _load_model(actual)
    if list(want) != list(got):
        problems.append(f"model.pt keys differ: {list(want)} vs {list(got)}")
    for key in want:
        if key in got and not (want[key].dtype == got[key].dtype and torch.equal(want[key], got[key])):
            difference = (
                (want[key].double() - got[key].double()).abs().max().item()
                if want[key].shape == got[key].shape
                else "shape"
            )
            problems.append(f"model.pt[{key}] differs (max |difference| {difference})")
    want_result, got_result = _result(expected), _result(actual)
    for key in ("test_acc", "best_val_acc", "stages", "epochs_run"):
        if want_result[key] != got_result[key]:
            problems.append(f"result.json {key}: {want_result[key]!r} uninterrupted, {got_result[key]!r} resumed")
    strip = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    want_rows, got_rows = strip(_metric_rows(expected)), strip(_metric_rows(actual))
    if want_rows != got_rows:
        problems.append(
            "metrics.csv (but seconds) differs:\n  uninterrupted "
            + "\n  uninterrupted ".join(map(str, want_rows))
            + "\n  resumed "
            + "\n  resumed ".join(map(str, got_rows))
        )
    return problems


@pytest.fixture
def launched():
    """Every Trainer a test starts; whatever still runs at its end is killed."""
    trainers = []
    yield trainers
    for trainer in trainers:
        trainer.stop()


# ----------------------------------------------------------------------------- SIGKILL

# 5 classes x 10 shots = 50 training images in global batches of 5: 10 steps an epoch (so a
# signal lands inside an epoch), 5 epochs per stage (so a signal sent in stage 2 still finds the
# run training), 2 stages. One command for every run of this file, so one uninterrupted run is
# the ground truth of all of them.
EPOCHS = 5
RUN_ARGS = [
    "--data",
    "digits",
    "--reg",
    "afa",
    "--epochs",
    str(EPOCHS),
    "--batch-size",
    "5",
    "--shots",
    "10",
    "--seed",
    "1",
]
STEPS_PER_EPOCH = 10


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, train_cache):
    """Run A, started at once in the background; ``.finish()`` when its files are needed."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    trainer = Trainer(RUN_ARGS, folder / "A", train_cache)
    try:
        yield trainer
    finally:
        trainer.stop()


def _first_checkpoint(out: Path) -> bool:
    return (out / "checkpoint.pt").is_file()


def _stage2_started(out: Path) -> bool:
    log = out.parent / f"{out.name}.stdout"
    return log.is_file() and "stage 2: starting" in log.read_text()


@pytest.fixture(scope="module")
def sigkilled_runs(tmp_path_factory, train_cache, uninterrupted_run):
    """Two copies of run A's command, SIGKILLed at two moments, each resumed to its end.

    ``stage1``: 0-0.3 s after the first checkpoint (stage 1, AST); ``stage2``: 0-0.2 s after the
    first stage-2 row of metrics.csv (ACT has started, or its checkpoint is being written).
    Both run beside A."""
    folder = tmp_path_factory.mktemp("sigkill")
    moments = {
        "stage1": (_first_checkpoint, "the first checkpoint", 0.3),
        "stage2": (_has_stage2_row, "a stage-2 row in metrics.csv", 0.2),
    }
    trainers, resumed, report = {}, {}, {}
    try:
        for name in moments:
            trainers[name] = Trainer(RUN_ARGS, folder / f"B_{name}", train_cache)
        _signal_at_moments(
            [
                (trainers[name], ready, what, random.uniform(0.0, longest), signal.SIGKILL)
                for name, (ready, what, longest) in moments.items()
            ]
        )
        for name, trainer in trainers.items():
            returncode = trainer.wait()
            killed_at = _checkpoint_position(trainer.out) if (trainer.out / "checkpoint.pt").is_file() else None
            report[name] = {
                "returncode": returncode,
                "out": trainer.out,
                "finished": (trainer.out / "result.json").is_file(),
                "checkpoint": killed_at,
                "log": trainer.describe(),
            }
            if returncode == -signal.SIGKILL:
                resumed[name] = Trainer(RUN_ARGS, trainer.out, train_cache, resume=True)
        for name, trainer in resumed.items():
            report[name]["resume_returncode"] = trainer.wait()
            report[name]["resume_log"] = trainer.describe()
        yield report
    finally:
        for trainer in [*trainers.values(), *resumed.values()]:
            trainer.stop()


@pytest.mark.parametrize("moment", ["stage1", "stage2"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(moment, sigkilled_runs, uninterrupted_run):
    run = sigkilled_runs[moment]
    assert run["returncode"] == -signal.SIGKILL, (
        f"the run was not killed (exit status {run['returncode']}): it ended before the kill; make it "
        f"longer\n{run['log']}"
    )
    assert not run["finished"], f"the kill came after the run had written result.json\n{run['log']}"
    assert run["checkpoint"] is not None, "SIGKILL after the first checkpoint, yet there is no checkpoint.pt"
    stage, epoch, step = run["checkpoint"]
    # Only epoch ends write a checkpoint when nothing asks the run to stop.
    assert step == 0 and 1 <= epoch <= EPOCHS and stage in (0, 1), run["checkpoint"]
    assert run["resume_returncode"] == 0, run["resume_log"]
    assert "resuming" in run["resume_log"]
    problems = _differences(uninterrupted_run.finish().out, run["out"])
    assert not problems, (
        f"killed at checkpoint (stage index, epoch, step) = {run['checkpoint']}, resumed: " + "\n".join(problems)
    )


def test_a_finished_run_resumed_trains_no_more(tmp_path, train_cache, uninterrupted_run, launched):
    original = uninterrupted_run.finish().out
    again = tmp_path / "A_again"
    shutil.copytree(original, again)
    before = {path.name: path.read_bytes() for path in again.iterdir()}
    trainer = Trainer(RUN_ARGS, again, train_cache, resume=True)
    launched.append(trainer)
    trainer.finish()
    trained = [
        line
        for line in trainer.stdout.splitlines()
        if re.match(r"stage \d/\d \(\w+\) epoch", line) or line.startswith("stage 2: starting")
    ]
    assert not trained, trainer.stdout
    assert "resuming" in trainer.stdout, trainer.stdout
    for name in ("metrics.csv", "config.toml"):
        assert (again / name).read_bytes() == before[name], f"{name} changed though nothing was left to train"
    assert sorted(path.name for path in again.iterdir()) == sorted(before)
    want, got = _load_model(original), _load_model(again)
    assert list(want) == list(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    for key in ("test_acc", "best_val_acc", "stages", "epochs_run", "world_size"):
        assert _result(again)[key] == _result(original)[key], key


@pytest.mark.parametrize(
    "flag, value, setting",
    [
        ("--alpha", "0.5", "alpha"),
        ("--seed", "2", "seed"),
        ("--batch-size", "20", "batch_size"),
    ],
)
def test_resume_with_another_setting_is_refused_naming_it(
    flag, value, setting, tmp_path, train_cache, uninterrupted_run, capsys
):
    from afa_ext.train.cli import main

    folder = tmp_path / "A_copy"
    shutil.copytree(uninterrupted_run.finish().out, folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    args = list(RUN_ARGS)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    status = main(args + ["--cache-dir", str(train_cache), "--device", "cpu", "--out", str(folder), "--resume"])
    error = capsys.readouterr().err
    assert status == 2, error
    assert "--resume" in error and f"{setting}: saved " in error and f"given {value}" in error, error
    # Only the setting that differs is named.
    for other in ("alpha", "seed", "batch_size", "shots", "epochs"):
        if other != setting:
            assert f"{other}:" not in error, error
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


# ----------------------------------------------------------------------------- SIGTERM / Ctrl-C


@pytest.fixture(scope="module")
def signalled_runs(tmp_path_factory, train_cache, uninterrupted_run):
    """Two copies of run A's command stopped by a signal, then resumed.

    SIGTERM: 0-0.1 s after the first checkpoint (stage 1, AST, epoch 2: the stop comes inside an
    epoch, before stage 2 draws its attention modules); SIGINT: 0-0.1 s after the run logs
    that stage 2 (ACT) starts (the stop comes inside its first epoch)."""
    folder = tmp_path_factory.mktemp("signals")
    plan = {
        signal.SIGTERM: (_first_checkpoint, "the first checkpoint"),
        signal.SIGINT: (_stage2_started, "the start of stage 2"),
    }
    trainers, resumed, report = {}, {}, {}
    try:
        for signum in plan:
            trainers[signum] = Trainer(RUN_ARGS, folder / f"S_{signum.name}", train_cache)
        _signal_at_moments(
            [
                (trainers[signum], ready, what, random.uniform(0.0, 0.1), signum)
                for signum, (ready, what) in plan.items()
            ]
        )
        for signum, trainer in trainers.items():
            returncode = trainer.wait()
            stopped_at = _checkpoint_position(trainer.out) if (trainer.out / "checkpoint.pt").is_file() else None
            report[signum] = {
                "returncode": returncode,
                "out": trainer.out,
                "stderr": trainer.stderr,
                "finished": (trainer.out / "result.json").is_file(),
                "checkpoint": stopped_at,
                "log": trainer.describe(),
            }
            if returncode == 128 + signum:
                resumed[signum] = Trainer(RUN_ARGS, trainer.out, train_cache, resume=True)
        for signum, trainer in resumed.items():
            report[signum]["resume_returncode"] = trainer.wait()
            report[signum]["resume_log"] = trainer.describe()
        report["reference"] = uninterrupted_run.finish().out
        yield report
    finally:
        for trainer in [*trainers.values(), *resumed.values()]:
            trainer.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_with_a_checkpoint_and_resume_equals_the_uninterrupted_run(signum, signalled_runs):
    run = signalled_runs[signum]
    assert run["returncode"] == 128 + signum, (
        f"expected exit status {128 + signum} after {signum.name}, got {run['returncode']}\n{run['log']}"
    )
    lines = [line for line in run["stderr"].splitlines() if "--resume" in line]
    assert lines and signum.name in lines[-1], f"no line naming --resume and {signum.name}:\n{run['stderr']}"
    assert not run["finished"], run["log"]
    assert run["checkpoint"] is not None, run["log"]
    stage, epoch, step = run["checkpoint"]
    assert stage in (0, 1) and 0 <= epoch <= EPOCHS and 0 <= step < STEPS_PER_EPOCH, run["checkpoint"]
    assert run["resume_returncode"] == 0, run["resume_log"]
    problems = _differences(signalled_runs["reference"], run["out"])
    assert not problems, (
        f"stopped by {signum.name} at checkpoint (stage index, epoch, step) = "
        f"{run['checkpoint']}, resumed:\n" + "\n".join(problems)
    )


# ----------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("failing, error", [("replace", OSError), ("replace", KeyboardInterrupt), ("fsync", OSError)])
def test_checkpoint_save_is_all_or_nothing(failing, error, tmp_path, monkeypatch):
    from afa_ext.train import checkpoint

    path = tmp_path / "checkpoint.pt"
    old = {"step": torch.tensor(1), "weights": torch.arange(6.0)}
    checkpoint.save(path, old)
    old_bytes = path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]

    calls = []

    def crash(*args, **kwargs):
        calls.append(args)
        raise error("simulated crash")

    monkeypatch.setattr(os, failing, crash)
    with pytest.raises(error):
        checkpoint.save(path, {"step": torch.tensor(2), "weights": -torch.arange(6.0)})
    monkeypatch.undo()
    assert calls, f"os.{failing} was never called: the simulated crash did not happen"
    assert path.read_bytes() == old_bytes
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["weights"], old["weights"]) and int(loaded["step"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"], "a temporary file was left behind"

    checkpoint.save(path, {"step": torch.tensor(3), "weights": torch.ones(2)})
    loaded = checkpoint.load(path)
    assert int(loaded["step"]) == 3 and torch.equal(loaded["weights"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
