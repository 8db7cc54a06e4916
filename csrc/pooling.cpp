// 2x2 max pooling, stride 2, in training on the CPU, fp32 channels_last: forward writes the max and each max's
// place in its window (one byte, 0..3); backward writes every element of the input gradient once (the max's
// gradient or 0). torch's CPU kernel stores an int64 index per output and zero-fills the whole input gradient
// before it scatters into it; on the VGG-like those passes and their fill took ~10 % of the 99.6 %-sparse epoch
// (torch.profiler's self times of aten's max-pool and fill ops, on a 2-core Intel Xeon, AVX-512).
#include "common.h"
#include "isa.h"

#include <ATen/Parallel.h>

#include <cstring>

namespace dsd2 {
namespace {

constexpr int64_t kTaskElements = 1 << 15;  // input elements per task

bool channels_last_map(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace

std::vector<at::Tensor> max_pool2_forward(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && channels_last_map(x),
              "max_pool2: the input must be a 4-D float32 channels_last CPU tensor");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), ho = H / 2, wo = W / 2;
  TORCH_CHECK(ho > 0 && wo > 0, "max_pool2: a ", H, "x", W, " map is smaller than the 2x2 window");
  at::Tensor y = at::empty({N, C, ho, wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor idx = at::empty({N, ho, wo, C}, x.options().dtype(at::kByte));
  const KernelTable& kt = active_kernels();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  uint8_t* ip = idx.data_ptr<uint8_t>();
  const int64_t row = W * C, out_row = wo * C;
  const int64_t grain = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(2 * row, 1));
  at::parallel_for(0, N * ho, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / ho, i = t % ho;
      const float* r0 = xp + (n * H + 2 * i) * row;
      kt.maxpool2_train_rows_f32(r0, r0 + row, wo, C, yp + t * out_row, ip + t * out_row);
    }
  });
  return {y, idx};
}

at::Tensor max_pool2_backward(const at::Tensor& grad, const at::Tensor& idx, at::IntArrayRef input_size) {
  TORCH_CHECK(input_size.size() == 4, "max_pool2: the input size must have 4 dimensions");
  const int64_t N = input_size[0], C = input_size[1], H = input_size[2], W = input_size[3], ho = H / 2,
                wo = W / 2;
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.dim() == 4 &&
                  grad.size(0) == N && grad.size(1) == C && grad.size(2) == ho && grad.size(3) == wo,
              "max_pool2: the output gradient must be float32 of the output's shape");
  TORCH_CHECK(idx.scalar_type() == at::kByte && idx.is_contiguous() && idx.numel() == N * ho * wo * C,
              "max_pool2: idx must be the forward's");
  const at::Tensor dy = grad.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor dx = at::empty({N, C, H, W}, grad.options().memory_format(at::MemoryFormat::ChannelsLast));
  const KernelTable& kt = active_kernels();
  const float* gp = dy.data_ptr<float>();
  const uint8_t* ip = idx.data_ptr<uint8_t>();
  float* dp = dx.data_ptr<float>();
  const int64_t row = W * C, out_row = wo * C, tail = (W - 2 * wo) * C;
  const int64_t grain = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(2 * row, 1));
  at::parallel_for(0, N * ho, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / ho, i = t % ho;
      float* d0 = dp + (n * H + 2 * i) * row;
      kt.maxpool2_grad_rows_f32(gp + t * out_row, ip + t * out_row, wo, C, d0, d0 + row);
      if (tail) {  // an odd width: the last column is in no window
        std::memset(d0 + 2 * out_row, 0, static_cast<size_t>(tail) * sizeof(float));
        std::memset(d0 + row + 2 * out_row, 0, static_cast<size_t>(tail) * sizeof(float));
      }
      if (i == ho - 1 && H > 2 * ho)  // an odd height: the last row too
        std::memset(d0 + 2 * row, 0, static_cast<size_t>(row) * sizeof(float));
    }
  });
  return dx;
}

}  // namespace dsd2
