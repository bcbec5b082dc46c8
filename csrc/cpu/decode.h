// Skinny linear layers for decoding (CPU): a few rows of activations against a whole weight.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace rlfuse::cpu {

// y [M, N] fp32 = x [M, K] fp32 @ W^T (* scale) (+ bias), W [N, K] fp32, bf16 or int8 (with
// one fp32 scale per output row), bias [N] fp32. Each weight row is read from memory once for
// all M rows and converted to fp32 in registers, with fp32 accumulation: made for M of 1-32,
// where a decode step is bound by reading the weight.
void decode_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                   const std::optional<at::Tensor>& bias, at::Tensor& y);

}  // namespace rlfuse::cpu
