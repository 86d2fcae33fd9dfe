// CPU kernels: the group-bilinear head (forward, backward) and the losses, tiled over entity pairs
// so that memory stays bounded whatever N is: the [N, E*B] Kronecker feature is only ever built
// one [pairs-tile, B*B] group slice at a time, per thread, and fed to a BLAS GEMM.
//
// Work split (all deterministic: every output element is produced by one thread in a fixed order):
//   forward        parallel over pair tiles; each tile sums its groups, then runs the loss rows
//   d hs, d ts     parallel over pair tiles: dX = grad @ W_g, reduced against ts / hs per pair
//   d weight       parallel over (group, feature-row chunk) units, each looping over all pair tiles
#include <ATen/Parallel.h>

#include <algorithm>

#include "../common.h"

// The per-pair loops below are where the time outside BLAS goes; on x86-64 GCC/Clang they are
// compiled twice (AVX2+FMA and baseline) and the loader picks the one the CPU supports.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NCRL_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define NCRL_TARGET_CLONES
#endif

namespace ncrl {
namespace {

// Rows per pair tile: enough tiles for every thread, at most 256 rows so that one group's feature
// tile ([256, B*B] fp32, 4 MiB for B = 64) stays cache-resident between its build and its GEMM.
int64_t pair_tile(int64_t n) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = (n + threads - 1) / threads;
  return std::clamp<int64_t>((per_thread + 15) / 16 * 16, 16, 256);
}

// Feature rows i in [i0, i1) of one group for `rows` pairs:
//   out[r, i - i0, j] = hs[r, i] * ts[r, j]           (symmetric: max(hs_i * ts_j, hs_j * ts_i))
// h and t point at the group's first column of the first pair; ld is their row stride (E).
template <typename T>
inline __attribute__((always_inline)) void build_features_impl(const T* h, const T* t, int64_t ld, int64_t rows,
                                                               int64_t B, int64_t i0, int64_t i1, bool symmetric,
                                                               T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* hr = h + r * ld;
    const T* tr = t + r * ld;
    for (int64_t i = i0; i < i1; ++i, out += B) {
      const T hi = hr[i], ti = tr[i];
      if (symmetric) {
        for (int64_t j = 0; j < B; ++j) out[j] = std::max(hi * tr[j], hr[j] * ti);
      } else {
        for (int64_t j = 0; j < B; ++j) out[j] = hi * tr[j];
      }
    }
  }
}

// d hs and d ts of one group for `rows` pairs from Q = d loss / d (hs_i ts_j) ([rows, B, B]):
//   dh_i = sum_j Q_ij ts_j,   dt_j = sum_i Q_ij hs_i.
// Plain feature: Q = dX, the gradient of the feature, passed in `dfeat`.
// Symmetric feature max(a_ij, a_ji), a_ij = hs_i ts_j: the product a_ij receives dX_ij when it is
// the larger one in feature (i, j) and dX_ji when it is the larger one in feature (j, i); half of
// each on a tie (as torch.maximum), so Q_ij = w_ij (dX_ij + dX_ji) with w_ij = 1, 1/2 or 0 as
// a_ij >, =, < a_ji. The caller passes dfeat = dX + dX^T (one GEMM with the symmetrised weight).
// On the diagonal w = 1/2 and dX + dX^T = 2 dX: the full gradient, as SPEC.md requires.
template <typename T>
inline __attribute__((always_inline)) void reduce_feature_grads_impl(const T* dfeat, const T* h, const T* t,
                                                                     int64_t ld, int64_t rows, int64_t B,
                                                                     bool symmetric, T* dh, T* dt) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* hr = h + r * ld;
    const T* tr = t + r * ld;
    T* dhr = dh + r * ld;
    T* dtr = dt + r * ld;
    for (int64_t j = 0; j < B; ++j) dtr[j] = T(0);
    for (int64_t i = 0; i < B; ++i, dfeat += B) {
      const T hi = hr[i], ti = tr[i];
      T acc = T(0);
      if (symmetric) {
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < B; ++j) {
          const T a = hi * tr[j], b = hr[j] * ti;
          const T q = a > b ? dfeat[j] : (a < b ? T(0) : T(0.5) * dfeat[j]);
          acc += q * tr[j];
          dtr[j] += q * hi;
        }
      } else {
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < B; ++j) {
          acc += dfeat[j] * tr[j];
          dtr[j] += dfeat[j] * hi;
        }
      }
      dhr[i] = acc;
    }
  }
}

NCRL_TARGET_CLONES void build_features(const float* h, const float* t, int64_t ld, int64_t rows, int64_t B,
                                       int64_t i0, int64_t i1, bool symmetric, float* out) {
  build_features_impl(h, t, ld, rows, B, i0, i1, symmetric, out);
}
void build_features(const double* h, const double* t, int64_t ld, int64_t rows, int64_t B, int64_t i0, int64_t i1,
                    bool symmetric, double* out) {
  build_features_impl(h, t, ld, rows, B, i0, i1, symmetric, out);
}
NCRL_TARGET_CLONES void reduce_feature_grads(const float* dfeat, const float* h, const float* t, int64_t ld,
                                             int64_t rows, int64_t B, bool symmetric, float* dh, float* dt) {
  reduce_feature_grads_impl(dfeat, h, t, ld, rows, B, symmetric, dh, dt);
}
void reduce_feature_grads(const double* dfeat, const double* h, const double* t, int64_t ld, int64_t rows, int64_t B,
                          bool symmetric, double* dh, double* dt) {
  reduce_feature_grads_impl(dfeat, h, t, ld, rows, B, symmetric, dh, dt);
}

// A tensor as the kernels read it: contiguous, in the compute type, and detached, because the
// ATen calls inside at::parallel_for run on worker threads that do not inherit the dispatcher's
// below-autograd state, and out= ops refuse arguments that require grad.
at::Tensor to_compute(const at::Tensor& x, at::ScalarType ct) {
  return x.detach().to(ct).contiguous();
}

struct HeadInputs {
  at::Tensor hs, ts, weight;
};
HeadInputs to_compute(const at::Tensor& hs, const at::Tensor& ts, const at::Tensor& weight) {
  const auto ct = compute_type(hs.scalar_type());
  return {to_compute(hs, ct), to_compute(ts, ct), to_compute(weight, ct)};
}

// logits (compute type, [N, C]) = bias + sum_g features_g @ W_g^T; after each pair tile,
// `epilogue(first_row, rows)` runs on that tile's finished logits (the fused loss).
template <typename T, typename Epilogue>
void head_forward_tiles(const HeadSizes& s, const HeadInputs& in, const std::optional<at::Tensor>& bias,
                        bool symmetric, at::Tensor& logits, const Epilogue& epilogue) {
  const int64_t tile = pair_tile(s.n), BB = s.features();
  const int64_t num_tiles = (s.n + tile - 1) / tile;
  const T* h = in.hs.data_ptr<T>();
  const T* t = in.ts.data_ptr<T>();
  if (bias.has_value()) {
    logits.copy_(bias->detach().to(logits.scalar_type()).unsqueeze(0).expand_as(logits));
  } else {
    logits.zero_();
  }
  at::parallel_for(0, num_tiles, 1, [&](int64_t first, int64_t last) {
    at::Tensor features = at::empty({tile, BB}, logits.options());
    for (int64_t k = first; k < last; ++k) {
      const int64_t r0 = k * tile, rows = std::min(tile, s.n - r0);
      at::Tensor out = logits.narrow(0, r0, rows);
      at::Tensor x = features.narrow(0, 0, rows);
      for (int64_t g = 0; g < s.groups; ++g) {
        const int64_t col = r0 * s.emb + g * s.block;
        build_features(h + col, t + col, s.emb, rows, s.block, 0, s.block, symmetric, features.data_ptr<T>());
        out.addmm_(x, in.weight.narrow(1, g * BB, BB).t());
      }
      epilogue(r0, rows);
    }
  });
}

template <typename T>
void head_backward_tiles(const HeadSizes& s, const HeadInputs& in, const at::Tensor& grad, bool symmetric,
                         at::Tensor& dhs, at::Tensor& dts, at::Tensor& dweight) {
  const int64_t tile = pair_tile(s.n), BB = s.features();
  const int64_t num_tiles = (s.n + tile - 1) / tile;
  const T* h = in.hs.data_ptr<T>();
  const T* t = in.ts.data_ptr<T>();
  if (dhs.defined()) {
    // Symmetric: W + W^T within each class's B x B blocks, so that one GEMM gives dX + dX^T.
    at::Tensor w = in.weight;
    if (symmetric) {
      const at::Tensor blocks = w.view({s.classes, s.groups, s.block, s.block});
      w = (blocks + blocks.transpose(2, 3)).reshape({s.classes, s.emb * s.block});
    }
    at::parallel_for(0, num_tiles, 1, [&](int64_t first, int64_t last) {
      at::Tensor dfeat = at::empty({tile, BB}, grad.options());
      for (int64_t k = first; k < last; ++k) {
        const int64_t r0 = k * tile, rows = std::min(tile, s.n - r0);
        at::Tensor dx = dfeat.narrow(0, 0, rows);
        for (int64_t g = 0; g < s.groups; ++g) {
          at::mm_out(dx, grad.narrow(0, r0, rows), w.narrow(1, g * BB, BB));
          const int64_t col = r0 * s.emb + g * s.block;
          reduce_feature_grads(dfeat.data_ptr<T>(), h + col, t + col, s.emb, rows, s.block, symmetric,
                               dhs.data_ptr<T>() + col, dts.data_ptr<T>() + col);
        }
      }
    });
  }
  if (dweight.defined()) {
    // Split each group's B feature rows into chunks when there are few groups for the threads.
    int64_t chunk = s.block;
    while (s.groups * (s.block / chunk) < 4 * at::get_num_threads() && chunk % 2 == 0 && chunk > 8) chunk /= 2;
    const int64_t chunks = s.block / chunk;
    at::parallel_for(0, s.groups * chunks, 1, [&](int64_t first, int64_t last) {
      at::Tensor features = at::empty({tile, chunk * s.block}, grad.options());
      for (int64_t u = first; u < last; ++u) {
        const int64_t g = u / chunks, i0 = (u % chunks) * chunk;
        at::Tensor dw = dweight.narrow(1, g * BB + i0 * s.block, chunk * s.block);
        for (int64_t r0 = 0; r0 < s.n; r0 += tile) {
          const int64_t rows = std::min(tile, s.n - r0), col = r0 * s.emb + g * s.block;
          build_features(h + col, t + col, s.emb, rows, s.block, i0, i0 + chunk, symmetric, features.data_ptr<T>());
          dw.addmm_(grad.narrow(0, r0, rows).t(), features.narrow(0, 0, rows));
        }
      }
    });
  }
}

// Loss rows [first, first + rows) of (logits, labels), both contiguous in the compute type.
template <typename T>
void loss_rows(const LossParams& p, const at::Tensor& logits, const at::Tensor& labels, T scale, int64_t first,
               int64_t rows, at::Tensor& row_loss, at::Tensor& grad) {
  const int64_t C = logits.size(1);
  const T* f = logits.data_ptr<T>() + first * C;
  const T* y = labels.data_ptr<T>() + first * C;
  T* g = grad.data_ptr<T>() + first * C;
  T* l = row_loss.data_ptr<T>() + first;
  for (int64_t r = 0; r < rows; ++r) l[r] = loss_row<T>(p, f + r * C, y + r * C, C, scale, g + r * C);
}

}  // namespace

at::Tensor head_forward_cpu(const at::Tensor& hs, const at::Tensor& ts, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t block_size, bool symmetric) {
  const HeadSizes s = check_head(hs, ts, weight, bias, block_size);
  const HeadInputs in = to_compute(hs, ts, weight);
  at::Tensor logits = at::empty({s.n, s.classes}, in.hs.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "head_forward_cpu", [&] {
    head_forward_tiles<scalar_t>(s, in, bias, symmetric, logits, [](int64_t, int64_t) {});
  });
  return logits.to(hs.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_backward_cpu(
    const at::Tensor& grad_logits, const at::Tensor& hs, const at::Tensor& ts, const at::Tensor& weight,
    int64_t block_size, bool symmetric, bool input_grad, bool weight_grad) {
  const HeadSizes s = check_head(hs, ts, weight, std::nullopt, block_size);
  TORCH_CHECK(grad_logits.sizes() == at::IntArrayRef({s.n, s.classes}), "grad_logits must be [N, C]");
  const HeadInputs in = to_compute(hs, ts, weight);
  const at::Tensor grad = to_compute(grad_logits, in.hs.scalar_type());
  at::Tensor dhs, dts, dweight;
  if (input_grad) {
    dhs = at::empty_like(in.hs);
    dts = at::empty_like(in.ts);
  }
  if (weight_grad) dweight = at::zeros_like(in.weight);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "head_backward_cpu", [&] {
    head_backward_tiles<scalar_t>(s, in, grad, symmetric, dhs, dts, dweight);
  });
  // Outputs not asked for are fresh empty tensors (outputs must not alias each other).
  const auto none = [&] { return hs.new_empty({0}); };
  return {input_grad ? dhs.to(hs.scalar_type()) : none(), input_grad ? dts.to(ts.scalar_type()) : none(),
          weight_grad ? dweight.to(weight.scalar_type()) : none(),
          weight_grad ? grad.sum(0) : grad.new_empty({0})};
}

std::tuple<at::Tensor, at::Tensor> loss_forward_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                    c10::string_view loss, double gamma, bool margin_reg,
                                                    c10::string_view reduction) {
  check_loss_inputs(logits, labels);
  const LossParams p = parse_loss(loss, gamma, margin_reg);
  const Reduction red = parse_reduction(reduction);
  const auto ct = compute_type(logits.scalar_type());
  const at::Tensor f = to_compute(logits, ct), y = to_compute(labels, ct);
  const int64_t n = f.size(0);
  at::Tensor row_loss = at::empty({n}, f.options()), grad = at::empty_like(f);
  AT_DISPATCH_FLOATING_TYPES(ct, "loss_forward_cpu", [&] {
    const scalar_t scale = static_cast<scalar_t>(row_grad_scale(red, n));
    at::parallel_for(0, n, 256, [&](int64_t first, int64_t last) {
      loss_rows<scalar_t>(p, f, y, scale, first, last - first, row_loss, grad);
    });
  });
  return {reduce_rows(row_loss, red), grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cpu(
    const at::Tensor& hs, const at::Tensor& ts, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t block_size, bool symmetric, c10::string_view loss, double gamma,
    bool margin_reg, c10::string_view reduction) {
  const HeadSizes s = check_head(hs, ts, weight, bias, block_size);
  TORCH_CHECK(s.classes >= 2 && labels.sizes() == at::IntArrayRef({s.n, s.classes}), "labels must be [N, C], C >= 2");
  const LossParams p = parse_loss(loss, gamma, margin_reg);
  const Reduction red = parse_reduction(reduction);
  const HeadInputs in = to_compute(hs, ts, weight);
  const at::Tensor y = to_compute(labels, in.hs.scalar_type());
  at::Tensor logits = at::empty({s.n, s.classes}, in.hs.options());
  at::Tensor row_loss = at::empty({s.n}, logits.options()), grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "fused_forward_cpu", [&] {
    const scalar_t scale = static_cast<scalar_t>(row_grad_scale(red, s.n));
    head_forward_tiles<scalar_t>(s, in, bias, symmetric, logits, [&](int64_t first, int64_t rows) {
      loss_rows<scalar_t>(p, logits, y, scale, first, rows, row_loss, grad);
    });
  });
  return {reduce_rows(row_loss, red), logits.to(hs.scalar_type()), grad};
}

}  // namespace ncrl
