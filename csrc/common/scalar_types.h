// The dtypes the ops take, the type each accumulates in, and the dispatch over them:
// header-only (torch/headeronly), so the CPU kernels, the CUDA kernels and their host code
// share it without linking against libtorch's C++ API.
#pragma once

#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

namespace afa_ext {

using torch::headeronly::BFloat16;
using torch::headeronly::Half;
using torch::headeronly::ScalarType;

// The type partial sums and gradients are computed in: float for the 16-bit types, else
// the features' own type.
template <typename scalar_t>
struct Accumulate {
  using type = scalar_t;
};
template <>
struct Accumulate<Half> {
  using type = float;
};
template <>
struct Accumulate<BFloat16> {
  using type = float;
};
template <typename scalar_t>
using accumulate_t = typename Accumulate<scalar_t>::type;

inline ScalarType accumulate_type_of(ScalarType type) {
  return (type == ScalarType::Half || type == ScalarType::BFloat16) ? ScalarType::Float : type;
}

inline bool is_feature_type(ScalarType type) {
  return type == ScalarType::Double || type == ScalarType::Float || type == ScalarType::Half ||
         type == ScalarType::BFloat16;
}

}  // namespace afa_ext

// Runs the lambda __VA_ARGS__ with scalar_t set to the C++ type of TYPE, one of the
// feature dtypes (is_feature_type).
#define AFA_DISPATCH_FEATURE_TYPES(TYPE, NAME, ...)                                  \
  THO_DISPATCH_SWITCH(TYPE, NAME,                                                    \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Double, __VA_ARGS__) \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Float, __VA_ARGS__)  \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Half, __VA_ARGS__)   \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::BFloat16, __VA_ARGS__))
