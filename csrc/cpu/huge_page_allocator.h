// An allocator for the large gradient tensors the CPU backward writes.
//
// glibc serves blocks above 32 MiB (its largest mmap threshold) with a fresh mmap every
// time, so a 100 MB gradient from the default CPU allocator is mapped in 4 KiB pages on
// first touch, and on a virtual machine those page faults can cost more than the kernel
// that writes the tensor. Such blocks are therefore aligned to 2 MiB and marked
// MADV_HUGEPAGE, so Linux backs them with transparent huge pages where it allows (what
// torch does for every tensor when THP_MEM_ALLOC_ENABLE=1). Smaller blocks, which glibc
// recycles from its heap, come from the default allocator. Memory is returned to the
// system when the tensor dies: nothing is cached.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace afa_ext {

class HugePageAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHugePage = size_t(2) << 20;
  static constexpr size_t kSmallAlignment = 64;

  c10::DataPtr allocate(size_t nbytes) override {
    const bool huge = nbytes >= kHugePage;
    const size_t alignment = huge ? kHugePage : kSmallAlignment;
    const size_t rounded = (std::max<size_t>(nbytes, 1) + alignment - 1) / alignment * alignment;
    void* data = nullptr;
    if (posix_memalign(&data, alignment, rounded) != 0) {
      TORCH_CHECK_WITH(OutOfMemoryError, false, "afa_ext: could not allocate ", nbytes, " bytes");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (huge) madvise(data, rounded, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* data) { std::free(data); }
};

// An uninitialised CPU tensor like ``like`` (same strides when it is dense, else its
// suggested memory format), from the HugePageAllocator when it is above 32 MiB.
inline at::Tensor empty_like_on_huge_pages(const at::Tensor& like) {
  constexpr size_t kLargestRecycledBlock = size_t(32) << 20;
  static HugePageAllocator allocator;
  if (static_cast<size_t>(like.numel()) * like.element_size() <= kLargestRecycledBlock) {
    return at::empty_like(like);
  }
  const at::Tensor layout = at::empty_like(like, like.options().device(at::kMeta));
  return at::detail::empty_strided_generic(layout.sizes(), layout.strides(), &allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), like.scalar_type());
}

}  // namespace afa_ext
