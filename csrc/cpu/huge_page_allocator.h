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
//
// A block is handed to torch with the stable C shim's torch_from_blob, whose deleter gives
// it back here. That function came with torch 2.11 and the extension is built for 2.10, so
// it is declared weak: on torch 2.10 it is absent and every gradient comes from torch's
// own allocator (same results, without the saved page faults).
#pragma once

#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

extern "C" __attribute__((weak)) AOTITorchError torch_from_blob(
    void* data, int64_t ndim, const int64_t* sizes_ptr, const int64_t* strides_ptr, int64_t storage_offset,
    int32_t dtype, int32_t device_type, int32_t device_index, AtenTensorHandle* ret, int32_t layout,
    const uint8_t* opaque_metadata, int64_t opaque_metadata_size, void (*deleter)(void* data, void* ctx),
    void* deleter_ctx);

namespace afa_ext {

class HugePageAllocator final {
 public:
  static constexpr size_t kHugePage = size_t(2) << 20;
  static constexpr size_t kCacheLimit = size_t(1) << 30;

  // Never destroyed: tensors may die after static destructors have run at exit.
  static HugePageAllocator& instance() {
    static HugePageAllocator* allocator = new HugePageAllocator();
    return *allocator;
  }

  // An uninitialised tensor of the given sizes, strides and dtype on a block of at least
  // `bytes` bytes, which comes back here when the tensor's storage dies.
  torch::stable::Tensor empty_strided(const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides,
                                      torch::headeronly::ScalarType dtype, size_t bytes) {
    const size_t rounded = (std::max<size_t>(bytes, 1) + kHugePage - 1) / kHugePage * kHugePage;
    void* data = take_cached(rounded);
    if (data == nullptr) {
      if (posix_memalign(&data, kHugePage, rounded) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(data, rounded, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
    }
    Block* block = new Block{data, rounded};
    AtenTensorHandle handle = nullptr;
    const AOTITorchError status = torch_from_blob(
        data, static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), 0,
        torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype)), aoti_torch_device_type_cpu(), -1,
        &handle, aoti_torch_layout_strided(), nullptr, 0, &release, block);
    if (status != AOTI_TORCH_SUCCESS) {
      give_back(block);
      delete block;
      throw std::runtime_error("afa_ext: torch could not wrap a gradient block in a tensor");
    }
    return torch::stable::Tensor(handle);
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

  static void release(void* /*data*/, void* context) {
    Block* block = static_cast<Block*>(context);
    instance().give_back(block);
    delete block;
  }

  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> cache_;
  size_t cached_bytes_ = 0;
};

// Whether `tensor`'s elements fill a block of numel() elements with none stored twice, in
// some order of its dims (torch's is_non_overlapping_and_dense): then empty_like gives a
// tensor of its very strides.
inline bool non_overlapping_and_dense(const torch::stable::Tensor& tensor) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (int64_t d = 0; d < tensor.dim(); ++d) {
    if (tensor.size(d) != 1) dims.emplace_back(tensor.stride(d), tensor.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

// An uninitialised CPU tensor laid out as torch::stable::empty_like(like) lays it out, from
// the HugePageAllocator when it is above 4 MiB, non-overlapping and dense (empty_like then
// keeps its strides) and torch can hand blocks back (2.11 on); else from empty_like itself.
inline torch::stable::Tensor empty_like_on_huge_pages(const torch::stable::Tensor& like) {
  constexpr size_t kLargestRecycledBlock = size_t(4) << 20;
  const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (bytes <= kLargestRecycledBlock || torch_from_blob == nullptr || !non_overlapping_and_dense(like)) {
    return torch::stable::empty_like(like);
  }
  return HugePageAllocator::instance().empty_strided({like.sizes().begin(), like.sizes().end()},
                                                     {like.strides().begin(), like.strides().end()},
                                                     like.scalar_type(), bytes);
}

}  // namespace afa_ext
