// int8 weights times int16 activations with AVX-512 VNNI: y [M, N] = x [M, K] W^T.
//
// Where the CPU has AVX-512 VNNI (Zen 4, Ice Lake and later), vpdpwssd multiplies 32
// pairs of int16 into 16 int32 sums in one instruction: measured on the 2-core Zen 4,
// 2.5x the multiply-adds a second of fp32 FMA, and the int8 weights need one widening
// (not a conversion to fp32 and a scale) each. So steps of many rows (batches,
// prefill), which the fp32 kernels run at their FMA bound, go about twice as fast, and
// the decode stream does less work a byte.
//
// The weights are cpu_matmul.cpp's int8 groups of 32 inputs (w = q * scale + zero),
// packed by blocks of 16 channels, one channel a 32-bit lane: q [N / 16, K / 2, 16, 2]
// holds each pair of inputs of the block's 16 channels side by side, scales and zeros
// [N / 16, K / 32, 16] (engine/group_int8.py packs them, N padded to a multiple of 16).
//
// Each row of x is taken to int16 by groups of 32 inputs, a = round(x / d) with
// d = max|x| / 32767: an error of at most 1/65534 of the group's largest input, about
// what fp32's own rounding adds over a 1,536-input sum (a group under 2^-100 counts as
// zeros: 32767 / max|x| would overflow). Then for each group g
//   y += d_g * (scale_g * sum(q a)) + zero_g * sum_g(x)
// the integer sums exact, the groups added in one order. So a row's result does not
// depend on how many rows the call has, nor on where in them it is.

#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>
#include <immintrin.h>
#include <torch/extension.h>

#include "cpu_rows.h"
#include "cpu_simd.h"

using namespace symphony;

namespace {

constexpr int64_t kLanes = 16;  // channels a block packs, one a 32-bit lane
constexpr int64_t kPairs = kGroup / 2;  // input pairs a group holds
constexpr int64_t kRowTile = 4;  // rows a pass takes against the same weights
constexpr float kInt16Max = 32767.0f;
// the decode stream asks for the weights' cache lines this far ahead of their use
constexpr int64_t kStreamAhead = 2048;

// One row of x in int16 by groups: a [K], and per group its step d and fp32 sum
struct QuantRows {
  std::vector<int16_t> a;
  std::vector<float> step, sum;
};

#if defined(__GNUC__) && !defined(__clang__)  // the target pragma below is GCC's
#define SYMPHONY_VNNI 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,fma")

// a row's group g of 32 inputs: d = max|x| / 32767, a = round(x / d), and their fp32
// sum. A non-finite input makes the sum non-finite, and so the row's every output NaN
// (zero * sum is NaN even where zero is 0), as fp32 would give: the scheduler fails
// that row's call instead of taking a finite number made of garbage.
void quantize_row(const float* x, int64_t K, int16_t* a, float* step, float* sum) {
  for (int64_t g = 0; g < K / kGroup; ++g) {
    const __m512 lo = _mm512_loadu_ps(x + g * kGroup), hi = _mm512_loadu_ps(x + g * kGroup + 16);
    const float big = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const __m512 inv = _mm512_set1_ps(big > 0x1p-100f ? kInt16Max / big : 0.0f);
    // round to nearest, and saturate to int16 in the narrowing
    const __m256i qlo = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)));
    const __m256i qhi = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inv)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + g * kGroup), qlo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + g * kGroup + 16), qhi);
    step[g] = big / kInt16Max;
    sum[g] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
  }
}

// y[r, c * 16 + j] for R rows of x from row m and C blocks of 16 channels from q (the
// first block's weights; the blocks lie K * 16 bytes apart), `valid` of the last
// block's lanes real. Each sum runs in H chains over a group's pairs (few rows have few
// sums, and a chain waits on its last vpdpwssd); integer sums, so the same bits.
template <int R, int C, int H>
void tile(const QuantRows& x, int64_t m, int64_t K, const int8_t* q, const float* s,
          const float* z, float* y, int64_t N, int64_t valid, bool stream) {
  const int64_t groups = K / kGroup, block_bytes = K * kLanes;
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dot[R][C][H];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c)
        for (int h = 0; h < H; ++h) dot[r][c][h] = _mm512_setzero_si512();
    const int8_t* qg = q + g * kGroup * kLanes;
    if (stream)
      for (int c = 0; c < C; ++c)
        for (int64_t line = 0; line < kGroup * kLanes; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(qg + c * block_bytes + line + kStreamAhead),
                       _MM_HINT_T0);
    const int16_t* xg = x.a.data() + m * K + g * kGroup;
    for (int64_t e = 0; e < kPairs; e += H) {
      for (int h = 0; h < H; ++h) {
        __m512i w[C];
        for (int c = 0; c < C; ++c)
          w[c] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(qg + c * block_bytes + (e + h) * 2 * kLanes)));
        for (int r = 0; r < R; ++r) {
          int32_t pair;
          std::memcpy(&pair, xg + r * K + (e + h) * 2, sizeof(pair));
          const __m512i xa = _mm512_set1_epi32(pair);
          for (int c = 0; c < C; ++c) dot[r][c][h] = _mm512_dpwssd_epi32(dot[r][c][h], w[c], xa);
        }
      }
    }
    for (int c = 0; c < C; ++c) {
      const __m512 scale = _mm512_loadu_ps(s + (c * groups + g) * kLanes);
      const __m512 zero = _mm512_loadu_ps(z + (c * groups + g) * kLanes);
      for (int r = 0; r < R; ++r) {
        __m512i sum = dot[r][c][0];
        for (int h = 1; h < H; ++h) sum = _mm512_add_epi32(sum, dot[r][c][h]);
        const int64_t row = (m + r) * groups + g;
        const __m512 weighed = _mm512_mul_ps(scale, _mm512_set1_ps(x.step[row]));
        acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), weighed, acc[r][c]);
        acc[r][c] = _mm512_fmadd_ps(zero, _mm512_set1_ps(x.sum[row]), acc[r][c]);
      }
    }
  }
  const __mmask16 last = static_cast<__mmask16>((1u << valid) - 1u);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      _mm512_mask_storeu_ps(y + (m + r) * N + c * kLanes, c == C - 1 ? last : __mmask16(0xffff),
                            acc[r][c]);
}

// rows m..m + R (R = min(4, M - m)) of the blocks at q, C = 2 of them or 1
template <int C>
void tile_rows(const QuantRows& x, int64_t M, int64_t K, const int8_t* q, const float* s,
               const float* z, float* y, int64_t N, int64_t valid) {
  for (int64_t m = 0; m < M; m += kRowTile) {
    // the first pass brings the blocks' weights from memory (at decode, every call's
    // are cold); later passes find them in cache
    const bool stream = m == 0;
    switch (std::min(kRowTile, M - m)) {
      case 4: tile<4, C, 1>(x, m, K, q, s, z, y, N, valid, stream); break;
      case 3: tile<3, C, 2>(x, m, K, q, s, z, y, N, valid, stream); break;
      case 2: tile<2, C, 2>(x, m, K, q, s, z, y, N, valid, stream); break;
      default: tile<1, C, 4>(x, m, K, q, s, z, y, N, valid, stream);
    }
  }
}

// tiles t0..t1 of `width` blocks (2, or 1 where one sequential stream of weights
// feeds few rows; the last tile may be narrower)
void tiles(const QuantRows& x, int64_t M, int64_t K, const int8_t* q, const float* s,
           const float* z, float* y, int64_t N, int64_t num_blocks, int64_t width, int64_t t0,
           int64_t t1) {
  const int64_t groups = K / kGroup;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = width * t, channels = std::min(width * kLanes, N - b * kLanes);
    const int8_t* qb = q + b * K * kLanes;
    const float *sb = s + b * groups * kLanes, *zb = z + b * groups * kLanes;
    float* yb = y + b * kLanes;
    if (width == 2 && b + 1 < num_blocks)
      tile_rows<2>(x, M, K, qb, sb, zb, yb, N, channels - kLanes);
    else
      tile_rows<1>(x, M, K, qb, sb, zb, yb, N, channels);
  }
}

// y = x W^T: x's rows to int16, then the tiles of blocks in parallel
void vnni_mm(const float* xp, int64_t M, int64_t K, const int8_t* qp, const float* sp,
             const float* zp, float* yp, int64_t n, int64_t num_blocks) {
  const int64_t groups = K / kGroup;
  QuantRows rows{std::vector<int16_t>(M * K), std::vector<float>(M * groups),
                 std::vector<float>(M * groups)};
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_row(xp + m * K, K, rows.a.data() + m * K, rows.step.data() + m * groups,
                   rows.sum.data() + m * groups);
  });
  const int64_t width = M < kRowTile ? 1 : 2;
  at::parallel_for(0, (num_blocks + width - 1) / width, 1, [&](int64_t t0, int64_t t1) {
    tiles(rows, M, K, qp, sp, zp, yp, n, num_blocks, width, t0, t1);
  });
}

#pragma GCC pop_options

bool cpu_has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}
#else  // another compiler: the AVX2 kernel alone
bool cpu_has_vnni() { return false; }
#endif

}  // namespace

bool vnni_supported() {
  static const bool supported = cpu_has_vnni();
  return supported;
}

// x [M, K] fp32 -> y [M, n] = x W^T, W [n, K] packed by 16 channels as q, scales, zeros
torch::Tensor group_int8_vnni_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scales,
                                 torch::Tensor zeros, int64_t n) {
  TORCH_CHECK(vnni_supported(), "this CPU lacks AVX-512 VNNI");
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kInt8 && q.is_contiguous() &&
                  q.size(2) == kLanes && q.size(3) == 2 && q.device().is_cpu(),
              "q must be contiguous int8 [out / 16, in / 2, 16, 2] (engine/group_int8.py packs it)");
  const int64_t num_blocks = q.size(0), K = q.size(1) * 2, groups = K / kGroup;
  TORCH_CHECK(K % kGroup == 0, "the input size must be a multiple of 32");
  for (const auto* t : {&scales, &zeros})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->dim() == 3 &&
                    t->device().is_cpu() && t->size(0) == num_blocks && t->size(1) == groups &&
                    t->size(2) == kLanes,
                "scales and zeros must be contiguous fp32 [out / 16, in / 32, 16]");
  TORCH_CHECK(n > (num_blocks - 1) * kLanes && n <= num_blocks * kLanes, "out does not fit the blocks");
  x = rows_of(x, K);
  const int64_t M = x.size(0);
  auto y = torch::empty({M, n}, x.options());
  if (M == 0) return y;
#ifdef SYMPHONY_VNNI  // else vnni_supported() refused the call above
  vnni_mm(x.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), scales.data_ptr<float>(),
          zeros.data_ptr<float>(), y.data_ptr<float>(), n, num_blocks);
#endif
  return y;
}
