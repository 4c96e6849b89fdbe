// The CPU engine's small compiled kernels (AVX2 + FMA), built by
// symphony.engine.cpu_kernels with torch's cpp_extension together with the matmuls
// (cpu_matmul.cpp, cpu_fp32.cpp, cpu_vnni.cpp) and cpu_decoder.cpp: rms_norm, silu_mul,
// rope_store_kv, paged_attention, the per-layer steps of a decode (or of a short chunk),
// each one call where torch's ops took several (their launches, not their arithmetic,
// were the cost at batch 1).

#include <ATen/Parallel.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>
#include <immintrin.h>
#include <torch/extension.h>

#include "cpu_simd.h"

using namespace symphony;

namespace {

// e^x in 8 lanes (Cephes' expf: x = n ln 2 + r, e^r by a degree-6 polynomial, 2^n in
// the exponent bits); relative error ~2e-7. The softmax's exp was a libm call per score.
inline __m256 exp8(__m256 x) {
  // clamped to where fp32 has e^x (below -87 a denormal, above 88 an overflow of the
  // exponent); x second, so a NaN stays NaN
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                        5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}

}  // namespace

// cpu_matmul.cpp
torch::Tensor group_int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scales,
                            torch::Tensor zeros, int64_t n);
torch::Tensor group_int8_dequant(torch::Tensor q, torch::Tensor scales, torch::Tensor zeros,
                                 int64_t n, torch::Tensor w);
// cpu_fp32.cpp
torch::Tensor fp32_mm(torch::Tensor x, torch::Tensor w);
torch::Tensor fp32_mm_avx2(torch::Tensor x, torch::Tensor w);
bool fp32_avx512_supported();
// cpu_vnni.cpp
bool vnni_supported();
torch::Tensor group_int8_vnni_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scales,
                                 torch::Tensor zeros, int64_t n);

// cpu_decoder.cpp
void bind_decoder(py::module& m);

// x / rms(x) * weight over each row of x [T, H]: one pass where torch's ops take six
// launches (at batch 1 their overhead, not the arithmetic, was the cost: 34 us a call)
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be fp32 [T, H]");
  TORCH_CHECK(weight.dim() == 1 && weight.scalar_type() == torch::kFloat32 &&
                  weight.size(0) == x.size(1) && weight.is_contiguous(),
              "weight must be fp32 [H]");
  x = x.contiguous();
  const int64_t T = x.size(0), H = x.size(1);
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = xp + t * H;
      float* out = yp + t * H;
      __m256 acc = _mm256_setzero_ps();
      int64_t h = 0;
      for (; h + 8 <= H; h += 8) {
        const __m256 v = _mm256_loadu_ps(row + h);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      float squares = hsum(acc);
      for (; h < H; ++h) squares += row[h] * row[h];
      const float inv = 1.0f / std::sqrt(squares / static_cast<float>(H) + static_cast<float>(eps));
      const __m256 vinv = _mm256_set1_ps(inv);
      h = 0;
      for (; h + 8 <= H; h += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(row + h), vinv);
        _mm256_storeu_ps(out + h, _mm256_mul_ps(v, _mm256_loadu_ps(wp + h)));
      }
      for (; h < H; ++h) out[h] = row[h] * inv * wp[h];
    }
  });
  return y;
}

// silu(gate) * up for gate_up [T, 2 I] = [gate | up]: one pass where torch's ops took
// three (chunk, silu, multiply) and two temporaries
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == torch::kFloat32 &&
                  gate_up.size(1) % 2 == 0,
              "gate_up must be fp32 [T, 2 I]");
  gate_up = gate_up.contiguous();
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto y = torch::empty({T, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* g = gp + t * 2 * I;
      const float* u = g + I;
      float* out = yp + t * I;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
      }
      for (; i < I; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  });
  return y;
}

namespace {

// rotate-half RoPE of one head: (x1 cos - x2 sin, x2 cos + x1 sin), x1 and x2 its halves
inline void rope_head(const float* x, const float* cos, const float* sin, int64_t half,
                      float* out) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    out[i] = x1 * cos[i] - x2 * sin[i];
    out[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

inline float finite_or_zero(float v) { return std::isfinite(v) ? v : 0.0f; }

// K and V pages hold fp32, or bf16 (an fp32's top 16 bits: half the bytes a step reads
// over a long context, rounded to nearest even as torch's conversion rounds)
using bf16 = uint16_t;

inline void store_kv(float* dst, float v) { *dst = v; }
inline void store_kv(bf16* dst, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const bf16 rounded = static_cast<bf16>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  // a finite value past bf16's largest would round to infinity: the largest instead
  *dst = (rounded & 0x7fffu) == 0x7f80u ? static_cast<bf16>(rounded - 1u) : rounded;
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// Q of T tokens RoPE'd into qp, their K (RoPE'd) and V into their slots of caches of C
// (fp32 or bf16)
template <typename C>
void store_rows(const float* xp, const float* cp, const float* snp, const int64_t* sp, float* qp,
                C* kc, C* vc, int64_t T, int64_t nh, int64_t nkv, int64_t d) {
  const int64_t half = d / 2, width = (nh + 2 * nkv) * d;
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    float rotated[1024];  // one head; head_dim is checked by the caller
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = xp + t * width;
      const float* c = cp + t * half;
      const float* s = snp + t * half;
      for (int64_t h = 0; h < nh; ++h) rope_head(row + h * d, c, s, half, qp + (t * nh + h) * d);
      C* kdst = kc + sp[t] * nkv * d;
      C* vdst = vc + sp[t] * nkv * d;
      for (int64_t h = 0; h < nkv; ++h) {
        rope_head(row + (nh + h) * d, c, s, half, rotated);
        const float* v = row + (nh + nkv + h) * d;
        for (int64_t i = 0; i < d; ++i) {
          store_kv(kdst + h * d + i, finite_or_zero(rotated[i]));
          store_kv(vdst + h * d + i, finite_or_zero(v[i]));
        }
      }
    }
  });
}

// the caches' element type: both fp32 or both bf16, contiguous
bool bf16_caches(const torch::Tensor& k_cache, const torch::Tensor& v_cache) {
  const auto type = k_cache.scalar_type();
  TORCH_CHECK((type == torch::kFloat32 || type == torch::kBFloat16) &&
                  v_cache.scalar_type() == type && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "the caches must be contiguous, both fp32 or both bf16");
  return type == torch::kBFloat16;
}

}  // namespace

// One decode layer's Q, K and V from its fused projection qkv [T, (nh + 2 nkv) d]: Q
// and K rotated by RoPE at each token's position (cos, sin [T, d / 2]), K and V
// stored into the flat cache slots `slots` of k_cache, v_cache [.., nkv, d] with every
// non-finite value made 0 (another sequence's masked slot must not hold a NaN); returns
// Q [T, nh, d]. One call where torch's ops take fourteen.
torch::Tensor rope_store_kv(torch::Tensor qkv, int64_t num_heads, int64_t num_kv_heads,
                            torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
                            torch::Tensor k_cache, torch::Tensor v_cache) {
  const int64_t T = qkv.size(0), d = cos.size(1) * 2;
  const int64_t nh = num_heads, nkv = num_kv_heads;
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == torch::kFloat32 &&
                  qkv.size(1) == (nh + 2 * nkv) * d,
              "qkv must be fp32 [T, (heads + 2 kv_heads) head_dim]");
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == T,
                "cos and sin must be contiguous fp32 [T, head_dim / 2]");
  const bool bf16_kv = bf16_caches(k_cache, v_cache);
  TORCH_CHECK(k_cache.numel() == v_cache.numel() && k_cache.numel() % (nkv * d) == 0,
              "the caches must be [.., kv_heads, head_dim]");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.numel() == T, "one slot per token");
  qkv = qkv.contiguous();
  slots = slots.contiguous();
  const int64_t capacity = k_cache.numel() / (nkv * d);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < capacity, "slot ", sp[t], " outside the cache");
  auto q = torch::empty({T, nh, d}, qkv.options());
  TORCH_CHECK(d <= 1024, "head_dim above 1024");
  const float* xp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* snp = sin.data_ptr<float>();
  if (bf16_kv)
    store_rows(xp, cp, snp, sp, q.data_ptr<float>(), static_cast<bf16*>(k_cache.data_ptr()),
               static_cast<bf16*>(v_cache.data_ptr()), T, nh, nkv, d);
  else
    store_rows(xp, cp, snp, sp, q.data_ptr<float>(), k_cache.data_ptr<float>(),
               v_cache.data_ptr<float>(), T, nh, nkv, d);
  return q;
}

namespace {

// out[0..8) = q . keys[i][0..d) for the 8 keys: eight independent FMA chains (one dot
// at a time was a chain of d / 8 dependent FMAs, bound by their latency), then one
// transposing reduction of the eight sums into a vector
template <typename C>
inline __m256 dot8(const float* q, const C* const* keys, int64_t d) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t e = 0; e < d; e += 8) {
    const __m256 qv = _mm256_loadu_ps(q + e);
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, load8(keys[i] + e), a[i]);
  }
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

template <typename C>
inline float dot(const float* a, const C* b, int64_t n) {  // n % 8 == 0
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
  return hsum(acc);
}

// The cache lines of n slots' K or V (d values each) asked for ahead of their use: one
// head's slots lie nkv * d values apart within a page, and the pages anywhere in the
// pool, which the hardware's prefetchers follow badly. A 2,048-token int8 decode step
// on the 2-core Xeon (fp32 pages) took 19.5 ms before, 17.4 to 17.9 after.
constexpr int64_t kSlotsAhead = 32;

template <typename C>
inline void prefetch_slots(const C* const* ptrs, int64_t n, int64_t d) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t b = 0; b < d * static_cast<int64_t>(sizeof(C)); b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(ptrs[i]) + b, _MM_HINT_T0);
}

// Slots of V a query head's weighted sum takes before the next head of its group takes
// the same ones, still in L1 (32 x d floats): a KV head's 3 query heads had read the
// whole context's K and V three times over from L2 and L3
constexpr int64_t kValueSlots = 32;

// out[e0..e0 + 8 W) += sum_{t0 <= t < t1} p[t] values[t][e0..e0 + 8 W): W independent
// chains held in registers across the slots (W a constant: with a count known only at
// run time the accumulators had lived on the stack, a store and a load each FMA)
template <int W, typename C>
inline void weighted_columns(float* out, const float* p, const C* const* values, int64_t t0,
                             int64_t t1, int64_t e0, float scale, bool first, bool last) {
  __m256 a[W];
  for (int i = 0; i < W; ++i) a[i] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + e0 + 8 * i);
  for (int64_t t = t0; t < t1; ++t) {
    const __m256 w = _mm256_set1_ps(p[t]);
    const C* v = values[t] + e0;
    for (int i = 0; i < W; ++i) a[i] = _mm256_fmadd_ps(w, load8(v + 8 * i), a[i]);
  }
  const __m256 s = _mm256_set1_ps(scale);
  for (int i = 0; i < W; ++i) _mm256_storeu_ps(out + e0 + 8 * i, last ? _mm256_mul_ps(s, a[i]) : a[i]);
}

// out[0..d) += sum_{t0 <= t < t1} p[t] values[t][0..d), 64 columns at a time (eight
// chains); `first` starts from 0, and `last` stores scale times the sum. Taken block
// after block it adds in the order one pass would, so the result does not depend on the
// blocks.
template <typename C>
inline void weighted_block(float* out, const float* p, const C* const* values, int64_t t0,
                           int64_t t1, int64_t d, float scale, bool first, bool last) {
  for (int64_t e0 = 0; e0 < d; e0 += 64) {
    const auto run = [&](auto width) {
      weighted_columns<decltype(width)::value>(out, p, values, t0, t1, e0, scale, first, last);
    };
    switch (std::min<int64_t>(64, d - e0) / 8) {
      case 8: run(std::integral_constant<int, 8>{}); break;
      case 7: run(std::integral_constant<int, 7>{}); break;
      case 6: run(std::integral_constant<int, 6>{}); break;
      case 5: run(std::integral_constant<int, 5>{}); break;
      case 4: run(std::integral_constant<int, 4>{}); break;
      case 3: run(std::integral_constant<int, 3>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      default: run(std::integral_constant<int, 1>{});
    }
  }
}

// row[0..n) = e^(row - max(row)); returns their sum. The max 8 lanes at a time (a chain
// of scalar maxima, each waiting on the one before, had taken a tenth of the kernel).
inline float softmax_numerators(float* row, int64_t n) {
  float top = row[0];
  int64_t m = 1;
  if (n >= 8) {
    __m256 most = _mm256_loadu_ps(row);
    for (m = 8; m + 8 <= n; m += 8) most = _mm256_max_ps(most, _mm256_loadu_ps(row + m));
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(most), _mm256_extractf128_ps(most, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    top = _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
  }
  for (; m < n; ++m) top = std::max(top, row[m]);
  const __m256 vtop = _mm256_set1_ps(top);
  __m256 acc = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + t), vtop));
    _mm256_storeu_ps(row + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  float total = hsum(acc);
  for (; t < n; ++t) total += (row[t] = std::exp(row[t] - top));
  return total;
}

// ptrs[t] for from <= t < to: where slot t's K (or V) of KV head h is in `cache`
// [pages, page_size, kv_heads, d], a page at a time (a division a slot had cost a
// decode over 1,024 slots about a tenth of its attention)
template <typename C>
inline void slot_pointers(const C* cache, const int64_t* table, int64_t from, int64_t to,
                          int64_t ps, int64_t nkv, int64_t h, int64_t d, const C** ptrs) {
  for (int64_t t = from; t < to;) {
    const int64_t page = t / ps, offset = t - page * ps, n = std::min(to - t, ps - offset);
    const C* base = cache + ((table[page] * ps + offset) * nkv + h) * d;
    for (int64_t i = 0; i < n; ++i) ptrs[t + i] = base + i * nkv * d;
    t += n;
  }
}

// Rows taken together against their shared slots: a task holds at most this many
constexpr int64_t kTaskRows = 4;

// Rows that read the same first slots: the rows of one sequence (a chunk), and those of
// sequences whose tables begin with the same pages (forks of one prefix). `shared`
// slots are in every row's context and the same pages for all.
struct RowGroup {
  int64_t shared;
  std::vector<int64_t> rows;
};

// Sequences that begin with the same page, the longest first, join the group of the
// first one they share at least half of its pages with (so that a stranger with one
// page in common, or a chain of shorter ones, does not cut the others' sharing short);
// the rest start groups of their own. The grouping changes no bit of the result.
std::vector<RowGroup> row_groups(const int64_t* bt, int64_t max_pages, const int64_t* starts,
                                 const int64_t* lens, int64_t S, int64_t ps) {
  struct Seq {
    int64_t s, shortest, used;  // its rows' fewest slots, the pages all of them read
  };
  std::vector<Seq> seqs;
  for (int64_t s = 0; s < S; ++s) {
    if (starts[s] == starts[s + 1]) continue;
    int64_t shortest = lens[starts[s]];
    for (int64_t t = starts[s]; t < starts[s + 1]; ++t) shortest = std::min(shortest, lens[t]);
    seqs.push_back({s, shortest, (shortest + ps - 1) / ps});
  }
  std::stable_sort(seqs.begin(), seqs.end(), [&](const Seq& a, const Seq& b) {
    const int64_t pa = bt[a.s * max_pages], pb = bt[b.s * max_pages];
    return pa != pb ? pa < pb : a.used > b.used;
  });
  std::vector<RowGroup> groups;
  std::vector<int64_t> leader, reach, common;  // per group: its first sequence, that one's
                                               // pages, and the pages all members share
  for (const Seq& one : seqs) {
    const int64_t* table = bt + one.s * max_pages;
    int64_t g = -1, same = 0;
    // this first page's groups are the last ones made (sorted by first page)
    for (int64_t c = static_cast<int64_t>(groups.size()) - 1;
         c >= 0 && bt[leader[c] * max_pages] == table[0] && g < 0; --c) {
      const int64_t* other = bt + leader[c] * max_pages;
      const int64_t most = std::min(one.used, common[c]);
      int64_t n = 0;
      while (n < most && other[n] == table[n]) ++n;
      if (2 * n >= reach[c]) g = c, same = n;
    }
    if (g < 0) {
      g = static_cast<int64_t>(groups.size());
      groups.push_back({one.shortest, {}});
      leader.push_back(one.s);
      reach.push_back(one.used);
      common.push_back(one.used);
    } else {
      common[g] = same;
    }
    groups[g].shared = std::min({groups[g].shared, one.shortest, common[g] * ps});
    for (int64_t t = starts[one.s]; t < starts[one.s + 1]; ++t) groups[g].rows.push_back(t);
  }
  return groups;
}

// The rows' tables, checked before any is read: row_starts from 0 to T in order, each
// row's length within its table, each page it reads within the pool. Each row's sequence.
std::vector<int64_t> checked_rows(const torch::Tensor& block_tables, const torch::Tensor& row_starts,
                                  const torch::Tensor& lens, int64_t T, int64_t pages, int64_t ps) {
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == torch::kLong &&
                  block_tables.is_contiguous(),
              "block_tables must be long [S, max_pages]");
  const int64_t S = block_tables.size(0), max_pages = block_tables.size(1);
  TORCH_CHECK(row_starts.numel() == S + 1 && row_starts.scalar_type() == torch::kLong &&
                  row_starts.is_contiguous(),
              "row_starts must be long [S + 1]");
  TORCH_CHECK(lens.numel() == T && lens.scalar_type() == torch::kLong && lens.is_contiguous(),
              "lens must be long [T]");
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* starts = row_starts.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  TORCH_CHECK(starts[0] == 0 && starts[S] == T, "row_starts must run from 0 to the rows");
  for (int64_t s = 0; s < S; ++s)  // all of them before any is used as a bound
    TORCH_CHECK(starts[s] <= starts[s + 1], "row_starts must not decrease");
  std::vector<int64_t> seq(T);
  for (int64_t s = 0; s < S; ++s) {
    int64_t longest = 0;
    for (int64_t t = starts[s]; t < starts[s + 1]; ++t) {
      TORCH_CHECK(lp[t] >= 1 && lp[t] <= max_pages * ps, "context length outside its table");
      seq[t] = s;
      longest = std::max(longest, lp[t]);
    }
    for (int64_t j = 0; j < (longest + ps - 1) / ps; ++j)
      TORCH_CHECK(bt[s * max_pages + j] >= 0 && bt[s * max_pages + j] < pages, "page outside the pool");
  }
  return seq;
}

// What the attention's tasks read besides q and the caches
struct Rows {
  const int64_t *bt, *starts, *lp, *seq;
  int64_t max_pages, ps, nh, nkv, d, group;
};

// The tasks (group, kv head, first row) of paged_attention over caches of C (fp32 or
// bf16): each row's scores, softmax and weighted sum of values, in fp32
template <typename C>
void attend(const Rows& rw, const std::vector<RowGroup>& groups,
            const std::vector<std::array<int64_t, 3>>& tasks, const float* qp, const C* kp,
            const C* vp, float sc, float* op) {
  const int64_t *bt = rw.bt, *lp = rw.lp, *seq = rw.seq;
  const int64_t max_pages = rw.max_pages, ps = rw.ps, nh = rw.nh, nkv = rw.nkv, d = rw.d;
  const int64_t group = rw.group;
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores, totals;
    std::vector<const C*> keys, values;  // [row][slot]: slot t's K and V of this head
    for (int64_t i = i0; i < i1; ++i) {
      const RowGroup& grp = groups[tasks[i][0]];
      const int64_t h = tasks[i][1], r0 = tasks[i][2];
      const int64_t n = std::min<int64_t>(kTaskRows, grp.rows.size() - r0);
      const int64_t* rows = grp.rows.data() + r0;
      int64_t stride = 0;  // the longest row's slots
      for (int64_t r = 0; r < n; ++r) stride = std::max(stride, lp[rows[r]]);
      // the first row's every slot; the others' past the shared 8-key blocks (the
      // shared slots are the same pages for every row)
      const int64_t shared8 = grp.shared / 8 * 8;
      keys.resize(n * stride);
      values.resize(n * stride);
      for (int64_t r = 0; r < n; ++r) {
        const int64_t* table = bt + seq[rows[r]] * max_pages;
        const int64_t from = r == 0 ? 0 : shared8, to = lp[rows[r]];
        slot_pointers(kp, table, from, to, ps, nkv, h, d, keys.data() + r * stride);
        slot_pointers(vp, table, from, to, ps, nkv, h, d, values.data() + r * stride);
      }
      // scores[(r * group + g) * stride + t]: query head g of row r against slot t,
      // 8 keys at a time from slot 0 as for a row alone (a key's score does not depend
      // on the rows beside it); the shared slots' 8 keys once for all the rows, in L1
      scores.resize(n * group * stride);
      const __m256 vsc = _mm256_set1_ps(sc);
      const auto score8 = [&](int64_t r, const C* const* ks, int64_t t, int64_t end) {
        if (t + kSlotsAhead + 8 <= end) prefetch_slots(ks + t + kSlotsAhead, 8, d);
        const float* qh = qp + (rows[r] * nh + h * group) * d;
        for (int64_t g = 0; g < group; ++g)
          _mm256_storeu_ps(scores.data() + (r * group + g) * stride + t,
                           _mm256_mul_ps(dot8(qh + g * d, ks + t, d), vsc));
      };
      for (int64_t t = 0; t < shared8; t += 8)
        for (int64_t r = 0; r < n; ++r) score8(r, keys.data(), t, shared8);
      for (int64_t r = 0; r < n; ++r) {
        const int64_t L = lp[rows[r]];
        const float* qh = qp + (rows[r] * nh + h * group) * d;
        const C* const* rk = keys.data() + r * stride;
        int64_t t = shared8;
        for (; t + 8 <= L; t += 8) score8(r, rk, t, L);
        for (; t < L; ++t)
          for (int64_t g = 0; g < group; ++g)
            scores[(r * group + g) * stride + t] = dot(qh + g * d, rk[t], d) * sc;
      }
      totals.resize(n * group);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t g = 0; g < group; ++g)
          totals[r * group + g] =
              softmax_numerators(scores.data() + (r * group + g) * stride, lp[rows[r]]);
      // weighted sums: the shared slots' values 32 at a time for every row while in L1,
      // then each row's own; block after block they add as one pass would
      const auto weigh = [&](int64_t r, const C* const* vals, int64_t t0, int64_t t1,
                             int64_t end) {
        const int64_t L = lp[rows[r]];
        float* oh = op + (rows[r] * nh + h * group) * d;
        prefetch_slots(vals + t1, std::min(kValueSlots, end - t1), d);  // the next block's
        for (int64_t g = 0; g < group; ++g)
          weighted_block(oh + g * d, scores.data() + (r * group + g) * stride, vals, t0, t1, d,
                         1.0f / totals[r * group + g], t0 == 0, t1 == L);
      };
      for (int64_t t0 = 0; t0 < grp.shared; t0 += kValueSlots)
        for (int64_t r = 0; r < n; ++r)
          weigh(r, values.data(), t0, std::min(grp.shared, t0 + kValueSlots), grp.shared);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t t0 = grp.shared; t0 < lp[rows[r]]; t0 += kValueSlots)
          weigh(r, values.data() + r * stride, t0, std::min(lp[rows[r]], t0 + kValueSlots),
                lp[rows[r]]);
    }
  });
}

}  // namespace

// How paged_attention groups the rows (for tests): (shared slots, rows) per group
std::vector<std::pair<int64_t, std::vector<int64_t>>> attention_groups(
    torch::Tensor block_tables, torch::Tensor row_starts, torch::Tensor lens, int64_t page_size) {
  TORCH_CHECK(page_size > 0, "page_size must be positive");
  block_tables = block_tables.contiguous();
  row_starts = row_starts.contiguous();
  lens = lens.contiguous();
  checked_rows(block_tables, row_starts, lens, lens.numel(), std::numeric_limits<int64_t>::max(),
               page_size);
  std::vector<std::pair<int64_t, std::vector<int64_t>>> out;
  for (const RowGroup& g :
       row_groups(block_tables.data_ptr<int64_t>(), block_tables.size(1),
                  row_starts.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), block_tables.size(0),
                  page_size))
    out.emplace_back(g.shared, g.rows);
  return out;
}

// Attention straight from the pages for decodes and unmasked chunks (a verify's draft,
// a Jacobi window, a prefill): q [T, heads, d] holds sequence s's
// rows at row_starts[s]..row_starts[s + 1], and row t sees the first lens[t] slots of
// its sequence's block_tables row [S, max_pages]; the caches are [pages, page_size,
// kv_heads, d]. No gathered copy of K and V (SDPA over gathered pages copied every key
// and value of every layer each step, and its masked math cost more than the keys).
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor row_starts,
                              torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32, "q must be fp32 [T, heads, d]");
  const bool bf16_kv = bf16_caches(k_cache, v_cache);
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "the caches must be [pages, page_size, kv_heads, d]");
  const int64_t T = q.size(0), nh = q.size(1), d = q.size(2);
  const int64_t pages = k_cache.size(0), ps = k_cache.size(1), nkv = k_cache.size(2);
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "the CPU kernel takes CPU tensors");
  TORCH_CHECK(nkv > 0 && ps > 0 && k_cache.size(3) == d && d % 8 == 0 && nh % nkv == 0,
              "head shapes disagree");
  block_tables = block_tables.contiguous();
  row_starts = row_starts.contiguous();
  lens = lens.contiguous();
  q = q.contiguous();
  const std::vector<int64_t> seq = checked_rows(block_tables, row_starts, lens, T, pages, ps);
  const int64_t S = block_tables.size(0), max_pages = block_tables.size(1), group = nh / nkv;
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* starts = row_starts.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const std::vector<RowGroup> groups = row_groups(bt, max_pages, starts, lp, S, ps);
  std::vector<std::array<int64_t, 3>> tasks;  // (group, kv head, first row in the group)
  for (int64_t g = 0; g < static_cast<int64_t>(groups.size()); ++g)
    for (int64_t h = 0; h < nkv; ++h)
      for (int64_t r = 0; r < static_cast<int64_t>(groups[g].rows.size()); r += kTaskRows)
        tasks.push_back({g, h, r});
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Rows rows_of{bt, starts, lp, seq.data(), max_pages, ps, nh, nkv, d, group};
  if (bf16_kv)
    attend(rows_of, groups, tasks, qp, static_cast<const bf16*>(k_cache.data_ptr()),
           static_cast<const bf16*>(v_cache.data_ptr()), static_cast<float>(scale), op);
  else
    attend(rows_of, groups, tasks, qp, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
           static_cast<float>(scale), op);
  return out;
}

// Each releases the GIL while it runs: a decode step's kernels must not stall the
// server's trio thread (pybind11 holds the GIL through a call unless told otherwise).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_attention", &paged_attention, no_gil, "attention over pages, causal rows of each sequence");
  m.def("attention_groups", &attention_groups, "how paged_attention groups its rows (tests)");
  m.def("rope_store_kv", &rope_store_kv, no_gil, "RoPE on Q and K; K and V into their slots");
  m.def("silu_mul", &silu_mul, no_gil, "silu(gate) * up of [gate | up]");
  m.def("rms_norm", &rms_norm, no_gil, "x / rms(x) * weight, row by row");
  m.def("group_int8_mm", &group_int8_mm, no_gil, "x W^T with W in int8 groups of 32, packed by 3 channels");
  m.def("fp32_mm", &fp32_mm, no_gil, "x W^T with W fp32, streamed (AVX-512 where the CPU has it)");
  m.def("fp32_mm_avx2", &fp32_mm_avx2, no_gil, "fp32_mm by its AVX2 stream, whatever the CPU has (tests)");
  m.def("fp32_avx512_supported", &fp32_avx512_supported, "whether fp32_mm streams in AVX-512 here");
  m.def("group_int8_dequant", &group_int8_dequant, no_gil, "W in fp32 from its packed int8 groups");
  m.def("vnni_supported", &vnni_supported, "whether this CPU has AVX-512 VNNI (group_int8_vnni_mm)");
  m.def("group_int8_vnni_mm", &group_int8_vnni_mm, no_gil,
        "x W^T with W in int8 groups of 32 packed by 16 channels, x in int16 (AVX-512 VNNI)");
  bind_decoder(m);
}
