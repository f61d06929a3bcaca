// CUDA implementation of the afa_ext ops (README.md, "How it works"): the kernels are in
// sqdist_kernels.cuh, their descriptors and launch shapes in sqdist_launch.h, the host
// code that checks, plans and launches in sqdist_host.h; this file adds the CUDA runtime
// and registers the ops.
//
//   forward:  d[n, j] = sum_p (t - s)^2 (channel) or e[n, p] = sum_j (t - s)^2 (spatial)
//   backward: dt = 2 * grad[n, j] * (t - s) or 2 * grad[n, p] * (t - s)
//
// Single and multi-layer ops share one path: each layer becomes a LayerDesc built from the
// ReductionPlan of its strides (channels_last, sliced and transposed features are read in
// place), and all layers of a pass run in one launch on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../sqdist_checks.h"
#include "sqdist_host.h"

namespace afa_ext {
namespace cuda {
namespace {

// The CUDA runtime of sqdist_host.h: every launch on the current stream, each checked.
struct CudaRuntime {
  static constexpr at::DeviceType kDevice = at::kCUDA;
  using DeviceGuard = c10::cuda::CUDAGuard;

  template <typename scalar_t>
  static void launch(void (*kernel)(const MultiLayerLaunch<scalar_t>), const std::vector<LayerDesc<scalar_t>>& layers,
                     const std::vector<int64_t>& blocks) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    for (const PlannedLaunch<scalar_t>& launch : plan_launches(layers, blocks)) {
      kernel<<<launch.blocks, kThreads, 0, stream>>>(launch.params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

at::Tensor channel_sqdist_cuda(const at::Tensor& target, const at::Tensor& source) {
  return sqdist_forward_layers<CudaRuntime>(target, source, Grouping::kChannel)[0];
}

at::Tensor spatial_sqdist_cuda(const at::Tensor& target, const at::Tensor& source) {
  return sqdist_forward_layers<CudaRuntime>(target, source, Grouping::kSpatial)[0];
}

at::Tensor channel_sqdist_backward_cuda(const at::Tensor& grad, const at::Tensor& target, const at::Tensor& source) {
  return sqdist_backward_layers<CudaRuntime>("channel_sqdist_backward", grad, target, source, Grouping::kChannel)[0];
}

at::Tensor spatial_sqdist_backward_cuda(const at::Tensor& grad, const at::Tensor& target, const at::Tensor& source) {
  return sqdist_backward_layers<CudaRuntime>("spatial_sqdist_backward", grad, target, source, Grouping::kSpatial)[0];
}

std::vector<at::Tensor> grouped_channel_sqdist_cuda(at::TensorList targets, at::TensorList sources) {
  check_layer_lists("grouped_channel_sqdist", targets, sources);
  return sqdist_forward_layers<CudaRuntime>(targets, sources, Grouping::kChannel);
}

std::vector<at::Tensor> grouped_spatial_sqdist_cuda(at::TensorList targets, at::TensorList sources) {
  check_layer_lists("grouped_spatial_sqdist", targets, sources);
  return sqdist_forward_layers<CudaRuntime>(targets, sources, Grouping::kSpatial);
}

std::vector<at::Tensor> grouped_channel_sqdist_backward_cuda(at::TensorList grads, at::TensorList targets,
                                                             at::TensorList sources) {
  constexpr const char* op = "grouped_channel_sqdist_backward";
  check_layer_lists(op, targets, sources, grads);
  return sqdist_backward_layers<CudaRuntime>(op, grads, targets, sources, Grouping::kChannel);
}

std::vector<at::Tensor> grouped_spatial_sqdist_backward_cuda(at::TensorList grads, at::TensorList targets,
                                                             at::TensorList sources) {
  constexpr const char* op = "grouped_spatial_sqdist_backward";
  check_layer_lists(op, targets, sources, grads);
  return sqdist_backward_layers<CudaRuntime>(op, grads, targets, sources, Grouping::kSpatial);
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
