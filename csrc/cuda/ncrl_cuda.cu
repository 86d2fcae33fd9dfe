// CUDA kernels: the group-bilinear head (forward, backward) and the losses, tiled over entity pairs
// so that memory stays bounded whatever N is. The [N, E*B] Kronecker feature is only ever built one
// [pairs-tile, groups-chunk * B*B] slice at a time, in one workspace, and the contractions of a tile
// run on cuBLAS through ATen (mm / addmm on slices). The math is the CPU kernels' (csrc/cpu), and the
// per-element pieces are the same source: features.h for the symmetric feature and its gradient,
// loss_rows.h for the loss rows.
//
// Per pair tile and chunk of consecutive groups (W_c = weight[:, g0*B*B : (g0+gs)*B*B], [C, gs*B*B]):
//   forward        features = build(hs, ts); logits_tile += features @ W_c^T
//   d hs, d ts     dX = grad_tile @ W_c; reduce dX against ts / hs per (pair, group) block
//   d weight       features = build(hs, ts); dW_c += grad_tile^T @ features
// then one thread per pair runs the loss row of the finished logits.
//
// Operand types: fp16/bf16 inputs stay 16-bit: the features are built in the input's type (products
// in fp32, rounded once, as eager autocast does) and every GEMM takes 16-bit operands on the tensor
// cores with fp32 accumulation and fp32 output (logits, dX, dW); fp32 and fp64 inputs run GEMMs of
// their own type. No copy of the weight in another type is made. The fp32 GEMMs follow PyTorch's fp32
// matmul precision exactly as an eager matmul does (ATen's cuBLAS call reads it; this file reads no
// flag): TF32 where PyTorch allows it, IEEE fp32 otherwise.
//
// Memory: one workspace of kWorkspaceBytes (32 MiB) whatever N is, holding the features (forward,
// operand type), or in the backward dX (compute type) and then the rebuilt features, which stream
// order makes safe. Tile plan: as many pairs as fit (at most N), then as many groups per chunk as
// still fit, so that small batches need few launches (N = 1024 pairs, B = 64, bf16: 3 chunks).
//
// Determinism: every output element is written by one thread or by one cuBLAS call, in a fixed
// order (tiles in sequence on one stream, fixed-order warp reductions); no atomics. cuBLAS gives
// bitwise-identical results run to run on one stream and one GPU model.
//
// Everything runs on the current stream of the inputs' device and never synchronises it.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../device_ops.h"
#include "../features.h"

namespace ncrl {
namespace {

// Upper bound of the feature workspace of one call: large enough for GEMMs that fill the GPU (4096
// pairs x one group of B = 64 in bf16), small enough to stay near L2-resident between a build and
// its GEMM.
constexpr int64_t kWorkspaceBytes = int64_t(32) << 20;

// Pair rows and consecutive groups per workspace slice.
struct TilePlan {
  int64_t rows, groups;
};

// The largest pair tile that fits the workspace with one group (at least one pair, at most N), then
// as many groups per chunk as still fit, for features of `value_bytes` bytes each.
TilePlan tile_plan(const HeadSizes& s, int64_t value_bytes) {
  const int64_t row_groups = std::max<int64_t>(kWorkspaceBytes / (s.features() * value_bytes), 1);
  const int64_t rows = std::min(s.n, row_groups);
  // (max(groups, 1): E = 0 passes the checks and has no groups, and clamp needs lo <= hi.)
  return {rows, std::clamp<int64_t>(row_groups / std::max<int64_t>(rows, 1), 1, std::max<int64_t>(s.groups, 1))};
}

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // per block: the loss rows (a thread per pair), at most for a gradient block
// Grid-stride kernels never need more blocks than this to fill a GPU; it also keeps gridDim.x in
// range for any amount of work.
constexpr int64_t kMaxBlocks = 65536;

unsigned int elementwise_blocks(int64_t work) {
  return static_cast<unsigned int>(std::min((work + kThreads - 1) / kThreads, kMaxBlocks));
}

// Threads of a feature block: a warp along j, so that it writes consecutive features, and this many
// warps along i. The indices come from the thread and block coordinates, with no per-element integer
// division (64-bit division is dozens of instructions, more than a feature's arithmetic).
constexpr int kFeatureRowsPerBlock = 8;

// One block per (pair, group) of a slice: block b builds the b-th [B, B] block of out ([rows,
// groups * B*B] row-major), pair b / groups and group b % groups of the chunk:
// out[i*B + j] = hs_i * ts_j, or max(hs_i ts_j, hs_j ts_i) when symmetric; the products in the
// accumulation type (fp32 for 16-bit inputs), rounded once to T. h and t point at the chunk's first
// column of the slice's first pair; ld is their row stride (E).
template <typename T>
__global__ void build_features_kernel(const T* __restrict__ h, const T* __restrict__ t, int64_t ld, int64_t groups,
                                      int64_t B, bool symmetric, T* __restrict__ out) {
  using A = at::opmath_type<T>;
  const int64_t col = (blockIdx.x / groups) * ld + (blockIdx.x % groups) * B;
  h += col;
  t += col;
  out += int64_t(blockIdx.x) * B * B;
  for (int64_t i = threadIdx.y; i < B; i += blockDim.y) {
    const A h_i = A(h[i]), t_i = A(t[i]);
    for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
      const A a_ij = h_i * A(t[j]);
      out[i * B + j] = static_cast<T>(symmetric ? symmetric_feature(a_ij, A(h[j]) * t_i) : a_ij);
    }
  }
}

// Q_ij = d loss / d (hs_i ts_j) of one pair and group, from its dX = d loss / d features ([B, B]).
template <typename T, typename A>
__device__ inline A product_grad(const A* dx, const T* h, const T* t, int64_t B, int64_t i, int64_t j,
                                 bool symmetric) {
  return symmetric ? symmetric_product_grad(A(h[i]) * A(t[j]), A(h[j]) * A(t[i]), dx[i * B + j] + dx[j * B + i])
                   : dx[i * B + j];
}

// One block per (pair, group) of the tile: block b is pair b / groups, group b % groups, whose dX is
// the b-th [B, B] block of the workspace ([rows, groups * B*B] row-major). In the accumulation type A:
//   dt_j = sum_i Q_ij hs_i   one thread per column j, so a warp reads consecutive dX entries
//   dh_i = sum_j Q_ij ts_j   one warp per row i, lanes over j, then a fixed-order shuffle reduction
// h, t, dh, dt point at the chunk's first column of the tile's first pair, with row stride ld.
// blockDim.x is a multiple of the warp size.
template <typename T, typename A>
__global__ void reduce_feature_grads_kernel(const A* __restrict__ dx, const T* __restrict__ h,
                                            const T* __restrict__ t, int64_t ld, int64_t groups, int64_t B,
                                            bool symmetric, T* __restrict__ dh, T* __restrict__ dt) {
  const int64_t col = (blockIdx.x / groups) * ld + (blockIdx.x % groups) * B;
  dx += int64_t(blockIdx.x) * B * B;
  h += col;
  t += col;
  dh += col;
  dt += col;
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
    A acc = A(0);
    for (int64_t i = 0; i < B; ++i) acc += product_grad(dx, h, t, B, i, j, symmetric) * A(h[i]);
    dt[j] = static_cast<T>(acc);
  }
  const int lane = threadIdx.x % kWarp;
  for (int64_t i = threadIdx.x / kWarp; i < B; i += blockDim.x / kWarp) {
    A acc = A(0);
    for (int64_t j = lane; j < B; j += kWarp) acc += product_grad(dx, h, t, B, i, j, symmetric) * A(t[j]);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) dh[i] = static_cast<T>(acc);
  }
}

// One thread per pair: the loss row of docs/spec.md (loss_rows.h), its value and scale * d/d logits.
template <typename T>
__global__ void loss_rows_kernel(LossParams params, const T* __restrict__ logits, const T* __restrict__ labels,
                                 int64_t n, int64_t C, T scale, T* __restrict__ row_loss, T* __restrict__ grad) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < n; r += int64_t(gridDim.x) * blockDim.x) {
    row_loss[r] = loss_row<T>(params, logits + r * C, labels + r * C, C, scale, grad + r * C);
  }
}

template <typename T>
void build_features(const T* h, const T* t, const HeadSizes& s, int64_t rows, int64_t groups, bool symmetric,
                    T* out) {
  if (rows * groups * s.features() == 0) return;
  // rows * groups fits the workspace (<= 2^23 blocks for B >= 1), far below gridDim.x's limit.
  build_features_kernel<T><<<static_cast<unsigned int>(rows * groups), dim3(kWarp, kFeatureRowsPerBlock), 0,
                             at::cuda::getCurrentCUDAStream()>>>(h, t, s.emb, groups, s.block, symmetric, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename A>
void reduce_feature_grads(const A* dx, const T* h, const T* t, const HeadSizes& s, int64_t rows, int64_t groups,
                          bool symmetric, T* dh, T* dt) {
  if (rows == 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, (s.block + kWarp - 1) / kWarp * kWarp));
  // rows * groups fits the workspace (<= 2^23 blocks for B >= 1), far below gridDim.x's limit.
  reduce_feature_grads_kernel<T, A>
      <<<static_cast<unsigned int>(rows * groups), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
          dx, h, t, s.emb, groups, s.block, symmetric, dh, dt);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out = a @ b, or out += a @ b when `accumulate`, on cuBLAS; out is in the compute type and may be
// a strided view (a column range of dweight). 16-bit a and b: a GEMM on the tensor cores with fp32
// accumulation written as fp32 (ATen's mm with out_dtype), never rounded to 16 bits; it has no
// beta = 1 form, so accumulating writes to `partial` (contiguous, fp32, at least out.numel() values)
// and adds that in: one small extra launch, and the sum stays fp32. Operands of out's type: one
// addmm_ (beta = 0 or 1), which writes strided views in place.
void matmul_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                 const at::Tensor& partial) {
  if (a.scalar_type() == out.scalar_type()) {
    out.addmm_(a, b, /*beta=*/accumulate ? 1 : 0);
  } else if (!accumulate) {
    at::Tensor target = out;  // at::mm_out takes a non-const handle; it writes out's memory
    at::mm_out(target, a, b, out.scalar_type());
  } else {
    at::Tensor product = partial.narrow(0, 0, out.numel()).view(out.sizes());
    at::mm_out(product, a, b, out.scalar_type());
    out.add_(product);
  }
}

// matmul_into's buffer for `numel` values of `options`' type: empty when T is its own compute type.
template <typename T>
at::Tensor partial_buffer(int64_t numel, const at::TensorOptions& options) {
  return at::empty({std::is_same_v<T, at::opmath_type<T>> ? 0 : numel}, options);
}

// x [N, C] as a [N, C] view of an [N, C'] tensor of `dtype`, C' a multiple of 8: rows that start
// on 16-byte boundaries, which cuBLAS' vectorised tensor-core kernels need. The padding columns are
// never read (every use is of the view), so they are left unset.
at::Tensor aligned_rows(const at::Tensor& x, at::ScalarType dtype) {
  const int64_t padded = (x.size(1) + 7) / 8 * 8;
  return at::empty({x.size(0), padded}, x.options().dtype(dtype)).narrow(1, 0, x.size(1)).copy_(x);
}

template <typename T>
void head_forward_tiles(const HeadSizes& s, const HeadInputs& in, bool symmetric, at::Tensor& logits) {
  if (s.n == 0 || s.groups == 0) return;  // nothing to add to the bias; tile_plan needs a real group
  const TilePlan plan = tile_plan(s, sizeof(T));
  const int64_t BB = s.features();
  const T* h = in.hs.data_ptr<T>();
  const T* t = in.ts.data_ptr<T>();
  const at::Tensor features = at::empty({plan.rows * plan.groups * BB}, in.hs.options());
  const at::Tensor partial = partial_buffer<T>(plan.rows * s.classes, logits.options());
  for (int64_t r0 = 0; r0 < s.n; r0 += plan.rows) {
    const int64_t rows = std::min(plan.rows, s.n - r0);
    const at::Tensor out = logits.narrow(0, r0, rows);
    for (int64_t g0 = 0; g0 < s.groups; g0 += plan.groups) {
      const int64_t groups = std::min(plan.groups, s.groups - g0);
      build_features(h + r0 * s.emb + g0 * s.block, t + r0 * s.emb + g0 * s.block, s, rows, groups, symmetric,
                     features.data_ptr<T>());
      // The logits hold the bias: always accumulate.
      matmul_into(out, features.narrow(0, 0, rows * groups * BB).view({rows, groups * BB}),
                  in.weight.narrow(1, g0 * BB, groups * BB).t(), /*accumulate=*/true, partial);
    }
  }
}

template <typename T>
void head_backward_tiles(const HeadSizes& s, const HeadInputs& in, const at::Tensor& grad, bool symmetric,
                         at::Tensor& dhs, at::Tensor& dts, at::Tensor& dweight) {
  using A = at::opmath_type<T>;
  // No pairs or no groups: dhs and dts are empty or zero-width, dweight stays zero.
  if (s.n == 0 || s.groups == 0) return;
  // The workspace holds dX in A, then the rebuilt features in T (no wider than A) over the same bytes.
  const TilePlan plan = tile_plan(s, sizeof(A));
  const int64_t BB = s.features();
  const T* h = in.hs.data_ptr<T>();
  const T* t = in.ts.data_ptr<T>();
  const at::Tensor workspace = at::empty({plan.rows * plan.groups * BB}, grad.options());
  const at::Tensor features = workspace.view(in.hs.scalar_type());
  const at::Tensor grad_operand = aligned_rows(grad, in.hs.scalar_type());  // the GEMMs' operand type
  // The first pair tile writes dweight (zeros until then), later tiles add to it; there are later
  // tiles only when one group fills the workspace (plan.groups == 1), so [C, B*B] values suffice.
  const at::Tensor partial = partial_buffer<T>(s.n > plan.rows ? s.classes * BB : 0, grad.options());
  for (int64_t r0 = 0; r0 < s.n; r0 += plan.rows) {
    const int64_t rows = std::min(plan.rows, s.n - r0);
    const at::Tensor grad_tile = grad_operand.narrow(0, r0, rows);
    for (int64_t g0 = 0; g0 < s.groups; g0 += plan.groups) {
      const int64_t groups = std::min(plan.groups, s.groups - g0), col = r0 * s.emb + g0 * s.block;
      const at::Tensor w_chunk = in.weight.narrow(1, g0 * BB, groups * BB);
      if (dhs.defined()) {
        matmul_into(workspace.narrow(0, 0, rows * groups * BB).view({rows, groups * BB}), grad_tile, w_chunk,
                    /*accumulate=*/false, partial);
        reduce_feature_grads(workspace.data_ptr<A>(), h + col, t + col, s, rows, groups, symmetric,
                             dhs.data_ptr<T>() + col, dts.data_ptr<T>() + col);
      }
      if (dweight.defined()) {
        build_features(h + col, t + col, s, rows, groups, symmetric, features.data_ptr<T>());
        matmul_into(dweight.narrow(1, g0 * BB, groups * BB), grad_tile.t(),
                    features.narrow(0, 0, rows * groups * BB).view({rows, groups * BB}), /*accumulate=*/r0 > 0,
                    partial);
      }
    }
  }
}

// The CUDA kernels of DeviceOps (device_ops.h).
struct CudaKernels {
  // fp16/bf16 inputs stay 16-bit for the tensor-core GEMMs; fp32 and fp64 are their own compute type.
  // fp16 runs as fp32 while torch.backends.cuda.matmul.allow_fp16_accumulation is set: cuBLAS
  // through ATen then refuses fp16 GEMMs with an fp32 result, which would raise mid-call.
  static at::ScalarType operand_type(at::ScalarType input) {
    return input == at::kHalf && at::globalContext().allowFP16AccumulationCuBLAS() ? at::kFloat : input;
  }

  static void head_forward(const HeadSizes& s, const HeadInputs& in, bool symmetric, at::Tensor& logits,
                           LossBatch* loss) {
    const c10::cuda::CUDAGuard device_guard(logits.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.hs.scalar_type(), "head_forward_cuda", [&] {
      head_forward_tiles<scalar_t>(s, in, symmetric, logits);
    });
    // The loss rows of all pairs in one launch: one thread per pair needs more pairs than a tile
    // to fill the GPU, and the logits are only [N, C].
    if (loss != nullptr) loss_rows(logits, *loss);
  }

  static void head_backward(const HeadSizes& s, const HeadInputs& in, const at::Tensor& grad, bool symmetric,
                            at::Tensor& dhs, at::Tensor& dts, at::Tensor& dweight) {
    const c10::cuda::CUDAGuard device_guard(grad.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.hs.scalar_type(), "head_backward_cuda", [&] {
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
