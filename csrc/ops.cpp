// Operator schemas of the extension (namespace ncrl_kernels) and the argument helpers shared by
// the CPU and CUDA kernels. Each device registers its implementations next to its kernels
// (csrc/cpu, csrc/cuda) from the device-independent operator bodies of device_ops.h. Autograd and fake (meta) kernels are registered from Python
// (ncrl_kernels/_extension.py) with torch.library.register_autograd / register_fake.
#include <Python.h>
#include <torch/library.h>

#include "common.h"

extern "C" {
// `import ncrl_kernels._C` loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace ncrl {

LossParams parse_loss(c10::string_view loss, double gamma, bool margin_reg) {
  TORCH_CHECK(gamma >= 0.0 && gamma < 1.0, "gamma must be in [0, 1), got ", gamma);
  LossParams p{LossKind::NCRL, gamma, margin_reg};
  if (loss == "atl") {
    p.kind = LossKind::ATL;
  } else if (loss == "bce") {
    p.kind = LossKind::BCE;
  } else {
    TORCH_CHECK(loss == "ncrl", "loss must be 'ncrl', 'atl' or 'bce', got '", loss, "'");
  }
  return p;
}

Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "mean") return Reduction::Mean;
  if (reduction == "sum") return Reduction::Sum;
  TORCH_CHECK(reduction == "none", "reduction must be 'mean', 'sum' or 'none', got '", reduction, "'");
  return Reduction::None;
}

HeadSizes check_head(const at::Tensor& hs, const at::Tensor& ts, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, int64_t block_size) {
  TORCH_CHECK(hs.dim() == 2 && hs.sizes() == ts.sizes(), "hs and ts must be [N, E] of the same shape");
  TORCH_CHECK(block_size > 0 && hs.size(1) % block_size == 0, "E must be divisible by block_size");
  TORCH_CHECK(hs.scalar_type() == ts.scalar_type() && hs.scalar_type() == weight.scalar_type(),
              "hs, ts and weight must share one dtype");
  HeadSizes s{hs.size(0), hs.size(1), block_size, hs.size(1) / block_size, weight.size(0)};
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == s.emb * block_size, "weight must be [C, E*block_size]");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == s.classes), "bias must be [C]");
  // The kernels read every input through raw pointers of one device.
  TORCH_CHECK(ts.device() == hs.device() && weight.device() == hs.device() &&
                  (!bias.has_value() || bias->device() == hs.device()),
              "hs, ts, weight and bias must be on one device; move them with .to(hs.device)");
  return s;
}

void check_labels(const at::Tensor& labels, int64_t n, int64_t classes, const at::Device& device) {
  TORCH_CHECK(classes >= 2, "need C >= 2 classes (the none class in column 0 and one relation), got C=", classes);
  TORCH_CHECK(labels.sizes() == at::IntArrayRef({n, classes}), "labels must be [N, C] = [", n, ", ", classes,
              "], got ", labels.sizes());
  TORCH_CHECK(labels.device() == device, "labels must be on ", device, " like the scores, got ", labels.device());
}

void check_loss_inputs(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 2, "logits must be [N, C], got ", logits.sizes());
  check_labels(labels, logits.size(0), logits.size(1), logits.device());
}

double row_grad_scale(Reduction reduction, int64_t n) {
  return reduction == Reduction::Mean ? 1.0 / static_cast<double>(std::max<int64_t>(n, 1)) : 1.0;
}

at::Tensor reduce_rows(const at::Tensor& row_loss, Reduction reduction) {
  if (reduction == Reduction::None) return row_loss;
  at::Tensor total = row_loss.sum();
  return reduction == Reduction::Mean ? total.div_(static_cast<double>(std::max<int64_t>(row_loss.size(0), 1)))
                                      : total;
}

at::Tensor to_compute(const at::Tensor& x, at::ScalarType ct) {
  return x.to(ct).contiguous();
}

HeadInputs head_inputs(const at::Tensor& hs, const at::Tensor& ts, const at::Tensor& weight,
                       at::ScalarType operand_type) {
  return {to_compute(hs, operand_type), to_compute(ts, operand_type), to_compute(weight, operand_type)};
}

at::Tensor bias_logits(const HeadSizes& s, const std::optional<at::Tensor>& bias, const at::TensorOptions& options) {
  // Always a fresh tensor: the kernels add into it (for N == 1 a view of the bias would pass for
  // contiguous, and the bias would be overwritten).
  at::Tensor logits = at::empty({s.n, s.classes}, options);
  return bias.has_value() ? logits.copy_(bias->unsqueeze(0).expand_as(logits)) : logits.zero_();
}

LossBatch loss_batch(const at::Tensor& labels, c10::string_view loss, double gamma, bool margin_reg,
                     Reduction reduction, at::ScalarType ct) {
  const LossParams params = parse_loss(loss, gamma, margin_reg);  // before any work on the device
  const at::Tensor y = to_compute(labels, ct);
  return {params, row_grad_scale(reduction, y.size(0)), y, at::empty({y.size(0)}, y.options()), at::empty_like(y)};
}

}  // namespace ncrl

TORCH_LIBRARY(ncrl_kernels, m) {
  // logits [N, C] = bias + group-bilinear(hs, ts) @ weight^T, without the [N, E*B] feature.
  m.def("head_forward(Tensor hs, Tensor ts, Tensor weight, Tensor? bias, int block_size, bool symmetric) -> Tensor");
  // (grad_hs, grad_ts, grad_weight, grad_bias); outputs not asked for are empty.
  m.def(
      "head_backward(Tensor grad_logits, Tensor hs, Tensor ts, Tensor weight, int block_size, bool symmetric, "
      "bool input_grad, bool weight_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // (loss, d loss / d logits): the gradient rows come out of the same pass as the loss.
  m.def(
      "loss_forward(Tensor logits, Tensor labels, str loss, float gamma, bool margin_reg, str reduction) "
      "-> (Tensor, Tensor)");
  // (loss, logits, d loss / d logits) of head + loss in one pass over pair tiles.
  m.def(
      "fused_forward(Tensor hs, Tensor ts, Tensor weight, Tensor? bias, Tensor labels, int block_size, "
      "bool symmetric, str loss, float gamma, bool margin_reg, str reduction) -> (Tensor, Tensor, Tensor)");
}
