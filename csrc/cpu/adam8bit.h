// AdamW with 8-bit block-wise quantized moments (CPU), on torchao's AdamW8bit state format.
#pragma once
#include <ATen/core/Tensor.h>

namespace rlfuse::cpu {

// One moment: codes [n] uint8 into qmap [256] fp32 (sorted), one fp32 absmax scale per block
// of n / scale.numel() elements, and lut [2^k] uint8 (k <= 16, rlfuse.engine.optim.code_table):
// for each top k bits of an fp32 value, the largest code whose qmap value is <= the smallest
// value with those bits.
struct Moment {
  at::Tensor codes, scale, qmap, lut;
};

// p [n] fp32 <- one AdamW step with gradient g [n] fp32: decoupled weight decay, the moments
// dequantized, updated (lerp) and the parameter moved with their fp32 values, then quantized
// again (per-block absmax, the nearest code). bc1, bc2: 1 - beta^step.
void adamw8bit_step(at::Tensor& p, const at::Tensor& g, Moment& m, Moment& v, double lr,
                    double beta1, double beta2, double weight_decay, double eps, double bc1,
                    double bc2);

}  // namespace rlfuse::cpu
