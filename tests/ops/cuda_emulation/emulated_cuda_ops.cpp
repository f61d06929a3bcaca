// The CUDA kernels of csrc/cuda run on the CPU, for tests on machines without a GPU.
//
// The kernel header and the host code (sqdist_host.h) are compiled unchanged by the host
// compiler. A block runs as kThreads std::threads that loop over the blocks of a launch in
// step; __syncthreads is a barrier of all of them and __shfl_xor_sync a barrier of the 32
// threads of a warp around a shared exchange slot. It is slow and knows nothing of memory
// coalescing: it checks what the kernels compute (indexing, vector and scalar paths, the
// reductions, the multi-layer launches), not how fast. The ops are registered as
// afa_ext_cuda_emulated::<op> for CPU tensors (tests/ops/test_cuda_emulated.py), through
// the LibTorch stable ABI like afa_ext._C.
//
// The torch headers come first, before __CUDACC__ and the CUDA keywords are defined
// below: the header-only Half and BFloat16 would otherwise take their CUDA paths.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "common/scalar_types.h"
#include "sqdist_checks.h"

#include <barrier>
#include <cstring>
#include <deque>
#include <string>
#include <thread>
#include <vector>

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct EmulatedIndex {
  unsigned int x = 0, y = 0, z = 0;
};
thread_local EmulatedIndex threadIdx, blockIdx;

#define __CUDACC__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static  // one block runs at a time: a static array is its shared memory

inline uint4 __ldg(const uint4* address) { return *address; }

namespace emulation {

constexpr int kBlockThreads = 256;  // afa_ext::cuda::kThreads, checked below
constexpr int kWarp = 32;

struct Block {
  std::barrier<> all{kBlockThreads};
  std::deque<std::barrier<>> warps;  // a deque: barriers cannot move
  alignas(16) unsigned char exchange[kBlockThreads * 16];
  Block() {
    for (int w = 0; w < kBlockThreads / kWarp; ++w) warps.emplace_back(kWarp);
  }
};
thread_local Block* current_block = nullptr;

}  // namespace emulation

inline void __syncthreads() { emulation::current_block->all.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= 16, "one exchange slot per thread");
  emulation::Block& block = *emulation::current_block;
  const int lane = threadIdx.x % emulation::kWarp, warp = threadIdx.x / emulation::kWarp;
  T* slots = reinterpret_cast<T*>(block.exchange + warp * emulation::kWarp * 16);
  std::memcpy(slots + lane, &value, sizeof(T));
  block.warps[warp].arrive_and_wait();
  T other;
  std::memcpy(&other, slots + (lane ^ lane_mask), sizeof(T));
  block.warps[warp].arrive_and_wait();
  return other;
}

#include "cuda/sqdist_host.h"

namespace afa_ext {
namespace cuda {
namespace {

static_assert(kThreads == emulation::kBlockThreads, "the emulation runs blocks of kThreads threads");

template <typename Params>
void run_blocks(void (*kernel)(const Params), const Params& params, int64_t blocks) {
  emulation::Block block;
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      emulation::current_block = &block;
      threadIdx.x = t;
      for (int64_t b = 0; b < blocks; ++b) {
        blockIdx.x = static_cast<unsigned int>(b);
        kernel(params);
        block.all.arrive_and_wait();  // the next block starts when every thread is done
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
}

struct EmulatedRuntime {
  static constexpr DeviceType kDevice = DeviceType::CPU;
  struct DeviceGuard {
    explicit DeviceGuard(int32_t /*device_index*/) {}
  };

  template <typename scalar_t>
  static void launch(void (*kernel)(const MultiLayerLaunch<scalar_t>), const std::vector<LayerDesc<scalar_t>>& layers,
                     const std::vector<int64_t>& blocks) {
    for (const PlannedLaunch<scalar_t>& launch : plan_launches(layers, blocks)) {
      run_blocks(kernel, launch.params, static_cast<int64_t>(launch.blocks));
    }
  }
};

TensorList forward(const TensorList& targets, const TensorList& sources, Grouping grouping) {
  return sqdist_forward_layers<EmulatedRuntime>(targets, sources, grouping);
}

TensorList backward(const char* op, const TensorList& grads, const TensorList& targets, const TensorList& sources,
                    Grouping grouping) {
  return sqdist_backward_layers<EmulatedRuntime>(op, grads, targets, sources, grouping);
}

Grouping grouping_of_op(const std::string& op) {
  return op.find("channel") != std::string::npos ? Grouping::kChannel : Grouping::kSpatial;
}

// The kernels registered for the eight standard ops.

Tensor channel_sqdist(const Tensor& target, const Tensor& source) {
  return forward({target}, {source}, Grouping::kChannel)[0];
}

Tensor spatial_sqdist(const Tensor& target, const Tensor& source) {
  return forward({target}, {source}, Grouping::kSpatial)[0];
}

Tensor channel_sqdist_backward(const Tensor& grad, const Tensor& target, const Tensor& source) {
  return backward("channel_sqdist_backward", {grad}, {target}, {source}, Grouping::kChannel)[0];
}

Tensor spatial_sqdist_backward(const Tensor& grad, const Tensor& target, const Tensor& source) {
  return backward("spatial_sqdist_backward", {grad}, {target}, {source}, Grouping::kSpatial)[0];
}

TensorList grouped_channel_sqdist(const TensorList& targets, const TensorList& sources) {
  check_layer_lists("grouped_channel_sqdist", targets, sources);
  return forward(targets, sources, Grouping::kChannel);
}

TensorList grouped_spatial_sqdist(const TensorList& targets, const TensorList& sources) {
  check_layer_lists("grouped_spatial_sqdist", targets, sources);
  return forward(targets, sources, Grouping::kSpatial);
}

TensorList grouped_channel_sqdist_backward(const TensorList& grads, const TensorList& targets,
                                           const TensorList& sources) {
  check_layer_lists("grouped_channel_sqdist_backward", targets, sources, &grads);
  return backward("grouped_channel_sqdist_backward", grads, targets, sources, Grouping::kChannel);
}

TensorList grouped_spatial_sqdist_backward(const TensorList& grads, const TensorList& targets,
                                           const TensorList& sources) {
  check_layer_lists("grouped_spatial_sqdist_backward", targets, sources, &grads);
  return backward("grouped_spatial_sqdist_backward", grads, targets, sources, Grouping::kSpatial);
}

// The backward op `op` (one of the four) writing into `gradients` instead of fresh tensors:
// the list's handles are the caller's tensors (schema Tensor(a!)[]).
void backward_into(const std::string& op, const TensorList& grads, const TensorList& targets,
                   const TensorList& sources, const TensorList& gradients) {
  if (op.rfind("grouped_", 0) == 0) check_layer_lists(op.c_str(), targets, sources, &grads);
  sqdist_backward_layers_into<EmulatedRuntime>(op.c_str(), grads, targets, sources, grouping_of_op(op),
                                               gradients);
}

// Whether the features of one layer are walked in place, or copied dense first because
// their plan has more outer dims than a LayerDesc holds.
bool plan_fits_descriptor(const std::string& grouping, const Tensor& target, const Tensor& source) {
  return fits_descriptor(plan_of(grouping_of_op(grouping), target, source, torch::stable::empty_like(target)));
}

}  // namespace
}  // namespace cuda
}  // namespace afa_ext

namespace cuda = afa_ext::cuda;

// Test-only ops; the eight standard ones are declared from Python (afa_ext.ops.schemas).
STABLE_TORCH_LIBRARY_FRAGMENT(afa_ext_cuda_emulated, m) {
  m.def("sqdist_backward_into(str op, Tensor[] grads, Tensor[] targets, Tensor[] sources, "
        "Tensor(a!)[] gradients) -> ()");
  m.def("plan_fits_descriptor(str grouping, Tensor target, Tensor source) -> bool");
}

STABLE_TORCH_LIBRARY_IMPL(afa_ext_cuda_emulated, CPU, m) {
  m.impl("channel_sqdist", TORCH_BOX(&cuda::channel_sqdist));
  m.impl("spatial_sqdist", TORCH_BOX(&cuda::spatial_sqdist));
  m.impl("channel_sqdist_backward", TORCH_BOX(&cuda::channel_sqdist_backward));
  m.impl("spatial_sqdist_backward", TORCH_BOX(&cuda::spatial_sqdist_backward));
  m.impl("grouped_channel_sqdist", TORCH_BOX(&cuda::grouped_channel_sqdist));
  m.impl("grouped_spatial_sqdist", TORCH_BOX(&cuda::grouped_spatial_sqdist));
  m.impl("grouped_channel_sqdist_backward", TORCH_BOX(&cuda::grouped_channel_sqdist_backward));
  m.impl("grouped_spatial_sqdist_backward", TORCH_BOX(&cuda::grouped_spatial_sqdist_backward));
  m.impl("sqdist_backward_into", TORCH_BOX(&cuda::backward_into));
  m.impl("plan_fits_descriptor", TORCH_BOX(&cuda::plan_fits_descriptor));
}
