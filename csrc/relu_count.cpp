// ReLU-state counting on the CPU: counts[j] += #{b : x[b, j] > 0} (or >= 0 when inclusive), alone or fused into
// the ReLU forward. fp32 and 16-bit floats run the level-specific kernels; float64 runs a plain loop here.
#include "common.h"
#include "isa.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <mutex>

namespace dsd2 {
namespace {

uint16_t inf_bits(at::ScalarType dt) { return dt == at::kBFloat16 ? 0x7F80 : 0x7C00; }

void count_cols_f64(const double* x, double* y, int64_t* out, int64_t batch, int64_t stride, int64_t begin,
                    int64_t end, bool inclusive) {
  for (int64_t b = 0; b < batch; ++b) {
    const double* row = x + b * stride;
    for (int64_t j = begin; j < end; ++j) {
      out[j - begin] += inclusive ? row[j] >= 0.0 : row[j] > 0.0;
      if (y) y[b * stride + j] = row[j] > 0.0 ? row[j] : 0.0;
    }
  }
}

// Count (and optionally apply the ReLU into y) over columns [begin, end) of a [batch, stride] view at x; out
// holds the counts of those columns.
void count_columns(at::ScalarType dt, const void* x, void* y, int64_t* out, int64_t batch, int64_t stride,
                   int64_t begin, int64_t end, bool inclusive) {
  const KernelTable& k = active_kernels();
  switch (dt) {
    case at::kFloat:
      return k.count_cols_f32(static_cast<const float*>(x), static_cast<float*>(y), out - begin, batch, stride,
                              begin, end, inclusive);
    case at::kBFloat16:
    case at::kHalf:
      return k.count_cols_u16(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y), out - begin, batch,
                              stride, begin, end, inclusive, inf_bits(dt));
    case at::kDouble:
      return count_cols_f64(static_cast<const double*>(x), static_cast<double*>(y), out, batch, stride, begin, end,
                            inclusive);
    default:
      TORCH_CHECK(false, "ReLU-state counting: unsupported dtype ", dt);
  }
}

}  // namespace

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
  TORCH_CHECK(counts.numel() == channels, "count_positive_: counts has ", counts.numel(), " entries, expected ",
              channels);
  int64_t* out = counts.data_ptr<int64_t>();
  const auto dt = x.scalar_type();
  const char* base = static_cast<const char*>(x.data_ptr());
  if (spatial == 1) {
    at::parallel_for(0, per_sample, kCountCols, [&](int64_t begin, int64_t end) {
      count_columns(dt, base, nullptr, out + begin, batch, per_sample, begin, end, inclusive);
    });
    return;
  }
  // per channel: channel c's positions are columns [c*S, (c+1)*S) of the [batch, per_sample] view
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> scratch(spatial);
    for (int64_t c = begin; c < end; ++c) {
      std::fill(scratch.begin(), scratch.end(), 0);
      count_columns(dt, base + c * spatial * x.element_size(), nullptr, scratch.data(), batch, per_sample, 0,
                    spatial, inclusive);
      int64_t total = 0;
      for (int64_t v : scratch) total += v;
      out[c] += total;
    }
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
  TORCH_CHECK(counts.numel() == per_sample, "relu_count: counts has ", counts.numel(), " entries, expected ",
              per_sample);
  int64_t* out = counts.data_ptr<int64_t>();
  const auto dt = x.scalar_type();
  const bool streamable = dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf;
  if (streamable && batch >= 2 * at::get_num_threads() && per_sample >= kCountCols) {
    // whole samples per thread, like a plain ReLU, with full-width int32 counters merged once at the end
    const KernelTable& k = active_kernels();
    std::mutex merge;
    at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      if (dt == at::kFloat) {
        std::vector<int32_t> acc(per_sample, 0);
        k.relu_rows_f32(x.data_ptr<float>(), y.data_ptr<float>(), acc.data(), b0, b1, per_sample, inclusive);
        std::lock_guard<std::mutex> lock(merge);
        for (int64_t j = 0; j < per_sample; ++j) out[j] += acc[j];
        return;
      }
      std::vector<uint16_t> acc(per_sample);
      for (int64_t c0 = b0; c0 < b1; c0 += 65535) {  // 16-bit counters: at most 65535 rows between merges
        std::fill(acc.begin(), acc.end(), 0);
        k.relu_rows_u16(reinterpret_cast<const uint16_t*>(x.data_ptr()), reinterpret_cast<uint16_t*>(y.data_ptr()),
                        acc.data(), c0, std::min(b1, c0 + 65535), per_sample, inclusive, inf_bits(dt));
        std::lock_guard<std::mutex> lock(merge);
        for (int64_t j = 0; j < per_sample; ++j) out[j] += acc[j];
      }
    });
    return y;
  }
  at::parallel_for(0, per_sample, kCountCols, [&](int64_t begin, int64_t end) {
    count_columns(dt, x.data_ptr(), y.data_ptr(), out + begin, batch, per_sample, begin, end, inclusive);
  });
  return y;
}

}  // namespace dsd2
