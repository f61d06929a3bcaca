// The Python module afa_ext._C: build_info() and empty_cache(), on Python's limited API so
// that one build serves every CPython from 3.11 on. The ops' schemas are declared once, in
// Python (afa_ext/ops/schemas.py, before this library is loaded); the kernels register
// their implementations per device (cpu/sqdist_cpu.cpp, cuda/sqdist_cuda.cu) through the
// LibTorch stable ABI, so one build also serves every torch from TORCH_TARGET_VERSION on.
#include <Python.h>
#include <torch/csrc/stable/version.h>

#include <string>

#include "cpu/huge_page_allocator.h"

// setup.py passes the CUDA architectures as -DAFA_EXT_CUDA_ARCHS=8.0,9.0 (no quotes, so
// no shell quoting is needed); absent in a CPU-only build.
#define AFA_EXT_STRINGIFY(...) #__VA_ARGS__
#define AFA_EXT_EXPAND_STRINGIFY(...) AFA_EXT_STRINGIFY(__VA_ARGS__)

namespace {

#ifdef AFA_EXT_CUDA_ARCHS
constexpr const char* kCudaArchs = AFA_EXT_EXPAND_STRINGIFY(AFA_EXT_CUDA_ARCHS);
#else
constexpr const char* kCudaArchs = "";
#endif

#if defined(CPU_CAPABILITY_AVX512)
constexpr const char* kCpuVectorIsa = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
constexpr const char* kCpuVectorIsa = "avx2";
#else
constexpr const char* kCpuVectorIsa = "default";
#endif

// "2.10" from a TORCH_ABI_VERSION-style number (major in the top byte, minor below).
std::string minor_version(unsigned long long version) {
  return std::to_string((version >> 56) & 0xFF) + "." + std::to_string((version >> 48) & 0xFF);
}

// "3.10" from Py_LIMITED_API (0x030a0000): the oldest CPython the binary serves.
const std::string kPythonLimitedApi =
    std::to_string((Py_LIMITED_API >> 24) & 0xFF) + "." + std::to_string((Py_LIMITED_API >> 16) & 0xFF);

bool set_item(PyObject* dict, const char* key, PyObject* value) {
  if (value == nullptr) return false;
  const int status = PyDict_SetItemString(dict, key, value);
  Py_DECREF(value);
  return status == 0;
}

PyObject* build_info(PyObject*, PyObject*) {
  PyObject* info = PyDict_New();
  if (info == nullptr) return nullptr;
  const std::string built_with = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                                 "." + std::to_string(TORCH_VERSION_PATCH);
  const bool ok = set_item(info, "torch_version", PyUnicode_FromString(built_with.c_str())) &&
                  set_item(info, "abi", PyUnicode_FromString("stable")) &&
                  set_item(info, "torch_min_version",
                           PyUnicode_FromString(minor_version(TORCH_FEATURE_VERSION).c_str())) &&
                  set_item(info, "python_limited_api", PyUnicode_FromString(kPythonLimitedApi.c_str())) &&
                  set_item(info, "cuda_archs", PyUnicode_FromString(kCudaArchs)) &&
                  set_item(info, "cpu_vector_isa", PyUnicode_FromString(kCpuVectorIsa));
  if (!ok) {
    Py_DECREF(info);
    return nullptr;
  }
  return info;
}

PyObject* empty_cache(PyObject*, PyObject*) {
  return PyLong_FromSize_t(afa_ext::HugePageAllocator::instance().release_cached_blocks());
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "How this extension was built: the torch it was built against, its ABI and the oldest torch it serves, "
     "CUDA archs, CPU vector instructions"},
    {"empty_cache", empty_cache, METH_NOARGS, "Frees the cached gradient blocks of the CPU backward; returns the bytes freed"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "afa_ext compiled kernels: loading this module registers the afa_ext ops",
    -1,
    methods,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
