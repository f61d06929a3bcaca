"""afa-compare end to end, on real processes: a sweep with a diverging grid point, the same
sweep SIGKILLed mid-run and resumed, and in two shards followed by --report; each must
end with the uninterrupted sweep's summary.csv, byte for byte. Bad input: one line, exit 2,
nothing written.

The killed sweep runs two jobs (worker processes), the others one, in this process; every
run has one thread (OMP_NUM_THREADS=1), so that all do the same arithmetic. They use the
embedded digits data, a few epochs per run.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_subprocess import REPO, subprocess_env

from afa_ext.train import compare

TIMEOUT = 600
POLL = 0.005
SWEEP = [
    "--data",
    "digits",
    "--arch",
    "digits_cnn",
    "--methods",
    "none,fea_map",
    "--seeds",
    "0",
    "1",
    "--alphas",
    "fea_map=0.001,1e6",
]
TRAINER = ["--", "--epochs", "6", "--batch-size", "10", "--shots", "4", "--lr", "0.02"]
RUN_NAMES = [
    "none-seed0",
    "none-seed1",
    "fea_map-alpha0.001-seed0",
    "fea_map-alpha0.001-seed1",
    "fea_map-alpha1e+06-seed0",
    "fea_map-alpha1e+06-seed1",
]


class Sweep:
    """``python -m afa_ext.train.compare ARGS`` in the background, its output in files."""

    def __init__(self, out: Path, cache: Path, *extra: str, tag: str = "sweep"):
        self.out = out
        self.stdout_path = out.parent / f"{out.name}.{tag}.stdout"
        self.stderr_path = out.parent / f"{out.name}.{tag}.stderr"
        command = [sys.executable, "-m", "afa_ext.train.compare", *SWEEP, "--out", str(out), *extra, *TRAINER]
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=REPO, env=subprocess_env(cache))

    def describe(self) -> str:
        return (
            f"{' '.join(self.process.args)}\n--- stdout\n{self.stdout_path.read_text()[-4000:]}\n--- stderr\n"
            f"{self.stderr_path.read_text()[-4000:]}"
        )

    def finish(self) -> "Sweep":
        try:
            code = self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"the sweep did not end within {TIMEOUT} s:\n{self.describe()}") from None
        assert code == 0, f"exit status {code}:\n{self.describe()}"
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def children(pid: int) -> list:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def command_lines(out: Path, name: str) -> list:
    return [line for line in (out / "runs" / f"{name}.log").read_text().splitlines() if line.startswith("$ ")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_cache):
    """The uninterrupted sweep, started at once; ``.finish()`` it where its files are needed."""
    sweep = Sweep(tmp_path_factory.mktemp("reference") / "sweep", train_cache)
    try:
        yield sweep
    finally:
        sweep.stop()


@pytest.fixture(scope="module")
def killed(tmp_path_factory, train_cache, reference):
    """The sweep, SIGKILLed while a run is between checkpoints and after another finished,
    then resumed with --resume."""
    out = tmp_path_factory.mktemp("killed") / "sweep"
    sweep = Sweep(out, train_cache, "--jobs", "2")
    resumed = None
    try:
        deadline = time.monotonic() + TIMEOUT
        workers = []
        while time.monotonic() < deadline and sweep.process.poll() is None:
            workers = children(sweep.process.pid) or workers
            folders = [out / "runs" / name for name in RUN_NAMES]
            finished = [f for f in folders if (f / "result.json").is_file()]
            midway = [f for f in folders if (f / "checkpoint.pt").is_file() and not (f / "result.json").is_file()]
            if finished and midway:
                break
            time.sleep(POLL)
        sweep.process.send_signal(signal.SIGKILL)
        code = sweep.process.wait()
        time.sleep(1.0)
        survivors = [pid for pid in workers if alive(pid)]
        finished = {
            f.name: (f / "result.json").stat().st_mtime_ns
            for f in (out / "runs" / name for name in RUN_NAMES)
            if (f / "result.json").is_file()
        }
        unfinished = [
            name for name in RUN_NAMES if name not in finished and (out / "runs" / name / "checkpoint.pt").is_file()
        ]
        resumed = Sweep(out, train_cache, "--resume", tag="resume").finish()
        yield {
            "code": code,
            "workers": workers,
            "survivors": survivors,
            "finished": finished,
            "unfinished": unfinished,
            "out": out,
            "resumed": resumed,
        }
    finally:
        sweep.stop()
        if resumed is not None:
            resumed.stop()


def test_a_diverging_grid_point_is_recorded_and_never_selected(reference):
    out = reference.finish().out
    runs = {(r["method"], r["alpha"], r["seed"]): r for r in read_csv(out / "runs.csv")}
    assert len(runs) == 6
    assert runs[("fea_map", "1e+06", "0")]["status"] == "diverged"
    assert runs[("fea_map", "1e+06", "1")]["status"] == "diverged"
    assert runs[("fea_map", "1e+06", "0")]["test_acc"] == ""
    finished = [r for r in runs.values() if r["status"] == "finished"]
    assert len(finished) == 4 and all(0 < float(r["test_acc"]) <= 1 for r in finished)
    assert {r["steps"] for r in finished} == {"12"}  # 6 epochs of 20 images in batches of 10
    summary = {r["method"]: r for r in read_csv(out / "summary.csv")}
    assert summary["fea_map"]["selected_alpha"] == "0.001"
    assert summary["fea_map"]["at_grid_edge"] == "true"  # the other end of the grid is the diverged point
    none = runs[("none", "", "0")], runs[("none", "", "1")]
    fea = runs[("fea_map", "0.001", "0")], runs[("fea_map", "0.001", "1")]
    differences = [float(f["test_acc"]) - float(n["test_acc"]) for f, n in zip(fea, none)]
    assert float(summary["fea_map"]["diff_vs_none"]) == pytest.approx(sum(differences) / 2, abs=1e-6)
    selection = {(r["method"], r["alpha"]): r for r in read_csv(out / "selection.csv")}
    assert selection[("fea_map", "1e+06")]["diverged"] == "2" and selection[("fea_map", "1e+06")]["selected"] == "false"
    markdown = (out / "summary.md").read_text()
    assert "Diverged" in markdown and "fea_map alpha 1e+06 seed 0" in markdown
    assert (out / "comparison.png").is_file() and (out / "runs" / "none-seed0" / "curves.png").is_file()
    assert "not finite" in (out / "runs" / "fea_map-alpha1e+06-seed0.outcome.json").read_text()


def test_a_killed_sweep_resumed_reruns_no_finished_run_and_ends_with_the_same_summary(killed, reference):
    assert killed["code"] == -signal.SIGKILL
    assert killed["workers"], "the sweep's worker processes were never seen"
    assert not killed["survivors"], f"workers outlived the SIGKILLed sweep: {killed['survivors']}"
    assert killed["finished"] and killed["unfinished"], killed
    out = killed["out"]
    for name, mtime in killed["finished"].items():
        assert (out / "runs" / name / "result.json").stat().st_mtime_ns == mtime, name
        assert len(command_lines(out, name)) == 1, name
    for name in killed["unfinished"]:
        lines = command_lines(out, name)
        assert len(lines) == 2 and lines[1].endswith("--resume"), lines
        assert "resuming" in (out / "runs" / f"{name}.log").read_text()
    assert (out / "summary.csv").read_bytes() == (reference.finish().out / "summary.csv").read_bytes()


def test_two_shards_then_report_give_the_summary_of_one_sweep(tmp_path, train_cache, reference):
    out = tmp_path / "sweep"
    first = Sweep(out, train_cache, "--shard", "1/2", tag="shard1").finish()
    assert not (out / "summary.csv").exists()
    assert sorted(p.name for p in (out / "runs").iterdir() if p.is_dir()) == sorted(RUN_NAMES[0::2])
    Sweep(out, train_cache, "--shard", "2/2", tag="shard2").finish()
    del first
    report = subprocess.run(
        [sys.executable, "-m", "afa_ext.train.compare", "--report", "--out", str(out)],
        cwd=REPO,
        env=subprocess_env(train_cache),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert report.returncode == 0, report.stderr
    assert (out / "summary.csv").read_bytes() == (reference.finish().out / "summary.csv").read_bytes()


def test_report_names_what_is_missing(tmp_path, train_cache, reference, capsys):
    out = tmp_path / "partial"
    reference.finish()
    (out / "runs").mkdir(parents=True)
    (out / "sweep.json").write_bytes((reference.out / "sweep.json").read_bytes())
    for name in RUN_NAMES[:2]:
        os.symlink(reference.out / "runs" / name, out / "runs" / name)
    assert compare.main(["--report", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "4 of 6 runs have not finished" in captured.err
    summary = {r["method"]: r for r in read_csv(out / "summary.csv")}
    assert summary["none"]["n_seeds"] == "2" and summary["fea_map"]["n_seeds"] == "0"
    assert "no finished grid point" in (out / "summary.md").read_text()


# ----------------------------------------------------------------------------- bad input


BASE = ["--data", "digits", "--arch", "digits_cnn", "--seeds", "0", "1"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--methods", "none,l3sp"], ["l3sp"]),
        (["--methods", "none,afa:2"], ["afa:2"]),
        (["--methods", "none,fea_map", "--alphas", "none=0.1"], ["none", "no grid"]),
        (["--methods", "fea_map", "--alphas", "fea_map=0.01,-0.1"], ["-0.1"]),
        (["--methods", "fea_map", "--alphas", "fea_map=0.01,abc"], ["abc"]),
        (["--methods", "fea_map", "--alphas", "delta=0.01"], ["delta", "--methods"]),
        (["--methods", "none,fea_map", "--baseline", "l2sp"], ["--baseline", "l2sp"]),
        (["--methods", "none", "--shard", "3/2"], ["--shard", "3/2"]),
        (["--methods", "none", "--", "--epochs", "0"], ["--epochs", "0"]),
        (["--methods", "none", "--", "--no-such-flag"], ["--no-such-flag"]),
        (["--methods", "fea_map", "--", "--alpha", "0.1"], ["--alpha", "--alphas"]),
        (["--methods", "none", "--", "--shots", "500"], ["shots"]),
    ],
    ids=[
        "unknown-method",
        "afa-twice-two-stages",
        "grid-without-alpha",
        "negative-alpha",
        "non-numeric-alpha",
        "grid-of-another-method",
        "unknown-baseline",
        "bad-shard",
        "trainer-rejects-epochs",
        "trainer-unknown-flag",
        "trainer-flag-the-sweep-sets",
        "trainer-data-error",
    ],
)
def test_bad_input_is_one_line_exit_2_before_anything_runs(argv, expected, tmp_path, capsys, cache_dir):
    out = tmp_path / "out"
    argv = list(argv)
    index = argv.index("--") if "--" in argv else len(argv)
    code = compare.main(BASE + argv[:index] + ["--out", str(out)] + argv[index:])
    assert_one_line(code, capsys, out, expected)


def assert_one_line(code, capsys, out, expected):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("afa-compare: error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    assert not out.exists()


def test_an_empty_seed_list_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    code = compare.main(["--data", "digits", "--arch", "digits_cnn", "--methods", "none", "--seeds", "--out", str(out)])
    assert_one_line(code, capsys, out, ["--seeds"])


def test_an_existing_sweep_folder_is_refused_without_resume(tmp_path, capsys, reference):
    reference.finish()
    before = {p: p.stat().st_mtime_ns for p in reference.out.rglob("*")}
    code = compare.main(SWEEP + ["--out", str(reference.out)] + TRAINER)
    err = capsys.readouterr().err
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    other = compare.main(SWEEP + ["--seeds", "0", "--out", str(reference.out), "--resume"] + TRAINER)
    err = capsys.readouterr().err
    assert other == 2 and "another sweep" in err and "seeds" in err
    assert {p: p.stat().st_mtime_ns for p in reference.out.rglob("*")} == before


def test_report_without_a_sweep_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = compare.main(["--report", "--out", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("afa-compare: error: --report:") and len(err.strip().splitlines()) == 1


def test_the_demo_is_a_valid_sweep_of_the_six_methods_on_three_point_grids(tmp_path, cache_dir):
    from afa_ext.train import demo

    argv = demo.compare_arguments([0, 1, 2, 3, 4], str(tmp_path / "demo"), 2, False, cache_dir)
    own, trainer = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    plan = compare.plan_from_arguments(compare.build_parser().parse_args(own), trainer, None)
    assert plan.methods == ["none", "none:2", "l2sp", "fea_map", "delta", "afa"]
    assert plan.baselines == ["none", "none:2"] and len(plan.seeds) == 5
    for method, alphas in plan.alphas.items():
        assert len(alphas) == 3 and alphas[-1] / alphas[0] == pytest.approx(100), method
    runs = plan.runs(tmp_path / "demo")
    assert len(runs) == 5 * (1 + 1 + 3 * 4)
    afa = next(r for r in runs if r.method.name == "afa")
    assert afa.stage2_alpha == afa.alpha  # the digits CNN's two AFA alphas are equal
