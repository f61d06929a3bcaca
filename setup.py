"""Build of afa_ext and its compiled extension afa_ext._C.

The C++ CPU kernels are always built. The CUDA sources under csrc/cuda/ are compiled
whenever nvcc and a CUDA build of torch are installed, whether or not a GPU is present.

Switches (environment variables):
  AFA_EXT_CUDA=auto|0|1    build the CUDA kernels: when possible (default), never, or
                           always (an error if nvcc or a CUDA torch is missing)
  TORCH_CUDA_ARCH_LIST     CUDA architectures, default "8.0;9.0" (A100, H100/H200)
  MAX_JOBS                 parallel compile jobs for ninja
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
DEFAULT_CUDA_ARCHS = "8.0;9.0"
# Headers that torch's CUDA headers include but a bare CUDA toolkit may lack.
MATH_LIBRARY_HEADERS = ("cublas_v2.h", "cusparse.h")


def relative_sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(path, ROOT) for path in glob.glob(str(CSRC / pattern), recursive=True))


def cuda_build_wanted(cuda_sources: list[str]) -> bool:
    """Whether to compile the CUDA sources, from AFA_EXT_CUDA and what is installed."""
    switch = os.environ.get("AFA_EXT_CUDA", "auto").strip().lower()
    if switch not in ("auto", "0", "1"):
        raise SystemExit(f"AFA_EXT_CUDA must be auto, 0 or 1, got {switch!r}")
    if switch == "0":
        return False
    nvcc = cpp_extension.CUDA_HOME and Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists()
    missing = []
    if not cuda_sources:
        missing.append("CUDA sources under csrc/cuda/")
    if not nvcc:
        missing.append("nvcc (set CUDA_HOME to the CUDA toolkit)")
    if torch.version.cuda is None:
        missing.append(f"a CUDA build of torch (this is {torch.__version__})")
    if switch == "1" and missing:
        raise SystemExit("AFA_EXT_CUDA=1 but the build lacks: " + "; ".join(missing))
    return not missing


def math_library_include_dirs() -> list[str]:
    """Include dirs of the pip ``nvidia`` packages that hold cublas_v2.h and cusparse.h,
    when the CUDA toolkit's own include dir lacks them."""
    toolkit_include = Path(cpp_extension.CUDA_HOME or "", "include")
    if all((toolkit_include / header).exists() for header in MATH_LIBRARY_HEADERS):
        return []
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    found: list[str] = []
    for root in roots:
        for header in MATH_LIBRARY_HEADERS:
            for path in sorted(Path(root).glob(f"*/include/{header}")) + sorted(
                Path(root).glob(f"*/*/include/{header}")
            ):
                if str(path.parent) not in found:
                    found.append(str(path.parent))
    missing = [h for h in MATH_LIBRARY_HEADERS if not any(Path(d, h).exists() for d in found)]
    if missing:
        raise SystemExit(
            f"the CUDA toolkit at {cpp_extension.CUDA_HOME} lacks {', '.join(missing)} and no pip "
            "'nvidia' package provides them; install the CUDA math libraries or set AFA_EXT_CUDA=0"
        )
    return found


def make_extension():
    cpp_sources = ["csrc/ops.cpp"] + relative_sources("cpu/**/*.cpp")
    cuda_sources = relative_sources("cuda/**/*.cu") + relative_sources("cuda/**/*.cpp")
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    link_flags = ["-fopenmp"]
    include_dirs = [str(CSRC)]
    if not cuda_build_wanted(cuda_sources):
        return cpp_extension.CppExtension(
            "afa_ext._C", cpp_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
        )
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    arch_define = "-DAFA_EXT_CUDA_ARCHS=" + archs.replace(";", ",").replace(" ", ",")
    return cpp_extension.CUDAExtension(
        "afa_ext._C", cpp_sources + cuda_sources,
        include_dirs=include_dirs + math_library_include_dirs(),
        extra_compile_args={
            "cxx": cxx_flags + [arch_define, "-DAFA_EXT_WITH_CUDA"],
            "nvcc": ["-O3", "-lineinfo", "-Xptxas=-v", "-DAFA_EXT_WITH_CUDA"],
        },
        extra_link_args=link_flags,
    )


if shutil.which("ninja") is None:
    print("afa_ext: ninja not found, the build falls back to a slower serial compile")

setup(
    packages=find_packages(include=["afa_ext", "afa_ext.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
