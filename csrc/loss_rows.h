// Per-row loss math of docs/spec.md, shared by the CPU kernels and the CUDA kernels (host + device).
//
// One call handles one pair (one row of C logits): it returns the row's loss and writes
// scale * d(loss)/d(logits) for that row. The CPU runs rows on threads, the CUDA kernels run one
// row per thread; C is ~100, so a serial loop per row is cheap next to the head's GEMMs.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace ncrl {

enum class LossKind : int { NCRL = 0, ATL = 1, BCE = 2 };

struct LossParams {
  LossKind kind;
  double gamma;     // NCRL margin shift, 0 <= gamma < 1
  bool margin_reg;  // NCRL margin regulariser on the none class
};

// Stable logistic pieces from a single exp: e = exp(-|x|).
template <typename T>
struct Logistic {
  T sig;       // sigmoid(x)
  T sig_neg;   // sigmoid(-x) = 1 - sigmoid(x), without cancellation
  T sp;        // softplus(x)  = -log(1 - sigmoid(x))
  T sp_neg;    // softplus(-x) = -log(sigmoid(x))
};

template <typename T>
C10_HOST_DEVICE inline Logistic<T> logistic(T x) {
  const T e = std::exp(-std::abs(x));
  const T l1p = std::log1p(e);
  const T big = T(1) / (T(1) + e);  // sigmoid(|x|)
  const T small = e / (T(1) + e);   // sigmoid(-|x|)
  Logistic<T> r;
  r.sig = x >= T(0) ? big : small;
  r.sig_neg = x >= T(0) ? small : big;
  r.sp = (x > T(0) ? x : T(0)) + l1p;
  r.sp_neg = (x < T(0) ? -x : T(0)) + l1p;
  return r;
}

// ce(m, y; gamma) = y * pos(m) + (1 - y) * neg(m; gamma) and its derivative in m.
template <typename T>
C10_HOST_DEVICE inline T margin_ce(T m, T y, T gamma, T* dm) {
  const Logistic<T> l = logistic(m);
  T value = T(0), grad = T(0);
  if (y != T(0)) {  // pos(m) = -log s(m)
    value += y * l.sp_neg;
    grad -= y * l.sig_neg;
  }
  if (y != T(1)) {  // neg(m) = -log(min(1 - s(m) + gamma, 1))
    T neg = T(0), dneg = T(0);
    if (gamma == T(0)) {
      neg = l.sp;
      dneg = l.sig;
    } else if (l.sig > gamma) {  // at or below gamma: exactly zero loss and gradient
      const T q = l.sig_neg + gamma;
      neg = -std::log(q);
      dneg = l.sig * l.sig_neg / q;
    }
    value += (T(1) - y) * neg;
    grad += (T(1) - y) * dneg;
  }
  *dm = grad;
  return value;
}

template <typename T>
C10_HOST_DEVICE inline T ncrl_row(const T* f, const T* y, int64_t C, T gamma, bool margin_reg, T scale, T* grad) {
  const T f0 = f[0];
  T loss = T(0), grad0 = T(0), sum_rel = T(0);
  for (int64_t k = 1; k < C; ++k) {
    T d;
    loss += margin_ce(f[k] - f0, y[k], gamma, &d);
    grad[k] = d;
    grad0 -= d;
    sum_rel += f[k];
  }
  T reg_share = T(0);
  if (margin_reg) {  // ce(f0 - mean(f_1..f_K), y_0): the mean is not detached
    const T K = T(C - 1);
    T d;
    loss += margin_ce(f0 - sum_rel / K, y[0], gamma, &d);
    grad0 += d;
    reg_share = d / K;
  }
  grad[0] = scale * grad0;
  for (int64_t k = 1; k < C; ++k) grad[k] = scale * (grad[k] - reg_share);
  return loss;
}

// ATLOP: -sum_{k in pos} log softmax_P(f)_k - log softmax_Q(f)_0, P = {0} + positives,
// Q = {0} + negatives (y_0 ignored). Labels are multi-hot; a nonzero entry is a positive.
template <typename T>
C10_HOST_DEVICE inline T atl_row(const T* f, const T* y, int64_t C, T scale, T* grad) {
  T max_p = f[0], max_q = f[0], n_pos = T(0);
  for (int64_t k = 1; k < C; ++k) {
    if (y[k] != T(0)) {
      max_p = f[k] > max_p ? f[k] : max_p;
      n_pos += y[k];
    } else {
      max_q = f[k] > max_q ? f[k] : max_q;
    }
  }
  T sum_p = std::exp(f[0] - max_p), sum_q = std::exp(f[0] - max_q);
  for (int64_t k = 1; k < C; ++k) {
    if (y[k] != T(0)) sum_p += std::exp(f[k] - max_p);
    else sum_q += std::exp(f[k] - max_q);
  }
  const T lse_p = max_p + std::log(sum_p), lse_q = max_q + std::log(sum_q);
  T loss = lse_q - f[0];
  for (int64_t k = 1; k < C; ++k) {
    if (y[k] != T(0)) {
      loss += y[k] * (lse_p - f[k]);
      grad[k] = scale * (n_pos * std::exp(f[k] - lse_p) - y[k]);
    } else {
      grad[k] = scale * std::exp(f[k] - lse_q);
    }
  }
  grad[0] = scale * (n_pos * std::exp(f[0] - lse_p) + std::exp(f[0] - lse_q) - T(1));
  return loss;
}

// Binary cross-entropy with logits over columns 1..K, summed; column 0 is unused.
template <typename T>
C10_HOST_DEVICE inline T bce_row(const T* f, const T* y, int64_t C, T scale, T* grad) {
  T loss = T(0);
  grad[0] = T(0);
  for (int64_t k = 1; k < C; ++k) {
    const Logistic<T> l = logistic(f[k]);
    loss += l.sp - y[k] * f[k];
    grad[k] = scale * (l.sig - y[k]);
  }
  return loss;
}

// The row loss for any kind; `scale` multiplies the gradient (1/N for the mean reduction).
template <typename T>
C10_HOST_DEVICE inline T loss_row(const LossParams& p, const T* f, const T* y, int64_t C, T scale, T* grad) {
  switch (p.kind) {
    case LossKind::NCRL:
      return ncrl_row(f, y, C, T(p.gamma), p.margin_reg, scale, grad);
    case LossKind::ATL:
      return atl_row(f, y, C, scale, grad);
    default:
      return bce_row(f, y, C, scale, grad);
  }
}

}  // namespace ncrl
