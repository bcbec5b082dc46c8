// AdamW steps on CPU for the two low-memory optimizers of rlfuse.engine.optim: 8-bit block-wise
// quantized moments on torchao's AdamW8bit state format, and bf16 weights and moments written
// back with stochastic rounding.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace rlfuse::cpu {

// One moment: codes [n] uint8 into qmap [256] fp32 (sorted), one fp32 absmax scale per block
// of n / scale.numel() elements, and table [2^k, 2] fp32 (rlfuse.engine.optim.code_table):
// for the values whose fp32 bits start with the k bits i, table[i] = (the code of the smallest
// of them, the one rounding threshold among them or NaN), so a value's code is
// table[i][0] + (value >= table[i][1]).
struct Moment {
  at::Tensor codes, scale, qmap, table;
};

// p [n] fp32 or bf16 <- one AdamW step with gradient g [n] (p's dtype): decoupled weight decay,
// the moments dequantized, updated (lerp) and the parameter moved with their fp32 values, then
// quantized again (per-block absmax, the nearest code). bc1, bc2: 1 - beta^step. A bf16 p is
// written back rounded stochastically, from noise that `seed` and each element's index fix.
void adamw8bit_step(at::Tensor& p, const at::Tensor& g, Moment& m, Moment& v, double lr,
                    double beta1, double beta2, double weight_decay, double eps, double bc1,
                    double bc2, int64_t seed);

// p, g, m, v [n] bf16 <- one step of StochasticRoundingAdamW: m = lerp(m, g, 1 - beta1),
// v = beta2 v + (1 - beta2) g^2, p = (1 - lr wd) p - step_size m / (sqrt(v) / bc2_sqrt + eps),
// in fp32, each written back rounded stochastically (noise fixed by `seed` and the index).
void adamw_bf16_step(at::Tensor& p, const at::Tensor& g, at::Tensor& m, at::Tensor& v,
                     double lr, double beta1, double beta2, double weight_decay, double eps,
                     double step_size, double bc2_sqrt, int64_t seed);

}  // namespace rlfuse::cpu
