"""The sdist carries every source the build reads, and builds and installs as users do.

test_sdist_installs_and_computes_the_loss is marked ``packaging`` and deselected from
``make test`` (`make test-packaging` runs it): it compiles the CPU kernels from the
sdist; the file takes about 30 s on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tracked_files(folder: str = ".") -> list[str]:
    listed = subprocess.run(["git", "ls-files", folder], cwd=REPO, check=True, capture_output=True, text=True)
    return listed.stdout.split()


def _build_sdist(tmp: Path) -> Path:
    """The sdist of a copy of the tracked files, as a fresh clone has them: the build
    writes its egg-info and _build_config.py into the tree it builds, not into this one."""
    tree = tmp / "tree"
    for path in _tracked_files():
        if (REPO / path).is_file():
            (tree / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / path, tree / path)
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp / "dist"), str(tree)],
        check=True,
        capture_output=True,
        text=True,
    )
    (sdist,) = (tmp / "dist").glob("afa_ext-*.tar.gz")
    return sdist


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    pytest.importorskip("build")
    return _build_sdist(tmp_path_factory.mktemp("sdist"))


def test_sdist_carries_every_source_and_no_build_output(sdist):
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    root = names[0].split("/")[0]
    inside = {name[len(root) + 1 :] for name in names if name.startswith(root + "/")}
    sources = _tracked_files("csrc")
    assert any(path.endswith(".h") for path in sources) and any(path.endswith(".cuh") for path in sources)
    missing = [path for path in sources + ["setup.py", "pyproject.toml", "README.md"] if path not in inside]
    assert not missing, f"the sdist lacks {missing}"
    built = [name for name in inside if name.endswith(".so") or name.endswith("_build_config.py")]
    assert not built, f"the sdist carries build outputs: {built}"


SMOKE = textwrap.dedent(
    """
    import sys
    import torch
    import afa_ext
    from afa_ext import functional, reference
    from afa_ext.ops.extension import extension_error

    assert afa_ext.__file__.startswith(sys.prefix), afa_ext.__file__
    assert "cpu" in afa_ext.available_backends(), extension_error()
    torch.manual_seed(0)
    target = torch.randn(3, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    source = torch.randn(3, 5, 6, 7, dtype=torch.float64)
    attention = torch.softmax(torch.randn(3, 5, dtype=torch.float64), dim=1)
    loss = functional.channel_attentive_loss(target, source, attention, backend="cpu")
    (grad,) = torch.autograd.grad(loss, target)
    # The float64 ground truth by hand: (0.5 / B) * C * sum over b, c of g[b, c] times the
    # squared distance over the positions, as reference.channel_attentive_loss documents.
    batch, channels = target.shape[:2]
    diff = (target - source).detach()
    expected = 0.5 / batch * channels * (attention * (diff ** 2).sum(dim=(2, 3))).sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, reference.channel_attentive_loss(target, source, attention))
    torch.testing.assert_close(grad, channels / batch * attention[:, :, None, None] * diff, rtol=1e-12, atol=0)
    print("smoke ok", afa_ext.build_info())
    """
)


@pytest.mark.packaging
def test_sdist_installs_and_computes_the_loss(sdist, tmp_path):
    """pip builds the sdist in a fresh virtual environment and the installed package
    computes a loss with its compiled kernels. The fresh environment sees this one's
    torch, setuptools and pip through a .pth file instead of a second multi-GB torch
    install; afa_ext itself is installed into it (--ignore-installed: this environment's
    editable afa_ext is neither used nor touched)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "outer_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = dict(os.environ, AFA_EXT_CUDA="0")
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-build-isolation",
            "--no-deps",
            "--ignore-installed",
            "--no-index",
            str(sdist),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    smoke = subprocess.run([str(python), "-c", SMOKE], capture_output=True, text=True, cwd=tmp_path)
    assert smoke.returncode == 0, smoke.stderr
    assert "smoke ok" in smoke.stdout
