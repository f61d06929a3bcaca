"""The Triton backend's op library ``afa_ext_triton``: the eight ops of _op_formulas.py
(same schemas as the C++ ``afa_ext`` ops), computed by the kernels of triton_kernels.py.

The ops are opaque to torch.compile, which traces them through their fake kernels; each
call is one kernel launch per pass for all the layers it is given. They take CUDA
tensors, or CPU tensors when TRITON_INTERPRET=1 runs Triton's interpreter (slow: for
testing the kernels' logic on machines without a GPU).
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from . import triton_launch
from ._op_formulas import GROUPINGS, OP_SCHEMAS, check_grouped_inputs, register_formulas

NAMESPACE = "afa_ext_triton"
# The interpreter reads tensors through host addresses, so it cannot take CUDA tensors.
DEVICE_TYPES = ("cpu",) if triton_launch.INTERPRETED else ("cuda",)


def _check_device(op: str, tensors: List[Tensor]) -> None:
    device = tensors[0].device
    if device.type not in DEVICE_TYPES:
        hint = " (TRITON_INTERPRET=1 runs them on CPU tensors)" if device.type == "cpu" else ""
        raise RuntimeError(
            f"{op}: the Triton kernels here take {' or '.join(DEVICE_TYPES)} tensors{hint}, got tensors on {device}"
        )


def _forward(grouping: str):
    op = f"{NAMESPACE}::grouped_{grouping}_sqdist"

    def grouped(targets: List[Tensor], sources: List[Tensor]) -> List[Tensor]:
        check_grouped_inputs(op, targets, sources)
        _check_device(op, targets)
        return triton_launch.sqdist_forward(list(targets), list(sources), grouping)

    def single(target: Tensor, source: Tensor) -> Tensor:
        return grouped([target], [source])[0]

    return grouped, single


def _backward(grouping: str):
    op = f"{NAMESPACE}::grouped_{grouping}_sqdist_backward"

    def grouped(grads: List[Tensor], targets: List[Tensor], sources: List[Tensor]) -> List[Tensor]:
        check_grouped_inputs(op, targets, sources, grads, grouping)
        _check_device(op, targets)
        return triton_launch.sqdist_backward(list(grads), list(targets), list(sources), grouping)

    def single(grad: Tensor, target: Tensor, source: Tensor) -> Tensor:
        return grouped([grad], [target], [source])[0]

    return grouped, single


_LIBRARY = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in OP_SCHEMAS.items():
    _LIBRARY.define(_name + _schema)
for _grouping in GROUPINGS:
    for _make, _suffix in ((_forward, ""), (_backward, "_backward")):
        _grouped, _single = _make(_grouping)
        for _device_type in DEVICE_TYPES:
            _LIBRARY.impl(f"grouped_{_grouping}_sqdist{_suffix}", _grouped, _device_type.upper())
            _LIBRARY.impl(f"{_grouping}_sqdist{_suffix}", _single, _device_type.upper())
register_formulas(NAMESPACE)
