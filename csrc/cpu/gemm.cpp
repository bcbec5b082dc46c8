// bf16 / fp16 GEMMs into fp32 through MKL (linked into libtorch_cpu on x86-64 builds).
//
// torch 2.13 has no CPU kernel for mm / addmm with out_dtype=float32, and cpublas's
// bf16 -> fp32 gemm is not exported; MKL's mixed-precision cblas entries are, and they take
// beta = 1, which is what an fp32 weight-gradient accumulator needs. They are declared weak so
// that a torch build without MKL still loads the extension (has_lowp_gemm() is then false).
#include "cpu/gemm.h"

#include <algorithm>
#include <cstdint>
#include <utility>

extern "C" {
// MKL's CBLAS ABI (LP64): layout / transpose enums as int, MKL_INT as int, MKL_BF16 and MKL_F16
// as uint16_t.
__attribute__((weak)) void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m,
                                                  int n, int k, float alpha, const uint16_t* a,
                                                  int lda, const uint16_t* b, int ldb,
                                                  float beta, float* c, int ldc);
__attribute__((weak)) void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m,
                                                int n, int k, float alpha, const uint16_t* a,
                                                int lda, const uint16_t* b, int ldb,
                                                float beta, float* c, int ldc);
}

namespace rlfuse::cpu {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// BLAS needs a unit stride in one dim: row-major (no transpose) or column-major (transposed).
at::Tensor blas_layout(const at::Tensor& t) {
  return t.stride(1) == 1 || t.stride(0) == 1 ? t : t.contiguous();
}

// A 2-D operand as row-major CBLAS sees it: (transpose flag, leading dimension).
std::pair<int, int> cblas_view(const at::Tensor& t) {
  if (t.stride(1) == 1) {
    return {kNoTrans, static_cast<int>(std::max<int64_t>(t.stride(0), t.size(1)))};
  }
  return {kTrans, static_cast<int>(std::max<int64_t>(t.stride(1), t.size(0)))};
}

}  // namespace

bool has_lowp_gemm(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return cblas_gemm_bf16bf16f32 != nullptr;
  if (dtype == at::kHalf) return cblas_gemm_f16f16f32 != nullptr;
  return false;
}

void gemm_f32_(const at::Tensor& a_in, const at::Tensor& b_in, at::Tensor& c, bool accumulate) {
  const auto a = blas_layout(a_in), b = blas_layout(b_in);
  const int m = static_cast<int>(a.size(0)), k = static_cast<int>(a.size(1)),
            n = static_cast<int>(b.size(1));
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) c.zero_();
    return;
  }
  const auto [ta, lda] = cblas_view(a);
  const auto [tb, ldb] = cblas_view(b);
  const float beta = accumulate ? 1.f : 0.f;
  const auto* pa = reinterpret_cast<const uint16_t*>(a.const_data_ptr());
  const auto* pb = reinterpret_cast<const uint16_t*>(b.const_data_ptr());
  auto fn = a.scalar_type() == at::kBFloat16 ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
  const int ldc = static_cast<int>(std::max<int64_t>(c.stride(0), n));  // any stride if m == 1
  fn(kRowMajor, ta, tb, m, n, k, 1.f, pa, lda, pb, ldb, beta, c.data_ptr<float>(), ldc);
}

}  // namespace rlfuse::cpu
