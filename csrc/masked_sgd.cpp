// Masked SGD step on the CPU: one pass per tensor masks the gradient, adds weight decay, updates momentum, steps
// and re-masks. fp32 runs the level-specific kernel; other dtypes run the same formula here, in fp32.
#include "common.h"
#include "isa.h"

#include <ATen/Parallel.h>

namespace dsd2 {
namespace {

constexpr int64_t kGrain = 1 << 14;

// The formula of kernels_impl.h's sgd_loop, for dtypes without a level-specific kernel.
template <typename scalar_t>
void sgd_generic(scalar_t* p, const scalar_t* g, scalar_t* buf, const uint8_t* mask, int64_t n, float lr,
                 float momentum, float wd, bool nesterov) {
  for (int64_t i = 0; i < n; ++i) {
    const float keep = mask ? static_cast<float>(mask[i]) : 1.0f;
    const float w = static_cast<float>(p[i]);
    float d = static_cast<float>(g[i]) * keep + wd * w;
    if (buf) {
      const float b = (momentum * static_cast<float>(buf[i]) + d) * keep;
      buf[i] = static_cast<scalar_t>(b);
      d = nesterov ? d + momentum * b : b;
    }
    p[i] = static_cast<scalar_t>((w - lr * d) * keep);
  }
}

template <typename scalar_t>
void sgd_chunk(const KernelTable& k, scalar_t* p, const scalar_t* g, scalar_t* buf, const uint8_t* mask, int64_t n,
               float lr, float momentum, float wd, bool nesterov) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    k.sgd_f32(p, g, buf, mask, n, lr, momentum, wd, nesterov);
  } else {
    sgd_generic<scalar_t>(p, g, buf, mask, n, lr, momentum, wd, nesterov);
  }
}

// Elementwise kernels walk memory linearly: every operand must share the parameter's layout.
void check_same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.sizes() == b.sizes(), what, " shape ", b.sizes(), " differs from parameter shape ", a.sizes());
  TORCH_CHECK(b.strides() == a.strides(), what, " memory layout differs from the parameter's");
}

}  // namespace

// Masks may be undefined (unpruned parameters step as plain SGD); momentum buffers may be undefined when
// momentum == 0. `first` needs no special case: buffers start at zero, so momentum * 0 + d = d.
void masked_sgd_step_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                      std::vector<std::optional<at::Tensor>> bufs, std::vector<std::optional<at::Tensor>> masks,
                      double lr, double momentum, double weight_decay, bool nesterov, bool first) {
  (void)first;
  TORCH_CHECK(params.size() == grads.size() && params.size() == bufs.size() && params.size() == masks.size(),
              "masked_sgd_step_: params, grads, bufs and masks must have the same length");
  const KernelTable& k = active_kernels();
  const float flr = static_cast<float>(lr), fm = static_cast<float>(momentum);
  const float fwd = static_cast<float>(weight_decay);
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
    // masks are read as bytes: a byte -> float conversion vectorises, a bool one does not
    const uint8_t* mask = has_mask ? reinterpret_cast<const uint8_t*>(masks[t]->data_ptr<bool>()) : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "masked_sgd_step_", [&] {
      scalar_t* pp = p.data_ptr<scalar_t>();
      const scalar_t* gp = g.data_ptr<scalar_t>();
      scalar_t* bp = has_buf ? bufs[t]->data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, p.numel(), kGrain, [&](int64_t begin, int64_t end) {
        const uint8_t* m = mask ? mask + begin : nullptr;
        scalar_t* b = bp ? bp + begin : nullptr;
        sgd_chunk<scalar_t>(k, pp + begin, gp + begin, b, m, end - begin, flr, fm, fwd, nesterov);
      });
    });
  }
}

}  // namespace dsd2
