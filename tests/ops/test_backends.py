"""What this installation reports about its backends and build."""
from __future__ import annotations

import pytest
import torch

import afa_ext
from afa_ext.ops.backends import resolve_backend
from loss_cases import HAS_CPU, needs_cpu


def test_available_backends_on_this_machine():
    names = afa_ext.available_backends()
    assert names[0] == "reference"
    gpu = torch.cuda.is_available()
    assert ("cuda" in names) <= gpu and ("triton" in names) <= (gpu or afa_ext.ops.backends.TRITON_INTERPRETED)
    assert names == afa_ext.available_backends()


def test_auto_picks_cpu_when_built():
    picked = resolve_backend("auto", torch.device("cpu"), "test")
    assert picked == ("cpu" if HAS_CPU else "reference")
    assert resolve_backend("auto", torch.device("meta"), "test") == "reference"


@needs_cpu
def test_build_info_reports_torch_version():
    info = afa_ext.build_info()
    assert isinstance(info, dict) and info
    versions = [str(value) for key, value in info.items() if "torch" in str(key).lower()]
    assert versions, f"no torch version in build_info() {info}"
    major_minor = ".".join(torch.__version__.split(".")[:2])
    assert any(v.startswith(major_minor) for v in versions), f"{versions} vs torch {torch.__version__}"


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
