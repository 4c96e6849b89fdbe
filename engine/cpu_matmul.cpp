// The CPU engine's int8 matmuls (AVX2 + FMA): y [M, N] = x [M, K] W^T, x fp32.
//
// int8 weights (group_int8_mm, group_int8_dequant) come in groups of 32 inputs, each
// with its own scale and zero (w = q * scale + zero), packed by blocks of 3 channels:
// q [N / 3, K / 8, 3, 8] holds each 8 inputs of the block's 3 channels side by side,
// scales and zeros [N / 3, K / 32, 3] (engine/group_int8.py packs them, N padded to a
// multiple of 3 with zero channels). So one sequential stream feeds 3 independent
// accumulators: reading 3 channels' rows side by side from 3 places ran at 8-10 GB/s
// where one stream ran at 14-15. Every path sums y[m, n] in one order, one chain over
// the inputs 8 at a time, then across lanes, so a row's result does not depend on how
// many rows the call has (the old kernel's passes of 4 rows summed otherwise than its
// single rows):
// - up to kTileMinRows - 1 rows, straight from the stream, each weight converted once
//   for the rows of a pass;
// - from kTileMinRows, each block's weights converted once into fp32 and the rows taken
//   against them 4 at a time (converting again for every pass of rows cost more than
//   the multiplies: 56 MB of int8 weights at 24 rows, 40 ms against 27).
//
// fp32 weights stream in cpu_fp32.cpp.

#include <ATen/Parallel.h>
#include <algorithm>
#include <torch/extension.h>
#include <vector>

#include "cpu_rows.h"
#include "cpu_simd.h"

using namespace symphony;

namespace {

constexpr int64_t kBlock = 3;  // channels packed side by side
// the packed stream reads one sequential run, and wants its lines asked for further
// ahead than the row streams: 2 KB ahead took the model's linears at one row from
// 12.1 to 11.4 ms
constexpr int64_t kAhead = 2048 - kPrefetchBytes;
constexpr int64_t kTileMinRows = 12;  // measured: level at 12 rows (Zen 3, 2 cores)

// y[r, j] = the sum of a[r][j]'s lanes for j < c (a block's real channels): summed with
// constant indices first, so that the accumulators stay in registers (a loop to the
// runtime c made gcc keep them all in memory, at half the speed)
template <int R>
inline void store(const __m256 (&a)[R][kBlock], float* y, int64_t N, int64_t c) {
  float sums[R][kBlock];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kBlock; ++j) sums[r][j] = hsum(a[r][j]);
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < c; ++j) y[r * N + j] = sums[r][j];
}

// y[r, c] (rows N apart) for R rows of x (K apart) and the c <= 3 real channels of one
// packed block (q its int8, s and z its scales and zeros), straight from the stream
template <int R>
inline void stream_block(const float* x, int64_t K, const int8_t* q, const float* s,
                         const float* z, float* y, int64_t N, int64_t c) {
  __m256 a[R][kBlock];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kBlock; ++j) a[r][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / kGroup; ++g) {
    const int8_t* qg = q + g * kGroup * kBlock;
    prefetch(qg + kAhead);
    prefetch(qg + kAhead + 64);
    __m256 scale[kBlock], zero[kBlock];
    for (int j = 0; j < kBlock; ++j) {
      scale[j] = _mm256_set1_ps(s[g * kBlock + j]);
      zero[j] = _mm256_set1_ps(z[g * kBlock + j]);
    }
    for (int e = 0; e < kGroup / 8; ++e) {
      __m256 w[kBlock];
      for (int j = 0; j < kBlock; ++j) w[j] = dequant8(qg + (e * kBlock + j) * 8, scale[j], zero[j]);
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_loadu_ps(x + r * K + g * kGroup + e * 8);
        for (int j = 0; j < kBlock; ++j) a[r][j] = _mm256_fmadd_ps(w[j], xv, a[r][j]);
      }
    }
  }
  store(a, y, N, c);
}

// y[r, c] for R rows of x and a block's weights in fp32, w [3, K]: 4 rows x 3 channels
// are 12 accumulators, 3 weight vectors and one of x, the 16 AVX2 registers
template <int R>
inline void tile_block(const float* x, int64_t K, const float* w, float* y, int64_t N, int64_t c) {
  __m256 a[R][kBlock];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kBlock; ++j) a[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[kBlock];
    for (int j = 0; j < kBlock; ++j) wv[j] = _mm256_loadu_ps(w + j * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int j = 0; j < kBlock; ++j) a[r][j] = _mm256_fmadd_ps(wv[j], xv, a[r][j]);
    }
  }
  store(a, y, N, c);
}

// block b's weights [3, K] in fp32 (the same values every path multiplies by)
inline void unpack_block(const int8_t* q, const float* s, const float* z, int64_t K, float* w) {
  for (int64_t g = 0; g < K / kGroup; ++g) {
    prefetch(q + g * kGroup * kBlock + kAhead);
    prefetch(q + g * kGroup * kBlock + kAhead + 64);
    for (int j = 0; j < kBlock; ++j) {
      const __m256 scale = _mm256_set1_ps(s[g * kBlock + j]), zero = _mm256_set1_ps(z[g * kBlock + j]);
      for (int e = 0; e < kGroup / 8; ++e)
        _mm256_storeu_ps(w + j * K + g * kGroup + e * 8,
                         dequant8(q + ((g * kGroup / 8 + e) * kBlock + j) * 8, scale, zero));
    }
  }
}

struct Packed {
  const int8_t* q;
  const float* s;
  const float* z;
  int64_t blocks, K, N;
};

Packed check_packed(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& zeros,
                    int64_t n) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kInt8 && q.is_contiguous() &&
                  q.size(2) == kBlock && q.size(3) == 8 && q.device().is_cpu(),
              "q must be contiguous int8 [out / 3, in / 8, 3, 8] (engine/group_int8.py packs it)");
  const int64_t blocks = q.size(0), K = q.size(1) * 8;
  TORCH_CHECK(K % kGroup == 0, "the input size must be a multiple of 32");
  for (const auto* t : {&scales, &zeros}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->dim() == 3 &&
                    t->device().is_cpu() && t->size(0) == blocks && t->size(1) == K / kGroup && t->size(2) == kBlock,
                "scales and zeros must be contiguous fp32 [out / 3, in / 32, 3]");
  }
  TORCH_CHECK(n > (blocks - 1) * kBlock && n <= blocks * kBlock, "out does not fit the blocks");
  return {q.data_ptr<int8_t>(), scales.data_ptr<float>(), zeros.data_ptr<float>(), blocks, K, n};
}

}  // namespace

// x [M, K] fp32 -> y [M, n] = x W^T, W [n, K] packed as q, scales and zeros
torch::Tensor group_int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scales,
                            torch::Tensor zeros, int64_t n) {
  const Packed p = check_packed(q, scales, zeros, n);
  const int64_t K = p.K, N = p.N, groups = K / kGroup;
  x = rows_of(x, K);
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, p.blocks, 4, [&](int64_t b0, int64_t b1) {
    std::vector<float> w(M >= kTileMinRows ? kBlock * K : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* qb = p.q + b * kBlock * K;
      const float *sb = p.s + b * groups * kBlock, *zb = p.z + b * groups * kBlock;
      const int64_t c = std::min(kBlock, N - b * kBlock);
      float* yb = yp + b * kBlock;
      if (M >= kTileMinRows) {
        unpack_block(qb, sb, zb, K, w.data());
        by_four_rows(M, [&](auto rows, int64_t m) {
          tile_block<decltype(rows)::value>(xp + m * K, K, w.data(), yb + m * N, N, c);
        });
      } else {
        by_four_rows(M, [&](auto rows, int64_t m) {
          stream_block<decltype(rows)::value>(xp + m * K, K, qb, sb, zb, yb + m * N, N, c);
        });
      }
    }
  });
  return y;
}

// W [n, K] in fp32 into `w` (a reused buffer: a fresh one costs its page faults), for
// steps with many rows, where a GEMM on fp32 weights beats the kernel
torch::Tensor group_int8_dequant(torch::Tensor q, torch::Tensor scales, torch::Tensor zeros,
                                 int64_t n, torch::Tensor w) {
  const Packed p = check_packed(q, scales, zeros, n);
  const int64_t K = p.K, N = p.N, groups = K / kGroup;
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.device().is_cpu() &&
                  w.numel() >= p.blocks * kBlock * K,
              "w must be a contiguous fp32 buffer of at least out (padded to 3) * in elements");
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, p.blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      unpack_block(p.q + b * kBlock * K, p.s + b * groups * kBlock, p.z + b * groups * kBlock, K,
                   wp + b * kBlock * K);
  });
  return w.view(-1).narrow(0, 0, N * K).view({N, K});
}
