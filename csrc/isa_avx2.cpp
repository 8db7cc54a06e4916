// dsd2's CPU kernels for x86-64 with AVX2 and FMA (Haswell, Zen and later). `#pragma GCC target` applies to what
// follows it only: the headers above stay at the baseline level, so no shared inline code is built for AVX2.
#include <cmath>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>  // the vector types of sparse_row_f32 / sparse_dots_f32 (kernels_impl.h)
#endif

#include "isa.h"

namespace dsd2 {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // GCC: per-function target pragmas
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#define DSD2_ISA_NAME "avx2"
#define DSD2_VEC_BITS 256
#define DSD2_HAS_FMA 1
#include "kernels_impl.h"
}  // namespace isa_avx2
#pragma GCC pop_options

const KernelTable* kernels_avx2() { return &isa_avx2::kTable; }
#else
const KernelTable* kernels_avx2() { return nullptr; }
#endif
}  // namespace dsd2
