// Photon-count dispatch shared by the CPU and CUDA photonic ops: the kernels take n (1..12) as a template parameter
// so that their per-pair arrays have fixed sizes.
#pragma once

#include <c10/util/Exception.h>

#define QRKD_PHOTONIC_DISPATCH(NROWS, FN, ...)                                            \
  switch (NROWS) {                                                                         \
    case 1: FN<1>(__VA_ARGS__); break;                                                     \
    case 2: FN<2>(__VA_ARGS__); break;                                                     \
    case 3: FN<3>(__VA_ARGS__); break;                                                     \
    case 4: FN<4>(__VA_ARGS__); break;                                                     \
    case 5: FN<5>(__VA_ARGS__); break;                                                     \
    case 6: FN<6>(__VA_ARGS__); break;                                                     \
    case 7: FN<7>(__VA_ARGS__); break;                                                     \
    case 8: FN<8>(__VA_ARGS__); break;                                                     \
    case 9: FN<9>(__VA_ARGS__); break;                                                     \
    case 10: FN<10>(__VA_ARGS__); break;                                                   \
    case 11: FN<11>(__VA_ARGS__); break;                                                   \
    case 12: FN<12>(__VA_ARGS__); break;                                                   \
    default: TORCH_CHECK(false, "photonic_fidelity: unsupported photon count ", NROWS); \
  }
