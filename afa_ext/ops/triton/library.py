"""The Triton backend's op library ``afa_ext_triton``: the eight ops of ../schemas.py
(the schemas of the C++ ``afa_ext`` ops), computed by the kernels of kernels.py.

The ops are opaque to torch.compile, which traces them through their fake kernels; each
call is one kernel launch per pass for all the layers it is given. They take CUDA
tensors, or CPU tensors when TRITON_INTERPRET=1 runs Triton's interpreter (slow: for
testing the kernels' logic on machines without a GPU).
"""

from __future__ import annotations


from torch import Tensor

from . import launch
from ..backends import backend_devices
from ..formulas import check_layer_inputs, register_formulas
from ..schemas import GROUPINGS, define_ops

NAMESPACE = "afa_ext_triton"
DEVICE_TYPES = backend_devices("triton")  # the mode of launch.py, imported above


def _check_device(op: str, tensors: list[Tensor]) -> None:
    device = tensors[0].device
    if device.type not in DEVICE_TYPES:
        hint = " (TRITON_INTERPRET=1 runs them on CPU tensors)" if device.type == "cpu" else ""
        raise RuntimeError(
            f"{op}: the Triton kernels here take {' or '.join(DEVICE_TYPES)} tensors{hint}, got tensors on {device}"
        )


def _forward_ops(grouping: str):
    """(the multi-layer op, the single-layer op) of the forward."""
    op = f"{NAMESPACE}::grouped_{grouping}_sqdist"

    def layers_op(targets: list[Tensor], sources: list[Tensor]) -> list[Tensor]:
        check_layer_inputs(op, targets, sources)
        _check_device(op, targets)
        return launch.sqdist_forward(list(targets), list(sources), grouping, op=op)

    def single_op(target: Tensor, source: Tensor) -> Tensor:
        return layers_op([target], [source])[0]

    return layers_op, single_op


def _backward_ops(grouping: str):
    """(the multi-layer op, the single-layer op) of the backward."""
    op = f"{NAMESPACE}::grouped_{grouping}_sqdist_backward"

    def layers_op(grads: list[Tensor], targets: list[Tensor], sources: list[Tensor]) -> list[Tensor]:
        check_layer_inputs(op, targets, sources, grads, grouping)
        _check_device(op, targets)
        return launch.sqdist_backward(list(grads), list(targets), list(sources), grouping, op=op)

    def single_op(grad: Tensor, target: Tensor, source: Tensor) -> Tensor:
        return layers_op([grad], [target], [source])[0]

    return layers_op, single_op


_LIBRARY = define_ops(NAMESPACE)
for _grouping in GROUPINGS:
    for _make, _suffix in ((_forward_ops, ""), (_backward_ops, "_backward")):
        _layers_op, _single_op = _make(_grouping)
        for _device_type in DEVICE_TYPES:
            _LIBRARY.impl(f"grouped_{_grouping}_sqdist{_suffix}", _layers_op, _device_type.upper())
            _LIBRARY.impl(f"{_grouping}_sqdist{_suffix}", _single_op, _device_type.upper())
register_formulas(NAMESPACE)
