// bf16 / fp16 GEMMs with an fp32 output that they can accumulate into (CPU).
#pragma once
#include <ATen/ATen.h>

namespace rlfuse::cpu {

// Whether a GEMM with `dtype` operands and an fp32 output is available (MKL's
// gemm_bf16bf16f32 / gemm_f16f16f32, which libtorch exports on x86-64 builds).
bool has_lowp_gemm(at::ScalarType dtype);

// c = a @ b (+ c when accumulate): a [M, K], b [K, N] bf16 or fp16 (any strides; copied when
// neither dim has a unit stride), c [M, N] fp32 row-major. Products accumulate in fp32 and c is
// never rounded to the operands' dtype, so summing many calls into c rounds nothing per call.
void gemm_f32_(const at::Tensor& a, const at::Tensor& b, at::Tensor& c, bool accumulate);

}  // namespace rlfuse::cpu
