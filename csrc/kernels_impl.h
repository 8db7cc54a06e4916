// The bodies of dsd2's CPU kernels, compiled once per instruction-set level. Include it only from an isa_*.cpp
// file, inside that level's namespace and after its `#pragma GCC target`; it includes nothing itself.
//
// Rules that keep every level vectorised and every level's answer the same:
// - Hot loops are branch-free: a value that may be unused is computed anyway and chosen by a select, because a
//   call or a division under a condition stops GCC from vectorising below AVX-512 ("control flow in loop").
// - Sums run over kLanes fixed partial sums (element c always goes to lane c % kLanes), so the order of every
//   addition is the same whatever the vector width; fp32 partials are folded into double every kFold elements,
//   so the error of a sum of exps does not grow with the number of classes.
// - The build uses -ffp-contract=off: a fused multiply-add happens only where madd() asks for one (the exp and
//   log polynomials on levels that have FMA), never in the SGD update, which is bit-identical on every level.

#ifndef DSD2_HAS_FMA
#error "define DSD2_HAS_FMA (0 or 1) before including kernels_impl.h"
#endif

#define DSD2_INLINE static inline __attribute__((always_inline))

constexpr int kLanes = 16;
constexpr int64_t kFold = 256;

DSD2_INLINE float madd(float a, float b, float c) {
#if DSD2_HAS_FMA
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

DSD2_INLINE uint32_t bits_of(float x) { return __builtin_bit_cast(uint32_t, x); }
DSD2_INLINE float float_of(uint32_t b) { return __builtin_bit_cast(float, b); }

// exp(x) for x <= 0: range reduction by the 1.5 * 2^23 rounding trick, degree-6 polynomial, exponent by a bit
// cast (relative error ~2e-7). Plain arithmetic, so it vectorises without a vector math library.
DSD2_INLINE float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = madd(n, -1.428606765330187e-06f, madd(n, -0.693145751953125f, x));
  float p = 1.9875691500e-4f;
  p = madd(p, r, 1.3981999507e-3f);
  p = madd(p, r, 8.3334519073e-3f);
  p = madd(p, r, 4.1665795894e-2f);
  p = madd(p, r, 1.6666665459e-1f);
  p = madd(p, r, 5.0000001201e-1f);
  p = madd(p * r, r, r) + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  return p * float_of(static_cast<uint32_t>(e));
}

// log(x) for normal x > 0 (Cephes logf: mantissa and exponent by bit operations, degree-8 polynomial).
DSD2_INLINE float log_pos(float x) {
  const uint32_t b = bits_of(x);
  float e = static_cast<float>(static_cast<int32_t>((b >> 23) & 0xff) - 126);
  float m = float_of((b & 0x807fffffu) | 0x3f000000u);  // in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = madd(y, m, -1.1514610310e-1f);
  y = madd(y, m, 1.1676998740e-1f);
  y = madd(y, m, -1.2420140846e-1f);
  y = madd(y, m, 1.4249322787e-1f);
  y = madd(y, m, -1.6668057665e-1f);
  y = madd(y, m, 2.0000714765e-1f);
  y = madd(y, m, -2.4999993993e-1f);
  y = madd(y, m, 3.3333331174e-1f);
  y = y * m * z;
  y = madd(-2.12194440e-4f, e, y);
  y = madd(-0.5f, z, y);
  return m + y + 0.693359375f * e;
}

// ---- masked SGD -------------------------------------------------------------------------------------------

template <bool HAS_MASK, bool HAS_BUF, bool NESTEROV>
DSD2_INLINE void sgd_loop(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buf,
                          const uint8_t* __restrict__ mask, int64_t n, float lr, float momentum, float wd) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float keep = HAS_MASK ? static_cast<float>(mask[i]) : 1.0f;
    const float w = p[i];
    float d = g[i] * keep + wd * w;
    if constexpr (HAS_BUF) {
      const float b = (momentum * buf[i] + d) * keep;
      buf[i] = b;
      d = NESTEROV ? d + momentum * b : b;
    }
    p[i] = (w - lr * d) * keep;
  }
}

static void sgd_f32(float* p, const float* g, float* buf, const uint8_t* mask, int64_t n, float lr, float momentum,
                    float wd, bool nesterov) {
  if (mask) {
    if (!buf) return sgd_loop<true, false, false>(p, g, buf, mask, n, lr, momentum, wd);
    if (nesterov) return sgd_loop<true, true, true>(p, g, buf, mask, n, lr, momentum, wd);
    return sgd_loop<true, true, false>(p, g, buf, mask, n, lr, momentum, wd);
  }
  if (!buf) return sgd_loop<false, false, false>(p, g, buf, mask, n, lr, momentum, wd);
  if (nesterov) return sgd_loop<false, true, true>(p, g, buf, mask, n, lr, momentum, wd);
  return sgd_loop<false, true, false>(p, g, buf, mask, n, lr, momentum, wd);
}

// ---- ReLU-state counting -------------------------------------------------------------------------------
// Each call owns a block of columns and walks the batch, accumulating int32 counts in a stack buffer before one
// int64 add per column. fp16/bf16 are compared on their bit patterns (x > 0  <=>  0 < bits <= +inf), which
// vectorises where a conversion to float would not.

template <typename T, typename On, typename Relu>
DSD2_INLINE void count_block(const T* __restrict__ x, T* __restrict__ y, int64_t* __restrict__ out, int64_t batch,
                             int64_t stride, int64_t begin, int64_t end, On on, Relu relu) {
  int32_t acc[kCountCols];
  for (int64_t j0 = begin; j0 < end; j0 += kCountCols) {
    const int64_t w = end - j0 < kCountCols ? end - j0 : kCountCols;
    for (int64_t j = 0; j < w; ++j) acc[j] = 0;
    for (int64_t b = 0; b < batch; ++b) {
      const T* __restrict__ row = x + b * stride + j0;
      if (y) {
        T* __restrict__ orow = y + b * stride + j0;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) {
          acc[j] += on(row[j]);
          orow[j] = relu(row[j]);
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) acc[j] += on(row[j]);
      }
    }
    for (int64_t j = 0; j < w; ++j) out[j0 + j] += acc[j];
  }
}

DSD2_INLINE float relu_f32(float v) { return v > 0.0f ? v : 0.0f; }
DSD2_INLINE int32_t on_f32(float v) { return v > 0.0f; }
DSD2_INLINE int32_t on_incl_f32(float v) { return v >= 0.0f; }

static void count_cols_f32(const float* x, float* y, int64_t* out, int64_t batch, int64_t stride, int64_t begin,
                           int64_t end, bool inclusive) {
  if (inclusive)
    count_block(x, y, out, batch, stride, begin, end, on_incl_f32, relu_f32);
  else
    count_block(x, y, out, batch, stride, begin, end, on_f32, relu_f32);
}

// On-state and ReLU of 16-bit floats by their bits: `inf` is +inf's pattern (0x7F80 bf16, 0x7C00 fp16).
struct U16Ops {
  uint16_t inf;
  int32_t on(uint16_t v) const { return static_cast<uint16_t>(v - 1) < inf; }          // 0 < v <= +inf
  int32_t on_incl(uint16_t v) const { return (v <= inf) | (v == 0x8000); }             // also -0
  uint16_t relu(uint16_t v) const {                                                    // negatives, -0 -> +0
    return v >= 0x8000 && v <= static_cast<uint16_t>(0x8000 | inf) ? 0 : v;
  }
};

static void count_cols_u16(const uint16_t* x, uint16_t* y, int64_t* out, int64_t batch, int64_t stride,
                           int64_t begin, int64_t end, bool inclusive, uint16_t inf) {
  const U16Ops o{inf};
  auto relu = [o](uint16_t v) { return o.relu(v); };
  if (inclusive)
    count_block(x, y, out, batch, stride, begin, end, [o](uint16_t v) { return o.on_incl(v); }, relu);
  else
    count_block(x, y, out, batch, stride, begin, end, [o](uint16_t v) { return o.on(v); }, relu);
}

// Row streaming for the fused ReLU: whole samples front to back, like a plain ReLU, counting into full-width
// int32 counters that the caller owns per thread.
template <typename T, typename A, typename On, typename Relu>
DSD2_INLINE void relu_rows(const T* __restrict__ x, T* __restrict__ y, A* __restrict__ acc, int64_t b0,
                           int64_t b1, int64_t width, On on, Relu relu) {
  for (int64_t b = b0; b < b1; ++b) {
    const T* __restrict__ row = x + b * width;
    T* __restrict__ orow = y + b * width;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      acc[j] = static_cast<A>(acc[j] + on(row[j]));
      orow[j] = relu(row[j]);
    }
  }
}

static void relu_rows_f32(const float* x, float* y, int32_t* acc, int64_t b0, int64_t b1, int64_t width,
                          bool inclusive) {
  if (inclusive)
    relu_rows(x, y, acc, b0, b1, width, on_incl_f32, relu_f32);
  else
    relu_rows(x, y, acc, b0, b1, width, on_f32, relu_f32);
}

// 16-bit counters for 16-bit data: the counters' traffic stays that of the data (the caller runs at most 65535
// rows per call and widens them after).
static void relu_rows_u16(const uint16_t* x, uint16_t* y, uint16_t* acc, int64_t b0, int64_t b1, int64_t width,
                          bool inclusive, uint16_t inf) {
  const U16Ops o{inf};
  auto relu = [o](uint16_t v) { return o.relu(v); };
  if (inclusive)
    relu_rows(x, y, acc, b0, b1, width, [o](uint16_t v) { return static_cast<uint16_t>(o.on_incl(v)); }, relu);
  else
    relu_rows(x, y, acc, b0, b1, width, [o](uint16_t v) { return static_cast<uint16_t>(o.on(v)); }, relu);
}

// ---- KD loss: (1 - a) CE(s, y) + a T^2 KL(softmax(t/T) || softmax(s/T)), gradient written in the forward -----
// A teacher logit of -inf is probability 0 and contributes 0 (0 * log 0 = 0), chosen by selects. The row kernel is
// one template: F = float (the polynomials above; fp16/bf16 rows are widened to it) and F = double (the standard
// library's exp and log, and no fused multiply-add at any level: reference-grade float64 and gradcheck).

DSD2_INLINE double exp_nonpos(double x) { return std::exp(x); }
DSD2_INLINE double madd(double a, double b, double c) { return a * b + c; }

// The three exponentials of one class and its KL cross term; stores the exponentials for the gradient pass.
template <typename F>
DSD2_INLINE void kd_terms(F s, F tt, F ms, F mt, F invT, F& e1, F& e2, F& e3, F& x) {
  const F d = s - ms;
  e1 = exp_nonpos(d);
  e2 = exp_nonpos(d * invT);
  const bool live = tt > -static_cast<F>(__builtin_inff());
  const F e = exp_nonpos(tt - mt);
  e3 = live ? e : F(0);
  x = e3 * (live ? tt - s * invT : F(0));
}

// A row's sums of its three exponentials and of its KL cross term, {zs, zst, zt, cross}: kLanes fixed lanes (class
// c in lane c % kLanes) of F partials folded into double every kFold classes, then pairwise. The exponentials are
// stored in es, est, et for the gradient pass.
template <typename F>
DSD2_INLINE void kd_row_sums(const F* __restrict__ s, const F* __restrict__ tt, F* __restrict__ es,
                             F* __restrict__ est, F* __restrict__ et, int64_t C, F ms, F mt, F invT, double* sums) {
  double z1[kLanes] = {}, z2[kLanes] = {}, z3[kLanes] = {}, zx[kLanes] = {};
  for (int64_t c0 = 0; c0 < C; c0 += kFold) {
    const int64_t stop = C - c0 < kFold ? C : c0 + kFold;
    F p1[kLanes] = {}, p2[kLanes] = {}, p3[kLanes] = {}, px[kLanes] = {};
    // class i in lane l: its exponentials stored for the gradient pass, added to the lane's partial sums
    auto lane = [&](int64_t i, int l) __attribute__((always_inline)) {
      F e1, e2, e3, x;
      kd_terms(s[i], tt[i], ms, mt, invT, e1, e2, e3, x);
      es[i] = e1;
      est[i] = e2;
      et[i] = e3;
      p1[l] += e1;
      p2[l] += e2;
      p3[l] += e3;
      px[l] += x;
    };
    int64_t c = c0;
    for (; c + kLanes <= stop; c += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) lane(c + l, l);
    }
    for (int l = 0; c + l < stop; ++l) lane(c + l, l);  // the last < kLanes classes, each in its own lane
    for (int l = 0; l < kLanes; ++l) {
      z1[l] += p1[l];
      z2[l] += p2[l];
      z3[l] += p3[l];
      zx[l] += px[l];
    }
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {  // pairwise, in a fixed order
    for (int l = 0; l < w; ++l) {
      z1[l] += z1[l + w];
      z2[l] += z2[l + w];
      z3[l] += z3[l + w];
      zx[l] += zx[l + w];
    }
  }
  sums[0] = z1[0];
  sums[1] = z2[0];
  sums[2] = z3[0];
  sums[3] = zx[0];
}

// KD loss of one row of C classes: s student logits, tt teacher logits already divided by T. g receives the
// gradient of the batch-mean loss (a_ce = (1 - a) / n, a_kl = a T / n); scratch holds 3 * C values.
template <typename F>
DSD2_INLINE void kd_row_impl(const F* __restrict__ s, const F* __restrict__ tt, F* __restrict__ g,
                             F* __restrict__ scratch, int64_t C, int64_t y, F invT, F a_ce, F a_kl, F* ce, F* kl) {
  F* __restrict__ es = scratch;
  F* __restrict__ est = scratch + C;
  F* __restrict__ et = scratch + 2 * C;
  F ms = -static_cast<F>(__builtin_inff()), mt = -static_cast<F>(__builtin_inff());
#pragma omp simd reduction(max : ms, mt)
  for (int64_t c = 0; c < C; ++c) {
    ms = s[c] > ms ? s[c] : ms;
    mt = tt[c] > mt ? tt[c] : mt;
  }
  double sums[4];
  kd_row_sums(s, tt, es, est, et, C, ms, mt, invT, sums);
  const double zs = sums[0], zst = sums[1], zt = sums[2], cross = sums[3];
  const F b_ce = static_cast<F>(a_ce / zs), b_q = static_cast<F>(a_kl / zst);
  const F b_p = static_cast<F>(a_kl / zt);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) g[c] = madd(b_ce, es[c], madd(b_q, est[c], -b_p * et[c]));
  g[y] -= a_ce;
  // KL = sum p (t/T - s/T) - lse(t/T) + lse(s/T), using sum p = 1
  const double lse_s = ms + std::log(zs), lse_st = static_cast<double>(ms) * invT + std::log(zst);
  const double lse_t = mt + std::log(zt);
  *ce = static_cast<F>(lse_s - s[y]);
  *kl = static_cast<F>(cross / zt - lse_t + lse_st);
}

static void kd_row(const float* s, const float* tt, float* g, float* scratch, int64_t C, int64_t y, float invT,
                   float a_ce, float a_kl, float* ce, float* kl) {
  kd_row_impl<float>(s, tt, g, scratch, C, y, invT, a_ce, a_kl, ce, kl);
}

static void kd_row_f64(const double* s, const double* tt, double* g, double* scratch, int64_t C, int64_t y,
                       double invT, double a_ce, double a_kl, double* ce, double* kl) {
  kd_row_impl<double>(s, tt, g, scratch, C, y, invT, a_ce, a_kl, ce, kl);
}

// kd_block's first pass: rows transposed in, S[c * R + r] = s[r][c] and Tt[c * R + r] = t[r][c] / T (padding rows,
// r >= rows, repeat row 0 and are weighted 0 later), and each row's maxes.
DSD2_INLINE void kd_block_load(const float* __restrict__ s, int64_t s_stride, const float* __restrict__ t,
                               int64_t t_stride, int64_t rows, int64_t C, float invT, float* __restrict__ S,
                               float* __restrict__ Tt, float* __restrict__ ms, float* __restrict__ mt) {
  constexpr int64_t R = kKDBlockRows;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t rr = r < rows ? r : 0;
    for (int64_t c = 0; c < C; ++c) {
      S[c * R + r] = s[rr * s_stride + c];
      Tt[c * R + r] = t[rr * t_stride + c] * invT;
    }
  }
#pragma omp simd
  for (int64_t r = 0; r < R; ++r) ms[r] = mt[r] = -__builtin_inff();
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      ms[r] = S[c * R + r] > ms[r] ? S[c * R + r] : ms[r];
      mt[r] = Tt[c * R + r] > mt[r] ? Tt[c * R + r] : mt[r];
    }
  }
}

// kd_block's last pass: the target class's terms of valid rows, then the gradient transposed out.
DSD2_INLINE void kd_block_store(const float* __restrict__ S, float* __restrict__ G, float* __restrict__ g,
                                int64_t g_stride, int64_t rows, int64_t C, const int64_t* __restrict__ y,
                                const float* __restrict__ valid, float a_ce, float* __restrict__ ce) {
  constexpr int64_t R = kKDBlockRows;
  for (int64_t r = 0; r < R; ++r) {
    if (valid[r] == 0.0f) continue;
    ce[r] -= S[y[r] * R + r];
    G[y[r] * R + r] -= a_ce;
  }
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) g[r * g_stride + c] = G[c * R + r];
  }
}

// Small C (10 or 100 classes): the rows of a block are the SIMD lanes and classes the outer loop, so a 10-class
// row still fills the vector. Each row's sums run over its classes in order: the same on every level.
static void kd_block(const float* __restrict__ s, int64_t s_stride, const float* __restrict__ t, int64_t t_stride,
                     float* __restrict__ g, int64_t g_stride, int64_t rows, const int64_t* __restrict__ y,
                     const float* __restrict__ valid, int64_t C, float invT, float a_ce, float a_kl,
                     float* __restrict__ scratch, float* __restrict__ ce, float* __restrict__ kl) {
  constexpr int64_t R = kKDBlockRows;
  float* __restrict__ S = scratch;
  float* __restrict__ Tt = S + C * R;
  float* __restrict__ G = Tt + C * R;
  float* __restrict__ E1 = G + C * R;
  float* __restrict__ E2 = E1 + C * R;
  float* __restrict__ E3 = E2 + C * R;
  float ms[R], mt[R], zs[R], zst[R], zt[R], cross[R];
  kd_block_load(s, s_stride, t, t_stride, rows, C, invT, S, Tt, ms, mt);
#pragma omp simd
  for (int64_t r = 0; r < R; ++r) zs[r] = zst[r] = zt[r] = cross[r] = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      float e1, e2, e3, x;
      kd_terms(S[c * R + r], Tt[c * R + r], ms[r], mt[r], invT, e1, e2, e3, x);
      E1[c * R + r] = e1;
      E2[c * R + r] = e2;
      E3[c * R + r] = e3;
      zs[r] += e1;
      zst[r] += e2;
      zt[r] += e3;
      cross[r] += x;
    }
  }
  // an ignored row (valid 0) is chosen away, not multiplied by 0: its logits may be inf or NaN
  float b_ce[R], b_q[R], b_p[R];
#pragma omp simd
  for (int64_t r = 0; r < R; ++r) {
    const float lse_st = ms[r] * invT + log_pos(zst[r]);
    const float lse_t = mt[r] + log_pos(zt[r]);
    const float izt = 1.0f / zt[r];
    const bool live = valid[r] != 0.0f;
    ce[r] = live ? ms[r] + log_pos(zs[r]) : 0.0f;  // minus s[y] in kd_block_store
    kl[r] = live ? cross[r] * izt - lse_t + lse_st : 0.0f;
    b_ce[r] = live ? a_ce / zs[r] : 0.0f;
    b_q[r] = live ? a_kl / zst[r] : 0.0f;
    b_p[r] = live ? a_kl * izt : 0.0f;
  }
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      const float g = madd(b_ce[r], E1[c * R + r], madd(b_q[r], E2[c * R + r], -b_p[r] * E3[c * R + r]));
      G[c * R + r] = valid[r] != 0.0f ? g : 0.0f;
    }
  }
  kd_block_store(S, G, g, g_stride, rows, C, y, valid, a_ce, ce);
}

// ---- masked layers --------------------------------------------------------------------------------------
// out = w where the mask keeps it, else +0 (a pruned entry is 0 even when w is inf or NaN); out may be w itself
// (the weight gradient masked in place). The check: whether every pruned entry is +0 or -0.

#if DSD2_VEC_BITS == 512
// AVX-512: 64 mask bytes at a time become one 64-bit lane mask (vptestmb); the weights are loaded with the pruned
// lanes zeroed (a masked load: +0 there, the bits elsewhere), and the check tests the pruned lanes only, so no
// mask byte is widened to a lane by shuffles (the widening below checked 65 K weights in 4.7 us at one thread on a
// Zen 4). The scalar tail computes the same bits.
DSD2_INLINE __mmask64 kept_lanes(const uint8_t* mask) {
  const __m512i m = _mm512_loadu_si512(mask);
  return _mm512_test_epi8_mask(m, m);
}

static void mask_f32(const float* w, const uint8_t* __restrict__ mask, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __mmask64 keep = kept_lanes(mask + i);
    for (int j = 0; j < 4; ++j) {
      const __mmask16 k = static_cast<__mmask16>(keep >> (16 * j));
      _mm512_storeu_si512(out + i + 16 * j, _mm512_maskz_loadu_epi32(k, w + i + 16 * j));
    }
  }
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(w);
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  for (; i < n; ++i) dst[i] = bits[i] & (0u - static_cast<uint32_t>(mask[i] != 0));
}

static void mask_u16(const uint16_t* w, const uint8_t* __restrict__ mask, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __mmask64 keep = kept_lanes(mask + i);
    for (int j = 0; j < 2; ++j) {
      const __mmask32 k = static_cast<__mmask32>(keep >> (32 * j));
      _mm512_storeu_si512(out + i + 32 * j, _mm512_maskz_loadu_epi16(k, w + i + 32 * j));
    }
  }
  for (; i < n; ++i)
    out[i] = static_cast<uint16_t>(w[i] & static_cast<uint16_t>(0u - static_cast<uint32_t>(mask[i] != 0)));
}

static bool pruned_zero_f32(const float* w, const uint8_t* __restrict__ mask, int64_t n) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __mmask64 pruned = ~kept_lanes(mask + i);
    for (int j = 0; j < 4; ++j)
      bad |= _mm512_mask_test_epi32_mask(static_cast<__mmask16>(pruned >> (16 * j)),
                                         _mm512_loadu_si512(w + i + 16 * j), magnitude);
  }
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(w);
  uint32_t acc = 0;
  for (; i < n; ++i) acc |= bits[i] & 0x7fffffffu & (static_cast<uint32_t>(mask[i] != 0) - 1u);
  return bad == 0 && acc == 0;
}

static bool pruned_zero_u16(const uint16_t* w, const uint8_t* __restrict__ mask, int64_t n) {
  const __m512i magnitude = _mm512_set1_epi16(0x7fff);
  __mmask32 bad = 0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __mmask64 pruned = ~kept_lanes(mask + i);
    for (int j = 0; j < 2; ++j)
      bad |= _mm512_mask_test_epi16_mask(static_cast<__mmask32>(pruned >> (32 * j)),
                                         _mm512_loadu_si512(w + i + 32 * j), magnitude);
  }
  uint32_t acc = 0;
  for (; i < n; ++i) acc |= w[i] & 0x7fffu & (static_cast<uint32_t>(mask[i] != 0) - 1u);
  return bad == 0 && acc == 0;
}
#else
// The weight's bits and-ed with all ones or all zeros: every load unconditional, the loop integer-only.
static void mask_f32(const float* w, const uint8_t* __restrict__ mask, float* out, int64_t n) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(w);
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bits[i] & (0u - static_cast<uint32_t>(mask[i] != 0));
}

// 16-bit floats by their bit patterns: +0 is the pattern 0 in both bf16 and fp16
static void mask_u16(const uint16_t* w, const uint8_t* __restrict__ mask, uint16_t* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<uint16_t>(w[i] & static_cast<uint16_t>(0u - static_cast<uint32_t>(mask[i] != 0)));
}

// Whether every pruned entry (mask 0) is +0 or -0, so that w⊙m is w itself: the pruned entries' magnitude bits
// or-ed together, one pass that reads and writes nothing else.
static bool pruned_zero_f32(const float* w, const uint8_t* __restrict__ mask, int64_t n) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(w);
  uint32_t acc = 0;
#pragma omp simd reduction(| : acc)
  for (int64_t i = 0; i < n; ++i) acc |= bits[i] & 0x7fffffffu & (static_cast<uint32_t>(mask[i] != 0) - 1u);
  return acc == 0;
}

static bool pruned_zero_u16(const uint16_t* w, const uint8_t* __restrict__ mask, int64_t n) {
  uint32_t acc = 0;
#pragma omp simd reduction(| : acc)
  for (int64_t i = 0; i < n; ++i) acc |= w[i] & 0x7fffu & (static_cast<uint32_t>(mask[i] != 0) - 1u);
  return acc == 0;
}
#endif

// bf16 of w where the mask keeps it, else +0: c10::BFloat16's rounding (to nearest, ties to even; NaN stays NaN), the
// cast CPU autocast makes, fused with the mask into one pass. And back: fp32 of a bf16 gradient (exact) where the
// mask keeps it, else +0.
static void mask_to_bf16(const float* w, const uint8_t* __restrict__ mask, uint16_t* out, int64_t n) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(w);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = bits[i];
    const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    const uint32_t v = (b & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded;
    out[i] = static_cast<uint16_t>(v & (0u - static_cast<uint32_t>(mask[i] != 0)));
  }
}

static void mask_from_bf16(const uint16_t* g, const uint8_t* __restrict__ mask, float* out, int64_t n) {
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    dst[i] = (static_cast<uint32_t>(g[i]) << 16) & (0u - static_cast<uint32_t>(mask[i] != 0));
}

// ---- products over the kept weights only (sparse_layers.cpp) --------------------------------------------------

// One vector of floats at this level: the including file names its width (DSD2_VEC_BITS; 0 for the portable
// 128-bit GCC vector) and includes <immintrin.h> for the x86 ones. Every lane computes what the scalar madd()
// computes, so a product's bits do not depend on which of the vector, blocked or scalar tail paths took it.
#if DSD2_VEC_BITS == 512
typedef __m512 vecf;
constexpr int64_t kVec = 16;
DSD2_INLINE vecf vzero() { return _mm512_setzero_ps(); }
DSD2_INLINE vecf vbroadcast(float v) { return _mm512_set1_ps(v); }
DSD2_INLINE vecf vload(const float* p) { return _mm512_loadu_ps(p); }
DSD2_INLINE void vstore(float* p, vecf v) { _mm512_storeu_ps(p, v); }
DSD2_INLINE vecf vmadd(vecf a, vecf b, vecf c) { return _mm512_fmadd_ps(a, b, c); }
DSD2_INLINE vecf vadd(vecf a, vecf b) { return _mm512_add_ps(a, b); }
typedef int32_t veci __attribute__((vector_size(64)));
DSD2_INLINE vecf vevens(vecf a, vecf b) {  // lanes 0, 2, 4, ... of a then of b
  return __builtin_shuffle(a, b, veci{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30});
}
DSD2_INLINE vecf vodds(vecf a, vecf b) {
  return __builtin_shuffle(a, b, veci{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
}
#elif DSD2_VEC_BITS == 256
typedef __m256 vecf;
constexpr int64_t kVec = 8;
DSD2_INLINE vecf vzero() { return _mm256_setzero_ps(); }
DSD2_INLINE vecf vbroadcast(float v) { return _mm256_set1_ps(v); }
DSD2_INLINE vecf vload(const float* p) { return _mm256_loadu_ps(p); }
DSD2_INLINE void vstore(float* p, vecf v) { _mm256_storeu_ps(p, v); }
DSD2_INLINE vecf vmadd(vecf a, vecf b, vecf c) { return _mm256_fmadd_ps(a, b, c); }
DSD2_INLINE vecf vadd(vecf a, vecf b) { return _mm256_add_ps(a, b); }
typedef int32_t veci __attribute__((vector_size(32)));
DSD2_INLINE vecf vevens(vecf a, vecf b) { return __builtin_shuffle(a, b, veci{0, 2, 4, 6, 8, 10, 12, 14}); }
DSD2_INLINE vecf vodds(vecf a, vecf b) { return __builtin_shuffle(a, b, veci{1, 3, 5, 7, 9, 11, 13, 15}); }
#elif DSD2_VEC_BITS == 0
typedef float vecf __attribute__((vector_size(16)));
constexpr int64_t kVec = 4;
DSD2_INLINE vecf vzero() { return vecf{0.0f, 0.0f, 0.0f, 0.0f}; }
DSD2_INLINE vecf vbroadcast(float v) { return vecf{v, v, v, v}; }
DSD2_INLINE vecf vload(const float* p) {
  vecf v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
DSD2_INLINE void vstore(float* p, vecf v) { __builtin_memcpy(p, &v, sizeof(v)); }
DSD2_INLINE vecf vmadd(vecf a, vecf b, vecf c) { return a * b + c; }  // DSD2_HAS_FMA is 0 at this level
DSD2_INLINE vecf vadd(vecf a, vecf b) { return a + b; }
typedef int32_t veci __attribute__((vector_size(16)));
DSD2_INLINE vecf vevens(vecf a, vecf b) { return __builtin_shuffle(a, b, veci{0, 2, 4, 6}); }
DSD2_INLINE vecf vodds(vecf a, vecf b) { return __builtin_shuffle(a, b, veci{1, 3, 5, 7}); }
#else
#error "define DSD2_VEC_BITS (0, 256 or 512) before including kernels_impl.h"
#endif

constexpr int64_t kSparseBlock = 64;  // lanes of a dot product's partial sums, at every level
constexpr int64_t kRowVecs = 8;       // accumulators a row kernel keeps in registers while the kept weights stream

// Where entry k's operand run starts: a precomputed offset (the training kernels' list), or operand row times the
// operand's row stride plus the entry's shift (the inference stacks' list, the same for every batch size).
struct Offsets {
  const int64_t* __restrict__ base;
  inline __attribute__((always_inline)) int64_t operator[](int64_t k) const { return base[k]; }
};
struct RowShifts {
  const int32_t* __restrict__ col;
  const int32_t* __restrict__ shift;
  int64_t ld;
  inline __attribute__((always_inline)) int64_t operator[](int64_t k) const {
    return static_cast<int64_t>(col[k]) * ld + shift[k];
  }
};

// What a stored value takes: nothing, or a RowPost. The vector and the scalar forms give the same bits (a compare
// and a select for the ReLU, then a product and a sum each rounded on its own).
struct Stored {
  inline __attribute__((always_inline)) vecf operator()(vecf v) const { return v; }
  inline __attribute__((always_inline)) float operator()(float v) const { return v; }
};
struct Finished {
  RowPost p;
  inline __attribute__((always_inline)) vecf operator()(vecf v) const {
    if (p.relu) v = v < vzero() ? vzero() : v;  // a NaN compares false and stays
    if (p.affine) v = v * vbroadcast(p.a) + vbroadcast(p.z);
    return v;
  }
  inline __attribute__((always_inline)) float operator()(float v) const {
    if (p.relu) v = v < 0.0f ? 0.0f : v;
    if (p.affine) v = v * p.a + p.z;
    return v;
  }
};

// `kRowVecs` vectors of one output row: acc[u] += v * s[u] for each kept entry, in entry order.
template <typename Entries, typename Post>
DSD2_INLINE void sparse_row_block(const float* __restrict__ x, Entries base, const float* __restrict__ val,
                                  int64_t nnz, float* __restrict__ out, float init, Post post) {
  const vecf b = vbroadcast(init);
  vecf a0 = b, a1 = b, a2 = b, a3 = b, a4 = b, a5 = b, a6 = b, a7 = b;
  for (int64_t k = 0; k < nnz; ++k) {
    const vecf v = vbroadcast(val[k]);
    const float* __restrict__ s = x + base[k];
    a0 = vmadd(v, vload(s), a0);
    a1 = vmadd(v, vload(s + kVec), a1);
    a2 = vmadd(v, vload(s + 2 * kVec), a2);
    a3 = vmadd(v, vload(s + 3 * kVec), a3);
    a4 = vmadd(v, vload(s + 4 * kVec), a4);
    a5 = vmadd(v, vload(s + 5 * kVec), a5);
    a6 = vmadd(v, vload(s + 6 * kVec), a6);
    a7 = vmadd(v, vload(s + 7 * kVec), a7);
  }
  vstore(out, post(a0));
  vstore(out + kVec, post(a1));
  vstore(out + 2 * kVec, post(a2));
  vstore(out + 3 * kVec, post(a3));
  vstore(out + 4 * kVec, post(a4));
  vstore(out + 5 * kVec, post(a5));
  vstore(out + 6 * kVec, post(a6));
  vstore(out + 7 * kVec, post(a7));
}

// out[i] = init + sum_k val[k] * x[base[k] + i] for i in [0, n): one tile of one output row (init: its bias, or
// 0), each element's terms added in k order by madd (the same bits on every path and at every vector width of a
// level with FMA).
// A row of at most kShortRow elements (the small maps of a network's last blocks, at batch 1) is latency bound
// along k: one FMA chain per vector, each waiting on the last. There each element's terms go to four partial sums
// by k mod 4, folded (p0 + p1) + (p2 + p3): four independent chains. The order depends on n alone, so it is the
// same on every path and at every vector width, as the long rows' k order is.
constexpr int64_t kShortRow = 64;

// V vectors of a short row in one pass over the entries, four partial sums each
template <int V, typename Entries, typename Post>
DSD2_INLINE void sparse_row_short_vecs(const float* __restrict__ x, Entries base, const float* __restrict__ val,
                                       int64_t nnz, float* __restrict__ out, float init, Post post) {
  const int64_t k4 = nnz - nnz % 4;
  vecf a[4][V];
  for (int u = 0; u < V; ++u) a[0][u] = vbroadcast(init), a[1][u] = a[2][u] = a[3][u] = vzero();
  for (int64_t k = 0; k < k4; k += 4) {
    for (int c = 0; c < 4; ++c) {
      const vecf v = vbroadcast(val[k + c]);
      const float* __restrict__ s = x + base[k + c];
      for (int u = 0; u < V; ++u) a[c][u] = vmadd(v, vload(s + u * kVec), a[c][u]);
    }
  }
  for (int64_t k = k4; k < nnz; ++k) {
    const vecf v = vbroadcast(val[k]);
    const float* __restrict__ s = x + base[k];
    for (int u = 0; u < V; ++u) a[k - k4][u] = vmadd(v, vload(s + u * kVec), a[k - k4][u]);
  }
  for (int u = 0; u < V; ++u) vstore(out + u * kVec, post(vadd(vadd(a[0][u], a[1][u]), vadd(a[2][u], a[3][u]))));
}

template <typename Entries, typename Post>
DSD2_INLINE void sparse_row_short(const float* __restrict__ x, Entries base, const float* __restrict__ val,
                                  int64_t nnz, float* __restrict__ out, int64_t n, float init, Post post) {
  const int64_t k4 = nnz - nnz % 4;
  int64_t i0 = 0;
  for (; i0 + 2 * kVec <= n; i0 += 2 * kVec) sparse_row_short_vecs<2>(x + i0, base, val, nnz, out + i0, init, post);
  if (i0 + kVec <= n) {
    sparse_row_short_vecs<1>(x + i0, base, val, nnz, out + i0, init, post);
    i0 += kVec;
  }
  for (; i0 < n; ++i0) {
    float a0 = init, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    for (int64_t k = 0; k < k4; k += 4) {
      a0 = madd(val[k], x[base[k] + i0], a0);
      a1 = madd(val[k + 1], x[base[k + 1] + i0], a1);
      a2 = madd(val[k + 2], x[base[k + 2] + i0], a2);
      a3 = madd(val[k + 3], x[base[k + 3] + i0], a3);
    }
    if (k4 < nnz) a0 = madd(val[k4], x[base[k4] + i0], a0);
    if (k4 + 1 < nnz) a1 = madd(val[k4 + 1], x[base[k4 + 1] + i0], a1);
    if (k4 + 2 < nnz) a2 = madd(val[k4 + 2], x[base[k4 + 2] + i0], a2);
    out[i0] = post((a0 + a1) + (a2 + a3));
  }
}

// V (< kRowVecs) vectors of a long row in one pass over the entries, one sum each in k order
template <int V, typename Entries, typename Post>
DSD2_INLINE void sparse_row_vecs(const float* __restrict__ x, Entries base, const float* __restrict__ val,
                                 int64_t nnz, float* __restrict__ out, float init, Post post) {
  vecf a[V];
  for (int u = 0; u < V; ++u) a[u] = vbroadcast(init);
  for (int64_t k = 0; k < nnz; ++k) {
    const vecf v = vbroadcast(val[k]);
    const float* __restrict__ s = x + base[k];
    for (int u = 0; u < V; ++u) a[u] = vmadd(v, vload(s + u * kVec), a[u]);
  }
  for (int u = 0; u < V; ++u) vstore(out + u * kVec, post(a[u]));
}

template <typename Entries, typename Post>
DSD2_INLINE void sparse_row_any(const float* __restrict__ x, Entries base, const float* __restrict__ val,
                                int64_t nnz, float* __restrict__ out, int64_t n, float init, Post post) {
  if (n <= kShortRow) return sparse_row_short(x, base, val, nnz, out, n, init, post);
  int64_t i0 = 0;
  for (; i0 + kRowVecs * kVec <= n; i0 += kRowVecs * kVec)
    sparse_row_block(x + i0, base, val, nnz, out + i0, init, post);
  // the vectors left, in blocks of 4, 2 and 1: each block one pass over the entries
  if (i0 + 4 * kVec <= n) {
    sparse_row_vecs<4>(x + i0, base, val, nnz, out + i0, init, post);
    i0 += 4 * kVec;
  }
  if (i0 + 2 * kVec <= n) {
    sparse_row_vecs<2>(x + i0, base, val, nnz, out + i0, init, post);
    i0 += 2 * kVec;
  }
  if (i0 + kVec <= n) {
    sparse_row_vecs<1>(x + i0, base, val, nnz, out + i0, init, post);
    i0 += kVec;
  }
  for (; i0 < n; ++i0) {
    float acc = init;
    for (int64_t k = 0; k < nnz; ++k) acc = madd(val[k], x[base[k] + i0], acc);
    out[i0] = post(acc);
  }
}

static void sparse_row_f32(const float* __restrict__ x, const int64_t* __restrict__ base,
                           const float* __restrict__ val, int64_t nnz, float* __restrict__ out, int64_t n,
                           float init) {
  sparse_row_any(x, Offsets{base}, val, nnz, out, n, init, Stored{});
}

static void sparse_row_post_f32(const float* __restrict__ x, int64_t ld, const int32_t* __restrict__ col,
                                const int32_t* __restrict__ shift, const float* __restrict__ val, int64_t nnz,
                                float* __restrict__ out, int64_t n, float init, const RowPost& post) {
  sparse_row_any(x, RowShifts{col, shift, ld}, val, nnz, out, n, init, Finished{post});
}

// The larger of m and v, v where v is a NaN (a NaN already in m stays): torch's max_pool2d.
DSD2_INLINE float max_nan(float m, float v) { return (v > m || v != v) ? v : m; }
DSD2_INLINE vecf max_nan(vecf m, vecf v) { return (v > m) | (v != v) ? v : m; }

static void maxpool2_f32(const float* __restrict__ src, int64_t lds, float* __restrict__ out, int64_t ldo,
                         int64_t ho, int64_t wo, const RowPost& p) {
  const Finished post{p};
  for (int64_t i = 0; i < ho; ++i) {
    const float* top = src + 2 * i * lds;
    const float* bottom = top + lds;
    float* o = out + i * ldo;
    int64_t j = 0;
    for (; j + kVec <= wo; j += kVec) {  // two vectors of each row: their columns' pairs, evens beside odds
      const vecf t0 = post(vload(top + 2 * j)), t1 = post(vload(top + 2 * j + kVec));
      const vecf b0 = post(vload(bottom + 2 * j)), b1 = post(vload(bottom + 2 * j + kVec));
      // the window's order (top left, top right, bottom left, bottom right), as the scalar loop takes it
      vecf m = max_nan(vevens(t0, t1), vodds(t0, t1));
      m = max_nan(m, vevens(b0, b1));
      vstore(o + j, max_nan(m, vodds(b0, b1)));
    }
    if (j < wo && wo - j >= 4) {  // a part of a vector: through buffers, the same ops on their lanes
      float tb[2 * kVec] = {}, bb[2 * kVec] = {}, ob[kVec];
      __builtin_memcpy(tb, top + 2 * j, 2 * (wo - j) * sizeof(float));
      __builtin_memcpy(bb, bottom + 2 * j, 2 * (wo - j) * sizeof(float));
      const vecf t0 = post(vload(tb)), t1 = post(vload(tb + kVec));
      const vecf b0 = post(vload(bb)), b1 = post(vload(bb + kVec));
      vecf m = max_nan(vevens(t0, t1), vodds(t0, t1));
      m = max_nan(m, vevens(b0, b1));
      vstore(ob, max_nan(m, vodds(b0, b1)));
      __builtin_memcpy(o + j, ob, (wo - j) * sizeof(float));
      j = wo;
    }
    for (; j < wo; ++j) {
      float m = post(top[2 * j]);
      m = max_nan(m, post(top[2 * j + 1]));
      m = max_nan(m, post(bottom[2 * j]));
      o[j] = max_nan(m, post(bottom[2 * j + 1]));
    }
  }
}

// sum_i a[i] * b_e[i] over n elements for E operands b_e at once (each vector of `a` loaded once for all E):
// element i goes to partial sum i % kSparseBlock and the partials are folded in a fixed tree (lane i += lane
// i + w for w = 32, 16, ..., 1), so each sum's order depends neither on the vector width nor on E: the first
// folds add whole vectors, the last ones the lanes of one.
template <int E>
DSD2_INLINE void sparse_dot_group(const float* __restrict__ a, const float* const* b, int64_t n,
                                  float* __restrict__ out) {
  constexpr int64_t kAcc = kSparseBlock / kVec;
  vecf acc[E][kAcc];
  for (int e = 0; e < E; ++e)
    for (int64_t u = 0; u < kAcc; ++u) acc[e][u] = vzero();
  int64_t i0 = 0;
  for (; i0 + kSparseBlock <= n; i0 += kSparseBlock) {
    for (int64_t u = 0; u < kAcc; ++u) {
      const vecf av = vload(a + i0 + u * kVec);
      for (int e = 0; e < E; ++e) acc[e][u] = vmadd(av, vload(b[e] + i0 + u * kVec), acc[e][u]);
    }
  }
  for (int e = 0; e < E; ++e) {
    if (i0 < n) {  // the tail: lanes beyond it add nothing
      float lanes[kSparseBlock];
      for (int64_t u = 0; u < kAcc; ++u) vstore(lanes + u * kVec, acc[e][u]);
      for (int64_t i = 0; i < n - i0; ++i) lanes[i] = madd(a[i0 + i], b[e][i0 + i], lanes[i]);
      for (int64_t u = 0; u < kAcc; ++u) acc[e][u] = vload(lanes + u * kVec);
    }
    for (int64_t count = kAcc / 2; count > 0; count /= 2)
      for (int64_t u = 0; u < count; ++u) acc[e][u] = vadd(acc[e][u], acc[e][u + count]);
    float lanes[kVec];
    vstore(lanes, acc[e][0]);
    for (int64_t width = kVec / 2; width > 0; width /= 2)
      for (int64_t i = 0; i < width; ++i) lanes[i] += lanes[i + width];
    out[e] = lanes[0];
  }
}

// Operands per group: as many as keep every partial sum and one vector of `a` in registers (32 vector registers
// at 512 bits, 16 below).
constexpr int kDotGroup = DSD2_VEC_BITS == 512 ? 4 : 1;

static void sparse_dots_f32(const float* __restrict__ a, const float* __restrict__ x,
                            const int64_t* __restrict__ base, int64_t nnz, float* __restrict__ out, int64_t n) {
  int64_t j = 0;
  for (; j + kDotGroup <= nnz; j += kDotGroup) {
    const float* b[kDotGroup];
    for (int e = 0; e < kDotGroup; ++e) b[e] = x + base[j + e];
    sparse_dot_group<kDotGroup>(a, b, n, out + j);
  }
  for (; j < nnz; ++j) {
    const float* b[1] = {x + base[j]};
    sparse_dot_group<1>(a, b, n, out + j);
  }
}

// ---- BatchNorm in training ------------------------------------------------------------------------------
// Per-channel sums over a block of rows of a [rows, C] array (channels_last: channel c at column c), each channel's
// terms added in row order (the same order at every vector width), in fp32 over at most kFold rows and then
// folded into double. Statistics: d = p - k[c], s1 += d, s2 += d * d (k: a shift near the mean, against
// cancellation). Backward: s1 += q, s2 += q * (p - k[c]) (q: the output gradient, k: the mean). RELU: the norm
// of a ReLU's output, read from its input: p is read as relu(p) (p < 0 ? 0 : p, so a NaN stays NaN, as torch.relu
// keeps it).

template <bool RELU>
DSD2_INLINE float bn_read(float p) {
  return RELU ? (p < 0.0f ? 0.0f : p) : p;
}

template <bool STATS, bool RELU>
DSD2_INLINE void bn_sums_rows_loop(const float* __restrict__ p, const float* __restrict__ q,
                                   const float* __restrict__ k, int64_t rows, int64_t C, float* __restrict__ a1,
                                   float* __restrict__ a2, double* __restrict__ s1, double* __restrict__ s2) {
  for (int64_t r0 = 0; r0 < rows; r0 += kFold) {
    const int64_t r1 = r0 + kFold < rows ? r0 + kFold : rows;
    for (int64_t c = 0; c < C; ++c) a1[c] = a2[c] = 0.0f;
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict__ pr = p + r * C;
      const float* __restrict__ qr = STATS ? pr : q + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float d = bn_read<RELU>(pr[c]) - k[c];
        const float v = STATS ? d : qr[c];
        a1[c] += v;
        a2[c] = madd(v, d, a2[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += a1[c];
      s2[c] += a2[c];
    }
  }
}

// scratch: 2 * C floats
static void bn_sums_rows_f32(const float* p, const float* q, const float* k, int64_t rows, int64_t C,
                             float* scratch, double* s1, double* s2, bool relu) {
  if (q)
    relu ? bn_sums_rows_loop<false, true>(p, q, k, rows, C, scratch, scratch + C, s1, s2)
         : bn_sums_rows_loop<false, false>(p, q, k, rows, C, scratch, scratch + C, s1, s2);
  else
    relu ? bn_sums_rows_loop<true, true>(p, q, k, rows, C, scratch, scratch + C, s1, s2)
         : bn_sums_rows_loop<true, false>(p, q, k, rows, C, scratch, scratch + C, s1, s2);
}

// The same sums over one channel's plane of n elements (NCHW): element i in lane i % kLanes, lanes folded into
// double every kFold elements, in lane order.
template <bool STATS, bool RELU>
DSD2_INLINE void bn_sums_plane_loop(const float* __restrict__ p, const float* __restrict__ q, float k, int64_t n,
                                    double* s1, double* s2) {
  static_assert(kFold % kLanes == 0, "a fold block holds whole lane groups");
  double t1 = 0.0, t2 = 0.0;
  for (int64_t b = 0; b < n; b += kFold) {
    const int64_t e = b + kFold < n ? b + kFold : n;
    float a1[kLanes] = {}, a2[kLanes] = {};
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const float d = bn_read<RELU>(p[i + l]) - k;
        const float v = STATS ? d : q[i + l];
        a1[l] += v;
        a2[l] = madd(v, d, a2[l]);
      }
    }
    for (int l = 0; i < e; ++i, ++l) {
      const float d = bn_read<RELU>(p[i]) - k;
      const float v = STATS ? d : q[i];
      a1[l] += v;
      a2[l] = madd(v, d, a2[l]);
    }
    for (int l = 0; l < kLanes; ++l) {
      t1 += a1[l];
      t2 += a2[l];
    }
  }
  *s1 += t1;
  *s2 += t2;
}

static void bn_sums_plane_f32(const float* p, const float* q, float k, int64_t n, double* s1, double* s2,
                              bool relu) {
  if (q)
    relu ? bn_sums_plane_loop<false, true>(p, q, k, n, s1, s2) : bn_sums_plane_loop<false, false>(p, q, k, n, s1, s2);
  else
    relu ? bn_sums_plane_loop<true, true>(p, q, k, n, s1, s2) : bn_sums_plane_loop<true, false>(p, q, k, n, s1, s2);
}

// out = (p - kp[c]) * a[c] + z[c] (q null: the forward's normalisation, z = beta), or
// out = (p - kp[c]) * a[c] + (q - kq[c]) * b[c] (the input gradient: p = dy, kp = its mean, q = x, kq = the mean),
// over a block of rows of a [rows, C] array; out may be p. RELU: the forward reads p as relu(p); the input
// gradient is 0 where q <= 0 (torch.relu's gradient: where its input was not positive; elsewhere relu(q) = q).
template <bool TWO, bool RELU>
DSD2_INLINE void bn_affine_rows_loop(const float* __restrict__ p, const float* __restrict__ q,
                                     const float* __restrict__ kp, const float* __restrict__ a,
                                     const float* __restrict__ kq, const float* __restrict__ b, float* out,
                                     int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* pr = p + r * C;
    const float* __restrict__ qr = TWO ? q + r * C : nullptr;
    float* orow = out + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      if (TWO) {
        const float v = madd(pr[c] - kp[c], a[c], (qr[c] - kq[c]) * b[c]);
        orow[c] = RELU ? (qr[c] > 0.0f ? v : 0.0f) : v;
      } else {
        orow[c] = madd(bn_read<RELU>(pr[c]) - kp[c], a[c], b[c]);
      }
    }
  }
}

// q null: b is z, kq unused
static void bn_affine_rows_f32(const float* p, const float* q, const float* kp, const float* a, const float* kq,
                               const float* b, float* out, int64_t rows, int64_t C, bool relu) {
  if (q)
    relu ? bn_affine_rows_loop<true, true>(p, q, kp, a, kq, b, out, rows, C)
         : bn_affine_rows_loop<true, false>(p, q, kp, a, kq, b, out, rows, C);
  else
    relu ? bn_affine_rows_loop<false, true>(p, q, kp, a, kq, b, out, rows, C)
         : bn_affine_rows_loop<false, false>(p, q, kp, a, kq, b, out, rows, C);
}

// The same over one channel's plane of n elements, its coefficients scalars.
template <bool RELU>
DSD2_INLINE void bn_affine_plane_loop(const float* __restrict__ p, const float* __restrict__ q, float kp, float a,
                                      float kq, float b, float* out, int64_t n) {
  if (q) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float v = madd(p[i] - kp, a, (q[i] - kq) * b);
      out[i] = RELU ? (q[i] > 0.0f ? v : 0.0f) : v;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = madd(bn_read<RELU>(p[i]) - kp, a, b);
  }
}

static void bn_affine_plane_f32(const float* p, const float* q, float kp, float a, float kq, float b, float* out,
                                int64_t n, bool relu) {
  relu ? bn_affine_plane_loop<true>(p, q, kp, a, kq, b, out, n)
       : bn_affine_plane_loop<false>(p, q, kp, a, kq, b, out, n);
}

// ---- Max pooling 2x2, stride 2, in training (pooling.cpp), channels_last ----------------------------------
// One output row from input rows r0 (2i) and r1 (2i + 1), each [W, C]: out[j * C + c] is the max of the window at
// columns 2j, 2j + 1, idx[j * C + c] its place in the window (0 top left, 1 top right, 2 bottom left, 3 bottom
// right): the first max in that order, and a NaN wherever one is (the last NaN), as torch's max_pool2d picks.
static void maxpool2_train_rows_f32(const float* __restrict__ r0, const float* __restrict__ r1, int64_t wo,
                                    int64_t C, float* __restrict__ out, uint8_t* __restrict__ idx) {
  for (int64_t j = 0; j < wo; ++j) {
    const float* __restrict__ p0 = r0 + 2 * j * C;
    const float* __restrict__ p1 = p0 + C;
    const float* __restrict__ p2 = r1 + 2 * j * C;
    const float* __restrict__ p3 = p2 + C;
    float* __restrict__ o = out + j * C;
    uint8_t* __restrict__ k = idx + j * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      float m = p0[c];
      int32_t w = 0;
      const float v1 = p1[c], v2 = p2[c], v3 = p3[c];
      const bool t1 = v1 > m || v1 != v1;
      m = t1 ? v1 : m;
      w = t1 ? 1 : w;
      const bool t2 = v2 > m || v2 != v2;
      m = t2 ? v2 : m;
      w = t2 ? 2 : w;
      const bool t3 = v3 > m || v3 != v3;
      m = t3 ? v3 : m;
      w = t3 ? 3 : w;
      o[c] = m;
      k[c] = static_cast<uint8_t>(w);
    }
  }
}

// The input gradient's rows 2i (d0) and 2i + 1 (d1), columns 0 .. 2 wo - 1, from one row of the output gradient
// and its idx: each window's gradient at its max, 0 elsewhere.
static void maxpool2_grad_rows_f32(const float* __restrict__ dy, const uint8_t* __restrict__ idx, int64_t wo,
                                   int64_t C, float* __restrict__ d0, float* __restrict__ d1) {
  for (int64_t j = 0; j < wo; ++j) {
    const float* __restrict__ g = dy + j * C;
    const uint8_t* __restrict__ k = idx + j * C;
    float* __restrict__ q0 = d0 + 2 * j * C;
    float* __restrict__ q1 = q0 + C;
    float* __restrict__ q2 = d1 + 2 * j * C;
    float* __restrict__ q3 = q2 + C;
    // bit masks, not selects of floats: below AVX-512, GCC turns those into four masked stores per element
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const uint32_t v = bits_of(g[c]);
      const uint32_t w = k[c];
      q0[c] = float_of(v & (0u - static_cast<uint32_t>(w == 0)));
      q1[c] = float_of(v & (0u - static_cast<uint32_t>(w == 1)));
      q2[c] = float_of(v & (0u - static_cast<uint32_t>(w == 2)));
      q3[c] = float_of(v & (0u - static_cast<uint32_t>(w == 3)));
    }
  }
}

static const KernelTable kTable = {
    DSD2_ISA_NAME, sgd_f32, count_cols_f32, count_cols_u16, relu_rows_f32, relu_rows_u16, kd_row, kd_row_f64,
    kd_block, mask_f32, mask_u16, pruned_zero_f32, pruned_zero_u16, mask_to_bf16, mask_from_bf16, sparse_row_f32,
    sparse_dots_f32, sparse_row_post_f32, maxpool2_f32, bn_sums_rows_f32, bn_sums_plane_f32, bn_affine_rows_f32,
    bn_affine_plane_f32, maxpool2_train_rows_f32, maxpool2_grad_rows_f32,
};
