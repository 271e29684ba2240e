// Photonic fidelity kernel on the CPU (DESIGN.md 3.5): K_ij = |Perm(P_i Q_j^H)|^2 for per-sample n x m complex
// matrices P (N x n x m) and Q (M x n x m), and its backward (the gradients in P and Q).
//
// Ryser's formula, subsets visited in Gray-code order (one column added or removed per step):
//   Perm(A) = (-1)^n sum_{S subset of columns} (-1)^{|S|} prod_a r_a(S),   r_a(S) = sum_{b in S} A_ab.
// Its cofactors (the derivative of Perm(A) in A_ab) come out of the same walk:
//   C_ab = (-1)^n sum_{S containing b} (-1)^{|S|} prod_{a' != a} r_a'(S)   (prefix / suffix products, no division).
//
// Arithmetic is in double whatever the input dtype (the Gray-code walk accumulates rounding over 2^n steps). Eight
// pairs (i, j..j+7) are processed together in structure-of-arrays form so that every inner loop runs over the eight
// lanes and vectorises; the photon count n is a template parameter (1..12) so the n-loops unroll. Both walks poll for
// Ctrl-C before each row of a tile (interrupt.h).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "interrupt.h"
#include "photonic.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace qrkd_photonic {

constexpr int kLanes = 8;
// cache tiles: a task is kTileRows rows of P, walked against kTileBlocks lane blocks of Q at a time (~200 KB of Q at
// n = 5, m = 10), so that a large Q is read from L2 once per tile rather than once per row
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileBlocks = 32;

// Threads for a job of `units` multiply-adds: one per ~2M (about half a millisecond), so that a tiny kernel matrix
// stays on one thread (a thread's start-up and a preempted thread on a busy machine cost more than it saves) while the
// seed's 128 x 128 (about 3.4M) already uses two.
static int threads_for(double units) {
#ifdef _OPENMP
  const double want = units / double(1 << 21);
  return static_cast<int>(std::max(1.0, std::min<double>(omp_get_max_threads(), want)));
#else
  (void)units;
  return 1;
#endif
}

static inline bool thread_zero() {
#ifdef _OPENMP
  return omp_get_thread_num() == 0;
#else
  return true;
#endif
}

// Q (rows x n x m, complex double) -> lane blocks [block][b][k][lane], real and imaginary parts apart; zero padding.
static void pack_lanes(const c10::complex<double>* x, int64_t rows, int64_t n, int64_t m, std::vector<double>& re,
                       std::vector<double>& im) {
  const int64_t blocks = (rows + kLanes - 1) / kLanes;
  re.assign(static_cast<size_t>(blocks * n * m * kLanes), 0.0);
  im.assign(re.size(), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t blk = r / kLanes, lane = r % kLanes;
    for (int64_t b = 0; b < n; ++b)
      for (int64_t k = 0; k < m; ++k) {
        const auto v = x[(r * n + b) * m + k];
        const int64_t idx = ((blk * n + b) * m + k) * kLanes + lane;
        re[idx] = v.real();
        im[idx] = v.imag();
      }
  }
}

// A[a][b][l] = sum_k P[a,k] conj(Q_l[b,k]) for the eight pairs of one lane block.
template <int NR>
static inline void pair_products(const c10::complex<double>* p, const double* qre, const double* qim, int64_t m,
                                 double (&ar)[NR][NR][kLanes], double (&ai)[NR][NR][kLanes]) {
  for (int a = 0; a < NR; ++a)
    for (int b = 0; b < NR; ++b) {
      double sr[kLanes] = {0}, si[kLanes] = {0};
      const double* qr = qre + b * m * kLanes;
      const double* qi = qim + b * m * kLanes;
      for (int64_t k = 0; k < m; ++k) {
        const double pr = p[a * m + k].real(), pi = p[a * m + k].imag();
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          const double xr = qr[k * kLanes + l], xi = qi[k * kLanes + l];
          sr[l] += pr * xr + pi * xi;
          si[l] += pi * xr - pr * xi;
        }
      }
      for (int l = 0; l < kLanes; ++l) {
        ar[a][b][l] = sr[l];
        ai[a][b][l] = si[l];
      }
    }
}

template <int NR>
static inline void ryser_permanent(const double (&ar)[NR][NR][kLanes], const double (&ai)[NR][NR][kLanes],
                                   double (&pr)[kLanes], double (&pi)[kLanes]) {
  double rr[NR][kLanes] = {}, ri[NR][kLanes] = {};
  double sr[kLanes] = {0}, si[kLanes] = {0};
  for (uint32_t step = 1; step < (1u << NR); ++step) {
    const int col = __builtin_ctz(step);
    const uint32_t gray = step ^ (step >> 1);
    const double dir = ((gray >> col) & 1u) ? 1.0 : -1.0;
    for (int a = 0; a < NR; ++a)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        rr[a][l] += dir * ar[a][col][l];
        ri[a][l] += dir * ai[a][col][l];
      }
    double xr[kLanes], xi[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      xr[l] = rr[0][l];
      xi[l] = ri[0][l];
    }
    for (int a = 1; a < NR; ++a)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const double tr = xr[l] * rr[a][l] - xi[l] * ri[a][l];
        xi[l] = xr[l] * ri[a][l] + xi[l] * rr[a][l];
        xr[l] = tr;
      }
    const double sign = (__builtin_popcount(gray) & 1) ? -1.0 : 1.0;
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      sr[l] += sign * xr[l];
      si[l] += sign * xi[l];
    }
  }
  const double overall = (NR & 1) ? -1.0 : 1.0;
  for (int l = 0; l < kLanes; ++l) {
    pr[l] = overall * sr[l];
    pi[l] = overall * si[l];
  }
}

// C[a][b][l] = d Perm(A_l) / d A_l[a][b].
template <int NR>
static inline void ryser_cofactors(const double (&ar)[NR][NR][kLanes], const double (&ai)[NR][NR][kLanes],
                                   double (&cr)[NR][NR][kLanes], double (&ci)[NR][NR][kLanes]) {
  double rr[NR][kLanes] = {}, ri[NR][kLanes] = {};
  for (int a = 0; a < NR; ++a)
    for (int b = 0; b < NR; ++b)
      for (int l = 0; l < kLanes; ++l) cr[a][b][l] = ci[a][b][l] = 0.0;
  for (uint32_t step = 1; step < (1u << NR); ++step) {
    const int col = __builtin_ctz(step);
    const uint32_t gray = step ^ (step >> 1);
    const double dir = ((gray >> col) & 1u) ? 1.0 : -1.0;
    for (int a = 0; a < NR; ++a)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        rr[a][l] += dir * ar[a][col][l];
        ri[a][l] += dir * ai[a][col][l];
      }
    const double sign = (__builtin_popcount(gray) & 1) ? -1.0 : 1.0;
    // suffix products: sfr[a] = prod_{a' >= a} r_a'
    double sfr[NR + 1][kLanes], sfi[NR + 1][kLanes];
    for (int l = 0; l < kLanes; ++l) {
      sfr[NR][l] = sign;
      sfi[NR][l] = 0.0;
    }
    for (int a = NR - 1; a >= 1; --a)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        sfr[a][l] = sfr[a + 1][l] * rr[a][l] - sfi[a + 1][l] * ri[a][l];
        sfi[a][l] = sfr[a + 1][l] * ri[a][l] + sfi[a + 1][l] * rr[a][l];
      }
    double pfr[kLanes], pfi[kLanes];  // prefix product prod_{a' < a} r_a'
    for (int l = 0; l < kLanes; ++l) {
      pfr[l] = 1.0;
      pfi[l] = 0.0;
    }
    for (int a = 0; a < NR; ++a) {
      double er[kLanes], ei[kLanes];
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        er[l] = pfr[l] * sfr[a + 1][l] - pfi[l] * sfi[a + 1][l];
        ei[l] = pfr[l] * sfi[a + 1][l] + pfi[l] * sfr[a + 1][l];
      }
      for (int b = 0; b < NR; ++b) {
        if (!((gray >> b) & 1u)) continue;
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          cr[a][b][l] += er[l];
          ci[a][b][l] += ei[l];
        }
      }
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const double tr = pfr[l] * rr[a][l] - pfi[l] * ri[a][l];
        pfi[l] = pfr[l] * ri[a][l] + pfi[l] * rr[a][l];
        pfr[l] = tr;
      }
    }
  }
  if (NR & 1)
    for (int a = 0; a < NR; ++a)
      for (int b = 0; b < NR; ++b)
        for (int l = 0; l < kLanes; ++l) {
          cr[a][b][l] = -cr[a][b][l];
          ci[a][b][l] = -ci[a][b][l];
        }
}

// K (N x M, double). symmetric: Q is P and only the blocks on or above the diagonal are computed (the caller mirrors).
template <int NR>
static void forward_impl(const c10::complex<double>* p, const std::vector<double>& qre, const std::vector<double>& qim,
                         int64_t N, int64_t M, int64_t m, bool symmetric, double* out, qrkd::Interrupt& interrupt) {
  const int64_t blocks = (M + kLanes - 1) / kLanes;
  const int64_t stride = NR * m * kLanes;
  const double pairs = double(N) * double(blocks * kLanes) * (symmetric ? 0.5 : 1.0);
  const int threads = threads_for(pairs * (NR * NR * m + (1 << NR) * NR));
  const int64_t row_tiles = (N + kTileRows - 1) / kTileRows;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t tile = 0; tile < row_tiles; ++tile) {
    double ar[NR][NR][kLanes], ai[NR][NR][kLanes], pr[kLanes], pi[kLanes];
    const int64_t i0 = tile * kTileRows, i1 = std::min(N, i0 + kTileRows);
    for (int64_t b0 = symmetric ? i0 / kLanes : 0; b0 < blocks; b0 += kTileBlocks) {
      const int64_t b1 = std::min(blocks, b0 + kTileBlocks);
      for (int64_t i = i0; i < i1; ++i) {
        if (interrupt.check(thread_zero())) break;
        const c10::complex<double>* pi_row = p + i * NR * m;
        for (int64_t blk = symmetric ? std::max(b0, i / kLanes) : b0; blk < b1; ++blk) {
          pair_products<NR>(pi_row, qre.data() + blk * stride, qim.data() + blk * stride, m, ar, ai);
          ryser_permanent<NR>(ar, ai, pr, pi);
          for (int l = 0; l < kLanes; ++l) {
            const int64_t j = blk * kLanes + l;
            if (j >= M || (symmetric && j < i)) continue;
            out[i * M + j] = pr[l] * pr[l] + pi[l] * pi[l];
          }
        }
      }
    }
  }
}

// Backward, fused: for a real loss L = sum_ij G_ij K_ij and torch's convention for complex gradients
// (dL/dz = dL/dRe z + i dL/dIm z), with A = P_i Q_j^H and Y = 2 G_ij Perm(A) conj(C):
//   dL/dP_i += Y Q_j            (the "P role" of the pair)
//   dL/dQ_j += Y^H P_i          (the "Q role")
// Tiles of rows are spread over threads; the P role accumulates in lanes and is written by the rows' owner, the Q role
// to a per-thread buffer (lane-block layout) summed at the end. symmetric: Q is P and G is already G + G^T; only
// pairs j >= i are visited, the diagonal pair has the P role only, and both roles land in dL/dP.
template <int NR>
static void backward_impl(const c10::complex<double>* p, const std::vector<double>& qre,
                          const std::vector<double>& qim, const double* g, int64_t N, int64_t M, int64_t m,
                          bool symmetric, c10::complex<double>* grad_p, std::vector<double>& gq_re,
                          std::vector<double>& gq_im, qrkd::Interrupt& interrupt) {
  const int64_t blocks = (M + kLanes - 1) / kLanes;
  const int64_t stride = NR * m * kLanes;
  gq_re.assign(static_cast<size_t>(blocks * stride), 0.0);
  gq_im.assign(gq_re.size(), 0.0);
  const double pairs = double(N) * double(blocks * kLanes) * (symmetric ? 0.5 : 1.0);
  const int threads = threads_for(pairs * (3 * NR * NR * m + (1 << NR) * NR * (NR + 3)));
#pragma omp parallel num_threads(threads)
  {
    std::vector<double> tq_re(gq_re.size(), 0.0), tq_im(gq_re.size(), 0.0);
    const int64_t row_acc = NR * m * kLanes;  // one row's P-role accumulator, [a][k][lane]
    std::vector<double> acc_re(static_cast<size_t>(kTileRows * row_acc)), acc_im(acc_re.size());
    const int64_t row_tiles = (N + kTileRows - 1) / kTileRows;
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < row_tiles; ++tile) {
      double ar[NR][NR][kLanes], ai[NR][NR][kLanes], cr[NR][NR][kLanes], ci[NR][NR][kLanes];
      const int64_t i0 = tile * kTileRows, i1 = std::min(N, i0 + kTileRows);
      std::fill(acc_re.begin(), acc_re.end(), 0.0);
      std::fill(acc_im.begin(), acc_im.end(), 0.0);
      for (int64_t b0 = symmetric ? i0 / kLanes : 0; b0 < blocks; b0 += kTileBlocks) {
        const int64_t b1 = std::min(blocks, b0 + kTileBlocks);
        for (int64_t i = i0; i < i1; ++i) {
          if (interrupt.check(thread_zero())) break;
          const c10::complex<double>* pi_row = p + i * NR * m;
          double* acc_r = acc_re.data() + (i - i0) * row_acc;
          double* acc_i = acc_im.data() + (i - i0) * row_acc;
          for (int64_t blk = symmetric ? std::max(b0, i / kLanes) : b0; blk < b1; ++blk) {
            const double* qr = qre.data() + blk * stride;
            const double* qi = qim.data() + blk * stride;
            pair_products<NR>(pi_row, qr, qi, m, ar, ai);
            ryser_cofactors<NR>(ar, ai, cr, ci);
            double wr[kLanes], wi[kLanes], qmask[kLanes];
            for (int l = 0; l < kLanes; ++l) {
              double sr = 0.0, si = 0.0;  // Perm(A) by cofactor expansion along the first row
              for (int b = 0; b < NR; ++b) {
                sr += ar[0][b][l] * cr[0][b][l] - ai[0][b][l] * ci[0][b][l];
                si += ar[0][b][l] * ci[0][b][l] + ai[0][b][l] * cr[0][b][l];
              }
              const int64_t j = blk * kLanes + l;
              const bool valid = j < M && !(symmetric && j < i);
              const double gij = valid ? 2.0 * g[i * M + j] : 0.0;
              wr[l] = gij * sr;
              wi[l] = gij * si;
              qmask[l] = (valid && !(symmetric && j == i)) ? 1.0 : 0.0;
            }
            // Y[a][b] = w conj(C[a][b]), overwriting C
            for (int a = 0; a < NR; ++a)
              for (int b = 0; b < NR; ++b)
#pragma omp simd
                for (int l = 0; l < kLanes; ++l) {
                  const double yr = wr[l] * cr[a][b][l] + wi[l] * ci[a][b][l];
                  const double yi = wi[l] * cr[a][b][l] - wr[l] * ci[a][b][l];
                  cr[a][b][l] = yr;
                  ci[a][b][l] = yi;
                }
            // P role: acc[a][k] += sum_b Y[a][b] Q_j[b][k]
            for (int a = 0; a < NR; ++a)
              for (int64_t k = 0; k < m; ++k) {
                double* xr = acc_r + (a * m + k) * kLanes;
                double* xi = acc_i + (a * m + k) * kLanes;
                for (int b = 0; b < NR; ++b) {
                  const double* vr = qr + (b * m + k) * kLanes;
                  const double* vi = qi + (b * m + k) * kLanes;
#pragma omp simd
                  for (int l = 0; l < kLanes; ++l) {
                    xr[l] += cr[a][b][l] * vr[l] - ci[a][b][l] * vi[l];
                    xi[l] += cr[a][b][l] * vi[l] + ci[a][b][l] * vr[l];
                  }
                }
              }
            // Q role: tq[b][k] += sum_a conj(Y[a][b]) P_i[a][k]
            double* tr_blk = tq_re.data() + blk * stride;
            double* ti_blk = tq_im.data() + blk * stride;
            for (int b = 0; b < NR; ++b)
              for (int64_t k = 0; k < m; ++k) {
                double* xr = tr_blk + (b * m + k) * kLanes;
                double* xi = ti_blk + (b * m + k) * kLanes;
                for (int a = 0; a < NR; ++a) {
                  const double pr = pi_row[a * m + k].real(), pim = pi_row[a * m + k].imag();
#pragma omp simd
                  for (int l = 0; l < kLanes; ++l) {
                    const double yr = cr[a][b][l] * qmask[l], yi = -ci[a][b][l] * qmask[l];
                    xr[l] += yr * pr - yi * pim;
                    xi[l] += yr * pim + yi * pr;
                  }
                }
              }
          }
        }
      }
      for (int64_t i = i0; i < i1; ++i)
        for (int a = 0; a < NR; ++a)
          for (int64_t k = 0; k < m; ++k) {
            const double* xr = acc_re.data() + (i - i0) * row_acc + (a * m + k) * kLanes;
            const double* xi = acc_im.data() + (i - i0) * row_acc + (a * m + k) * kLanes;
            double sr = 0.0, si = 0.0;
            for (int l = 0; l < kLanes; ++l) {
              sr += xr[l];
              si += xi[l];
            }
            grad_p[(i * NR + a) * m + k] = c10::complex<double>(sr, si);
          }
    }
#pragma omp critical
    for (size_t t = 0; t < gq_re.size(); ++t) {
      gq_re[t] += tq_re[t];
      gq_im[t] += tq_im[t];
    }
  }
}

// lane blocks [block][b][k][lane] -> rows x n x m (added to out when accumulate)
static void unpack_lanes(const std::vector<double>& re, const std::vector<double>& im, int64_t rows, int64_t n,
                         int64_t m, bool accumulate, c10::complex<double>* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t blk = r / kLanes, lane = r % kLanes;
    for (int64_t b = 0; b < n; ++b)
      for (int64_t k = 0; k < m; ++k) {
        const int64_t idx = ((blk * n + b) * m + k) * kLanes + lane;
        const c10::complex<double> v(re[idx], im[idx]);
        out[(r * n + b) * m + k] = accumulate ? out[(r * n + b) * m + k] + v : v;
      }
  }
}

static void check_devices(const at::Tensor& P, const at::Tensor& Q, const char* op) {
  TORCH_CHECK(P.device().is_cpu() && Q.device().is_cpu(), op, ": CPU tensors expected");
}

at::Tensor photonic_fidelity_cpu(const at::Tensor& P, const at::Tensor& Q, bool symmetric) {
  qrkd::check_photonic_matrices(P, Q, symmetric, "photonic_fidelity");
  check_devices(P, Q, "photonic_fidelity");
  const int64_t N = P.size(0), M = Q.size(0), n = P.size(1), m = P.size(2);
  const auto real_dtype = c10::toRealValueType(P.scalar_type());
  const at::Tensor p = P.to(at::kComplexDouble).contiguous();
  const at::Tensor q = Q.to(at::kComplexDouble).contiguous();
  at::Tensor out = at::empty({N, M}, P.options().dtype(at::kDouble));
  if (N > 0 && M > 0) {
    std::vector<double> qre, qim;
    pack_lanes(q.data_ptr<c10::complex<double>>(), M, n, m, qre, qim);
    qrkd::Interrupt interrupt;
    QRKD_PHOTONIC_DISPATCH(n, forward_impl, p.data_ptr<c10::complex<double>>(), qre, qim, N, M, m, symmetric,
                           out.data_ptr<double>(), interrupt);
    interrupt.rethrow();
    if (symmetric) qrkd::mirror_upper(out.data_ptr<double>(), N);
  }
  return out.to(real_dtype);
}

std::tuple<at::Tensor, at::Tensor> photonic_fidelity_backward_cpu(const at::Tensor& grad, const at::Tensor& P,
                                                                   const at::Tensor& Q, bool symmetric) {
  qrkd::check_photonic_matrices(P, Q, symmetric, "photonic_fidelity_backward");
  check_devices(P, Q, "photonic_fidelity_backward");
  const int64_t N = P.size(0), M = Q.size(0), n = P.size(1), m = P.size(2);
  qrkd::check_photonic_grad(grad, P, Q);
  const at::Tensor p = P.to(at::kComplexDouble).contiguous();
  const at::Tensor q = Q.to(at::kComplexDouble).contiguous();
  at::Tensor g = grad.to(at::kDouble).contiguous();
  if (symmetric) {  // G + G^T, on a copy
    g = g.clone();
    qrkd::symmetrise_sum(g.data_ptr<double>(), N);
    for (int64_t i = 0; i < N; ++i) g.data_ptr<double>()[i * N + i] *= 2.0;  // the diagonal pair's P role only
  }
  at::Tensor grad_p = at::zeros({N, n, m}, P.options().dtype(at::kComplexDouble));
  at::Tensor grad_q = symmetric ? at::zeros({0, n, m}, grad_p.options()) : at::zeros({M, n, m}, grad_p.options());
  if (N > 0 && M > 0) {
    std::vector<double> qre, qim, gq_re, gq_im;
    pack_lanes(q.data_ptr<c10::complex<double>>(), M, n, m, qre, qim);
    auto* gp = grad_p.data_ptr<c10::complex<double>>();
    qrkd::Interrupt interrupt;
    QRKD_PHOTONIC_DISPATCH(n, backward_impl, p.data_ptr<c10::complex<double>>(), qre, qim, g.data_ptr<double>(), N,
                           M, m, symmetric, gp, gq_re, gq_im, interrupt);
    interrupt.rethrow();
    if (symmetric)
      unpack_lanes(gq_re, gq_im, M, n, m, /*accumulate=*/true, gp);
    else
      unpack_lanes(gq_re, gq_im, M, n, m, /*accumulate=*/false, grad_q.data_ptr<c10::complex<double>>());
  }
  return {grad_p.to(P.scalar_type()), grad_q.to(Q.scalar_type())};
}

}  // namespace qrkd_photonic

TORCH_LIBRARY_IMPL(qrkd, CPU, m) {
  m.impl("photonic_fidelity", &qrkd_photonic::photonic_fidelity_cpu);
  m.impl("photonic_fidelity_backward", &qrkd_photonic::photonic_fidelity_backward_cpu);
}
