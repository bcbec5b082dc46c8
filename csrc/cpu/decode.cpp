// Skinny linear layers for decoding: each thread takes a band of weight rows, kG rows at a time,
// and each block of NB weight rows is converted to fp32 in registers and multiplied into MB
// activation rows at a time (dot products along K, summed across the vector lanes at the end).
// A group's weight rows stay in cache between the activation blocks, so the weight is read from
// memory once, and prefetched into L1 a little ahead of its loads.
//
// The vector width follows the build flags (-march=native in setup.py): AVX-512, AVX2 + FMA, or
// plain scalar code.
#include "cpu/decode.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace rlfuse::cpu {
namespace {

// kMB activation rows go through each weight row in the main blocks, kNB weight rows at a time;
// a shorter last block of r rows takes tail_nb(r) weight rows at a time, so that it still has
// several independent accumulator chains. Every block size divides kG, the weight rows a
// thread takes at once.
constexpr int64_t kG = 4, kMB = 8;
// Weight bytes ahead of each load that are prefetched into L1. Against the hardware prefetcher
// alone, 1024 took the 8-row fp32 LM head (151936 x 896) from 12.8 to 14.9 GB/s and the MLP
// layers 10-25% faster, bf16 6-12%, on a 21 GB/s AVX2 EPYC (interleaved A/B, one process);
// in separate, noisier runs 512 was slower than 1024, and 2048 and 4096 no faster.
constexpr int64_t kPrefetch = 1024;
#if defined(__AVX512F__)
using V = __m512;
constexpr int64_t kL = 16, kNB = 2;  // 16 accumulators + 2 weights + 1 of 32 registers
constexpr int64_t tail_nb(int64_t r) { return r <= 3 ? 4 : 2; }
inline V zero() { return _mm512_setzero_ps(); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline V load(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
inline V load(const c10::BFloat16* p) {  // bf16 is fp32's high half
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float hsum(V v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
using V = __m256;
constexpr int64_t kL = 8, kNB = 1;  // 8 accumulators + 1 weight + 1 of 16 registers
constexpr int64_t tail_nb(int64_t r) { return r <= 2 ? 4 : r <= 6 ? 2 : 1; }
inline V zero() { return _mm256_setzero_ps(); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline V load(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
inline V load(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
using V = float;
constexpr int64_t kL = 1, kNB = 1;
constexpr int64_t tail_nb(int64_t r) { return r <= 2 ? 4 : 2; }
inline V zero() { return 0.f; }
template <typename T>
inline V load(const T* p) { return static_cast<float>(*p); }
inline V fmadd(V a, V b, V c) { return a * b + c; }
inline float hsum(V v) { return v; }
#endif

// out[m][n] = sum_j x[m, j] * w[n, j] for NB weight rows and MB activation rows.
// x and w are row-major with rows of k.
template <int64_t NB, int64_t MB, typename W>
inline void block(const float* x, const W* w, int64_t k, float (&out)[MB][NB]) {
  V acc[MB][NB];
  for (int64_t m = 0; m < MB; ++m)
    for (int64_t n = 0; n < NB; ++n) acc[m][n] = zero();
  int64_t j = 0;
  for (; j + kL <= k; j += kL) {
    V wv[NB];
    for (int64_t n = 0; n < NB; ++n) {
      __builtin_prefetch(reinterpret_cast<const char*>(w + n * k + j) + kPrefetch);
      wv[n] = load(w + n * k + j);
    }
    for (int64_t m = 0; m < MB; ++m) {
      const V xv = load(x + m * k + j);
      for (int64_t n = 0; n < NB; ++n) acc[m][n] = fmadd(wv[n], xv, acc[m][n]);
    }
  }
  for (int64_t m = 0; m < MB; ++m)
    for (int64_t n = 0; n < NB; ++n) {
      float s = hsum(acc[m][n]);
      for (int64_t i = j; i < k; ++i) s += static_cast<float>(w[n * k + i]) * x[m * k + i];
      out[m][n] = s;
    }
}

struct Args {
  const float* x;
  int64_t m, k;
  const float *scale, *bias;
  float* y;
  int64_t n;  // y's row length
};

// Weight rows [n0, n0 + NB) into activation rows [m0, m0 + MB).
template <int64_t NB, int64_t MB, typename W>
void rows_block(const Args& a, const W* w, int64_t n0, int64_t m0) {
  float out[MB][NB];
  block<NB, MB>(a.x + m0 * a.k, w + n0 * a.k, a.k, out);
  for (int64_t m = 0; m < MB; ++m)
    for (int64_t n = 0; n < NB; ++n) {
      float v = out[m][n];
      if (a.scale) v *= a.scale[n0 + n];
      if (a.bias) v += a.bias[n0 + n];
      a.y[(m0 + m) * a.n + n0 + n] = v;
    }
}

// Weight rows [n0, n0 + G) into activation rows [m0, m0 + MB), NB at a time (NB = G past
// the last full group of kG rows, where G < kG).
template <int64_t NB, int64_t MB, typename W>
void group(const Args& a, const W* w, int64_t n0, int64_t g, int64_t m0) {
  if (g < kG) {
    for (int64_t n = n0; n < n0 + g; ++n) rows_block<1, MB>(a, w, n, m0);
    return;
  }
  for (int64_t n = n0; n < n0 + kG; n += NB) rows_block<NB, MB>(a, w, n, m0);
}

// Weight rows [n0, n0 + g) into every activation row.
template <typename W>
void weight_rows(const Args& a, const W* w, int64_t n0, int64_t g) {
  int64_t m0 = 0;
  for (; m0 + kMB <= a.m; m0 += kMB) group<kNB, kMB>(a, w, n0, g, m0);
  switch (a.m - m0) {  // the last, shorter block of activation rows
    case 0: break;
#define RLFUSE_TAIL(r) \
  case r: group<tail_nb(r), r>(a, w, n0, g, m0); break;
    RLFUSE_TAIL(1) RLFUSE_TAIL(2) RLFUSE_TAIL(3) RLFUSE_TAIL(4) RLFUSE_TAIL(5) RLFUSE_TAIL(6)
    RLFUSE_TAIL(7)
#undef RLFUSE_TAIL
  }
  static_assert(kMB == 8, "weight_rows: one tail case per row count below kMB");
}

template <typename W>
void run(const Args& a, const W* w) {
  at::parallel_for(0, (a.n + kG - 1) / kG, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) weight_rows(a, w, g * kG, std::min(kG, a.n - g * kG));
  });
}

}  // namespace

void decode_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                   const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const Args a{x.const_data_ptr<float>(), x.size(0), x.size(1),
               scale ? scale->const_data_ptr<float>() : nullptr,
               bias ? bias->const_data_ptr<float>() : nullptr, y.data_ptr<float>(), w.size(0)};
  switch (w.scalar_type()) {
    case at::kFloat: return run(a, w.const_data_ptr<float>());
    case at::kBFloat16: return run(a, w.const_data_ptr<c10::BFloat16>());
    case at::kChar: return run(a, w.const_data_ptr<int8_t>());
    default: TORCH_CHECK(false, "decode_linear: unsupported weight dtype ", w.scalar_type());
  }
}

}  // namespace rlfuse::cpu
