// The CPU kernels of dsd2._C, compiled once per instruction-set level and chosen at run time.
//
// Each level's kernels live in their own translation unit (isa_default.cpp, isa_avx2.cpp, isa_avx512.cpp) that
// includes kernels_impl.h under `#pragma GCC target(...)` inside a namespace of its own, so no inline function is
// shared between levels and nothing compiled for AVX-512 can leak into code that runs on an AVX2 machine. Those
// units include no torch header; the ops (masked_sgd.cpp, relu_count.cpp, kd_loss.cpp, masked_layers.cpp,
// sparse_layers.cpp) call them through the table below. The ops' own declarations, for bindings.cpp, are in common.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dsd2 {

// What a row of a convolution's output takes as it is stored (inference on grids, sparse_layers.cpp): v = relu(v)
// with `relu` (a NaN stays NaN, as under torch.relu), then v = v * a + z with `affine` (an eval-mode BatchNorm).
struct RowPost {
  bool relu = false;
  bool affine = false;
  float a = 1.0f;
  float z = 0.0f;
};

struct KernelTable {
  const char* name;
  // p -= lr * d with d = g * keep + wd * p, momentum and Nesterov as torch.optim.SGD, then p *= keep.
  // Every product and sum is rounded on its own (no fused multiply-add), so all levels agree bit for bit.
  void (*sgd_f32)(float* p, const float* g, float* buf, const uint8_t* mask, int64_t n, float lr, float momentum,
                  float wd, bool nesterov);
  // counts[j] += #{b : x[b, begin + j] on} for columns [begin, end) of a [batch, stride] view; y (optional)
  // receives relu(x) at the same positions.
  void (*count_cols_f32)(const float* x, float* y, int64_t* out, int64_t batch, int64_t stride, int64_t begin,
                         int64_t end, bool inclusive);
  void (*count_cols_u16)(const uint16_t* x, uint16_t* y, int64_t* out, int64_t batch, int64_t stride,
                         int64_t begin, int64_t end, bool inclusive, uint16_t inf_bits);
  // rows [b0, b1) of a [*, width] activation: y = relu(x), acc[j] += on(x[b, j])
  void (*relu_rows_f32)(const float* x, float* y, int32_t* acc, int64_t b0, int64_t b1, int64_t width,
                        bool inclusive);
  // 16-bit data counts into 16-bit counters: at most 65535 rows per call
  void (*relu_rows_u16)(const uint16_t* x, uint16_t* y, uint16_t* acc, int64_t b0, int64_t b1, int64_t width,
                        bool inclusive, uint16_t inf_bits);
  // KD loss of one row of C classes (large C): s student logits, tt teacher logits already divided by T.
  // g receives the gradient of the batch-mean loss; scratch holds 3 * C values. kd_row_f64 is the same kernel
  // (one template) in double with the standard library's exp and log, for float64 inputs.
  void (*kd_row)(const float* s, const float* tt, float* g, float* scratch, int64_t C, int64_t y, float invT,
                 float a_ce, float a_kl, float* ce, float* kl);
  void (*kd_row_f64)(const double* s, const double* tt, double* g, double* scratch, int64_t C, int64_t y,
                     double invT, double a_ce, double a_kl, double* ce, double* kl);
  // KD loss of up to kKDBlockRows rows of C <= kKDSmallC classes, rows as SIMD lanes. valid[r] is 1 or 0 (an
  // ignored or padding row); y[r] in [0, C). Rows are read at s + r * s_stride and t + r * t_stride (teacher
  // NOT divided by T) and the gradient written at g + r * g_stride. scratch holds 6 * C * kKDBlockRows floats.
  void (*kd_block)(const float* s, int64_t s_stride, const float* t, int64_t t_stride, float* g, int64_t g_stride,
                   int64_t rows, const int64_t* y, const float* valid, int64_t C, float invT, float a_ce,
                   float a_kl, float* scratch, float* ce, float* kl);
  // out[i] = mask[i] ? w[i] : +0 over n elements (out may be w: in place); the 16-bit one for bf16 and fp16 bits
  void (*mask_f32)(const float* w, const uint8_t* mask, float* out, int64_t n);
  void (*mask_u16)(const uint16_t* w, const uint8_t* mask, uint16_t* out, int64_t n);
  // whether w[i] is +0 or -0 wherever mask[i] is 0 (w⊙m is then w itself)
  bool (*pruned_zero_f32)(const float* w, const uint8_t* mask, int64_t n);
  bool (*pruned_zero_u16)(const uint16_t* w, const uint8_t* mask, int64_t n);
  // out[i] = mask[i] ? bf16(w[i]) : +0 (c10::BFloat16's rounding), and out[i] = mask[i] ? float(g[i]) : +0
  void (*mask_to_bf16)(const float* w, const uint8_t* mask, uint16_t* out, int64_t n);
  void (*mask_from_bf16)(const uint16_t* g, const uint8_t* mask, float* out, int64_t n);
  // out[i] = sum_k val[k] * x[base[k] + i], i in [0, n), terms in k order: a tile of a product over kept weights
  void (*sparse_row_f32)(const float* x, const int64_t* base, const float* val, int64_t nnz, float* out, int64_t n,
                         float init);
  // out[j] = sum_i a[i] * x[base[j] + i] over n elements for j < nnz, each in an order that does not depend on
  // the vector width
  void (*sparse_dots_f32)(const float* a, const float* x, const int64_t* base, int64_t nnz, float* out, int64_t n);
  // out[i] = post(init + sum_k val[k] * x[col[k] * ld + shift[k] + i]): sparse_row_f32's sums, in its order, for
  // an entry list kept as (operand row, shift) pairs, the stored value finished by `post`
  void (*sparse_row_post_f32)(const float* x, int64_t ld, const int32_t* col, const int32_t* shift,
                              const float* val, int64_t nnz, float* out, int64_t n, float init, const RowPost& post);
  // out[i * ldo + j] = the max of post(v) over the 2x2 window at row 2i, column 2j of src (rows lds apart), for
  // i < ho, j < wo; a NaN in a window gives NaN, as torch's max_pool2d does
  void (*maxpool2_f32)(const float* src, int64_t lds, float* out, int64_t ldo, int64_t ho, int64_t wo,
                       const RowPost& post);
  // BatchNorm in training (batch_norm.cpp), per channel: over `rows` rows of a [rows, C] array, s1[c] += sum d and
  // s2[c] += sum d * d with d = p - k[c] (q null: the statistics), else s1[c] += sum q and s2[c] += sum q * d (the
  // backward's sums); in fp32 over kFold rows, then in double; scratch holds 2 * C floats. relu: the norm of
  // relu(p), p a ReLU's input, read as p < 0 ? 0 : p
  void (*bn_sums_rows_f32)(const float* p, const float* q, const float* k, int64_t rows, int64_t C, float* scratch,
                           double* s1, double* s2, bool relu);
  // the same over one channel's plane of n elements (NCHW), k a scalar
  void (*bn_sums_plane_f32)(const float* p, const float* q, float k, int64_t n, double* s1, double* s2, bool relu);
  // out = (p - kp[c]) * a[c] + b[c] (q null), else (p - kp[c]) * a[c] + (q - kq[c]) * b[c]; out may be p. relu:
  // p read as relu(p) (q null), else out = 0 where q <= 0 (the gradient through the ReLU whose input q is)
  void (*bn_affine_rows_f32)(const float* p, const float* q, const float* kp, const float* a, const float* kq,
                             const float* b, float* out, int64_t rows, int64_t C, bool relu);
  void (*bn_affine_plane_f32)(const float* p, const float* q, float kp, float a, float kq, float b, float* out,
                              int64_t n, bool relu);
  // Max pooling 2x2 / 2 in training, channels_last (pooling.cpp): one output row (wo positions of C channels) from
  // input rows r0 and r1, with idx[j * C + c] the max's place in its window (0..3, torch's pick), and back: input
  // gradient rows d0, d1 (columns below 2 wo) from that output row's gradient and idx
  void (*maxpool2_train_rows_f32)(const float* r0, const float* r1, int64_t wo, int64_t C, float* out, uint8_t* idx);
  void (*maxpool2_grad_rows_f32)(const float* dy, const uint8_t* idx, int64_t wo, int64_t C, float* d0, float* d1);
};

// counting: columns per task (relu_count.cpp) and per counter block of the kernels: 32 KiB of int32 counters, so
// fp32 rows stream in 32 KiB runs
constexpr int64_t kCountCols = 8192;
constexpr int64_t kKDBlockRows = 16;
constexpr int64_t kKDSmallC = 128;  // up to here rows-as-lanes beats vectorising within a row

// Kernel tables, one per level compiled into this build (nullptr for a level this architecture lacks).
const KernelTable* kernels_default();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();

// Levels this CPU can run, lowest first ("default" is always there).
std::vector<std::string> cpu_isa_levels();
// The level in use; the best available one unless set_cpu_isa chose another.
const KernelTable& active_kernels();
std::string cpu_isa();
// Refuses, with one sentence, a level that is unknown or that this CPU cannot run.
void set_cpu_isa(const std::string& level);

}  // namespace dsd2
