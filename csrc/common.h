// The torch-facing CPU ops of dsd2._C; bindings.cpp exposes them to Python.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
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
// layout; differentiable in the weight, whose gradient comes back masked. Under CPU autocast to bf16 (an fp32
// weight) W⊙M in bf16, the cast autocast would make, in the same one pass; its gradient back in fp32, masked.
at::Tensor masked_weight(const at::Tensor& weight, const at::Tensor& mask);

// The two halves of masked_weight, for the fused epoch (mlp_epoch.cpp): W⊙M as a product reads it, and
// out = where(mask, src, 0) in one flat pass (src, mask and out dense in one memory order; out may be src).
at::Tensor masked_operand(const at::Tensor& weight, const at::Tensor& mask);
void mask_flat(const at::Tensor& src, const at::Tensor& mask, const at::Tensor& out);

// A linear layer's backward products as masked_linear's node runs them: g @ W⊙M, and g^T @ x masked (mask
// contiguous, or undefined: not masked). MKL's products, or one single-threaded MKL call per thread over blocks of
// the output's rows where that measured faster for the shape and gave the same bits. `set_linear_split` ("auto",
// "on", "off") overrides the choice; `linear_split_choices` lists the shapes measured and what they chose.
at::Tensor linear_grad_input(const at::Tensor& g, const at::Tensor& wm);
at::Tensor linear_grad_weight(const at::Tensor& g, const at::Tensor& x, const at::Tensor& mask);
// Both, as linear_grad_input then linear_grad_weight, or side by side (half the threads each, one single-threaded
// MKL call per thread over a block of rows) where that measured faster for the shape and gave the same bits.
std::pair<at::Tensor, at::Tensor> linear_grads(const at::Tensor& g, const at::Tensor& wm, const at::Tensor& x,
                                               const at::Tensor& mask);
void set_linear_split(const std::string& mode);
std::vector<std::tuple<std::string, int64_t, int64_t, int64_t, int64_t, bool>> linear_split_choices();

// torch's linear and conv2d (oneDNN / MKL) on masked_weight(weight, mask), in one call.
at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias);
at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                         std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups);

// Products over kept weights only (sparse_layers.cpp): out[r, i] = bias[r] + sum_k val[k] * x[col[k], off[k] + i]
// over the entries k of row r (rowptr), i in [0, n), bias optional; and dval[k] = sum_i a[r(k), i] *
// x[col[k], off[k] + i].
void sparse_rows_(at::Tensor out, int64_t n, const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
                  const at::Tensor& off, const at::Tensor& val, const std::optional<at::Tensor>& bias);
void sparse_dots_(at::Tensor dval, const at::Tensor& a, int64_t n, const at::Tensor& x, const at::Tensor& rowptr,
                  const at::Tensor& col, const at::Tensor& off);
// grid[c, (n * hp + h * sy + oh) * wp + w * sx + ow] = t[n, c, h, w] (to_grid), or back; t of any strides
// (channels_last too); sy, sx: a strided convolution's output positions on its stride-1 grid (1 for an input)
void grid_copy_(at::Tensor grid, at::Tensor t, int64_t hp, int64_t wp, int64_t oh, int64_t ow, bool to_grid,
                int64_t sy, int64_t sx);
// grid[c, ((h + oh) * wp + w + ow) * n + img] = t[img, c, h, w] (to_grid), or back: the batch-minor grids of small
// maps, the images innermost
void batch_minor_copy_(at::Tensor grid, at::Tensor t, int64_t hp, int64_t wp, int64_t oh, int64_t ow, bool to_grid);
// sparse_rows_ of n grid positions then grid_copy_ of the map out of them, fused (the rows grid never stored)
void sparse_rows_map_(at::Tensor map, int64_t hp, int64_t wp, int64_t oh, int64_t ow, int64_t sy, int64_t sx,
                      int64_t n, const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
                      const at::Tensor& off, const at::Tensor& val, const std::optional<at::Tensor>& bias);
// Chained inference on grids (sparse_layers.cpp): a conv output's ReLU, BatchNorm and zero padding in place, and a
// 2x2 max pool from one grid into the next.
void grid_epilogue_(at::Tensor grid, int64_t n, int64_t hp, int64_t wp, int64_t ph, int64_t pw, int64_t h, int64_t w,
                    bool relu, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift);
void grid_maxpool2_(const at::Tensor& src, int64_t n, int64_t hs, int64_t ws, int64_t h, int64_t w, at::Tensor dst,
                    int64_t hd, int64_t wd, int64_t ph, int64_t pw, bool relu, const std::optional<at::Tensor>& scale,
                    const std::optional<at::Tensor>& shift);
// A stack of sparse conv stages on grids (SparseStack, dsd2/ops/sparse_inference.py), per stage: its entries' row
// pointers, operand rows (input channels) and shifts on its grid (tap_h * wp + tap_w, for the width wp the input
// width gives the stage), kept values, bias, ReLU, BatchNorm scale and shift, pool, output channels. Built (and
// every entry checked) once; `run` takes x [N, C, H, W] of the width it was built for onto its grid, then per
// stage the rows into the next grid (or, before a pool or at the end, into a grid of its own) finished as they
// are stored, the padding's zeros, the pool; the last map back as [N, C, h, w] (channels_last with
// `channels_last`). The kernels are the stage-by-stage calls' (sparse_row_post_f32: sparse_row_f32's sums).
class __attribute__((visibility("hidden"))) SparseStackPlan {  // hidden, as pybind11's own types are
 public:
  SparseStackPlan(int64_t kernel, int64_t in_channels, int64_t width, const std::vector<at::Tensor>& rowptr,
                  const std::vector<at::Tensor>& channel, const std::vector<at::Tensor>& shifts,
                  const std::vector<at::Tensor>& values, const std::vector<std::optional<at::Tensor>>& bias,
                  const std::vector<bool>& relu, const std::vector<std::optional<at::Tensor>>& scale,
                  const std::vector<std::optional<at::Tensor>>& shift, const std::vector<bool>& pool,
                  const std::vector<int64_t>& out_channels);
  at::Tensor run(const at::Tensor& x, bool channels_last) const;
  int64_t width() const { return width_; }

 private:
  struct Stage {
    at::Tensor rowptr, col, shift, values;  // col and shift as int32, checked against the stage's grid
    std::optional<at::Tensor> bias, scale, shift_bn;
    bool relu = false, pool = false;
    int64_t out_channels = 0;
  };
  int64_t kernel_, in_channels_, width_;
  std::vector<Stage> stages_;
};

// One training epoch of a Linear/ReLU chain (mlp_epoch.cpp): see there.
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
                                  const std::optional<at::Tensor>& kd_one);

// Logits of a Linear/ReLU chain for a whole split, in batches (mlp_epoch.cpp).
at::Tensor mlp_forward(const at::Tensor& inputs, int64_t batch_size, std::vector<at::Tensor> weights,
                       std::vector<std::optional<at::Tensor>> biases,
                       std::vector<std::optional<at::Tensor>> layer_masks, std::vector<bool> relu_after);

// BatchNorm2d in training, fp32 (batch_norm.cpp): {y, mean, invstd, shift, offset} (mean = shift + offset, the
// shift each channel's first value), the running statistics (when given) updated in place with factor f as torch
// does; and the backward's {dx, dweight, dbias} from invstd, shift and offset. relu: the norm of relu(x), x the
// input of a ReLU fused in ahead of it (forward and backward through both).
std::vector<at::Tensor> batch_norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& running_mean,
                                           const std::optional<at::Tensor>& running_var, double factor, double eps,
                                           bool relu);
std::vector<at::Tensor> batch_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                            const std::optional<at::Tensor>& weight, const at::Tensor& invstd,
                                            const at::Tensor& shift, const at::Tensor& offset, bool need_x,
                                            bool need_weight, bool need_bias, bool relu);

// Max pooling 2x2, stride 2, in training, fp32 channels_last (pooling.cpp): {y, idx} (idx uint8 [N, Ho, Wo, C],
// each max's place in its window), and the input gradient (channels_last, input_size) from the output's and idx.
std::vector<at::Tensor> max_pool2_forward(const at::Tensor& x);
at::Tensor max_pool2_backward(const at::Tensor& grad, const at::Tensor& idx, at::IntArrayRef input_size);

}  // namespace dsd2
