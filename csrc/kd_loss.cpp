// KD loss on the CPU: (1 - a) CE(s, y) + a T^2 KL(softmax(t/T) || softmax(s/T)), batch-mean over the rows whose
// target is not ignore_index, with the gradient in the student logits written in the same pass. fp32 and float64
// rows run the level's row kernel (one template in kernels_impl.h, in float or in double) in place, fp32 rows of up
// to kKDSmallC classes its block kernel; fp16/bf16 rows are widened to fp32 first.
#include "common.h"
#include "isa.h"

#include <ATen/Parallel.h>

#include <type_traits>

namespace dsd2 {
namespace {

// The type the kernels compute in: double for float64 inputs, fp32 for the others.
template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

struct KDArgs {
  int64_t rows, C, ignore_index, n;  // n: the rows whose target is not ignore_index
  double alpha, T;
};

// The batch-mean weights in the math type: 1 / T, a_ce = (1 - a) / n and a_kl = a T / n.
template <typename F>
struct KDWeights {
  F invT, a_ce, a_kl;
  explicit KDWeights(const KDArgs& a) {
    const F alpha = static_cast<F>(a.alpha), T = static_cast<F>(a.T);
    const F inv_n = F(1) / static_cast<F>(a.n > 0 ? a.n : 1);
    invT = F(1) / T;
    a_ce = (F(1) - alpha) * inv_n;
    a_kl = alpha * T * inv_n;
  }
};

template <typename F>
auto row_kernel(const KernelTable& k) {
  if constexpr (std::is_same_v<F, double>) {
    return k.kd_row_f64;
  } else {
    return k.kd_row;
  }
}

// Small C: blocks of kKDBlockRows rows, rows as SIMD lanes (fp32 math).
template <typename scalar_t>
void kd_blocks(const scalar_t* s_all, int64_t s_stride, const scalar_t* t_all, int64_t t_stride, const int64_t* y_all,
               scalar_t* g_all, float* ce_rows, float* kl_rows, const KDArgs& a) {
  constexpr int64_t R = kKDBlockRows;
  constexpr bool is_float = std::is_same_v<scalar_t, float>;
  const KernelTable& k = active_kernels();
  const int64_t C = a.C;
  const KDWeights<float> w(a);
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
                   valid, C, w.invT, w.a_ce, w.a_kl, scratch.data(), ce, kl);
      } else {
        float *s = wide, *t = wide + C * R, *g = wide + 2 * C * R;
        for (int64_t r = 0; r < n_r; ++r) {
          for (int64_t c = 0; c < C; ++c) {
            s[r * C + c] = static_cast<float>(s_all[(r0 + r) * s_stride + c]);
            t[r * C + c] = static_cast<float>(t_all[(r0 + r) * t_stride + c]);
          }
        }
        k.kd_block(s, C, t, C, g, C, n_r, y, valid, C, w.invT, w.a_ce, w.a_kl, scratch.data(), ce, kl);
        for (int64_t i = 0; i < n_r * C; ++i) g_all[r0 * C + i] = static_cast<scalar_t>(g[i]);
      }
      for (int64_t r = 0; r < n_r; ++r) {
        ce_rows[r0 + r] = ce[r];
        kl_rows[r0 + r] = kl[r];
      }
    }
  });
}

// Large C, and every C in float64: one row at a time, vectorised within the row.
template <typename scalar_t>
void kd_rows(const scalar_t* s_all, int64_t s_stride, const scalar_t* t_all, int64_t t_stride, const int64_t* y,
             scalar_t* g_all, math_t<scalar_t>* ce_rows, math_t<scalar_t>* kl_rows, const KDArgs& a) {
  using F = math_t<scalar_t>;
  constexpr bool in_place = std::is_same_v<scalar_t, F>;  // fp32 and float64 rows are read and written as they are
  const auto kernel = row_kernel<F>(active_kernels());
  const int64_t C = a.C;
  const KDWeights<F> w(a);
  at::parallel_for(0, a.rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<F> scratch(static_cast<size_t>(C) * (in_place ? 4 : 6));
    F *tt = scratch.data() + 3 * C, *sf = tt + C, *gf = sf + C;
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* g = g_all + i * C;
      if (y[i] == a.ignore_index) {
        std::fill(g, g + C, static_cast<scalar_t>(0.0f));
        ce_rows[i] = kl_rows[i] = F(0);
        continue;
      }
      const scalar_t* srow = s_all + i * s_stride;
      const scalar_t* trow = t_all + i * t_stride;
      for (int64_t c = 0; c < C; ++c) tt[c] = static_cast<F>(trow[c]) * w.invT;
      if constexpr (in_place) {
        kernel(srow, tt, g, scratch.data(), C, y[i], w.invT, w.a_ce, w.a_kl, &ce_rows[i], &kl_rows[i]);
      } else {
        for (int64_t c = 0; c < C; ++c) sf[c] = static_cast<F>(srow[c]);
        kernel(sf, tt, gf, scratch.data(), C, y[i], w.invT, w.a_ce, w.a_kl, &ce_rows[i], &kl_rows[i]);
        for (int64_t c = 0; c < C; ++c) g[c] = static_cast<scalar_t>(gf[c]);
      }
    }
  });
}

// Every row's CE and KL terms (widened to double into ce_rows, kl_rows) and gradient (into grad).
template <typename scalar_t>
void kd_all_rows(const at::Tensor& s, const at::Tensor& t, const int64_t* y, at::Tensor& grad,
                 std::vector<double>& ce_rows, std::vector<double>& kl_rows, const KDArgs& a) {
  using F = math_t<scalar_t>;
  std::vector<F> ce(a.rows), kl(a.rows);
  const scalar_t *sp = s.data_ptr<scalar_t>(), *tp = t.data_ptr<scalar_t>();
  scalar_t* gp = grad.data_ptr<scalar_t>();
  if constexpr (std::is_same_v<F, float>) {
    auto run = a.C <= kKDSmallC ? kd_blocks<scalar_t> : kd_rows<scalar_t>;
    run(sp, s.stride(0), tp, t.stride(0), y, gp, ce.data(), kl.data(), a);
  } else {
    kd_rows<scalar_t>(sp, s.stride(0), tp, t.stride(0), y, gp, ce.data(), kl.data(), a);
  }
  std::copy(ce.begin(), ce.end(), ce_rows.begin());
  std::copy(kl.begin(), kl.end(), kl_rows.begin());
}

// The rows whose target is not ignore_index; a target outside [0, C) is refused.
int64_t kept_rows(const int64_t* y, int64_t rows, int64_t C, int64_t ignore_index) {
  int64_t n = 0;
  for (int64_t i = 0; i < rows; ++i) {
    if (y[i] == ignore_index) continue;
    TORCH_CHECK(y[i] >= 0 && y[i] < C, "kd_loss_forward: target ", y[i], " outside [0, ", C, ")");
    ++n;
  }
  return n;
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
  const KDArgs args{rows, C, ignore_index, kept_rows(yp, rows, C, ignore_index), alpha, temperature};
  auto grad = at::empty({rows, C}, s.options());
  std::vector<double> ce_rows(rows), kl_rows(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kd_loss_forward", [&] {
    kd_all_rows<scalar_t>(s, t, yp, grad, ce_rows, kl_rows, args);
  });
  double ce_sum = 0.0, kl_sum = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    ce_sum += ce_rows[i];
    kl_sum += kl_rows[i];
  }
  const double inv_nd = 1.0 / static_cast<double>(args.n > 0 ? args.n : 1);
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
