// The symmetric group-bilinear feature and how its gradient routes back to the products, shared by
// the CPU and the CUDA kernels (host + device), like the loss rows in loss_rows.h.
//
// With a_ij = hs_i * ts_j (i, j < B within one group), the plain feature is X_ij = a_ij; the
// symmetric one (docs/spec.md) is X_ij = max(a_ij, a_ji), i.e. torch.maximum(bl, bl.transpose(2, 3)).
#pragma once

#include <c10/macros/Macros.h>

namespace ncrl {

// X_ij = max(a_ij, a_ji), in the argument order of std::max.
template <typename T>
C10_HOST_DEVICE inline T symmetric_feature(T a_ij, T a_ji) {
  return a_ij < a_ji ? a_ji : a_ij;
}

// d loss / d a_ij for the symmetric feature, given dx_sum = dx_ij + dx_ji, the gradients of the
// two features X_ij = maximum(a_ij, a_ji) and X_ji = maximum(a_ji, a_ij) that a_ij enters.
// a_ij takes both when it is the larger product, none when it is the smaller, and half of both on a
// tie, as torch.maximum splits ties. On the diagonal (i == j) that is half of 2 dx_ii: the full
// gradient. (The CPU kernels get dx_sum for all (i, j) from one GEMM with W + W^T.)
template <typename T>
C10_HOST_DEVICE inline T symmetric_product_grad(T a_ij, T a_ji, T dx_sum) {
  return a_ij > a_ji ? dx_sum : (a_ij < a_ji ? T(0) : T(0.5) * dx_sum);
}

}  // namespace ncrl
