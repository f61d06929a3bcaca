"""The Triton kernels compile for the GPUs we target, with no GPU needed.

Triton's interpreter (test_triton_backend.py under TRITON_INTERPRET=1) checks what the
kernels compute but not that Triton's compiler accepts them. Here they are compiled
ahead of time for sm_80 and sm_90 with Triton's own ptxas, and the PTX of aligned,
unit-stride layouts is checked for 16-byte vector loads.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter does not compile"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled and run for real"),
]


def _compile(kernel_name, arch, dtype_name, rows_fast, fast_unit, align, block_r, block_k):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from afa_ext.ops.triton import kernels as triton_kernels

    dtype = getattr(tl, dtype_name)
    acc = tl.float64 if dtype_name == "float64" else tl.float32
    pointer = {"float32": "*fp32", "float64": "*fp64", "bfloat16": "*bf16", "float16": "*fp16"}
    constants = dict(
        NUM_LAYERS=4,
        DTYPE=dtype,
        ACC=acc,
        ROWS_FAST=rows_fast,
        FAST_UNIT=fast_unit,
        ALIGN=align,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
    )
    if kernel_name == "forward":
        kernel = triton_kernels.sqdist_forward_kernel
        signature = {
            "base": pointer[dtype_name],
            "table": "*i64",
            "workspace": "*fp64" if acc == tl.float64 else "*fp32",
            "counters": "*i32",
        }
    else:
        kernel = triton_kernels.sqdist_backward_kernel
        signature = {"base": pointer[dtype_name], "table": "*i64"}
    signature.update({name: "constexpr" for name in constants})
    aligned = {(index,): [["tt.divisibility", 16]] for index in range(2)}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})


def _vector_loads(ptx: str) -> int:
    return sum(line.count("ld.global") for line in ptx.splitlines() if ".v4" in line or ".v2.b64" in line)


@pytest.mark.parametrize("kernel_name", ["forward", "backward"])
@pytest.mark.parametrize("rows_fast", [False, True], ids=["k-fast", "rows-fast"])
def test_aligned_unit_stride_tiles_load_16_bytes_at_a_time(kernel_name, rows_fast):
    block_r, block_k = (128, 16) if rows_fast else (8, 128)
    compiled = _compile(kernel_name, 90, "float32", rows_fast, True, 4, block_r, block_k)
    assert _vector_loads(compiled.asm["ptx"]) > 0


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float64"])
def test_strided_tiles_compile_for_sm80(dtype_name):
    compiled = _compile("forward", 80, dtype_name, False, False, 1, 8, 64)
    assert "ld.global" in compiled.asm["ptx"] and compiled.asm["cubin"]
