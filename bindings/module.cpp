// rlfuse._C: validates inputs and routes to csrc/. No math here.
#include <torch/extension.h>

#include "cpu/adamw.h"
#include "cpu/decode.h"
#include "cpu/epilogue.h"
#include "cpu/gemm.h"

namespace {

void check_logits(const at::Tensor& z, const at::Tensor& targets, const char* op) {
  TORCH_CHECK(z.device().is_cpu(), op, ": logits must be a CPU tensor, got ", z.device());
  TORCH_CHECK(z.dim() == 2, op, ": logits must be 2-D [C, V], got ", z.dim(), "-D");
  TORCH_CHECK(z.scalar_type() == at::kFloat, op, ": logits must be float32, got ",
              z.scalar_type());
  TORCH_CHECK(z.is_contiguous(), op, ": logits must be contiguous");
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong &&
                  targets.dim() == 1 && targets.size(0) == z.size(0),
              op, ": targets must be a CPU int64 tensor of shape [", z.size(0), "], got ",
              targets.scalar_type(), " ", targets.sizes());
}

// z holds columns [vocab_start, vocab_start + V) of a vocabulary of vocab_size (-1: V) ids.
void check_chunk(const at::Tensor& z, const at::Tensor& targets, int64_t ignore_index,
                 const char* op, int64_t vocab_start = 0, int64_t vocab_size = -1) {
  check_logits(z, targets, op);
  const int64_t v = vocab_size < 0 ? z.size(1) : vocab_size;
  TORCH_CHECK(vocab_start >= 0 && vocab_start + z.size(1) <= v, op,
              ": the logits' columns [vocab_start, vocab_start + V) = [", vocab_start, ", ",
              vocab_start + z.size(1), ") must lie in [0, vocab_size = ", v, ")");
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

at::Tensor logits_partials(const at::Tensor& z, const at::Tensor& targets, double scale,
                           double softcap, double inv_temp, int64_t vocab_start) {
  check_logits(z, targets, "logits_partials");
  auto part = at::empty({4, z.size(0)}, z.options());
  rlfuse::cpu::logits_partials(z, targets.contiguous(),
                               {float(scale), float(softcap), float(inv_temp)}, vocab_start, part);
  return part;
}

void logits_grad_(at::Tensor z, const at::Tensor& targets, const at::Tensor& lse,
                  const at::Tensor& entropy, const at::Tensor& a, const at::Tensor& e,
                  double scale, double softcap, double inv_temp, int64_t ignore_index,
                  int64_t vocab_start, int64_t vocab_size) {
  check_chunk(z, targets, ignore_index, "logits_grad_", vocab_start, vocab_size);
  const int64_t c = z.size(0);
  check_row(lse, c, "lse", "logits_grad_", at::kDouble);
  check_row(entropy, c, "entropy", "logits_grad_");
  check_row(a, c, "grad_logp", "logits_grad_");
  check_row(e, c, "grad_entropy", "logits_grad_");
  rlfuse::cpu::logits_grad_(z, targets.contiguous(), lse, entropy, a, e,
                            {float(scale), float(softcap), float(inv_temp)}, ignore_index,
                            vocab_start);
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

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kFloat &&
                  x.is_contiguous(),
              "decode_linear: x must be a contiguous 2-D CPU float32 tensor, got ",
              x.scalar_type(), " ", x.sizes(), " on ", x.device());
  const auto wt = w.scalar_type();
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() &&
                  (wt == at::kFloat || wt == at::kBFloat16 || wt == at::kChar),
              "decode_linear: w must be a contiguous 2-D CPU float32, bfloat16 or int8 tensor, "
              "got ", wt, " ", w.sizes(), " on ", w.device());
  TORCH_CHECK(w.size(1) == x.size(1), "decode_linear: x ", x.sizes(), " and w ", w.sizes(),
              " must have the same in_features (dim 1)");
  TORCH_CHECK(scale.has_value() == (wt == at::kChar),
              "decode_linear: scale (one float32 per output row) is required for an int8 w and "
              "only then");
  if (scale) check_row(*scale, w.size(0), "scale", "decode_linear");
  if (bias) check_row(*bias, w.size(0), "bias", "decode_linear");
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  rlfuse::cpu::decode_linear(x, w, scale, bias, y);
  return y;
}

rlfuse::cpu::Moment moment(const at::Tensor& codes, const at::Tensor& scale,
                           const at::Tensor& qmap, const at::Tensor& table, int64_t n,
                           const char* name) {
  constexpr const char* op = "adamw8bit_step_";
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte &&
                  codes.is_contiguous() && codes.numel() == n,
              op, ": ", name, "_codes must be a contiguous CPU uint8 tensor of ", n,
              " elements, got ", codes.scalar_type(), " ", codes.sizes());
  TORCH_CHECK(scale.dim() == 1 && scale.numel() > 0 && n % scale.numel() == 0, op, ": ", name,
              "_scale must be 1-D with a number of blocks that divides ", n, ", got ",
              scale.sizes());
  check_row(scale, scale.numel(), (std::string(name) + "_scale").c_str(), op);
  check_row(qmap, 256, (std::string(name) + "_qmap").c_str(), op);
  const int64_t entries = table.dim() == 2 ? table.size(0) : 0;
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kFloat &&
                  table.is_contiguous() && table.dim() == 2 && table.size(1) == 2 &&
                  entries >= 2 && entries <= 65536 && (entries & (entries - 1)) == 0,
              op, ": ", name, "_table must be a contiguous CPU float32 tensor [2^k, 2], k in "
              "[1, 16], got ", table.scalar_type(), " ", table.sizes());
  return {codes, scale, qmap, table};
}

void adamw8bit_step_(at::Tensor p, const at::Tensor& g, const at::Tensor& m_codes,
                     const at::Tensor& m_scale, const at::Tensor& m_qmap,
                     const at::Tensor& m_table, const at::Tensor& v_codes,
                     const at::Tensor& v_scale, const at::Tensor& v_qmap,
                     const at::Tensor& v_table, double lr, double beta1, double beta2,
                     double weight_decay, double eps, double bc1, double bc2, int64_t seed) {
  const auto dt = p.scalar_type();
  TORCH_CHECK(p.device().is_cpu() && (dt == at::kFloat || dt == at::kBFloat16) &&
                  p.is_contiguous(),
              "adamw8bit_step_: p must be a contiguous CPU float32 or bfloat16 tensor, got ",
              dt, " on ", p.device());
  TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == dt && g.is_contiguous() &&
                  g.sizes() == p.sizes(),
              "adamw8bit_step_: g must be a contiguous CPU tensor of p's dtype (", dt,
              ") and shape ", p.sizes(), ", got ", g.scalar_type(), " ", g.sizes());
  auto m = moment(m_codes, m_scale, m_qmap, m_table, p.numel(), "m");
  auto v = moment(v_codes, v_scale, v_qmap, v_table, p.numel(), "v");
  TORCH_CHECK(m_scale.numel() == v_scale.numel(),
              "adamw8bit_step_: m_scale and v_scale must have as many blocks, got ",
              m_scale.numel(), " and ", v_scale.numel());
  rlfuse::cpu::adamw8bit_step(p, g, m, v, lr, beta1, beta2, weight_decay, eps, bc1, bc2, seed);
}

void adamw_bf16_step_(at::Tensor p, const at::Tensor& g, at::Tensor m, at::Tensor v, double lr,
                      double beta1, double beta2, double weight_decay, double eps,
                      double step_size, double bc2_sqrt, int64_t seed) {
  const std::pair<const at::Tensor*, const char*> args[] = {{&p, "p"}, {&g, "g"}, {&m, "m"},
                                                            {&v, "v"}};
  for (auto [t, name] : args) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 &&
                    t->is_contiguous() && t->sizes() == p.sizes(),
                "adamw_bf16_step_: ", name, " must be a contiguous CPU bfloat16 tensor of p's "
                "shape ", p.sizes(), ", got ", t->scalar_type(), " ", t->sizes(), " on ",
                t->device());
  }
  rlfuse::cpu::adamw_bf16_step(p, g, m, v, lr, beta1, beta2, weight_decay, eps, step_size,
                               bc2_sqrt, seed);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlfuse CPU epilogue kernels";
  m.def("logits_stats", &logits_stats,
        "lse [C] fp64, logp, entropy [C] fp32 of a chunk of raw logits [C, V] fp32",
        py::arg("z"), py::arg("targets"), py::arg("scale"), py::arg("softcap"),
        py::arg("inv_temp"), py::arg("ignore_index"));
  m.def("logits_partials", &logits_partials,
        "part [4, C] fp32 (max, sum-exp, sum p*z shifted, target logit or 0 when absent) of "
        "a vocabulary slice [C, V] fp32 starting at global id vocab_start",
        py::arg("z"), py::arg("targets"), py::arg("scale"), py::arg("softcap"),
        py::arg("inv_temp"), py::arg("vocab_start"));
  m.def("logits_grad_", &logits_grad_,
        "overwrite raw logits [C, V] (the columns [vocab_start, vocab_start + V) of a "
        "vocabulary of vocab_size ids; -1: V) with dL/dlogits",
        py::arg("z"), py::arg("targets"), py::arg("lse"), py::arg("entropy"), py::arg("a"),
        py::arg("e"), py::arg("scale"), py::arg("softcap"), py::arg("inv_temp"),
        py::arg("ignore_index"), py::arg("vocab_start") = 0, py::arg("vocab_size") = -1);
  m.def("has_lowp_gemm", &rlfuse::cpu::has_lowp_gemm,
        "whether gemm_f32_ takes operands of this dtype here", py::arg("dtype"));
  m.def("gemm_f32_", &gemm_f32_,
        "c [M, N] fp32 = a [M, K] @ b [K, N] (+ c if accumulate), bf16/fp16 a and b, fp32 "
        "accumulation",
        py::arg("a"), py::arg("b"), py::arg("c"), py::arg("accumulate"));
  m.def("decode_linear", &decode_linear,
        "y [M, N] fp32 = x [M, K] fp32 @ w^T (* scale) (+ bias), w [N, K] fp32, bf16 or int8 "
        "(int8 with scale [N] fp32): a few rows against a whole weight, read once",
        py::arg("x"), py::arg("w"), py::arg("scale") = py::none(), py::arg("bias") = py::none());
  m.def("adamw_bf16_step_", &adamw_bf16_step_,
        "one StochasticRoundingAdamW step of bf16 p, m, v [n] in place (fp32 arithmetic, each "
        "written back rounded stochastically from seed)",
        py::arg("p"), py::arg("g"), py::arg("m"), py::arg("v"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("weight_decay"), py::arg("eps"), py::arg("step_size"),
        py::arg("bc2_sqrt"), py::arg("seed"));
  m.def("adamw8bit_step_", &adamw8bit_step_,
        "one AdamW step of p [n] fp32 or bf16 in place (bf16: rounded stochastically from "
        "seed), with torchao's 8-bit block-wise moments (codes, scale, qmap, and the code "
        "table) updated in place",
        py::arg("p"), py::arg("g"), py::arg("m_codes"), py::arg("m_scale"), py::arg("m_qmap"),
        py::arg("m_table"), py::arg("v_codes"), py::arg("v_scale"), py::arg("v_qmap"),
        py::arg("v_table"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
        py::arg("weight_decay"), py::arg("eps"), py::arg("bc1"), py::arg("bc2"),
        py::arg("seed") = 0);
}
