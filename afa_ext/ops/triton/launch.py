"""Host side of the Triton kernels: describe each layer, split the work, launch once.

``sqdist_forward(targets, sources, grouping)`` returns the partial sums of every layer
and ``sqdist_backward(grads, targets, sources, grouping)`` the gradients of every target,
each in one kernel launch for all layers (kernels.py). Inputs are read through
their strides; only a layout whose dims of one axis cannot be merged into three index
levels (a sliced 3-d or 4-d spatial map) is copied first.
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import kernels
from ..formulas import accumulate_dtype, partial_sum_shape
from ..validation import spatial_positions

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# AFA_EXT_TRITON_AUTOTUNE=0 runs the first configuration of each list instead of timing
# them: results then repeat bit for bit across processes, not only within one.
AUTOTUNE = not INTERPRETED and os.environ.get("AFA_EXT_TRITON_AUTOTUNE", "1") != "0"

TRITON_DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32,
                 torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
LEVELS = 3  # index levels per axis that the kernels decompose

Level = Tuple[int, Tuple[int, ...]]  # (size, stride in each tensor)


@dataclass(frozen=True)
class SplitPolicy:
    """How finely a launch cuts K: enough programs to fill the device, each still long."""

    target_programs: int
    min_k_per_split: int


def default_policy(device: torch.device) -> SplitPolicy:
    if device.type == "cuda":
        return SplitPolicy(4 * _multiprocessors(device), 512)
    return SplitPolicy(8, 16)  # the interpreter: small shapes, but still several splits


_SM_COUNTS: Dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _configs(rows_fast: bool) -> List[triton.Config]:
    """Block sizes with the contiguous axis long; the first one is the default."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_R": 8, "BLOCK_K": 16})] if not rows_fast else [
            triton.Config({"BLOCK_R": 16, "BLOCK_K": 8})]
    if rows_fast:
        shapes = [(128, 16, 4), (64, 32, 4), (256, 8, 8), (128, 32, 8)]
    else:
        shapes = [(8, 128, 4), (4, 256, 4), (16, 64, 4), (16, 128, 8)]
    return [triton.Config({"BLOCK_R": r, "BLOCK_K": k}, num_warps=w) for r, k, w in shapes]


# The fewest rows a program of any configuration owns, per orientation: the host sizes
# the split counters and estimates program counts with it before the autotuner picks.
SMALLEST_BLOCK_ROWS = {rows_fast: min(config.kwargs["BLOCK_R"] for config in _configs(rows_fast))
                       for rows_fast in (False, True)}


def _tuned(kernel, rows_fast: bool):
    configs = _configs(rows_fast)
    if not AUTOTUNE:
        configs = configs[:1]
    keys = ["shape_class", "NUM_LAYERS", "DTYPE", "ROWS_FAST", "FAST_UNIT"]
    return triton.autotune(configs=configs, key=keys)(kernel)


_FORWARD = {rows_fast: _tuned(kernels.sqdist_forward_kernel, rows_fast) for rows_fast in (False, True)}
_BACKWARD = {rows_fast: _tuned(kernels.sqdist_backward_kernel, rows_fast) for rows_fast in (False, True)}


def _merge_levels(dims: Sequence[Level]) -> Optional[List[Level]]:
    """Dims of one axis, outer to inner, with size-1 dims dropped and neighbours merged
    where every tensor steps over them as over one dim; None if more than LEVELS remain."""
    merged: List[Level] = []
    for size, strides in dims:
        if size == 1:
            continue
        if merged:
            outer_size, outer_strides = merged[-1]
            if all(o == i * size for o, i in zip(outer_strides, strides)):
                merged[-1] = (outer_size * size, strides)
                continue
        merged.append((size, strides))
    if len(merged) > LEVELS:
        return None
    padding = [(1, (0,) * len(dims[0][1]))] * (LEVELS - len(merged)) if dims else []
    return padding + merged


def _axes(grouping: str, tensors: Sequence[Tensor]):
    """(row dims, K dims) of a layer, each a list of (size, strides in ``tensors``)."""
    dims = [(size, tuple(t.stride(d) for t in tensors)) for d, size in enumerate(tensors[0].shape)]
    if grouping == "channel":
        return dims[:2], dims[2:]
    return [dims[0]] + dims[2:], [dims[1]]


@dataclass
class LayerPlan:
    """One layer of a launch: its tensors and how the kernels index them."""

    target: Tensor
    source: Tensor
    output: Optional[Tensor]
    rows: int
    k: int
    row_levels: List[Level]
    k_levels: List[Level]

    @property
    def rows_fast(self) -> bool:
        """The rows, not K, are the target's unit-stride axis."""
        return self.row_levels[-1][1][0] == 1 and self.k_levels[-1][1][0] != 1

    def fast_axis_is_unit(self, rows_fast: bool) -> bool:
        """The axis laid out last in the tile has unit stride in every tensor: the innermost
        row level, or K as a single level."""
        tensors = 3 if self.output is not None else 2
        if rows_fast:
            return all(s == 1 for s in self.row_levels[-1][1][:tensors])
        single = all(size == 1 for size, _ in self.k_levels[:-1])
        return single and all(s == 1 for s in self.k_levels[-1][1][:tensors])


def rows_and_k(target: Tensor, grouping: str) -> Tuple[int, int]:
    """(rows, K): (B*C, P) for the channel grouping, (B*P, C) for the spatial one."""
    batch, channels, positions = target.shape[0], target.shape[1], spatial_positions(target)
    if grouping == "channel":
        return batch * channels, positions
    return batch * positions, channels


def plan_layer(target: Tensor, source: Tensor, output: Optional[Tensor], grouping: str) -> LayerPlan:
    """The layer's index levels. Target and source (and the backward's output) are copied
    only if one axis cannot be indexed in LEVELS levels (a sliced 3-d spatial map)."""
    tensors = [target, source] + ([output] if output is not None else [])
    row_dims, k_dims = _axes(grouping, tensors)
    row_levels, k_levels = _merge_levels(row_dims), _merge_levels(k_dims)
    if row_levels is None or k_levels is None:
        dense_output = None if output is None else torch.empty_like(target, memory_format=torch.contiguous_format)
        return plan_layer(target.contiguous(), source.contiguous(), dense_output, grouping)
    if output is None:  # the forward writes its partial sums densely, by flat row
        row_levels = [(size, strides + (0,)) for size, strides in row_levels]
        k_levels = [(size, strides + (0,)) for size, strides in k_levels]
    rows, k = rows_and_k(target, grouping)
    return LayerPlan(target, source, output, rows, k, row_levels, k_levels)


def _groups(plan: LayerPlan) -> int:
    """Row groups: the rows of a layer are (group, inner) with inner the innermost level."""
    return plan.rows // plan.row_levels[-1][0]


def _row_blocks(plan: LayerPlan, block_rows: int) -> int:
    return _groups(plan) * triton.cdiv(plan.row_levels[-1][0], block_rows)


def _splits(plans: Sequence[LayerPlan], rows_fast: bool, policy: SplitPolicy) -> List[Tuple[int, int]]:
    """(splits, k_per_split) of each layer: one split unless the rows alone leave the
    device idle; then K is cut evenly into slices of a multiple of 64 elements, each at
    least policy.min_k_per_split long."""
    programs = sum(_row_blocks(plan, SMALLEST_BLOCK_ROWS[rows_fast]) for plan in plans)
    wanted = triton.cdiv(policy.target_programs, max(programs, 1))
    result = []
    for plan in plans:
        splits = max(1, min(wanted, plan.k // policy.min_k_per_split))
        k_per_split = plan.k if splits == 1 else triton.cdiv(triton.cdiv(plan.k, splits), 64) * 64
        result.append((triton.cdiv(plan.k, k_per_split), k_per_split))
    return result


def _aligned_layers(plans: Sequence[LayerPlan], splits, rows_fast: bool, fast_unit: bool, itemsize: int) -> List[bool]:
    """Per layer: every feature address (and the anchor, the first layer's target), every
    stride off the fast axis and every length along it is a multiple of 16 bytes, so that
    its tiles can be read 16 bytes at a time."""
    vec = 16 // itemsize
    if not fast_unit or plans[0].target.data_ptr() % 16:
        return [False] * len(plans)
    flags = []
    for plan, (split_count, k_per_split) in zip(plans, splits):
        tensors = [plan.target, plan.source] + ([plan.output] if plan.output is not None else [])
        count = len(tensors)
        if rows_fast:
            slow = [s for _, strides in plan.row_levels[:-1] + plan.k_levels for s in strides[:count]]
            lengths = [plan.row_levels[-1][0]]
        else:
            slow = [s for _, strides in plan.row_levels for s in strides[:count]]
            lengths = [plan.k, k_per_split if split_count > 1 else plan.k]
        flags.append(not any(t.data_ptr() % 16 for t in tensors) and not any(v % vec for v in slow + lengths))
    return flags


def _vector_width(aligned: Sequence[bool], itemsize: int) -> int:
    """The kernels' ALIGN: 16 bytes in elements when some layer is aligned, else 1."""
    return 16 // itemsize if any(aligned) else 1


def _table_row(plan: LayerPlan, anchor: Tensor, output: Tensor, weights: Optional[Tensor],
               splits: Tuple[int, int], workspace_offset: int, counter_offset: int, aligned: bool) -> List[int]:
    """One layer's row of the table (columns in kernels.py)."""
    def from_anchor(tensor: Tensor) -> int:
        return (tensor.data_ptr() - anchor.data_ptr()) // anchor.element_size()

    features_out = plan.output is not None  # the backward writes features, the forward sums
    row = [from_anchor(plan.target), from_anchor(plan.source),
           from_anchor(output) if features_out else output.data_ptr(),
           weights.data_ptr() if weights is not None else 0,
           plan.rows, plan.k, splits[0], splits[1], workspace_offset, counter_offset,
           plan.row_levels[1][0], plan.row_levels[2][0], plan.k_levels[1][0], plan.k_levels[2][0]]
    for levels in (plan.row_levels, plan.k_levels):
        row += [levels[level][1][tensor] for tensor in range(3) for level in range(LEVELS)]
    row.append(int(aligned))
    assert len(row) == kernels.FIELDS.value
    return row


_TABLES: "OrderedDict[tuple, Tensor]" = OrderedDict()
_TABLE_CACHE_SIZE = 64


def _device_table(rows: List[List[int]], device: torch.device) -> Tensor:
    """The layer table on ``device``; recent tables are kept (training steps usually see the
    same addresses again), a new one is copied from pinned memory without a sync."""
    key = (str(device),) + tuple(value for row in rows for value in row)
    table = _TABLES.get(key)
    if table is not None:
        _TABLES.move_to_end(key)
        return table
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    _TABLES[key] = table
    if len(_TABLES) > _TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return table


_COUNTERS: Dict[tuple, Tensor] = {}


def _counters(device: torch.device, size: int) -> Tensor:
    """Zeroed int32 counters, one per row block of a split forward, reused across launches
    on one stream: the last program of each block resets its counter."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < size:
        counters = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = counters
    return counters


def _shape_class(plans: Sequence[LayerPlan]) -> int:
    """The autotuner's key: the launch's element count and longest K, powers of two."""
    elements = sum(plan.rows * plan.k for plan in plans)
    return triton.next_power_of_2(elements) * 64 + triton.next_power_of_2(max(p.k for p in plans)).bit_length()


def _launch_flags(plans: Sequence[LayerPlan]) -> Tuple[bool, bool]:
    """(ROWS_FAST, FAST_UNIT): the largest layer picks the tile orientation."""
    rows_fast = max(plans, key=lambda plan: plan.rows * plan.k).rows_fast
    return rows_fast, all(plan.fast_axis_is_unit(rows_fast) for plan in plans)


def _grid(plans: Sequence[LayerPlan], splits: Sequence[Tuple[int, int]]):
    def grid(meta):
        return (sum(_row_blocks(p, meta["BLOCK_R"]) * s for p, (s, _) in zip(plans, splits)),)

    return grid


def _device_context(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@dataclass
class Launch:
    """One launch for a list of layers: tile orientation, K splits and alignment."""

    plans: List[LayerPlan]
    rows_fast: bool
    fast_unit: bool
    splits: List[Tuple[int, int]]
    aligned: List[bool]

    @property
    def anchor(self) -> Tensor:
        return self.plans[0].target

    def constexprs(self, dtype: torch.dtype) -> dict:
        """The kernels' compile-time arguments (the autotuner adds the block sizes)."""
        return dict(NUM_LAYERS=len(self.plans), DTYPE=TRITON_DTYPES[dtype], ACC=TRITON_DTYPES[accumulate_dtype(dtype)],
                    ROWS_FAST=self.rows_fast, FAST_UNIT=self.fast_unit,
                    ALIGN=_vector_width(self.aligned, self.anchor.element_size()))


def plan_launch(plans: List[LayerPlan], policy: SplitPolicy) -> Launch:
    rows_fast, fast_unit = _launch_flags(plans)
    splits = _splits(plans, rows_fast, policy)
    aligned = _aligned_layers(plans, splits, rows_fast, fast_unit, plans[0].target.element_size())
    return Launch(plans, rows_fast, fast_unit, splits, aligned)


def sqdist_forward(targets: Sequence[Tensor], sources: Sequence[Tensor], grouping: str,
                   policy: Optional[SplitPolicy] = None) -> List[Tensor]:
    """d = sum over K of (t - s)^2 for every layer, in one launch (inputs already checked)."""
    dtype, device = targets[0].dtype, targets[0].device
    acc = accumulate_dtype(dtype)
    outputs, plans, live = [], [], []
    for target, source in zip(targets, sources):
        shape = partial_sum_shape(target, grouping)
        if target.numel() == 0:
            outputs.append(torch.zeros(shape, dtype=acc, device=device))
            continue
        outputs.append(torch.empty(shape, dtype=acc, device=device))
        plans.append(plan_layer(target, source, None, grouping))
        live.append(outputs[-1])
    if not plans:
        return outputs
    launch = plan_launch(plans, policy or default_policy(device))
    table_rows, workspace_size, counter_size = [], 0, 0
    for plan, output, split, aligned in zip(plans, live, launch.splits, launch.aligned):
        table_rows.append(_table_row(plan, launch.anchor, output, None, split, workspace_size, counter_size, aligned))
        if split[0] > 1:
            workspace_size += plan.rows * split[0]
            counter_size += _row_blocks(plan, SMALLEST_BLOCK_ROWS[launch.rows_fast])
    workspace = torch.empty(max(workspace_size, 1), dtype=acc, device=device)
    with _device_context(device):
        _FORWARD[launch.rows_fast][_grid(plans, launch.splits)](
            launch.anchor, _device_table(table_rows, device), workspace, _counters(device, counter_size),
            _shape_class(plans), **launch.constexprs(dtype))
    return outputs


def sqdist_backward(grads: Sequence[Tensor], targets: Sequence[Tensor], sources: Sequence[Tensor],
                    grouping: str, policy: Optional[SplitPolicy] = None) -> List[Tensor]:
    """dt = 2 * w * (t - s) for every layer, in one launch (inputs already checked)."""
    dtype, device = targets[0].dtype, targets[0].device
    acc = accumulate_dtype(dtype)
    outputs, plans, weights = [], [], []
    for grad, target, source in zip(grads, targets, sources):
        if target.numel() == 0:
            outputs.append(torch.empty_like(target))
            continue
        plans.append(plan_layer(target, source, torch.empty_like(target), grouping))
        outputs.append(plans[-1].output)
        weights.append(grad.to(acc).contiguous())
    if not plans:
        return outputs
    launch = plan_launch(plans, policy or default_policy(device))
    table_rows = [_table_row(plan, launch.anchor, plan.output, weight, split, 0, 0, aligned)
                  for plan, weight, split, aligned in zip(plans, weights, launch.splits, launch.aligned)]
    with _device_context(device):
        _BACKWARD[launch.rows_fast][_grid(plans, launch.splits)](
            launch.anchor, _device_table(table_rows, device), _shape_class(plans), **launch.constexprs(dtype))
    return outputs
