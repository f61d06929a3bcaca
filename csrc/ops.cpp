// The Python module afa_ext._C: build_info() and empty_cache(). The ops' schemas are
// declared once, in Python (afa_ext/ops/schemas.py, before this library is loaded); the
// kernels register their implementations per device (cpu/sqdist_cpu.cpp, cuda/sqdist_cuda.cu).
#include <Python.h>
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

#include "cpu/huge_page_allocator.h"

// setup.py passes the CUDA architectures as -DAFA_EXT_CUDA_ARCHS=8.0,9.0 (no quotes, so
// no shell quoting is needed); absent in a CPU-only build.
#define AFA_EXT_STRINGIFY(...) #__VA_ARGS__
#define AFA_EXT_EXPAND_STRINGIFY(...) AFA_EXT_STRINGIFY(__VA_ARGS__)

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                          "." + std::to_string(TORCH_VERSION_PATCH);
#ifdef AFA_EXT_CUDA_ARCHS
  info["cuda_archs"] = std::string(AFA_EXT_EXPAND_STRINGIFY(AFA_EXT_CUDA_ARCHS));
#else
  info["cuda_archs"] = std::string();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#if defined(CPU_CAPABILITY_AVX512)
  info["cpu_vector_isa"] = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  info["cpu_vector_isa"] = "avx2";
#else
  info["cpu_vector_isa"] = "default";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "afa_ext compiled kernels: loading this module registers the afa_ext ops";
  m.def("build_info", &build_info, "How this extension was built: torch version, CUDA archs, OpenMP");
  m.def(
      "empty_cache", [] { return afa_ext::HugePageAllocator::instance().release_cached_blocks(); },
      "Frees the cached gradient blocks of the CPU backward; returns the bytes freed");
}
