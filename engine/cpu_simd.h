// AVX2 helpers shared by the CPU kernels (cpu_kernels.cpp, cpu_matmul.cpp, cpu_fp32.cpp,
// cpu_vnni.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <immintrin.h>

namespace symphony {

constexpr int64_t kGroup = 32;  // int8 weights share a scale and a zero by 32 inputs
// How far ahead of the weight being read the kernels ask for the cache line: one
// row's stream alone left the memory idle between rows (1,024 bytes measured best on
// the 2-core Zen 3: the model's linears went from 13.4 to 16.4 G weights/s)
constexpr int64_t kPrefetchBytes = 1024;

inline void prefetch(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// the 8 weights q[0..7] as fp32: q * scale + zero
inline __m256 dequant8(const int8_t* q, __m256 scale, __m256 zero) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), scale, zero);
}

// rows m..m + R (R = min(4, M - m), a compile-time constant) of pass(R, m), for m from 0
template <typename Pass>
__attribute__((always_inline)) inline void by_four_rows(int64_t M, Pass pass) {
  for (int64_t m = 0; m < M; m += 4) {
    switch (std::min<int64_t>(4, M - m)) {
      case 4: pass(std::integral_constant<int, 4>(), m); break;
      case 3: pass(std::integral_constant<int, 3>(), m); break;
      case 2: pass(std::integral_constant<int, 2>(), m); break;
      default: pass(std::integral_constant<int, 1>(), m);
    }
  }
}

}  // namespace symphony
