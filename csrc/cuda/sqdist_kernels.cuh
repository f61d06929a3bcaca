// Device side of the CUDA squared-distance kernels (README.md, "How it works"): the
// descriptor of one layer, the parameter block of a multi-layer launch, and the forward and
// backward kernels.
//
//   forward:  partial[k] = sum over the reduced dims of (t - s)^2      (k: a kept index)
//   backward: dt = 2 * weights[k] * (t - s)
//
// A layer is walked as the host's ReductionPlan describes it: an inner dim (of unit
// stride in t where one exists) and up to kMaxOuterDims kept and reduced outer dims. One
// launch covers up to kMaxLayersPerLaunch layers: block b works on the layer whose range
// [first_block[l], first_block[l + 1]) holds b. Every partial sum is reduced by one block
// in an order fixed by the layer's shape and strides: no atomics, bitwise-reproducible.
#pragma once

#include <cstdint>

#include "../common/scalar_types.h"
#include "../common/sqdist_math.h"

namespace afa_ext {
namespace cuda {

constexpr int kThreads = 256;  // threads per block, in every kernel
constexpr int kWarpSize = 32;
constexpr int kMaxOuterDims = 3;
constexpr int kMaxLayersPerLaunch = 8;
constexpr int kVectorBytes = 16;
// Resident blocks per SM the kernels are compiled for (at most 85 and 51 registers a
// thread, no spills): with a few 16-byte loads in flight per thread, 768 threads per SM
// already cover the latency of HBM, and the forward's general stride walks need them.
constexpr int kForwardBlocksPerSM = 3;
constexpr int kBackwardBlocksPerSM = 5;

// Features per 16-byte load: 8 halves, 4 floats, 2 doubles. Host and device (without
// relying on nvcc's --expt-relaxed-constexpr).
template <typename scalar_t>
AFA_HOST_DEVICE constexpr int vector_width() {
  return kVectorBytes / static_cast<int>(sizeof(scalar_t));
}

// One dim of the iteration space: its size and its element stride in each tensor.
struct StridedDim {
  int64_t size;
  int64_t target;
  int64_t source;
  int64_t grad_target;  // dt, backward only
  int64_t partial;      // the contiguous (B, C) or (B, P) sums (or their grad); 0 if reduced
};

// Dims walked by one flat row-major index, outermost first; unused entries are ignored.
struct OuterDims {
  StridedDim dim[kMaxOuterDims];
  int count;
  int64_t numel;  // product of the used sizes (1 when count is 0)
};

template <typename scalar_t>
struct LayerDesc {
  using acc_t = accumulate_t<scalar_t>;
  const scalar_t* target;
  const scalar_t* source;
  acc_t* partial;          // forward output: d (B, C) or e (B, P)
  const acc_t* weights;    // backward input: the upstream gradient of d or e
  scalar_t* grad_target;   // backward output: dt
  StridedDim inner;
  OuterDims kept;
  OuterDims reduced;
  // Launch shape, chosen on the host: lanes is a power of two dividing kThreads. Row
  // walks (forward with a reduced inner dim, and every backward): lanes threads per row,
  // kThreads / lanes rows per block, each row cut into `tiles` blocks (backward only).
  // Column walks (forward with a kept inner dim): lanes threads along the inner dim,
  // kThreads / lanes slices of the reduced rows, `tiles` blocks per kept outer index.
  int64_t tiles;
  int32_t lanes;
  bool inner_kept;
  bool vectorised;  // unit inner strides, 16-byte aligned rows: 16-byte loads and stores
};

// Kernel parameter block of one multi-layer launch (static_assert'ed under 4 KiB on the host).
template <typename scalar_t>
struct MultiLayerLaunch {
  LayerDesc<scalar_t> layer[kMaxLayersPerLaunch];
  int32_t first_block[kMaxLayersPerLaunch + 1];  // prefix sums of the layers' block counts
  int32_t count;
};

// ---------------------------------------------------------------------------- device code

#if defined(__CUDACC__)

struct ElementOffsets {
  int64_t target = 0, source = 0, grad_target = 0, partial = 0;

  __device__ __forceinline__ void add(const StridedDim& dim, int64_t index) {
    target += index * dim.target;
    source += index * dim.source;
    grad_target += index * dim.grad_target;
    partial += index * dim.partial;
  }

  __device__ __forceinline__ ElementOffsets operator+(const ElementOffsets& other) const {
    ElementOffsets sum;
    sum.target = target + other.target;
    sum.source = source + other.source;
    sum.grad_target = grad_target + other.grad_target;
    sum.partial = partial + other.partial;
    return sum;
  }
};

// Offsets of the flat row-major index `index` of `dims`.
__device__ __forceinline__ ElementOffsets offsets_of(const OuterDims& dims, int64_t index) {
  ElementOffsets offsets;
#pragma unroll
  for (int d = kMaxOuterDims - 1; d >= 0; --d) {
    if (d >= dims.count) continue;
    if (d == 0) {  // the outermost dim takes what is left: no division
      offsets.add(dims.dim[0], index);
    } else {
      offsets.add(dims.dim[d], index % dims.dim[d].size);
      index /= dims.dim[d].size;
    }
  }
  return offsets;
}

// Walks the flat row-major indices of `dims` from `start` one at a time, keeping their
// offsets up to date: one division per dim at the start, none per step.
class OuterWalker {
 public:
  __device__ __forceinline__ OuterWalker(const OuterDims& dims, int64_t start) : dims_(dims) {
#pragma unroll
    for (int d = kMaxOuterDims - 1; d >= 0; --d) {
      index_[d] = 0;
      if (d >= dims.count) continue;
      index_[d] = d == 0 ? start : start % dims.dim[d].size;  // the outermost dim takes the rest
      if (d > 0) start /= dims.dim[d].size;
      offsets_.add(dims.dim[d], index_[d]);
    }
  }

  __device__ __forceinline__ const ElementOffsets& offsets() const { return offsets_; }

  __device__ __forceinline__ void next() {
#pragma unroll
    for (int d = kMaxOuterDims - 1; d >= 0; --d) {
      if (d >= dims_.count) continue;
      offsets_.add(dims_.dim[d], 1);
      if (++index_[d] < dims_.dim[d].size || d == 0) return;
      offsets_.add(dims_.dim[d], -dims_.dim[d].size);
      index_[d] = 0;
    }
  }

 private:
  const OuterDims& dims_;
  int64_t index_[kMaxOuterDims];
  ElementOffsets offsets_;
};

__device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

// Iterations of a thread's streaming loop unrolled, so that a few loads are in flight:
// two 16-byte chunks, or four elements on the strided path.
template <int V>
__host__ __device__ constexpr int unroll_factor() {
  return V > 1 ? 2 : 4;
}

// V features moved as one 16-byte access: read through the read-only cache, written with
// an explicit vector store.
//
// Both assume that no memory a launch reads is written by that launch. __ldg loads through
// the non-coherent read-only cache, which does not see the launch's own stores; store_pack
// lets loads move across it. So a gradient must share no byte with any target, source or
// weights of its launch (of any layer, as one launch runs every layer): the host checks
// that before each backward launch (check_gradients_apart_from_inputs, sqdist_host.h).
template <typename T, int V>
struct alignas(kVectorBytes) Pack {
  static_assert(sizeof(T) * V == kVectorBytes, "a Pack is one 16-byte access");
  T value[V];
};

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* address) {
  const uint4 bits = __ldg(reinterpret_cast<const uint4*>(address));
  Pack<T, V> pack;
  memcpy(&pack, &bits, kVectorBytes);
  return pack;
}

// An explicit vector store: left to itself, the compiler splits this one into four 4-byte
// stores. No "memory" clobber: nothing in these kernels reads what they write (dt never
// aliases t, s or the weights, see Pack), so loads may move across it.
template <int V, typename T>
__device__ __forceinline__ void store_pack(T* address, const Pack<T, V>& pack) {
  uint4 bits;
  memcpy(&bits, &pack, kVectorBytes);
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(address), "r"(bits.x), "r"(bits.y), "r"(bits.z),
               "r"(bits.w));
#else
  *reinterpret_cast<uint4*>(address) = bits;
#endif
}

// sums[v] += (t - s)^2 at inner index first + v, v < V: with V > 1 (unit inner strides)
// one 16-byte load from each tensor, with V = 1 one element through the inner strides.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void accumulate_chunk(acc_t (&sums)[V], const scalar_t* __restrict__ t,
                                                 const scalar_t* __restrict__ s, const StridedDim& inner,
                                                 int64_t first) {
  if constexpr (V > 1) {
    const Pack<scalar_t, V> tv = load_pack<V>(t + first);
    const Pack<scalar_t, V> sv = load_pack<V>(s + first);
#pragma unroll
    for (int v = 0; v < V; ++v) sums[v] += squared_difference<acc_t>(tv.value[v], sv.value[v]);
  } else {
    sums[0] += squared_difference<acc_t>(t[first * inner.target], s[first * inner.source]);
  }
}

// sums[v] += (t - s)^2 at inner index first + v, for v < count (a chunk cut by the end).
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void accumulate_partial_chunk(acc_t (&sums)[V], const scalar_t* __restrict__ t,
                                                         const scalar_t* __restrict__ s, const StridedDim& inner,
                                                         int64_t first, int64_t count) {
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int64_t i = first + v;
    if (v < count) sums[v] += squared_difference<acc_t>(t[i * inner.target], s[i * inner.source]);
  }
}

template <int V, typename acc_t>
__device__ __forceinline__ acc_t sum_in_order(const acc_t (&values)[V]) {
  acc_t sum = values[0];
#pragma unroll
  for (int v = 1; v < V; ++v) sum += values[v];
  return sum;
}

// The total of `value` over the `lanes` consecutive threads of a row (a power of two, the
// same for the whole block). A butterfly of warp shuffles, then, for rows wider than a
// warp, the warp totals in warp order.
//
// Every thread of the block must call it, also threads without a row: the shuffles name
// all 32 lanes of the warp, and rows wider than a warp meet at a __syncthreads. At most
// once per block: scratch[warp] is written, the block synchronises and each thread reads
// its row's warp totals, with no barrier after the reads. A second call would let the
// first thread of a warp overwrite scratch[warp] while slower threads of its row still read
// the first total; it needs a __syncthreads before it (or scratch of its own). scratch
// holds at least kThreads / kWarpSize values.
template <typename acc_t>
__device__ __forceinline__ acc_t sum_across_lanes(acc_t value, int lanes, acc_t* scratch) {
  for (int offset = (lanes < kWarpSize ? lanes : kWarpSize) / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  if (lanes <= kWarpSize) return value;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) scratch[warp] = value;
  __syncthreads();
  const int warps_per_row = lanes / kWarpSize;
  const int first_warp = warp - warp % warps_per_row;
  acc_t total = scratch[first_warp];
  for (int w = 1; w < warps_per_row; ++w) total += scratch[first_warp + w];
  return total;
}

// Forward with a reduced inner dim (channel grouping of NCHW, spatial of channels_last):
// `lanes` threads sum one kept index's rows; rows of the block are consecutive kept
// indices. Whole chunks first, then the tail of the row (shorter than a chunk).
template <int V, typename scalar_t, typename acc_t>
__device__ void row_sqdist_forward(const LayerDesc<scalar_t>& layer, int64_t block, acc_t* scratch) {
  const int lanes = layer.lanes;
  const int lane = static_cast<int>(threadIdx.x) & (lanes - 1);
  const int64_t row = block * (kThreads / lanes) + static_cast<int>(threadIdx.x) / lanes;
  const bool active = row < layer.kept.numel;
  acc_t sums[V] = {};
  ElementOffsets base;
  if (active) {
    base = offsets_of(layer.kept, row);
    const int64_t whole_chunks = layer.inner.size / V;
    OuterWalker rows(layer.reduced, 0);
    for (int64_t r = 0; r < layer.reduced.numel; ++r, rows.next()) {
      const ElementOffsets segment = base + rows.offsets();
      const scalar_t* t = layer.target + segment.target;
      const scalar_t* s = layer.source + segment.source;
#pragma unroll (unroll_factor<V>())
      for (int64_t chunk = lane; chunk < whole_chunks; chunk += lanes) {
        accumulate_chunk<V>(sums, t, s, layer.inner, chunk * V);
      }
      if constexpr (V > 1) {  // the tail, at unit strides
#pragma unroll 1
        for (int64_t i = whole_chunks * V + lane; i < layer.inner.size; i += lanes) {
          sums[0] += squared_difference<acc_t>(t[i], s[i]);
        }
      }
    }
  }
  const acc_t total = sum_across_lanes(sum_in_order(sums), lanes, scratch);
  if (active && lane == 0) layer.partial[base.partial] = total;
}

// Forward with a kept inner dim (spatial grouping of NCHW, channel of channels_last): each
// thread owns V consecutive inner indices of one tile and sums one slice (a consecutive
// range) of the reduced rows; the slices then add up in shared memory in slice order.
// Like sum_across_lanes, it uses scratch once per block, with no barrier after the reads.
template <int V, typename scalar_t, typename acc_t>
__device__ void column_sqdist_forward(const LayerDesc<scalar_t>& layer, int64_t block, acc_t* scratch) {
  const int columns = layer.lanes;
  const int slices = kThreads / columns;
  const int column = static_cast<int>(threadIdx.x) % columns;
  const int slice = static_cast<int>(threadIdx.x) / columns;
  const int64_t outer = block / layer.tiles;
  const int64_t first = ((block % layer.tiles) * columns + column) * V;
  const int64_t count = min(int64_t(V), layer.inner.size - first);  // inner indices owned
  const ElementOffsets base = offsets_of(layer.kept, outer);
  acc_t sums[V] = {};
  if (count > 0) {
    const scalar_t* t = layer.target + base.target;
    const scalar_t* s = layer.source + base.source;
    const int64_t rows_per_slice = ceil_div(layer.reduced.numel, slices);
    const int64_t first_row = slice * rows_per_slice;
    const int64_t end_row = min(layer.reduced.numel, first_row + rows_per_slice);
    OuterWalker rows(layer.reduced, first_row < end_row ? first_row : 0);
    if (count == V) {
#pragma unroll (unroll_factor<V>())
      for (int64_t r = first_row; r < end_row; ++r, rows.next()) {
        accumulate_chunk<V>(sums, t + rows.offsets().target, s + rows.offsets().source, layer.inner, first);
      }
    } else {
      for (int64_t r = first_row; r < end_row; ++r, rows.next()) {
        accumulate_partial_chunk<V>(sums, t + rows.offsets().target, s + rows.offsets().source, layer.inner,
                                    first, count);
      }
    }
  }
  if (slices > 1) {
#pragma unroll
    for (int v = 0; v < V; ++v) scratch[v * kThreads + threadIdx.x] = sums[v];
    __syncthreads();
    if (slice == 0) {
      for (int other = 1; other < slices; ++other) {
#pragma unroll
        for (int v = 0; v < V; ++v) sums[v] += scratch[v * kThreads + other * columns + column];
      }
    }
  }
  if (slice != 0) return;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    if (v < count) layer.partial[base.partial + (first + v) * layer.inner.partial] = sums[v];
  }
}

// The backward's view of one row: where it starts in each tensor, and its weight. The
// __restrict__ qualifiers rest on the no-alias condition of Pack (checked on the host);
// they also let the compiler read t, s and the weights through the read-only cache.
template <typename scalar_t, typename acc_t>
struct GradientRow {
  scalar_t* __restrict__ dt;
  const scalar_t* __restrict__ t;
  const scalar_t* __restrict__ s;
  const acc_t* __restrict__ weights;  // the row's weight, or the first of its weights
  acc_t row_twice_weight;             // 2 * weights[0], when one weight covers the row
  bool weight_per_element;            // the inner dim is kept: weights[i * inner.partial]

  __device__ __forceinline__ acc_t twice_weight(const StridedDim& inner, int64_t i) const {
    if (!weight_per_element) return row_twice_weight;
    const acc_t weight = weights[i * inner.partial];
    return weight + weight;
  }
};

// dt = 2 * w * (t - s) at inner index i, through the inner strides.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_gradient_element(const GradientRow<scalar_t, acc_t>& row,
                                                       const StridedDim& inner, int64_t i) {
  row.dt[i * inner.grad_target] =
      distance_gradient<acc_t>(row.twice_weight(inner, i), row.t[i * inner.target], row.s[i * inner.source]);
}

// dt = 2 * w * (t - s) at inner index first + v, v < V: one 16-byte load from t and s and
// one 16-byte store to dt when V > 1 (unit inner strides).
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_gradient_chunk(const GradientRow<scalar_t, acc_t>& row,
                                                     const StridedDim& inner, int64_t first) {
  if constexpr (V > 1) {
    const Pack<scalar_t, V> tv = load_pack<V>(row.t + first);
    const Pack<scalar_t, V> sv = load_pack<V>(row.s + first);
    Pack<scalar_t, V> gradient;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      gradient.value[v] = distance_gradient<acc_t>(row.twice_weight(inner, first + v), tv.value[v], sv.value[v]);
    }
    store_pack<V>(row.dt + first, gradient);
  } else {
    write_gradient_element(row, inner, first);
  }
}

// Backward: rows are (kept outer, reduced outer) index pairs, the reduced index fastest;
// `lanes` threads write one tile of a row, whole chunks first, then the row's tail.
template <int V, typename scalar_t>
__device__ void sqdist_backward_rows(const LayerDesc<scalar_t>& layer, int64_t block) {
  using acc_t = accumulate_t<scalar_t>;
  const int lanes = layer.lanes;
  const int lane = static_cast<int>(threadIdx.x) & (lanes - 1);
  const int64_t row_index = (block / layer.tiles) * (kThreads / lanes) + static_cast<int>(threadIdx.x) / lanes;
  const int64_t reduced_rows = layer.reduced.numel;
  if (row_index >= layer.kept.numel * reduced_rows) return;
  const ElementOffsets at =
      offsets_of(layer.kept, row_index / reduced_rows) + offsets_of(layer.reduced, row_index % reduced_rows);
  GradientRow<scalar_t, acc_t> row{layer.grad_target + at.grad_target, layer.target + at.target,
                                   layer.source + at.source, layer.weights + at.partial, acc_t(0),
                                   layer.inner_kept};
  if (!row.weight_per_element) row.row_twice_weight = row.weights[0] + row.weights[0];
  const int64_t whole_chunks = layer.inner.size / V;
  const int64_t chunks_per_tile = ceil_div(ceil_div(layer.inner.size, V), layer.tiles);
  const int64_t tile_begin = (block % layer.tiles) * chunks_per_tile;
  const int64_t tile_end = tile_begin + chunks_per_tile;
#pragma unroll (unroll_factor<V>())
  for (int64_t chunk = tile_begin + lane; chunk < min(tile_end, whole_chunks); chunk += lanes) {
    write_gradient_chunk<V>(row, layer.inner, chunk * V);
  }
  if constexpr (V > 1) {
    if (whole_chunks >= tile_begin && whole_chunks < tile_end) {  // the tail is in this tile
#pragma unroll 1
      for (int64_t i = whole_chunks * V + lane; i < layer.inner.size; i += lanes) {
        write_gradient_element(row, layer.inner, i);
      }
    }
  }
}

// The layer block blockIdx.x works on (a short scan: a launch holds a few layers).
template <typename scalar_t>
__device__ __forceinline__ int layer_of_block(const MultiLayerLaunch<scalar_t>& launch) {
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int layer = 0;
  while (layer + 1 < launch.count && block >= launch.first_block[layer + 1]) ++layer;
  return layer;
}

// partial[k] = sum over the reduced dims of (t - s)^2, for every layer of the launch.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kForwardBlocksPerSM)
    sqdist_forward_layers_kernel(const __grid_constant__ MultiLayerLaunch<scalar_t> launch) {
  using acc_t = accumulate_t<scalar_t>;
  constexpr int V = vector_width<scalar_t>();
  // Used once by the block's one reduction: the row and column walks do not synchronise
  // after reading it.
  __shared__ acc_t scratch[kThreads * V];
  const int index = layer_of_block(launch);
  const LayerDesc<scalar_t>& layer = launch.layer[index];
  const int64_t block = static_cast<int64_t>(blockIdx.x) - launch.first_block[index];
  if (layer.inner_kept) {
    if (layer.vectorised) {
      column_sqdist_forward<V>(layer, block, scratch);
    } else {
      column_sqdist_forward<1>(layer, block, scratch);
    }
  } else if (layer.vectorised) {
    row_sqdist_forward<V>(layer, block, scratch);
  } else {
    row_sqdist_forward<1>(layer, block, scratch);
  }
}

// dt = 2 * weights[k] * (t - s), for every layer of the launch.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kBackwardBlocksPerSM)
    sqdist_backward_layers_kernel(const __grid_constant__ MultiLayerLaunch<scalar_t> launch) {
  constexpr int V = vector_width<scalar_t>();
  const int index = layer_of_block(launch);
  const LayerDesc<scalar_t>& layer = launch.layer[index];
  const int64_t block = static_cast<int64_t>(blockIdx.x) - launch.first_block[index];
  if (layer.vectorised) {
    sqdist_backward_rows<V>(layer, block);
  } else {
    sqdist_backward_rows<1>(layer, block);
  }
}

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace afa_ext
