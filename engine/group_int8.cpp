// int8 weights in groups of 32 along the input, each group with its own scale and zero
// (w = q * scale + zero), times fp32 activations. Built at first use by
// symphony.engine.cpu_kernels (torch's cpp_extension, -mavx2 -mfma).
//
// Decode reads every weight once per step, so the loop streams q (one byte a weight)
// and turns each 8 of them into fp32 in registers: nothing is written back but y.
// Rows of x are taken four at a time, so each weight is loaded and converted once for
// the four.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

namespace {

constexpr int64_t kGroup = 32;

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

// y[0, n] for one row of x and one output channel n: four accumulators, so four
// independent FMA chains (plain locals: gcc kept an accumulator array on the stack)
inline float dot1(const float* x, const int8_t* q, const float* scales, const float* zeros,
                  int64_t groups) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 s = _mm256_set1_ps(scales[g]), z = _mm256_set1_ps(zeros[g]);
    const int8_t* qg = q + g * kGroup;
    const float* xg = x + g * kGroup;
    a0 = _mm256_fmadd_ps(dequant8(qg, s, z), _mm256_loadu_ps(xg), a0);
    a1 = _mm256_fmadd_ps(dequant8(qg + 8, s, z), _mm256_loadu_ps(xg + 8), a1);
    a2 = _mm256_fmadd_ps(dequant8(qg + 16, s, z), _mm256_loadu_ps(xg + 16), a2);
    a3 = _mm256_fmadd_ps(dequant8(qg + 24, s, z), _mm256_loadu_ps(xg + 24), a3);
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

// y[r, n] for four rows of x (K apart) and one channel: each weight converted once
inline void dot4(const float* x, int64_t K, const int8_t* q, const float* scales,
                 const float* zeros, int64_t groups, float* y, int64_t N) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 s = _mm256_set1_ps(scales[g]), z = _mm256_set1_ps(zeros[g]);
    const int8_t* qg = q + g * kGroup;
    const float* xg = x + g * kGroup;
    for (int j = 0; j < 32; j += 16) {
      const __m256 w0 = dequant8(qg + j, s, z), w1 = dequant8(qg + j + 8, s, z);
      a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xg + j), a0);
      b0 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + j + 8), b0);
      a1 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xg + K + j), a1);
      b1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + K + j + 8), b1);
      a2 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xg + 2 * K + j), a2);
      b2 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + 2 * K + j + 8), b2);
      a3 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xg + 3 * K + j), a3);
      b3 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + 3 * K + j + 8), b3);
    }
  }
  y[0] = hsum(_mm256_add_ps(a0, b0));
  y[N] = hsum(_mm256_add_ps(a1, b1));
  y[2 * N] = hsum(_mm256_add_ps(a2, b2));
  y[3 * N] = hsum(_mm256_add_ps(a3, b3));
}

void check(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& zeros) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8 && q.is_contiguous(),
              "q must be a contiguous int8 matrix");
  TORCH_CHECK(q.size(1) % kGroup == 0, "the input size must be a multiple of 32");
  const int64_t groups = q.size(1) / kGroup;
  for (const auto* t : {&scales, &zeros}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() &&
                    t->dim() == 2 && t->size(0) == q.size(0) && t->size(1) == groups,
                "scales and zeros must be contiguous fp32 [out, in / 32]");
  }
}

}  // namespace

// x [M, K] fp32 -> y [M, N] = x W^T, W [N, K] given as q, scales and zeros
torch::Tensor group_int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scales,
                            torch::Tensor zeros) {
  check(q, scales, zeros);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.size(1) == q.size(1),
              "x must be fp32 [M, in]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), groups = K / kGroup;
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* qn = qp + n * K;
      const float* sn = sp + n * groups;
      const float* zn = zp + n * groups;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) dot4(xp + m * K, K, qn, sn, zn, groups, yp + m * N + n, N);
      for (; m < M; ++m) yp[m * N + n] = dot1(xp + m * K, qn, sn, zn, groups);
    }
  });
  return y;
}

// W [N, K] in fp32 into `w` (a reused buffer: a fresh one costs its page faults), for
// steps with many rows, where a GEMM on fp32 weights beats the stream
torch::Tensor group_int8_dequant(torch::Tensor q, torch::Tensor scales, torch::Tensor zeros,
                                 torch::Tensor w) {
  check(q, scales, zeros);
  const int64_t N = q.size(0), K = q.size(1), groups = K / kGroup;
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.numel() >= N * K,
              "w must be a contiguous fp32 buffer of at least out * in elements");
  w = w.view(-1).narrow(0, 0, N * K).view({N, K});
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N * groups, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const __m256 scale = _mm256_set1_ps(sp[i]), zero = _mm256_set1_ps(zp[i]);
      for (int j = 0; j < 4; ++j)
        _mm256_storeu_ps(wp + i * kGroup + 8 * j, dequant8(qp + i * kGroup + 8 * j, scale, zero));
    }
  });
  return w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_int8_mm", &group_int8_mm, "x W^T with W in int8 groups of 32");
  m.def("group_int8_dequant", &group_int8_dequant, "W in fp32 from its int8 groups of 32");
}
