// The torch-facing CPU ops of dsd2._C; bindings.cpp exposes them to Python.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

namespace dsd2 {

void masked_sgd_step_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                      std::vector<std::optional<at::Tensor>> bufs, std::vector<std::optional<at::Tensor>> masks,
                      double lr, double momentum, double weight_decay, bool nesterov, bool first);

void count_positive_(const at::Tensor& x, at::Tensor counts, bool inclusive, bool per_channel);

at::Tensor relu_count(const at::Tensor& x, at::Tensor counts, bool inclusive);

std::vector<at::Tensor> kd_loss_forward(const at::Tensor& student, const at::Tensor& teacher,
                                        const at::Tensor& target, double alpha, double temperature,
                                        int64_t ignore_index);

at::Tensor kd_loss_backward(const at::Tensor& grad, const at::Tensor& grad_loss);

// W⊙M (weight where mask, else +0) as a new tensor in the weight's layout; differentiable in the weight, whose
// gradient comes back masked.
at::Tensor masked_weight(const at::Tensor& weight, const at::Tensor& mask);

}  // namespace dsd2
