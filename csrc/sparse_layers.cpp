// Products over the kept weights only: the two kernels the sparse layers (dsd2/ops/sparse_layers.py) build a
// layer's forward, input gradient and weight gradient from. A pruned layer's weight is a list of kept entries
// grouped by output row: row r, entries k in [rowptr[r], rowptr[r+1]), each reading operand row col[k] shifted
// by off[k] (a convolution tap's shift on the padded input grid; 0 for a linear layer or unfolded input).
//
//   sparse_rows_: out[r, i] = b[r] + sum_k val[k] * x[col[k], off[k] + i]   (forward, b the bias or 0; input
//                                                                          gradient on the transposed list)
//   sparse_dots_: dval[k]   = sum_i a[r(k), i] * x[col[k], off[k] + i]  (weight gradient at kept entries only)
//
// Each output element is one thread's, its terms added in a fixed order: results do not depend on the thread
// count. fp32 only (other dtypes take the dense path, dsd2/ops/sparse_layers.py says so).
#include "common.h"
#include "isa.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace dsd2 {
namespace {

constexpr int64_t kTile = 2048;  // output elements per task: an 8 KiB run of a row, the operand runs it reads

void check_list(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& off, int64_t rows) {
  for (const at::Tensor* t : {&rowptr, &col, &off}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous(),
                "sparse kernels: rowptr, col and off must be contiguous 1-D int64 CPU tensors");
  }
  TORCH_CHECK(rowptr.numel() == rows + 1, "sparse kernels: rowptr has ", rowptr.numel(), " entries for ", rows,
              " rows");
  TORCH_CHECK(col.numel() == off.numel(), "sparse kernels: col and off differ in length");
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[rows] == col.numel(), "sparse kernels: rowptr does not cover the entry list");
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(rp[r] <= rp[r + 1], "sparse kernels: rowptr is not sorted");
}

void check_matrix(const at::Tensor& m, const char* name) {
  TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kFloat && m.dim() == 2 &&
                  (m.stride(1) == 1 || m.size(1) <= 1),
              "sparse kernels: ", name, " must be a 2-D float32 CPU tensor with contiguous rows");
}

// base[k] = col[k] * ld + off[k], each entry checked to read x's row col[k] within [0, width)
std::vector<int64_t> bases(const at::Tensor& col, const at::Tensor& off, const at::Tensor& x, int64_t n) {
  const int64_t nnz = col.numel();
  const int64_t* c = col.data_ptr<int64_t>();
  const int64_t* o = off.data_ptr<int64_t>();
  const int64_t rows = x.size(0), width = x.size(1), ld = x.stride(0);
  std::vector<int64_t> base(static_cast<size_t>(nnz));
  std::atomic<bool> bad{false};
  at::parallel_for(0, nnz, 1 << 16, [&](int64_t b, int64_t e) {
    bool local = false;
    for (int64_t k = b; k < e; ++k) {
      local |= c[k] < 0 || c[k] >= rows || o[k] < 0 || o[k] + n > width;
      base[k] = c[k] * ld + o[k];
    }
    if (local) bad = true;
  });
  TORCH_CHECK(!bad.load(), "sparse kernels: an entry reads outside the operand (", rows, " rows of ", width,
              " for ", n, " outputs)");
  return base;
}

}  // namespace

void sparse_rows_(at::Tensor out, int64_t n, const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
                  const at::Tensor& off, const at::Tensor& val, const std::optional<at::Tensor>& bias) {
  check_matrix(out, "out");
  check_matrix(x, "x");
  const int64_t rows = out.size(0);
  check_list(rowptr, col, off, rows);
  TORCH_CHECK(val.scalar_type() == at::kFloat && val.is_contiguous() && val.numel() == col.numel(),
              "sparse kernels: val must be contiguous float32, one value per entry");
  TORCH_CHECK(n >= 0 && n <= out.size(1), "sparse kernels: ", n, " outputs per row do not fit out");
  TORCH_CHECK(!bias || (bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                        bias->numel() == rows && bias->is_contiguous()),
              "sparse kernels: bias must be a contiguous float32 CPU vector, one value per row");
  if (rows == 0 || n == 0) return;
  const float* bs = bias ? bias->data_ptr<float>() : nullptr;
  const std::vector<int64_t> base = bases(col, off, x, n);
  const KernelTable& k = active_kernels();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const float* xs = x.data_ptr<float>();
  const float* v = val.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t ldo = out.stride(0);
  const int64_t tiles = (n + kTile - 1) / kTile;
  // tasks tile-major: threads working at one time read the same runs of the operand
  at::parallel_for(0, rows * tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t t = task / rows, r = task % rows;
      const int64_t i0 = t * kTile, len = std::min(kTile, n - i0);
      const int64_t k0 = rp[r], k1 = rp[r + 1];
      k.sparse_row_f32(xs + i0, base.data() + k0, v + k0, k1 - k0, o + r * ldo + i0, len, bs ? bs[r] : 0.0f);
    }
  });
}

void sparse_dots_(at::Tensor dval, const at::Tensor& a, int64_t n, const at::Tensor& x, const at::Tensor& rowptr,
                  const at::Tensor& col, const at::Tensor& off) {
  check_matrix(a, "a");
  check_matrix(x, "x");
  const int64_t rows = a.size(0);
  check_list(rowptr, col, off, rows);
  TORCH_CHECK(dval.scalar_type() == at::kFloat && dval.is_contiguous() && dval.numel() == col.numel(),
              "sparse kernels: dval must be contiguous float32, one value per entry");
  TORCH_CHECK(n >= 0 && n <= a.size(1), "sparse kernels: ", n, " terms per dot do not fit a");
  if (col.numel() == 0) return;
  const std::vector<int64_t> base = bases(col, off, x, n);
  const KernelTable& k = active_kernels();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const float* as = a.data_ptr<float>();
  const float* xs = x.data_ptr<float>();
  float* d = dval.data_ptr<float>();
  const int64_t lda = a.stride(0);
  // tasks tile-major, as in sparse_rows_: threads working at one time read the same runs of x, and a row's tile
  // of `a` stays in L1 while the row's entries stream past it. Each (tile, entry) dot goes to its own partial;
  // an entry's partials are then added in tile order (kTile is a multiple of kSparseBlock: every addition's
  // order is the same at every vector width and thread count).
  const int64_t nnz = col.numel();
  const int64_t tiles = (n + kTile - 1) / kTile;
  std::vector<float> part(static_cast<size_t>(tiles * nnz));
  at::parallel_for(0, rows * tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t t = task / rows, r = task % rows;
      const int64_t i0 = t * kTile, len = std::min(kTile, n - i0);
      const float* ar = as + r * lda + i0;
      float* pt = part.data() + t * nnz;
      for (int64_t j = rp[r]; j < rp[r + 1]; ++j) pt[j] = k.sparse_dot_f32(ar, xs + base[j] + i0, len);
    }
  });
  at::parallel_for(0, nnz, 4096, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      float sum = part[j];
      for (int64_t t = 1; t < tiles; ++t) sum += part[t * nnz + j];
      d[j] = sum;
    }
  });
}

namespace {

typedef float v4 __attribute__((vector_size(16)));  // GCC's portable 128-bit vector (SSE2, NEON)

inline v4 load4(const float* p) {
  v4 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void store4(float* p, v4 v) { __builtin_memcpy(p, &v, sizeof(v)); }

// dst[j * ldd + i] = src[i * lds + j] for a 4x4 block
inline void transpose4(const float* src, int64_t lds, float* dst, int64_t ldd) {
  const v4 r0 = load4(src), r1 = load4(src + lds), r2 = load4(src + 2 * lds), r3 = load4(src + 3 * lds);
  typedef int i4 __attribute__((vector_size(16)));
  const v4 t0 = __builtin_shuffle(r0, r1, i4{0, 4, 1, 5}), t1 = __builtin_shuffle(r0, r1, i4{2, 6, 3, 7});
  const v4 t2 = __builtin_shuffle(r2, r3, i4{0, 4, 1, 5}), t3 = __builtin_shuffle(r2, r3, i4{2, 6, 3, 7});
  store4(dst, __builtin_shuffle(t0, t2, i4{0, 1, 4, 5}));
  store4(dst + ldd, __builtin_shuffle(t0, t2, i4{2, 3, 6, 7}));
  store4(dst + 2 * ldd, __builtin_shuffle(t1, t3, i4{0, 1, 4, 5}));
  store4(dst + 3 * ldd, __builtin_shuffle(t1, t3, i4{2, 3, 6, 7}));
}

// one image row: grid[ic * ldg + iw * step] <-> m[ic * sc + iw * sw] for ic < c, iw < w (step: the
// convolution's stride along the row, 1 for an input)
void copy_row(float* __restrict__ g, int64_t ldg, float* __restrict__ m, int64_t sc, int64_t sw, int64_t c,
              int64_t w, bool to_grid, int64_t step) {
  if (step != 1) {
    for (int64_t ic = 0; ic < c; ++ic)
      for (int64_t iw = 0; iw < w; ++iw) {
        if (to_grid)
          g[ic * ldg + iw * step] = m[ic * sc + iw * sw];
        else
          m[ic * sc + iw * sw] = g[ic * ldg + iw * step];
      }
    return;
  }
  if (sw == 1) {  // NCHW: a run of w floats per channel, contiguous on both sides
    for (int64_t ic = 0; ic < c; ++ic) {
      if (to_grid)
        std::copy(m + ic * sc, m + ic * sc + w, g + ic * ldg);
      else
        std::copy(g + ic * ldg, g + ic * ldg + w, m + ic * sc);
    }
    return;
  }
  int64_t c4 = 0, w4 = 0;
  if (sc == 1) {  // channels_last: [w, c] <-> [c, w], in 4x4 blocks, 16 columns at a time (a whole cache line of
                  // each channel's run, and 16 pixels' channels, in L1 at once)
    c4 = c - c % 4;
    w4 = w - w % 4;
    for (int64_t iw0 = 0; iw0 < w4; iw0 += 16) {
      const int64_t iw1 = std::min(w4, iw0 + 16);
      for (int64_t ic = 0; ic < c4; ic += 4)
        for (int64_t iw = iw0; iw < iw1; iw += 4) {
          if (to_grid)
            transpose4(m + iw * sw + ic, sw, g + ic * ldg + iw, ldg);
          else
            transpose4(g + ic * ldg + iw, ldg, m + iw * sw + ic, sw);
        }
    }
  }
  // what the blocks left: the channels past c4 for every column, the columns past w4 for the first c4 channels
  for (int64_t ic = 0; ic < c; ++ic)
    for (int64_t iw = ic < c4 ? w4 : 0; iw < w; ++iw) {
      if (to_grid)
        g[ic * ldg + iw] = m[ic * sc + iw * sw];
      else
        m[ic * sc + iw * sw] = g[ic * ldg + iw];
    }
}

}  // namespace

void grid_copy_(at::Tensor grid, at::Tensor t, int64_t hp, int64_t wp, int64_t oh, int64_t ow, bool to_grid,
                int64_t sy, int64_t sx) {
  check_matrix(grid, "grid");
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4,
              "sparse kernels: the map must be a 4-D float32 CPU tensor");
  const int64_t n = t.size(0), c = t.size(1), h = t.size(2), w = t.size(3);
  TORCH_CHECK(sy >= 1 && sx >= 1, "sparse kernels: strides must be at least 1");
  TORCH_CHECK(grid.size(0) == c && n * hp * wp <= grid.size(1) && oh >= 0 && ow >= 0 &&
                  (h - 1) * sy + oh < hp && (w - 1) * sx + ow < wp,
              "sparse kernels: a map of ", n, "x", c, "x", h, "x", w, " does not fit the grid at (", oh, ", ", ow,
              ")");
  float* g = grid.data_ptr<float>();
  float* m = t.data_ptr<float>();
  const int64_t ldg = grid.stride(0);
  const int64_t sn = t.stride(0), sc = t.stride(1), sh = t.stride(2), sw = t.stride(3);
  at::parallel_for(0, n * h, 1, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t in = row / h, ih = row % h;
      copy_row(g + (in * hp + ih * sy + oh) * wp + ow, ldg, m + in * sn + ih * sh, sc, sw, c, w, to_grid, sx);
    }
  });
}

}  // namespace dsd2
