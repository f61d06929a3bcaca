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
//
// Only the LibTorch stable ABI (torch/csrc/stable, torch/headeronly) and the CUDA runtime:
// the current stream comes from the AOTInductor C shim, declared for builds with USE_CUDA.
#ifndef USE_CUDA
#define USE_CUDA  // declares the CUDA functions of torch's C shims (the current stream)
#endif

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/tensor.h>

#include <vector>

#include "../sqdist_checks.h"
#include "sqdist_host.h"

namespace afa_ext {
namespace cuda {
namespace {

// The CUDA runtime of sqdist_host.h: every launch on the current stream, each checked.
struct CudaRuntime {
  static constexpr DeviceType kDevice = DeviceType::CUDA;
  using DeviceGuard = torch::stable::accelerator::DeviceGuard;

  // The current stream of the current device (set by the DeviceGuard to the features').
  static cudaStream_t current_stream() {
    const int32_t device = torch::stable::accelerator::getCurrentDeviceIndex();
    void* stream = nullptr;
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
    return static_cast<cudaStream_t>(stream);
  }

  template <typename scalar_t>
  static void launch(void (*kernel)(const MultiLayerLaunch<scalar_t>), const std::vector<LayerDesc<scalar_t>>& layers,
                     const std::vector<int64_t>& blocks) {
    const cudaStream_t stream = current_stream();
    for (const PlannedLaunch<scalar_t>& launch : plan_launches(layers, blocks)) {
      kernel<<<launch.blocks, kThreads, 0, stream>>>(launch.params);
      const cudaError_t error = cudaGetLastError();
      AFA_CHECK(error == cudaSuccess, "CUDA error: ", cudaGetErrorString(error));
    }
  }
};

Tensor channel_sqdist_cuda(const Tensor& target, const Tensor& source) {
  return sqdist_forward_layers<CudaRuntime>({target}, {source}, Grouping::kChannel)[0];
}

Tensor spatial_sqdist_cuda(const Tensor& target, const Tensor& source) {
  return sqdist_forward_layers<CudaRuntime>({target}, {source}, Grouping::kSpatial)[0];
}

Tensor channel_sqdist_backward_cuda(const Tensor& grad, const Tensor& target, const Tensor& source) {
  return sqdist_backward_layers<CudaRuntime>("channel_sqdist_backward", {grad}, {target}, {source},
                                             Grouping::kChannel)[0];
}

Tensor spatial_sqdist_backward_cuda(const Tensor& grad, const Tensor& target, const Tensor& source) {
  return sqdist_backward_layers<CudaRuntime>("spatial_sqdist_backward", {grad}, {target}, {source},
                                             Grouping::kSpatial)[0];
}

TensorList grouped_channel_sqdist_cuda(const TensorList& targets, const TensorList& sources) {
  check_layer_lists("grouped_channel_sqdist", targets, sources);
  return sqdist_forward_layers<CudaRuntime>(targets, sources, Grouping::kChannel);
}

TensorList grouped_spatial_sqdist_cuda(const TensorList& targets, const TensorList& sources) {
  check_layer_lists("grouped_spatial_sqdist", targets, sources);
  return sqdist_forward_layers<CudaRuntime>(targets, sources, Grouping::kSpatial);
}

TensorList grouped_channel_sqdist_backward_cuda(const TensorList& grads, const TensorList& targets,
                                                const TensorList& sources) {
  constexpr const char* op = "grouped_channel_sqdist_backward";
  check_layer_lists(op, targets, sources, &grads);
  return sqdist_backward_layers<CudaRuntime>(op, grads, targets, sources, Grouping::kChannel);
}

TensorList grouped_spatial_sqdist_backward_cuda(const TensorList& grads, const TensorList& targets,
                                                const TensorList& sources) {
  constexpr const char* op = "grouped_spatial_sqdist_backward";
  check_layer_lists(op, targets, sources, &grads);
  return sqdist_backward_layers<CudaRuntime>(op, grads, targets, sources, Grouping::kSpatial);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(afa_ext, CUDA, m) {
  m.impl("channel_sqdist", TORCH_BOX(&channel_sqdist_cuda));
  m.impl("spatial_sqdist", TORCH_BOX(&spatial_sqdist_cuda));
  m.impl("channel_sqdist_backward", TORCH_BOX(&channel_sqdist_backward_cuda));
  m.impl("spatial_sqdist_backward", TORCH_BOX(&spatial_sqdist_backward_cuda));
  m.impl("grouped_channel_sqdist", TORCH_BOX(&grouped_channel_sqdist_cuda));
  m.impl("grouped_spatial_sqdist", TORCH_BOX(&grouped_spatial_sqdist_cuda));
  m.impl("grouped_channel_sqdist_backward", TORCH_BOX(&grouped_channel_sqdist_backward_cuda));
  m.impl("grouped_spatial_sqdist_backward", TORCH_BOX(&grouped_spatial_sqdist_backward_cuda));
}

}  // namespace cuda
}  // namespace afa_ext
