// CPU epilogue kernels: ATen parallel_for over rows, AVX2/AVX-512 Vectorized sweeps.
// The vector width follows the build flags (-march=native in setup.py).
#include "cpu/vec.h"  // first: it sets the vector width
#include "cpu/epilogue.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace rlfuse::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// Returns the row's transformed logits: `raw` itself scaled by k when there is no softcap
// (linear, folded into the sweeps), else written to `buf`.
struct Row {
  const float* z;  // transformed values are k * z[j]
  float k;
};

inline Row transformed(const float* raw, int64_t v, Transform t, float* buf) {
  if (t.softcap <= 0.f) return {raw, t.scale * t.inv_temp};
  const float s = t.scale / t.softcap, c = t.softcap * t.inv_temp;
  for (int64_t j = 0; j < v; ++j) buf[j] = c * std::tanh(s * raw[j]);
  return {buf, 1.f};
}

// Horizontal reductions through a stack array: portable across every Vectorized width.
inline float reduce_max(const Vec& v) {
  alignas(64) float a[kW];
  v.store(a);
  float out = a[0];
  for (int64_t i = 1; i < kW; ++i) out = std::max(out, a[i]);
  return out;
}

inline float reduce_sum(const Vec& v) {
  alignas(64) float a[kW];
  v.store(a);
  float out = 0.f;
  for (int64_t i = 0; i < kW; ++i) out += a[i];
  return out;
}

inline float row_max(const float* z, int64_t v) {
  Vec m(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kW <= v; j += kW) m = at::vec::maximum(m, Vec::loadu(z + j));
  float out = reduce_max(m);
  for (; j < v; ++j) out = std::max(out, z[j]);
  return out;
}

// The row's sums shifted by its max mk = k * top (k > 0): s1 = sum exp(k z - mk) - 1 and
// t = sum exp(k z - mk) (k z - mk). Each element equal to the max contributes exp(x) = 1 + x,
// x = 0 (k z is one rounded product: -ffp-contract=off, setup.py): its 1 is counted apart (n)
// and s1 = (n - 1) + the rest, which on a peaked row (~1e-6) would otherwise be lost in the
// same fp32 lane as the 1. lse = mk + log1p(s1) and entropy = log1p(s1) - t / (1 + s1) then
// hold to fp32's relative accuracy, and shifting by the max means no cancellation against
// large logits (lse - sum p z would).
inline void row_sums(const float* z, int64_t v, float k, float top, float& s1_out,
                     float& t_out) {
  const Vec kv(k), mv(k * top), tv(top), one(1.f);
  Vec s(0.f), n(0.f), t(0.f);
  auto add = [&](Vec zz, const Vec* live) {  // live: all-ones lanes of a short tail
    Vec x = zz * kv - mv, p = x.exp_u20(), at_top = zz == tv;
    if (live) x = x & *live, p = p & *live, at_top = at_top & *live;
    s = s + Vec::blendv(p, x, at_top);  // the max's 1 is in n
    n = n + (at_top & one);
    t = at::vec::fmadd(p, x, t);
  };
  int64_t j = 0;
  for (; j + kW <= v; j += kW) add(Vec::loadu(z + j), nullptr);
  if (j < v) {
    const Vec live = Vec::set(Vec(0.f), one == one, v - j);
    add(Vec::loadu(z + j, v - j), &live);
  }
  s1_out = (reduce_sum(n) - 1.f) + reduce_sum(s);
  t_out = reduce_sum(t);
}

}  // namespace

void logits_stats(const at::Tensor& z, const at::Tensor& targets, Transform t,
                  int64_t ignore_index, at::Tensor& lse, at::Tensor& logp, at::Tensor& entropy) {
  const int64_t c = z.size(0), v = z.size(1);
  const float* zp = z.data_ptr<float>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  double* lp = lse.data_ptr<double>();
  float* op = logp.data_ptr<float>();
  float* ep = entropy.data_ptr<float>();
  at::parallel_for(0, c, 1, [&](int64_t b, int64_t e) {
    std::vector<float> buf(t.softcap > 0.f ? v : 0);
    for (int64_t i = b; i < e; ++i) {
      Row row = transformed(zp + i * v, v, t, buf.data());
      const float top = row_max(row.z, v), mk = row.k * top;  // k > 0
      float s1, sz;
      row_sums(row.z, v, row.k, top, s1, sz);
      const float log_s = std::log1p(s1);
      lp[i] = double(mk) + double(log_s);
      const int64_t tgt = tp[i];
      if (tgt == ignore_index) {
        op[i] = 0.f;
        ep[i] = 0.f;
      } else if (!std::isfinite(sz)) {
        // A non-finite logit (NaN, or inf from the inputs) leaves sz non-finite: the row's
        // log-prob and entropy are NaN, as on the reference path.
        lp[i] = op[i] = ep[i] = std::numeric_limits<float>::quiet_NaN();
      } else {
        op[i] = (row.k * row.z[tgt] - mk) - log_s;
        ep[i] = log_s - sz / (1.f + s1);
      }
    }
  });
}

void logits_partials(const at::Tensor& z, const at::Tensor& targets, Transform t,
                     int64_t vocab_start, at::Tensor& part) {
  const int64_t c = z.size(0), v = z.size(1);
  const float* zp = z.data_ptr<float>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  float *pm = part.data_ptr<float>(), *ps = pm + c, *pt = ps + c, *pz = pt + c;
  at::parallel_for(0, c, 1, [&](int64_t b, int64_t e) {
    std::vector<float> buf(t.softcap > 0.f ? v : 0);
    for (int64_t i = b; i < e; ++i) {
      Row row = transformed(zp + i * v, v, t, buf.data());
      const float top = row_max(row.z, v), mk = row.k * top;  // k > 0
      row_sums(row.z, v, row.k, top, ps[i], pt[i]);
      pm[i] = mk;
      const int64_t j = tp[i] - vocab_start;
      pz[i] = (j >= 0 && j < v) ? row.k * row.z[j] : 0.f;
    }
  });
}

void logits_grad_(at::Tensor& z, const at::Tensor& targets, const at::Tensor& lse,
                  const at::Tensor& entropy, const at::Tensor& a, const at::Tensor& e,
                  Transform t, int64_t ignore_index, int64_t vocab_start) {
  const int64_t c = z.size(0), v = z.size(1);
  float* zp = z.data_ptr<float>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  const double* lp = lse.data_ptr<double>();
  const float* hp = entropy.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* gp = e.data_ptr<float>();
  const bool cap = t.softcap > 0.f;
  const float k = t.scale * t.inv_temp;
  const float tanh_in = cap ? t.scale / t.softcap : 0.f, zc = t.softcap * t.inv_temp;
  at::parallel_for(0, c, 1, [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) {
      float* row = zp + i * v;
      const int64_t tgt = tp[i];
      if (tgt == ignore_index) {
        std::fill(row, row + v, 0.f);
        continue;
      }
      const int64_t jt = tgt - vocab_start;  // the target's column; outside [0, v): absent
      // log p_j = (z_j - c) - r with c + r = lse (fp64 split into two floats): accurate to
      // fp32 however large lse is; z_j - sum_k p_k z_k = log p_j + entropy.
      const float c = float(lp[i]), r = float(lp[i] - double(c));
      const float ai = ap[i], ei = gp[i], hi = hp[i];
      float grad_target;
      if (!cap) {
        // g_j = k * p_j * (-a - e (log p_j + H))
        const Vec kv(k), cv(c), rv(r), na(-ai), ev(ei), hv(hi);
        auto f = [&](Vec x) {
          Vec lpj = (x * kv - cv) - rv;
          return kv * lpj.exp_u20() * (na - ev * (lpj + hv));
        };
        grad_target = k * ai;
        int64_t j = 0;
        for (; j + kW <= v; j += kW) f(Vec::loadu(row + j)).store(row + j);
        if (j < v) f(Vec::loadu(row + j, v - j)).store(row + j, v - j);
      } else {
        // z = zc * tanh(tanh_in * raw), dz/draw = scale * inv_temp * (1 - tanh^2)
        float dt = 0.f;
        for (int64_t j = 0; j < v; ++j) {
          const float th = std::tanh(tanh_in * row[j]);
          const float lpj = (zc * th - c) - r, d = k * (1.f - th * th);
          if (j == jt) dt = d;
          row[j] = d * std::exp(lpj) * (-ai - ei * (lpj + hi));
        }
        grad_target = dt * ai;
      }
      if (jt >= 0 && jt < v) row[jt] += grad_target;
    }
  });
}

}  // namespace rlfuse::cpu
