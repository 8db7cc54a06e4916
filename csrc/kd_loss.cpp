// KD loss on the CPU: (1 - a) CE(s, y) + a T^2 KL(softmax(t/T) || softmax(s/T)), batch-mean over the rows whose
// target is not ignore_index, with the gradient in the student logits written in the same pass. fp32 rows run
// the level-specific kernels in place; fp16/bf16 rows are widened to fp32 first; float64 runs in double here.
#include "isa.h"
#include "ops.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace dsd2 {
namespace {

struct KDArgs {
  int64_t rows, C, ignore_index;
  float alpha, T, inv_n;
};

// Small C: blocks of kKDBlockRows rows, rows as SIMD lanes.
template <typename scalar_t>
void kd_blocks(const scalar_t* s_all, int64_t s_stride, const scalar_t* t_all, int64_t t_stride, const int64_t* y_all,
               scalar_t* g_all, float* ce_rows, float* kl_rows, const KDArgs& a) {
  constexpr int64_t R = kKDBlockRows;
  constexpr bool is_float = std::is_same_v<scalar_t, float>;
  const KernelTable& k = active_kernels();
  const int64_t C = a.C;
  const float invT = 1.0f / a.T, a_ce = (1.0f - a.alpha) * a.inv_n, a_kl = a.alpha * a.T * a.inv_n;
  const int64_t blocks = (a.rows + R - 1) / R;
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(C) * R * (is_float ? 6 : 9));
    float* wide = scratch.data() + C * R * 6;  // fp16/bf16 only: s, t and g rows widened to fp32
    int64_t y[R];
    float valid[R], ce[R], kl[R];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * R, n_r = std::min(R, a.rows - r0);
      for (int64_t r = 0; r < R; ++r) {
        const bool live = r < n_r && y_all[r0 + r] != a.ignore_index;
        valid[r] = live ? 1.0f : 0.0f;
        y[r] = live ? y_all[r0 + r] : 0;
      }
      if constexpr (is_float) {
        k.kd_block(s_all + r0 * s_stride, s_stride, t_all + r0 * t_stride, t_stride, g_all + r0 * C, C, n_r, y,
                   valid, C, invT, a_ce, a_kl, scratch.data(), ce, kl);
      } else {
        float *s = wide, *t = wide + C * R, *g = wide + 2 * C * R;
        for (int64_t r = 0; r < n_r; ++r) {
          for (int64_t c = 0; c < C; ++c) {
            s[r * C + c] = static_cast<float>(s_all[(r0 + r) * s_stride + c]);
            t[r * C + c] = static_cast<float>(t_all[(r0 + r) * t_stride + c]);
          }
        }
        k.kd_block(s, C, t, C, g, C, n_r, y, valid, C, invT, a_ce, a_kl, scratch.data(), ce, kl);
        for (int64_t i = 0; i < n_r * C; ++i) g_all[r0 * C + i] = static_cast<scalar_t>(g[i]);
      }
      for (int64_t r = 0; r < n_r; ++r) {
        ce_rows[r0 + r] = ce[r];
        kl_rows[r0 + r] = kl[r];
      }
    }
  });
}

// Large C: one row at a time, vectorised within the row.
template <typename scalar_t>
void kd_rows(const scalar_t* s_all, int64_t s_stride, const scalar_t* t_all, int64_t t_stride, const int64_t* y,
             scalar_t* g_all, float* ce_rows, float* kl_rows, const KDArgs& a) {
  constexpr bool is_float = std::is_same_v<scalar_t, float>;
  const KernelTable& k = active_kernels();
  const int64_t C = a.C;
  const float invT = 1.0f / a.T, a_ce = (1.0f - a.alpha) * a.inv_n, a_kl = a.alpha * a.T * a.inv_n;
  at::parallel_for(0, a.rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(C) * (is_float ? 4 : 6));
    float *tt = scratch.data() + 3 * C, *sf = tt + C, *gf = sf + C;
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* g = g_all + i * C;
      if (y[i] == a.ignore_index) {
        std::fill(g, g + C, static_cast<scalar_t>(0.0f));
        ce_rows[i] = kl_rows[i] = 0.0f;
        continue;
      }
      const scalar_t* srow = s_all + i * s_stride;
      const scalar_t* trow = t_all + i * t_stride;
      for (int64_t c = 0; c < C; ++c) tt[c] = static_cast<float>(trow[c]) * invT;
      if constexpr (is_float) {
        k.kd_row(srow, tt, g, scratch.data(), C, y[i], invT, a_ce, a_kl, &ce_rows[i], &kl_rows[i]);
      } else {
        for (int64_t c = 0; c < C; ++c) sf[c] = static_cast<float>(srow[c]);
        k.kd_row(sf, tt, gf, scratch.data(), C, y[i], invT, a_ce, a_kl, &ce_rows[i], &kl_rows[i]);
        for (int64_t c = 0; c < C; ++c) g[c] = static_cast<scalar_t>(gf[c]);
      }
    }
  });
}

// float64 inputs: the same math in double with the standard library (gradcheck and reference-grade use).
void kd_rows_double(const double* s_all, int64_t s_stride, const double* t_all, int64_t t_stride, const int64_t* y,
                    double* g_all, double* ce_rows, double* kl_rows, int64_t rows, int64_t C, double alpha, double T,
                    int64_t ignore_index, double inv_n) {
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
        g[c] = inv_n * ((1 - alpha) * std::exp(s[c] - ms) / zs + alpha * T * (std::exp((s[c] - ms) / T) / zst - pt));
      }
      g[y[i]] -= inv_n * (1 - alpha);
    }
  });
}

}  // namespace

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
  auto grad = at::empty({rows, C}, s.options());
  std::vector<double> ce_rows(rows), kl_rows(rows);
  if (s.scalar_type() == at::kDouble) {
    kd_rows_double(s.data_ptr<double>(), s.stride(0), t.data_ptr<double>(), t.stride(0), yp, grad.data_ptr<double>(),
                   ce_rows.data(), kl_rows.data(), rows, C, alpha, temperature, ignore_index,
                   1.0 / static_cast<double>(n > 0 ? n : 1));
  } else {
    std::vector<float> ce_f(rows), kl_f(rows);
    const KDArgs args{rows, C, ignore_index, static_cast<float>(alpha), static_cast<float>(temperature),
                      1.0f / static_cast<float>(n > 0 ? n : 1)};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kd_loss_forward", [&] {
      auto run = C <= kKDSmallC ? kd_blocks<scalar_t> : kd_rows<scalar_t>;
      run(s.data_ptr<scalar_t>(), s.stride(0), t.data_ptr<scalar_t>(), t.stride(0), yp, grad.data_ptr<scalar_t>(),
          ce_f.data(), kl_f.data(), args);
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

// Backward: the saved gradient times the incoming one. loss.backward() passes exactly 1, and then the saved
// gradient is returned as it is, so autograd hands it to .grad with no B x C product and no copy. Reading the
// incoming value is a read of CPU memory (this op only ever sees CPU tensors), not a device sync.
at::Tensor kd_loss_backward(const at::Tensor& grad, const at::Tensor& grad_loss) {
  TORCH_CHECK(grad.device().is_cpu() && grad_loss.device().is_cpu() && grad_loss.numel() == 1,
              "kd_loss_backward: CPU tensors and a one-element incoming gradient only");
  const double scale = *grad_loss.to(at::kDouble).contiguous().data_ptr<double>();
  if (scale == 1.0) return grad;
  return grad * grad_loss.to(grad.scalar_type());
}

}  // namespace dsd2
