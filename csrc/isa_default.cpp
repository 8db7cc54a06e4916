// dsd2's CPU kernels at the baseline level of the architecture (x86-64 SSE2, aarch64 NEON): runs on any CPU.
#include <cmath>
#include <cstdint>

#include "isa.h"

namespace dsd2 {
namespace isa_default {
#define DSD2_ISA_NAME "default"
#define DSD2_VEC_BITS 0
#define DSD2_HAS_FMA 0
#include "kernels_impl.h"
}  // namespace isa_default

const KernelTable* kernels_default() { return &isa_default::kTable; }
}  // namespace dsd2
