// Photonic fidelity kernel on CUDA devices (DESIGN.md 3.5; the CPU op is csrc/cpu/photonic.cpp): one thread per pair
// (i, j). Each thread forms A = P_i Q_j^H (n x n) and walks Ryser's formula in Gray-code order (one column added or
// removed per step), in double whatever the input dtype:
//   Perm(A) = (-1)^n sum_{S subset of columns} (-1)^{|S|} prod_a r_a(S),   r_a(S) = sum_{b in S} A_ab,
// and for the backward its cofactors C_ab = (-1)^n sum_{S containing b} (-1)^{|S|} prod_{a' != a} r_a'(S) (prefix and
// suffix products). The backward kernel writes the per-pair weights Y[i,a,j,b] = 2 G_ij Perm(A) conj(C_ab) for a chunk
// of rows, which two matmuls (cuBLAS) contract: dL/dP = Y Q, dL/dQ = Y^H P.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "photonic.h"

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace qrkd_photonic_cuda {

constexpr int kThreads = 128;

// A[a][b] = sum_k p[a,k] conj(q[b,k]); p and q point at interleaved (re, im) n x m matrices.
template <int NR>
__device__ __forceinline__ void pair_matrix(const double* __restrict__ p, const double* __restrict__ q, int64_t m,
                                            double (&ar)[NR][NR], double (&ai)[NR][NR]) {
#pragma unroll
  for (int a = 0; a < NR; ++a)
#pragma unroll
    for (int b = 0; b < NR; ++b) {
      double sr = 0.0, si = 0.0;
      for (int64_t k = 0; k < m; ++k) {
        const double pr = p[2 * (a * m + k)], pi = p[2 * (a * m + k) + 1];
        const double qr = q[2 * (b * m + k)], qi = q[2 * (b * m + k) + 1];
        sr += pr * qr + pi * qi;
        si += pi * qr - pr * qi;
      }
      ar[a][b] = sr;
      ai[a][b] = si;
    }
}

template <int NR>
__device__ __forceinline__ void ryser_permanent(const double (&ar)[NR][NR], const double (&ai)[NR][NR], double& pr,
                                                double& pi) {
  double rr[NR], ri[NR];
#pragma unroll
  for (int a = 0; a < NR; ++a) rr[a] = ri[a] = 0.0;
  double sr = 0.0, si = 0.0;
  for (uint32_t step = 1; step < (1u << NR); ++step) {
    const int col = __ffs(step) - 1;
    const uint32_t gray = step ^ (step >> 1);
    const double dir = ((gray >> col) & 1u) ? 1.0 : -1.0;
    double xr = 1.0, xi = 0.0;
#pragma unroll
    for (int a = 0; a < NR; ++a) {
      rr[a] += dir * ar[a][col];
      ri[a] += dir * ai[a][col];
      const double tr = xr * rr[a] - xi * ri[a];
      xi = xr * ri[a] + xi * rr[a];
      xr = tr;
    }
    const double sign = (__popc(gray) & 1) ? -1.0 : 1.0;
    sr += sign * xr;
    si += sign * xi;
  }
  const double overall = (NR & 1) ? -1.0 : 1.0;
  pr = overall * sr;
  pi = overall * si;
}

template <int NR>
__device__ __forceinline__ void ryser_cofactors(const double (&ar)[NR][NR], const double (&ai)[NR][NR],
                                                double (&cr)[NR][NR], double (&ci)[NR][NR]) {
  double rr[NR], ri[NR];
#pragma unroll
  for (int a = 0; a < NR; ++a) {
    rr[a] = ri[a] = 0.0;
#pragma unroll
    for (int b = 0; b < NR; ++b) cr[a][b] = ci[a][b] = 0.0;
  }
  for (uint32_t step = 1; step < (1u << NR); ++step) {
    const int col = __ffs(step) - 1;
    const uint32_t gray = step ^ (step >> 1);
    const double dir = ((gray >> col) & 1u) ? 1.0 : -1.0;
#pragma unroll
    for (int a = 0; a < NR; ++a) {
      rr[a] += dir * ar[a][col];
      ri[a] += dir * ai[a][col];
    }
    const double sign = (__popc(gray) & 1) ? -1.0 : 1.0;
    double sfr[NR + 1], sfi[NR + 1];  // suffix products prod_{a' >= a} r_a', times the subset's sign
    sfr[NR] = sign;
    sfi[NR] = 0.0;
#pragma unroll
    for (int a = NR - 1; a >= 1; --a) {
      sfr[a] = sfr[a + 1] * rr[a] - sfi[a + 1] * ri[a];
      sfi[a] = sfr[a + 1] * ri[a] + sfi[a + 1] * rr[a];
    }
    double pfr = 1.0, pfi = 0.0;  // prefix product prod_{a' < a} r_a'
#pragma unroll
    for (int a = 0; a < NR; ++a) {
      const double er = pfr * sfr[a + 1] - pfi * sfi[a + 1];
      const double ei = pfr * sfi[a + 1] + pfi * sfr[a + 1];
#pragma unroll
      for (int b = 0; b < NR; ++b) {
        if ((gray >> b) & 1u) {
          cr[a][b] += er;
          ci[a][b] += ei;
        }
      }
      const double tr = pfr * rr[a] - pfi * ri[a];
      pfi = pfr * ri[a] + pfi * rr[a];
      pfr = tr;
    }
  }
  if (NR & 1) {
#pragma unroll
    for (int a = 0; a < NR; ++a)
#pragma unroll
      for (int b = 0; b < NR; ++b) {
        cr[a][b] = -cr[a][b];
        ci[a][b] = -ci[a][b];
      }
  }
}

template <int NR>
__global__ void forward_kernel(const double* __restrict__ P, const double* __restrict__ Q, int64_t N, int64_t M,
                               int64_t m, bool symmetric, double* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= N * M) return;
  const int64_t i = t / M, j = t % M;
  if (symmetric && j < i) return;
  double ar[NR][NR], ai[NR][NR];
  pair_matrix<NR>(P + 2 * i * NR * m, Q + 2 * j * NR * m, m, ar, ai);
  double pr, pi;
  ryser_permanent<NR>(ar, ai, pr, pi);
  const double k = pr * pr + pi * pi;
  out[i * M + j] = k;
  if (symmetric) out[j * M + i] = k;
}

// y: interleaved complex rows x n x M x n, for the rows P[0..rows) (P points at the chunk's first row, G likewise).
template <int NR>
__global__ void pair_grad_kernel(const double* __restrict__ P, const double* __restrict__ Q,
                                 const double* __restrict__ G, int64_t rows, int64_t M, int64_t m,
                                 double* __restrict__ y) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= rows * M) return;
  const int64_t i = t / M, j = t % M;
  double ar[NR][NR], ai[NR][NR], cr[NR][NR], ci[NR][NR];
  pair_matrix<NR>(P + 2 * i * NR * m, Q + 2 * j * NR * m, m, ar, ai);
  ryser_cofactors<NR>(ar, ai, cr, ci);
  double sr = 0.0, si = 0.0;  // Perm(A) by cofactor expansion along the first row
#pragma unroll
  for (int b = 0; b < NR; ++b) {
    sr += ar[0][b] * cr[0][b] - ai[0][b] * ci[0][b];
    si += ar[0][b] * ci[0][b] + ai[0][b] * cr[0][b];
  }
  const double g = 2.0 * G[i * M + j];
  const double wr = g * sr, wi = g * si;
#pragma unroll
  for (int a = 0; a < NR; ++a)
#pragma unroll
    for (int b = 0; b < NR; ++b) {
      const int64_t idx = ((i * NR + a) * M + j) * NR + b;
      y[2 * idx] = wr * cr[a][b] + wi * ci[a][b];
      y[2 * idx + 1] = wi * cr[a][b] - wr * ci[a][b];
    }
}

static void check_devices(const at::Tensor& P, const at::Tensor& Q, const char* op) {
  TORCH_CHECK(P.is_cuda() && Q.is_cuda() && P.device() == Q.device(), op, ": P and Q must be on one CUDA device");
}

static unsigned int grid_for(int64_t pairs) {
  const int64_t blocks = (pairs + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= 0x7fffffff, "photonic_fidelity: too many pairs for one launch");
  return static_cast<unsigned int>(blocks);
}

template <int NR>
static void launch_forward(const double* p, const double* q, int64_t N, int64_t M, int64_t m, bool symmetric,
                           double* out, cudaStream_t stream) {
  forward_kernel<NR><<<grid_for(N * M), kThreads, 0, stream>>>(p, q, N, M, m, symmetric, out);
}

template <int NR>
static void launch_pair_grad(const double* p, const double* q, const double* g, int64_t rows, int64_t M, int64_t m,
                             double* y, cudaStream_t stream) {
  pair_grad_kernel<NR><<<grid_for(rows * M), kThreads, 0, stream>>>(p, q, g, rows, M, m, y);
}

at::Tensor photonic_fidelity_cuda(const at::Tensor& P, const at::Tensor& Q, bool symmetric) {
  qrkd::check_photonic_matrices(P, Q, symmetric, "photonic_fidelity");
  check_devices(P, Q, "photonic_fidelity");
  const c10::cuda::CUDAGuard guard(P.device());
  const int64_t N = P.size(0), M = Q.size(0), n = P.size(1), m = P.size(2);
  const auto real_dtype = c10::toRealValueType(P.scalar_type());
  const at::Tensor p = at::view_as_real(P.to(at::kComplexDouble).contiguous()).contiguous();
  const at::Tensor q = at::view_as_real(Q.to(at::kComplexDouble).contiguous()).contiguous();
  at::Tensor out = at::empty({N, M}, P.options().dtype(at::kDouble));
  if (N > 0 && M > 0) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    QRKD_PHOTONIC_DISPATCH(n, launch_forward, p.data_ptr<double>(), q.data_ptr<double>(), N, M, m, symmetric,
                                out.data_ptr<double>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out.to(real_dtype);
}

// symmetric (Q is P): the weights G + G^T over all ordered pairs give both roles of P at once, dL/dP = Y P.
std::tuple<at::Tensor, at::Tensor> photonic_fidelity_backward_cuda(const at::Tensor& grad, const at::Tensor& P,
                                                                    const at::Tensor& Q, bool symmetric) {
  qrkd::check_photonic_matrices(P, Q, symmetric, "photonic_fidelity_backward");
  check_devices(P, Q, "photonic_fidelity_backward");
  const c10::cuda::CUDAGuard guard(P.device());
  const int64_t N = P.size(0), M = Q.size(0), n = P.size(1), m = P.size(2);
  qrkd::check_photonic_grad(grad, P, Q);
  const at::Tensor p = P.to(at::kComplexDouble).contiguous();
  const at::Tensor q = Q.to(at::kComplexDouble).contiguous();
  at::Tensor g = grad.to(P.device(), at::kDouble);
  g = (symmetric ? g + g.t() : g).contiguous();
  const at::Tensor p_real = at::view_as_real(p);
  const at::Tensor q_real = at::view_as_real(q);
  at::Tensor grad_p = at::empty({N, n, m}, p.options());
  at::Tensor grad_q = at::zeros({symmetric ? 0 : M, n, m}, p.options());
  if (N > 0 && M > 0) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const at::Tensor q_flat = q.view({M * n, m});
    // rows per chunk: keep Y (rows x n x M x n complex double) near 1 GiB
    const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 26) / std::max<int64_t>(1, M * n * n));
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
      const int64_t rows = std::min(chunk, N - r0);
      at::Tensor y = at::empty({rows * n, M * n}, p.options());
      QRKD_PHOTONIC_DISPATCH(n, launch_pair_grad, p_real.data_ptr<double>() + 2 * r0 * n * m,
                                  q_real.data_ptr<double>(), g.data_ptr<double>() + r0 * M, rows, M, m,
                                  reinterpret_cast<double*>(y.data_ptr<c10::complex<double>>()), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_p.narrow(0, r0, rows).view({rows * n, m}).copy_(at::matmul(y, q_flat));
      if (!symmetric) grad_q.view({M * n, m}).add_(at::matmul(y.conj().t(), p.narrow(0, r0, rows).view({rows * n, m})));
    }
  }
  return {grad_p.to(P.scalar_type()), grad_q.to(Q.scalar_type())};
}

}  // namespace qrkd_photonic_cuda

TORCH_LIBRARY_IMPL(qrkd, CUDA, m) {
  m.impl("photonic_fidelity", &qrkd_photonic_cuda::photonic_fidelity_cuda);
  m.impl("photonic_fidelity_backward", &qrkd_photonic_cuda::photonic_fidelity_backward_cuda);
}
