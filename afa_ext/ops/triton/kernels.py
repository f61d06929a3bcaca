"""Triton kernels of the squared-distance partial sums and their backward, for any number
of feature maps at once.

Each launch covers L layers. A layer is an index space of ``rows`` x ``K``: the forward
reduces along K, d[r] = sum_k (t[r, k] - s[r, k])^2, and the backward writes
dt[r, k] = 2 * g[r] * (t[r, k] - s[r, k]), g the gradient of the partial sums. As in
the C++ planner (csrc/common/reduction_plan.h), the dims of a layer are "kept" (they
index the partial sums) or "reduced" (summed over): rows is the product of the kept
dims, K that of the reduced ones. For the channel grouping the kept dims are (n, j) and the reduced ones the
spatial dims; for the spatial grouping the kept dims are (n, *spatial) and the reduced
one the channels. The host (launch.py) describes every layer by one row of an int64
table: the addresses of its tensors, its sizes, and the strides of up to three index
levels of the kept dims and of the reduced dims for each tensor, so any strided layout
is read in place. Feature addresses are element offsets from ``base`` (the first
layer's target), those of the partial sums and of their gradient are plain addresses.

The rows of a layer are (group, inner) with ``inner`` the innermost kept level: a
program owns BLOCK_R consecutive inner rows of one group and one of the layer's
``splits`` slices of K, so that its rows are contiguous whenever the innermost kept
level is. In the forward a layer with splits > 1 writes float32 (float64 for float64)
partial sums to a workspace; the last program of a row block to finish, counted with an
integer atomic on a counter the host zeroes for every launch, adds the splits up in
split order: deterministic, one launch, no float atomics. The tile is laid out with the
memory-contiguous axis last (ROWS_FAST says which) so that neighbouring threads read
neighbouring addresses; FAST_UNIT says that axis has unit stride in every layer. ALIGN
(16 bytes in elements, or 1) is the vector width for the layers whose ALIGNED column
says that every address, every stride off the fast axis and every length along it is a
multiple of ALIGN: those take a copy of the loop compiled with alignment hints (16-byte
loads), the others a plain copy, chosen per program at run time, so one unaligned layer
(a 7x7 map) does not cost the others their vector loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Columns of the layer table (int64, one row per layer); kernels read them as constexprs.
TARGET, SOURCE, OUTPUT, GRAD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
ROWS, K, SPLITS, K_PER_SPLIT = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
WORKSPACE, COUNTERS = tl.constexpr(8), tl.constexpr(9)  # element offsets into the shared buffers
KEPT_SIZES = tl.constexpr(10)  # sizes of the middle and inner kept levels (the outer one is implied)
REDUCED_SIZES = tl.constexpr(12)  # sizes of the middle and inner reduced levels
KEPT_STRIDES = tl.constexpr(14)  # (outer, middle, inner) kept-level strides of target, source, output
REDUCED_STRIDES = tl.constexpr(23)  # (outer, middle, inner) reduced-level strides of target, source, output
ALIGNED = tl.constexpr(32)  # 1: the layer may be read 16 bytes at a time (see ALIGN), else 0
FIELDS = tl.constexpr(33)


# Alignment hints (tl.multiple_of) must annotate the op that makes a value, in the function
# that makes it: on a helper's argument they are lost.


@triton.jit
def _feature_pointer(base, layer_row, FIELD: tl.constexpr, ALIGN: tl.constexpr):
    """A feature tensor's address, as an element offset from ``base`` (a real pointer
    argument, whose 16-byte alignment Triton knows; an integer cast to a pointer has none)."""
    offset = tl.load(layer_row + FIELD)
    if ALIGN > 1:
        offset = tl.multiple_of(offset, ALIGN)
    return base + offset


@triton.jit
def _pointer(layer_row, FIELD: tl.constexpr, DTYPE: tl.constexpr):
    """The address of a partial-sum tensor or of its gradient."""
    return tl.load(layer_row + FIELD).to(tl.pointer_type(DTYPE))


@triton.jit
def _row_offsets(layer_row, group, inner_index, tensor: tl.constexpr, UNIT: tl.constexpr):
    """Offsets of rows (group, inner_index) in one tensor (0 target, 1 source, 2 output):
    the group splits into (outer, middle) kept levels, the inner index has its own stride."""
    middle = tl.load(layer_row + KEPT_SIZES)
    strides = layer_row + KEPT_STRIDES + 3 * tensor
    group_start = (group // middle) * tl.load(strides) + (group % middle) * tl.load(strides + 1)
    if UNIT:
        offsets = group_start + inner_index
    else:
        offsets = group_start + inner_index * tl.load(strides + 2)
    return offsets


@triton.jit
def _k_offsets(layer_row, ks, tensor: tl.constexpr, UNIT: tl.constexpr):
    """Offsets along K in one tensor, K split into (outer, middle, inner) reduced levels."""
    if UNIT:
        offsets = ks
    else:
        middle = tl.load(layer_row + REDUCED_SIZES)
        inner = tl.load(layer_row + REDUCED_SIZES + 1)
        strides = layer_row + REDUCED_STRIDES + 3 * tensor
        rest = ks // inner
        offsets = (
            (rest // middle) * tl.load(strides)
            + (rest % middle) * tl.load(strides + 1)
            + (ks % inner) * tl.load(strides + 2)
        )
    return offsets


@triton.jit
def _tile_offsets(
    layer_row,
    group,
    inner_index,
    ks,
    tensor: tl.constexpr,
    ROWS_FAST: tl.constexpr,
    FAST_UNIT: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """Offsets of the (rows x ks) tile in one tensor, the contiguous axis last."""
    row_offsets = _row_offsets(layer_row, group, inner_index, tensor, ROWS_FAST and FAST_UNIT)
    k_offsets = _k_offsets(layer_row, ks, tensor, (not ROWS_FAST) and FAST_UNIT)
    if ROWS_FAST:
        offsets = k_offsets[:, None] + row_offsets[None, :]
        if ALIGN > 1:
            offsets = tl.max_contiguous(tl.multiple_of(offsets, [ALIGN, ALIGN]), [1, ALIGN])
    else:
        offsets = row_offsets[:, None] + k_offsets[None, :]
        if ALIGN > 1:
            offsets = tl.max_contiguous(tl.multiple_of(offsets, [ALIGN, ALIGN]), [1, ALIGN])
    return offsets


@triton.jit
def _tile_mask(row_mask, k_mask, ROWS_FAST: tl.constexpr):
    if ROWS_FAST:
        mask = k_mask[:, None] & row_mask[None, :]
    else:
        mask = row_mask[:, None] & k_mask[None, :]
    return mask


@triton.jit
def _programs_of(layer_row, BLOCK_R: tl.constexpr):
    """groups * cdiv(inner, BLOCK_R) * splits: the programs one layer takes."""
    inner = tl.load(layer_row + KEPT_SIZES + 1)
    return (tl.load(layer_row + ROWS) // inner) * tl.cdiv(inner, BLOCK_R) * tl.load(layer_row + SPLITS)


@triton.jit
def _find_layer(table, pid, NUM_LAYERS: tl.constexpr, BLOCK_R: tl.constexpr):
    """(layer, program index within it): layers own consecutive runs of programs."""
    layer = 0
    first = 0
    start = 0
    for candidate in tl.static_range(NUM_LAYERS):
        owns = pid >= start
        layer = tl.where(owns, candidate, layer)
        first = tl.where(owns, start, first)
        start += _programs_of(table + candidate * FIELDS, BLOCK_R)
    return layer, pid - first


@triton.jit
def _program_tile(table, NUM_LAYERS: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's layer row, row block, split, group and inner rows (with their flat
    index and mask), and where its slice of K begins."""
    layer, local = _find_layer(table, tl.program_id(0), NUM_LAYERS, BLOCK_R)
    layer_row = table + layer * FIELDS
    splits = tl.load(layer_row + SPLITS)
    row_block = local // splits
    split = local % splits
    inner = tl.load(layer_row + KEPT_SIZES + 1)
    blocks_per_group = tl.cdiv(inner, BLOCK_R)
    group = row_block // blocks_per_group
    inner_index = (row_block % blocks_per_group) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rows = group * inner + inner_index
    k_begin = split * tl.load(layer_row + K_PER_SPLIT)
    return layer_row, row_block, split, splits, group, inner_index, rows, inner_index < inner, k_begin


@triton.jit
def _bounds(layer_row, inner_index, k_begin, ROWS_FAST: tl.constexpr, ALIGN: tl.constexpr):
    """(row mask, end of this program's slice of K), with the fast axis's bound declared
    a multiple of ALIGN, so that masked loads can still be vectorised."""
    inner = tl.load(layer_row + KEPT_SIZES + 1)
    k_end = tl.minimum(k_begin + tl.load(layer_row + K_PER_SPLIT), tl.load(layer_row + K))
    if ALIGN > 1:
        if ROWS_FAST:
            inner = tl.multiple_of(inner, ALIGN)
        else:
            k_end = tl.multiple_of(k_end, ALIGN)
    return inner_index < inner, k_end


@triton.jit
def _k_block(k_start, BLOCK_K: tl.constexpr, ROWS_FAST: tl.constexpr, ALIGN: tl.constexpr):
    ks = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
    if ALIGN > 1 and not ROWS_FAST:
        ks = tl.multiple_of(ks, ALIGN)
    return ks


@triton.jit
def _forward_sum(
    base,
    layer_row,
    group,
    inner_index,
    k_begin,
    ACC: tl.constexpr,
    ROWS_FAST: tl.constexpr,
    FAST_UNIT: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """sum over this program's slice of K of (t - s)^2, one value per row, in ACC."""
    row_mask, k_end = _bounds(layer_row, inner_index, k_begin, ROWS_FAST, ALIGN)
    target = _feature_pointer(base, layer_row, TARGET, ALIGN)
    source = _feature_pointer(base, layer_row, SOURCE, ALIGN)
    if ROWS_FAST:
        acc = tl.zeros([BLOCK_K, BLOCK_R], dtype=ACC)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=ACC)
    for k_start in range(k_begin, k_end, BLOCK_K):
        ks = _k_block(k_start, BLOCK_K, ROWS_FAST, ALIGN)
        mask = _tile_mask(row_mask, ks < k_end, ROWS_FAST)
        t_offsets = _tile_offsets(layer_row, group, inner_index, ks, 0, ROWS_FAST, FAST_UNIT, ALIGN)
        s_offsets = _tile_offsets(layer_row, group, inner_index, ks, 1, ROWS_FAST, FAST_UNIT, ALIGN)
        diff = tl.load(target + t_offsets, mask=mask, other=0.0).to(ACC) - tl.load(
            source + s_offsets, mask=mask, other=0.0
        ).to(ACC)
        acc += diff * diff
    return tl.sum(acc, axis=0 if ROWS_FAST else 1)


@triton.jit
def _backward_tiles(
    base,
    layer_row,
    group,
    inner_index,
    twice,
    k_begin,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS_FAST: tl.constexpr,
    FAST_UNIT: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dt = twice * (t - s) over this program's rows and slice of K."""
    row_mask, k_end = _bounds(layer_row, inner_index, k_begin, ROWS_FAST, ALIGN)
    target = _feature_pointer(base, layer_row, TARGET, ALIGN)
    source = _feature_pointer(base, layer_row, SOURCE, ALIGN)
    output = _feature_pointer(base, layer_row, OUTPUT, ALIGN)
    if ROWS_FAST:
        twice_tile = twice[None, :]
    else:
        twice_tile = twice[:, None]
    for k_start in range(k_begin, k_end, BLOCK_K):
        ks = _k_block(k_start, BLOCK_K, ROWS_FAST, ALIGN)
        mask = _tile_mask(row_mask, ks < k_end, ROWS_FAST)
        t_offsets = _tile_offsets(layer_row, group, inner_index, ks, 0, ROWS_FAST, FAST_UNIT, ALIGN)
        s_offsets = _tile_offsets(layer_row, group, inner_index, ks, 1, ROWS_FAST, FAST_UNIT, ALIGN)
        o_offsets = _tile_offsets(layer_row, group, inner_index, ks, 2, ROWS_FAST, FAST_UNIT, ALIGN)
        t = tl.load(target + t_offsets, mask=mask, other=0.0)
        s = tl.load(source + s_offsets, mask=mask, other=0.0)
        tl.store(output + o_offsets, (twice_tile * (t.to(ACC) - s.to(ACC))).to(DTYPE), mask=mask)


@triton.jit
def sqdist_forward_kernel(
    base,
    table,
    workspace,
    counters,
    NUM_LAYERS: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS_FAST: tl.constexpr,
    FAST_UNIT: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[r] = sum_k (t[r, k] - s[r, k])^2 for every layer of the table, in ACC."""
    layer_row, row_block, split, splits, group, inner_index, rows, row_mask, k_begin = _program_tile(
        table, NUM_LAYERS, BLOCK_R
    )
    if ALIGN > 1:
        if tl.load(layer_row + ALIGNED) != 0:
            partial = _forward_sum(
                base, layer_row, group, inner_index, k_begin, ACC, ROWS_FAST, FAST_UNIT, ALIGN, BLOCK_R, BLOCK_K
            )
        else:
            partial = _forward_sum(
                base, layer_row, group, inner_index, k_begin, ACC, ROWS_FAST, FAST_UNIT, 1, BLOCK_R, BLOCK_K
            )
    else:
        partial = _forward_sum(
            base, layer_row, group, inner_index, k_begin, ACC, ROWS_FAST, FAST_UNIT, 1, BLOCK_R, BLOCK_K
        )

    output = _pointer(layer_row, OUTPUT, ACC)
    if splits == 1:
        tl.store(output + rows, partial, mask=row_mask)
    else:
        row_count = tl.load(layer_row + ROWS)
        slices = workspace + tl.load(layer_row + WORKSPACE)
        tl.store(slices + split * row_count + rows, partial, mask=row_mask)
        counter = counters + tl.load(layer_row + COUNTERS) + row_block
        # Every thread's partial sums are stored before the one thread that counts releases
        # them (the barrier), as in the Triton layer-norm tutorial's locked reduction.
        tl.debug_barrier()
        finished = tl.atomic_add(counter, 1, sem="acq_rel")
        if finished == splits - 1:
            total = tl.zeros([BLOCK_R], dtype=ACC)
            for index in range(0, splits):
                total += tl.load(slices + index * row_count + rows, mask=row_mask, other=0.0, cache_modifier=".cg")
            tl.store(output + rows, total, mask=row_mask)


@triton.jit
def sqdist_backward_kernel(
    base,
    table,
    NUM_LAYERS: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS_FAST: tl.constexpr,
    FAST_UNIT: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dt[r, k] = 2 * g[r] * (t[r, k] - s[r, k]) for every layer of the table."""
    layer_row, row_block, split, splits, group, inner_index, rows, row_mask, k_begin = _program_tile(
        table, NUM_LAYERS, BLOCK_R
    )
    twice = 2 * tl.load(_pointer(layer_row, GRAD, ACC) + rows, mask=row_mask, other=0.0)
    if ALIGN > 1:
        if tl.load(layer_row + ALIGNED) != 0:
            _backward_tiles(
                base,
                layer_row,
                group,
                inner_index,
                twice,
                k_begin,
                DTYPE,
                ACC,
                ROWS_FAST,
                FAST_UNIT,
                ALIGN,
                BLOCK_R,
                BLOCK_K,
            )
        else:
            _backward_tiles(
                base,
                layer_row,
                group,
                inner_index,
                twice,
                k_begin,
                DTYPE,
                ACC,
                ROWS_FAST,
                FAST_UNIT,
                1,
                BLOCK_R,
                BLOCK_K,
            )
    else:
        _backward_tiles(
            base, layer_row, group, inner_index, twice, k_begin, DTYPE, ACC, ROWS_FAST, FAST_UNIT, 1, BLOCK_R, BLOCK_K
        )
