// Masked layers on the CPU: W⊙M (the weight where the mask keeps it, else +0) for oneDNN's convolutions and matrix
// products, as an autograd function whose backward masks the weight gradient, in place when no other tensor holds
// it (no allocation, no page faults, for a large layer). A weight already 0 wherever it is pruned (a masked layer's
// weight under any optimizer, the level loop's always) is W⊙M itself: one read pass checks that and the weight is
// used as it is; any other weight is masked into a new tensor by one vectorised pass.
#include "common.h"
#include "isa.h"

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

namespace dsd2 {
namespace {

// elements per task (64 KB of fp32): the check and the masking passes of a small network's layer (a 256 x 256
// weight, 256 KB) run on two cores, whose threads are still awake from the matrix product just before; measured
// on a 2-core Xeon (AVX-512), that layer's forward + backward took 1.11x the plain layer's at one thread, 1.04-1.06x
// at two
constexpr int64_t kGrain = 1 << 14;

// Whether b holds its elements in a's memory order (strides of size-1 dimensions are arbitrary: ignored).
bool same_order(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

}  // namespace

// out = where(mask, w, 0) as one flat pass over memory: w, mask and out are dense in one memory order.
void mask_flat(const at::Tensor& w, const at::Tensor& mask, const at::Tensor& out) {
  const KernelTable& k = active_kernels();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const int64_t n = w.numel();
  switch (w.scalar_type()) {
    case at::kFloat: {
      const float* src = w.data_ptr<float>();
      float* dst = out.data_ptr<float>();
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { k.mask_f32(src + b, m + b, dst + b, e - b); });
      return;
    }
    case at::kBFloat16:
    case at::kHalf: {
      const auto* src = static_cast<const uint16_t*>(w.data_ptr());
      auto* dst = static_cast<uint16_t*>(out.data_ptr());
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { k.mask_u16(src + b, m + b, dst + b, e - b); });
      return;
    }
    case at::kDouble: {
      const double* src = w.data_ptr<double>();
      double* dst = out.data_ptr<double>();
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) dst[i] = m[i] ? src[i] : 0.0;
      });
      return;
    }
    default:
      TORCH_CHECK(false, "masked_weight: the weight must be float32, float64, float16 or bfloat16, not ",
                  w.scalar_type());
  }
}

namespace {

// The mask in w's memory order: itself, or a copy laid out like w.
at::Tensor mask_like(const at::Tensor& w, const at::Tensor& mask) {
  if (same_order(w, mask) && mask.is_non_overlapping_and_dense()) return mask;
  return at::empty_like(w, w.options().dtype(at::kBool)).copy_(mask);
}

void check(const at::Tensor& w, const at::Tensor& mask) {
  TORCH_CHECK(w.device().is_cpu() && mask.device().is_cpu(), "masked_weight: CPU tensors only");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "masked_weight: the mask must be bool, not ", mask.scalar_type());
  TORCH_CHECK(mask.sizes() == w.sizes(), "masked_weight: mask shape ", mask.sizes(), " differs from weight shape ",
              w.sizes());
}

// Whether w is 0 wherever the mask prunes it, read in one pass (w and mask dense in one memory order).
bool pruned_zero(const at::Tensor& w, const at::Tensor& mask) {
  const KernelTable& k = active_kernels();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const int64_t n = w.numel();
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<uint8_t> clean(static_cast<size_t>(chunks), 1);
  const auto scalar = w.scalar_type();
  if (scalar != at::kFloat && scalar != at::kBFloat16 && scalar != at::kHalf) return false;
  constexpr int64_t kBlock = 8192;  // a weight that is not clean is usually found out in its first block
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t end = std::min(n, (c + 1) * kGrain);
      for (int64_t b = c * kGrain; b < end && clean[c]; b += kBlock) {
        const int64_t len = std::min(kBlock, end - b);
        clean[c] = scalar == at::kFloat
                       ? k.pruned_zero_f32(w.data_ptr<float>() + b, m + b, len)
                       : k.pruned_zero_u16(static_cast<const uint16_t*>(w.data_ptr()) + b, m + b, len);
      }
    }
  });
  return std::all_of(clean.begin(), clean.end(), [](uint8_t v) { return v != 0; });
}

at::Tensor masked_copy(const at::Tensor& w, const at::Tensor& mask) {
  if (!w.is_non_overlapping_and_dense()) return at::where(mask, w, at::zeros({}, w.options()));
  at::Tensor out = at::empty_like(w);  // w's memory order (channels_last stays channels_last)
  mask_flat(w, mask_like(w, mask), out);
  return out;
}

// Whether nothing but `g` can see its memory: one handle on it, and its storage held by it alone, or by it and its
// base when it is a view whose base nothing else holds (F.linear's weight gradient is the transpose of a product).
bool sole_owner(const at::Tensor& g) {
  if (g.use_count() != 1 || g.requires_grad() || !g.is_non_overlapping_and_dense()) return false;
  const auto holders = g.storage().use_count();
  if (holders == 1) return true;
  return holders == 2 && g.is_view() && g._base().use_count() == 1 && g._base().storage().is_alias_of(g.storage());
}

struct MaskedWeightFunction : public torch::autograd::Function<MaskedWeightFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight,
                            const at::Tensor& mask) {
    ctx->save_for_backward({mask});
    if (weight.is_non_overlapping_and_dense() && same_order(weight, mask) && mask.is_non_overlapping_and_dense() &&
        pruned_zero(weight, mask))
      return weight;  // W⊙M is W: autograd hands it on as a view of the weight, no copy is made
    return masked_copy(weight, mask);
  }

  // `grads` by reference: the engine moved the gradient in, so a use count of 1 means nothing else holds it
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list& grads) {
    const at::Tensor mask = ctx->get_saved_variables()[0];
    at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor()};
    // The gradient of W⊙M comes from the one product that read it. When no other tensor shares its memory it is
    // masked where it lies; otherwise (a hook kept it, or a double backward needs it) into a new tensor.
    if (g.requires_grad()) return {MaskedWeightFunction::apply(g, mask), at::Tensor()};  // a double backward
    if (!same_order(g, mask) && mask.is_non_overlapping_and_dense()) {
      // a gradient in another layout than the weight's (dsd2's small-map weight gradient of a channels_last conv):
      // copied once into the weight's layout and masked there, rather than the mask copied into the gradient's
      // layout and the result copied again by the accumulation into .grad
      at::Tensor out = at::empty_like(mask, g.options()).copy_(g);
      mask_flat(out, mask, out);
      return {out, at::Tensor()};
    }
    if (sole_owner(g)) {
      mask_flat(g, mask_like(g, mask), g);
      return {g, at::Tensor()};
    }
    return {masked_copy(g, mask), at::Tensor()};
  }
};

}  // namespace

// W⊙M as the products read it: the weight itself when it is 0 wherever pruned, else a masked copy.
at::Tensor masked_operand(const at::Tensor& weight, const at::Tensor& mask) {
  const bool as_is = weight.is_non_overlapping_and_dense() && same_order(weight, mask) &&
                     mask.is_non_overlapping_and_dense() && pruned_zero(weight, mask);
  return as_is ? weight : masked_copy(weight, mask);
}

namespace {

// ---- The linear layer's backward products, split by rows where that pays ----
// MKL parallelises one product over the threads itself. For some shapes one single-threaded MKL call per thread,
// each over a block of the output's rows, is faster: on a 2-core Zen 4 (AVX-512), LeNet-300-100's 784->300 and
// 300->100 at batch 128 (forward + backward 0.80-0.93x and 0.78-0.83x the plain layer's time, in two runs), while
// splitting the digits MLP's 64->256 too cost it 2-3 %. The weight
// gradient's block is masked while it is still in its core's cache. Which way is faster depends on the shape and
// the machine, so it is measured at a shape's first call; a split whose results differ from the whole product's
// in any bit is never taken (the layer stays nn.Linear's bit for bit).

constexpr int64_t kMinBlockRows = 32;  // MKL's own threading splits K for thinner outputs, and its bits differ
constexpr int64_t kMinMacs = 1 << 20;  // below, a product takes tens of microseconds: too little to gain, or time

std::atomic<int> split_mode{0};  // 0 auto, 1 on (wherever the shape allows), 2 off

struct SplitChoices {
  std::mutex mu;
  std::map<std::array<int64_t, 6>, bool> chosen;  // {product, rows, cols, depth, threads, masked} -> split
};

SplitChoices& split_choices() {
  static SplitChoices c;
  return c;
}

// out = a @ b as one MKL call per thread over a block of out's rows, each block masked (mask: out's shape and
// layout, or undefined) right after its product. out is contiguous.
void mm_by_rows(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& mask) {
  const int64_t rows = out.size(0), cols = out.size(1);
  const int64_t threads = at::get_num_threads();
  const at::Tensor a0 = a.detach(), b0 = b.detach(), out0 = out.detach();
  const uint8_t* m = mask.defined() ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  const KernelTable& k = active_kernels();
  at::parallel_for(0, rows, (rows + threads - 1) / threads, [&](int64_t r0, int64_t r1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain products in a worker thread
    at::Tensor block = out0.narrow(0, r0, r1 - r0);
    at::mm_out(block, a0.narrow(0, r0, r1 - r0), b0);
    if (m != nullptr) k.mask_f32(block.data_ptr<float>(), m + r0 * cols, block.data_ptr<float>(), block.numel());
  });
}

bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.is_contiguous() && b.is_contiguous() &&
         std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) == 0;
}

bool same_bits(const std::pair<at::Tensor, at::Tensor>& a, const std::pair<at::Tensor, at::Tensor>& b) {
  return same_bits(a.first, b.first) && same_bits(a.second, b.second);
}

// The product `whole` (MKL's threads) or `split` (mm_by_rows), as chosen for this key; at the key's first call
// both run, their bits are compared, and rounds of the two in turn time them (at least 7, and 20 ms or 31 rounds):
// the split is taken where the median of its time over the whole product's is under 0.97.
template <class Whole, class Split>
auto choose(const std::array<int64_t, 6>& key, const Whole& whole, const Split& split) -> decltype(whole()) {
  const int mode = split_mode.load();
  if (mode != 0) return mode == 1 ? split() : whole();
  SplitChoices& c = split_choices();
  int verdict = -1;  // read under the lock, acted on after it: `whole` may choose again (linear_grads' does)
  {
    std::lock_guard<std::mutex> lock(c.mu);
    const auto it = c.chosen.find(key);
    if (it != c.chosen.end()) verdict = it->second;
  }
  if (verdict >= 0) return verdict ? split() : whole();
  auto result = whole();
  bool faster = same_bits(result, split());
  if (faster) {
    using clock = std::chrono::steady_clock;
    std::vector<double> ratios;
    const auto start = clock::now();
    for (int round = 0; round < 31 && (round < 7 || clock::now() - start < std::chrono::milliseconds(20)); ++round) {
      double seconds[2];
      for (int i = 0; i < 2; ++i) {
        const int which = (round + i) % 2;  // who goes first alternates
        const auto t0 = clock::now();
        (void)(which == 0 ? whole() : split());
        seconds[which] = std::chrono::duration<double>(clock::now() - t0).count();
      }
      ratios.push_back(seconds[1] / seconds[0]);
    }
    const auto middle = ratios.begin() + static_cast<std::ptrdiff_t>(ratios.size() / 2);
    std::nth_element(ratios.begin(), middle, ratios.end());
    faster = *middle < 0.97;
  }
  std::lock_guard<std::mutex> lock(c.mu);
  c.chosen.emplace(key, faster);
  return result;
}

// Whether a product of `rows` x `cols` outputs over `depth` may be split: fp32 on the CPU, two threads or more,
// each with a block of at least kMinBlockRows rows, kMinMacs in all, not already inside a parallel region.
bool splittable(const at::Tensor& a, const at::Tensor& b, int64_t rows, int64_t cols, int64_t depth) {
  const int64_t threads = at::get_num_threads();
  return a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.device().is_cpu() && threads >= 2 &&
         rows >= threads * kMinBlockRows && rows * cols * depth >= kMinMacs && !at::in_parallel_region();
}

}  // namespace

at::Tensor linear_grad_input(const at::Tensor& g, const at::Tensor& wm) {
  if (!splittable(g, wm, g.size(0), wm.size(1), wm.size(0))) return g.mm(wm);
  return choose({0, g.size(0), wm.size(1), wm.size(0), at::get_num_threads(), 0}, [&] { return g.mm(wm); }, [&] {
    at::Tensor out = at::empty({g.size(0), wm.size(1)}, g.options());
    mm_by_rows(out, g, wm, at::Tensor());
    return out;
  });
}

at::Tensor linear_grad_weight(const at::Tensor& g, const at::Tensor& x, const at::Tensor& mask) {
  const bool masked = mask.defined();
  auto whole = [&] {
    at::Tensor dw = g.t().mm(x);  // [out, in], contiguous: the weight's own layout
    if (masked) mask_flat(dw, mask, dw);
    return dw;
  };
  if (!splittable(g, x, g.size(1), x.size(1), g.size(0)) || (masked && !mask.is_contiguous())) return whole();
  return choose({1, g.size(1), x.size(1), g.size(0), at::get_num_threads(), masked}, whole, [&] {
    at::Tensor out = at::empty({g.size(1), x.size(1)}, g.options());
    mm_by_rows(out, g.t(), x, mask);
    return out;
  });
}

namespace {

// dX = g @ W⊙M and dW = g^T @ x masked at once: the threads split between the two products (half each), every
// thread one single-threaded MKL call over a block of its product's rows, dW's blocks masked in their core's
// cache. Two small products side by side, each on its own cores, beat the same two one after the other, each
// threaded by MKL: a product of a few million MACs scales poorly over threads.
std::pair<at::Tensor, at::Tensor> grads_side_by_side(const at::Tensor& g, const at::Tensor& wm, const at::Tensor& x,
                                                     const at::Tensor& mask) {
  const int64_t threads = at::get_num_threads(), nx = threads / 2, nw = threads - nx;
  const int64_t rx = g.size(0), rw = g.size(1), cw = x.size(1);
  at::Tensor dx = at::empty({rx, wm.size(1)}, g.options()), dw = at::empty({rw, cw}, g.options());
  const at::Tensor g0 = g.detach(), gt = g0.t(), wm0 = wm.detach(), x0 = x.detach();
  const uint8_t* m = mask.defined() ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  const KernelTable& k = active_kernels();
  const int64_t bx = (rx + nx - 1) / nx, bw = (rw + nw - 1) / nw;  // rows per block
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain products in a worker thread
    for (int64_t t = t0; t < t1; ++t) {
      if (t < nx) {
        const int64_t r0 = t * bx, len = std::min(bx, rx - r0);
        if (len <= 0) continue;
        at::Tensor block = dx.narrow(0, r0, len);
        at::mm_out(block, g0.narrow(0, r0, len), wm0);
      } else {
        const int64_t r0 = (t - nx) * bw, len = std::min(bw, rw - r0);
        if (len <= 0) continue;
        at::Tensor block = dw.narrow(0, r0, len);
        at::mm_out(block, gt.narrow(0, r0, len), x0);
        if (m != nullptr) k.mask_f32(block.data_ptr<float>(), m + r0 * cw, block.data_ptr<float>(), block.numel());
      }
    }
  });
  return {dx, dw};
}

// Whether the two products may run side by side: fp32, contiguous operands, two threads or more, each product
// splittable (kMinBlockRows rows per thread of its output, so MKL's threads split its rows, not its depth, and a
// single-threaded call gives its bits), kMinMacs each, not already inside a parallel region.
bool side_by_side_allowed(const at::Tensor& g, const at::Tensor& wm, const at::Tensor& x, const at::Tensor& mask) {
  const int64_t threads = at::get_num_threads();
  const bool dense = g.is_contiguous() && wm.is_contiguous() && x.is_contiguous() &&
                     (!mask.defined() || mask.is_contiguous());
  return threads >= 2 && dense && g.scalar_type() == at::kFloat && wm.scalar_type() == at::kFloat &&
         x.scalar_type() == at::kFloat && g.device().is_cpu() && !at::in_parallel_region() &&
         g.size(0) >= threads * kMinBlockRows && g.size(1) >= threads * kMinBlockRows &&
         g.size(0) * g.size(1) * x.size(1) >= kMinMacs;
}

}  // namespace

std::pair<at::Tensor, at::Tensor> linear_grads(const at::Tensor& g, const at::Tensor& wm, const at::Tensor& x,
                                               const at::Tensor& mask) {
  auto one_then_other = [&] { return std::make_pair(linear_grad_input(g, wm), linear_grad_weight(g, x, mask)); };
  if (!side_by_side_allowed(g, wm, x, mask)) return one_then_other();
  return choose({2, g.size(0), x.size(1), g.size(1), at::get_num_threads(), mask.defined()}, one_then_other,
                [&] { return grads_side_by_side(g, wm, x, mask); });
}

void set_linear_split(const std::string& mode) {
  TORCH_CHECK(mode == "auto" || mode == "on" || mode == "off", "linear split '", mode,
              "' is not known; allowed: auto, on, off");
  split_mode.store(mode == "auto" ? 0 : mode == "on" ? 1 : 2);  // auto keeps what it measured before
}

std::vector<std::tuple<std::string, int64_t, int64_t, int64_t, int64_t, bool>> linear_split_choices() {
  SplitChoices& c = split_choices();
  std::lock_guard<std::mutex> lock(c.mu);
  std::vector<std::tuple<std::string, int64_t, int64_t, int64_t, int64_t, bool>> out;
  for (const auto& [key, split] : c.chosen)
    out.emplace_back(key[0] == 0   ? "grad_input"
                     : key[0] == 2 ? (key[5] ? "both_masked" : "both")
                     : key[5]      ? "grad_weight_masked"
                                   : "grad_weight",
                     key[1], key[2], key[3], key[4], split);
  return out;
}

namespace {

// A 2-D masked linear layer as one autograd node: the products autograd would run for `linear` (addmm, and in
// backward grad @ W⊙M, grad^T @ x, the column sums), so the results are nn.Linear's bit for bit, with dW masked
// where it is made. One node instead of linear's two and the mask's one: a small layer's step is mostly glue.
struct MaskedLinearFunction : public torch::autograd::Function<MaskedLinearFunction> {
  // `bias` empty for none: autograd functions take tensors, not optional ones, as inputs with gradients
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& mask, const at::Tensor& bias) {
    const at::Tensor wm = masked_operand(weight, mask);
    // W⊙M saved apart only when it is a copy (the weight itself is saved once); no bias is the empty placeholder,
    // whose gradient nothing needs
    const bool copied = !wm.is_same(weight);
    ctx->save_for_backward({x, weight, mask, copied ? wm : at::Tensor()});
    return bias.numel() > 0 ? at::addmm(bias, x, wm.t()) : at::mm(x, wm.t());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mask = saved[2];
    const at::Tensor& g = grads[0];
    // A double backward records what runs here: then W⊙M and dW⊙M by torch's own select, from the inputs
    const bool recorded = at::GradMode::is_enabled();
    const at::Tensor zero = recorded ? at::zeros({}, g.options()) : at::Tensor();
    const at::Tensor wm = recorded ? at::where(mask, saved[1], zero) : saved[3].defined() ? saved[3] : saved[1];
    at::Tensor dx, dw, db;
    const bool both = ctx->needs_input_grad(0) && ctx->needs_input_grad(1) && !recorded && mask.is_contiguous();
    if (both) {
      std::tie(dx, dw) = linear_grads(g, wm, x, mask);  // dW [out, in], contiguous: the weight's own layout
    } else if (ctx->needs_input_grad(0)) {
      dx = recorded ? g.mm(wm) : linear_grad_input(g, wm);
    }
    if (ctx->needs_input_grad(1) && !both) {
      if (recorded) {
        dw = at::where(mask, g.t().mm(x), zero);
      } else if (mask.is_contiguous()) {
        dw = linear_grad_weight(g, x, mask);  // [out, in], contiguous: the weight's own layout
      } else {
        dw = masked_copy(g.t().mm(x), mask);
      }
    }
    if (ctx->needs_input_grad(3)) db = g.sum(0);
    return {dx, dw, at::Tensor(), db};
  }
};

// W⊙M in bf16 under CPU autocast, in one pass: the mask and the cast autocast would make next (the plain layer's
// one pass over W) together, where the check of W and then autocast's cast were two. Its backward takes the bf16
// weight gradient to fp32 and masks it in one pass, where autocast's cast back and the masking pass were two.
at::Tensor masked_bf16(const at::Tensor& w, const at::Tensor& mask) {
  at::Tensor out = at::empty_like(w, w.options().dtype(at::kBFloat16));  // w's memory order
  const KernelTable& k = active_kernels();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const float* src = w.data_ptr<float>();
  auto* dst = static_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, w.numel(), kGrain,
                   [&](int64_t b, int64_t e) { k.mask_to_bf16(src + b, m + b, dst + b, e - b); });
  return out;
}

struct MaskedBf16Function : public torch::autograd::Function<MaskedBf16Function> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& mask) {
    const at::Tensor m = mask_like(weight, mask);  // in the weight's order: the gradient is made in it
    ctx->save_for_backward({m});
    return masked_bf16(weight, m);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list& grads) {
    const at::Tensor mask = ctx->get_saved_variables()[0];
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor()};
    if (g.requires_grad())  // a double backward: torch's own ops, recorded
      return {at::where(mask, g, at::zeros({}, g.options())).to(at::kFloat), at::Tensor()};
    const at::Tensor src = same_order(g, mask) && g.is_non_overlapping_and_dense() && g.scalar_type() == at::kBFloat16
                               ? g
                               : at::empty_like(mask, g.options().dtype(at::kBFloat16)).copy_(g);
    at::Tensor out = at::empty_like(mask, g.options().dtype(at::kFloat));
    const KernelTable& k = active_kernels();
    const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
    const auto* from = static_cast<const uint16_t*>(src.data_ptr());
    float* to = out.data_ptr<float>();
    at::parallel_for(0, out.numel(), kGrain,
                     [&](int64_t b, int64_t e) { k.mask_from_bf16(from + b, m + b, to + b, e - b); });
    return {out, at::Tensor()};
  }
};

// Whether the weight goes to a product in bf16 under CPU autocast (an fp32 weight, dense, autocast's dtype bf16).
bool autocast_bf16(const at::Tensor& weight, const at::Tensor& mask) {
  return at::autocast::is_autocast_enabled(at::kCPU) &&
         at::autocast::get_autocast_dtype(at::kCPU) == at::kBFloat16 && weight.scalar_type() == at::kFloat &&
         weight.is_non_overlapping_and_dense() && mask.is_non_overlapping_and_dense();
}

}  // namespace

at::Tensor masked_weight(const at::Tensor& weight, const at::Tensor& mask) {
  check(weight, mask);
  const bool graph = at::GradMode::is_enabled() && weight.requires_grad();
  if (autocast_bf16(weight, mask))
    return graph ? MaskedBf16Function::apply(weight, mask) : masked_bf16(weight, mask_like(weight, mask));
  if (!graph) return masked_operand(weight, mask);  // no gradient to mask: no autograd node either
  return MaskedWeightFunction::apply(weight, mask);
}

// One call from Python per layer: a layer of a small network runs in microseconds, so the glue counts.
at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias) {
  check(weight, mask);
  const bool graph = at::GradMode::is_enabled() &&
                     (x.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()));
  if (x.dim() == 2 && graph && !x.is_mkldnn() && x.scalar_type() == weight.scalar_type() &&
      (!bias.has_value() || bias->scalar_type() == weight.scalar_type()) &&
      !at::autocast::is_autocast_enabled(at::kCPU))
    return MaskedLinearFunction::apply(x, weight, mask,
                                       bias.has_value() && bias->defined() ? *bias : at::empty({0}, x.options()));
  return at::linear(x, masked_weight(weight, mask), bias);
}

at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                         std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
  return at::conv2d(x, masked_weight(weight, mask), bias, stride, padding, dilation, groups);
}

}  // namespace dsd2
