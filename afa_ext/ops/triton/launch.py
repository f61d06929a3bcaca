"""Host side of the Triton kernels: describe each layer, split the work, launch once.

``sqdist_forward(targets, sources, grouping, op)`` returns the partial sums of every layer
and ``sqdist_backward(grads, targets, sources, grouping, op)`` the gradients of every target,
each in one kernel launch for all layers (kernels.py). A layer's dims are kept (they
index the partial sums; rows = their product) or reduced (summed over; K = their
product), as in the C++ planner. Inputs are read through their strides; only a layout
whose kept or reduced dims cannot be merged into three index levels (a sliced 3-d or
4-d spatial map) is copied first, and the gradient copied back into the layout the fake
kernel promises.

Block sizes are chosen per launch key by a small tuner (``_chosen_config``): with
AFA_EXT_TRITON_AUTOTUNE=0 the first configuration of the list, untimed (results then
repeat bit for bit across processes); otherwise each configuration timed by ``_measure_milliseconds``
and the fastest kept, rank 0 deciding for every rank of a torch.distributed job
(rank_zero.py). The setting is read at every tuning; it is on by default on a GPU and
off under the interpreter. TRITON_INTERPRET, in contrast, is read once at import:
triton.jit decides at decoration time whether a kernel is compiled or interpreted, so
changing it later would not change how the kernels of kernels.py run.

No buffer a kernel reads is shared between streams or launches: layer tables are cached
per stream (and not at all while a CUDA graph is captured), and the counters of a split
forward are zeroed for every launch, so that an aborted launch leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import kernels
from ..formulas import accumulate_dtype, partial_sum_shape
from ..rank_zero import decided_by_rank_zero
from ..validation import spatial_positions

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

TRITON_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}
LEVELS = 3  # index levels per axis that the kernels decompose

Level = tuple[int, tuple[int, ...]]  # (size, stride in each tensor)


@dataclass(frozen=True)
class SplitPolicy:
    """How finely a launch cuts K: enough programs to fill the device, each still long."""

    target_programs: int
    min_k_per_split: int


def default_policy(device: torch.device) -> SplitPolicy:
    if device.type == "cuda":
        return SplitPolicy(4 * _multiprocessors(device), 512)
    return SplitPolicy(8, 16)  # the interpreter: small shapes, but still several splits


_SM_COUNTS: dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


@dataclass(frozen=True)
class BlockConfig:
    """A tile of block_r rows by block_k elements of K, run by num_warps warps."""

    block_r: int
    block_k: int
    num_warps: int


def configs(rows_fast: bool) -> list[BlockConfig]:
    """Block sizes with the contiguous axis long; the first one is the default."""
    if INTERPRETED:  # small tiles; two, so that the tuner has a choice to make
        shapes = [(16, 8, 4), (32, 4, 4)] if rows_fast else [(8, 16, 4), (16, 8, 4)]
    elif rows_fast:
        shapes = [(128, 16, 4), (64, 32, 4), (256, 8, 8), (128, 32, 8)]
    else:
        shapes = [(8, 128, 4), (4, 256, 4), (16, 64, 4), (16, 128, 8)]
    return [BlockConfig(r, k, w) for r, k, w in shapes]


# The fewest rows a program of any configuration owns, per orientation: the host sizes
# the split counters and estimates program counts with it before the tuner picks.
SMALLEST_BLOCK_ROWS = {rows_fast: min(config.block_r for config in configs(rows_fast)) for rows_fast in (False, True)}


def _merge_levels(dims: Sequence[Level]) -> list[Level] | None:
    """Dims of one axis, outer to inner, with size-1 dims dropped and neighbours merged
    where every tensor steps over them as over one dim; None if more than LEVELS remain."""
    merged: list[Level] = []
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


def _kept_and_reduced_dims(grouping: str, tensors: Sequence[Tensor]):
    """(kept dims, reduced dims) of a layer, each a list of (size, strides in ``tensors``)."""
    dims = [(size, tuple(t.stride(d) for t in tensors)) for d, size in enumerate(tensors[0].shape)]
    if grouping == "channel":
        return dims[:2], dims[2:]
    return [dims[0]] + dims[2:], [dims[1]]


@dataclass
class LayerPlan:
    """One layer of a launch: its tensors and how the kernels index them. ``output`` is
    what the backward's kernel writes, ``destination`` the gradient the caller gets: the
    same tensor unless the layout had to be copied (see ``deliver``)."""

    target: Tensor
    source: Tensor
    output: Tensor | None
    rows: int
    k: int
    kept_levels: list[Level]
    reduced_levels: list[Level]
    destination: Tensor | None

    def deliver(self) -> Tensor | None:
        """The backward's gradient in the caller's layout, copied there from the dense
        output the kernel wrote if the layout was copied."""
        if self.destination is not self.output:
            self.destination.copy_(self.output)
        return self.destination

    @property
    def rows_fast(self) -> bool:
        """The rows, not K, are the target's unit-stride axis."""
        return self.kept_levels[-1][1][0] == 1 and self.reduced_levels[-1][1][0] != 1

    def fast_axis_is_unit(self, rows_fast: bool) -> bool:
        """The axis laid out last in the tile has unit stride in every tensor: the innermost
        kept level, or K as a single reduced level."""
        tensors = 3 if self.output is not None else 2
        if rows_fast:
            return all(s == 1 for s in self.kept_levels[-1][1][:tensors])
        single = all(size == 1 for size, _ in self.reduced_levels[:-1])
        return single and all(s == 1 for s in self.reduced_levels[-1][1][:tensors])


def rows_and_k(target: Tensor, grouping: str) -> tuple[int, int]:
    """(rows, K): (B*C, P) for the channel grouping, (B*P, C) for the spatial one."""
    batch, channels, positions = target.shape[0], target.shape[1], spatial_positions(target)
    if grouping == "channel":
        return batch * channels, positions
    return batch * positions, channels


def plan_layer(target: Tensor, source: Tensor, output: Tensor | None, grouping: str) -> LayerPlan:
    """The layer's index levels. Target and source are copied only if the kept or the
    reduced dims cannot be indexed in LEVELS levels (a sliced 3-d spatial map); the
    backward then writes a dense output, which ``LayerPlan.deliver`` copies into
    ``output``."""
    tensors = [target, source] + ([output] if output is not None else [])
    kept_dims, reduced_dims = _kept_and_reduced_dims(grouping, tensors)
    kept_levels, reduced_levels = _merge_levels(kept_dims), _merge_levels(reduced_dims)
    if kept_levels is None or reduced_levels is None:
        dense_output = None if output is None else torch.empty_like(target, memory_format=torch.contiguous_format)
        dense = plan_layer(target.contiguous(), source.contiguous(), dense_output, grouping)
        dense.destination = output
        return dense
    if output is None:  # the forward writes its partial sums densely, by flat row
        kept_levels = [(size, strides + (0,)) for size, strides in kept_levels]
        reduced_levels = [(size, strides + (0,)) for size, strides in reduced_levels]
    rows, k = rows_and_k(target, grouping)
    return LayerPlan(target, source, output, rows, k, kept_levels, reduced_levels, output)


def _groups(plan: LayerPlan) -> int:
    """Row groups: the rows of a layer are (group, inner) with inner the innermost level."""
    return plan.rows // plan.kept_levels[-1][0]


def _row_blocks(plan: LayerPlan, block_rows: int) -> int:
    return _groups(plan) * triton.cdiv(plan.kept_levels[-1][0], block_rows)


def _splits(plans: Sequence[LayerPlan], rows_fast: bool, policy: SplitPolicy) -> list[tuple[int, int]]:
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


def _aligned_layers(plans: Sequence[LayerPlan], splits, rows_fast: bool, fast_unit: bool, itemsize: int) -> list[bool]:
    """Per layer: every feature address (and the base, the first layer's target), every
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
            slow = [s for _, strides in plan.kept_levels[:-1] + plan.reduced_levels for s in strides[:count]]
            lengths = [plan.kept_levels[-1][0]]
        else:
            slow = [s for _, strides in plan.kept_levels for s in strides[:count]]
            lengths = [plan.k, k_per_split if split_count > 1 else plan.k]
        flags.append(not any(t.data_ptr() % 16 for t in tensors) and not any(v % vec for v in slow + lengths))
    return flags


def _vector_width(aligned: Sequence[bool], itemsize: int) -> int:
    """The kernels' ALIGN: 16 bytes in elements when some layer is aligned, else 1."""
    return 16 // itemsize if any(aligned) else 1


def _table_row(
    plan: LayerPlan,
    base: Tensor,
    output: Tensor,
    grad: Tensor | None,
    splits: tuple[int, int],
    workspace_offset: int,
    counter_offset: int,
    aligned: bool,
) -> list[int]:
    """One layer's row of the table (columns in kernels.py)."""

    def offset_from_base(tensor: Tensor) -> int:
        return (tensor.data_ptr() - base.data_ptr()) // base.element_size()

    features_out = plan.output is not None  # the backward writes features, the forward sums
    row = [
        offset_from_base(plan.target),
        offset_from_base(plan.source),
        offset_from_base(output) if features_out else output.data_ptr(),
        grad.data_ptr() if grad is not None else 0,
        plan.rows,
        plan.k,
        splits[0],
        splits[1],
        workspace_offset,
        counter_offset,
        plan.kept_levels[1][0],
        plan.kept_levels[2][0],
        plan.reduced_levels[1][0],
        plan.reduced_levels[2][0],
    ]
    for levels in (plan.kept_levels, plan.reduced_levels):
        row += [levels[level][1][tensor] for tensor in range(3) for level in range(LEVELS)]
    row.append(int(aligned))
    assert len(row) == kernels.FIELDS.value
    return row


def _current_stream(device: torch.device) -> int:
    """The stream that work for ``device`` is queued on now (0 off CUDA)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _capturing(device: torch.device) -> bool:
    """The current stream is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _host_table(rows: list[list[int]], device: torch.device) -> Tensor:
    """The table in host memory, pinned when it is to be copied to a GPU."""
    table = torch.tensor(rows, dtype=torch.int64)
    return table.pin_memory() if device.type == "cuda" else table


def _copied_to_device(host: Tensor, device: torch.device) -> Tensor:
    """``host`` on ``device``, copied without a sync on the current stream. The pinned
    source is freed after the call; PyTorch's pinned allocator holds it back until the
    copy has run (an event on this stream)."""
    return host.to(device, non_blocking=True) if device.type == "cuda" else host


_TABLES: OrderedDict[tuple, Tensor] = OrderedDict()
_TABLE_CACHE_SIZE = 64
# Pinned sources of the tables copied during CUDA graph captures: every replay repeats the
# copy from them, so they are never freed (a few hundred bytes per captured launch).
_CAPTURED_HOST_TABLES: list[Tensor] = []
_TABLES_LOCK = threading.Lock()


def _device_table(rows: list[list[int]], device: torch.device) -> Tensor:
    """The layer table on ``device``, ready for a kernel on the current stream.

    Recent tables are kept per stream (training steps usually see the same addresses
    again): a table is made on the stream that reads it, so its copy is ordered before the
    kernels, and once evicted its memory goes back to that stream's pool of the caching
    allocator, reused only by work queued after those kernels. Under CUDA graph capture
    nothing is reused or kept (see ``_captured_table``)."""
    if _capturing(device):
        return _captured_table(rows, device)
    key = (str(device), _current_stream(device)) + tuple(value for row in rows for value in row)
    with _TABLES_LOCK:
        table = _TABLES.get(key)
        if table is not None:
            _TABLES.move_to_end(key)
            return table
    table = _copied_to_device(_host_table(rows, device), device)
    with _TABLES_LOCK:
        _TABLES[key] = table
        _TABLES.move_to_end(key)
        while len(_TABLES) > _TABLE_CACHE_SIZE:
            _TABLES.popitem(last=False)
    return table


def _captured_table(rows: list[list[int]], device: torch.device) -> Tensor:
    """A fresh table for a launch captured into a CUDA graph. A cached one could be
    evicted and freed while the graph still replays reads of it; this one lives in the
    graph's memory pool, and its pinned source is kept for the replays' copies."""
    host = _host_table(rows, device)
    with _TABLES_LOCK:
        _CAPTURED_HOST_TABLES.append(host)
    return _copied_to_device(host, device)


def _shape_class(plans: Sequence[LayerPlan]) -> int:
    """The tuner's key: the launch's element count and longest K, powers of two."""
    elements = sum(plan.rows * plan.k for plan in plans)
    return triton.next_power_of_2(elements) * 64 + triton.next_power_of_2(max(p.k for p in plans)).bit_length()


def _launch_flags(plans: Sequence[LayerPlan]) -> tuple[bool, bool]:
    """(ROWS_FAST, FAST_UNIT): the largest layer picks the tile orientation."""
    rows_fast = max(plans, key=lambda plan: plan.rows * plan.k).rows_fast
    return rows_fast, all(plan.fast_axis_is_unit(rows_fast) for plan in plans)


def _device_context(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


MAX_GRID_PROGRAMS = 2**31 - 1  # a grid's first dimension holds no more (CUDA's gridDim.x)


@dataclass
class Launch:
    """One launch for a list of layers: tile orientation, K splits and alignment."""

    plans: list[LayerPlan]
    rows_fast: bool
    fast_unit: bool
    splits: list[tuple[int, int]]
    aligned: list[bool]

    @property
    def base(self) -> Tensor:
        """The tensor that the table's feature addresses are element offsets from."""
        return self.plans[0].target

    def program_count(self, block_rows: int) -> int:
        """The grid: one program per row block of ``block_rows`` rows and split of every layer."""
        return sum(_row_blocks(plan, block_rows) * splits for plan, (splits, _) in zip(self.plans, self.splits))

    def constexprs(self, dtype: torch.dtype) -> dict:
        """The kernels' compile-time arguments but the block sizes (the tuner's choice)."""
        return dict(
            NUM_LAYERS=len(self.plans),
            DTYPE=TRITON_DTYPES[dtype],
            ACC=TRITON_DTYPES[accumulate_dtype(dtype)],
            ROWS_FAST=self.rows_fast,
            FAST_UNIT=self.fast_unit,
            ALIGN=_vector_width(self.aligned, self.base.element_size()),
        )

    def tuning_key(self, kernel_name: str, dtype: torch.dtype) -> tuple:
        """What the tuner decides once for: the kernel, the size class, the layer count,
        the dtype and the tile orientation."""
        return (kernel_name, _shape_class(self.plans), len(self.plans), str(dtype), self.rows_fast, self.fast_unit)


def plan_launch(plans: list[LayerPlan]) -> Launch:
    rows_fast, fast_unit = _launch_flags(plans)
    splits = _splits(plans, rows_fast, default_policy(plans[0].target.device))
    aligned = _aligned_layers(plans, splits, rows_fast, fast_unit, plans[0].target.element_size())
    return Launch(plans, rows_fast, fast_unit, splits, aligned)


def launchable_configs(op: str, launch: Launch) -> list[BlockConfig]:
    """The configurations whose grid fits in MAX_GRID_PROGRAMS programs, in list order;
    a RuntimeError naming ``op`` and the numbers if none does."""
    candidates = configs(launch.rows_fast)
    fitting = [config for config in candidates if launch.program_count(config.block_r) <= MAX_GRID_PROGRAMS]
    if not fitting:
        fewest = min(launch.program_count(config.block_r) for config in candidates)
        raise RuntimeError(
            f"{op}: the features need {fewest} Triton programs in one launch, more than the "
            f"{MAX_GRID_PROGRAMS} a grid's first dimension holds"
        )
    return fitting


def autotuning() -> bool:
    """AFA_EXT_TRITON_AUTOTUNE, read at every tuning: anything but "0" times the
    configurations; unset, on for a GPU and off under the interpreter."""
    return os.environ.get("AFA_EXT_TRITON_AUTOTUNE", "0" if INTERPRETED else "1") != "0"


def _measure_milliseconds(config: BlockConfig, run: Callable[[], None]) -> float:
    """How long ``run()`` (a launch with ``config``) takes: triton.testing.do_bench on a
    GPU, one wall-clock run under the interpreter."""
    if INTERPRETED:
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1e3
    return triton.testing.do_bench(run)


_CHOSEN: dict[tuple, BlockConfig] = {}
_CHOSEN_LOCK = threading.Lock()


def _fastest(candidates: list[BlockConfig], run: Callable[[BlockConfig], None]) -> int:
    """The index of the candidate that ``_measure_milliseconds`` measures fastest."""
    times = [_measure_milliseconds(config, functools.partial(run, config)) for config in candidates]
    return times.index(min(times))


def _chosen_config(
    key: tuple, candidates: list[BlockConfig], run: Callable[[BlockConfig], None], device: torch.device
) -> BlockConfig:
    """The configuration to launch with: the first candidate, untimed, unless autotuning;
    then the fastest, timed once per key and taken from rank 0 by every rank. A launch
    being captured into a CUDA graph cannot be timed (timing synchronises): it takes the
    key's earlier choice, or else the first candidate."""
    if not autotuning():
        return candidates[0]
    key = key + tuple(candidates)
    with _CHOSEN_LOCK:
        chosen = _CHOSEN.get(key)
    if chosen is not None:
        return chosen
    if _capturing(device):
        return candidates[0]
    chosen = candidates[decided_by_rank_zero(functools.partial(_fastest, candidates, run))]
    with _CHOSEN_LOCK:
        _CHOSEN[key] = chosen
    return chosen


def _launch_kernel(kernel, config: BlockConfig, grid_size: int, args: tuple, constexprs: dict) -> None:
    """One launch of ``kernel`` over ``grid_size`` programs with ``config``'s block sizes."""
    kernel[(grid_size,)](
        *args, **constexprs, BLOCK_R=config.block_r, BLOCK_K=config.block_k, num_warps=config.num_warps
    )


def _launch_tuned(
    kernel_name: str,
    kernel,
    launch: Launch,
    candidates: list[BlockConfig],
    dtype: torch.dtype,
    args: tuple,
    prepare: Callable[[], None],
) -> None:
    """Launches ``kernel`` once with the tuner's choice among ``candidates``; ``prepare()``
    runs before every launch, the timed ones included."""
    constexprs = launch.constexprs(dtype)

    def run(config: BlockConfig) -> None:
        prepare()
        _launch_kernel(kernel, config, launch.program_count(config.block_r), args, constexprs)

    device = launch.base.device
    run(_chosen_config(launch.tuning_key(kernel_name, dtype), candidates, run, device))


def _nothing() -> None:
    pass


def sqdist_forward(targets: Sequence[Tensor], sources: Sequence[Tensor], grouping: str, op: str) -> list[Tensor]:
    """d = sum over K of (t - s)^2 for every layer, in one launch (inputs already checked;
    ``op`` names the caller in errors)."""
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
    launch = plan_launch(plans)
    candidates = launchable_configs(op, launch)
    table_rows, workspace_size, counter_size = [], 0, 0
    for plan, output, split, aligned in zip(plans, live, launch.splits, launch.aligned):
        table_rows.append(_table_row(plan, launch.base, output, None, split, workspace_size, counter_size, aligned))
        if split[0] > 1:
            workspace_size += plan.rows * split[0]
            # sized for the smallest blocks, so that every configuration's row blocks fit
            counter_size += _row_blocks(plan, SMALLEST_BLOCK_ROWS[launch.rows_fast])
    workspace = torch.empty(max(workspace_size, 1), dtype=acc, device=device)
    counters = torch.empty(max(counter_size, 1), dtype=torch.int32, device=device)
    with _device_context(device):
        args = (launch.base, _device_table(table_rows, device), workspace, counters)
        _launch_tuned(
            "forward",
            kernels.sqdist_forward_kernel,
            launch,
            candidates,
            dtype,
            args,
            counters.zero_ if counter_size else _nothing,
        )
    return outputs


def sqdist_backward(
    grads: Sequence[Tensor], targets: Sequence[Tensor], sources: Sequence[Tensor], grouping: str, op: str
) -> list[Tensor]:
    """dt = 2 * g * (t - s) for every layer, in one launch, each shaped and strided as
    torch.empty_like(t) (inputs already checked; ``op`` names the caller in errors)."""
    dtype, device = targets[0].dtype, targets[0].device
    acc = accumulate_dtype(dtype)
    outputs, plans, dense_grads = [], [], []
    for grad, target, source in zip(grads, targets, sources):
        if target.numel() == 0:
            outputs.append(torch.empty_like(target))
            continue
        plans.append(plan_layer(target, source, torch.empty_like(target), grouping))
        outputs.append(plans[-1].destination)
        dense_grads.append(grad.to(acc).contiguous())
    if not plans:
        return outputs
    launch = plan_launch(plans)
    candidates = launchable_configs(op, launch)
    table_rows = [
        _table_row(plan, launch.base, plan.output, grad, split, 0, 0, aligned)
        for plan, grad, split, aligned in zip(plans, dense_grads, launch.splits, launch.aligned)
    ]
    with _device_context(device):
        args = (launch.base, _device_table(table_rows, device))
        _launch_tuned("backward", kernels.sqdist_backward_kernel, launch, candidates, dtype, args, _nothing)
        for plan in plans:
            plan.deliver()
    return outputs
