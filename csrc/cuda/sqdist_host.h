// Host side of the CUDA ops, written once for any runtime that can run the kernels of
// sqdist_kernels.cuh: the real one (sqdist_cuda.cu) and the CPU emulation the tests build
// (tests/ops/cuda_emulation/), so the CPU test suite also runs the kernels' logic.
//
// A Runtime provides kDevice (the device type the ops take), DeviceGuard (made from the
// first layer's device index) and launch(kernel, layers, blocks), which runs the launches of
// plan_launches on that runtime.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "../common/reduction_plan.h"
#include "../common/scalar_types.h"
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

// Whether no two elements of `tensor` share an address, as far as its strides show: its
// dims of more than one element, by increasing stride, each step past everything the dims
// inside it reach. Dense, channels_last, transposed, cropped and sliced tensors pass; a
// zero stride (an expanded dim) fails, and so do the rare interleaved layouts that store
// every element apart without nesting their dims (at::has_internal_overlap, which has no
// stable-ABI counterpart, let those through as "too hard to tell").
inline bool strides_keep_elements_apart(const Tensor& tensor) {
  if (tensor.numel() == 0) return true;  // no element: none stored twice, whatever the strides
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (int64_t d = 0; d < tensor.dim(); ++d) {
    if (tensor.size(d) > 1) dims.emplace_back(tensor.stride(d), tensor.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;  // the largest element offset of the dims walked so far
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return false;
    reach += (size - 1) * stride;
  }
  return true;
}

// A tensor given to sqdist_backward_layers_into for layer `layer`'s gradient: the target's
// shape, dtype and device, and no element stored twice (each is written by one thread).
inline void check_gradient_output(const char* op, const Tensor& gradient, const Tensor& target, size_t layer) {
  AFA_CHECK(same_shape(gradient, target) && gradient.scalar_type() == target.scalar_type() &&
                same_device(gradient, target),
            "afa_ext::", op, ": expected the gradient of layer ", layer, " to be of shape ", shape_text(target.sizes()),
            ", ", torch::headeronly::toString(target.scalar_type()), " on ", device_text(target), ", got ",
            shape_text(gradient.sizes()), ", ", torch::headeronly::toString(gradient.scalar_type()), " on ",
            device_text(gradient));
  AFA_CHECK(strides_keep_elements_apart(gradient), "afa_ext::", op, ": the gradient of layer ", layer,
            " stores some elements at one address");
}

// The bytes from the first to the last element of `tensor` (empty when it has none).
struct ByteRange {
  uintptr_t begin = 0, end = 0;

  bool overlaps(const ByteRange& other) const { return begin < other.end && other.begin < end; }
};

inline ByteRange byte_range(const Tensor& tensor) {
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
inline void check_gradients_apart_from_inputs(const char* op, const TensorList& gradients, const TensorList& grads,
                                              const TensorList& targets, const TensorList& sources) {
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
      AFA_CHECK(!written.overlaps(input.bytes), "afa_ext::", op, ": the gradient of layer ", layer,
                " overlaps the ", input.name, " of layer ", input.layer,
                " in memory; the CUDA kernels need every gradient apart from every input");
    }
  }
}

// The plan of one layer. When its strides need more outer dims than a LayerDesc holds,
// target and source are replaced by dense copies and grad_target, when given, by a fresh
// dense tensor to copy back; all are kept alive in ``copies`` until the launch is enqueued.
inline ReductionPlan plan_in_descriptor(Grouping grouping, Tensor& target, Tensor& source, Tensor* grad_target,
                                        TensorList& copies) {
  ReductionPlan plan = plan_of(grouping, target, source, grad_target ? *grad_target : target);
  if (fits_descriptor(plan)) return plan;
  target = torch::stable::contiguous(target);
  source = torch::stable::contiguous(source);
  copies.insert(copies.end(), {target, source});
  if (grad_target) {
    *grad_target = torch::stable::empty_like(target);
    copies.push_back(*grad_target);
  }
  return plan_of(grouping, target, source, grad_target ? *grad_target : target);
}

// The partial sums of every layer, in one launch. Layers are checked one by one under the
// name of the single op, as the CPU kernels do.
template <typename Runtime>
TensorList sqdist_forward_layers(const TensorList& targets, const TensorList& sources, Grouping grouping) {
  TensorList partials;
  for (size_t i = 0; i < targets.size(); ++i) {
    check_feature_pair(forward_name(grouping), targets[i], sources[i], Runtime::kDevice);
    partials.push_back(torch::stable::new_empty(targets[i], partial_sum_shape(targets[i], grouping),
                                                accumulate_type_of(targets[i].scalar_type())));
  }
  const typename Runtime::DeviceGuard guard(targets[0].get_device_index());
  AFA_DISPATCH_FEATURE_TYPES(targets[0].scalar_type(), "afa_ext_sqdist_cuda", [&] {
    using acc_t = accumulate_t<scalar_t>;
    std::vector<LayerDesc<scalar_t>> layers;
    std::vector<int64_t> blocks;
    TensorList copies;  // read by the launch: kept alive until it is enqueued
    for (size_t i = 0; i < targets.size(); ++i) {
      if (targets[i].numel() == 0) {
        torch::stable::zero_(partials[i]);
        continue;
      }
      Tensor target = targets[i], source = sources[i];
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
void sqdist_backward_layers_into(const char* op, const TensorList& grads, const TensorList& targets,
                                 const TensorList& sources, Grouping grouping, const TensorList& gradients) {
  AFA_CHECK(gradients.size() == targets.size(), "afa_ext::", op, ": expected one gradient per target, got ",
            targets.size(), " targets and ", gradients.size(), " gradients");
  TensorList weights;
  for (size_t i = 0; i < targets.size(); ++i) {
    check_feature_pair(backward_name(grouping), targets[i], sources[i], Runtime::kDevice);
    weights.push_back(checked_partial_grad(backward_name(grouping), grads[i], targets[i], grouping));
    check_gradient_output(op, gradients[i], targets[i], i);
  }
  check_gradients_apart_from_inputs(op, gradients, grads, targets, sources);
  const typename Runtime::DeviceGuard guard(targets[0].get_device_index());
  std::vector<std::pair<Tensor, Tensor>> copy_back;  // (dt, the contiguous dt written instead)
  AFA_DISPATCH_FEATURE_TYPES(targets[0].scalar_type(), "afa_ext_sqdist_cuda", [&] {
    using acc_t = accumulate_t<scalar_t>;
    std::vector<LayerDesc<scalar_t>> layers;
    std::vector<int64_t> blocks;
    TensorList copies;  // read by the launch: kept alive until it is enqueued
    for (size_t i = 0; i < targets.size(); ++i) {
      if (targets[i].numel() == 0) continue;
      Tensor target = targets[i], source = sources[i], grad_target = gradients[i];
      const ReductionPlan plan = plan_in_descriptor(grouping, target, source, &grad_target, copies);
      // A replaced handle (not the same tensor) is the fresh dense dt to copy back.
      if (grad_target.get() != gradients[i].get()) copy_back.emplace_back(gradients[i], grad_target);
      LayerDesc<scalar_t> layer = describe_layer<scalar_t>(plan, target, source, &grad_target);
      layer.weights = weights[i].const_data_ptr<acc_t>();
      blocks.push_back(shape_backward(layer));
      layers.push_back(layer);
    }
    if (!layers.empty()) Runtime::launch(sqdist_backward_layers_kernel<scalar_t>, layers, blocks);
  });
  for (auto& [grad_target, written] : copy_back) torch::stable::copy_(grad_target, written);
}

// dt of every layer, laid out as empty_like(target) (the layout the fake kernels promise).
template <typename Runtime>
TensorList sqdist_backward_layers(const char* op, const TensorList& grads, const TensorList& targets,
                                  const TensorList& sources, Grouping grouping) {
  TensorList gradients;
  for (const Tensor& target : targets) gradients.push_back(torch::stable::empty_like(target));
  sqdist_backward_layers_into<Runtime>(op, grads, targets, sources, grouping, gradients);
  return gradients;
}

}  // namespace cuda
}  // namespace afa_ext
