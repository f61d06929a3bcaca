// Host side of the CUDA squared-distance kernels: a layer's LayerDesc from the
// ReductionPlan of its strides, the launch shape of each pass, and the split of a list of
// layers into launches. Plain C++ on the stable ABI's Tensor (no CUDA runtime calls).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/reduction_plan.h"
#include "../sqdist_checks.h"
#include "sqdist_kernels.cuh"

namespace afa_ext {
namespace cuda {

// Row walks: vector chunks per thread of a row before the row gets more threads.
constexpr int64_t kChunksPerLane = 8;
// Column walks: at least 8 threads along the inner dim (8 x 16 bytes, a 128-byte line per
// row read), halved while each slice of the reduced rows keeps at least kMinRowsPerSlice.
constexpr int64_t kMinColumnThreads = 8;
constexpr int64_t kMinRowsPerSlice = 16;
// Every CUDA driver accepts 4 KiB of kernel parameters.
constexpr size_t kMaxParameterBytes = 4096;

inline int64_t ceil_div_host(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t power_of_two_at_least(int64_t n) {
  int64_t power = 1;
  while (power < n) power *= 2;
  return power;
}

inline ReductionPlan plan_of(Grouping grouping, const Tensor& target, const Tensor& source,
                             const Tensor& grad_target) {
  return make_reduction_plan(grouping, as_vector(target.sizes()), as_vector(target.strides()),
                             as_vector(source.strides()), as_vector(grad_target.strides()));
}

// Whether the plan's outer dims fit a LayerDesc (always, for features of up to 5 dims).
inline bool fits_descriptor(const ReductionPlan& plan) {
  return plan.kept.size() <= static_cast<size_t>(kMaxOuterDims) &&
         plan.reduced.size() <= static_cast<size_t>(kMaxOuterDims);
}

inline StridedDim strided_dim(const PlanDim& dim) {
  return StridedDim{dim.size, dim.target, dim.source, dim.grad, dim.partial};
}

inline OuterDims outer_dims(const std::vector<PlanDim>& dims) {
  OuterDims outer{};
  outer.count = static_cast<int>(dims.size());
  outer.numel = 1;
  for (size_t d = 0; d < dims.size(); ++d) {
    outer.dim[d] = strided_dim(dims[d]);
    outer.numel *= dims[d].size;
  }
  return outer;
}

inline bool is_aligned(const void* address) { return reinterpret_cast<uintptr_t>(address) % kVectorBytes == 0; }

// Whether the inner dim can be read (and written) in 16-byte chunks of `width` elements:
// unit inner strides, aligned base pointers and every row start a multiple of `width`.
// grad_target is null in the forward.
inline bool vectorisable(const ReductionPlan& plan, int64_t width, const void* target, const void* source,
                         const void* grad_target) {
  const bool with_grad = grad_target != nullptr;
  if (plan.inner.target != 1 || plan.inner.source != 1 || (with_grad && plan.inner.grad != 1)) return false;
  if (!is_aligned(target) || !is_aligned(source) || (with_grad && !is_aligned(grad_target))) return false;
  auto rows_aligned = [&](const std::vector<PlanDim>& dims) {
    return std::all_of(dims.begin(), dims.end(), [&](const PlanDim& dim) {
      return dim.target % width == 0 && dim.source % width == 0 && (!with_grad || dim.grad % width == 0);
    });
  };
  return rows_aligned(plan.kept) && rows_aligned(plan.reduced);
}

// The layer's pointers and dims; the launch shape is set by shape_forward/shape_backward.
// grad_target is null in the forward.
template <typename scalar_t>
LayerDesc<scalar_t> describe_layer(const ReductionPlan& plan, const Tensor& target, const Tensor& source,
                                   const Tensor* grad_target) {
  LayerDesc<scalar_t> layer{};
  layer.target = target.const_data_ptr<scalar_t>();
  layer.source = source.const_data_ptr<scalar_t>();
  layer.grad_target = grad_target ? grad_target->mutable_data_ptr<scalar_t>() : nullptr;
  layer.inner = strided_dim(plan.inner);
  layer.kept = outer_dims(plan.kept);
  layer.reduced = outer_dims(plan.reduced);
  layer.inner_kept = plan.inner.kept;
  layer.vectorised =
      vectorisable(plan, vector_width<scalar_t>(), layer.target, layer.source, layer.grad_target);
  return layer;
}

template <typename scalar_t>
int64_t inner_chunks(const LayerDesc<scalar_t>& layer) {
  return ceil_div_host(layer.inner.size, layer.vectorised ? vector_width<scalar_t>() : 1);
}

inline int32_t row_lanes(int64_t chunks) {
  return static_cast<int32_t>(
      std::min<int64_t>(kThreads, power_of_two_at_least(ceil_div_host(chunks, kChunksPerLane))));
}

// Sets the forward launch shape of the layer; returns its block count.
template <typename scalar_t>
int64_t shape_forward(LayerDesc<scalar_t>& layer) {
  const int64_t chunks = inner_chunks(layer);
  layer.tiles = 1;
  if (!layer.inner_kept) {
    layer.lanes = row_lanes(chunks);
    return ceil_div_host(layer.kept.numel, kThreads / layer.lanes);
  }
  int64_t columns = std::clamp<int64_t>(power_of_two_at_least(chunks), kMinColumnThreads, kThreads);
  while (columns > kMinColumnThreads && layer.reduced.numel >= 2 * (kThreads / columns) * kMinRowsPerSlice) {
    columns /= 2;
  }
  layer.lanes = static_cast<int32_t>(columns);
  layer.tiles = ceil_div_host(chunks, columns);
  return layer.kept.numel * layer.tiles;
}

// Sets the backward launch shape of the layer; returns its block count.
template <typename scalar_t>
int64_t shape_backward(LayerDesc<scalar_t>& layer) {
  const int64_t chunks = inner_chunks(layer);
  layer.lanes = row_lanes(chunks);
  layer.tiles = layer.lanes == kThreads ? ceil_div_host(chunks, kThreads * kChunksPerLane) : 1;
  const int64_t rows = layer.kept.numel * layer.reduced.numel;
  return ceil_div_host(rows, kThreads / layer.lanes) * layer.tiles;
}

// The parameters and grid size of one launch.
template <typename scalar_t>
struct PlannedLaunch {
  MultiLayerLaunch<scalar_t> params;
  unsigned int blocks;
};

// One launch per kMaxLayersPerLaunch layers: that many descriptors fill the 4 KiB of
// parameters every driver accepts, and models hook 4 or 5 layers, so in practice one.
template <typename scalar_t>
std::vector<PlannedLaunch<scalar_t>> plan_launches(const std::vector<LayerDesc<scalar_t>>& layers,
                                                   const std::vector<int64_t>& blocks) {
  static_assert(sizeof(MultiLayerLaunch<scalar_t>) <= kMaxParameterBytes, "launch parameters over 4 KiB");
  std::vector<PlannedLaunch<scalar_t>> launches;
  for (size_t first = 0; first < layers.size(); first += kMaxLayersPerLaunch) {
    const size_t count = std::min<size_t>(kMaxLayersPerLaunch, layers.size() - first);
    PlannedLaunch<scalar_t> launch{};
    launch.params.count = static_cast<int32_t>(count);
    int64_t total = 0;
    for (size_t i = 0; i < count; ++i) {
      launch.params.layer[i] = layers[first + i];
      launch.params.first_block[i] = static_cast<int32_t>(total);
      total += blocks[first + i];
      AFA_CHECK(total <= std::numeric_limits<int32_t>::max(), "afa_ext: the features need ", total,
                " CUDA blocks in one launch, more than the grid allows");
    }
    launch.params.first_block[count] = static_cast<int32_t>(total);
    launch.blocks = static_cast<unsigned int>(total);
    launches.push_back(launch);
  }
  return launches;
}

}  // namespace cuda
}  // namespace afa_ext
