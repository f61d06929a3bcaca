// Fused CPU kernels of the squared distance grouped by channel or by position (README.md,
// "How it works").
//
//   forward:  partial[k] = sum over the reduced dims of (t - s)^2, k a kept index
//   backward: dt = 2 * grad[k] * (t - s)
//
// One pass over t and s each way; nothing N-sized is held between the passes, and large
// gradients are streamed past the caches (vec.h's write_vector). Every partial sum is computed
// by one thread in an order fixed by the shapes and strides alone, so the results are
// bitwise-identical from run to run and across thread counts.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

#include "../common/reduction_plan.h"
#include "../common/scalar_types.h"
#include "../common/sqdist_math.h"
#include "../sqdist_checks.h"
#include "huge_page_allocator.h"
#include "vec.h"

namespace afa_ext {
namespace {

using cpu::Lanes;
namespace stable = torch::stable;

// Elements per parallel work item, below which splitting further costs more than it saves.
constexpr int64_t kGrainElements = 32768;
// Bounds on the slice of a kept inner dim one work item sums: its float block stays in L1,
// its double totals (touched once per kRowsPerBlock rows) in L2.
constexpr int64_t kMaxTile = 4096;
constexpr int64_t kMinTile = 256;
// Work items per thread the forward aims for when a kept inner dim can be cut finer. Few:
// rows cut into slices stream worse than whole rows (the four-layer spatial forward at
// batch 4 ran about 25% slower with 4 items per thread than with 2).
constexpr int64_t kItemsPerThread = 2;
// Rows summed into one float block before it is added to the running total (accuracy).
constexpr int64_t kRowsPerBlock = 256;
// Rows of a kept inner dim added into its sums per pass over them (register blocking).
constexpr int kRowsAtOnce = 4;
// Elements of one row summed in vector registers before a horizontal add (accuracy).
constexpr int64_t kRowBlock = 4096;
// Gradients at least this large are written with streaming stores (vec.h's write_vector).
constexpr int64_t kStreamBytes = int64_t(2) << 20;
constexpr int64_t kCacheLine = 64;
// The running total across blocks and rows: double, so that long reductions of float
// partial sums lose nothing more than one rounding per block.
using total_t = double;

// Offsets of one position in every tensor walked.
struct Offsets {
  int64_t target = 0, source = 0, grad = 0, partial = 0;

  void add(const PlanDim& dim, int64_t index) {
    target += index * dim.target;
    source += index * dim.source;
    grad += index * dim.grad;
    partial += index * dim.partial;
  }
};

// Walks the indices of ``dims`` in row-major order from ``start``, keeping the offsets
// up to date.
class RowWalker {
 public:
  RowWalker(const std::vector<PlanDim>& dims, int64_t start) : dims_(dims) {
    if (dims.size() > kInline) heap_.assign(dims.size(), 0);
    for (size_t d = dims.size(); d-- > 0;) {
      index(d) = start % dims[d].size;
      offsets_.add(dims[d], index(d));
      start /= dims[d].size;
    }
  }

  const Offsets& offsets() const { return offsets_; }

  void next() {
    for (size_t d = dims_.size(); d-- > 0;) {
      offsets_.add(dims_[d], 1);
      if (++index(d) < dims_[d].size) return;
      offsets_.add(dims_[d], -dims_[d].size);
      index(d) = 0;
    }
  }

 private:
  // The index of each dim, in inline_ up to kInline dims (one walker is made per work
  // item, so no heap allocation in the common case), else in heap_.
  static constexpr size_t kInline = 8;
  int64_t& index(size_t d) { return dims_.size() <= kInline ? inline_[d] : heap_[d]; }

  const std::vector<PlanDim>& dims_;
  std::array<int64_t, kInline> inline_{};
  std::vector<int64_t> heap_;
  Offsets offsets_;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t product_of_sizes(const std::vector<PlanDim>& dims) {
  int64_t product = 1;
  for (const auto& dim : dims) product *= dim.size;
  return product;
}

// sum_i (t[i] - s[i])^2 over a contiguous row, in blocks of kRowBlock for accuracy.
template <typename scalar_t, typename acc_t = accumulate_t<scalar_t>>
total_t contiguous_row_sqdist(const scalar_t* t, const scalar_t* s, int64_t n) {
  using L = Lanes<scalar_t>;
  using AccVec = typename L::AccVec;
  constexpr int64_t kPair = 2 * L::kStep;
  const int64_t vector_end = n - n % kPair;
  total_t total = 0;
  int64_t i = 0;
  while (i < vector_end) {
    AccVec acc[2 * L::kParts];
    for (auto& a : acc) a = AccVec::broadcast(acc_t(0));
    const int64_t block_end = std::min(vector_end, i + kRowBlock);
    for (; i < block_end; i += kPair) {
      AccVec tv[L::kParts], sv[L::kParts];
      for (int64_t half = 0; half < 2; ++half) {
        L::load(t + i + half * L::kStep, tv);
        L::load(s + i + half * L::kStep, sv);
        for (int p = 0; p < L::kParts; ++p) {
          const AccVec diff = tv[p] - sv[p];
          acc[half * L::kParts + p] = cpu::fmadd(diff, diff, acc[half * L::kParts + p]);
        }
      }
    }
    AccVec block = acc[0];
    for (int p = 1; p < 2 * L::kParts; ++p) block = block + acc[p];
    total += block.sum();
  }
  acc_t tail = 0;
  for (; i < n; ++i) tail += squared_difference<acc_t>(t[i], s[i]);
  return total + tail;
}

// Calls body(i, tv, sv) for every full vector step of a contiguous row, with t[i...] and
// s[i...] loaded as accumulation vectors; returns where the scalar tail starts.
template <typename scalar_t, typename Body>
int64_t for_each_vector_step(const scalar_t* t, const scalar_t* s, int64_t n, const Body& body) {
  using L = Lanes<scalar_t>;
  const int64_t vector_end = n - n % L::kStep;
  for (int64_t i = 0; i < vector_end; i += L::kStep) {
    typename L::AccVec tv[L::kParts], sv[L::kParts];
    L::load(t + i, tv);
    L::load(s + i, sv);
    body(i, tv, sv);
  }
  return vector_end;
}

// sums[i] += (t_r[i] - s_r[i])^2 for the kRows contiguous rows r = 0, 1, ... in turn: each
// vector of sums is loaded and stored once per kRows rows instead of once per row. The
// additions per element happen in the same order as row by row, so the result is the same.
template <int kRows, typename scalar_t, typename acc_t = accumulate_t<scalar_t>>
void accumulate_contiguous_rows(acc_t* sums, const scalar_t* const* t, const scalar_t* const* s, int64_t n) {
  using L = Lanes<scalar_t>;
  using AccVec = typename L::AccVec;
  const int64_t vector_end = n - n % L::kStep;
  int64_t i = 0;
  for (; i < vector_end; i += L::kStep) {
    AccVec acc[L::kParts];
    for (int p = 0; p < L::kParts; ++p) acc[p] = AccVec::loadu(sums + i + p * AccVec::kSize);
    for (int r = 0; r < kRows; ++r) {
      AccVec tv[L::kParts], sv[L::kParts];
      L::load(t[r] + i, tv);
      L::load(s[r] + i, sv);
      for (int p = 0; p < L::kParts; ++p) {
        const AccVec diff = tv[p] - sv[p];
        acc[p] = cpu::fmadd(diff, diff, acc[p]);
      }
    }
    for (int p = 0; p < L::kParts; ++p) acc[p].storeu(sums + i + p * AccVec::kSize);
  }
  for (; i < n; ++i) {
    for (int r = 0; r < kRows; ++r) sums[i] += squared_difference<acc_t>(t[r][i], s[r][i]);
  }
}

// dt[i] = 2 * w_i * (t[i] - s[i]) over a contiguous row, with w_i = weights[i] when the
// weights run along the row, else weights[0] for the whole row.
// With kStream the row must start on a cache line and fill whole lines (rows_fill_cache_lines).
template <bool kWeightPerElement, bool kStream, typename scalar_t, typename acc_t = accumulate_t<scalar_t>>
void gradient_contiguous_row(scalar_t* dt, const acc_t* weights, const scalar_t* t, const scalar_t* s,
                             int64_t n) {
  using L = Lanes<scalar_t>;
  using AccVec = typename L::AccVec;
  const AccVec row_weight = AccVec::broadcast(weights[0] + weights[0]);
  int64_t i = for_each_vector_step(t, s, n, [&](int64_t at, AccVec* tv, AccVec* sv) {
    for (int p = 0; p < L::kParts; ++p) {
      AccVec weight = row_weight;
      if constexpr (kWeightPerElement) {
        weight = AccVec::loadu(weights + at + p * AccVec::kSize);
        weight = weight + weight;
      }
      tv[p] = weight * (tv[p] - sv[p]);
    }
    L::template store<kStream>(dt + at, tv);
  });
  for (; i < n; ++i) {
    const acc_t weight = kWeightPerElement ? weights[i] : weights[0];
    dt[i] = distance_gradient<acc_t>(weight + weight, t[i], s[i]);
  }
}

// The forward's work items: every index of the kept dims, the inner dim cut in tiles
// when it is kept (each tile's sums stay in L1 while the reduced rows stream past).
struct ForwardItems {
  int64_t tile, tiles, rows, count, grain;

  explicit ForwardItems(const ReductionPlan& plan) {
    const int64_t outer = product_of_sizes(plan.kept);
    const int64_t inner = plan.inner.size;
    tiles = 1;
    if (plan.inner.kept) {
      tiles = ceil_div(inner, kMaxTile);
      const int64_t wanted = kItemsPerThread * static_cast<int64_t>(stable::get_num_threads());
      if (outer * tiles < wanted) tiles = std::max(tiles, std::min(ceil_div(inner, kMinTile), ceil_div(wanted, outer)));
    }
    tile = ceil_div(inner, tiles);
    tiles = ceil_div(inner, tile);
    rows = product_of_sizes(plan.reduced);
    count = outer * tiles;
    grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, tile * rows));
  }

  // Offsets of the first element of ``item`` and the length of its slice of the inner dim.
  Offsets start(const ReductionPlan& plan, int64_t item, int64_t* length) const {
    Offsets offsets = RowWalker(plan.kept, item / tiles).offsets();
    const int64_t first = (item % tiles) * tile;
    offsets.add(plan.inner, first);
    *length = std::min(tile, plan.inner.size - first);
    return offsets;
  }
};

// One layer's forward: its plan, work items and tensors, and the elements it reads from each.
template <typename scalar_t>
struct ForwardLayer {
  ReductionPlan plan;
  ForwardItems items;
  const scalar_t* t;
  const scalar_t* s;
  accumulate_t<scalar_t>* partial;
  int64_t elements;

  ForwardLayer(ReductionPlan plan_, const scalar_t* t_, const scalar_t* s_, accumulate_t<scalar_t>* partial_,
               int64_t elements_)
      : plan(std::move(plan_)), items(plan), t(t_), s(s_), partial(partial_), elements(elements_) {}
};

// The partial sums of work items [begin, end) of one layer.
template <typename scalar_t>
void forward_items(const ForwardLayer<scalar_t>& layer, int64_t begin, int64_t end) {
  using acc_t = accumulate_t<scalar_t>;
  const ReductionPlan& plan = layer.plan;
  const ForwardItems& items = layer.items;
  const PlanDim& inner = plan.inner;
  const bool contiguous = plan.inner_contiguous(false);
  const scalar_t* t = layer.t;
  const scalar_t* s = layer.s;
  acc_t* partial = layer.partial;
  if (!inner.kept) {
    // One partial sum per item (tiles == 1). The walkers are made once per chunk, not
    // once per item: a 7x7 map has 49 elements per item, fewer than it costs to make one.
    RowWalker kept(plan.kept, begin);
    RowWalker rows(plan.reduced, 0);
    for (int64_t item = begin; item < end; ++item, kept.next()) {
      const Offsets& base = kept.offsets();
      total_t sum = 0;
      for (int64_t r = 0; r < items.rows; ++r, rows.next()) {
        const scalar_t* tr = t + base.target + rows.offsets().target;
        const scalar_t* sr = s + base.source + rows.offsets().source;
        if (contiguous) {
          sum += contiguous_row_sqdist(tr, sr, inner.size);
        } else {
          for (int64_t i = 0; i < inner.size; ++i) {
            sum += squared_difference<acc_t>(tr[i * inner.target], sr[i * inner.source]);
          }
        }
      }
      partial[base.partial] = static_cast<acc_t>(sum);
    }
    return;
  }
  std::vector<acc_t> block(items.tile);
  std::vector<total_t> total(block.size());
  for (int64_t item = begin; item < end; ++item) {
    int64_t length = 0;
    const Offsets base = items.start(plan, item, &length);
    RowWalker rows(plan.reduced, 0);
    std::fill(total.begin(), total.begin() + length, total_t(0));
    for (int64_t r = 0; r < items.rows;) {
      std::fill(block.begin(), block.begin() + length, acc_t(0));
      const int64_t block_end = std::min(items.rows, r + kRowsPerBlock);
      if (contiguous) {
        while (r < block_end) {
          const scalar_t* tr[kRowsAtOnce];
          const scalar_t* sr[kRowsAtOnce];
          int count = 0;
          for (; count < kRowsAtOnce && r < block_end; ++count, ++r, rows.next()) {
            tr[count] = t + base.target + rows.offsets().target;
            sr[count] = s + base.source + rows.offsets().source;
          }
          if (count == kRowsAtOnce) {
            accumulate_contiguous_rows<kRowsAtOnce>(block.data(), tr, sr, length);
          } else {
            for (int k = 0; k < count; ++k) accumulate_contiguous_rows<1>(block.data(), tr + k, sr + k, length);
          }
        }
      } else {
        for (; r < block_end; ++r, rows.next()) {
          const scalar_t* tr = t + base.target + rows.offsets().target;
          const scalar_t* sr = s + base.source + rows.offsets().source;
          for (int64_t i = 0; i < length; ++i) {
            block[i] += squared_difference<acc_t>(tr[i * inner.target], sr[i * inner.source]);
          }
        }
      }
      for (int64_t i = 0; i < length; ++i) total[i] += block[i];
    }
    for (int64_t i = 0; i < length; ++i) {
      partial[base.partial + i * inner.partial] = static_cast<acc_t>(total[i]);
    }
  }
}

template <typename scalar_t>
void sqdist_forward_kernel(const ForwardLayer<scalar_t>& layer) {
  stable::parallel_for(0, layer.items.count, layer.items.grain,
                   [&](int64_t begin, int64_t end) { forward_items(layer, begin, end); });
}

// Every layer's forward in one parallel region, each thread taking its share of every
// layer's work items in turn; as one layer's forward, no more threads than the layers
// have kGrainElements of work for.
template <typename scalar_t>
void sqdist_forward_layers_kernel(const std::vector<ForwardLayer<scalar_t>>& layers) {
  int64_t elements = 0;
  for (const auto& layer : layers) elements += layer.elements;
  const int64_t shares = std::clamp<int64_t>(elements / kGrainElements, 1, static_cast<int64_t>(stable::get_num_threads()));
  stable::parallel_for(0, shares, 1, [&](int64_t begin, int64_t end) {
    for (int64_t share = begin; share < end; ++share) {
      for (const auto& layer : layers) {
        const int64_t count = layer.items.count;
        const int64_t first = count * share / shares, last = count * (share + 1) / shares;
        if (first < last) forward_items(layer, first, last);
      }
    }
  });
}

// Whether every row of the inner dim of dt starts on a cache line and fills whole lines and
// whole vectors: what streaming its gradient asks (vec.h's write_vector).
template <typename scalar_t>
bool rows_fill_cache_lines(const std::vector<PlanDim>& outer, const PlanDim& inner, const scalar_t* dt) {
  constexpr int64_t kSize = sizeof(scalar_t);
  const auto on_lines = [](int64_t bytes) { return bytes % kCacheLine == 0; };
  if (reinterpret_cast<uintptr_t>(dt) % kCacheLine != 0 || !on_lines(inner.size * kSize) ||
      inner.size % Lanes<scalar_t>::kStep != 0) {
    return false;
  }
  return std::all_of(outer.begin(), outer.end(), [&](const PlanDim& dim) { return on_lines(dim.grad * kSize); });
}

// The backward has nothing to reduce: it walks every row of the inner dim in memory order.
template <typename scalar_t>
void sqdist_backward_kernel(const ReductionPlan& plan, const accumulate_t<scalar_t>* grad,
                            const scalar_t* t, const scalar_t* s, scalar_t* dt) {
  using acc_t = accumulate_t<scalar_t>;
  const PlanDim& inner = plan.inner;
  const bool contiguous = plan.inner_contiguous(true);
  std::vector<PlanDim> outer(plan.kept);
  outer.insert(outer.end(), plan.reduced.begin(), plan.reduced.end());
  std::stable_sort(outer.begin(), outer.end(),
                   [](const PlanDim& a, const PlanDim& b) { return a.target > b.target; });
  const int64_t rows = product_of_sizes(outer);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / inner.size);
  const bool stream = contiguous && rows_fill_cache_lines(outer, inner, dt) &&
                      rows * inner.size * int64_t(sizeof(scalar_t)) >= kStreamBytes;

  stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    RowWalker walker(outer, begin);
    for (int64_t row = begin; row < end; ++row, walker.next()) {
      const Offsets& at = walker.offsets();
      const acc_t* weights = grad + at.partial;
      const scalar_t* tr = t + at.target;
      const scalar_t* sr = s + at.source;
      scalar_t* dr = dt + at.grad;
      if (stream && inner.kept) {
        gradient_contiguous_row<true, true>(dr, weights, tr, sr, inner.size);
      } else if (stream) {
        gradient_contiguous_row<false, true>(dr, weights, tr, sr, inner.size);
      } else if (contiguous && inner.kept) {
        gradient_contiguous_row<true, false>(dr, weights, tr, sr, inner.size);
      } else if (contiguous) {
        gradient_contiguous_row<false, false>(dr, weights, tr, sr, inner.size);
      } else {
        for (int64_t i = 0; i < inner.size; ++i) {
          const acc_t weight = inner.kept ? weights[i * inner.partial] : weights[0];
          dr[i * inner.grad] =
              distance_gradient<acc_t>(weight + weight, tr[i * inner.target], sr[i * inner.source]);
        }
      }
    }
    if (stream) cpu::fence();
  });
}

// The partial sums' tensor of a layer, (B, C) or (B, P), in the accumulation type.
Tensor empty_partial_sums(const Tensor& target, Grouping grouping) {
  return stable::empty(partial_sum_shape(target, grouping), accumulate_type_of(target.scalar_type()), std::nullopt,
                       target.device());
}

ReductionPlan forward_plan(const Tensor& target, const Tensor& source, Grouping grouping) {
  return make_reduction_plan(grouping, as_vector(target.sizes()), as_vector(target.strides()),
                             as_vector(source.strides()), as_vector(target.strides()));
}

template <typename scalar_t>
ForwardLayer<scalar_t> forward_layer(const Tensor& target, const Tensor& source, Tensor& partial,
                                     Grouping grouping) {
  return ForwardLayer<scalar_t>(forward_plan(target, source, grouping), target.const_data_ptr<scalar_t>(),
                                source.const_data_ptr<scalar_t>(),
                                partial.mutable_data_ptr<accumulate_t<scalar_t>>(), target.numel());
}

Tensor sqdist_forward_cpu(const Tensor& target, const Tensor& source, Grouping grouping) {
  const char* op = grouping == Grouping::kChannel ? "channel_sqdist" : "spatial_sqdist";
  check_feature_pair(op, target, source, DeviceType::CPU);
  Tensor partial = empty_partial_sums(target, grouping);
  if (target.numel() == 0) return stable::zero_(partial);
  AFA_DISPATCH_FEATURE_TYPES(target.scalar_type(), "afa_ext_sqdist_cpu", [&] {
    sqdist_forward_kernel(forward_layer<scalar_t>(target, source, partial, grouping));
  });
  return partial;
}

Tensor sqdist_backward_cpu(const Tensor& grad, const Tensor& target, const Tensor& source,
                               Grouping grouping) {
  const char* op = grouping == Grouping::kChannel ? "channel_sqdist_backward" : "spatial_sqdist_backward";
  check_feature_pair(op, target, source, DeviceType::CPU);
  const Tensor weights = checked_partial_grad(op, grad, target, grouping);
  Tensor dt = empty_like_on_huge_pages(target);
  if (target.numel() == 0) return dt;
  const ReductionPlan plan =
      make_reduction_plan(grouping, as_vector(target.sizes()), as_vector(target.strides()),
                          as_vector(source.strides()), as_vector(dt.strides()));
  AFA_DISPATCH_FEATURE_TYPES(target.scalar_type(), "afa_ext_sqdist_cpu", [&] {
    sqdist_backward_kernel<scalar_t>(plan, weights.const_data_ptr<accumulate_t<scalar_t>>(),
                                     target.const_data_ptr<scalar_t>(), source.const_data_ptr<scalar_t>(),
                                     dt.mutable_data_ptr<scalar_t>());
  });
  return dt;
}

Tensor channel_sqdist_cpu(const Tensor& target, const Tensor& source) {
  return sqdist_forward_cpu(target, source, Grouping::kChannel);
}

Tensor spatial_sqdist_cpu(const Tensor& target, const Tensor& source) {
  return sqdist_forward_cpu(target, source, Grouping::kSpatial);
}

Tensor channel_sqdist_backward_cpu(const Tensor& grad, const Tensor& target,
                                       const Tensor& source) {
  return sqdist_backward_cpu(grad, target, source, Grouping::kChannel);
}

Tensor spatial_sqdist_backward_cpu(const Tensor& grad, const Tensor& target,
                                       const Tensor& source) {
  return sqdist_backward_cpu(grad, target, source, Grouping::kSpatial);
}

// The multi-layer forward on the CPU: one parallel region for all layers (see
// sqdist_forward_layers_kernel).
std::vector<Tensor> sqdist_layers_cpu(const TensorList& targets, const TensorList& sources, Grouping grouping) {
  const char* op = grouping == Grouping::kChannel ? "grouped_channel_sqdist" : "grouped_spatial_sqdist";
  check_layer_lists(op, targets, sources);
  std::vector<Tensor> partials;
  for (size_t layer = 0; layer < targets.size(); ++layer) {
    check_feature_pair(op, targets[layer], sources[layer], DeviceType::CPU);
    partials.push_back(empty_partial_sums(targets[layer], grouping));
    if (targets[layer].numel() == 0) stable::zero_(partials.back());
  }
  AFA_DISPATCH_FEATURE_TYPES(targets[0].scalar_type(), "afa_ext_sqdist_cpu", [&] {
    std::vector<ForwardLayer<scalar_t>> layers;
    for (size_t layer = 0; layer < targets.size(); ++layer) {
      if (targets[layer].numel() == 0) continue;
      layers.push_back(forward_layer<scalar_t>(targets[layer], sources[layer], partials[layer], grouping));
    }
    if (!layers.empty()) sqdist_forward_layers_kernel(layers);
  });
  return partials;
}

std::vector<Tensor> sqdist_backward_layers_cpu(const TensorList& grads, const TensorList& targets,
                                                    const TensorList& sources, Grouping grouping) {
  check_layer_lists(grouping == Grouping::kChannel ? "grouped_channel_sqdist_backward"
                                                   : "grouped_spatial_sqdist_backward",
                    targets, sources, &grads);
  // Last layer first: the forward read the layers in order, so the last ones' features are
  // the likeliest still to be in the cache when the backward reads them again.
  std::vector<Tensor> gradients(targets.size());
  for (size_t layer = targets.size(); layer-- > 0;) {
    gradients[layer] = sqdist_backward_cpu(grads[layer], targets[layer], sources[layer], grouping);
  }
  return gradients;
}

std::vector<Tensor> grouped_channel_sqdist_cpu(const TensorList& targets, const TensorList& sources) {
  return sqdist_layers_cpu(targets, sources, Grouping::kChannel);
}

std::vector<Tensor> grouped_spatial_sqdist_cpu(const TensorList& targets, const TensorList& sources) {
  return sqdist_layers_cpu(targets, sources, Grouping::kSpatial);
}

std::vector<Tensor> grouped_channel_sqdist_backward_cpu(const TensorList& grads, const TensorList& targets,
                                                            const TensorList& sources) {
  return sqdist_backward_layers_cpu(grads, targets, sources, Grouping::kChannel);
}

std::vector<Tensor> grouped_spatial_sqdist_backward_cpu(const TensorList& grads, const TensorList& targets,
                                                            const TensorList& sources) {
  return sqdist_backward_layers_cpu(grads, targets, sources, Grouping::kSpatial);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(afa_ext, CPU, m) {
  m.impl("channel_sqdist", TORCH_BOX(&channel_sqdist_cpu));
  m.impl("spatial_sqdist", TORCH_BOX(&spatial_sqdist_cpu));
  m.impl("channel_sqdist_backward", TORCH_BOX(&channel_sqdist_backward_cpu));
  m.impl("spatial_sqdist_backward", TORCH_BOX(&spatial_sqdist_backward_cpu));
  m.impl("grouped_channel_sqdist", TORCH_BOX(&grouped_channel_sqdist_cpu));
  m.impl("grouped_spatial_sqdist", TORCH_BOX(&grouped_spatial_sqdist_cpu));
  m.impl("grouped_channel_sqdist_backward", TORCH_BOX(&grouped_channel_sqdist_backward_cpu));
  m.impl("grouped_spatial_sqdist_backward", TORCH_BOX(&grouped_spatial_sqdist_backward_cpu));
}

}  // namespace afa_ext
