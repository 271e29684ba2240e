// What the CPU and CUDA photonic ops share: the photon limit, the input checks and the photon-count dispatch.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace qrkd {

// Photons per state (rows n of the per-sample matrices); Python's is qrkd.functional.PHOTONIC_MAX_PHOTONS.
constexpr int kMaxPhotons = 12;

// P (N x n x m) and Q (M x n x m), complex, agreeing in (n, m), with 1 <= n <= kMaxPhotons; the device is checked by
// the caller.
inline void check_photonic_matrices(const at::Tensor& P, const at::Tensor& Q, bool symmetric, const char* op) {
  TORCH_CHECK(P.dim() == 3 && Q.dim() == 3, op, ": P and Q must be 3-D (batch, photons, modes)");
  TORCH_CHECK(P.size(1) == Q.size(1) && P.size(2) == Q.size(2), op, ": P and Q must agree in their last two sizes");
  TORCH_CHECK(P.is_complex() && Q.is_complex(), op, ": P and Q must be complex");
  TORCH_CHECK(P.scalar_type() == Q.scalar_type(), op, ": P and Q must have one dtype");
  TORCH_CHECK(P.size(1) >= 1 && P.size(1) <= kMaxPhotons, op, ": the photon count must be in 1..", kMaxPhotons,
              ", got ", P.size(1));
  TORCH_CHECK(!symmetric || P.size(0) == Q.size(0), op, ": symmetric needs Q of P's size");
}

inline void check_photonic_grad(const at::Tensor& grad, const at::Tensor& P, const at::Tensor& Q) {
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == P.size(0) && grad.size(1) == Q.size(0),
              "photonic_fidelity_backward: grad must be N x M");
}

}  // namespace qrkd

// The kernels take n (1..kMaxPhotons) as a template parameter so that their per-pair arrays have fixed sizes.
#define QRKD_PHOTONIC_DISPATCH(NROWS, FN, ...)                                           \
  switch (NROWS) {                                                                        \
    case 1: FN<1>(__VA_ARGS__); break;                                                    \
    case 2: FN<2>(__VA_ARGS__); break;                                                    \
    case 3: FN<3>(__VA_ARGS__); break;                                                    \
    case 4: FN<4>(__VA_ARGS__); break;                                                    \
    case 5: FN<5>(__VA_ARGS__); break;                                                    \
    case 6: FN<6>(__VA_ARGS__); break;                                                    \
    case 7: FN<7>(__VA_ARGS__); break;                                                    \
    case 8: FN<8>(__VA_ARGS__); break;                                                    \
    case 9: FN<9>(__VA_ARGS__); break;                                                    \
    case 10: FN<10>(__VA_ARGS__); break;                                                  \
    case 11: FN<11>(__VA_ARGS__); break;                                                  \
    case 12: FN<12>(__VA_ARGS__); break;                                                  \
    default: TORCH_CHECK(false, "photonic_fidelity: unsupported photon count ", NROWS); \
  }
static_assert(qrkd::kMaxPhotons == 12, "QRKD_PHOTONIC_DISPATCH lists the photon counts 1..kMaxPhotons");
