"""Build of afa_ext and its compiled extension afa_ext._C.

The C++ CPU kernels are always built. The CUDA sources under csrc/cuda/ are compiled
whenever nvcc and a CUDA build of torch are installed, whether or not a GPU is present.

afa_ext._C uses only the LibTorch stable ABI (torch/csrc/stable, torch/headeronly, built
for TORCH_TARGET_VERSION) and Python's limited API, so the wheel built here serves every
torch from TORCH_MIN_VERSION on and every CPython the package supports (the wheel is
tagged abi3 from WHEEL_PYTHON_TAG), not only the torch and Python it was built with.

Switches (environment variables):
  AFA_EXT_CUDA=auto|0|1    build the CUDA kernels: when possible (default), never, or
                           always (an error if nvcc or a CUDA torch is missing)
  AFA_EXT_CPU_ISA=auto|default|avx2|avx512
                           vector instructions of the CPU kernels: AVX2 when the build
                           machine has it (auto, the default), or the one named; the
                           package refuses to load the kernels on a CPU that lacks it
  TORCH_CUDA_ARCH_LIST     CUDA architectures, default "8.0;9.0" (A100, H100/H200)
  MAX_JOBS                 parallel compile jobs for ninja
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import tomllib
from pathlib import Path

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
DEFAULT_CUDA_ARCHS = "8.0;9.0"
# Compiler flags per CPU instruction set, as torch compiles its own per-ISA kernels, and
# the /proc/cpuinfo flags each needs.
CPU_ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
}
CPU_ISA_NEEDS = {
    "default": set(),
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"},
}


def declared_minimum(requirement: str, name: str) -> tuple[int, int]:
    """(major, minor) of ``name>=X.Y`` in a requirement string of pyproject.toml."""
    found = re.fullmatch(rf"{name}\s*>=\s*(\d+)\.(\d+)", requirement.strip())
    if found is None:
        raise SystemExit(f"pyproject.toml must declare {name} as '{name}>=X.Y', got {requirement!r}")
    return int(found[1]), int(found[2])


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# The oldest torch the built extension serves and the oldest CPython the package supports,
# as pyproject.toml declares them.
TORCH_MIN_VERSION = declared_minimum(
    next(r for r in PROJECT["dependencies"] if r.startswith("torch")), "torch"
)
WHEEL_PYTHON_TAG = "cp{}{}".format(*declared_minimum("python" + PROJECT["requires-python"], "python"))
# (py_limited_api=True below makes torch define Py_LIMITED_API, for CPython 3.10 on.)
ABI_DEFINES = [f"-DTORCH_TARGET_VERSION=0x{TORCH_MIN_VERSION[0]:02x}{TORCH_MIN_VERSION[1]:02x}000000000000"]
BUILD_CONFIG = ROOT / "afa_ext" / "_build_config.py"
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
    # Without CUDA_HOME, torch takes the folder above the nvcc on PATH as the toolkit, which
    # is wrong for a wrapper script such as /usr/local/bin/nvcc: the toolkit must have both.
    home = cpp_extension.CUDA_HOME
    toolkit = home and Path(home, "bin", "nvcc").exists() and Path(home, "include", "cuda_runtime.h").exists()
    missing = []
    if not cuda_sources:
        missing.append("CUDA sources under csrc/cuda/")
    if not toolkit:
        missing.append(
            f"a CUDA toolkit at CUDA_HOME={home or ''} with bin/nvcc and include/cuda_runtime.h "
            "(set CUDA_HOME to the toolkit)"
        )
    if torch.version.cuda is None:
        missing.append(f"a CUDA build of torch (this is {torch.__version__})")
    if switch == "1" and missing:
        raise SystemExit("AFA_EXT_CUDA=1 but the build lacks: " + "; ".join(missing))
    if missing:
        print("afa_ext: building without the CUDA kernels, for lack of: " + "; ".join(missing))
    return not missing


def build_machine_cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa() -> str:
    """The instruction set of the CPU kernels, from AFA_EXT_CPU_ISA and the build machine."""
    choice = os.environ.get("AFA_EXT_CPU_ISA", "auto").strip().lower()
    if choice != "auto" and choice not in CPU_ISA_FLAGS:
        raise SystemExit(f"AFA_EXT_CPU_ISA must be auto, {', '.join(CPU_ISA_FLAGS)}; got {choice!r}")
    if choice != "auto":
        return choice
    # The kernels are memory-bound: AVX2 already keeps up with memory, and AVX-512 would
    # only narrow the machines a build runs on.
    return "avx2" if CPU_ISA_NEEDS["avx2"] <= build_machine_cpu_flags() else "default"


def write_build_config(isa: str) -> None:
    """afa_ext/_build_config.py, read before afa_ext._C is loaded (generated, not tracked)."""
    BUILD_CONFIG.write_text(
        f'"""Written by setup.py: how afa_ext._C was built."""\n\nCPU_ISA = {isa!r}\n'
        f"TORCH_MIN_VERSION = {TORCH_MIN_VERSION!r}\n"
    )


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
    isa = cpu_isa()
    write_build_config(isa)
    # -Wno-unknown-pragmas: torch's vector headers use "#pragma unroll", which gcc does not know.
    cxx_flags = [
        "-O3",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-Wno-unknown-pragmas",
    ] + CPU_ISA_FLAGS[isa]
    cxx_flags += ABI_DEFINES
    # No -fopenmp: the kernels run on torch's own threads (torch::stable::parallel_for).
    link_flags: list[str] = []
    include_dirs = [str(CSRC)]
    if not cuda_build_wanted(cuda_sources):
        return cpp_extension.CppExtension(
            "afa_ext._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    arch_define = "-DAFA_EXT_CUDA_ARCHS=" + archs.replace(";", ",").replace(" ", ",")
    return cpp_extension.CUDAExtension(
        "afa_ext._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs + math_library_include_dirs(),
        extra_compile_args={
            "cxx": cxx_flags + [arch_define, "-DAFA_EXT_WITH_CUDA"],
            # -Xptxas=-v prints registers and spills per kernel ("ptxas info" lines, not
            # warnings): bench/cuda_resource_usage.py tabulates them from the build log.
            "nvcc": [
                "-O3",
                "-lineinfo",
                "-Xptxas=-v",
                "-Xcompiler=-Wall,-Wextra,-Wno-unused-parameter",
                "-DAFA_EXT_WITH_CUDA",
            ]
            + ABI_DEFINES,
        },
        extra_link_args=link_flags,
        py_limited_api=True,
    )


if shutil.which("ninja") is None:
    print("afa_ext: ninja not found, the build falls back to a slower serial compile")

setup(
    packages=find_packages(include=["afa_ext", "afa_ext.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    # The wheel is tagged abi3 from requires-python's CPython on (cp311-abi3).
    options={"bdist_wheel": {"py_limited_api": WHEEL_PYTHON_TAG}},
)
