// AdamW8bit's step in one pass over each block: the arithmetic of torchao's single_param_adam
// on its OptimState8bit moments (Dettmers et al. 2022: a dynamic 8-bit map, blocks of 256 with
// one absmax each), with the code search done by a table on the value's top 16 bits plus at
// most a few steps, where torchao's compiled step searches the 256 codes in 8 lookups.
#include "cpu/adam8bit.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace rlfuse::cpu {
namespace {

// The nearest code to x (ties up), as torchao's quantize_8bit_with_qmap: the largest code c
// with q[c] <= x, then c + 1 where x is at least halfway to q[c + 1].
inline uint8_t quantize(float x, const float* q, const uint8_t* lut, int shift) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int c = lut[bits >> shift];
  while (c < 255 && x >= q[c + 1]) ++c;
  const int up = std::min(c + 1, 255);
  return static_cast<uint8_t>(x - q[c] >= (q[up] - q[c]) * 0.5f ? up : c);
}

// torch.lerp's formula: s + w (e - s) for |w| < 0.5, else e - (e - s) (1 - w)
inline float lerp(float s, float e, float w) {
  return std::fabs(w) < 0.5f ? s + w * (e - s) : e - (e - s) * (1.f - w);
}

}  // namespace

void adamw8bit_step(at::Tensor& p, const at::Tensor& g, Moment& m, Moment& v, double lr,
                    double beta1, double beta2, double weight_decay, double eps, double bc1,
                    double bc2) {
  const int64_t blocks = m.scale.numel(), bs = p.numel() / blocks;
  float* pp = p.data_ptr<float>();
  const float* gp = g.const_data_ptr<float>();
  uint8_t *mc = m.codes.data_ptr<uint8_t>(), *vc = v.codes.data_ptr<uint8_t>();
  float *ms = m.scale.data_ptr<float>(), *vs = v.scale.data_ptr<float>();
  const float *mq = m.qmap.const_data_ptr<float>(), *vq = v.qmap.const_data_ptr<float>();
  const uint8_t *ml = m.lut.const_data_ptr<uint8_t>(), *vl = v.lut.const_data_ptr<uint8_t>();
  // fp32 scalars, as torchao's step computes them from its fp32 lr and step tensors
  const float flr = static_cast<float>(lr), decay = flr * static_cast<float>(weight_decay);
  const float a1 = static_cast<float>(1 - beta1), a2 = static_cast<float>(1 - beta2);
  const float c1 = static_cast<float>(bc1), c2 = std::sqrt(static_cast<float>(bc2));
  const float e = static_cast<float>(eps);
  // a lut of 2^k entries is indexed by the top k bits
  const int m_shift = 32 - __builtin_ctzll(m.lut.numel());
  const int v_shift = 32 - __builtin_ctzll(v.lut.numel());
  at::parallel_for(0, blocks, 64, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(2 * bs);  // this block's moments, fp32
    float *mb = buf.data(), *vb = buf.data() + bs;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * bs;
      float *w = pp + o;
      const float* gb = gp + o;
      for (int64_t i = 0; i < bs; ++i) {  // dequantize (table lookups)
        mb[i] = mq[mc[o + i]] * ms[b];
        vb[i] = vq[vc[o + i]] * vs[b];
      }
      float am = 0.f, av = 0.f;
      for (int64_t i = 0; i < bs; ++i) {  // the step, on the fp32 moments
        const float mi = lerp(mb[i], gb[i], a1), vi = lerp(vb[i], gb[i] * gb[i], a2);
        mb[i] = mi;
        vb[i] = vi;
        am = std::max(am, std::fabs(mi));
        av = std::max(av, vi);  // vi >= 0
        w[i] = (w[i] - decay * w[i]) - flr * (mi / c1) / (std::sqrt(vi) / c2 + e);
      }
      ms[b] = am = std::max(am, 1e-12f);
      vs[b] = av = std::max(av, 1e-12f);
      for (int64_t i = 0; i < bs; ++i) {
        mb[i] /= am;
        vb[i] /= av;
      }
      for (int64_t i = 0; i < bs; ++i) {
        mc[o + i] = quantize(mb[i], mq, ml, m_shift);
        vc[o + i] = quantize(vb[i], vq, vl, v_shift);
      }
    }
  });
}

}  // namespace rlfuse::cpu
