// Shared declarations of the fused Gram / style-loss operator (gramstyle::*).
//
// Notation (see kernels/__init__.py and docs/kernels.md):
//   F  features, [B,C,N] (a [B,C,H,W] input is viewed as N = H*W)
//   s  scale, G = s * F F^T, [B,C,C]
//   A  target Gram, [C,C] or [B,C,C] (a [C,C] or [1,C,C] target is broadcast over B)
//   R  residual G - A, kept in the accumulation type (float32, or float64 for float64 F)
//   L  mean over the B*C*C entries of R^2
//   w  optional per-position weights, [N] or [B,N] ([1,N] broadcast): G = s F diag(w^2) F^T,
//      computed as the Gram of F diag(w) (F scaled before the GEMM); the backward is
//      w^2 * (M F), the one GEMM's output scaled by the weights again
//
// gram.cpp holds the schema, the argument checks, the GEMM stage (vendor GEMM on the
// upper-triangular column panels of G, device-generic through ATen) and the CPU
// epilogues; cuda/gram_cuda.cu holds the CUDA epilogues and the CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace gramstyle {

// Features checked and viewed as [B,C,N], each batch item laid out so that BLAS can
// read it without a copy (row-major [C,N] or column-major, i.e. channels_last).
struct Features {
  at::Tensor f3;  // [B,C,N]
  int64_t B = 0;
  int64_t C = 0;
  int64_t N = 0;
};

// Validates rank, dtype and emptiness; `op` names the operator in error messages.
Features prepare_features(const at::Tensor& features, const char* op);

// Validates optional per-position weights against the features (rank, N, batch, device,
// dtype) and returns them shaped to broadcast over the [B,C,N] view, [Bw,1,N] (Bw in {1, B}),
// in the accumulation type (acc_type); an undefined tensor when there are none.
at::Tensor prepare_weights(const std::optional<at::Tensor>& weights, const Features& f,
                           const char* op);

// f with its features scaled by the weights w3 ([Bw,1,N], from prepare_weights): F diag(w),
// laid out for BLAS. The GEMM of the result gives G = F diag(w^2) F^T.
Features scale_positions(const Features& f, const at::Tensor& w3);

// grad *= w^2 in place (grad shaped like the features), the backward's weighting.
void scale_gradient(at::Tensor& grad, const at::Tensor& w3);

// Validates the target against the features (rank, C, batch, device, dtype) and returns
// it as a contiguous [Bt,C,C] tensor in the accumulation type, Bt in {1, B}.
at::Tensor prepare_target(const at::Tensor& target, const Features& f, const char* op);

// float32 for float32/bfloat16/float16 features, float64 for float64.
at::ScalarType acc_type(at::ScalarType t);

// Width of the column panels of G. `block` > 0 forces it (block >= C means one full
// GEMM); 0 picks the measured default for the device and precision (`reduced`: bf16/fp16
// features), see panel_width in gram.cpp.
int64_t panel_width(int64_t C, int64_t block, bool cuda, bool reduced);

// The O(B*C^2*N) part: G_raw = F F^T (unscaled) in the accumulation type, with only
// the entries (r, c) with r < panel_end(c) written -- the upper-triangular panels. The
// epilogues read the rest from the transpose. Vendor GEMM throughout.
at::Tensor gram_upper_panels(const Features& f, int64_t width);

// The backward's single GEMM: returns M @ F shaped and laid out like `features`.
// M is [B,C,C] in the GEMM dtype of F (F's own dtype).
at::Tensor sym_times_features(const at::Tensor& M, const Features& f,
                              const at::Tensor& features);

// Checks that a gradient / residual X is [B,C,C] on the features' device.
void check_square(const at::Tensor& X, const Features& f, const char* op, const char* name);

// True when entry (r, c) of G_raw was computed by gram_upper_panels (r < end of c's panel).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline bool in_upper_panels(int64_t r, int64_t c, int64_t width) {
  return r < (c / width + 1) * width;
}

}  // namespace gramstyle
