// The schemas of the eight squared-distance ops, for every library that declares them: the
// afa_ext library (ops.cpp) and the CUDA emulation of the tests (tests/cuda_emulation/).
// afa_ext/_op_formulas.py mirrors them for the Triton library afa_ext_triton.
#pragma once

#include <torch/library.h>

namespace afa_ext {

inline void define_sqdist_ops(torch::Library& m) {
  m.def("channel_sqdist(Tensor target, Tensor source) -> Tensor");
  m.def("spatial_sqdist(Tensor target, Tensor source) -> Tensor");
  m.def("channel_sqdist_backward(Tensor grad, Tensor target, Tensor source) -> Tensor");
  m.def("spatial_sqdist_backward(Tensor grad, Tensor target, Tensor source) -> Tensor");
  // The same for the L hooked layers of a model at once (one dtype and device, any shapes):
  // one launch per pass on a GPU instead of L small ones.
  m.def("grouped_channel_sqdist(Tensor[] targets, Tensor[] sources) -> Tensor[]");
  m.def("grouped_spatial_sqdist(Tensor[] targets, Tensor[] sources) -> Tensor[]");
  m.def("grouped_channel_sqdist_backward(Tensor[] grads, Tensor[] targets, Tensor[] sources) -> Tensor[]");
  m.def("grouped_spatial_sqdist_backward(Tensor[] grads, Tensor[] targets, Tensor[] sources) -> Tensor[]");
}

}  // namespace afa_ext
