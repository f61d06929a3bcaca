// CUDA implementation of the afa_ext ops (DESIGN.md §2): the kernels are in
// sqdist_kernels.cuh, their descriptors and launch shapes in sqdist_launch.h.
//
//   forward:  d[n, j] = sum_p (t - s)^2 (channel) or e[n, p] = sum_j (t - s)^2 (spatial)
//   backward: dt = 2 * grad[n, j] * (t - s) or 2 * grad[n, p] * (t - s)
//
// Single and grouped ops share one path: each layer becomes a LayerDesc built from the
// ReductionPlan of its strides (channels_last, sliced and transposed features are read in
// place), and all layers of a pass run in one launch on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "../common/reduction_plan.h"
#include "../sqdist_checks.h"
#include "sqdist_kernels.cuh"
#include "sqdist_launch.h"

namespace afa_ext {
namespace cuda {
namespace {

template <typename scalar_t>
void launch_layers(void (*kernel)(const GroupedLaunch<scalar_t>), const std::vector<LayerDesc<scalar_t>>& layers,
                   const std::vector<int64_t>& blocks) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const PlannedLaunch<scalar_t>& launch : plan_launches(layers, blocks)) {
    kernel<<<launch.blocks, kThreads, 0, stream>>>(launch.params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

const char* forward_name(Grouping grouping) {
  return grouping == Grouping::kChannel ? "channel_sqdist" : "spatial_sqdist";
}

const char* backward_name(Grouping grouping) {
  return grouping == Grouping::kChannel ? "channel_sqdist_backward" : "spatial_sqdist_backward";
}

// The partial sums of every layer, in one launch. Layers are checked one by one under the
// name of the single op, as the CPU kernels do.
std::vector<at::Tensor> sqdist_forward_layers(at::TensorList targets, at::TensorList sources, Grouping grouping) {
  std::vector<at::Tensor> partials;
  for (size_t i = 0; i < targets.size(); ++i) {
    check_feature_pair(forward_name(grouping), targets[i], sources[i], at::kCUDA);
    partials.push_back(at::empty(partial_sum_shape(targets[i], grouping),
                                 targets[i].options().dtype(accumulate_type_of(targets[i].scalar_type()))));
  }
  const c10::cuda::CUDAGuard guard(targets[0].device());
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
      ReductionPlan plan = plan_of(grouping, target, source, target);
      if (!fits_descriptor(plan)) {  // more unmergeable dims than a LayerDesc holds
        target = target.contiguous();
        source = source.contiguous();
        copies.insert(copies.end(), {target, source});
        plan = plan_of(grouping, target, source, target);
      }
      LayerDesc<scalar_t> layer = describe_layer<scalar_t>(plan, target, source, nullptr);
      layer.partial = partials[i].mutable_data_ptr<acc_t>();
      blocks.push_back(shape_forward(layer));
      layers.push_back(layer);
    }
    if (!layers.empty()) launch_layers(grouped_sqdist_forward_kernel<scalar_t>, layers, blocks);
  });
  return partials;
}

// dt of every layer, in one launch; grads are converted by checked_partial_grad.
std::vector<at::Tensor> sqdist_backward_layers(at::TensorList grads, at::TensorList targets, at::TensorList sources,
                                               Grouping grouping) {
  std::vector<at::Tensor> weights, gradients;
  c10::cuda::OptionalCUDAGuard guard;
  for (size_t i = 0; i < targets.size(); ++i) {
    check_feature_pair(backward_name(grouping), targets[i], sources[i], at::kCUDA);
    if (i == 0) guard.set_device(targets[0].device());
    weights.push_back(checked_partial_grad(backward_name(grouping), grads[i], targets[i], grouping));
    gradients.push_back(at::empty_like(targets[i]));
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (dt, the contiguous dt written instead)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, targets[0].scalar_type(), "afa_ext_sqdist_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<LayerDesc<scalar_t>> layers;
    std::vector<int64_t> blocks;
    std::vector<at::Tensor> copies;  // read by the launch: kept alive until it is enqueued
    for (size_t i = 0; i < targets.size(); ++i) {
      if (targets[i].numel() == 0) continue;
      at::Tensor target = targets[i], source = sources[i], grad_target = gradients[i];
      ReductionPlan plan = plan_of(grouping, target, source, grad_target);
      if (!fits_descriptor(plan)) {  // more unmergeable dims than a LayerDesc holds
        target = target.contiguous();
        source = source.contiguous();
        grad_target = at::empty_like(target);
        copies.insert(copies.end(), {target, source});
        copy_back.emplace_back(gradients[i], grad_target);
        plan = plan_of(grouping, target, source, grad_target);
      }
      LayerDesc<scalar_t> layer = describe_layer<scalar_t>(plan, target, source, &grad_target);
      layer.weights = weights[i].const_data_ptr<acc_t>();
      blocks.push_back(shape_backward(layer));
      layers.push_back(layer);
    }
    if (!layers.empty()) launch_layers(grouped_sqdist_backward_kernel<scalar_t>, layers, blocks);
  });
  for (auto& [grad_target, written] : copy_back) grad_target.copy_(written);
  return gradients;
}

at::Tensor channel_sqdist_cuda(const at::Tensor& target, const at::Tensor& source) {
  return sqdist_forward_layers(target, source, Grouping::kChannel)[0];
}

at::Tensor spatial_sqdist_cuda(const at::Tensor& target, const at::Tensor& source) {
  return sqdist_forward_layers(target, source, Grouping::kSpatial)[0];
}

at::Tensor channel_sqdist_backward_cuda(const at::Tensor& grad, const at::Tensor& target, const at::Tensor& source) {
  return sqdist_backward_layers(grad, target, source, Grouping::kChannel)[0];
}

at::Tensor spatial_sqdist_backward_cuda(const at::Tensor& grad, const at::Tensor& target, const at::Tensor& source) {
  return sqdist_backward_layers(grad, target, source, Grouping::kSpatial)[0];
}

std::vector<at::Tensor> grouped_channel_sqdist_cuda(at::TensorList targets, at::TensorList sources) {
  check_layer_lists("grouped_channel_sqdist", targets, sources);
  return sqdist_forward_layers(targets, sources, Grouping::kChannel);
}

std::vector<at::Tensor> grouped_spatial_sqdist_cuda(at::TensorList targets, at::TensorList sources) {
  check_layer_lists("grouped_spatial_sqdist", targets, sources);
  return sqdist_forward_layers(targets, sources, Grouping::kSpatial);
}

std::vector<at::Tensor> grouped_channel_sqdist_backward_cuda(at::TensorList grads, at::TensorList targets,
                                                             at::TensorList sources) {
  check_layer_lists("grouped_channel_sqdist_backward", targets, sources, grads);
  return sqdist_backward_layers(grads, targets, sources, Grouping::kChannel);
}

std::vector<at::Tensor> grouped_spatial_sqdist_backward_cuda(at::TensorList grads, at::TensorList targets,
                                                             at::TensorList sources) {
  check_layer_lists("grouped_spatial_sqdist_backward", targets, sources, grads);
  return sqdist_backward_layers(grads, targets, sources, Grouping::kSpatial);
}

}  // namespace

TORCH_LIBRARY_IMPL(afa_ext, CUDA, m) {
  m.impl("channel_sqdist", &channel_sqdist_cuda);
  m.impl("spatial_sqdist", &spatial_sqdist_cuda);
  m.impl("channel_sqdist_backward", &channel_sqdist_backward_cuda);
  m.impl("spatial_sqdist_backward", &spatial_sqdist_backward_cuda);
  m.impl("grouped_channel_sqdist", &grouped_channel_sqdist_cuda);
  m.impl("grouped_spatial_sqdist", &grouped_spatial_sqdist_cuda);
  m.impl("grouped_channel_sqdist_backward", &grouped_channel_sqdist_backward_cuda);
  m.impl("grouped_spatial_sqdist_backward", &grouped_spatial_sqdist_backward_cuda);
}

}  // namespace cuda
}  // namespace afa_ext
