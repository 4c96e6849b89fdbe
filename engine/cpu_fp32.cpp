// fp32 weights streamed, for steps of few rows: y [M, N] = x [M, K] W^T, x and W fp32.
//
// At decode a call's weights come cold from memory and each is used for a few rows, so
// the kernel is a read stream: each thread takes one run of W's rows (one sequential
// read), and every weight row is loaded once for up to 4 rows of x, in two chains a row.
// It asks for the weights' cache lines ahead of their use: one row's stream alone left
// the memory idle between rows. Where the CPU has AVX-512 (and GCC built it) the stream
// loads 64 bytes an instruction and asks for two lines 1.5 KB ahead every two it reads.
// On the 2-core Xeon of 2026-12-04, the fp32 model's 121 linears at one row (538 MB, cold, in a
// step's order; median of 55 passes, three runs alternating builds): 17.9-19.5 ms in
// AVX-512, 19.1-20.9 in AVX2, 20.8-21.3 by the kernel before (the AVX2 stream choosing
// its row count per weight row). The AVX2 stream's 1 KB distance had been measured best
// on the 2-core Zen 3 (torch's GEMM reached 8.9 GB/s on one row there, the stream 15-17).
//
// Each path sums y[m, n] in one order whatever rows the call has, so a row's result
// does not depend on the rows beside it; the two paths differ from each other in their
// last bits (8 lanes a chain against 16).

#include <ATen/Parallel.h>
#include <algorithm>
#include <torch/extension.h>

#include "cpu_rows.h"
#include "cpu_simd.h"

using namespace symphony;

namespace {

// y[r, n] for R rows of x (K apart) and one fp32 weight row w: 2 R chains, each weight
// vector loaded once for the R rows
template <int R>
inline void row_avx2(const float* x, int64_t K, const float* w, float* y, int64_t N) {
  __m256 a[R], b[R];
  for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    prefetch(w + k);
    const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
    for (int r = 0; r < R; ++r) {
      a[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k), a[r]);
      b[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + k + 8), b[r]);
    }
  }
  for (; k < K; k += 8)
    for (int r = 0; r < R; ++r)
      a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + r * K + k), a[r]);
  for (int r = 0; r < R; ++r) y[r * N] = hsum(_mm256_add_ps(a[r], b[r]));
}

// The weight rows n0..n1 against all M rows of x by run(R, m, a, b) (R rows from m, a
// constant, against the weight rows a..b): up to 4 rows in one run over the whole range;
// more, each weight row against every 4 rows in turn while it is in cache.
template <typename Run>
__attribute__((always_inline)) inline void weight_rows(int64_t M, int64_t n0, int64_t n1, Run run) {
  if (M <= 4)
    return by_four_rows(M, [&](auto rows, int64_t m) { run(rows, m, n0, n1); });
  for (int64_t n = n0; n < n1; ++n)
    by_four_rows(M, [&](auto rows, int64_t m) { run(rows, m, n, n + 1); });
}

void rows_avx2(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N,
               int64_t n0, int64_t n1) {
  weight_rows(M, n0, n1, [&](auto rows, int64_t m, int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n)
      row_avx2<decltype(rows)::value>(x + m * K, K, w + n * K, y + m * N + n, N);
  });
}

#if defined(__GNUC__) && !defined(__clang__)  // the target pragma below is GCC's
#define SYMPHONY_FP32_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,fma")

// the AVX-512 stream's distance ahead (1, 1.5 and 2 KB measured level on the Xeon, 4 KB
// and non-temporal hints slower)
constexpr int64_t kAhead512 = 1536;

// row_avx2's work in 16 lanes: two chains over 32 inputs a pass, then a masked tail of
// the last K % 32 (a multiple of 8) in the first chain
template <int R>
inline void row_avx512(const float* x, int64_t K, const float* w, float* y, int64_t N) {
  __m512 a[R], b[R];
  for (int r = 0; r < R; ++r) a[r] = b[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const char* ahead = reinterpret_cast<const char*>(w + k) + kAhead512;
    _mm_prefetch(ahead, _MM_HINT_T0);
    _mm_prefetch(ahead + 64, _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + k + 16);
    for (int r = 0; r < R; ++r) {
      a[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * K + k), a[r]);
      b[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * K + k + 16), b[r]);
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1u);
    const __m512 wv = _mm512_maskz_loadu_ps(mask, w + k);
    for (int r = 0; r < R; ++r)
      a[r] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + r * K + k), a[r]);
  }
  for (int r = 0; r < R; ++r) y[r * N] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
}

void rows_avx512(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N,
                 int64_t n0, int64_t n1) {
  weight_rows(M, n0, n1, [&](auto rows, int64_t m, int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n)
      row_avx512<decltype(rows)::value>(x + m * K, K, w + n * K, y + m * N + n, N);
  });
}

#pragma GCC pop_options

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}
#else  // another compiler: the AVX2 stream alone
bool cpu_has_avx512() { return false; }
#endif

torch::Tensor stream(torch::Tensor x, const torch::Tensor& w, bool avx512) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.is_contiguous() &&
                  w.size(1) % 8 == 0 && w.device().is_cpu(),
              "w must be a contiguous fp32 matrix with an input size a multiple of 8");
  const int64_t K = w.size(1), N = w.size(0);
  x = rows_of(x, K);
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
#ifdef SYMPHONY_FP32_AVX512
    if (avx512) return rows_avx512(xp, M, K, wp, yp, N, n0, n1);
#endif
    rows_avx2(xp, M, K, wp, yp, N, n0, n1);
  });
  return y;
}

}  // namespace

bool fp32_avx512_supported() {
  static const bool supported = cpu_has_avx512();
  return supported;
}

// x [M, K] fp32 -> y [M, N] = x W^T for W [N, K] fp32, K % 8 == 0: the decode stream,
// in AVX-512 where the CPU has it
torch::Tensor fp32_mm(torch::Tensor x, torch::Tensor w) {
  return stream(std::move(x), w, fp32_avx512_supported());
}

// the same by the AVX2 stream alone, whatever the CPU has (tests check both paths)
torch::Tensor fp32_mm_avx2(torch::Tensor x, torch::Tensor w) { return stream(std::move(x), w, false); }
