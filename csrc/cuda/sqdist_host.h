// Host side of the CUDA ops, written once for any runtime that can run the kernels of
// sqdist_kernels.cuh: the real one (sqdist_cuda.cu) and the CPU emulation the tests build
// (tests/ops/cuda_emulation/), so the CPU test suite also runs the kernels' logic.
//
// A Runtime provides kDevice (the device type the ops take), DeviceGuard (made from the
// first layer's device) and launch(kernel, layers, blocks), which runs the launches of
// plan_launches on that runtime.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "../common/reduction_plan.h"
#include "../sqdist_checks.h"
#include "sqdist_kernels.cuh"
#include "sqdist_launch.h"

namespace afa_ext {
namespace cuda {

inline const char* forward_name(Grouping grouping) {
  return grouping == Grouping::kChannel ? "channel_sqdist" : "spatial_sqdist";
}

inline const char* backward_name(Grouping grouping) {
  return grouping == Grouping::kChannel ? "channel_sqdist_backward" : "spatial_sqdist_backward";
}

// A tensor given to sqdist_backward_layers_into for layer `layer`'s gradient: the target's
// shape, dtype and device, and no element stored twice (each is written by one thread).
inline void check_gradient_output(const char* op, const at::Tensor& gradient, const at::Tensor& target,
                                  size_t layer) {
  TORCH_CHECK(gradient.sizes() == target.sizes() && gradient.scalar_type() == target.scalar_type() &&
                  gradient.device() == target.device(),
              "afa_ext::", op, ": expected the gradient of layer ", layer, " to be of shape ", target.sizes(), ", ",
              target.scalar_type(), " on ", target.device(), ", got ", gradient.sizes(), ", ",
              gradient.scalar_type(), " on ", gradient.device());
  TORCH_CHECK(at::has_internal_overlap(gradient) != at::MemOverlap::Yes, "afa_ext::", op,
              ": the gradient of layer ", layer, " stores some elements at one address");
}

// The bytes from the first to the last element of `tensor` (empty when it has none).
struct ByteRange {
  uintptr_t begin = 0, end = 0;

  bool overlaps(const ByteRange& other) const { return begin < other.end && other.begin < end; }
};

inline ByteRange byte_range(const at::Tensor& tensor) {
  if (tensor.numel() == 0) return {};
  int64_t last = 0;  // PyTorch strides are never negative
  for (int64_t d = 0; d < tensor.dim(); ++d) last += (tensor.size(d) - 1) * tensor.stride(d);
  const uintptr_t begin = reinterpret_cast<uintptr_t>(tensor.const_data_ptr());
  return {begin, begin + static_cast<uintptr_t>((last + 1) * tensor.element_size())};
}

// The backward kernel reads target, source and weights through the read-only cache and
// stores dt with an asm store that loads may be moved across (sqdist_kernels.cuh): both
// are only right when no launched layer's dt shares memory with any layer's inputs, as
// one launch runs every layer. The weights are either the grads or fresh copies of them.
inline void check_gradients_apart_from_inputs(const char* op, at::TensorList gradients, at::TensorList grads,
                                              at::TensorList targets, at::TensorList sources) {
  struct Input {
    const char* name;
    size_t layer;
    ByteRange bytes;
  };
  std::vector<Input> inputs;
  for (size_t layer = 0; layer < targets.size(); ++layer) {
    if (targets[layer].numel() == 0) continue;  // not launched
    inputs.push_back({"target", layer, byte_range(targets[layer])});
    inputs.push_back({"source", layer, byte_range(sources[layer])});
    inputs.push_back({"grad", layer, byte_range(grads[layer])});
  }
  for (size_t layer = 0; layer < gradients.size(); ++layer) {
    const ByteRange written = byte_range(gradients[layer]);
    for (const Input& input : inputs) {
      TORCH_CHECK(!written.overlaps(input.bytes), "afa_ext::", op, ": the gradient of layer ", layer,
                  " overlaps the ", input.name, " of layer ", input.layer,
                  " in memory; the CUDA kernels need every gradient apart from every input");
    }
  }
}

// The plan of one layer. When its strides need more outer dims than a LayerDesc holds,
// target and source are replaced by dense copies and grad_target, when given, by a fresh
// dense tensor to copy back; all are kept alive in ``copies`` until the launch is enqueued.
inline ReductionPlan plan_in_descriptor(Grouping grouping, at::Tensor& target, at::Tensor& source,
                                        at::Tensor* grad_target, std::vector<at::Tensor>& copies) {
  ReductionPlan plan = plan_of(grouping, target, source, grad_target ? *grad_target : target);
  if (fits_descriptor(plan)) return plan;
  target = target.contiguous();
  source = source.contiguous();
  copies.insert(copies.end(), {target, source});
  if (grad_target) {
    *grad_target = at::empty_like(target);
    copies.push_back(*grad_target);
  }
  return plan_of(grouping, target, source, grad_target ? *grad_target : target);
}

// The partial sums of every layer, in one launch. Layers are checked one by one under the
// name of the single op, as the CPU kernels do.
template <typename Runtime>
std::vector<at::Tensor> sqdist_forward_layers(at::TensorList targets, at::TensorList sources, Grouping grouping) {
  std::vector<at::Tensor> partials;
  for (size_t i = 0; i < targets.size(); ++i) {
    check_feature_pair(forward_name(grouping), targets[i], sources[i], Runtime::kDevice);
    partials.push_back(at::empty(partial_sum_shape(targets[i], grouping),
                                 targets[i].options().dtype(accumulate_type_of(targets[i].scalar_type()))));
  }
  const typename Runtime::DeviceGuard guard(targets[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, targets[0].scalar_type(), "afa_ext_sqdist_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<LayerDesc<scalar_t>> layers;
    std::vector<int64_t> blocks;
    std::vector<at::Tensor> copies;  // read by the launch: kept alive until it is enqueued
    for (size_t i = 0; i < targets.size(); ++i) {
      if (targets[i].numel() == 0) {
        partials[i].zero_();
        continue;
      }
      at::Tensor target = targets[i], source = sources[i];
      const ReductionPlan plan = plan_in_descriptor(grouping, target, source, nullptr, copies);
      LayerDesc<scalar_t> layer = describe_layer<scalar_t>(plan, target, source, nullptr);
      layer.partial = partials[i].mutable_data_ptr<acc_t>();
      blocks.push_back(shape_forward(layer));
      layers.push_back(layer);
    }
    if (!layers.empty()) Runtime::launch(sqdist_forward_layers_kernel<scalar_t>, layers, blocks);
  });
  return partials;
}

// dt of every layer written into `gradients` (one tensor of each target's shape, dtype and
// device, in any layout), in one launch; grads are converted by checked_partial_grad.
// `op` is the name the op is called by, single or multi-layer.
template <typename Runtime>
void sqdist_backward_layers_into(const char* op, at::TensorList grads, at::TensorList targets,
                                 at::TensorList sources, Grouping grouping, at::TensorList gradients) {
  TORCH_CHECK(gradients.size() == targets.size(), "afa_ext::", op, ": expected one gradient per target, got ",
              targets.size(), " targets and ", gradients.size(), " gradients");
  std::vector<at::Tensor> weights;
  for (size_t i = 0; i < targets.size(); ++i) {
    check_feature_pair(backward_name(grouping), targets[i], sources[i], Runtime::kDevice);
    weights.push_back(checked_partial_grad(backward_name(grouping), grads[i], targets[i], grouping));
    check_gradient_output(op, gradients[i], targets[i], i);
  }
  check_gradients_apart_from_inputs(op, gradients, grads, targets, sources);
  const typename Runtime::DeviceGuard guard(targets[0].device());
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (dt, the contiguous dt written instead)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, targets[0].scalar_type(), "afa_ext_sqdist_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<LayerDesc<scalar_t>> layers;
    std::vector<int64_t> blocks;
    std::vector<at::Tensor> copies;  // read by the launch: kept alive until it is enqueued
    for (size_t i = 0; i < targets.size(); ++i) {
      if (targets[i].numel() == 0) continue;
      at::Tensor target = targets[i], source = sources[i], grad_target = gradients[i];
      const ReductionPlan plan = plan_in_descriptor(grouping, target, source, &grad_target, copies);
      if (!grad_target.is_same(gradients[i])) copy_back.emplace_back(gradients[i], grad_target);
      LayerDesc<scalar_t> layer = describe_layer<scalar_t>(plan, target, source, &grad_target);
      layer.weights = weights[i].const_data_ptr<acc_t>();
      blocks.push_back(shape_backward(layer));
      layers.push_back(layer);
    }
    if (!layers.empty()) Runtime::launch(sqdist_backward_layers_kernel<scalar_t>, layers, blocks);
  });
  for (auto& [grad_target, written] : copy_back) grad_target.copy_(written);
}

// dt of every layer, laid out as at::empty_like(target) (the layout the fake kernels promise).
template <typename Runtime>
std::vector<at::Tensor> sqdist_backward_layers(const char* op, at::TensorList grads, at::TensorList targets,
                                               at::TensorList sources, Grouping grouping) {
  std::vector<at::Tensor> gradients;
  for (const at::Tensor& target : targets) gradients.push_back(at::empty_like(target));
  sqdist_backward_layers_into<Runtime>(op, grads, targets, sources, grouping, gradients);
  return gradients;
}

}  // namespace cuda
}  // namespace afa_ext
