"""What this installation reports about its backends and build."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch

import afa_ext
from afa_ext import functional
from afa_ext.ops import auto_choice, backends, extension
from afa_ext.ops.backends import BackendUnavailableError, resolve_backend
from loss_cases import HAS_CPU, needs_cpu

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_available_backends_on_this_machine():
    names = afa_ext.available_backends()
    assert names[0] == "reference"
    gpu = torch.cuda.is_available()
    assert ("cuda" in names) <= gpu and ("triton" in names) <= (gpu or backends.triton_interpreted())
    assert names == afa_ext.available_backends()


def test_auto_picks_cpu_when_built():
    picked = resolve_backend("auto", torch.device("cpu"), "test")
    assert picked == ("cpu" if HAS_CPU else "reference")
    assert resolve_backend("auto", torch.device("meta"), "test") == "reference"


@pytest.mark.skipif(not afa_ext.build_info().get("cuda_archs"), reason="afa_ext._C has no CUDA kernels")
def test_availability_follows_the_cuda_device_between_calls(monkeypatch):
    if "triton" not in sys.modules:
        monkeypatch.setitem(sys.modules, "triton", None)  # triton then reads as not installed, and stays unimported
    cuda = torch.device("cuda")
    for present in (True, False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: present)
        assert ("cuda" in afa_ext.available_backends()) == present
        assert (resolve_backend("auto", cuda, "test") == "cuda") == present
        if present:
            assert resolve_backend("cuda", cuda, "test") == "cuda"
        else:
            with pytest.raises(BackendUnavailableError, match="torch sees no CUDA device"):
                resolve_backend("cuda", cuda, "test")
    monkeypatch.undo()
    assert ("cuda" in afa_ext.available_backends()) == torch.cuda.is_available()


def test_the_auto_cuda_pin_is_read_at_each_call(monkeypatch):
    calls = []
    candidates = {"cuda": lambda: calls.append("cuda"), "triton": lambda: calls.append("triton")}
    key = ("test", "pin read at each call")
    monkeypatch.setenv("AFA_EXT_AUTO_CUDA", "triton")
    assert auto_choice.choose_fastest(key, candidates, lambda: None) == "triton"
    monkeypatch.setenv("AFA_EXT_AUTO_CUDA", "cuda")
    assert auto_choice.choose_fastest(key, candidates, lambda: None) == "cuda"
    assert calls == [] and key not in auto_choice._CHOICES
    monkeypatch.delenv("AFA_EXT_AUTO_CUDA")
    assert auto_choice.choose_fastest(key, candidates, lambda: None) in candidates
    assert len(calls) == 2 * (auto_choice.REPEATS + 1)


def test_triton_devices_follow_the_environment_until_the_kernels_load(monkeypatch):
    launch = "afa_ext.ops.triton.launch"
    monkeypatch.delitem(sys.modules, launch, raising=False)
    for interpreted, devices in (("1", ("cpu",)), ("0", ("cuda",))):
        monkeypatch.setenv("TRITON_INTERPRET", interpreted)
        assert backends.backend_devices("triton") == devices
        assert backends.triton_interpreted() == (interpreted == "1")
    monkeypatch.setitem(sys.modules, launch, types.SimpleNamespace(INTERPRETED=True))
    assert backends.backend_devices("triton") == ("cpu",), "loaded kernels keep the mode they were defined in"


def test_a_compiled_auto_loss_reads_the_last_eager_availability(monkeypatch):
    """torch.compile(fullgraph=True) traces a loss with backend="auto" on CPU tensors, and
    the trace does not look availability up again: it takes the last eager answer."""
    generator = torch.Generator().manual_seed(5)
    t, s = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    expected = 0.5 * ((t - s) ** 2).sum()
    torch.testing.assert_close(functional.feature_map_loss(t, s), expected)
    lookups = []
    error = extension.extension_error()
    monkeypatch.setattr(extension, "extension_error", lambda: lookups.append(1) or error)

    def loss(target, source):
        return functional.feature_map_loss(target, source, backend="auto")

    torch.testing.assert_close(torch.compile(loss, fullgraph=True, backend="eager")(t, s), expected)
    assert lookups == []
    functional.feature_map_loss(t, s)
    assert lookups, "an eager call looks availability up"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


@needs_cpu
def test_build_info_names_the_stable_abi_and_the_torch_versions_it_serves():
    info = afa_ext.build_info()
    assert info["abi"] == "stable"
    # Built against some torch at or after the oldest it serves, which is pyproject.toml's
    # floor, and this torch is one of those it serves.
    floor = next(r for r in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"] if r.startswith("torch"))
    assert floor == f"torch>={info['torch_min_version']}"
    assert _version_tuple(info["torch_min_version"]) <= _version_tuple(info["torch_version"])
    assert _version_tuple(info["torch_min_version"]) <= _version_tuple(torch.__version__)
    assert _version_tuple(info["python_limited_api"]) <= sys.version_info[:2]


@pytest.mark.skipif(HAS_CPU, reason="afa_ext._C is built")
def test_build_info_empty_without_extension():
    assert afa_ext.build_info() == {}


@pytest.mark.skipif("cpu" not in afa_ext.available_backends(), reason="afa_ext._C not built")
def test_build_info_names_the_instruction_set_of_the_build():
    from afa_ext._build_config import CPU_ISA

    assert afa_ext.build_info()["cpu_vector_isa"] == CPU_ISA


@pytest.mark.skipif("cpu" not in afa_ext.available_backends(), reason="afa_ext._C not built")
def test_a_cpu_without_the_build_instruction_set_is_refused(monkeypatch):
    from afa_ext.ops import extension as _ops
    from afa_ext._build_config import CPU_ISA

    if CPU_ISA == "default":
        pytest.skip("a default build runs on any x86-64 CPU")
    monkeypatch.setattr(torch.cpu, f"_is_{CPU_ISA}_supported", lambda: False)
    assert _ops._unsupported_cpu_isa() == CPU_ISA
    monkeypatch.undo()
    assert _ops._unsupported_cpu_isa() is None


@pytest.mark.skipif("cpu" not in afa_ext.available_backends(), reason="afa_ext._C not built")
def test_a_torch_older_than_the_stable_abi_of_the_build_is_refused(monkeypatch):
    from afa_ext._build_config import TORCH_MIN_VERSION
    from afa_ext.ops import extension as _ops

    major, minor = TORCH_MIN_VERSION
    assert f"{major}.{minor}" == afa_ext.build_info()["torch_min_version"]
    monkeypatch.setattr(torch, "__version__", f"{major}.{minor - 1}.3+cpu")
    assert _ops._load_refusal() == (
        f"afa_ext._C serves torch {major}.{minor} and later (its stable ABI); this is torch {major}.{minor - 1}.3+cpu"
    )
    monkeypatch.setattr(torch, "__version__", f"{major}.{minor}.0")
    assert _ops._load_refusal() is None


def test_import_without_the_extension_keeps_the_reference_backend():
    """With afa_ext._C unloadable, `import afa_ext` still works: only "reference" is
    available, the losses run on it, and asking for "cpu" says why it cannot."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import sys
        sys.modules["afa_ext._C"] = None  # makes `from . import _C` raise ImportError
        import torch, afa_ext
        assert afa_ext.available_backends() == ["reference"], afa_ext.available_backends()
        t, s = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
        assert torch.isclose(afa_ext.functional.feature_map_loss(t, s), 0.5 * ((t - s) ** 2).sum())
        try:
            afa_ext.functional.feature_map_loss(t, s, backend="cpu")
        except afa_ext.BackendUnavailableError as error:
            assert "did not load" in str(error), error
        else:
            raise AssertionError("backend='cpu' ran without the extension")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@needs_cpu
def test_every_schema_has_a_compiled_cpu_kernel():
    """The compiled library registers a CPU kernel for each op that schemas.py declares,
    and nothing under names it does not declare."""
    from afa_ext.ops.schemas import OP_SCHEMAS

    for name, schema in OP_SCHEMAS.items():
        assert str(getattr(torch.ops.afa_ext, name).default._schema) == f"afa_ext::{name}{schema}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"afa_ext::{name}", "CPU"), name
    registered = {op.split("::")[1] for op in torch._C._dispatch_get_all_op_names() if op.startswith("afa_ext::")}
    assert registered == set(OP_SCHEMAS)


@pytest.mark.parametrize("interpret", ["0", "1"])
@pytest.mark.parametrize("gpu", [False, True])
def test_importing_afa_ext_and_a_cpu_loss_do_not_import_triton(interpret, gpu):
    """Triton loads only when the triton backend is first looked up, also where a GPU is
    seen (faked here) or the interpreter is on; available_backends() then loads it."""
    script = (
        "import sys, torch\n"
        f"torch.cuda.is_available = lambda: {gpu}\n"
        "import afa_ext\n"
        "assert 'triton' not in sys.modules, 'import afa_ext imported triton'\n"
        "t = torch.randn(2, 3, 4, 4)\n"
        "afa_ext.functional.spatial_attentive_loss(t, t + 1, torch.rand(2, 16))\n"
        "assert 'triton' not in sys.modules, 'a CPU loss imported triton'\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET=interpret)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
