// BatchNorm2d in training on the CPU, fp32: two passes forward (the statistics, then the normalisation) and two
// backward (the per-channel sums, then the input gradient), each one read of the map (and of its gradient) at
// memory speed: on the VGG-like's 128x32x32x32 channels_last map, 4.2 ms forward + backward against 9.5 ms for
// torch's CPU kernel (benchmarks/ops/bench_batch_norm.py, a 2-core Xeon, AVX-512). With `relu` the norm is of
// relu(x), read from the ReLU's input x in the same passes: the ReLU's own pass forward and its gradient's pass
// backward are gone (the VGG-like's conv -> ReLU -> BatchNorm).
//
// Sums: fp32 over kFold rows (kernels_impl.h), then double, in a fixed order of fixed chunks, so the result does
// not depend on the thread count; the statistics are taken about a shift k (each channel's first value) against
// cancellation, and the map is normalised as x - k, exact where x is near k. A channels_last map is [N*H*W, C]
// rows; any other is made contiguous and read as N*C planes.
#include "common.h"
#include "isa.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace dsd2 {
namespace {

constexpr int64_t kChunkRows = 256;  // rows per chunk of partial sums (channels_last): one fp32 block of the kernel
constexpr int64_t kTaskElements = 1 << 15;  // elements per task of a pass

bool rows_layout(const at::Tensor& x) {
  return x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

void check_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              "batch_norm: ", what, " must be a 4-D float32 CPU tensor");
}

// The map laid out as the kernels read it: channels_last rows, else contiguous planes.
at::Tensor as_read(const at::Tensor& x, bool rows) {
  return rows ? x.contiguous(at::MemoryFormat::ChannelsLast) : x.contiguous();
}

struct Shape {
  int64_t n, c, hw;
  int64_t count() const { return n * hw; }
};

Shape shape_of(const at::Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1);
  return {n, c, c ? x.numel() / std::max<int64_t>(n * c, 1) : 0};
}

// s1[c], s2[c] (double) of the kernel's sums over the whole map: q undefined for the statistics about k, else the
// backward's sums of q and q * (p - k).
void channel_sums(const at::Tensor& p, const at::Tensor& q, const std::vector<float>& k, bool rows, const Shape& s,
                  bool relu, std::vector<double>& s1, std::vector<double>& s2) {
  const KernelTable& kt = active_kernels();
  const float* pp = p.data_ptr<float>();
  const float* qp = q.defined() ? q.data_ptr<float>() : nullptr;
  const int64_t C = s.c;
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  if (rows) {
    const int64_t m = s.count();
    const int64_t chunks = (m + kChunkRows - 1) / kChunkRows;
    std::vector<double> part(static_cast<size_t>(2 * chunks * C), 0.0);
    const int64_t grain = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(kChunkRows * C, 1));
    at::parallel_for(0, chunks, grain, [&](int64_t b, int64_t e) {
      std::vector<float> scratch(static_cast<size_t>(2 * C));
      for (int64_t j = b; j < e; ++j) {
        const int64_t r0 = j * kChunkRows, len = std::min(kChunkRows, m - r0);
        double* d1 = part.data() + 2 * j * C;
        kt.bn_sums_rows_f32(pp + r0 * C, qp ? qp + r0 * C : nullptr, k.data(), len, C, scratch.data(), d1,
                            d1 + C, relu);
      }
    });
    for (int64_t j = 0; j < chunks; ++j)
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += part[2 * j * C + c];
        s2[c] += part[2 * j * C + C + c];
      }
    return;
  }
  const int64_t planes = s.n * C;
  std::vector<double> part(static_cast<size_t>(2 * planes), 0.0);
  const int64_t grain = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(s.hw, 1));
  at::parallel_for(0, planes, grain, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const int64_t c = j % C;
      kt.bn_sums_plane_f32(pp + j * s.hw, qp ? qp + j * s.hw : nullptr, k[c], s.hw, &part[2 * j],
                           &part[2 * j + 1], relu);
    }
  });
  for (int64_t j = 0; j < planes; ++j) {  // image by image: the same order for any thread count
    s1[j % C] += part[2 * j];
    s2[j % C] += part[2 * j + 1];
  }
}

// out = (p - kp) * a + b (q undefined) or (p - kp) * a + (q - kq) * b, per channel, in one pass (relu: the
// kernels' relu, isa.h).
void channel_affine(const at::Tensor& p, const at::Tensor& q, const std::vector<float>& kp,
                    const std::vector<float>& a, const std::vector<float>& kq, const std::vector<float>& b,
                    const at::Tensor& out, bool rows, const Shape& s, bool relu) {
  const KernelTable& kt = active_kernels();
  const float* pp = p.data_ptr<float>();
  const float* qp = q.defined() ? q.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t C = s.c;
  if (rows) {
    const int64_t m = s.count();
    const int64_t grain = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(C, 1));
    at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
      kt.bn_affine_rows_f32(pp + r0 * C, qp ? qp + r0 * C : nullptr, kp.data(), a.data(), kq.data(), b.data(),
                            op + r0 * C, r1 - r0, C, relu);
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(s.hw, 1));
  at::parallel_for(0, s.n * C, grain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t c = j % C;
      kt.bn_affine_plane_f32(pp + j * s.hw, qp ? qp + j * s.hw : nullptr, kp[c], a[c], kq[c], b[c],
                             op + j * s.hw, s.hw, relu);
    }
  });
}

std::vector<float> values_or(const std::optional<at::Tensor>& t, int64_t c, float fill) {
  if (!t.has_value() || !t->defined()) return std::vector<float>(static_cast<size_t>(c), fill);
  const at::Tensor v = t->detach().to(at::kFloat).contiguous();
  TORCH_CHECK(v.numel() == c, "batch_norm: a per-channel tensor has ", v.numel(), " values for ", c, " channels");
  return std::vector<float>(v.data_ptr<float>(), v.data_ptr<float>() + c);
}

at::Tensor channel_tensor(const std::vector<float>& v) {
  return at::from_blob(const_cast<float*>(v.data()), {static_cast<int64_t>(v.size())}, at::kFloat).clone();
}

}  // namespace

std::vector<at::Tensor> batch_norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& running_mean,
                                           const std::optional<at::Tensor>& running_var, double factor,
                                           double eps, bool relu) {
  check_input(x, "the input");
  const bool rows = rows_layout(x);
  const at::Tensor p = as_read(x, rows);
  const Shape s = shape_of(p);
  const int64_t C = s.c, m = s.count();
  TORCH_CHECK(m > 1, "batch_norm: expected more than 1 value per channel when training, got ", m);
  // the shift: each channel's first value, so a map far from 0 keeps its variance's digits
  std::vector<float> k(static_cast<size_t>(C));
  const float* pp = p.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    const float first = rows ? pp[c] : pp[c * s.hw];
    k[c] = relu && first < 0.0f ? 0.0f : first;
  }
  std::vector<double> s1, s2;
  channel_sums(p, at::Tensor(), k, rows, s, relu, s1, s2);
  // y = (x - k) * a + z with z = beta - d * a (d = mean - k, small): x - k is exact for x near k, so a map far from
  // 0 keeps its digits, where x - mean with the mean rounded to fp32 would not
  std::vector<float> mean(C), invstd(C), offset(C), a(C), z(C);
  const std::vector<float> g = values_or(weight, C, 1.0f), b = values_or(bias, C, 0.0f);
  std::vector<double> var(C);
  for (int64_t c = 0; c < C; ++c) {
    const double d = s1[c] / static_cast<double>(m);
    var[c] = std::max(0.0, s2[c] / static_cast<double>(m) - d * d);
    mean[c] = static_cast<float>(static_cast<double>(k[c]) + d);
    offset[c] = static_cast<float>(d);
    const double is = 1.0 / std::sqrt(var[c] + eps);
    invstd[c] = static_cast<float>(is);
    a[c] = static_cast<float>(g[c] * is);
    z[c] = static_cast<float>(b[c] - d * g[c] * is);
  }
  // running statistics as torch updates them: (1 - f) * running + f * batch, the variance unbiased
  const double unbias = static_cast<double>(m) / static_cast<double>(m - 1);
  if (running_mean.has_value() && running_mean->defined()) {
    at::Tensor rm = *running_mean;
    TORCH_CHECK(rm.is_contiguous() && rm.scalar_type() == at::kFloat && rm.numel() == C,
                "batch_norm: running_mean must be a contiguous float32 tensor of ", C, " values");
    float* r = rm.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) r[c] = static_cast<float>(factor * mean[c] + (1.0 - factor) * r[c]);
  }
  if (running_var.has_value() && running_var->defined()) {
    at::Tensor rv = *running_var;
    TORCH_CHECK(rv.is_contiguous() && rv.scalar_type() == at::kFloat && rv.numel() == C,
                "batch_norm: running_var must be a contiguous float32 tensor of ", C, " values");
    float* r = rv.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) r[c] = static_cast<float>(factor * var[c] * unbias + (1.0 - factor) * r[c]);
  }
  at::Tensor y = at::empty_like(p);
  channel_affine(p, at::Tensor(), k, a, k, z, y, rows, s, relu);
  return {y, channel_tensor(mean), channel_tensor(invstd), channel_tensor(k), channel_tensor(offset)};
}

// {dx, dweight, dbias} (each undefined where not asked for) of a training-mode batch norm, from the forward's
// invstd, shift and offset (mean = shift + offset); x is the forward's input (the ReLU's, with relu).
std::vector<at::Tensor> batch_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                            const std::optional<at::Tensor>& weight, const at::Tensor& invstd,
                                            const at::Tensor& shift, const at::Tensor& offset, bool need_x,
                                            bool need_weight, bool need_bias, bool relu) {
  check_input(x, "the input");
  check_input(grad, "the output gradient");
  TORCH_CHECK(grad.sizes() == x.sizes(), "batch_norm: the gradient's shape ", grad.sizes(), " differs from ",
              x.sizes());
  const bool rows = rows_layout(x);
  const at::Tensor p = as_read(x, rows), dy = as_read(grad, rows);
  const Shape s = shape_of(p);
  const int64_t C = s.c, m = s.count();
  const std::vector<float> is = values_or(invstd, C, 1.0f), k = values_or(shift, C, 0.0f),
                           d = values_or(offset, C, 0.0f);
  std::vector<double> s1, s2;
  channel_sums(p, dy, k, rows, s, relu, s1, s2);  // sum dy, sum dy * (x - k)
  for (int64_t c = 0; c < C; ++c) s2[c] -= static_cast<double>(d[c]) * s1[c];  // sum dy * (x - mean)
  at::Tensor dx, dw, db;
  if (need_weight) {
    dw = at::empty({C}, x.options());
    float* o = dw.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) o[c] = static_cast<float>(s2[c] * is[c]);
  }
  if (need_bias) {
    db = at::empty({C}, x.options());
    float* o = db.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) o[c] = static_cast<float>(s1[c]);
  }
  if (need_x) {
    // dx = a (dy - mean(dy)) + b (x - mean), a = g invstd, b = -a invstd^2 mean(dy (x - mean)); as
    // (dy - kdy) a + (x - k) b with kdy = mean(dy) - invstd^2 mean(dy (x - mean)) d, which is b (x - k - d)
    const std::vector<float> g = values_or(weight, C, 1.0f);
    std::vector<float> kdy(C), a(C), b(C);
    for (int64_t c = 0; c < C; ++c) {
      const double i2 = static_cast<double>(is[c]) * is[c], mean_dyx = s2[c] / static_cast<double>(m);
      const double ai = static_cast<double>(g[c]) * is[c];
      kdy[c] = static_cast<float>(s1[c] / static_cast<double>(m) - i2 * mean_dyx * d[c]);
      a[c] = static_cast<float>(ai);
      b[c] = static_cast<float>(-ai * i2 * mean_dyx);
    }
    dx = at::empty_like(p);
    channel_affine(dy, p, kdy, a, k, b, dx, rows, s, relu);
  }
  return {dx, dw, db};
}

}  // namespace dsd2
