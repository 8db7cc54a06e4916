// CPU fast path of dsd2's fused ops, built into dsd2._C. OpenMP over elements or rows; the inner
// loops are plain strided-free arithmetic that the compiler vectorises. Reduced-precision inputs
// are read as-is and accumulated in fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrain = 1 << 14;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DSD2_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DSD2_CLONES
#endif

// The update with every option fixed at compile time, so each variant is one branch-free vector loop.
template <typename scalar_t, bool HAS_MASK, bool HAS_BUF, bool NESTEROV>
inline void sgd_loop(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ buf,
                     const bool* __restrict__ mask_in, int64_t begin, int64_t end, float lr, float momentum,
                     float wd) {
  // read masks as bytes: a bool -> float conversion does not vectorise, a byte -> float one does
  const uint8_t* __restrict__ mask = reinterpret_cast<const uint8_t*>(mask_in);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float keep = HAS_MASK ? static_cast<float>(mask[i]) : 1.0f;
    const float w = static_cast<float>(p[i]);
    float d = static_cast<float>(g[i]) * keep + wd * w;
    if constexpr (HAS_BUF) {
      const float b = (momentum * static_cast<float>(buf[i]) + d) * keep;
      buf[i] = static_cast<scalar_t>(b);
      d = NESTEROV ? d + momentum * b : b;
    }
    p[i] = static_cast<scalar_t>((w - lr * d) * keep);
  }
}

template <typename scalar_t>
inline void sgd_dispatch(scalar_t* p, const scalar_t* g, scalar_t* buf, const bool* mask, int64_t begin,
                         int64_t end, float lr, float momentum, float wd, bool nesterov) {
  if (mask) {
    if (!buf) return sgd_loop<scalar_t, true, false, false>(p, g, buf, mask, begin, end, lr, momentum, wd);
    if (nesterov) return sgd_loop<scalar_t, true, true, true>(p, g, buf, mask, begin, end, lr, momentum, wd);
    return sgd_loop<scalar_t, true, true, false>(p, g, buf, mask, begin, end, lr, momentum, wd);
  }
  if (!buf) return sgd_loop<scalar_t, false, false, false>(p, g, buf, mask, begin, end, lr, momentum, wd);
  if (nesterov) return sgd_loop<scalar_t, false, true, true>(p, g, buf, mask, begin, end, lr, momentum, wd);
  return sgd_loop<scalar_t, false, true, false>(p, g, buf, mask, begin, end, lr, momentum, wd);
}

DSD2_CLONES static void sgd_f32(float* p, const float* g, float* buf, const bool* mask, int64_t begin,
                                int64_t end, float lr, float momentum, float wd, bool nesterov) {
  sgd_dispatch<float>(p, g, buf, mask, begin, end, lr, momentum, wd, nesterov);
}

// `first` needs no special case: buffers start at zero, so momentum * 0 + d = d, as torch.optim.SGD's first step.
template <typename scalar_t>
void masked_sgd_tensor(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                       scalar_t* __restrict__ buf, const bool* __restrict__ mask, int64_t n,
                       float lr, float momentum, float wd, bool nesterov) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      sgd_f32(p, g, buf, mask, begin, end, lr, momentum, wd, nesterov);
    } else {
      sgd_dispatch<scalar_t>(p, g, buf, mask, begin, end, lr, momentum, wd, nesterov);
    }
  });
}

// Elementwise kernels walk memory linearly: every operand must share the parameter's layout.
void check_same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.sizes() == b.sizes(), what, " shape ", b.sizes(), " differs from parameter shape ", a.sizes());
  TORCH_CHECK(b.strides() == a.strides(), what, " memory layout differs from the parameter's");
}

}  // namespace

// One pass per tensor: mask the gradient, add weight decay, update momentum, step, re-mask.
// Masks may be undefined (unpruned parameters step as plain SGD); momentum buffers may be
// undefined when momentum == 0.
void masked_sgd_step_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                      std::vector<std::optional<at::Tensor>> bufs,
                      std::vector<std::optional<at::Tensor>> masks, double lr,
                      double momentum, double weight_decay, bool nesterov, bool first) {
  (void)first;
  TORCH_CHECK(params.size() == grads.size() && params.size() == bufs.size() &&
                  params.size() == masks.size(),
              "masked_sgd_step_: params, grads, bufs and masks must have the same length");
  for (size_t t = 0; t < params.size(); ++t) {
    auto& p = params[t];
    TORCH_CHECK(p.device().is_cpu(), "masked_sgd_step_: CPU tensors only");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "masked_sgd_step_: parameters must be dense in memory");
    auto g = grads[t];
    if (g.strides() != p.strides()) g = at::empty_like(p).copy_(g);
    check_same(p, g, "gradient");
    const bool has_buf = bufs[t].has_value() && bufs[t]->defined() && momentum != 0.0;
    const bool has_mask = masks[t].has_value() && masks[t]->defined();
    if (has_buf) check_same(p, *bufs[t], "momentum buffer");
    if (has_mask) {
      check_same(p, *masks[t], "mask");
      TORCH_CHECK(masks[t]->scalar_type() == at::kBool, "mask must be bool");
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "masked_sgd_step_", [&] {
      masked_sgd_tensor<scalar_t>(p.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                  has_buf ? bufs[t]->data_ptr<scalar_t>() : nullptr,
                                  has_mask ? masks[t]->data_ptr<bool>() : nullptr, p.numel(),
                                  static_cast<float>(lr), static_cast<float>(momentum),
                                  static_cast<float>(weight_decay), nesterov);
    });
  }
}

// ---- ReLU-state counting ------------------------------------------------------------------------------
// Per element: each thread owns a block of columns and walks the batch, accumulating int32 counts in a
// small stack buffer before one int64 add per column. fp16/bf16 are compared on their bit patterns
// (x > 0  <=>  0 < bits <= +inf), which vectorises where a float conversion would not.

constexpr int64_t kCols = 8192;  // 32 KiB of int32 counters per thread: rows stream in 32 KiB (fp32) runs

template <typename T, typename Pred, typename Relu>
inline void count_block(const T* __restrict__ x, T* __restrict__ y, int64_t* __restrict__ out, int64_t batch,
                        int64_t stride, int64_t begin, int64_t end, Pred on, Relu relu) {
  int32_t acc[kCols];
  for (int64_t j0 = begin; j0 < end; j0 += kCols) {
    const int64_t w = std::min(kCols, end - j0);
    for (int64_t j = 0; j < w; ++j) acc[j] = 0;
    for (int64_t b = 0; b < batch; ++b) {
      const T* row = x + b * stride + j0;
      if (y) {
        T* orow = y + b * stride + j0;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) {
          acc[j] += on(row[j]);
          orow[j] = relu(row[j]);
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) acc[j] += on(row[j]);
      }
    }
    for (int64_t j = 0; j < w; ++j) out[j0 + j] += acc[j];
  }
}

DSD2_CLONES static void count_cols_f32(const float* x, float* y, int64_t* out, int64_t batch, int64_t stride,
                                       int64_t begin, int64_t end, bool inclusive) {
  auto relu = [](float v) { return v > 0.0f ? v : 0.0f; };
  if (inclusive)
    count_block(x, y, out, batch, stride, begin, end, [](float v) { return static_cast<int32_t>(v >= 0.0f); }, relu);
  else
    count_block(x, y, out, batch, stride, begin, end, [](float v) { return static_cast<int32_t>(v > 0.0f); }, relu);
}

DSD2_CLONES static void count_cols_u16(const uint16_t* x, uint16_t* y, int64_t* out, int64_t batch,
                                       int64_t stride, int64_t begin, int64_t end, bool inclusive, uint16_t inf) {
  const uint16_t neg_inf = static_cast<uint16_t>(0x8000 | inf);
  // relu: negative numbers (not NaN) become +0; -0 also becomes +0
  auto relu = [neg_inf](uint16_t v) { return static_cast<uint16_t>(v >= 0x8000 && v <= neg_inf ? 0 : v); };
  if (inclusive)
    count_block(x, y, out, batch, stride, begin, end,
                [inf](uint16_t v) { return static_cast<int32_t>(v <= inf || v == 0x8000); }, relu);
  else
    count_block(x, y, out, batch, stride, begin, end,
                [inf](uint16_t v) { return static_cast<int32_t>(static_cast<uint16_t>(v - 1) < inf); }, relu);
}

template <typename scalar_t>
void count_cols_generic(const scalar_t* x, scalar_t* y, int64_t* out, int64_t batch, int64_t stride,
                        int64_t begin, int64_t end, bool inclusive) {
  auto relu = [](scalar_t v) { return v > scalar_t(0) ? v : scalar_t(0); };
  if (inclusive)
    count_block(x, y, out, batch, stride, begin, end,
                [](scalar_t v) { return static_cast<int32_t>(v >= scalar_t(0)); }, relu);
  else
    count_block(x, y, out, batch, stride, begin, end,
                [](scalar_t v) { return static_cast<int32_t>(v > scalar_t(0)); }, relu);
}

// Count (and optionally apply the ReLU into y) over columns [begin, end) of a [batch, stride] view at x.
void count_columns(at::ScalarType dt, const void* x, void* y, int64_t* out, int64_t batch, int64_t stride,
                   int64_t begin, int64_t end, bool inclusive) {
  switch (dt) {
    case at::kFloat:
      return count_cols_f32(static_cast<const float*>(x), static_cast<float*>(y), out, batch, stride, begin, end,
                            inclusive);
    case at::kBFloat16:
    case at::kHalf:
      return count_cols_u16(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y), out, batch, stride, begin,
                            end, inclusive, dt == at::kBFloat16 ? 0x7F80 : 0x7C00);
    case at::kDouble:
      return count_cols_generic(static_cast<const double*>(x), static_cast<double*>(y), out, batch, stride, begin,
                                end, inclusive);
    default:
      TORCH_CHECK(false, "ReLU-state counting: unsupported dtype ", dt);
  }
}

// counts[j] += #{b : x[b, j] > 0} (or >= 0 when inclusive) over the flattened non-batch dims.
// Per-channel mode pools positions: x viewed as [B, C, S], counts has C entries.
void count_positive_(const at::Tensor& x_in, at::Tensor counts, bool inclusive, bool per_channel) {
  TORCH_CHECK(x_in.device().is_cpu(), "count_positive_: CPU tensors only");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous(),
              "count_positive_: counts must be a contiguous int64 tensor");
  TORCH_CHECK(x_in.dim() >= 1, "count_positive_: x needs a batch dimension");
  auto x = x_in.contiguous();
  const int64_t batch = x.size(0);
  const int64_t per_sample = batch ? x.numel() / batch : 0;
  const int64_t channels = per_channel ? (x.dim() > 1 ? x.size(1) : 1) : per_sample;
  const int64_t spatial = channels ? per_sample / channels : 0;
  TORCH_CHECK(counts.numel() == channels, "count_positive_: counts has ", counts.numel(),
              " entries, expected ", channels);
  int64_t* out = counts.data_ptr<int64_t>();
  const auto dt = x.scalar_type();
  const char* base = static_cast<const char*>(x.data_ptr());
  if (spatial == 1) {
    at::parallel_for(0, per_sample, kCols, [&](int64_t begin, int64_t end) {
      count_columns(dt, base, nullptr, out, batch, per_sample, begin, end, inclusive);
    });
    return;
  }
  // per channel: channel c's positions are columns [c*S, (c+1)*S) of the [batch, per_sample] view
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> scratch(spatial);
    for (int64_t c = begin; c < end; ++c) {
      std::fill(scratch.begin(), scratch.end(), 0);
      count_columns(dt, base + c * spatial * x.element_size(), nullptr, scratch.data(), batch, per_sample, 0,
                    spatial, inclusive);
      int64_t total = 0;
      for (int64_t v : scratch) total += v;
      out[c] += total;
    }
  });
}

// Row streaming for the fused ReLU: each thread walks whole samples front to back, exactly like a plain
// ReLU, keeping full-width int32 counters of its own (L2-resident) that are merged once at the end.
template <typename T, typename Pred, typename Relu>
inline void relu_rows(const T* __restrict__ x, T* __restrict__ y, int32_t* __restrict__ acc, int64_t b0,
                      int64_t b1, int64_t width, Pred on, Relu relu) {
  for (int64_t b = b0; b < b1; ++b) {
    const T* row = x + b * width;
    T* orow = y + b * width;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      acc[j] += on(row[j]);
      orow[j] = relu(row[j]);
    }
  }
}

DSD2_CLONES static void relu_rows_f32(const float* x, float* y, int32_t* acc, int64_t b0, int64_t b1,
                                      int64_t width, bool inclusive) {
  auto relu = [](float v) { return v > 0.0f ? v : 0.0f; };
  if (inclusive)
    relu_rows(x, y, acc, b0, b1, width, [](float v) { return static_cast<int32_t>(v >= 0.0f); }, relu);
  else
    relu_rows(x, y, acc, b0, b1, width, [](float v) { return static_cast<int32_t>(v > 0.0f); }, relu);
}

DSD2_CLONES static void relu_rows_u16(const uint16_t* x, uint16_t* y, int32_t* acc, int64_t b0, int64_t b1,
                                      int64_t width, bool inclusive, uint16_t inf) {
  const uint16_t neg_inf = static_cast<uint16_t>(0x8000 | inf);
  auto relu = [neg_inf](uint16_t v) { return static_cast<uint16_t>(v >= 0x8000 && v <= neg_inf ? 0 : v); };
  if (inclusive)
    relu_rows(x, y, acc, b0, b1, width, [inf](uint16_t v) { return static_cast<int32_t>(v <= inf || v == 0x8000); },
              relu);
  else
    relu_rows(x, y, acc, b0, b1, width,
              [inf](uint16_t v) { return static_cast<int32_t>(static_cast<uint16_t>(v - 1) < inf); }, relu);
}

// ReLU forward that counts states in the same pass over the activation (per-element counts).
at::Tensor relu_count(const at::Tensor& x_in, at::Tensor counts, bool inclusive) {
  TORCH_CHECK(x_in.device().is_cpu(), "relu_count: CPU tensors only");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous(),
              "relu_count: counts must be a contiguous int64 tensor");
  auto x = x_in.contiguous();
  auto y = at::empty_like(x);
  const int64_t batch = x.size(0);
  const int64_t per_sample = batch ? x.numel() / batch : 0;
  TORCH_CHECK(counts.numel() == per_sample, "relu_count: counts has ", counts.numel(),
              " entries, expected ", per_sample);
  int64_t* out = counts.data_ptr<int64_t>();
  const auto dt = x.scalar_type();
  const bool streamable = dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf;
  if (streamable && batch >= 2 * at::get_num_threads() && per_sample >= kCols) {
    std::mutex merge;
    at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      std::vector<int32_t> acc(per_sample, 0);
      if (dt == at::kFloat) {
        relu_rows_f32(x.data_ptr<float>(), y.data_ptr<float>(), acc.data(), b0, b1, per_sample, inclusive);
      } else {
        relu_rows_u16(reinterpret_cast<const uint16_t*>(x.data_ptr()), reinterpret_cast<uint16_t*>(y.data_ptr()),
                      acc.data(), b0, b1, per_sample, inclusive, dt == at::kBFloat16 ? 0x7F80 : 0x7C00);
      }
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t j = 0; j < per_sample; ++j) out[j] += acc[j];
    });
    return y;
  }
  at::parallel_for(0, per_sample, kCols, [&](int64_t begin, int64_t end) {
    count_columns(dt, x.data_ptr(), y.data_ptr(), out, batch, per_sample, begin, end, inclusive);
  });
  return y;
}

// ---- KD loss: (1 - a) CE(s, y) + a T^2 KL(softmax(t/T) || softmax(s/T)), gradient written in the forward --

// exp(x) for x <= 0 by range reduction and a degree-6 polynomial (relative error ~2e-7). Plain arithmetic
// (rounding by the 1.5 * 2^23 trick, exponent by a bit cast) so that `omp simd` loops calling it vectorise
// on any x86-64 level without -ffast-math or a vector math library.
#pragma omp declare simd notinbranch
static inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float v = x * 1.44269504088896341f;
  const float n = (v + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

struct KDRow {
  float ce;
  float kl;
};

// One row in fp32: s = student logits, t = teacher logits already divided by T, g receives the unscaled-by-n
// gradient. es/est/et are scratch of length C holding the three exponentials, reused by the gradient pass.
// Compiled for AVX-512, AVX2 and baseline x86-64, picked at run time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static KDRow kd_row(const float* __restrict__ s, const float* __restrict__ t, float* __restrict__ g,
                    float* __restrict__ es, float* __restrict__ est, float* __restrict__ et, int64_t C, int64_t y,
                    float invT, float a_ce, float a_kl) {
  float ms = -INFINITY, mt = -INFINITY;
#pragma omp simd reduction(max : ms, mt)
  for (int64_t c = 0; c < C; ++c) {
    ms = s[c] > ms ? s[c] : ms;
    mt = t[c] > mt ? t[c] : mt;
  }
  float zs = 0.0f, zst = 0.0f, zt = 0.0f, cross = 0.0f;
#pragma omp simd reduction(+ : zs, zst, zt, cross)
  for (int64_t c = 0; c < C; ++c) {
    const float d = s[c] - ms;
    es[c] = exp_nonpos(d);
    est[c] = exp_nonpos(d * invT);
    const bool live = t[c] > -INFINITY;  // a -inf teacher logit is probability 0: 0 * log 0 = 0
    et[c] = live ? exp_nonpos(t[c] - mt) : 0.0f;
    zs += es[c];
    zst += est[c];
    zt += et[c];
    cross += live ? et[c] * (t[c] - s[c] * invT) : 0.0f;
  }
  const float inv_zs = 1.0f / zs, inv_zst = 1.0f / zst, inv_zt = 1.0f / zt;
  const float b_ce = a_ce * inv_zs, b_q = a_kl * inv_zst, b_p = a_kl * inv_zt;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) g[c] = b_ce * es[c] + b_q * est[c] - b_p * et[c];
  g[y] -= a_ce;
  // KL = sum p (t/T - s/T) - lse(t/T) + lse(s/T), using sum p = 1
  const float lse_s = ms + std::log(zs), lse_st = ms * invT + std::log(zst), lse_t = mt + std::log(zt);
  return {lse_s - s[y], cross * inv_zt - lse_t + lse_st};
}

// log(x) for normal x > 0 (Cephes logf: mantissa/exponent by bit operations, degree-8 polynomial).
#pragma omp declare simd notinbranch
static inline float log_pos(float x) {
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float m = __builtin_bit_cast(float, (bits & 0x807fffff) | 0x3f000000);  // in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

constexpr int64_t kKDBlock = 16;
constexpr int64_t kSmallC = 128;  // up to here rows-as-lanes beats vectorising within a row  // rows per SIMD block for small C: one row per lane

// Small C (10 or 100 classes): rows of a block are the SIMD lanes, classes the outer loop, so a 10-class row
// still fills the vector. S and Tt are [C][kKDBlock] (Tt already divided by T); valid is 1 or 0 per row.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void kd_block(const float* __restrict__ S, const float* __restrict__ Tt, float* __restrict__ G,
                     float* __restrict__ E1, float* __restrict__ E2, float* __restrict__ E3,
                     const int64_t* __restrict__ y, const float* __restrict__ valid, int64_t C, float invT,
                     float a_ce, float a_kl, float* __restrict__ ce, float* __restrict__ kl) {
  constexpr int64_t R = kKDBlock;
  float ms[R], mt[R], zs[R], zst[R], zt[R], cross[R];
  for (int64_t r = 0; r < R; ++r) {
    ms[r] = mt[r] = -INFINITY;
    zs[r] = zst[r] = zt[r] = cross[r] = 0.0f;
  }
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      ms[r] = S[c * R + r] > ms[r] ? S[c * R + r] : ms[r];
      mt[r] = Tt[c * R + r] > mt[r] ? Tt[c * R + r] : mt[r];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      const float sv = S[c * R + r], tv = Tt[c * R + r];
      const float d = sv - ms[r];
      const float e1 = exp_nonpos(d), e2 = exp_nonpos(d * invT);
      const bool live = tv > -INFINITY;  // a -inf teacher logit is probability 0: 0 * log 0 = 0
      const float e3 = live ? exp_nonpos(tv - mt[r]) : 0.0f;
      E1[c * R + r] = e1;
      E2[c * R + r] = e2;
      E3[c * R + r] = e3;
      zs[r] += e1;
      zst[r] += e2;
      zt[r] += e3;
      cross[r] += live ? e3 * (tv - sv * invT) : 0.0f;
    }
  }
  float b_ce[R], b_q[R], b_p[R];
#pragma omp simd
  for (int64_t r = 0; r < R; ++r) {
    const float lse_st = ms[r] * invT + log_pos(zst[r]);
    const float lse_t = mt[r] + log_pos(zt[r]);
    ce[r] = valid[r] * (ms[r] + log_pos(zs[r]));  // minus s[y] below
    kl[r] = valid[r] * (cross[r] / zt[r] - lse_t + lse_st);
    b_ce[r] = valid[r] * a_ce / zs[r];
    b_q[r] = valid[r] * a_kl / zst[r];
    b_p[r] = valid[r] * a_kl / zt[r];
  }
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int64_t r = 0; r < R; ++r)
      G[c * R + r] = b_ce[r] * E1[c * R + r] + b_q[r] * E2[c * R + r] - b_p[r] * E3[c * R + r];
  }
  for (int64_t r = 0; r < R; ++r) {
    ce[r] -= valid[r] * S[y[r] * R + r];
    G[y[r] * R + r] -= valid[r] * a_ce;
  }
}

template <typename scalar_t>
void kd_blocks(const scalar_t* __restrict__ s_all, int64_t s_stride, const scalar_t* __restrict__ t_all,
               int64_t t_stride, const int64_t* __restrict__ y_all, scalar_t* __restrict__ g_all, float* ce_rows,
               float* kl_rows, int64_t rows, int64_t C, float alpha, float T, int64_t ignore_index, float inv_n) {
  constexpr int64_t R = kKDBlock;
  const float invT = 1.0f / T;
  const float a_ce = (1.0f - alpha) * inv_n, a_kl = alpha * T * inv_n;
  const int64_t blocks = (rows + R - 1) / R;
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(C) * R * 6);
    float *S = buf.data(), *Tt = S + C * R, *G = Tt + C * R, *E1 = G + C * R, *E2 = E1 + C * R, *E3 = E2 + C * R;
    int64_t y[R];
    float valid[R], ce[R], kl[R];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * R, n_r = std::min(R, rows - r0);
      for (int64_t r = 0; r < R; ++r) {
        const bool live = r < n_r && y_all[r0 + r] != ignore_index;
        valid[r] = live ? 1.0f : 0.0f;
        y[r] = live ? y_all[r0 + r] : 0;
        for (int64_t c = 0; c < C; ++c) {
          S[c * R + r] = r < n_r ? static_cast<float>(s_all[(r0 + r) * s_stride + c]) : 0.0f;
          Tt[c * R + r] = r < n_r ? static_cast<float>(t_all[(r0 + r) * t_stride + c]) * invT : 0.0f;
        }
      }
      kd_block(S, Tt, G, E1, E2, E3, y, valid, C, invT, a_ce, a_kl, ce, kl);
      for (int64_t r = 0; r < n_r; ++r) {
        ce_rows[r0 + r] = ce[r];
        kl_rows[r0 + r] = kl[r];
        scalar_t* g = g_all + (r0 + r) * C;
        for (int64_t c = 0; c < C; ++c) g[c] = static_cast<scalar_t>(G[c * R + r]);
      }
    }
  });
}

template <typename scalar_t>
void kd_rows(const scalar_t* __restrict__ s_all, int64_t s_stride, const scalar_t* __restrict__ t_all,
             int64_t t_stride, const int64_t* __restrict__ y, scalar_t* __restrict__ g_all, float* ce_rows,
             float* kl_rows, int64_t rows, int64_t C, float alpha, float T, int64_t ignore_index, float inv_n) {
  const float invT = 1.0f / T;
  const float a_ce = (1.0f - alpha) * inv_n, a_kl = alpha * T * inv_n;
  constexpr bool is_float = std::is_same_v<scalar_t, float>;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(C) * (is_float ? 4 : 6));
    float *es = scratch.data(), *est = es + C, *et = est + C, *tt = et + C;
    float* sf = is_float ? nullptr : tt + C;
    float* gf = is_float ? nullptr : sf + C;
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* g = g_all + i * C;
      if (y[i] == ignore_index) {
        std::fill(g, g + C, static_cast<scalar_t>(0.0f));
        ce_rows[i] = kl_rows[i] = 0.0f;
        continue;
      }
      const scalar_t* srow = s_all + i * s_stride;
      const scalar_t* trow = t_all + i * t_stride;
      for (int64_t c = 0; c < C; ++c) tt[c] = static_cast<float>(trow[c]) * invT;
      KDRow r;
      if constexpr (is_float) {
        r = kd_row(srow, tt, g, es, est, et, C, y[i], invT, a_ce, a_kl);
      } else {
        for (int64_t c = 0; c < C; ++c) sf[c] = static_cast<float>(srow[c]);
        r = kd_row(sf, tt, gf, es, est, et, C, y[i], invT, a_ce, a_kl);
        for (int64_t c = 0; c < C; ++c) g[c] = static_cast<scalar_t>(gf[c]);
      }
      ce_rows[i] = r.ce;
      kl_rows[i] = r.kl;
    }
  });
}

// float64 inputs: the same math in double with the standard library (for gradcheck and reference-grade use).
void kd_rows_double(const double* s_all, int64_t s_stride, const double* t_all, int64_t t_stride,
                    const int64_t* y, double* g_all, double* ce_rows, double* kl_rows, int64_t rows, int64_t C,
                    double alpha, double T, int64_t ignore_index, double inv_n) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double* g = g_all + i * C;
      if (y[i] == ignore_index) {
        std::fill(g, g + C, 0.0);
        ce_rows[i] = kl_rows[i] = 0.0;
        continue;
      }
      const double* s = s_all + i * s_stride;
      const double* t = t_all + i * t_stride;
      double ms = -INFINITY, mt = -INFINITY;
      for (int64_t c = 0; c < C; ++c) {
        ms = std::max(ms, s[c]);
        mt = std::max(mt, t[c] / T);
      }
      double zs = 0, zst = 0, zt = 0, cross = 0;
      for (int64_t c = 0; c < C; ++c) {
        zs += std::exp(s[c] - ms);
        zst += std::exp((s[c] - ms) / T);
        if (t[c] > -INFINITY) {
          const double e = std::exp(t[c] / T - mt);
          zt += e;
          cross += e * (t[c] - s[c]) / T;
        }
      }
      const double lse_t = mt + std::log(zt), lse_st = ms / T + std::log(zst);
      ce_rows[i] = ms + std::log(zs) - s[y[i]];
      kl_rows[i] = cross / zt - lse_t + lse_st;
      for (int64_t c = 0; c < C; ++c) {
        const double pt = t[c] > -INFINITY ? std::exp(t[c] / T - mt) / zt : 0.0;
        g[c] = inv_n * ((1 - alpha) * std::exp(s[c] - ms) / zs +
                        alpha * T * (std::exp((s[c] - ms) / T) / zst - pt));
      }
      g[y[i]] -= inv_n * (1 - alpha);
    }
  });
}

// Returns {loss, ce, kl, grad}: loss/ce/kl are 0-dim fp32 means over non-ignored rows; grad = d loss / d s.
std::vector<at::Tensor> kd_loss_forward(const at::Tensor& student, const at::Tensor& teacher,
                                        const at::Tensor& target, double alpha, double temperature,
                                        int64_t ignore_index) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "kd_loss_forward: CPU tensors only");
  TORCH_CHECK(student.dim() == 2 && student.sizes() == teacher.sizes(),
              "kd_loss_forward: student and teacher logits must both be [B, C], got ", student.sizes(), " and ",
              teacher.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == student.size(0), "kd_loss_forward: target must be [B]");
  TORCH_CHECK(temperature > 0, "kd_loss_forward: temperature must be > 0");
  const int64_t rows = student.size(0), C = student.size(1);
  // mixed dtypes (e.g. a bf16 teacher for an fp32 student) are read as fp32
  const bool same = student.scalar_type() == teacher.scalar_type();
  auto s = same ? student : student.to(at::kFloat);
  auto t = same ? teacher : teacher.to(at::kFloat);
  if (s.stride(1) != 1) s = s.contiguous();
  if (t.stride(1) != 1) t = t.contiguous();
  auto y = target.to(at::kLong).contiguous();
  const int64_t* yp = y.data_ptr<int64_t>();
  int64_t n = 0;
  for (int64_t i = 0; i < rows; ++i) {
    if (yp[i] == ignore_index) continue;
    TORCH_CHECK(yp[i] >= 0 && yp[i] < C, "kd_loss_forward: target ", yp[i], " outside [0, ", C, ")");
    ++n;
  }
  const float inv_n = 1.0f / static_cast<float>(n > 0 ? n : 1);
  auto grad = at::empty({rows, C}, s.options());
  std::vector<double> ce_rows(rows), kl_rows(rows);
  if (s.scalar_type() == at::kDouble) {
    kd_rows_double(s.data_ptr<double>(), s.stride(0), t.data_ptr<double>(), t.stride(0), yp,
                   grad.data_ptr<double>(), ce_rows.data(), kl_rows.data(), rows, C, alpha, temperature,
                   ignore_index, 1.0 / static_cast<double>(n > 0 ? n : 1));
  } else {
    std::vector<float> ce_f(rows), kl_f(rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kd_loss_forward", [&] {
      auto run = C <= kSmallC ? kd_blocks<scalar_t> : kd_rows<scalar_t>;
      run(s.data_ptr<scalar_t>(), s.stride(0), t.data_ptr<scalar_t>(), t.stride(0), yp, grad.data_ptr<scalar_t>(),
          ce_f.data(), kl_f.data(), rows, C, static_cast<float>(alpha), static_cast<float>(temperature),
          ignore_index, inv_n);
    });
    std::copy(ce_f.begin(), ce_f.end(), ce_rows.begin());
    std::copy(kl_f.begin(), kl_f.end(), kl_rows.begin());
  }
  double ce_sum = 0.0, kl_sum = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    ce_sum += ce_rows[i];
    kl_sum += kl_rows[i];
  }
  const double inv_nd = 1.0 / static_cast<double>(n > 0 ? n : 1);
  const double ce = ce_sum * inv_nd, kl = kl_sum * inv_nd;
  const double loss = (1.0 - alpha) * ce + alpha * temperature * temperature * kl;
  auto opts = s.options().dtype(s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  return {at::scalar_tensor(loss, opts), at::scalar_tensor(ce, opts), at::scalar_tensor(kl, opts),
          same ? grad : grad.to(student.scalar_type())};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dsd2 CPU kernels";
  m.def("masked_sgd_step_", &masked_sgd_step_, "Masked SGD step over a list of tensors (in place)");
  m.def("count_positive_", &count_positive_, "Add ReLU on-state counts into an int64 tensor");
  m.def("relu_count", &relu_count, "ReLU forward that counts on-states in the same pass");
  m.def("kd_loss_forward", &kd_loss_forward, "KD loss forward with its gradient, one pass per row");
}
