// Per-element maths of the weighted squared distance, shared by the CPU and CUDA kernels.
//
// For target t and source s, the forward accumulates (t - s)^2 into a partial sum in the
// accumulation type (float for half types, double for double), and the backward writes
// dL/dt = 2 * w * (t - s), w being the upstream gradient of that partial sum.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AFA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AFA_HOST_DEVICE inline
#endif

namespace afa_ext {

// (t - s)^2 in the accumulation type.
template <typename acc_t, typename scalar_t>
AFA_HOST_DEVICE acc_t squared_difference(scalar_t target, scalar_t source) {
  const acc_t diff = static_cast<acc_t>(target) - static_cast<acc_t>(source);
  return diff * diff;
}

// dL/dt = twice_weight * (t - s), rounded once to the features' type.
template <typename acc_t, typename scalar_t>
AFA_HOST_DEVICE scalar_t distance_gradient(acc_t twice_weight, scalar_t target, scalar_t source) {
  const acc_t diff = static_cast<acc_t>(target) - static_cast<acc_t>(source);
  return static_cast<scalar_t>(twice_weight * diff);
}

}  // namespace afa_ext
