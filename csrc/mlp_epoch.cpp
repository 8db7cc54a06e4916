// One training epoch of a Linear/ReLU chain (the level loop's MLPs) in one call from Python.
//
// A step of the digits MLP is about 16 M multiply-adds: at batch 64 it is bound by per-op glue (Python dispatch,
// autograd's graph, the optimizer's loop over tensors), not by arithmetic. This file runs the very ATen ops the
// eager step runs, in its order, with the same scalars: the products autograd runs for a (masked) linear layer,
// relu and its threshold_backward, log_softmax + nll_loss and their backward formulas (or dsd2's fused KD loss,
// whose saved gradient autograd hands on as it is), the gradient accumulated into .grad as autograd does (0 + g,
// or g itself when .grad is undefined), torch.optim.Adam's single-tensor update with MaskedAdam's masking, or
// dsd2's masked SGD step. So the epoch is the eager epoch's bit for bit (tests/test_fused_step.py), below
// autograd and without Python between ops.
#include "common.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cmath>
#include <string>

namespace dsd2 {
namespace {

struct Chain {
  std::vector<at::Tensor> w, b, mask;  // b / mask undefined where the layer has none
  std::vector<bool> relu;
};

Chain make_chain(std::vector<at::Tensor>& weights, std::vector<std::optional<at::Tensor>>& biases,
                 std::vector<std::optional<at::Tensor>>& masks, const std::vector<bool>& relu_after) {
  const size_t L = weights.size();
  TORCH_CHECK(L > 0 && biases.size() == L && masks.size() == L && relu_after.size() == L,
              "mlp: weights, biases, masks and relu flags must have one entry per layer");
  Chain c;
  for (size_t i = 0; i < L; ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(),
                "mlp: layer ", i, "'s weight must be a contiguous 2-D float32 CPU tensor");
    if (i > 0) TORCH_CHECK(w.size(1) == weights[i - 1].size(0), "mlp: layer ", i, " does not follow layer ", i - 1);
    c.w.push_back(w);
    c.b.push_back(biases[i].has_value() ? *biases[i] : at::Tensor());
    at::Tensor m = masks[i].has_value() ? *masks[i] : at::Tensor();
    if (m.defined())
      TORCH_CHECK(m.scalar_type() == at::kBool && m.sizes() == w.sizes() && m.is_contiguous(),
                  "mlp: layer ", i, "'s mask must be a contiguous bool tensor of its weight's shape");
    c.mask.push_back(m);
    c.relu.push_back(relu_after[i]);
  }
  return c;
}

// The layers' W⊙M as the products read them (masked_linear's operand: the weight itself when it is 0 wherever
// pruned, which the masked optimizers keep true after every step, else a masked copy).
std::vector<at::Tensor> operands(const Chain& c) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < c.w.size(); ++i) out.push_back(c.mask[i].defined() ? masked_operand(c.w[i], c.mask[i]) : c.w[i]);
  return out;
}

// Whether every operand is its weight: then it stays so for the epoch (the optimizers re-mask after each step).
bool all_as_is(const Chain& c, const std::vector<at::Tensor>& ops) {
  for (size_t i = 0; i < ops.size(); ++i)
    if (!ops[i].is_same(c.w[i])) return false;
  return true;
}

// linear's forward, as masked_linear's C++ node and at::linear run it for a 2-D input
at::Tensor linear(const at::Tensor& x, const at::Tensor& wm, const at::Tensor& b) {
  return b.defined() ? at::addmm(b, x, wm.t()) : at::mm(x, wm.t());
}

// .grad += g as autograd's AccumulateGrad does it after zero_grad(set_to_none=False) (0 + g: a -0.0 becomes +0.0),
// or .grad = g when there is none yet
void accumulate(at::Tensor& param, const at::Tensor& g) {
  at::Tensor& grad = param.mutable_grad();
  if (!grad.defined()) {
    grad = g;
    return;
  }
  grad.zero_();
  grad.add_(g);
}

// torch.optim.Adam's _single_tensor_adam (amsgrad, maximize, capturable, differentiable, decoupled decay off) on one
// tensor, op for op with the same scalars, its host-side bias corrections in double as Python computes them.
void adam_update(at::Tensor& p, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& step_t, double lr,
                 double beta1, double beta2, double eps, double weight_decay) {
  step_t.add_(1);
  at::Tensor grad = p.grad();
  if (weight_decay != 0) grad = grad.add(p, weight_decay);
  exp_avg.lerp_(grad, 1 - beta1);
  exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
  const double step = step_t.item<double>();
  volatile double half = 0.5;  // Python's `** 0.5` is pow, not sqrt: keep the compiler from substituting one
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  const double step_size = lr / bias_correction1;
  const double bias_correction2_sqrt = std::pow(bias_correction2, static_cast<double>(half));
  at::Tensor denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps);
  p.addcdiv_(exp_avg, denom, -step_size);
}

std::optional<at::Tensor> get(const std::vector<std::optional<at::Tensor>>& v, size_t i) {
  return v[i].has_value() && v[i]->defined() ? v[i] : std::nullopt;
}

}  // namespace

// One epoch in the order `perm`, batches of `batch_size` (the last one smaller), of the chain
// x -> [linear_i -> relu if relu_after[i]]_i -> logits, from `inputs` (the training split already normalised,
// [N, in]), with cross-entropy, or with dsd2's KD loss to `teacher` ([N, C] cached logits) when it is given.
// The optimizer (`adam` or `sgd`) runs over `params` in its own order: Adam with state1/state2/steps = exp_avg /
// exp_avg_sq / step, `grad_masks` multiplied into the gradients before and `param_masks` into the parameters
// after (MaskedAdam); SGD with state1 = momentum buffers and `param_masks` its masks. Returns
// {loss_sum, correct} (fp32 sum of batch-mean loss x batch size, int64 count), accumulated as the eager epoch
// accumulates them; with KD, [ce, kl, 1] x batch size is added into kd_sums as DistillationObjective does.
std::vector<at::Tensor> mlp_epoch(const at::Tensor& inputs, const at::Tensor& labels, const at::Tensor& perm,
                                  int64_t batch_size, std::vector<at::Tensor> weights,
                                  std::vector<std::optional<at::Tensor>> biases,
                                  std::vector<std::optional<at::Tensor>> layer_masks, std::vector<bool> relu_after,
                                  std::vector<at::Tensor> params, std::vector<std::optional<at::Tensor>> grad_masks,
                                  std::vector<std::optional<at::Tensor>> param_masks,
                                  std::vector<std::optional<at::Tensor>> state1,
                                  std::vector<std::optional<at::Tensor>> state2,
                                  std::vector<std::optional<at::Tensor>> steps, const std::string& optimizer,
                                  double lr, double beta1, double beta2, double eps, double weight_decay,
                                  double momentum, bool nesterov, const std::optional<at::Tensor>& teacher,
                                  double alpha, double temperature, const std::optional<at::Tensor>& kd_sums,
                                  const std::optional<at::Tensor>& kd_one) {
  Chain c = make_chain(weights, biases, layer_masks, relu_after);
  const size_t L = c.w.size(), P = params.size();
  TORCH_CHECK(inputs.dim() == 2 && inputs.scalar_type() == at::kFloat && inputs.size(1) == c.w[0].size(1),
              "mlp_epoch: inputs must be [N, ", c.w[0].size(1), "] float32");
  TORCH_CHECK(labels.scalar_type() == at::kLong && perm.scalar_type() == at::kLong && batch_size > 0,
              "mlp_epoch: int64 labels and order, and a positive batch size");
  TORCH_CHECK(grad_masks.size() == P && param_masks.size() == P && state1.size() == P && state2.size() == P &&
                  steps.size() == P,
              "mlp_epoch: one mask and state entry per parameter");
  const bool adam = optimizer == "adam";
  TORCH_CHECK(adam || optimizer == "sgd", "mlp_epoch: optimizer must be adam or sgd, not ", optimizer);
  if (adam)
    for (size_t j = 0; j < P; ++j)
      TORCH_CHECK(get(state1, j) && get(state2, j) && get(steps, j), "mlp_epoch: Adam state missing for parameter ", j);
  const bool kd = teacher.has_value() && teacher->defined();
  if (kd) TORCH_CHECK(kd_sums.has_value() && kd_one.has_value(), "mlp_epoch: KD needs its sums and one");

  at::NoGradGuard no_grad;
  c10::impl::ExcludeDispatchKeyGuard below_autograd(c10::autograd_dispatch_keyset);  // nothing is recorded

  // SGD's lists: params that have a gradient after the first backward (all of them), its masks and buffers
  std::vector<at::Tensor> sgd_grads(P);
  std::vector<std::optional<at::Tensor>> sgd_bufs(P), sgd_masks(P);
  for (size_t j = 0; j < P; ++j) {
    sgd_bufs[j] = get(state1, j);
    sgd_masks[j] = get(param_masks, j);
  }

  const at::Tensor one = at::ones({}, inputs.options());  // loss.backward()'s incoming gradient
  at::Tensor loss_sum = at::zeros({}, inputs.options());
  at::Tensor correct = at::zeros({}, labels.options());
  std::vector<at::Tensor> wm = operands(c);
  const bool clean = all_as_is(c, wm);
  const int64_t n = perm.numel();
  std::vector<at::Tensor> h(L + 1);
  for (int64_t start = 0; start < n; start += batch_size) {
    const int64_t rows = std::min(batch_size, n - start);
    const at::Tensor idx = perm.slice(0, start, start + rows);
    if (!clean) wm = operands(c);  // a weight not yet 0 where pruned: masked anew per step, as the eager layer does
    h[0] = inputs.index_select(0, idx);
    const at::Tensor y = labels.index_select(0, idx);
    for (size_t i = 0; i < L; ++i) {
      at::Tensor a = linear(h[i], wm[i], c.b[i]);
      h[i + 1] = c.relu[i] ? at::relu(a) : a;
    }
    const at::Tensor& logits = h[L];

    at::Tensor loss, g;
    if (kd) {
      std::vector<at::Tensor> r = kd_loss_forward(logits, teacher->index_select(0, idx), y, alpha, temperature, -100);
      loss = r[0];
      g = kd_loss_backward(r[3], one);
      kd_sums->add_(at::stack({r[1], r[2], *kd_one}), rows);
    } else {
      // F.cross_entropy: log_softmax, nll_loss (mean, ignore_index -100), and autograd's formulas for both
      const at::Tensor lsm = at::_log_softmax(logits, 1, false);
      auto [l, total_weight] = at::nll_loss_forward(lsm, y, {}, at::Reduction::Mean, -100);
      loss = l;
      g = at::_log_softmax_backward_data(at::nll_loss_backward(one, lsm, y, {}, at::Reduction::Mean, -100, total_weight),
                                        lsm, 1, at::kFloat);
    }

    for (size_t k = L; k-- > 0;) {
      // dW [out, in], the weight's layout; dX for the layer below, the two side by side where that is faster
      auto [dx, dw] = k > 0 ? linear_grads(g, wm[k], h[k], c.mask[k])
                            : std::make_pair(at::Tensor(), linear_grad_weight(g, h[k], c.mask[k]));
      if (c.b[k].defined()) accumulate(c.b[k], g.sum(0));
      accumulate(c.w[k], dw);
      if (k > 0) g = c.relu[k - 1] ? at::threshold_backward(dx, h[k], 0) : dx;
    }

    if (adam) {
      for (size_t j = 0; j < P; ++j)
        if (auto m = get(grad_masks, j)) params[j].mutable_grad().mul_(*m);
      for (size_t j = 0; j < P; ++j)
        adam_update(params[j], *state1[j], *state2[j], *steps[j], lr, beta1, beta2, eps, weight_decay);
      for (size_t j = 0; j < P; ++j)
        if (auto m = get(param_masks, j)) params[j].mul_(*m);
    } else {
      for (size_t j = 0; j < P; ++j) sgd_grads[j] = params[j].grad();
      masked_sgd_step_(params, sgd_grads, sgd_bufs, sgd_masks, lr, momentum, weight_decay, nesterov, false);
    }
    loss_sum.add_(loss.mul(rows));
    correct.add_(logits.argmax(1).eq(y).sum());
  }
  return {loss_sum, correct};
}

// The eval pass of the chain over a split ([N, in], normalised) in batches of `batch_size`: float32 logits [N, C],
// as `predict` computes them through the modules (masked_linear without a gradient: linear on W⊙M).
at::Tensor mlp_forward(const at::Tensor& inputs, int64_t batch_size, std::vector<at::Tensor> weights,
                       std::vector<std::optional<at::Tensor>> biases,
                       std::vector<std::optional<at::Tensor>> layer_masks, std::vector<bool> relu_after) {
  Chain c = make_chain(weights, biases, layer_masks, relu_after);
  TORCH_CHECK(inputs.dim() == 2 && inputs.scalar_type() == at::kFloat && inputs.size(1) == c.w[0].size(1),
              "mlp_forward: inputs must be [N, ", c.w[0].size(1), "] float32");
  TORCH_CHECK(batch_size > 0, "mlp_forward: a positive batch size");
  at::NoGradGuard no_grad;
  c10::impl::ExcludeDispatchKeyGuard below_autograd(c10::autograd_dispatch_keyset);
  const std::vector<at::Tensor> wm = operands(c);
  std::vector<at::Tensor> out;
  const int64_t n = inputs.size(0);
  for (int64_t start = 0; start < n; start += batch_size) {
    at::Tensor a = inputs.slice(0, start, std::min(n, start + batch_size));
    for (size_t i = 0; i < c.w.size(); ++i) {
      a = linear(a, wm[i], c.b[i]);
      if (c.relu[i]) a = at::relu(a);
    }
    out.push_back(a);
  }
  if (out.empty()) return at::empty({0}, inputs.options());
  return at::cat(out);
}

}  // namespace dsd2
