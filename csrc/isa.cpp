// Which level of dsd2's CPU kernels runs: the best this CPU supports, or the one DSD2_CPU_ISA / set_cpu_isa names.
#include "isa.h"

#include <atomic>
#include <stdexcept>

namespace dsd2 {
namespace {

const KernelTable* table_for(const std::string& level) {
  if (level == "default") return kernels_default();
  if (level == "avx2") return kernels_avx2();
  if (level == "avx512") return kernels_avx512();
  return nullptr;
}

bool cpu_runs(const std::string& level) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (level == "avx2") return avx2;
  if (level == "avx512")
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return level == "default";
}

const KernelTable* best() {
  const auto levels = cpu_isa_levels();
  return table_for(levels.back());
}

std::atomic<const KernelTable*> g_active{nullptr};

}  // namespace

std::vector<std::string> cpu_isa_levels() {
  std::vector<std::string> out;
  for (const char* level : {"default", "avx2", "avx512"})
    if (table_for(level) != nullptr && cpu_runs(level)) out.emplace_back(level);
  return out;
}

const KernelTable& active_kernels() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = best();
    g_active.store(t, std::memory_order_release);
  }
  return *t;
}

std::string cpu_isa() { return active_kernels().name; }

void set_cpu_isa(const std::string& level) {
  std::string allowed;
  for (const auto& l : cpu_isa_levels()) allowed += (allowed.empty() ? "" : ", ") + l;
  const KernelTable* t = table_for(level);
  if (t == nullptr)
    throw std::invalid_argument("CPU ISA level '" + level + "' is not known; this CPU runs: " + allowed);
  if (!cpu_runs(level))
    throw std::invalid_argument("CPU ISA level '" + level + "' is not supported by this CPU; it runs: " + allowed);
  g_active.store(t, std::memory_order_release);
}

}  // namespace dsd2
