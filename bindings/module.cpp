// rlfuse._C: validates inputs and routes to csrc/. No math here.
#include <torch/extension.h>

#include "cpu/epilogue.h"
#include "cpu/gemm.h"

namespace {

void check_chunk(const at::Tensor& z, const at::Tensor& targets, int64_t ignore_index,
                 const char* op) {
  TORCH_CHECK(z.device().is_cpu(), op, ": logits must be a CPU tensor, got ", z.device());
  TORCH_CHECK(z.dim() == 2, op, ": logits must be 2-D [C, V], got ", z.dim(), "-D");
  TORCH_CHECK(z.scalar_type() == at::kFloat, op, ": logits must be float32, got ",
              z.scalar_type());
  TORCH_CHECK(z.is_contiguous(), op, ": logits must be contiguous");
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong &&
                  targets.dim() == 1 && targets.size(0) == z.size(0),
              op, ": targets must be a CPU int64 tensor of shape [", z.size(0), "], got ",
              targets.scalar_type(), " ", targets.sizes());
  const int64_t v = z.size(1);
  TORCH_CHECK(at::all(targets.lt(v).logical_and(targets.ge(0)).logical_or(
                  targets.eq(ignore_index))).item<bool>(),
              op, ": targets must be in [0, ", v, ") or ignore_index=", ignore_index);
}

void check_row(const at::Tensor& x, int64_t c, const char* name, const char* op,
               at::ScalarType dtype = at::kFloat) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == dtype && x.dim() == 1 &&
                  x.size(0) == c && x.is_contiguous(),
              op, ": ", name, " must be a contiguous CPU ", c10::toString(dtype),
              " tensor of shape [", c, "], got ", x.scalar_type(), " ", x.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logits_stats(
    const at::Tensor& z, const at::Tensor& targets, double scale, double softcap,
    double inv_temp, int64_t ignore_index) {
  check_chunk(z, targets, ignore_index, "logits_stats");
  auto t = targets.contiguous();
  auto opts = z.options().dtype(at::kFloat);
  auto lse = at::empty({z.size(0)}, opts.dtype(at::kDouble)), logp = at::empty({z.size(0)}, opts),
       ent = at::empty({z.size(0)}, opts);
  rlfuse::cpu::logits_stats(z, t, {float(scale), float(softcap), float(inv_temp)},
                            ignore_index, lse, logp, ent);
  return {lse, logp, ent};
}

void logits_grad_(at::Tensor z, const at::Tensor& targets, const at::Tensor& lse,
                  const at::Tensor& entropy, const at::Tensor& a, const at::Tensor& e,
                  double scale, double softcap, double inv_temp, int64_t ignore_index) {
  check_chunk(z, targets, ignore_index, "logits_grad_");
  const int64_t c = z.size(0);
  check_row(lse, c, "lse", "logits_grad_", at::kDouble);
  check_row(entropy, c, "entropy", "logits_grad_");
  check_row(a, c, "grad_logp", "logits_grad_");
  check_row(e, c, "grad_entropy", "logits_grad_");
  rlfuse::cpu::logits_grad_(z, targets.contiguous(), lse, entropy, a, e,
                            {float(scale), float(softcap), float(inv_temp)}, ignore_index);
}

void check_gemm_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2, "gemm_f32_: ", name,
              " must be a 2-D CPU tensor, got ", t.dim(), "-D on ", t.device());
  TORCH_CHECK(t.numel() < (int64_t{1} << 31), "gemm_f32_: ", name,
              " is too large for a 32-bit BLAS (", t.sizes(), ")");
}

void gemm_f32_(const at::Tensor& a, const at::Tensor& b, at::Tensor c, bool accumulate) {
  check_gemm_operand(a, "a");
  check_gemm_operand(b, "b");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && rlfuse::cpu::has_lowp_gemm(a.scalar_type()),
              "gemm_f32_: a and b must be both bfloat16 or both float16 (with MKL present), got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.size(1) == b.size(0), "gemm_f32_: a ", a.sizes(), " and b ", b.sizes(),
              " cannot be multiplied");
  TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == at::kFloat && c.dim() == 2 &&
                  c.size(0) == a.size(0) && c.size(1) == b.size(1) && c.stride(1) == 1,
              "gemm_f32_: c must be a row-major CPU float32 tensor of shape [", a.size(0), ", ",
              b.size(1), "], got ", c.scalar_type(), " ", c.sizes(), " strides ", c.strides());
  rlfuse::cpu::gemm_f32_(a, b, c, accumulate);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlfuse CPU epilogue kernels";
  m.def("logits_stats", &logits_stats,
        "lse [C] fp64, logp, entropy [C] fp32 of a chunk of raw logits [C, V] fp32",
        py::arg("z"), py::arg("targets"), py::arg("scale"), py::arg("softcap"),
        py::arg("inv_temp"), py::arg("ignore_index"));
  m.def("logits_grad_", &logits_grad_, "overwrite raw logits [C, V] with dL/dlogits",
        py::arg("z"), py::arg("targets"), py::arg("lse"), py::arg("entropy"), py::arg("a"),
        py::arg("e"), py::arg("scale"), py::arg("softcap"), py::arg("inv_temp"),
        py::arg("ignore_index"));
  m.def("has_lowp_gemm", &rlfuse::cpu::has_lowp_gemm,
        "whether gemm_f32_ takes operands of this dtype here", py::arg("dtype"));
  m.def("gemm_f32_", &gemm_f32_,
        "c [M, N] fp32 = a [M, K] @ b [K, N] (+ c if accumulate), bf16/fp16 a and b, fp32 "
        "accumulation",
        py::arg("a"), py::arg("b"), py::arg("c"), py::arg("accumulate"));
}
