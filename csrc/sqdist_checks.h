// Argument checks and shapes shared by every device's implementation of the ops, on the
// LibTorch stable ABI (torch/csrc/stable). A failed AFA_CHECK throws std::runtime_error,
// which reaches Python as RuntimeError with the message alone (STD_TORCH_CHECK would put
// the C++ function, file and line before it).
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/reduction_plan.h"
#include "common/scalar_types.h"

namespace afa_ext {

using torch::stable::Tensor;
using TensorList = std::vector<Tensor>;
using torch::headeronly::DeviceType;

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw std::runtime_error(message.str());
}

#define AFA_CHECK(condition, ...)                 \
  do {                                            \
    if (!(condition)) ::afa_ext::fail(__VA_ARGS__); \
  } while (false)

// "[2, 3, 4]", as torch prints a shape.
inline std::string shape_text(torch::headeronly::IntHeaderOnlyArrayRef sizes) {
  std::string text = "[";
  for (size_t d = 0; d < sizes.size(); ++d) text += (d ? ", " : "") + std::to_string(sizes[d]);
  return text + "]";
}

inline std::vector<int64_t> as_vector(torch::headeronly::IntHeaderOnlyArrayRef values) {
  return {values.begin(), values.end()};
}

inline std::string device_type_text(DeviceType type) {
  switch (type) {
    case DeviceType::CPU:
      return "cpu";
    case DeviceType::CUDA:
      return "cuda";
    case DeviceType::Meta:
      return "meta";
    default:
      return "device type " + std::to_string(static_cast<int>(type));
  }
}

// "cpu", "cuda:0", as torch prints a device.
inline std::string device_text(const Tensor& tensor) {
  const auto device = tensor.device();
  const std::string type = device_type_text(device.type());
  return device.has_index() ? type + ":" + std::to_string(device.index()) : type;
}

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.device().type() == b.device().type() && a.get_device_index() == b.get_device_index();
}

inline bool same_shape(const Tensor& a, const Tensor& b) { return as_vector(a.sizes()) == as_vector(b.sizes()); }

// (B, C) for the channel grouping, (B, P) for the spatial grouping.
inline std::vector<int64_t> partial_sum_shape(const Tensor& features, Grouping grouping) {
  if (grouping == Grouping::kChannel) return {features.size(0), features.size(1)};
  int64_t positions = 1;
  for (int64_t d = 2; d < features.dim(); ++d) positions *= features.size(d);
  return {features.size(0), positions};
}

inline void check_feature_pair(const char* op, const Tensor& target, const Tensor& source, DeviceType device) {
  AFA_CHECK(target.dim() >= 3, "afa_ext::", op,
                  ": expected target of shape (B, C, *spatial) with at least 3 dims, got ", shape_text(target.sizes()));
  AFA_CHECK(same_shape(source, target), "afa_ext::", op, ": expected source to have the shape of target ",
                  shape_text(target.sizes()), ", got ", shape_text(source.sizes()));
  const ScalarType type = target.scalar_type();
  AFA_CHECK(is_feature_type(type), "afa_ext::", op,
                  ": expected float64, float32, bfloat16 or float16 features, got ", torch::headeronly::toString(type));
  AFA_CHECK(source.scalar_type() == type, "afa_ext::", op, ": expected source of dtype ",
                  torch::headeronly::toString(type), " like target, got ",
                  torch::headeronly::toString(source.scalar_type()));
  AFA_CHECK(target.device().type() == device && same_device(source, target), "afa_ext::", op,
                  ": expected target and source on one ", device == DeviceType::CUDA ? "CUDA" : "CPU",
                  " device, got ", device_text(target), " and ", device_text(source));
}

// The upstream gradient of the partial sums, checked and made a contiguous tensor of the
// accumulation type.
inline Tensor checked_partial_grad(const char* op, const Tensor& grad, const Tensor& target, Grouping grouping) {
  const std::vector<int64_t> shape = partial_sum_shape(target, grouping);
  AFA_CHECK(as_vector(grad.sizes()) == shape, "afa_ext::", op, ": expected grad of shape ", shape_text(shape),
                  ", got ", shape_text(grad.sizes()));
  AFA_CHECK(same_device(grad, target), "afa_ext::", op, ": expected grad on ", device_text(target), ", got ",
                  device_text(grad));
  AFA_CHECK(is_feature_type(grad.scalar_type()), "afa_ext::", op, ": expected a floating-point grad, got ",
                  torch::headeronly::toString(grad.scalar_type()));
  const ScalarType accumulate = accumulate_type_of(target.scalar_type());
  const Tensor converted = grad.scalar_type() == accumulate ? grad : torch::stable::to(grad, accumulate);
  return torch::stable::contiguous(converted);
}

// The lists of a multi-layer op (grouped_<op>): as many sources (and grads) as targets,
// at least one layer, every layer of the first layer's dtype and on its device. Each pair
// is then checked by check_feature_pair and each grad by checked_partial_grad.
inline void check_layer_lists(const char* op, const TensorList& targets, const TensorList& sources,
                              const TensorList* grads = nullptr) {
  AFA_CHECK(!targets.empty(), "afa_ext::", op, ": expected at least one layer, got empty lists");
  AFA_CHECK(sources.size() == targets.size(), "afa_ext::", op, ": expected one source per target, got ",
                  targets.size(), " targets and ", sources.size(), " sources");
  AFA_CHECK(grads == nullptr || grads->size() == targets.size(), "afa_ext::", op,
                  ": expected one grad per target, got ", targets.size(), " targets and ",
                  grads ? grads->size() : 0, " grads");
  for (size_t layer = 1; layer < targets.size(); ++layer) {
    AFA_CHECK(
        targets[layer].scalar_type() == targets[0].scalar_type() && same_device(targets[layer], targets[0]),
        "afa_ext::", op, ": expected every layer on one device with one dtype, got layer 0 as ",
        torch::headeronly::toString(targets[0].scalar_type()), " on ", device_text(targets[0]), " and layer ", layer,
        " as ", torch::headeronly::toString(targets[layer].scalar_type()), " on ", device_text(targets[layer]));
  }
}

}  // namespace afa_ext
