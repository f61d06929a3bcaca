// The vector lanes of the CPU kernels: 32 bytes of features at a time, widened to vectors
// of their accumulation type and narrowed back, with plain or streaming stores.
//
// Vec is a GCC/Clang vector: + - * act per lane and compile to AVX2 when the build enables
// it (setup.py's AFA_EXT_CPU_ISA), else to pairs of SSE instructions. The float16 and
// bfloat16 conversions use F16C and AVX2 where enabled, else one lane at a time, and round
// as torch does (to nearest even; a bfloat16 NaN becomes 0x7FC0).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "../common/scalar_types.h"

namespace afa_ext {
namespace cpu {

constexpr int64_t kVectorBytes = 32;

template <typename T>
struct Vec {
  typedef T Native __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t kSize = kVectorBytes / static_cast<int64_t>(sizeof(T));

  Native lanes;

  static Vec broadcast(T value) {
    Vec v;
    for (int64_t k = 0; k < kSize; ++k) v.lanes[k] = value;
    return v;
  }
  static Vec loadu(const T* p) {
    Vec v;
    std::memcpy(&v.lanes, p, sizeof(Native));
    return v;
  }
  void storeu(T* p) const { std::memcpy(p, &lanes, sizeof(Native)); }

  // Lane 0 + lane 1 + ..., in that order.
  T sum() const {
    T total = 0;
    for (int64_t k = 0; k < kSize; ++k) total += lanes[k];
    return total;
  }

  friend Vec operator+(Vec a, Vec b) { return {a.lanes + b.lanes}; }
  friend Vec operator-(Vec a, Vec b) { return {a.lanes - b.lanes}; }
  friend Vec operator*(Vec a, Vec b) { return {a.lanes * b.lanes}; }
};

// a * b + c, rounded once where the CPU has FMA.
template <typename T>
Vec<T> fmadd(Vec<T> a, Vec<T> b, Vec<T> c) {
#if defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) {
    return {reinterpret_cast<typename Vec<T>::Native>(_mm256_fmadd_ps(
        reinterpret_cast<__m256>(a.lanes), reinterpret_cast<__m256>(b.lanes), reinterpret_cast<__m256>(c.lanes)))};
  } else {
    return {reinterpret_cast<typename Vec<T>::Native>(_mm256_fmadd_pd(
        reinterpret_cast<__m256d>(a.lanes), reinterpret_cast<__m256d>(b.lanes), reinterpret_cast<__m256d>(c.lanes)))};
  }
#else
  return a * b + c;
#endif
}

// Writes kVectorBytes bytes. With kStream, a non-temporal store that goes straight to
// memory without first reading the line (p must be 32-byte aligned); fence() orders a
// thread's streaming stores before the work it hands back.
template <bool kStream>
inline void write_vector(void* p, const void* bytes) {
#if defined(__AVX__)
  if constexpr (kStream) {
    __m256i v;
    std::memcpy(&v, bytes, sizeof(v));
    _mm256_stream_si256(static_cast<__m256i*>(p), v);
    return;
  }
#elif defined(__SSE2__)
  if constexpr (kStream) {
    for (int half = 0; half < 2; ++half) {
      __m128i v;
      std::memcpy(&v, static_cast<const char*>(bytes) + 16 * half, sizeof(v));
      _mm_stream_si128(static_cast<__m128i*>(p) + half, v);
    }
    return;
  }
#endif
  std::memcpy(p, bytes, kVectorBytes);
}

inline void fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// kStep features as kParts vectors of their accumulation type.
template <typename scalar_t>
struct Lanes {
  using acc_t = accumulate_t<scalar_t>;
  using AccVec = Vec<acc_t>;
  static constexpr int64_t kStep = kVectorBytes / static_cast<int64_t>(sizeof(scalar_t));
  static constexpr int kParts = static_cast<int>(kStep / AccVec::kSize);

  static void load(const scalar_t* p, AccVec* out) {
    if constexpr (kParts == 1) {
      out[0] = AccVec::loadu(p);
    } else {
      for (int part = 0; part < kParts; ++part) out[part] = widen(p + part * AccVec::kSize);
    }
  }

  template <bool kStream = false>
  static void store(scalar_t* p, const AccVec* in) {
    alignas(kVectorBytes) unsigned char bytes[kVectorBytes];
    if constexpr (kParts == 1) {
      std::memcpy(bytes, &in[0].lanes, kVectorBytes);
    } else {
      for (int part = 0; part < kParts; ++part) narrow(in[part], bytes + part * kVectorBytes / kParts);
    }
    write_vector<kStream>(p, bytes);
  }

 private:
  // 8 features of a 16-bit type as floats.
  static AccVec widen(const scalar_t* p) {
#if defined(__F16C__)
    if constexpr (std::is_same_v<scalar_t, Half>) {
      const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return {reinterpret_cast<typename AccVec::Native>(_mm256_cvtph_ps(bits))};
    }
#endif
#if defined(__AVX2__)
    if constexpr (std::is_same_v<scalar_t, BFloat16>) {
      const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      const __m256i widened = _mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16);
      return {reinterpret_cast<typename AccVec::Native>(_mm256_castsi256_ps(widened))};
    }
#endif
    AccVec v;
    for (int64_t k = 0; k < AccVec::kSize; ++k) v.lanes[k] = static_cast<float>(p[k]);
    return v;
  }

  // 8 floats rounded to the 16-bit type, written to out (16 bytes).
  static void narrow(const AccVec& v, unsigned char* out) {
#if defined(__F16C__)
    if constexpr (std::is_same_v<scalar_t, Half>) {
      const __m128i bits = _mm256_cvtps_ph(reinterpret_cast<__m256>(v.lanes), _MM_FROUND_TO_NEAREST_INT);
      std::memcpy(out, &bits, sizeof(bits));
      return;
    }
#endif
#if defined(__AVX2__)
    if constexpr (std::is_same_v<scalar_t, BFloat16>) {
      const __m256 floats = reinterpret_cast<__m256>(v.lanes);
      const __m256i bits = _mm256_castps_si256(floats);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(floats, floats, _CMP_UNORD_Q));
      rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
      // Every lane is below 2^16, so packing to 16 bits is exact; the permute undoes the
      // pack's interleaving of the two 128-bit halves.
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8);
      const __m128i low = _mm256_castsi256_si128(packed);
      std::memcpy(out, &low, sizeof(low));
      return;
    }
#endif
    scalar_t narrowed[AccVec::kSize];
    for (int64_t k = 0; k < AccVec::kSize; ++k) narrowed[k] = static_cast<scalar_t>(v.lanes[k]);
    std::memcpy(out, narrowed, sizeof(narrowed));
  }
};

}  // namespace cpu
}  // namespace afa_ext
