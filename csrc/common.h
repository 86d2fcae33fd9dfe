// Declarations shared by the operator schemas (ops.cpp), the CPU kernels and the CUDA kernels.
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
void check_loss_inputs(const at::Tensor& logits, const at::Tensor& labels);

// Gradient scale of the loss rows: 1/N for "mean" (0 rows: any value, nothing is scaled).
double row_grad_scale(Reduction reduction, int64_t n);
// Per-row losses [N] -> the reduced loss (mean divides by N, and is 0 when N == 0).
at::Tensor reduce_rows(const at::Tensor& row_loss, Reduction reduction);

// CPU kernels (csrc/cpu).
at::Tensor head_forward_cpu(const at::Tensor& hs, const at::Tensor& ts, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t block_size, bool symmetric);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_backward_cpu(
    const at::Tensor& grad_logits, const at::Tensor& hs, const at::Tensor& ts, const at::Tensor& weight,
    int64_t block_size, bool symmetric, bool input_grad, bool weight_grad);
std::tuple<at::Tensor, at::Tensor> loss_forward_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                    c10::string_view loss, double gamma, bool margin_reg,
                                                    c10::string_view reduction);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cpu(
    const at::Tensor& hs, const at::Tensor& ts, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t block_size, bool symmetric, c10::string_view loss, double gamma,
    bool margin_reg, c10::string_view reduction);

}  // namespace ncrl
