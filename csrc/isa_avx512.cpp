// dsd2's CPU kernels for x86-64 with AVX-512 (F, BW, VL, DQ; Skylake-SP, Zen 4 and later), 512-bit vectors.
#include <cmath>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>  // the vector types of sparse_row_f32 / sparse_dots_f32 (kernels_impl.h)
#endif

#include "isa.h"

namespace dsd2 {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // GCC: per-function target pragmas
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
namespace isa_avx512 {
#define DSD2_ISA_NAME "avx512"
#define DSD2_VEC_BITS 512
#define DSD2_HAS_FMA 1
#include "kernels_impl.h"
}  // namespace isa_avx512
#pragma GCC pop_options

const KernelTable* kernels_avx512() { return &isa_avx512::kTable; }
#else
const KernelTable* kernels_avx512() { return nullptr; }
#endif
}  // namespace dsd2
