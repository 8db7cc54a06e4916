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

// W⊙M (weight where mask, else +0): the weight itself when it is 0 wherever pruned, else a new tensor in its
// layout; differentiable in the weight, whose gradient comes back masked.
at::Tensor masked_weight(const at::Tensor& weight, const at::Tensor& mask);

// torch's linear and conv2d (oneDNN / MKL) on masked_weight(weight, mask), in one call.
at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias);
at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                         std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups);

}  // namespace dsd2
