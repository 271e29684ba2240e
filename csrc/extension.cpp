// Python module init of qrkd._C and of the per-instruction-set CPU kernel modules of a portable wheel
// (qrkd._cpu_x86_64, _cpu_x86_64_v3, _cpu_x86_64_v4: csrc/cpu compiled once per -march level, beside a qrkd._C that
// then holds no CPU kernels). The ops themselves are registered by the relation files (csrc/ops.cpp for the schemas,
// csrc/cpu/*.cpp and csrc/cuda/* for the implementations) into torch.ops.qrkd when the library is loaded.
#include <torch/extension.h>

#include <string>
#include <vector>

// The instruction set the CPU kernels of this module were compiled for ("native", "portable", "x86_64_v3", ...), or
// "none" when this module holds no CPU kernels (setup.py / qrkd/_build.py define it).
#ifndef QRKD_CPU_KERNELS
#define QRKD_CPU_KERNELS native
#endif
#define QRKD_STRINGIFY(x) #x
#define QRKD_STRING(x) QRKD_STRINGIFY(x)

namespace {

// The x86-64 micro-architecture levels this CPU runs (the names of the CPU kernel modules), lowest first.
std::vector<std::string> supported_cpu_levels() {
  std::vector<std::string> levels;
#if defined(__x86_64__)
  __builtin_cpu_init();
  levels.push_back("x86_64");
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  const bool v3 = __builtin_cpu_supports("x86-64-v3"), v4 = __builtin_cpu_supports("x86-64-v4");
#else  // the features that -march=x86-64-v3 / v4 add and a compiler uses in arithmetic loops
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
                  __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c") &&
                  __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("sse4.2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
#endif
  if (v3) levels.push_back("x86_64_v3");
  if (v4) levels.push_back("x86_64_v4");
#endif
  return levels;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qrkd compiled kernels (ops live under torch.ops.qrkd)";
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.attr("CPU_KERNELS") = QRKD_STRING(QRKD_CPU_KERNELS);
  m.def("supported_cpu_levels", &supported_cpu_levels,
        "the x86-64 levels (x86_64, x86_64_v3, x86_64_v4) this CPU runs, lowest first; empty off x86-64");
}
