// CUDA kernels: the group-bilinear head (forward, backward) and the losses, tiled over entity pairs
// so that memory stays bounded whatever N is. The [N, E*B] Kronecker feature is only ever built one
// [pairs-tile, B*B] group slice at a time, in one workspace, and the contractions of a tile run on
// cuBLAS through ATen (addmm / mm on slices). The math is the CPU kernels' (csrc/cpu), and the
// per-element pieces are the same source: features.h for the symmetric feature and its gradient,
// loss_rows.h for the loss rows.
//
// Per pair tile and group g (W_g = weight[:, g*B*B : (g+1)*B*B], a [C, B*B] slice):
//   forward        features = build(hs, ts); logits_tile += features @ W_g^T
//   d hs, d ts     dX = grad_tile @ W_g; reduce dX against ts / hs per pair (one block per pair)
//   d weight       features = build(hs, ts); dW_g += grad_tile^T @ features
// then one thread per pair runs the loss row of the finished logits.
//
// Memory: one workspace of tile * B*B compute-type values, with the tile chosen so that it holds
// at most kWorkspaceBytes (32 MiB: 2048 pairs for B = 64 in fp32), whatever N is. The backward
// reuses it for dX and then for the features (stream order makes that safe).
//
// Determinism: every output element is written by one thread or by one cuBLAS call, in a fixed
// order (tiles in sequence on one stream, fixed-order warp reductions); no atomics. cuBLAS gives
// bitwise-identical results run to run on one stream and one GPU model.
//
// Everything runs on the current stream of the inputs' device and never synchronises it.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../device_ops.h"
#include "../features.h"

namespace ncrl {
namespace {

// Upper bound of the feature workspace of one call; large enough that a tile (2048 pairs for
// B = 64 in fp32) gives cuBLAS GEMMs that fill the GPU.
constexpr int64_t kWorkspaceBytes = int64_t(32) << 20;

// Pairs per tile: as many as fit in the workspace (at least one), at most N.
int64_t pair_tile(const HeadSizes& s, int64_t value_bytes) {
  const int64_t fit = kWorkspaceBytes / (s.features() * value_bytes);
  return std::min(s.n, std::max<int64_t>(fit, 1));
}

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // element-wise kernels
// Grid-stride kernels never need more blocks than this to fill a GPU; it also keeps gridDim.x in
// range for any amount of work.
constexpr int64_t kMaxBlocks = 65536;

unsigned int elementwise_blocks(int64_t work) {
  return static_cast<unsigned int>(std::min((work + kThreads - 1) / kThreads, kMaxBlocks));
}

// out[r, i*B + j] = feature of pair r at (i, j) for `rows` pairs of one group: hs_i * ts_j, or
// max(hs_i ts_j, hs_j ts_i) when symmetric. h and t point at the group's first column of the first
// pair; ld is their row stride (E).
template <typename T>
__global__ void build_features_kernel(const T* __restrict__ h, const T* __restrict__ t, int64_t ld, int64_t rows,
                                      int64_t B, bool symmetric, T* __restrict__ out) {
  const int64_t BB = B * B, total = rows * BB;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = k / BB, i = (k % BB) / B, j = k % B;
    const T* hr = h + r * ld;
    const T* tr = t + r * ld;
    const T a_ij = hr[i] * tr[j];
    out[k] = symmetric ? symmetric_feature(a_ij, hr[j] * tr[i]) : a_ij;
  }
}

// Q_ij = d loss / d (hs_i ts_j) of one pair, from its dX = d loss / d features ([B, B]).
template <typename T>
__device__ inline T product_grad(const T* dx, const T* h, const T* t, int64_t B, int64_t i, int64_t j,
                                 bool symmetric) {
  return symmetric ? symmetric_product_grad(h[i] * t[j], h[j] * t[i], dx[i * B + j] + dx[j * B + i])
                   : dx[i * B + j];
}

// One block per pair of the tile, for one group:
//   dt_j = sum_i Q_ij hs_i   one thread per column j, so a warp reads consecutive dX entries
//   dh_i = sum_j Q_ij ts_j   one warp per row i, lanes over j, then a fixed-order shuffle reduction
// dX holds the tile's pairs in consecutive [B, B] blocks; h, t, dh, dt point at the group's first
// column of the tile's first pair, with row stride ld. blockDim.x is a multiple of the warp size.
template <typename T>
__global__ void reduce_feature_grads_kernel(const T* __restrict__ dx, const T* __restrict__ h,
                                            const T* __restrict__ t, int64_t ld, int64_t B, bool symmetric,
                                            T* __restrict__ dh, T* __restrict__ dt) {
  const int64_t r = blockIdx.x;
  dx += r * B * B;
  h += r * ld;
  t += r * ld;
  dh += r * ld;
  dt += r * ld;
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
    T acc = T(0);
    for (int64_t i = 0; i < B; ++i) acc += product_grad(dx, h, t, B, i, j, symmetric) * h[i];
    dt[j] = acc;
  }
  const int lane = threadIdx.x % kWarp;
  for (int64_t i = threadIdx.x / kWarp; i < B; i += blockDim.x / kWarp) {
    T acc = T(0);
    for (int64_t j = lane; j < B; j += kWarp) acc += product_grad(dx, h, t, B, i, j, symmetric) * t[j];
    for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) dh[i] = acc;
  }
}

// One thread per pair: the loss row of SPEC.md (loss_rows.h), its value and scale * d/d logits.
template <typename T>
__global__ void loss_rows_kernel(LossParams params, const T* __restrict__ logits, const T* __restrict__ labels,
                                 int64_t n, int64_t C, T scale, T* __restrict__ row_loss, T* __restrict__ grad) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < n; r += int64_t(gridDim.x) * blockDim.x) {
    row_loss[r] = loss_row<T>(params, logits + r * C, labels + r * C, C, scale, grad + r * C);
  }
}

template <typename T>
void build_features(const T* h, const T* t, const HeadSizes& s, int64_t rows, bool symmetric, T* out) {
  const int64_t work = rows * s.features();
  if (work == 0) return;
  build_features_kernel<T><<<elementwise_blocks(work), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      h, t, s.emb, rows, s.block, symmetric, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void reduce_feature_grads(const T* dx, const T* h, const T* t, const HeadSizes& s, int64_t rows, bool symmetric,
                          T* dh, T* dt) {
  if (rows == 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, (s.block + kWarp - 1) / kWarp * kWarp));
  // rows <= the pair tile, far below the 2^31 - 1 limit of gridDim.x.
  reduce_feature_grads_kernel<T><<<static_cast<unsigned int>(rows), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      dx, h, t, s.emb, s.block, symmetric, dh, dt);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void head_forward_tiles(const HeadSizes& s, const HeadInputs& in, bool symmetric, at::Tensor& logits) {
  const int64_t tile = pair_tile(s, sizeof(T)), BB = s.features();
  const T* h = in.hs.data_ptr<T>();
  const T* t = in.ts.data_ptr<T>();
  at::Tensor features = at::empty({tile, BB}, logits.options());
  for (int64_t r0 = 0; r0 < s.n; r0 += tile) {
    const int64_t rows = std::min(tile, s.n - r0);
    at::Tensor out = logits.narrow(0, r0, rows);
    at::Tensor x = features.narrow(0, 0, rows);
    for (int64_t g = 0; g < s.groups; ++g) {
      const int64_t col = r0 * s.emb + g * s.block;
      build_features(h + col, t + col, s, rows, symmetric, features.data_ptr<T>());
      out.addmm_(x, in.weight.narrow(1, g * BB, BB).t());
    }
  }
}

template <typename T>
void head_backward_tiles(const HeadSizes& s, const HeadInputs& in, const at::Tensor& grad, bool symmetric,
                         at::Tensor& dhs, at::Tensor& dts, at::Tensor& dweight) {
  const int64_t tile = pair_tile(s, sizeof(T)), BB = s.features();
  const T* h = in.hs.data_ptr<T>();
  const T* t = in.ts.data_ptr<T>();
  at::Tensor workspace = at::empty({tile, BB}, grad.options());
  for (int64_t r0 = 0; r0 < s.n; r0 += tile) {
    const int64_t rows = std::min(tile, s.n - r0);
    const at::Tensor grad_tile = grad.narrow(0, r0, rows);
    at::Tensor ws = workspace.narrow(0, 0, rows);
    for (int64_t g = 0; g < s.groups; ++g) {
      const int64_t col = r0 * s.emb + g * s.block;
      const at::Tensor w_g = in.weight.narrow(1, g * BB, BB);
      if (dhs.defined()) {
        at::mm_out(ws, grad_tile, w_g);  // dX of the tile
        reduce_feature_grads(workspace.data_ptr<T>(), h + col, t + col, s, rows, symmetric, dhs.data_ptr<T>() + col,
                             dts.data_ptr<T>() + col);
      }
      if (dweight.defined()) {
        build_features(h + col, t + col, s, rows, symmetric, workspace.data_ptr<T>());
        dweight.narrow(1, g * BB, BB).addmm_(grad_tile.t(), ws);
      }
    }
  }
}

// The CUDA kernels of DeviceOps (device_ops.h).
struct CudaKernels {
  static void head_forward(const HeadSizes& s, const HeadInputs& in, bool symmetric, at::Tensor& logits,
                           LossBatch* loss) {
    const c10::cuda::CUDAGuard device_guard(logits.device());
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "head_forward_cuda", [&] {
      head_forward_tiles<scalar_t>(s, in, symmetric, logits);
    });
    // The loss rows of all pairs in one launch: one thread per pair needs more pairs than a tile
    // to fill the GPU, and the logits are only [N, C].
    if (loss != nullptr) loss_rows(logits, *loss);
  }

  static void head_backward(const HeadSizes& s, const HeadInputs& in, const at::Tensor& grad, bool symmetric,
                            at::Tensor& dhs, at::Tensor& dts, at::Tensor& dweight) {
    const c10::cuda::CUDAGuard device_guard(grad.device());
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "head_backward_cuda", [&] {
      head_backward_tiles<scalar_t>(s, in, grad, symmetric, dhs, dts, dweight);
    });
  }

  static void loss_rows(const at::Tensor& logits, LossBatch& loss) {
    const c10::cuda::CUDAGuard device_guard(logits.device());
    const int64_t n = logits.size(0), C = logits.size(1);
    if (n == 0) return;
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "loss_forward_cuda", [&] {
      loss_rows_kernel<scalar_t><<<elementwise_blocks(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          loss.params, logits.data_ptr<scalar_t>(), loss.labels.data_ptr<scalar_t>(), n, C,
          static_cast<scalar_t>(loss.grad_scale), loss.row_loss.data_ptr<scalar_t>(), loss.grad.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace
}  // namespace ncrl

TORCH_LIBRARY_IMPL(ncrl_kernels, CUDA, m) {
  ncrl::DeviceOps<ncrl::CudaKernels>::register_impls(m);
}
