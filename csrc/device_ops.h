// The four operators of the extension, written once over a device's kernels: argument checks,
// conversion to the compute type, allocation and the assembly of the outputs are the same on every
// device; only the pair-tile loops differ. A device provides a struct `Kernels` with
//
//   static void head_forward(const HeadSizes&, const HeadInputs&, bool symmetric, at::Tensor& logits,
//                            LossBatch* loss);
//       logits [N, C] (holding the bias) += the group-bilinear head of every pair; then, when
//       `loss` is given, the loss rows of the finished logits into *loss
//   static void head_backward(const HeadSizes&, const HeadInputs&, const at::Tensor& grad, bool symmetric,
//                             at::Tensor& dhs, at::Tensor& dts, at::Tensor& dweight);
//       dhs, dts = d/d hs, d/d ts (when defined); dweight (when defined, zero-filled) += d/d weight
//   static void loss_rows(const at::Tensor& logits, LossBatch& loss);
//   static at::ScalarType operand_type(at::ScalarType input);
//       the dtype in which the head kernels read hs, ts and weight (and write dhs, dts): the
//       compute type, or the input's own 16-bit type for kernels whose GEMMs take 16-bit operands
//
// Every tensor handed to them is contiguous and on the device of the inputs. hs, ts, weight, dhs and
// dts are in the operand type; logits, grad, dweight and the loss tensors in the compute type.
// The device's source file registers the operators:
//   TORCH_LIBRARY_IMPL(ncrl_kernels, <dispatch key>, m) { DeviceOps<Kernels>::register_impls(m); }
#pragma once

#include <torch/library.h>

#include "common.h"

namespace ncrl {

template <class Kernels>
struct DeviceOps {
  static at::Tensor head_forward(const at::Tensor& hs, const at::Tensor& ts, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, int64_t block_size, bool symmetric) {
    const HeadSizes s = check_head(hs, ts, weight, bias, block_size);
    const HeadInputs in = head_inputs(hs, ts, weight, Kernels::operand_type(hs.scalar_type()));
    at::Tensor logits = bias_logits(s, bias, hs.options().dtype(compute_type(hs.scalar_type())));
    Kernels::head_forward(s, in, symmetric, logits, nullptr);
    return logits.to(hs.scalar_type());
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_backward(
      const at::Tensor& grad_logits, const at::Tensor& hs, const at::Tensor& ts, const at::Tensor& weight,
      int64_t block_size, bool symmetric, bool input_grad, bool weight_grad) {
    const HeadSizes s = check_head(hs, ts, weight, std::nullopt, block_size);
    TORCH_CHECK(grad_logits.sizes() == at::IntArrayRef({s.n, s.classes}) && grad_logits.device() == hs.device(),
                "grad_logits must be [N, C] = [", s.n, ", ", s.classes, "] on ", hs.device(), ", got ",
                grad_logits.sizes(), " on ", grad_logits.device());
    const HeadInputs in = head_inputs(hs, ts, weight, Kernels::operand_type(hs.scalar_type()));
    const at::Tensor grad = to_compute(grad_logits, compute_type(hs.scalar_type()));
    at::Tensor dhs, dts, dweight;
    if (input_grad) {
      dhs = at::empty_like(in.hs);
      dts = at::empty_like(in.ts);
    }
    // Accumulated over pair tiles in the compute type, whatever the operand type.
    if (weight_grad) dweight = at::zeros(in.weight.sizes(), grad.options());
    Kernels::head_backward(s, in, grad, symmetric, dhs, dts, dweight);
    // Outputs not asked for are fresh empty tensors (outputs must not alias each other).
    const auto none = [&] { return hs.new_empty({0}); };
    return {input_grad ? dhs.to(hs.scalar_type()) : none(), input_grad ? dts.to(ts.scalar_type()) : none(),
            weight_grad ? dweight.to(weight.scalar_type()) : none(),
            weight_grad ? grad.sum(0) : grad.new_empty({0})};
  }

  static std::tuple<at::Tensor, at::Tensor> loss_forward(const at::Tensor& logits, const at::Tensor& labels,
                                                         c10::string_view loss, double gamma, bool margin_reg,
                                                         c10::string_view reduction) {
    check_loss_inputs(logits, labels);
    const Reduction red = parse_reduction(reduction);
    const auto ct = compute_type(logits.scalar_type());
    LossBatch batch = loss_batch(labels, loss, gamma, margin_reg, red, ct);
    Kernels::loss_rows(to_compute(logits, ct), batch);
    return {reduce_rows(batch.row_loss, red), batch.grad};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward(
      const at::Tensor& hs, const at::Tensor& ts, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
      const at::Tensor& labels, int64_t block_size, bool symmetric, c10::string_view loss, double gamma,
      bool margin_reg, c10::string_view reduction) {
    const HeadSizes s = check_head(hs, ts, weight, bias, block_size);
    check_labels(labels, s.n, s.classes, hs.device());
    const Reduction red = parse_reduction(reduction);
    LossBatch batch = loss_batch(labels, loss, gamma, margin_reg, red, compute_type(hs.scalar_type()));
    const HeadInputs in = head_inputs(hs, ts, weight, Kernels::operand_type(hs.scalar_type()));
    at::Tensor logits = bias_logits(s, bias, hs.options().dtype(compute_type(hs.scalar_type())));
    Kernels::head_forward(s, in, symmetric, logits, &batch);
    return {reduce_rows(batch.row_loss, red), logits.to(hs.scalar_type()), batch.grad};
  }

  static void register_impls(torch::Library& m) {
    m.impl("head_forward", &head_forward);
    m.impl("head_backward", &head_backward);
    m.impl("loss_forward", &loss_forward);
    m.impl("fused_forward", &fused_forward);
  }
};

}  // namespace ncrl
