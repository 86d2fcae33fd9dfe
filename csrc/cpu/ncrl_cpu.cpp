// CPU kernels: the group-bilinear head (forward, backward) and the losses, tiled over entity pairs
// so that memory stays bounded whatever N is: the [N, E*B] Kronecker feature is only ever built
// one [pairs-tile, B*B] group slice at a time, per thread, and fed to a BLAS GEMM.
//
// Work split (all deterministic: every output element is produced by one thread in a fixed order):
//   forward        parallel over pair tiles; each tile sums its groups, then runs the loss rows
//   d hs, d ts     parallel over pair tiles: dX = grad @ W_g, reduced against ts / hs per pair
//   d weight       parallel over (group, feature-row chunk) units, each looping over all pair tiles
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>

#include "../device_ops.h"
#include "../features.h"

// The per-pair loops below are where the time outside BLAS goes; on x86-64 GCC/Clang they are
// compiled twice (AVX2+FMA and baseline) and the loader picks the one the CPU supports.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NCRL_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define NCRL_TARGET_CLONES
#endif

namespace ncrl {
namespace {

// at::parallel_for with the caller's thread-local state in every worker: OpenMP workers do not
// inherit it, and the ATen calls in the bodies (addmm_, mm_out) depend on it (inference mode: the
// outputs are inference tensors; the dispatcher's below-autograd keys: the inputs may require grad).
template <typename Body>
void parallel_for_with_state(int64_t begin, int64_t end, int64_t grain, const Body& body) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t first, int64_t last) {
    const at::ThreadLocalStateGuard guard(state);
    body(first, last);
  });
}

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
        for (int64_t j = 0; j < B; ++j) out[j] = symmetric_feature(hi * tr[j], hr[j] * ti);
      } else {
        for (int64_t j = 0; j < B; ++j) out[j] = hi * tr[j];
      }
    }
  }
}

// d hs and d ts of one group for `rows` pairs from Q = d loss / d (hs_i ts_j) ([rows, B, B]):
//   dh_i = sum_j Q_ij ts_j,   dt_j = sum_i Q_ij hs_i.
// Plain feature: Q = dX, the gradient of the feature, passed in `dfeat`.
// Symmetric feature: the caller passes dfeat = dX + dX^T (one GEMM with W + W^T) and Q is routed
// by symmetric_product_grad (features.h).
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
          const T q = symmetric_product_grad(hi * tr[j], hr[j] * ti, dfeat[j]);
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

// logits (compute type, [N, C], holding the bias) += sum_g features_g @ W_g^T; after each pair
// tile, `epilogue(first_row, rows)` runs on that tile's finished logits (the fused loss).
template <typename T, typename Epilogue>
void head_forward_tiles(const HeadSizes& s, const HeadInputs& in, bool symmetric, at::Tensor& logits,
                        const Epilogue& epilogue) {
  const int64_t tile = pair_tile(s.n), BB = s.features();
  const int64_t num_tiles = (s.n + tile - 1) / tile;
  const T* h = in.hs.data_ptr<T>();
  const T* t = in.ts.data_ptr<T>();
  parallel_for_with_state(0, num_tiles, 1, [&](int64_t first, int64_t last) {
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
    parallel_for_with_state(0, num_tiles, 1, [&](int64_t first, int64_t last) {
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
    parallel_for_with_state(0, s.groups * chunks, 1, [&](int64_t first, int64_t last) {
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

// Loss rows [first, first + rows) of `logits` (contiguous, compute type) into `loss`.
template <typename T>
void loss_row_range(const at::Tensor& logits, LossBatch& loss, int64_t first, int64_t rows) {
  const int64_t C = logits.size(1);
  const T scale = static_cast<T>(loss.grad_scale);
  const T* f = logits.data_ptr<T>() + first * C;
  const T* y = loss.labels.data_ptr<T>() + first * C;
  T* g = loss.grad.data_ptr<T>() + first * C;
  T* l = loss.row_loss.data_ptr<T>() + first;
  for (int64_t r = 0; r < rows; ++r) l[r] = loss_row<T>(loss.params, f + r * C, y + r * C, C, scale, g + r * C);
}

// The CPU kernels of DeviceOps (device_ops.h).
struct CpuKernels {
  // BLAS GEMMs of the compute type: fp16/bf16 inputs are read as fp32.
  static at::ScalarType operand_type(at::ScalarType input) { return compute_type(input); }

  static void head_forward(const HeadSizes& s, const HeadInputs& in, bool symmetric, at::Tensor& logits,
                           LossBatch* loss) {
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "head_forward_cpu", [&] {
      head_forward_tiles<scalar_t>(s, in, symmetric, logits, [&](int64_t first, int64_t rows) {
        if (loss != nullptr) loss_row_range<scalar_t>(logits, *loss, first, rows);
      });
    });
  }

  static void head_backward(const HeadSizes& s, const HeadInputs& in, const at::Tensor& grad, bool symmetric,
                            at::Tensor& dhs, at::Tensor& dts, at::Tensor& dweight) {
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "head_backward_cpu", [&] {
      head_backward_tiles<scalar_t>(s, in, grad, symmetric, dhs, dts, dweight);
    });
  }

  static void loss_rows(const at::Tensor& logits, LossBatch& loss) {
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "loss_forward_cpu", [&] {
      parallel_for_with_state(0, logits.size(0), 256, [&](int64_t first, int64_t last) {
        loss_row_range<scalar_t>(logits, loss, first, last - first);
      });
    });
  }
};

}  // namespace
}  // namespace ncrl

TORCH_LIBRARY_IMPL(ncrl_kernels, CPU, m) {
  ncrl::DeviceOps<ncrl::CpuKernels>::register_impls(m);
}
