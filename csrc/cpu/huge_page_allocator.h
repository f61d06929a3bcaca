// An allocator for the large gradient tensors the CPU backward writes.
//
// glibc serves large blocks with a fresh mmap (always above 32 MiB, its largest mmap
// threshold, and often above a few MiB, as its threshold and heap trimming follow earlier
// frees), so a gradient from the default CPU allocator is mapped page by page on first
// touch, and on a virtual machine those page faults cost more than the kernel that
// writes the tensor: the four-layer ResNet-101 backward at batch 32, whose last two
// gradients are 26 and 13 MB, took thousands of page faults and up to twice its time.
// Blocks above 4 MiB are therefore:
// - aligned to 2 MiB and marked MADV_HUGEPAGE, so Linux backs them with transparent huge
//   pages where it allows (what torch does for every tensor when THP_MEM_ALLOC_ENABLE=1);
// - kept for reuse when their tensor dies, up to kCacheLimit bytes in all (blocks of
//   sizes no longer asked for are evicted first), so the next training step writes its
//   gradient into memory that is already mapped (as the CUDA caching allocator does on
//   the GPU). release_cached_blocks() hands them back.
// Smaller blocks, which glibc recycles from its heap, come from the default allocator
// (rounding them up to 2 MiB would waste too much).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace afa_ext {

class HugePageAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHugePage = size_t(2) << 20;
  static constexpr size_t kCacheLimit = size_t(1) << 30;

  // Never destroyed: tensors may die after static destructors have run at exit.
  static HugePageAllocator& instance() {
    static HugePageAllocator* allocator = new HugePageAllocator();
    return *allocator;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    const size_t rounded = (std::max<size_t>(nbytes, 1) + kHugePage - 1) / kHugePage * kHugePage;
    void* data = take_cached(rounded);
    if (data == nullptr) {
      if (posix_memalign(&data, kHugePage, rounded) != 0) {
        TORCH_CHECK_WITH(OutOfMemoryError, false, "afa_ext: could not allocate ", nbytes, " bytes");
      }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(data, rounded, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
    }
    return {data, new Block{data, rounded}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees every cached block; returns the number of bytes handed back.
  size_t release_cached_blocks() {
    std::vector<void*> blocks;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      for (auto& entry : cache_) {
        for (void* data : entry.second) blocks.push_back(data);
        bytes += entry.first * entry.second.size();
      }
      cache_.clear();
      cached_bytes_ = 0;
    }
    for (void* data : blocks) std::free(data);
    return bytes;
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  HugePageAllocator() = default;

  void* take_cached(size_t bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    auto found = cache_.find(bytes);
    if (found == cache_.end() || found->second.empty()) return nullptr;
    void* data = found->second.back();
    found->second.pop_back();
    cached_bytes_ -= bytes;
    return data;
  }

  // Caches the block when it fits under kCacheLimit, first evicting blocks of other sizes
  // (left over from an earlier input resolution: a training loop reuses the sizes of its
  // current one).
  void give_back(Block* block) {
    std::vector<void*> evicted;
    bool cached = false;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      for (auto entry = cache_.begin(); entry != cache_.end() && cached_bytes_ + block->bytes > kCacheLimit;) {
        if (entry->first == block->bytes) {
          ++entry;
          continue;
        }
        evicted.insert(evicted.end(), entry->second.begin(), entry->second.end());
        cached_bytes_ -= entry->first * entry->second.size();
        entry = cache_.erase(entry);
      }
      if (cached_bytes_ + block->bytes <= kCacheLimit) {
        cache_[block->bytes].push_back(block->data);
        cached_bytes_ += block->bytes;
        cached = true;
      }
    }
    for (void* data : evicted) std::free(data);
    if (!cached) std::free(block->data);
  }

  static void release(void* context) {
    Block* block = static_cast<Block*>(context);
    instance().give_back(block);
    delete block;
  }

  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> cache_;
  size_t cached_bytes_ = 0;
};

// An uninitialised CPU tensor like ``like`` (same strides when it is dense, else its
// suggested memory format), from the HugePageAllocator when it is above 4 MiB.
inline at::Tensor empty_like_on_huge_pages(const at::Tensor& like) {
  constexpr size_t kLargestRecycledBlock = size_t(4) << 20;
  if (static_cast<size_t>(like.numel()) * like.element_size() <= kLargestRecycledBlock) {
    return at::empty_like(like);
  }
  const at::Tensor layout = at::empty_like(like, like.options().device(at::kMeta));
  return at::detail::empty_strided_generic(layout.sizes(), layout.strides(), &HugePageAllocator::instance(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), like.scalar_type());
}

}  // namespace afa_ext
