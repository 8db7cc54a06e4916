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
#include <cmath>
#include <vector>

namespace dsd2 {
namespace {

constexpr int64_t kTile = 2048;  // output elements per task: an 8 KiB run of a row, the operand runs it reads
// Work (multiply-adds or elements) below which a parallel region's tasks are grouped: waking the pool's other
// thread costs several microseconds, more than a small map's pass at batch 1 (a 2x2 map's epilogue, its pool).
constexpr int64_t kMinWork = 1 << 16;

// A kernel's tile of positions for an operand of `operand_rows` rows: the longest run (kTile at most, `least` at
// least, halving) whose operand runs, one per row, take at most `budget` bytes.
int64_t tile_within(int64_t operand_rows, int64_t budget, int64_t least) {
  int64_t t = kTile;
  while (t > least && t * operand_rows * static_cast<int64_t>(sizeof(float)) > budget) t /= 2;
  return t;
}

// The rows kernels' tile: the runs every output row of the tile reads stay in L1 while the rows are computed one
// after another (a tile of kTile over 32 channels is 256 KiB: each row's entries then read L2, and the products
// wait on it). The tile does not change a sum's order (each element's terms are added in entry order whatever
// the tile).
constexpr int64_t kRowBudget = 32 << 10;
constexpr int64_t kMinRowTile = 128;

int64_t row_tile_for(int64_t operand_rows) { return tile_within(operand_rows, kRowBudget, kMinRowTile); }

// The weight gradient's tile. A dot's fold costs as much as 8 products, so its tiles stay longer than the rows
// kernels'; but a tile of kTile over 512 channels is 4 MiB, and every row's entries then read the operand from L3
// (VGG's 512->512 layer at 2x2, 96.5 % sparse: 6.97 -> 5.26 ms with tiles of 512, on a 2-core AVX-512 Xeon).
constexpr int64_t kDotBudget = 1 << 20;
constexpr int64_t kMinDotTile = 512;

int64_t dot_tile_for(int64_t operand_rows) { return tile_within(operand_rows, kDotBudget, kMinDotTile); }

int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_task));
}

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

void check_map(const at::Tensor& m) {
  TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kFloat && m.dim() == 4,
              "sparse kernels: the map must be a 4-D float32 CPU tensor");
}

// an optional vector of one float32 per row (a bias, a BatchNorm's scale or shift)
void check_per_row(const std::optional<at::Tensor>& t, int64_t rows, const char* what) {
  TORCH_CHECK(!t || (t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 &&
                     t->numel() == rows && t->is_contiguous()),
              what, " must be a contiguous float32 CPU vector, one value per row");
}

// base[k] = col[k] * ld + off[k], each entry checked to read x's row col[k] within [0, width). Into one buffer per
// calling thread, kept between calls: a fresh one of a few hundred KB (a large layer's list) is a fresh mapping of
// memory whose page faults cost more than the products of a small map at batch 1.
const std::vector<int64_t>& bases(const at::Tensor& col, const at::Tensor& off, const at::Tensor& x, int64_t n) {
  const int64_t nnz = col.numel();
  const int64_t* c = col.data_ptr<int64_t>();
  const int64_t* o = off.data_ptr<int64_t>();
  const int64_t rows = x.size(0), width = x.size(1), ld = x.stride(0);
  thread_local std::vector<int64_t> buffer;
  std::vector<int64_t>& base = buffer;  // the caller's: a lambda names a thread_local as the running thread's own
  base.resize(static_cast<size_t>(nnz));
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
  check_per_row(bias, rows, "sparse kernels: bias");
  if (rows == 0 || n == 0) return;
  const float* bs = bias ? bias->data_ptr<float>() : nullptr;
  const std::vector<int64_t>& base = bases(col, off, x, n);
  const KernelTable& k = active_kernels();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const float* xs = x.data_ptr<float>();
  const float* v = val.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t ldo = out.stride(0);
  const int64_t tile = row_tile_for(x.size(0));
  const int64_t tiles = (n + tile - 1) / tile;
  // tasks tile-major: threads working at one time read the same runs of the operand
  const int64_t per_task = std::min(tile, n) * std::max<int64_t>(1, col.numel() / rows);
  at::parallel_for(0, rows * tiles, grain_for(per_task), [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t t = task / rows, r = task % rows;
      const int64_t i0 = t * tile, len = std::min(tile, n - i0);
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
  const std::vector<int64_t>& base = bases(col, off, x, n);
  const KernelTable& k = active_kernels();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const float* as = a.data_ptr<float>();
  const float* xs = x.data_ptr<float>();
  float* d = dval.data_ptr<float>();
  const int64_t lda = a.stride(0);
  // tasks tile-major, as in sparse_rows_: threads working at one time read the same runs of x, and a row's tile
  // of `a` stays in L1 while the row's entries stream past it. Each (tile, entry) dot goes to its own partial;
  // an entry's partials are then added in tile order (every tile is a multiple of kSparseBlock: every
  // addition's order is the same at every vector width and thread count).
  const int64_t nnz = col.numel();
  const int64_t tile = dot_tile_for(x.size(0));
  const int64_t tiles = (n + tile - 1) / tile;
  std::vector<float> part(static_cast<size_t>(tiles * nnz));
  at::parallel_for(0, rows * tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t t = task / rows, r = task % rows;
      const int64_t i0 = t * tile, len = std::min(tile, n - i0);
      const float* ar = as + r * lda + i0;
      float* pt = part.data() + t * nnz;
      k.sparse_dots_f32(ar, xs + i0, base.data() + rp[r], rp[r + 1] - rp[r], pt + rp[r], len);
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
  check_map(t);
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
  at::parallel_for(0, n * h, grain_for(c * w), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t in = row / h, ih = row % h;
      copy_row(g + (in * hp + ih * sy + oh) * wp + ow, ldg, m + in * sn + ih * sh, sc, sw, c, w, to_grid, sx);
    }
  });
}

// The batch-minor grids of small maps: grid[c, ((y + oh) * wp + x + ow) * n + img] <-> t[img, c, y, x], one
// [n, c] block per map position, transposed in 4x4 blocks where t is channels_last (copy_row with the images as
// its columns).
void batch_minor_copy_(at::Tensor grid, at::Tensor t, int64_t hp, int64_t wp, int64_t oh, int64_t ow, bool to_grid) {
  check_matrix(grid, "grid");
  check_map(t);
  const int64_t n = t.size(0), c = t.size(1), h = t.size(2), w = t.size(3);
  TORCH_CHECK(grid.size(0) == c && hp * wp * n <= grid.size(1) && oh >= 0 && ow >= 0 && h + oh <= hp &&
                  w + ow <= wp,
              "sparse kernels: a map of ", n, "x", c, "x", h, "x", w, " does not fit batch-minor grids of ", hp, "x",
              wp, " at (", oh, ", ", ow, ")");
  float* g = grid.data_ptr<float>();
  float* m = t.data_ptr<float>();
  const int64_t ldg = grid.stride(0);
  const int64_t sn = t.stride(0), sc = t.stride(1), sh = t.stride(2), sw = t.stride(3);
  at::parallel_for(0, h * w, grain_for(c * n), [&](int64_t b, int64_t e) {
    for (int64_t pos = b; pos < e; ++pos) {
      const int64_t y = pos / w, x = pos % w;
      copy_row(g + ((y + oh) * wp + x + ow) * n, ldg, m + y * sh + x * sw, sc, sn, c, n, to_grid, 1);
    }
  });
}

// sparse_rows_ into a grid, then grid_copy_ out of it, fused: map[img, r, y, x] = the rows' sum at grid position
// (img * hp + y * sy + oh) * wp + x * sx + ow. A task computes a chunk of rows over one tile of positions into a
// buffer of its thread's (kChunk x tile floats, 16 to 256 KiB) and stores the map's positions among them from
// there, so the [rows, n] grid of the two-call way is never written to memory and read back. Each sum is
// sparse_row_f32's over the very tiles of sparse_rows_: the same bits as the two calls.
void sparse_rows_map_(at::Tensor map, int64_t hp, int64_t wp, int64_t oh, int64_t ow, int64_t sy, int64_t sx,
                      int64_t n, const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
                      const at::Tensor& off, const at::Tensor& val, const std::optional<at::Tensor>& bias) {
  check_matrix(x, "x");
  check_map(map);
  const int64_t imgs = map.size(0), rows = map.size(1), h = map.size(2), w = map.size(3);
  check_list(rowptr, col, off, rows);
  TORCH_CHECK(val.scalar_type() == at::kFloat && val.is_contiguous() && val.numel() == col.numel(),
              "sparse kernels: val must be contiguous float32, one value per entry");
  check_per_row(bias, rows, "sparse kernels: bias");
  TORCH_CHECK(sy >= 1 && sx >= 1 && oh >= 0 && ow >= 0, "sparse kernels: strides must be at least 1");
  TORCH_CHECK(imgs * hp * wp <= n && (h == 0 || (h - 1) * sy + oh < hp) && (w == 0 || (w - 1) * sx + ow < wp),
              "sparse kernels: a map of ", imgs, "x", rows, "x", h, "x", w, " does not fit grids of ", hp, "x", wp,
              " at (", oh, ", ", ow, ") in ", n, " positions");
  if (rows == 0 || imgs * h * w == 0) return;
  const float* bs = bias ? bias->data_ptr<float>() : nullptr;
  const std::vector<int64_t>& base = bases(col, off, x, n);
  const KernelTable& k = active_kernels();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const float* xs = x.data_ptr<float>();
  const float* v = val.data_ptr<float>();
  float* m = map.data_ptr<float>();
  const int64_t sn = map.stride(0), sc = map.stride(1), sh = map.stride(2), sw = map.stride(3);
  constexpr int64_t kChunk = 32;
  const int64_t tile = row_tile_for(x.size(0));
  const int64_t tiles = (n + tile - 1) / tile, chunks = (rows + kChunk - 1) / kChunk;
  const int64_t per_task = std::min(tile, n) * std::max<int64_t>(1, col.numel() / chunks);
  at::parallel_for(0, tiles * chunks, grain_for(per_task), [&](int64_t b, int64_t e) {
    thread_local std::vector<float> buffer;
    buffer.resize(static_cast<size_t>(kChunk * tile));
    float* buf = buffer.data();
    for (int64_t task = b; task < e; ++task) {
      const int64_t t = task / chunks, r0 = task % chunks * kChunk, r1 = std::min(rows, r0 + kChunk);
      const int64_t i0 = t * tile, len = std::min(tile, n - i0);
      // the map rows among these positions first: a tile of border or room-for-shifts positions only is skipped
      const int64_t first = i0 / wp, last = (i0 + len - 1) / wp;
      bool any = false;
      for (int64_t row = first; row <= last && !any; ++row) {
        const int64_t gy = row % hp - oh;
        any = row / hp < imgs && gy >= 0 && gy % sy == 0 && gy / sy < h;
      }
      if (!any) continue;
      for (int64_t r = r0; r < r1; ++r)
        k.sparse_row_f32(xs + i0, base.data() + rp[r], v + rp[r], rp[r + 1] - rp[r], buf + (r - r0) * tile, len,
                         bs ? bs[r] : 0.0f);
      for (int64_t row = first; row <= last; ++row) {
        const int64_t img = row / hp, gy = row % hp - oh;
        if (img >= imgs || gy < 0 || gy % sy != 0 || gy / sy >= h) continue;
        const int64_t start = row * wp + ow;  // grid position of the map row's x = 0
        if (i0 + len - 1 < start) continue;
        const int64_t x_lo = i0 > start ? (i0 - start + sx - 1) / sx : 0;
        const int64_t x_hi = std::min(w, (i0 + len - 1 - start) / sx + 1);
        if (x_lo >= x_hi) continue;
        copy_row(buf + (start + x_lo * sx - i0), tile, m + img * sn + r0 * sc + gy / sy * sh + x_lo * sw, sc, sw,
                 r1 - r0, x_hi - x_lo, false, sx);
      }
    }
  });
}

// Inference on grids, chained conv to conv (dsd2/ops/sparse_inference.py). A convolution's output rows, written by
// the rows kernel into the next convolution's grid at the offset of its padding, are finished there in place: at
// the map's positions v = relu(v) (with `relu`) then v * scale[c] + shift[c] (a BatchNorm in eval mode; none: 1
// and 0), and 0 at every other column of the row (the padding, the border outputs, the room for shifts after the
// grid). In the stack the rows kernel finishes each value as it stores it, and only the zeros are left to write.
namespace {

// 0 at every column of one grid row [n x hp x wp, then up to `width`] outside the maps at (ph, pw) of h x w
void zero_border(float* row, int64_t n, int64_t hp, int64_t wp, int64_t ph, int64_t pw, int64_t h, int64_t w,
                 int64_t width) {
  for (int64_t img = 0; img < n; ++img) {
    float* im = row + img * hp * wp;
    std::fill(im, im + std::min(ph * wp + pw, hp * wp), 0.0f);
    for (int64_t ih = ph; ih < ph + h; ++ih) {  // the right border of one line and the left one of the next
      float* r = im + ih * wp;
      std::fill(r + pw + w, r + std::min(wp + pw, hp * wp - ih * wp), 0.0f);
    }
    std::fill(im + (ph + h) * wp, im + hp * wp, 0.0f);
  }
  std::fill(row + n * hp * wp, row + width, 0.0f);
}

RowPost post_of(bool relu, const float* scale, const float* shift, int64_t c) {
  RowPost p;
  p.relu = relu;
  p.affine = scale != nullptr || shift != nullptr;
  p.a = scale ? scale[c] : 1.0f;
  p.z = shift ? shift[c] : 0.0f;
  return p;
}

}  // namespace

void grid_epilogue_(at::Tensor grid, int64_t n, int64_t hp, int64_t wp, int64_t ph, int64_t pw, int64_t h, int64_t w,
                    bool relu, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift) {
  check_matrix(grid, "grid");
  const int64_t c = grid.size(0), width = grid.size(1), ldg = grid.stride(0);
  TORCH_CHECK(n >= 0 && ph >= 0 && pw >= 0 && h >= 0 && w >= 0 && ph + h <= hp && pw + w <= wp &&
                  n * hp * wp <= width,
              "grid_epilogue_: a map of ", n, "x", h, "x", w, " at (", ph, ", ", pw, ") does not fit grids of ", hp,
              "x", wp, " in ", width, " columns");
  check_per_row(scale, c, "grid_epilogue_: scale");
  check_per_row(shift, c, "grid_epilogue_: shift");
  const float* sc = scale ? scale->data_ptr<float>() : nullptr;
  const float* sh = shift ? shift->data_ptr<float>() : nullptr;
  float* g = grid.data_ptr<float>();
  at::parallel_for(0, c, grain_for(width), [&](int64_t b, int64_t e) {
    for (int64_t ch = b; ch < e; ++ch) {
      float* row = g + ch * ldg;
      const RowPost p = post_of(relu, sc, sh, ch);
      for (int64_t img = 0; img < n; ++img)
        for (int64_t ih = ph; ih < ph + h; ++ih) {
          float* r = row + img * hp * wp + ih * wp;
          for (int64_t iw = pw; iw < pw + w; ++iw) {
            const float v = p.relu ? std::max(r[iw], 0.0f) : r[iw];  // a NaN stays NaN, as under torch.relu
            r[iw] = v * p.a + p.z;
          }
        }
      zero_border(row, n, hp, wp, ph, pw, h, w, width);
    }
  });
}

// dst = the 2x2, stride-2 max pool of src's map (n x h x w at the start of grids of hs x ws), at (ph, pw) of grids
// of hd x wd, 0 at every other column of dst's rows; a NaN in a window gives NaN, as torch's max_pool2d does. Each
// value first takes the conv's epilogue, relu (with `relu`) then * scale[c] + shift[c], when they are given: the
// stage before the pool needs no pass of its own.
void grid_maxpool2_(const at::Tensor& src, int64_t n, int64_t hs, int64_t ws, int64_t h, int64_t w, at::Tensor dst,
                    int64_t hd, int64_t wd, int64_t ph, int64_t pw, bool relu, const std::optional<at::Tensor>& scale,
                    const std::optional<at::Tensor>& shift) {
  check_matrix(src, "src");
  check_matrix(dst, "dst");
  check_per_row(scale, src.size(0), "grid_maxpool2_: scale");
  check_per_row(shift, src.size(0), "grid_maxpool2_: shift");
  const float* sc = scale ? scale->data_ptr<float>() : nullptr;
  const float* sf = shift ? shift->data_ptr<float>() : nullptr;
  const int64_t c = src.size(0), ho = h / 2, wo = w / 2, width = dst.size(1);
  TORCH_CHECK(dst.size(0) == c && h <= hs && w <= ws && n * hs * ws <= src.size(1) && ph + ho <= hd &&
                  pw + wo <= wd && n * hd * wd <= width && ph >= 0 && pw >= 0,
              "grid_maxpool2_: a map of ", n, "x", h, "x", w, " does not fit its grids");
  const float* s = src.data_ptr<float>();
  float* d = dst.data_ptr<float>();
  const int64_t lds = src.stride(0), ldd = dst.stride(0);
  const KernelTable& k = active_kernels();
  at::parallel_for(0, c, grain_for(width + 4 * ho * wo * n), [&](int64_t b, int64_t e) {
    for (int64_t ch = b; ch < e; ++ch) {
      const float* in = s + ch * lds;
      float* out = d + ch * ldd;
      const RowPost p = post_of(relu, sc, sf, ch);
      for (int64_t img = 0; img < n; ++img)
        k.maxpool2_f32(in + img * hs * ws, ws, out + img * hd * wd + ph * wd + pw, wd, ho, wo, p);
      zero_border(out, n, hd, wd, ph, pw, ho, wo, width);
    }
  });
}

// A whole stack of such stages (SparseStack): built once from the stages' entry lists, run per batch.
SparseStackPlan::SparseStackPlan(int64_t kernel, int64_t in_channels, int64_t width,
                                 const std::vector<at::Tensor>& rowptr, const std::vector<at::Tensor>& channel,
                                 const std::vector<at::Tensor>& shifts, const std::vector<at::Tensor>& values,
                                 const std::vector<std::optional<at::Tensor>>& bias, const std::vector<bool>& relu,
                                 const std::vector<std::optional<at::Tensor>>& scale,
                                 const std::vector<std::optional<at::Tensor>>& shift, const std::vector<bool>& pool,
                                 const std::vector<int64_t>& out_channels)
    : kernel_(kernel), in_channels_(in_channels), width_(width) {
  const size_t stages = rowptr.size();
  TORCH_CHECK(stages > 0 && channel.size() == stages && shifts.size() == stages && values.size() == stages &&
                  bias.size() == stages && relu.size() == stages && scale.size() == stages && shift.size() == stages &&
                  pool.size() == stages && out_channels.size() == stages,
              "SparseStackPlan: every per-stage list needs one entry per stage");
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1, "SparseStackPlan: the kernel size must be odd");
  TORCH_CHECK(in_channels >= 1 && width >= 1, "SparseStackPlan: the input needs a channel and a column");
  int64_t c = in_channels, w = width;
  for (size_t s = 0; s < stages; ++s) {
    Stage st;
    st.out_channels = out_channels[s];
    TORCH_CHECK(st.out_channels >= 1, "SparseStackPlan: stage ", s, " has no output channel");
    check_list(rowptr[s], channel[s], shifts[s], st.out_channels);
    const int64_t nnz = channel[s].numel();
    TORCH_CHECK(values[s].scalar_type() == at::kFloat && values[s].is_contiguous() && values[s].numel() == nnz &&
                    values[s].device().is_cpu(),
                "SparseStackPlan: stage ", s, "'s values must be contiguous float32, one per entry");
    check_per_row(bias[s], st.out_channels, "SparseStackPlan: a stage's bias");
    check_per_row(scale[s], st.out_channels, "SparseStackPlan: a stage's BatchNorm scale");
    check_per_row(shift[s], st.out_channels, "SparseStackPlan: a stage's BatchNorm shift");
    // every entry reads within the stage's grid: an input channel, a shift of at most (k - 1) rows and columns of
    // the grid (width w + k - 1) past the output's position
    const int64_t wp = w + kernel - 1, most = (kernel - 1) * (wp + 1);
    st.col = at::empty({nnz}, channel[s].options().dtype(at::kInt));
    st.shift = at::empty({nnz}, channel[s].options().dtype(at::kInt));
    const int64_t* ch = channel[s].data_ptr<int64_t>();
    const int64_t* sh = shifts[s].data_ptr<int64_t>();
    int32_t* col = st.col.data_ptr<int32_t>();
    int32_t* off = st.shift.data_ptr<int32_t>();
    for (int64_t k = 0; k < nnz; ++k) {
      TORCH_CHECK(ch[k] >= 0 && ch[k] < c && sh[k] >= 0 && sh[k] <= most, "SparseStackPlan: stage ", s,
                  "'s entry ", k, " reads channel ", ch[k], " at shift ", sh[k], "; allowed: channels below ", c,
                  ", shifts up to ", most);
      col[k] = static_cast<int32_t>(ch[k]);
      off[k] = static_cast<int32_t>(sh[k]);
    }
    st.rowptr = rowptr[s];
    st.values = values[s];
    st.bias = bias[s];
    st.scale = scale[s];
    st.shift_bn = shift[s];
    st.relu = relu[s];
    st.pool = pool[s];
    stages_.push_back(std::move(st));
    c = out_channels[s];
    if (pool[s]) w /= 2;
  }
}

at::Tensor SparseStackPlan::run(const at::Tensor& x, bool channels_last) const {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "SparseStackPlan: x must be a 4-D float32 CPU tensor");
  TORCH_CHECK(x.size(1) == in_channels_ && x.size(3) == width_, "SparseStackPlan: built for ", in_channels_,
              " channels of width ", width_, ", given ", x.size(1), " of width ", x.size(3));
  // Each row's length is rounded up to whole vectors of the widest level (kSlack), so no row ends in scalar
  // elements: every grid has kSlack columns past its shifts' room, which the rounded rows read and write.
  constexpr int64_t kSlack = 16;
  const KernelTable& k = active_kernels();
  const int64_t p = kernel_ / 2, n = x.size(0);
  int64_t h = x.size(2), w = x.size(3), hp = h + 2 * p, wp = w + 2 * p;
  const auto f32 = x.options();
  at::Tensor grid = at::zeros({x.size(1), n * hp * wp + (kernel_ - 1) * (wp + 1) + kSlack}, f32);
  grid_copy_(grid, x, hp, wp, p, p, true, 1, 1);
  for (size_t s = 0; s < stages_.size(); ++s) {
    const Stage& st = stages_[s];
    const int64_t length = n * hp * wp, most = (kernel_ - 1) * (wp + 1), off = p * wp + p;
    const int64_t padded = (length + kSlack - 1) / kSlack * kSlack;
    const bool last = s + 1 == stages_.size(), chained = !st.pool && !last;
    const int64_t start = chained ? off : 0, rows = st.out_channels;
    const float* xs = grid.data_ptr<float>();
    const int64_t ld = grid.stride(0);
    const int64_t* rp = st.rowptr.data_ptr<int64_t>();
    const int32_t* col = st.col.data_ptr<int32_t>();
    const int32_t* sh = st.shift.data_ptr<int32_t>();
    const float* v = st.values.data_ptr<float>();
    const float* bs = st.bias ? st.bias->data_ptr<float>() : nullptr;
    const float* sc = st.scale ? st.scale->data_ptr<float>() : nullptr;
    const float* sf = st.shift_bn ? st.shift_bn->data_ptr<float>() : nullptr;
    const int64_t tiles = (padded + kTile - 1) / kTile;
    const int64_t grain = grain_for(std::min(kTile, padded) * std::max<int64_t>(1, st.col.numel() / rows));
    // one tile of row r into o, each value finished as it is stored (the ReLU and BatchNorm)
    const auto row_tile = [&](int64_t r, int64_t i0, int64_t len, float* o) {
      k.sparse_row_post_f32(xs + i0, ld, col + rp[r], sh + rp[r], v + rp[r], rp[r + 1] - rp[r], o, len,
                            bs ? bs[r] : 0.0f, post_of(st.relu, sc, sf, r));
    };
    // a pool's output: the next grid (its own shifts' room unless last)
    const int64_t ho = h / 2, wo = w / 2, pad = last ? 0 : p, hd = ho + 2 * pad, wd = wo + 2 * pad;
    const int64_t pooled_width = n * hd * wd + (last ? 0 : (kernel_ - 1) * (wd + 1)) + kSlack;
    if (st.pool && tiles == 1) {  // a row whole in one task: pooled from the task's own buffer into the next grid
      const int64_t width = pooled_width;
      at::Tensor dst = at::empty({rows, width}, f32);
      float* d = dst.data_ptr<float>();
      const int64_t ldd = dst.stride(0);
      at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
        thread_local std::vector<float> scratch;  // each worker's own
        scratch.resize(static_cast<size_t>(padded));
        for (int64_t r = b; r < e; ++r) {
          row_tile(r, 0, padded, scratch.data());
          float* o = d + r * ldd;
          for (int64_t img = 0; img < n; ++img)
            k.maxpool2_f32(scratch.data() + img * hp * wp, wp, o + img * hd * wd + pad * wd + pad, wd, ho, wo,
                           RowPost{});
          zero_border(o, n, hd, wd, pad, pad, ho, wo, width);
        }
      });
      grid = dst;
    } else {
      at::Tensor out = at::empty({rows, length + most + kSlack}, f32);
      float* o = out.data_ptr<float>();
      const int64_t ldo = out.stride(0), width = out.size(1);
      // tasks tile-major, as in sparse_rows_; a row whole in one task takes its padding's zeros there too
      at::parallel_for(0, rows * tiles, grain, [&](int64_t b, int64_t e) {
        for (int64_t task = b; task < e; ++task) {
          const int64_t t = task / rows, r = task % rows, i0 = t * kTile;
          row_tile(r, i0, std::min(kTile, padded - i0), o + r * ldo + start + i0);
          if (chained && tiles == 1) zero_border(o + r * ldo, n, hp, wp, p, p, h, w, width);
        }
      });
      if (chained && tiles > 1) {
        at::parallel_for(0, rows, grain_for(width), [&](int64_t b, int64_t e) {
          for (int64_t r = b; r < e; ++r) zero_border(o + r * ldo, n, hp, wp, p, p, h, w, width);
        });
      }
      if (st.pool) {  // the finished values' pool: no ReLU or BatchNorm left to apply
        at::Tensor dst = at::empty({rows, pooled_width}, f32);
        grid_maxpool2_(out, n, hp, wp, 2 * ho, 2 * wo, dst, hd, wd, pad, pad, false, std::nullopt, std::nullopt);
        grid = dst;
      } else {
        grid = out;
      }
    }
    if (chained) continue;
    if (st.pool) {
      h = ho;
      w = wo;
      hp = hd;
      wp = wd;
    }
    if (last) {
      at::Tensor map = at::empty({n, rows, h, w}, f32.memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                                  : at::MemoryFormat::Contiguous));
      grid_copy_(grid, map, hp, wp, 0, 0, false, 1, 1);
      return map;
    }
  }
  TORCH_CHECK(false, "SparseStackPlan: the stack ended before its last stage");
}

}  // namespace dsd2

