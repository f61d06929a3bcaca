// How to walk the features of one weighted-squared-distance op, whatever their strides.
//
// The features t, s (and, in the backward, the gradient dt being written) share a shape
// (B, C, *spatial). Each dim is either "kept" (it indexes the small partial-sum tensor:
// B and C for the channel grouping, B and the spatial dims for the spatial grouping) or
// "reduced" (summed over). The plan drops size-1 dims, merges dims of one kind whose
// strides let them be walked as one, and picks as the innermost loop the dim of unit
// stride in the target: a channels_last map is walked along C, a contiguous one along
// its spatial run, and a sliced one along whatever its strides allow, without a copy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace afa_ext {

enum class Grouping { kChannel, kSpatial };

// One dim of the iteration space: its size and its stride in each tensor walked.
struct PlanDim {
  int64_t size = 1;
  int64_t target = 0;   // stride in t
  int64_t source = 0;   // stride in s
  int64_t grad = 0;     // stride in dt (backward only; 0 in the forward)
  int64_t partial = 0;  // stride in the contiguous (B, C) or (B, P) partial sums; 0 if reduced
  bool kept = false;
};

struct ReductionPlan {
  PlanDim inner;                 // walked by the vector loop
  std::vector<PlanDim> kept;     // the other kept dims, outermost first
  std::vector<PlanDim> reduced;  // the other reduced dims, outermost first

  // Every stride of the inner dim is 1, so the vector loop can load contiguously.
  bool inner_contiguous(bool with_grad) const {
    return inner.target == 1 && inner.source == 1 && (!with_grad || inner.grad == 1) &&
           (!inner.kept || inner.partial == 1);
  }
};

namespace detail {

inline bool can_merge(const PlanDim& outer, const PlanDim& in) {
  return outer.kept == in.kept && outer.target == in.target * in.size &&
         outer.source == in.source * in.size && outer.grad == in.grad * in.size &&
         outer.partial == in.partial * in.size;
}

inline bool by_descending_target_stride(const PlanDim& a, const PlanDim& b) {
  return a.target > b.target;
}

}  // namespace detail

// sizes: the features' shape; *_strides: strides of t, s and dt (pass t's strides for dt
// in the forward, they only constrain merging).
inline ReductionPlan make_reduction_plan(Grouping grouping, const std::vector<int64_t>& sizes,
                                         const std::vector<int64_t>& target_strides,
                                         const std::vector<int64_t>& source_strides,
                                         const std::vector<int64_t>& grad_strides) {
  const size_t ndim = sizes.size();
  // Strides of the contiguous partial-sum tensor, (B, C) or (B, P) in row-major order.
  std::vector<int64_t> partial(ndim, 0);
  int64_t running = 1;
  for (size_t d = ndim; d-- > 0;) {
    const bool kept = d == 0 || (grouping == Grouping::kChannel ? d == 1 : d >= 2);
    if (kept) {
      partial[d] = running;
      running *= sizes[d];
    }
  }

  std::vector<PlanDim> dims;
  for (size_t d = 0; d < ndim; ++d) {
    if (sizes[d] == 1) continue;
    PlanDim dim;
    dim.size = sizes[d];
    dim.target = target_strides[d];
    dim.source = source_strides[d];
    dim.grad = grad_strides[d];
    dim.partial = partial[d];
    dim.kept = partial[d] != 0;
    dims.push_back(dim);
  }
  if (dims.empty()) {
    PlanDim unit;
    unit.kept = true;
    unit.partial = 1;
    dims.push_back(unit);
  }

  // Merge pairs of dims that walk as one, until none is left.
  for (bool merged = true; merged;) {
    merged = false;
    for (size_t a = 0; a < dims.size() && !merged; ++a) {
      for (size_t b = 0; b < dims.size() && !merged; ++b) {
        if (a == b || !detail::can_merge(dims[a], dims[b])) continue;
        dims[b].size *= dims[a].size;
        dims.erase(dims.begin() + static_cast<std::ptrdiff_t>(a));
        merged = true;
      }
    }
  }

  // Innermost: unit stride in both features, else in the target, else the smallest stride.
  size_t best = 0;
  auto score = [](const PlanDim& d) {
    const int64_t t = d.target < 0 ? -d.target : d.target;
    return (d.target == 1 && d.source == 1) ? -2 : (d.target == 1 ? -1 : t);
  };
  for (size_t d = 1; d < dims.size(); ++d) {
    if (score(dims[d]) < score(dims[best])) best = d;
  }

  ReductionPlan plan;
  plan.inner = dims[best];
  for (size_t d = 0; d < dims.size(); ++d) {
    if (d == best) continue;
    (dims[d].kept ? plan.kept : plan.reduced).push_back(dims[d]);
  }
  std::stable_sort(plan.kept.begin(), plan.kept.end(), detail::by_descending_target_stride);
  std::stable_sort(plan.reduced.begin(), plan.reduced.end(), detail::by_descending_target_stride);
  return plan;
}

}  // namespace afa_ext
