// CPU fast path of dsd2's fused ops, built into dsd2._C. OpenMP over elements or rows; the inner
// loops are plain strided-free arithmetic that the compiler vectorises. Reduced-precision inputs
// are read as-is and accumulated in fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kGrain = 1 << 14;

template <typename scalar_t>
void masked_sgd_tensor(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                       scalar_t* __restrict__ buf, const bool* __restrict__ mask, int64_t n,
                       float lr, float momentum, float wd, bool nesterov, bool first) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float keep = mask ? static_cast<float>(mask[i]) : 1.0f;
      const float w = static_cast<float>(p[i]);
      float d = static_cast<float>(g[i]) * keep + wd * w;
      if (buf) {
        const float b = first ? d : momentum * static_cast<float>(buf[i]) + d;
        buf[i] = static_cast<scalar_t>(b * keep);
        d = nesterov ? d + momentum * b : b;
      }
      p[i] = static_cast<scalar_t>((w - lr * d) * keep);
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
                                  static_cast<float>(weight_decay), nesterov, first);
    });
  }
}

template <typename scalar_t>
void count_positive_impl(const scalar_t* __restrict__ data, int64_t* __restrict__ out, int64_t batch,
                         int64_t per_sample, int64_t channels, int64_t spatial, bool inclusive) {
  at::parallel_for(0, channels, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t total = 0;
      for (int64_t b = 0; b < batch; ++b) {
        const scalar_t* row = data + b * per_sample + c * spatial;
        int64_t part = 0;
#pragma omp simd reduction(+ : part)
        for (int64_t s = 0; s < spatial; ++s) {
          const float v = static_cast<float>(row[s]);
          part += inclusive ? (v >= 0.0f) : (v > 0.0f);
        }
        total += part;
      }
      out[c] += total;
    }
  });
}

template <typename scalar_t>
void relu_count_impl(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t* __restrict__ out,
                     int64_t batch, int64_t per_sample, bool inclusive) {
  at::parallel_for(0, per_sample, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t b = 0; b < batch; ++b) {
      const scalar_t* row = src + b * per_sample;
      scalar_t* orow = dst + b * per_sample;
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) {
        const float v = static_cast<float>(row[j]);
        orow[j] = v > 0.0f ? row[j] : static_cast<scalar_t>(0.0f);
        out[j] += inclusive ? (v >= 0.0f) : (v > 0.0f);
      }
    }
  });
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "count_positive_", [&] {
    count_positive_impl<scalar_t>(x.data_ptr<scalar_t>(), counts.data_ptr<int64_t>(), batch, per_sample,
                                  channels, spatial, inclusive);
  });
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relu_count", [&] {
    relu_count_impl<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), counts.data_ptr<int64_t>(),
                              batch, per_sample, inclusive);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dsd2 CPU kernels";
  m.def("masked_sgd_step_", &masked_sgd_step_, "Masked SGD step over a list of tensors (in place)");
  m.def("count_positive_", &count_positive_, "Add ReLU on-state counts into an int64 tensor");
  m.def("relu_count", &relu_count, "ReLU forward that counts on-states in the same pass");
}
