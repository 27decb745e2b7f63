// The fused Gram-matrix / style-loss operator: schema, checks, GEMM stage, CPU kernels.
//
//   gramstyle::gram(F, s, block)                 -> G = s F F^T                  [B,C,C]
//   gramstyle::gram_backward(dG, F, s)           -> dF = s (dG + dG^T) F         like F
//   gramstyle::style_loss(F, A, s, block)        -> (L, R), R = G - A, L = mean(R^2)
//   gramstyle::style_loss_backward(dL, R, F, s)  -> dF = dL * 2s/(B C C) (R + R^T) F
// Each takes optional per-position weights w ([N] or [B,N]) last: then G = s F diag(w^2) F^T
// (the Gram of F diag(w), scaled before the GEMM) and each dF is multiplied by w^2 per
// position (M F diag(w^2) = (M F diag(w)) diag(w)). Without w nothing changes.
//
// Why it is cheaper than einsum + autograd (3 GEMMs, 6 B C^2 N flops per step):
//   * G is symmetric, so the forward computes only the upper-triangular column panels of
//     F F^T with vendor GEMM (about (1 + 1/k)/2 of the full product for k panels);
//   * the residual, the loss and the symmetrisation happen in one O(C^2) epilogue pass;
//   * only R (plus F itself) is saved, and the backward is one GEMM, because
//     d/dF of sum_ij (F F^T)_ij M_ij is (M + M^T) F.
// Autograd and fake (meta) kernels are registered from Python (kernels/ops.py).

#include "gram.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

// MKL's mixed-precision GEMM (bf16/fp16 inputs, fp32 accumulation *and* fp32 output).
// The x86-64 torch wheels link MKL statically into libtorch_cpu and export these; the
// declarations are weak so that on a torch build without them the pointers are null and
// the reduced-precision CPU path falls back to at::mm (whose output is rounded to bf16).
// LP64 interface: MKL_INT is int, the enums are ints (101 row-major, 111 no-trans, 112 trans).
extern "C" {
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k,
                            float alpha, const uint16_t* a, int lda, const uint16_t* b,
                            int ldb, float beta, float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k,
                          float alpha, const uint16_t* a, int lda, const uint16_t* b, int ldb,
                          float beta, float* c, int ldc) __attribute__((weak));
}

namespace gramstyle {
namespace {

constexpr int kRowMajor = 101;
constexpr int kNoTrans = 111;
constexpr int kTrans = 112;

bool is_reduced(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

}  // namespace

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

namespace {

// Each batch item must be a BLAS matrix: row-major [C,N] (contiguous NCHW) or column-major
// (channels_last). Anything else (slices with steps, expanded) is copied.
at::Tensor blas_ready(const at::Tensor& f3) {
  const int64_t C = f3.size(1), N = f3.size(2);
  const bool row_major = f3.stride(2) == 1 && f3.stride(1) >= std::max<int64_t>(N, 1);
  const bool col_major = f3.stride(1) == 1 && f3.stride(2) >= std::max<int64_t>(C, 1);
  return (row_major || col_major) ? f3 : f3.contiguous();
}

}  // namespace

Features prepare_features(const at::Tensor& features, const char* op) {
  TORCH_CHECK_VALUE(features.dim() == 3 || features.dim() == 4, op,
                    ": features must be [B,C,H,W] or [B,C,N], got a ", features.dim(),
                    "-D tensor of shape ", features.sizes());
  const auto dt = features.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 ||
                       dt == at::kHalf,
                   op, ": features must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK_VALUE(features.numel() > 0, op, ": features must not be empty, got shape ",
                    features.sizes());
  Features f;
  f.B = features.size(0);
  f.C = features.size(1);
  f.N = features.numel() / (f.B * f.C);
  // reshape is a view for contiguous and channels_last inputs, so no copy there.
  f.f3 = blas_ready(features.dim() == 3 ? features : features.reshape({f.B, f.C, f.N}));
  return f;
}

at::Tensor prepare_weights(const std::optional<at::Tensor>& weights, const Features& f,
                           const char* op) {
  if (!weights.has_value() || !weights->defined()) return at::Tensor();
  const at::Tensor& w = *weights;
  TORCH_CHECK_VALUE(w.dim() == 1 || w.dim() == 2, op, ": weights must be [N] or [B,N], got a ",
                    w.dim(), "-D tensor of shape ", w.sizes());
  TORCH_CHECK_VALUE(w.size(-1) == f.N, op, ": weights have shape ", w.sizes(),
                    " but features have N=", f.N, " positions; weights must be [N] or [B,N]");
  if (w.dim() == 2) {
    TORCH_CHECK_VALUE(w.size(0) == f.B || w.size(0) == 1, op, ": weights batch ", w.size(0),
                      " does not match features batch ", f.B,
                      " (an [N] or [1,N] weight is broadcast)");
  }
  TORCH_CHECK_VALUE(w.device() == f.f3.device(), op, ": weights are on ", w.device(),
                    " but features are on ", f.f3.device(), "; both must be on the same device");
  TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()), op,
                   ": weights must be a floating tensor, got ", w.scalar_type());
  // In the accumulation type: bf16/fp16 features times float32 weights are rounded once,
  // per product. Weights rounded to bf16 first would scale all of G by the same rounding
  // error when they are (nearly) constant, e.g. a normalised all-ones mask.
  return w.reshape({-1, 1, f.N}).to(acc_type(f.f3.scalar_type()));
}

Features scale_positions(const Features& f, const at::Tensor& w3) {
  Features out = f;
  // One O(B*C*N) pass, computed in the accumulation type and written in F's dtype and
  // layout (empty_like keeps a column-major, channels_last item column-major).
  at::Tensor fw = at::empty_like(f.f3);
  at::mul_out(fw, f.f3, w3);
  out.f3 = blas_ready(fw);
  return out;
}

void scale_gradient(at::Tensor& grad, const at::Tensor& w3) {
  // w3 is [Bw,1,N]; viewed with the features' spatial shape it broadcasts over grad.
  std::vector<int64_t> shape{w3.size(0), 1};
  for (int64_t d = 2; d < grad.dim(); ++d) shape.push_back(grad.size(d));
  grad.mul_(w3.square().reshape(shape));  // in the accumulation type, one rounding
}

at::Tensor prepare_target(const at::Tensor& target, const Features& f, const char* op) {
  TORCH_CHECK_VALUE(target.dim() == 2 || target.dim() == 3, op,
                    ": target must be [C,C] or [B,C,C], got a ", target.dim(),
                    "-D tensor of shape ", target.sizes());
  TORCH_CHECK_VALUE(target.size(-1) == f.C && target.size(-2) == f.C, op, ": target has shape ",
                    target.sizes(), " but features have C=", f.C,
                    " channels; target must be [C,C] or [B,C,C]");
  if (target.dim() == 3) {
    TORCH_CHECK_VALUE(target.size(0) == f.B || target.size(0) == 1, op, ": target batch ",
                      target.size(0), " does not match features batch ", f.B,
                      " (a [C,C] or [1,C,C] target is broadcast)");
  }
  TORCH_CHECK_VALUE(target.device() == f.f3.device(), op, ": target is on ", target.device(),
                    " but features are on ", f.f3.device(), "; both must be on the same device");
  const auto fdt = f.f3.scalar_type();
  const auto tdt = target.scalar_type();
  TORCH_CHECK_TYPE(tdt == fdt || (is_reduced(fdt) && tdt == at::kFloat), op, ": target dtype ",
                   tdt, " does not match features dtype ", fdt,
                   " (bfloat16/float16 features also accept a float32 target)");
  TORCH_CHECK_VALUE(target.numel() > 0, op, ": target must not be empty, got shape ",
                    target.sizes());
  // O(C^2): bringing a bf16 target to float32 once is cheaper than templating the epilogue.
  return target.reshape({-1, f.C, f.C}).to(acc_type(fdt)).contiguous();
}

int64_t panel_width(int64_t C, int64_t block, bool cuda, bool reduced) {
  if (block > 0) return std::min(block, C);
  auto round16 = [C](int64_t w) { return std::min(C, (w + 15) / 16 * 16); };
  // Measured on the 2-core AVX-512/AMX CPU (bench/bench_kernel.py --sweep-blocks, S = 256,
  // 512, 1024; bench/results/bench_kernel_blocks.json):
  //  * float32/float64 (AVX-512 MKL sgemm): two panels win from C = 64 -- they save a
  //    quarter of the flops while each GEMM stays large -- and four from C = 256; widths
  //    that are multiples of 16 keep MKL on its fast kernels. Below 64, one full GEMM.
  //  * bf16/fp16 (AMX): the GEMMs are so fast that per-panel overhead and narrow tiles cost
  //    more than the saved flops below C = 256; from there, two panels.
  // CUDA, not measured here: GEMMs below a few hundred rows underfill the GPU, so only
  // the widest layers are split, in two.
  if (cuda) return C >= 512 ? round16((C + 1) / 2) : C;
  if (reduced) return C >= 256 ? round16((C + 1) / 2) : C;
  if (C < 64) return C;
  const int64_t panels = C >= 256 ? 4 : 2;
  return round16((C + panels - 1) / panels);
}

namespace {

// MKL bf16/fp16 x bf16/fp16 -> fp32 on one panel; false when unavailable or too large
// for the 32-bit MKL interface (the caller then uses ATen).
bool mkl_reduced_panel(const at::Tensor& f3, int64_t b, int64_t js, int64_t je,
                       float* out, int64_t C, int64_t N) {
  const bool bf16 = f3.scalar_type() == at::kBFloat16;
  auto fn = bf16 ? &cblas_gemm_bf16bf16f32 : &cblas_gemm_f16f16f32;
  if (fn == nullptr) return false;
  const int64_t sr = f3.stride(1);
  const int64_t sc = f3.stride(2);
  const int64_t big = std::numeric_limits<int>::max();
  if (N > big || C > big || sr > big || sc > big) return false;
  const bool row_major = sc == 1 && sr >= std::max<int64_t>(N, 1);
  const auto* base = reinterpret_cast<const uint16_t*>(f3.const_data_ptr()) + b * f3.stride(0);
  // out[0:je, js:je] = rows(F[0:je]) @ cols(F[js:je])^T, all row-major for cblas.
  // A row-major F item is used as stored (A) and transposed (B); a column-major one
  // (channels_last) is the transpose of a row-major [N,C] matrix, so the flags swap.
  const int transa = row_major ? kNoTrans : kTrans;
  const int transb = row_major ? kTrans : kNoTrans;
  const int ld = static_cast<int>(row_major ? sr : sc);
  const uint16_t* cols = base + js * (row_major ? sr : 1);
  fn(kRowMajor, transa, transb, static_cast<int>(je), static_cast<int>(je - js),
     static_cast<int>(N), 1.0f, base, ld, cols, ld, 0.0f, out + js, static_cast<int>(C));
  return true;
}

}  // namespace

at::Tensor gram_upper_panels(const Features& f, int64_t width) {
  const auto& f3 = f.f3;
  const int64_t B = f.B, C = f.C, N = f.N;
  at::Tensor G = at::empty({B, C, C}, f3.options().dtype(acc_type(f3.scalar_type())));
  const bool reduced = is_reduced(f3.scalar_type());
  const bool cpu = f3.device().is_cpu();
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor fb = f3.select(0, b);
    at::Tensor Gb = G.select(0, b);
    for (int64_t js = 0; js < C; js += width) {
      const int64_t je = std::min(C, js + width);
      // Panel j: rows [0, je) x columns [js, je) -- everything on or above the diagonal
      // block of this column panel. One GEMM per panel keeps each GEMM tall (M = je).
      if (reduced && cpu &&
          mkl_reduced_panel(f3, b, js, je, Gb.mutable_data_ptr<float>(), C, N)) {
        continue;
      }
      at::Tensor rows = fb.narrow(0, 0, je);
      at::Tensor cols_t = fb.narrow(0, js, je - js).t();
      at::Tensor out = Gb.narrow(0, 0, je).narrow(1, js, je - js);
      if (!reduced) {
        at::mm_out(out, rows, cols_t);  // writes straight into the strided block (ldc = C)
      } else if (!cpu) {
        out.copy_(at::mm(rows, cols_t, at::kFloat));  // cuBLAS bf16/fp16 -> fp32 output
      } else {
        out.copy_(at::mm(rows, cols_t));  // no MKL: fp32-accumulated, bf16-rounded output
      }
    }
  }
  return G;
}

at::Tensor sym_times_features(const at::Tensor& M, const Features& f,
                              const at::Tensor& features) {
  // The gradient gets F's layout (empty_like keeps the strides of a dense F), so a
  // channels_last F gets a channels_last gradient that the GEMM writes directly.
  at::Tensor out = at::empty_like(features);
  const bool viewable = features.dim() == 3 || out.is_contiguous() ||
                        out.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (viewable) {
    at::Tensor out3 = out.view({f.B, f.C, f.N});
    if (f.f3.stride(2) != 1) {
      // Column-major (channels_last) F: compute out^T = F^T M^T with every operand
      // row-major. The direct form, bmm_out(col-major out, M, col-major F), takes a
      // reference path for bf16 on CPU that is over 1000x slower.
      at::Tensor out_t = out3.transpose(1, 2);
      at::bmm_out(out_t, f.f3.transpose(1, 2), M.transpose(1, 2));
    } else {
      at::bmm_out(out3, M, f.f3);
    }
  } else {  // a permuted H/W layout: compute, then copy into the requested strides
    out.copy_(at::bmm(M, f.f3).view(features.sizes()));
  }
  return out;
}

void check_square(const at::Tensor& X, const Features& f, const char* op, const char* name) {
  TORCH_CHECK_VALUE(X.dim() == 3 && X.size(0) == f.B && X.size(1) == f.C && X.size(2) == f.C,
                    op, ": ", name, " must be [B,C,C] = [", f.B, ",", f.C, ",", f.C,
                    "], got shape ", X.sizes());
  TORCH_CHECK_VALUE(X.device() == f.f3.device(), op, ": ", name, " is on ", X.device(),
                    " but features are on ", f.f3.device());
}

namespace {

// ---------------------------------------------------------------------------------------
// CPU epilogues. Rows (b, r) are independent: at::parallel_for over them, per-row partial
// sums in double, summed afterwards in a fixed order so the loss does not depend on the
// thread count.
// ---------------------------------------------------------------------------------------

int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }

// R = s * sym(G_raw) - A, returns sum(R^2).
template <typename acc_t>
double residual_epilogue_cpu(const acc_t* G, const acc_t* A, int64_t a_bstride, acc_t* R,
                             int64_t B, int64_t C, int64_t width, acc_t s) {
  std::vector<double> row_sums(static_cast<size_t>(B * C), 0.0);
  at::parallel_for(0, B * C, row_grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t br = begin; br < end; ++br) {
      const int64_t b = br / C, r = br % C;
      const acc_t* Gb = G + b * C * C;
      const acc_t* Ar = A + b * a_bstride + r * C;
      acc_t* Rr = R + br * C;
      // Columns before c0 lie in panels that end at or before row r: not computed,
      // read from the transpose. From c0 on, row r itself holds them.
      const int64_t c0 = (r / width) * width;
      double sum = 0.0;
      for (int64_t c = 0; c < c0; ++c) {
        const acc_t v = s * Gb[c * C + r] - Ar[c];
        Rr[c] = v;
        sum += static_cast<double>(v) * v;
      }
      const acc_t* Gr = Gb + r * C;
      for (int64_t c = c0; c < C; ++c) {
        const acc_t v = s * Gr[c] - Ar[c];
        Rr[c] = v;
        sum += static_cast<double>(v) * v;
      }
      row_sums[static_cast<size_t>(br)] = sum;
    }
  });
  double total = 0.0;
  for (double v : row_sums) total += v;
  return total;
}

// out = s * sym(G_raw), cast to the features' dtype.
template <typename out_t, typename acc_t>
void gram_epilogue_cpu(const acc_t* G, out_t* out, int64_t B, int64_t C, int64_t width,
                       acc_t s) {
  at::parallel_for(0, B * C, row_grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t br = begin; br < end; ++br) {
      const int64_t b = br / C, r = br % C;
      const acc_t* Gb = G + b * C * C;
      out_t* o = out + br * C;
      const int64_t c0 = (r / width) * width;
      for (int64_t c = 0; c < c0; ++c) o[c] = static_cast<out_t>(s * Gb[c * C + r]);
      const acc_t* Gr = Gb + r * C;
      for (int64_t c = c0; c < C; ++c) o[c] = static_cast<out_t>(s * Gr[c]);
    }
  });
}

// M = alpha * (X + X^T), cast to the GEMM dtype.
template <typename m_t, typename acc_t>
void symmetrise_cpu(const acc_t* X, m_t* M, int64_t B, int64_t C, acc_t alpha) {
  at::parallel_for(0, B * C, row_grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t br = begin; br < end; ++br) {
      const int64_t b = br / C, r = br % C;
      const acc_t* Xb = X + b * C * C;
      const acc_t* Xr = Xb + r * C;
      m_t* m = M + br * C;
      for (int64_t c = 0; c < C; ++c) m[c] = static_cast<m_t>(alpha * (Xr[c] + Xb[c * C + r]));
    }
  });
}

// ---------------------------------------------------------------------------------------
// CPU operator implementations.
// ---------------------------------------------------------------------------------------

at::Tensor gram_cpu(const at::Tensor& features, double scale, int64_t block,
                    const std::optional<at::Tensor>& weights) {
  Features f = prepare_features(features, "gramstyle.gram");
  const at::Tensor w3 = prepare_weights(weights, f, "gramstyle.gram");
  if (w3.defined()) f = scale_positions(f, w3);
  const int64_t width = panel_width(f.C, block, /*cuda=*/false, is_reduced(f.f3.scalar_type()));
  const at::Tensor G = gram_upper_panels(f, width);
  at::Tensor out = at::empty({f.B, f.C, f.C}, features.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(),
                                  "gram_epilogue_cpu", [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    gram_epilogue_cpu<scalar_t, acc_t>(
                                        G.const_data_ptr<acc_t>(),
                                        out.mutable_data_ptr<scalar_t>(), f.B, f.C, width,
                                        static_cast<acc_t>(scale));
                                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> style_loss_cpu(const at::Tensor& features,
                                                  const at::Tensor& target, double scale,
                                                  int64_t block,
                                                  const std::optional<at::Tensor>& weights) {
  Features f = prepare_features(features, "gramstyle.style_loss");
  const at::Tensor A = prepare_target(target, f, "gramstyle.style_loss");
  const at::Tensor w3 = prepare_weights(weights, f, "gramstyle.style_loss");
  if (w3.defined()) f = scale_positions(f, w3);
  const int64_t width = panel_width(f.C, block, /*cuda=*/false, is_reduced(f.f3.scalar_type()));
  const at::Tensor G = gram_upper_panels(f, width);
  at::Tensor R = at::empty_like(G);
  const int64_t a_bstride = A.size(0) == 1 ? 0 : f.C * f.C;
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "residual_epilogue_cpu", [&] {
    total = residual_epilogue_cpu<scalar_t>(
        G.const_data_ptr<scalar_t>(), A.const_data_ptr<scalar_t>(), a_bstride,
        R.mutable_data_ptr<scalar_t>(), f.B, f.C, width, static_cast<scalar_t>(scale));
  });
  const double count = static_cast<double>(f.B) * f.C * f.C;
  return {at::scalar_tensor(total / count, G.options()), R};
}

// Shared by both backward ops: dF = alpha * (X + X^T) F, times w^2 per position when w3 is
// defined.
at::Tensor sym_backward_cpu(const at::Tensor& X, const Features& f, const at::Tensor& features,
                            double alpha, const at::Tensor& w3) {
  const auto acc = acc_type(features.scalar_type());
  const at::Tensor Xc = X.to(acc).contiguous();
  at::Tensor M = at::empty({f.B, f.C, f.C}, features.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(),
                                  "symmetrise_cpu", [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    symmetrise_cpu<scalar_t, acc_t>(
                                        Xc.const_data_ptr<acc_t>(),
                                        M.mutable_data_ptr<scalar_t>(), f.B, f.C,
                                        static_cast<acc_t>(alpha));
                                  });
  at::Tensor grad = sym_times_features(M, f, features);
  if (w3.defined()) scale_gradient(grad, w3);
  return grad;
}

at::Tensor gram_backward_cpu(const at::Tensor& grad, const at::Tensor& features, double scale,
                             const std::optional<at::Tensor>& weights) {
  const Features f = prepare_features(features, "gramstyle.gram_backward");
  check_square(grad, f, "gramstyle.gram_backward", "grad");
  const at::Tensor w3 = prepare_weights(weights, f, "gramstyle.gram_backward");
  return sym_backward_cpu(grad, f, features, scale, w3);
}

at::Tensor style_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& residual,
                                   const at::Tensor& features, double scale,
                                   const std::optional<at::Tensor>& weights) {
  const Features f = prepare_features(features, "gramstyle.style_loss_backward");
  check_square(residual, f, "gramstyle.style_loss_backward", "residual");
  const at::Tensor w3 = prepare_weights(weights, f, "gramstyle.style_loss_backward");
  TORCH_CHECK_VALUE(grad_loss.numel() == 1,
                    "gramstyle.style_loss_backward: grad_loss must have one element, got shape ",
                    grad_loss.sizes());
  // A CPU scalar: reading it costs nothing (the CUDA kernel reads it on the device instead).
  const double g = grad_loss.item<double>();
  const double alpha = g * 2.0 * scale / (static_cast<double>(f.B) * f.C * f.C);
  return sym_backward_cpu(residual, f, features, alpha, w3);
}

// ---------------------------------------------------------------------------------------
// Autocast: like matmul, run in the autocast dtype. Only the features are cast; the target
// stays as it is (a float32 target is accepted for bf16/fp16 features, and keeps the
// residual accurate).
// ---------------------------------------------------------------------------------------

at::Tensor autocast_features(const at::Tensor& features, c10::DeviceType device_type) {
  const auto dt = at::autocast::get_autocast_dtype(device_type);
  if (features.scalar_type() == at::kFloat && is_reduced(dt) &&
      features.device().type() == device_type) {
    return at::autocast::cached_cast(dt, features, device_type);
  }
  return features;
}

template <c10::DeviceType kDevice, c10::DispatchKey kKey>
at::Tensor gram_autocast(const at::Tensor& features, double scale, int64_t block,
                         const std::optional<at::Tensor>& weights) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gramstyle::gram", "")
                       .typed<at::Tensor(const at::Tensor&, double, int64_t,
                                         const std::optional<at::Tensor>&)>();
  // The weights are cast to the features' dtype by the kernel itself.
  return op.call(autocast_features(features, kDevice), scale, block, weights);
}

template <c10::DeviceType kDevice, c10::DispatchKey kKey>
std::tuple<at::Tensor, at::Tensor> style_loss_autocast(const at::Tensor& features,
                                                       const at::Tensor& target, double scale,
                                                       int64_t block,
                                                       const std::optional<at::Tensor>& weights) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("gramstyle::style_loss", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    double, int64_t,
                                                    const std::optional<at::Tensor>&)>();
  return op.call(autocast_features(features, kDevice), target, scale, block, weights);
}

}  // namespace

TORCH_LIBRARY(gramstyle, m) {
  // Fake kernels and autograd are registered from this Python module.
  m.set_python_module("gramstyle.kernels.ops");
  // weights: optional per-position weights w, [N] or [B,N]; G = s F diag(w^2) F^T.
  m.def("gram(Tensor features, float scale, int block=0, Tensor? weights=None) -> Tensor");
  m.def(
      "gram_backward(Tensor grad, Tensor features, float scale, Tensor? weights=None) "
      "-> Tensor");
  m.def(
      "style_loss(Tensor features, Tensor target, float scale, int block=0, "
      "Tensor? weights=None) -> (Tensor, Tensor)");
  m.def(
      "style_loss_backward(Tensor grad_loss, Tensor residual, Tensor features, float scale, "
      "Tensor? weights=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(gramstyle, CPU, m) {
  m.impl("gram", &gram_cpu);
  m.impl("gram_backward", &gram_backward_cpu);
  m.impl("style_loss", &style_loss_cpu);
  m.impl("style_loss_backward", &style_loss_backward_cpu);
}

TORCH_LIBRARY_IMPL(gramstyle, AutocastCPU, m) {
  m.impl("gram", &gram_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("style_loss", &style_loss_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(gramstyle, AutocastCUDA, m) {
  m.impl("gram", &gram_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("style_loss",
         &style_loss_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace gramstyle

// A tiny Python module so that `import gramstyle.kernels._C` loads this library and runs
// the registrations above (the pytorch/extension-cpp pattern). WITH_CUDA says whether the
// CUDA kernels were compiled in.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef GRAMSTYLE_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
}
