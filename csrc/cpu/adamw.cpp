// AdamW steps, one pass over each block of 256 values, vectorized; the vector width follows the
// build flags (-march=native in setup.py).
// - 8-bit moments: the arithmetic of torchao's single_param_adam on its OptimState8bit moments
//   (Dettmers et al. 2022: a dynamic 8-bit map, blocks of 256 with one absmax each). Each code
//   comes from one table entry and one comparison, where torchao's compiled step searches the
//   256 codes in 8 lookups.
// - bf16: StochasticRoundingAdamW's arithmetic (rlfuse.engine.optim), where the torch ops take
//   a pass over memory and a random draw per value each.
// Stochastic rounding adds 16 bits of noise to a value's fp32 bits and truncates to bf16. The
// noise of element i in block b is hash(key(seed, b) + i): fixed by the seed, whatever the
// thread count.
#include "cpu/vec.h"  // first: it sets the vector width
#include "cpu/adamw.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace rlfuse::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

inline uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

// The nearest code to x (ties up), as torchao's quantize_8bit_with_qmap, from the table.
inline uint8_t quantize(float x, const float* table, int shift) {
  const float* e = table + 2 * (bits_of(x) >> shift);
  return static_cast<uint8_t>(e[0] + (x >= e[1] ? 1.f : 0.f));  // NaN threshold: no step
}

// 32-bit integer hash (Wellons' lowbias32)
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

inline uint32_t block_key(uint64_t seed, int64_t block) {
  return hash32(static_cast<uint32_t>(seed) ^ hash32(static_cast<uint32_t>(seed >> 32) +
                                                     0x9e3779b9U * static_cast<uint32_t>(block)));
}

// out[i] <- x[i] rounded to bf16 stochastically, i < n
inline void round_bf16(const float* x, int64_t n, uint32_t key, c10::BFloat16* out) {
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n; ++i) {
    o[i] = static_cast<uint16_t>((bits_of(x[i]) + (hash32(key + static_cast<uint32_t>(i)) >> 16))
                                 >> 16);
  }
}

constexpr int64_t kBlock = 256;  // the bf16 step's blocks (the 8-bit step's are the states')

inline float load(const float* p) { return *p; }
inline float load(const c10::BFloat16* p) { return static_cast<float>(*p); }

template <typename T>
inline Vec load_vec(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, n);
  } else {
    alignas(64) float a[kW] = {};
    for (int64_t l = 0; l < n; ++l) a[l] = load(p + l);
    return Vec::loadu(a);
  }
}

inline float reduce_max(const Vec& v) {
  alignas(64) float a[kW];
  v.store(a);
  return *std::max_element(a, a + kW);
}

// One call's operands and fp32 constants, as plain values.
template <typename T>
struct Step {
  T* p;
  const T* g;
  uint8_t *mc, *vc;
  float *ms, *vs;
  const float *mq, *vq, *mt, *vt;
  int m_shift, v_shift;
  int64_t bs;
  float lr, decay, a1, a2, c1, c2, eps;
  uint64_t seed;
};

// Blocks [b0, b1). `s` is copied into locals: the uint8 code stores may alias any memory, so
// nothing the loops read may be reached through a pointer (a lambda's captures would be).
template <typename T>
void step_range(const Step<T> s, int64_t b0, int64_t b1) {
  T* const pp = s.p;
  const T* const gp = s.g;
  uint8_t *const mc = s.mc, *const vc = s.vc;
  float *const ms = s.ms, *const vs = s.vs;
  const float *const mq = s.mq, *const vq = s.vq, *const mt = s.mt, *const vt = s.vt;
  const int m_shift = s.m_shift, v_shift = s.v_shift;
  const int64_t bs = s.bs;
  const uint64_t seed = s.seed;
  const Vec lr(s.lr), decay(s.decay), a1(s.a1), a2(s.a2), c1(s.c1), c2(s.c2), eps(s.eps);
  std::vector<float> buf(3 * bs);  // a block's moments and (bf16 p) new weights, fp32
  float *const mb = buf.data(), *const vb = mb + bs, *const wb = vb + bs;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t o = b * bs;
    const float m_scale = ms[b], v_scale = vs[b];
    for (int64_t i = 0; i < bs; ++i) {  // dequantize (table lookups)
      mb[i] = mq[mc[o + i]] * m_scale;
      vb[i] = vq[vc[o + i]] * v_scale;
    }
    Vec am(0.f), av(0.f);
    for (int64_t i = 0; i < bs; i += kW) {  // the step, on the fp32 moments
      const int64_t n = std::min(kW, bs - i);
      const Vec g = load_vec(gp + o + i, n), w = load_vec(pp + o + i, n);
      const Vec m0 = Vec::loadu(mb + i, n), v0 = Vec::loadu(vb + i, n);
      // torch.lerp's CPU kernel for a weight under 0.5: fmadd(weight, end - start, start)
      const Vec mi = at::vec::fmadd(a1, g - m0, m0), vi = at::vec::fmadd(a2, g * g - v0, v0);
      mi.store(mb + i, n);
      vi.store(vb + i, n);
      am = at::vec::maximum(am, mi.abs());  // the tail's unloaded lanes are 0
      av = at::vec::maximum(av, vi);        // vi >= 0
      const Vec nw = (w - decay * w) - lr * (mi / c1) / (vi.sqrt() / c2 + eps);
      nw.store(std::is_same_v<T, float> ? reinterpret_cast<float*>(pp + o + i) : wb + i, n);
    }
    if constexpr (!std::is_same_v<T, float>) round_bf16(wb, bs, block_key(seed, b), pp + o);
    const float amax = std::max(reduce_max(am), 1e-12f), vmax = std::max(reduce_max(av), 1e-12f);
    ms[b] = amax;
    vs[b] = vmax;
    const Vec amax_v(amax), vmax_v(vmax);
    for (int64_t i = 0; i < bs; i += kW) {  // the divisions vectorized, the lookups not
      const int64_t n = std::min(kW, bs - i);
      alignas(64) float xm[kW], xv[kW];
      (Vec::loadu(mb + i, n) / amax_v).store(xm);
      (Vec::loadu(vb + i, n) / vmax_v).store(xv);
      for (int64_t l = 0; l < n; ++l) {
        mc[o + i + l] = quantize(xm[l], mt, m_shift);
        vc[o + i + l] = quantize(xv[l], vt, v_shift);
      }
    }
  }
}

template <typename T>
void step_blocks(T* p, const T* g, Moment& m, Moment& v, double lr, double beta1, double beta2,
                 double weight_decay, double eps, double bc1, double bc2, int64_t seed) {
  const int64_t blocks = m.scale.numel();
  const float flr = static_cast<float>(lr);
  // fp32 scalars, as torchao's step computes them from its fp32 lr and step tensors; a table
  // of 2^k entries is indexed by the top k bits
  const Step<T> s{p, g, m.codes.data_ptr<uint8_t>(), v.codes.data_ptr<uint8_t>(),
                  m.scale.data_ptr<float>(), v.scale.data_ptr<float>(),
                  m.qmap.const_data_ptr<float>(), v.qmap.const_data_ptr<float>(),
                  m.table.const_data_ptr<float>(), v.table.const_data_ptr<float>(),
                  32 - __builtin_ctzll(m.table.size(0)), 32 - __builtin_ctzll(v.table.size(0)),
                  m.codes.numel() / blocks, flr, flr * static_cast<float>(weight_decay),
                  static_cast<float>(1 - beta1), static_cast<float>(1 - beta2),
                  static_cast<float>(bc1), std::sqrt(static_cast<float>(bc2)),
                  static_cast<float>(eps), static_cast<uint64_t>(seed)};
  at::parallel_for(0, blocks, 64, [s](int64_t b0, int64_t b1) { step_range(s, b0, b1); });
}

// StochasticRoundingAdamW's step on blocks [b0, b1) of n values; arguments by value (above).
void bf16_range(c10::BFloat16* const p, const c10::BFloat16* const g, c10::BFloat16* const m,
                c10::BFloat16* const v, const int64_t n, const float decay, const float a1,
                const float beta2, const float a2, const float step_size, const float bc2_sqrt,
                const float eps, const uint64_t seed, const int64_t b0, const int64_t b1) {
  const Vec decay_v(decay), a1_v(a1), beta2_v(beta2), a2_v(a2), neg_step(-step_size),
      bc2_v(bc2_sqrt), eps_v(eps);
  alignas(64) float wb[kBlock], gb[kBlock], mb[kBlock], vb[kBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t o = b * kBlock, len = std::min(kBlock, n - o);
    for (int64_t i = 0; i < len; ++i) {
      wb[i] = static_cast<float>(p[o + i]);
      gb[i] = static_cast<float>(g[o + i]);
      mb[i] = static_cast<float>(m[o + i]);
      vb[i] = static_cast<float>(v[o + i]);
    }
    for (int64_t i = 0; i < len; i += kW) {
      const int64_t k = std::min(kW, len - i);
      const Vec gi = Vec::loadu(gb + i, k), m0 = Vec::loadu(mb + i, k);
      // torch's CPU kernels: lerp_ (weight < 0.5), mul_ then addcmul_, mul_ then addcdiv_
      const Vec mi = at::vec::fmadd(a1_v, gi - m0, m0);
      const Vec vi = Vec::loadu(vb + i, k) * beta2_v + a2_v * gi * gi;
      const Vec wi = Vec::loadu(wb + i, k) * decay_v + neg_step * mi / (vi.sqrt() / bc2_v + eps_v);
      mi.store(mb + i, k);
      vi.store(vb + i, k);
      wi.store(wb + i, k);
    }
    const uint32_t key = block_key(seed, b);  // three streams: weight, m, v
    round_bf16(wb, len, key, p + o);
    round_bf16(mb, len, hash32(key ^ 0x6d2b79f5U), m + o);
    round_bf16(vb, len, hash32(key ^ 0x2545f491U), v + o);
  }
}

}  // namespace

void adamw_bf16_step(at::Tensor& p, const at::Tensor& g, at::Tensor& m, at::Tensor& v,
                     double lr, double beta1, double beta2, double weight_decay, double eps,
                     double step_size, double bc2_sqrt, int64_t seed) {
  auto* pp = p.data_ptr<c10::BFloat16>();
  const auto* gp = g.const_data_ptr<c10::BFloat16>();
  auto *mp = m.data_ptr<c10::BFloat16>(), *vp = v.data_ptr<c10::BFloat16>();
  const int64_t n = p.numel();
  // the scalars as the torch ops take them: Python floats cast to fp32
  const float decay = static_cast<float>(1 - lr * weight_decay), a1 = static_cast<float>(1 - beta1);
  const float b2 = static_cast<float>(beta2), a2 = static_cast<float>(1 - beta2);
  const float ss = static_cast<float>(step_size), bc2 = static_cast<float>(bc2_sqrt);
  const float e = static_cast<float>(eps);
  const uint64_t s = static_cast<uint64_t>(seed);
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 64, [=](int64_t b0, int64_t b1) {
    bf16_range(pp, gp, mp, vp, n, decay, a1, b2, a2, ss, bc2, e, s, b0, b1);
  });
}

void adamw8bit_step(at::Tensor& p, const at::Tensor& g, Moment& m, Moment& v, double lr,
                    double beta1, double beta2, double weight_decay, double eps, double bc1,
                    double bc2, int64_t seed) {
  if (p.scalar_type() == at::kFloat) {
    step_blocks(p.data_ptr<float>(), g.const_data_ptr<float>(), m, v, lr, beta1, beta2,
                weight_decay, eps, bc1, bc2, seed);
  } else {
    step_blocks(p.data_ptr<c10::BFloat16>(), g.const_data_ptr<c10::BFloat16>(), m, v, lr, beta1,
                beta2, weight_decay, eps, bc1, bc2, seed);
  }
}

}  // namespace rlfuse::cpu
