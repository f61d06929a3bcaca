// Argument checks and shapes shared by every device's implementation of the ops.
#pragma once

#include <ATen/ATen.h>

#include "common/reduction_plan.h"

namespace afa_ext {

inline at::ScalarType accumulate_type_of(at::ScalarType type) {
  return (type == at::kHalf || type == at::kBFloat16) ? at::kFloat : type;
}

// (B, C) for the channel grouping, (B, P) for the spatial grouping.
inline std::vector<int64_t> partial_sum_shape(const at::Tensor& features, Grouping grouping) {
  if (grouping == Grouping::kChannel) return {features.size(0), features.size(1)};
  int64_t positions = 1;
  for (int64_t d = 2; d < features.dim(); ++d) positions *= features.size(d);
  return {features.size(0), positions};
}

inline void check_feature_pair(const char* op, const at::Tensor& target, const at::Tensor& source,
                               at::DeviceType device) {
  TORCH_CHECK(target.dim() >= 3, "afa_ext::", op,
              ": expected target of shape (B, C, *spatial) with at least 3 dims, got ", target.sizes());
  TORCH_CHECK(source.sizes() == target.sizes(), "afa_ext::", op,
              ": expected source to have the shape of target ", target.sizes(), ", got ", source.sizes());
  const auto type = target.scalar_type();
  TORCH_CHECK(type == at::kDouble || type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "afa_ext::", op, ": expected float64, float32, bfloat16 or float16 features, got ", type);
  TORCH_CHECK(source.scalar_type() == type, "afa_ext::", op, ": expected source of dtype ", type,
              " like target, got ", source.scalar_type());
  TORCH_CHECK(target.device().type() == device && source.device() == target.device(), "afa_ext::", op,
              ": expected target and source on one ", c10::DeviceTypeName(device), " device, got ",
              target.device(), " and ", source.device());
}

// The upstream gradient of the partial sums, checked and made a contiguous tensor of the
// accumulation type.
inline at::Tensor checked_partial_grad(const char* op, const at::Tensor& grad, const at::Tensor& target,
                                       Grouping grouping) {
  const auto shape = partial_sum_shape(target, grouping);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(shape), "afa_ext::", op, ": expected grad of shape ",
              at::IntArrayRef(shape), ", got ", grad.sizes());
  TORCH_CHECK(grad.device() == target.device(), "afa_ext::", op, ": expected grad on ", target.device(),
              ", got ", grad.device());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), "afa_ext::", op,
              ": expected a floating-point grad, got ", grad.scalar_type());
  return grad.to(accumulate_type_of(target.scalar_type())).contiguous();
}

// The lists of a multi-layer op (grouped_<op>): as many sources (and grads) as targets,
// at least one layer, every layer of the first layer's dtype and on its device. Each pair
// is then checked by check_feature_pair and each grad by checked_partial_grad.
inline void check_layer_lists(const char* op, at::TensorList targets, at::TensorList sources,
                              c10::optional<at::TensorList> grads = c10::nullopt) {
  TORCH_CHECK(!targets.empty(), "afa_ext::", op, ": expected at least one layer, got empty lists");
  TORCH_CHECK(sources.size() == targets.size(), "afa_ext::", op, ": expected one source per target, got ",
              targets.size(), " targets and ", sources.size(), " sources");
  TORCH_CHECK(!grads.has_value() || grads->size() == targets.size(), "afa_ext::", op,
              ": expected one grad per target, got ", targets.size(), " targets and ",
              grads.has_value() ? grads->size() : 0, " grads");
  for (size_t layer = 1; layer < targets.size(); ++layer) {
    TORCH_CHECK(targets[layer].scalar_type() == targets[0].scalar_type() &&
                    targets[layer].device() == targets[0].device(),
                "afa_ext::", op, ": expected every layer on one device with one dtype, got layer 0 as ",
                targets[0].scalar_type(), " on ", targets[0].device(), " and layer ", layer, " as ",
                targets[layer].scalar_type(), " on ", targets[layer].device());
  }
}

}  // namespace afa_ext
