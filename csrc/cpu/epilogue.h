// Row-wise epilogues over a chunk of raw logits Z [C, V] fp32 (CPU).
#pragma once
#include <ATen/ATen.h>

namespace rlfuse::cpu {

// z = softcap(scale * raw) * inv_temp, softcap(u) = cap * tanh(u / cap) (cap = 0: none).
struct Transform {
  float scale, softcap, inv_temp;
};

// Sweeps over each row: max m, then sum exp(z - m) - 1 (s1: the elements at the max are
// counted apart, so a peaked row's small terms are not lost against their 1), sum p*(z - m),
// z[target]. Z is not modified.
// Writes lse [C] fp64 (so that the gradient recovers z - lse to fp32 accuracy whatever lse's
// magnitude) and logp, entropy [C] fp32; rows whose target == ignore_index get logp = entropy
// = 0; rows with a non-finite logit get NaN.
void logits_stats(const at::Tensor& z, const at::Tensor& targets, Transform t,
                  int64_t ignore_index, at::Tensor& lse, at::Tensor& logp, at::Tensor& entropy);

// Per-row partial statistics of a vocabulary slice: Z holds columns [vocab_start,
// vocab_start + V) of the full vocabulary, targets are global ids. Writes part [4, C] fp32:
// m = max z, s1 = sum exp(z - m) - 1, t = sum exp(z - m)(z - m) and z[target] where the target
// lies in the slice, else 0 ("absent"). Z is not modified. The vocab-parallel ops combine the
// slices' partials over the ranks (kernels/_vocab_parallel.py).
void logits_partials(const at::Tensor& z, const at::Tensor& targets, Transform t,
                     int64_t vocab_start, at::Tensor& part);

// Overwrites Z in place with dL/d(raw logits) given a = dL/dlogp and e = dL/dentropy per row:
//   dL/dz_j = a (onehot_j - p_j) - e p_j (log p_j + entropy), times dz/draw_j
// (log p_j + entropy = z_j - sum_k p_k z_k, without the cancellation). Z holds columns
// [vocab_start, vocab_start + V) and lse, entropy are the full vocabulary's: a row whose
// target lies outside the slice gets no one-hot term (its softmax / entropy terms remain); a
// row whose target is ignore_index gets zeros.
void logits_grad_(at::Tensor& z, const at::Tensor& targets, const at::Tensor& lse,
                  const at::Tensor& entropy, const at::Tensor& a, const at::Tensor& e,
                  Transform t, int64_t ignore_index, int64_t vocab_start);

}  // namespace rlfuse::cpu
