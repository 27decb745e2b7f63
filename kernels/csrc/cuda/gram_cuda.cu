// CUDA kernels of the fused Gram / style-loss operator.
//
// The O(B*C^2*N) GEMMs go through ATen (cuBLAS) exactly as on the CPU, in gram.cpp's
// gram_upper_panels / sym_times_features. This file holds the O(B*C^2) epilogues, each a
// single kernel on the current stream:
//   * residual_epilogue: R = s*sym(G_raw) - A and the loss mean(R^2). Blocks write partial
//     sums; the last block to finish (threadfence + ticket counter) adds them in a fixed
//     order, so the loss is deterministic and needs no second kernel. The ticket counter
//     is a 4-byte cudaMemsetAsync on the same stream, not a kernel.
//   * gram_epilogue: out = s*sym(G_raw) in the features' dtype.
//   * symmetrise: M = alpha * g * (X + X^T) in the GEMM dtype, where g (the incoming
//     gradient of the loss) is read on the device, so the backward never synchronises.
// Per-position weights (gram.h) are two elementwise ATen passes on the same stream: F diag(w)
// before the forward GEMM, dF *= w^2 after the backward GEMM.

#include "../gram.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <tuple>

namespace gramstyle {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>(kMaxBlocks, (n + kThreads - 1) / kThreads));
}

// Value of s * sym(G_raw)[b, r, c]: from (r, c) when that entry was computed, else (c, r).
template <typename acc_t>
__device__ __forceinline__ acc_t sym_value(const acc_t* __restrict__ G, int64_t b, int64_t r,
                                           int64_t c, int64_t C, int64_t width) {
  const acc_t* Gb = G + b * C * C;
  return in_upper_panels(r, c, width) ? Gb[r * C + c] : Gb[c * C + r];
}

__device__ __forceinline__ double block_reduce_sum(double v) {
  __shared__ double shared[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : 0.0;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;  // valid in thread 0
}

template <typename acc_t>
__global__ void residual_epilogue_kernel(const acc_t* __restrict__ G, const acc_t* __restrict__ A,
                                         int64_t a_bstride, acc_t* __restrict__ R,
                                         acc_t* __restrict__ loss, double* __restrict__ partials,
                                         unsigned int* __restrict__ ticket, int64_t B, int64_t C,
                                         int64_t width, acc_t s) {
  const int64_t total = B * C * C;
  double sum = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = i / (C * C), rc = i % (C * C), r = rc / C, c = rc % C;
    const acc_t v = s * sym_value(G, b, r, c, C, width) - A[b * a_bstride + rc];
    R[i] = v;
    sum += static_cast<double>(v) * v;
  }
  sum = block_reduce_sum(sum);
  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = sum;
    __threadfence();  // make the partial visible before taking a ticket
    is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (is_last && threadIdx.x == 0) {
    __threadfence();
    double t = 0.0;
    // __ldcg: read the other blocks' partials from L2, never from a stale L1 line.
    for (unsigned int k = 0; k < gridDim.x; ++k) t += __ldcg(partials + k);  // fixed order
    *loss = static_cast<acc_t>(t / static_cast<double>(total));
  }
}

template <typename out_t, typename acc_t>
__global__ void gram_epilogue_kernel(const acc_t* __restrict__ G, out_t* __restrict__ out,
                                     int64_t B, int64_t C, int64_t width, acc_t s) {
  const int64_t total = B * C * C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = i / (C * C), rc = i % (C * C), r = rc / C, c = rc % C;
    out[i] = static_cast<out_t>(s * sym_value(G, b, r, c, C, width));
  }
}

template <typename m_t, typename acc_t>
__global__ void symmetrise_kernel(const acc_t* __restrict__ X, const acc_t* __restrict__ g,
                                  m_t* __restrict__ M, int64_t B, int64_t C, acc_t alpha) {
  const int64_t total = B * C * C;
  const acc_t a = g == nullptr ? alpha : alpha * g[0];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = i / (C * C), rc = i % (C * C), r = rc / C, c = rc % C;
    M[i] = static_cast<m_t>(a * (X[i] + X[b * C * C + c * C + r]));
  }
}

at::Tensor gram_cuda(const at::Tensor& features, double scale, int64_t block,
                     const std::optional<at::Tensor>& weights) {
  Features f = prepare_features(features, "gramstyle.gram");
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor w3 = prepare_weights(weights, f, "gramstyle.gram");
  if (w3.defined()) f = scale_positions(f, w3);
  const int64_t width = panel_width(f.C, block, /*cuda=*/true, /*reduced=*/false);
  const at::Tensor G = gram_upper_panels(f, width);
  at::Tensor out = at::empty({f.B, f.C, f.C}, features.options());
  const int64_t total = f.B * f.C * f.C;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, features.scalar_type(), "gram_epilogue_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        gram_epilogue_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            G.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), f.B, f.C, width,
            static_cast<acc_t>(scale));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> style_loss_cuda(const at::Tensor& features,
                                                   const at::Tensor& target, double scale,
                                                   int64_t block,
                                                   const std::optional<at::Tensor>& weights) {
  Features f = prepare_features(features, "gramstyle.style_loss");
  const at::Tensor A = prepare_target(target, f, "gramstyle.style_loss");
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor w3 = prepare_weights(weights, f, "gramstyle.style_loss");
  if (w3.defined()) f = scale_positions(f, w3);
  const int64_t width = panel_width(f.C, block, /*cuda=*/true, /*reduced=*/false);
  const at::Tensor G = gram_upper_panels(f, width);
  at::Tensor R = at::empty_like(G);
  at::Tensor loss = at::empty({}, G.options());
  const int64_t total = f.B * f.C * f.C;
  const int nblocks = blocks_for(total);
  // One allocation for the per-block partial sums and the ticket counter behind them.
  at::Tensor work = at::empty({nblocks + 1}, G.options().dtype(at::kDouble));
  auto* partials = work.mutable_data_ptr<double>();
  auto* ticket = reinterpret_cast<unsigned int*>(partials + nblocks);
  auto stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream));
  const int64_t a_bstride = A.size(0) == 1 ? 0 : f.C * f.C;
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "residual_epilogue_cuda", [&] {
    residual_epilogue_kernel<scalar_t><<<nblocks, kThreads, 0, stream>>>(
        G.const_data_ptr<scalar_t>(), A.const_data_ptr<scalar_t>(), a_bstride,
        R.mutable_data_ptr<scalar_t>(), loss.mutable_data_ptr<scalar_t>(), partials, ticket,
        f.B, f.C, width, static_cast<scalar_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, R};
}

// dF = alpha * g * (X + X^T) F, with g an optional device scalar, times w^2 per position
// when w3 is defined.
at::Tensor sym_backward_cuda(const at::Tensor& X, const at::Tensor* g, const Features& f,
                             const at::Tensor& features, double alpha, const at::Tensor& w3) {
  const auto acc = acc_type(features.scalar_type());
  const at::Tensor Xc = X.to(acc).contiguous();
  const at::Tensor gc = g == nullptr ? at::Tensor() : g->to(acc).reshape({1}).contiguous();
  at::Tensor M = at::empty({f.B, f.C, f.C}, features.options());
  const int64_t total = f.B * f.C * f.C;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, features.scalar_type(), "symmetrise_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        symmetrise_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            Xc.const_data_ptr<acc_t>(), gc.defined() ? gc.const_data_ptr<acc_t>() : nullptr,
            M.mutable_data_ptr<scalar_t>(), f.B, f.C, static_cast<acc_t>(alpha));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  at::Tensor grad = sym_times_features(M, f, features);
  if (w3.defined()) scale_gradient(grad, w3);
  return grad;
}

at::Tensor gram_backward_cuda(const at::Tensor& grad, const at::Tensor& features, double scale,
                              const std::optional<at::Tensor>& weights) {
  const Features f = prepare_features(features, "gramstyle.gram_backward");
  check_square(grad, f, "gramstyle.gram_backward", "grad");
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor w3 = prepare_weights(weights, f, "gramstyle.gram_backward");
  return sym_backward_cuda(grad, nullptr, f, features, scale, w3);
}

at::Tensor style_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& residual,
                                    const at::Tensor& features, double scale,
                                    const std::optional<at::Tensor>& weights) {
  const Features f = prepare_features(features, "gramstyle.style_loss_backward");
  check_square(residual, f, "gramstyle.style_loss_backward", "residual");
  TORCH_CHECK_VALUE(grad_loss.numel() == 1,
                    "gramstyle.style_loss_backward: grad_loss must have one element, got shape ",
                    grad_loss.sizes());
  TORCH_CHECK_VALUE(grad_loss.device() == features.device(),
                    "gramstyle.style_loss_backward: grad_loss is on ", grad_loss.device(),
                    " but features are on ", features.device());
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor w3 = prepare_weights(weights, f, "gramstyle.style_loss_backward");
  const double alpha = 2.0 * scale / (static_cast<double>(f.B) * f.C * f.C);
  return sym_backward_cuda(residual, &grad_loss, f, features, alpha, w3);
}

}  // namespace

TORCH_LIBRARY_IMPL(gramstyle, CUDA, m) {
  m.impl("gram", &gram_cuda);
  m.impl("gram_backward", &gram_backward_cuda);
  m.impl("style_loss", &style_loss_cuda);
  m.impl("style_loss_backward", &style_loss_backward_cuda);
}

}  // namespace gramstyle
