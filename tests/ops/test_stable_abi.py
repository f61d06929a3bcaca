"""afa_ext._C uses nothing of torch's C++ API beyond the stable ABI's C shim.

A symbol of at::, c10:: or torch:: that the library needs from libtorch ties it to the one
torch it was built against; the stable ABI's functions are plain C (aoti_torch_*, torch_*).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from afa_ext.ops import extension

pytestmark = [
    pytest.mark.skipif(extension._C is None, reason="afa_ext._C not built"),
    pytest.mark.skipif(shutil.which("nm") is None or shutil.which("c++filt") is None, reason="needs nm and c++filt"),
]

CPP_API = re.compile(r"\b(at|c10|torch)::")


def _undefined_symbols(library: Path) -> list[str]:
    listing = subprocess.run(
        ["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True, check=True
    ).stdout
    names = [line.split()[-1] for line in listing.splitlines() if line.strip()]
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return demangled.stdout.splitlines()


def test_the_extension_needs_no_symbol_of_torchs_cpp_api():
    symbols = _undefined_symbols(Path(extension._C.__file__))
    assert any(name.startswith("aoti_torch_") for name in symbols), "no stable-ABI shim call found: wrong library?"
    assert [name for name in symbols if CPP_API.search(name)] == []


def test_the_check_finds_a_cpp_api_symbol(tmp_path):
    """The check above can fail: a library calling at::empty is caught."""
    source = tmp_path / "uses_aten.cpp"
    source.write_text(
        "namespace at { struct Tensor; Tensor& empty_like_stub(Tensor&); }\n"
        "at::Tensor& call(at::Tensor& t) { return at::empty_like_stub(t); }\n"
    )
    library = tmp_path / "libuses_aten.so"
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    assert [name for name in _undefined_symbols(library) if CPP_API.search(name)] == [
        "at::empty_like_stub(at::Tensor&)"
    ]
