// Declarations shared by the operator schemas and helpers (ops.cpp), the device-independent operator
// bodies (device_ops.h), the CPU kernels and the CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "loss_rows.h"

namespace ncrl {

enum class Reduction { Mean, Sum, None };

LossParams parse_loss(c10::string_view loss, double gamma, bool margin_reg);
Reduction parse_reduction(c10::string_view reduction);

// fp64 inputs compute in fp64 (gradcheck); everything else accumulates in fp32.
inline at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Sizes of the group-bilinear head, checked (the Python API validates first; these checks keep
// direct torch.ops calls memory-safe).
struct HeadSizes {
  int64_t n, emb, block, groups, classes;
  int64_t features() const { return block * block; }  // Kronecker features per group
};
HeadSizes check_head(const at::Tensor& hs, const at::Tensor& ts, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, int64_t block_size);
// Multi-hot labels of n pairs and `classes` classes (C >= 2), on `device`.
void check_labels(const at::Tensor& labels, int64_t n, int64_t classes, const at::Device& device);
void check_loss_inputs(const at::Tensor& logits, const at::Tensor& labels);

// Gradient scale of the loss rows: 1/N for "mean" (0 rows: any value, nothing is scaled).
double row_grad_scale(Reduction reduction, int64_t n);
// Per-row losses [N] -> the reduced loss (mean divides by N, and is 0 when N == 0).
at::Tensor reduce_rows(const at::Tensor& row_loss, Reduction reduction);

// A tensor as the kernels read it: contiguous, in the compute type `ct`.
at::Tensor to_compute(const at::Tensor& x, at::ScalarType ct);

// hs, ts and weight as the head kernels read them: contiguous, in the kernels' operand type
// (DeviceOps' Kernels::operand_type; a no-op for inputs already in it).
struct HeadInputs {
  at::Tensor hs, ts, weight;
};
HeadInputs head_inputs(const at::Tensor& hs, const at::Tensor& ts, const at::Tensor& weight,
                       at::ScalarType operand_type);

// Logits [N, C] with `options` (the compute type) holding the bias, or zeros: the head kernels add
// the group-bilinear terms to them.
at::Tensor bias_logits(const HeadSizes& s, const std::optional<at::Tensor>& bias, const at::TensorOptions& options);

// The loss rows of a batch: what loss_row (loss_rows.h) reads and the outputs it fills.
struct LossBatch {
  LossParams params;
  double grad_scale;    // multiplies d loss / d logits: 1/N for the mean reduction
  at::Tensor labels;    // [N, C], contiguous, compute type
  at::Tensor row_loss;  // [N], out
  at::Tensor grad;      // [N, C], out: grad_scale * d loss / d logits
};
// Parses the loss arguments and allocates the outputs for `labels`' rows in the compute type `ct`.
LossBatch loss_batch(const at::Tensor& labels, c10::string_view loss, double gamma, bool margin_reg,
                     Reduction reduction, at::ScalarType ct);

}  // namespace ncrl
