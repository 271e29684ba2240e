// Photonic fidelity kernel on the CPU (DESIGN.md 3.5): K_ij = |Perm(P_i Q_j^H)|^2 for per-sample n x m complex
// matrices P (N x n x m) and Q (M x n x m), and its backward (the gradients in P and Q).
//
// A tile of TI rows i and TJ columns j is worked in two stages.
// 1. All its n x n blocks A_ij = P_i Q_j^H are one real matrix product C = L R, real and imaginary parts apart:
//    L = [[Re P, Im P], [Im P, -Re P]] (2 TI n x 2m, rows (i, a)),  R = [Re Q^T; Im Q^T] (2m x n TJ,
//    columns (b, j)), so C[(i, a)][(b, j)] = Re A_ij[a][b] and C[TI n + (i, a)][(b, j)] = Im A_ij[a][b]: for fixed
//    (i, a, b) consecutive j are contiguous, the structure-of-arrays layout the second stage reads.
// 2. The permanents, kLanes pairs (i, j..j+kLanes-1) at a time, every inner loop running over the lanes. Glynn's
//    formula with the sign vectors in Gray-code order (one column flipped per step, 2^(n-1) steps):
//      Perm(A) = 2^-(n-1) sum_{d in {+-1}^n, d_0 = 1} (prod_b d_b) prod_a r_a(d),   r_a(d) = sum_b d_b A_ab,
//    and for the backward its cofactors (the derivative of Perm(A) in A_ab) from the same walk:
//      C_ab = 2^-(n-1) sum_d (prod d) d_b E_a(d),   E_a(d) = prod_{a' != a} r_a'(d)   (prefix / suffix products).
//    d_b is constant between two flips of column b, so sum_d d_b E_a(d) is accumulated per run: a running sum of
//    E_a, read at each flip (O(n) per step, not O(n^2)).
// The backward's per-pair weights Y = 2 G_ij Perm(A) conj(C) overwrite C in the same layout, and two more products
// contract them (BLAS): dL/dP = Y Q (from Y R^T) and dL/dQ = Y^H P (from Y^T L).
//
// Precision: the walks run in double whatever the input dtype (the Gray-code walk accumulates rounding over 2^(n-1)
// steps); the products run in the input's precision (float32 for complex64, as torch's own complex64 matmul would),
// and every sum over tiles is kept in double. The photon count n is a template parameter (1..kMaxPhotons) so that
// the n-loops unroll. OpenMP threads share the row tiles; thread 0 polls for Ctrl-C between tiles (interrupt.h).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "interrupt.h"
#include "photonic.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

// The Fortran BLAS that torch is linked with (MKL in torch's x86 wheels). Weak: where torch exports no such symbol
// the products go through at::mm instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace qrkd_photonic {

constexpr int kLanes = 8;  // pairs per walk: one i, eight consecutive j (two AVX2 vectors: two independent chains)
constexpr int64_t kTileRows = 8;            // TI
constexpr int64_t kTileBytes = 192 * 1024;  // the product buffer C of a tile, to stay in L2 with its R tile

// Threads for a job of `units` multiply-adds: one per ~2M (about half a millisecond), so that a tiny kernel matrix
// stays on one thread while the seed's 128 x 128 (about 3.4M) already uses two.
static int threads_for(double units) {
  const double want = units / double(1 << 21);
  return static_cast<int>(std::max(1.0, std::min<double>(qrkd::num_threads(), want)));
}

// Column-major C (m x n, ldc) = op(A) op(B), op = transpose where the flag says so.
template <typename T>
static void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                 int64_t ldb, T* c, int64_t ldc) {
  constexpr bool single = std::is_same<T, float>::value;
  if (single ? sgemm_ != nullptr : dgemm_ != nullptr) {
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int im = int(m), in = int(n), ik = int(k), ilda = int(lda), ildb = int(ldb), ildc = int(ldc);
    const T one = 1, zero = 0;
    if constexpr (single)
      sgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &zero, c, &ildc);
    else
      dgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &zero, c, &ildc);
    return;
  }
  // no BLAS symbol: a column-major (rows x cols, ld) matrix is the tensor of those sizes with strides (1, ld)
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto operand = [&](const T* x, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    return trans ? at::from_blob(const_cast<T*>(x), {cols, rows}, {1, ld}, options).t()
                 : at::from_blob(const_cast<T*>(x), {rows, cols}, {1, ld}, options);
  };
  const at::Tensor product = at::mm(operand(a, m, k, lda, trans_a), operand(b, k, n, ldb, trans_b));
  at::from_blob(c, {m, n}, {1, ldc}, options).copy_(product);
}

// Tile geometry for n photons, m modes and products in T. TI n is a multiple of kRowBlock (TI is 8) and the columns
// n TJ a multiple of kColBlock (TJ is a multiple of 16).
constexpr int64_t kColAlign = 16;

struct Tiles {
  int64_t n, m, cols;  // cols: TJ
  int64_t l_size() const { return 2 * kTileRows * n * 2 * m; }  // L: 2 TI n x 2m
  int64_t r_size() const { return 2 * m * n * cols; }           // R: 2m x n TJ
  int64_t c_size() const { return 2 * kTileRows * n * n * cols; }  // C: 2 TI n x n TJ
  int64_t ldc() const { return n * cols; }
};

template <typename T>
static Tiles tiles_for(int64_t n, int64_t m, int64_t M) {
  const int64_t per_col = 2 * kTileRows * n * n * int64_t(sizeof(T));
  const int64_t fit = std::max<int64_t>(kColAlign, kTileBytes / per_col / kColAlign * kColAlign);
  return {n, m, std::min(fit, (M + kColAlign - 1) / kColAlign * kColAlign)};
}

// L of the row tile starting at row i0 (zero rows past N).
template <typename T>
static void pack_left(const c10::complex<T>* p, int64_t N, int64_t i0, const Tiles& t, T* l) {
  const int64_t n = t.n, m = t.m, half = kTileRows * n, width = 2 * m;
  std::fill(l, l + t.l_size(), T(0));
  for (int64_t ii = 0; ii < kTileRows && i0 + ii < N; ++ii)
    for (int64_t a = 0; a < n; ++a) {
      const c10::complex<T>* row = p + ((i0 + ii) * n + a) * m;
      T* top = l + (ii * n + a) * width;
      T* bottom = l + (half + ii * n + a) * width;
      for (int64_t k = 0; k < m; ++k) {
        top[k] = row[k].real();
        top[m + k] = row[k].imag();
        bottom[k] = row[k].imag();
        bottom[m + k] = -row[k].real();
      }
    }
}

// R of every column tile of Q, one after another (zero columns past M).
template <typename T>
static std::vector<T> pack_right(const c10::complex<T>* q, int64_t M, const Tiles& t) {
  const int64_t n = t.n, m = t.m, tiles = (M + t.cols - 1) / t.cols, ld = t.ldc();
  std::vector<T> r(static_cast<size_t>(tiles * t.r_size()), T(0));
  for (int64_t j = 0; j < M; ++j) {
    T* tile = r.data() + (j / t.cols) * t.r_size();
    const int64_t jj = j % t.cols;
    for (int64_t b = 0; b < n; ++b)
      for (int64_t k = 0; k < m; ++k) {
        const c10::complex<T> v = q[(j * n + b) * m + k];
        tile[k * ld + b * t.cols + jj] = v.real();
        tile[(m + k) * ld + b * t.cols + jj] = v.imag();
      }
  }
  return r;
}

// C = L R for one tile: depth 2m is too shallow for a BLAS call to pay off (MKL's sgemm ran these shapes at about half
// its large-GEMM rate here), so a register-blocked kernel: kRowBlock rows of L against a panel of kColBlock columns
// of R (in L1), the kRowBlock x kColBlock block of C accumulating in registers over the depth.
constexpr int kRowBlock = 4;
template <typename T>
constexpr int kColBlock = 64 / int(sizeof(T));  // two 256-bit vectors per row of the block

template <typename T>
static void tile_product(const T* l, const T* r, const Tiles& t, T* c) {
  constexpr int CB = kColBlock<T>;
  const int64_t rows = 2 * kTileRows * t.n, cols = t.ldc(), depth = 2 * t.m;
  for (int64_t c0 = 0; c0 < cols; c0 += CB)
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
      T acc[kRowBlock][CB];
      for (int rr = 0; rr < kRowBlock; ++rr)
#pragma omp simd
        for (int cc = 0; cc < CB; ++cc) acc[rr][cc] = T(0);
      for (int64_t k = 0; k < depth; ++k) {
        const T* panel = r + k * cols + c0;
        for (int rr = 0; rr < kRowBlock; ++rr) {
          const T lv = l[(r0 + rr) * depth + k];
#pragma omp simd
          for (int cc = 0; cc < CB; ++cc) acc[rr][cc] += lv * panel[cc];
        }
      }
      for (int rr = 0; rr < kRowBlock; ++rr)
#pragma omp simd
        for (int cc = 0; cc < CB; ++cc) c[(r0 + rr) * cols + c0 + cc] = acc[rr][cc];
    }
}

// A[a][b][lane] of the pairs (row ii of the tile, columns jj..jj+kLanes-1), in double.
template <int NR, typename T>
static inline void gather_pairs(const T* c, const Tiles& t, int64_t ii, int64_t jj, double (&ar)[NR][NR][kLanes],
                                double (&ai)[NR][NR][kLanes]) {
  const int64_t ld = t.ldc(), imag = kTileRows * NR * ld;
  for (int a = 0; a < NR; ++a)
    for (int b = 0; b < NR; ++b) {
      const T* src = c + (ii * NR + a) * ld + b * t.cols + jj;
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        ar[a][b][l] = double(src[l]);
        ai[a][b][l] = double(src[imag + l]);
      }
    }
}

// x = prod_a r_a (complex, per lane)
template <int NR>
static inline void row_product(const double (&rr)[NR][kLanes], const double (&ri)[NR][kLanes], double (&xr)[kLanes],
                               double (&xi)[kLanes]) {
#pragma omp simd
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
}

// r_a = sum_b A_ab (the sign vector of all +1)
template <int NR>
static inline void full_row_sums(const double (&ar)[NR][NR][kLanes], const double (&ai)[NR][NR][kLanes],
                                 double (&rr)[NR][kLanes], double (&ri)[NR][kLanes]) {
  for (int a = 0; a < NR; ++a) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      rr[a][l] = ar[a][0][l];
      ri[a][l] = ai[a][0][l];
    }
    for (int b = 1; b < NR; ++b)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        rr[a][l] += ar[a][b][l];
        ri[a][l] += ai[a][b][l];
      }
  }
}

// Step `step` (1 .. 2^(n-1) - 1) of the Gray-code order: the column it flips, twice its new sign (the row sums move
// by that times the column) and the sign prod_b d_b after it.
struct GrayStep {
  int col;
  double twice;
  double sign;
  explicit GrayStep(uint32_t step) {
    const int bit = __builtin_ctz(step);
    const uint32_t gray = step ^ (step >> 1);
    col = bit + 1;
    twice = ((gray >> bit) & 1u) ? -2.0 : 2.0;
    sign = (__builtin_popcount(gray) & 1) ? -1.0 : 1.0;
  }
};

template <int NR>
static inline void glynn_permanent(const double (&ar)[NR][NR][kLanes], const double (&ai)[NR][NR][kLanes],
                                   double (&pr)[kLanes], double (&pi)[kLanes]) {
  double rr[NR][kLanes], ri[NR][kLanes], xr[kLanes], xi[kLanes], sr[kLanes], si[kLanes];
  full_row_sums<NR>(ar, ai, rr, ri);
  row_product<NR>(rr, ri, sr, si);
  for (uint32_t step = 1; step < (1u << (NR - 1)); ++step) {
    const GrayStep g(step);
    for (int a = 0; a < NR; ++a)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        rr[a][l] += g.twice * ar[a][g.col][l];
        ri[a][l] += g.twice * ai[a][g.col][l];
      }
    row_product<NR>(rr, ri, xr, xi);
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      sr[l] += g.sign * xr[l];
      si[l] += g.sign * xi[l];
    }
  }
  const double scale = 1.0 / double(1u << (NR - 1));  // a power of two: exact
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) {
    pr[l] = sr[l] * scale;
    pi[l] = si[l] * scale;
  }
}

// C[a][b][l] = d Perm(A_l) / d A_l[a][b].
template <int NR>
static inline void glynn_cofactors(const double (&ar)[NR][NR][kLanes], const double (&ai)[NR][NR][kLanes],
                                   double (&cr)[NR][NR][kLanes], double (&ci)[NR][NR][kLanes]) {
  double rr[NR][kLanes], ri[NR][kLanes];
  double dr[NR][kLanes] = {}, di[NR][kLanes] = {};  // D_a: running sum of E_a over the sign vectors visited
  // cr/ci[a][b] for b >= 1 hold, until the end, the D_a read at column b's last flip
  for (int a = 0; a < NR; ++a)
    for (int b = 0; b < NR; ++b)
      for (int l = 0; l < kLanes; ++l) cr[a][b][l] = ci[a][b][l] = 0.0;
  double run_r[NR][NR][kLanes] = {}, run_i[NR][NR][kLanes] = {};  // sum of d_b E_a over the closed runs of column b
  uint32_t gray = 0;
  full_row_sums<NR>(ar, ai, rr, ri);
  for (uint32_t step = 0; step < (1u << (NR - 1)); ++step) {
    double sign = 1.0;
    if (step > 0) {
      const GrayStep g(step);
      // column g.col closes a run: its sign before the flip was the opposite of the new one
      const double before = g.twice > 0 ? -1.0 : 1.0;
      for (int a = 0; a < NR; ++a)
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          run_r[a][g.col][l] += before * (dr[a][l] - cr[a][g.col][l]);
          run_i[a][g.col][l] += before * (di[a][l] - ci[a][g.col][l]);
          cr[a][g.col][l] = dr[a][l];
          ci[a][g.col][l] = di[a][l];
        }
      for (int a = 0; a < NR; ++a)
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          rr[a][l] += g.twice * ar[a][g.col][l];
          ri[a][l] += g.twice * ai[a][g.col][l];
        }
      gray = step ^ (step >> 1);
      sign = g.sign;
    }
    // E_a = sign prod_{a' != a} r_a': suffix products (the sign folded in), then prefix products
    double sfr[NR + 1][kLanes], sfi[NR + 1][kLanes];
#pragma omp simd
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
    double pfr[kLanes], pfi[kLanes];
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      pfr[l] = 1.0;
      pfi[l] = 0.0;
    }
    for (int a = 0; a < NR; ++a) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        dr[a][l] += pfr[l] * sfr[a + 1][l] - pfi[l] * sfi[a + 1][l];
        di[a][l] += pfr[l] * sfi[a + 1][l] + pfi[l] * sfr[a + 1][l];
        const double tr = pfr[l] * rr[a][l] - pfi[l] * ri[a][l];
        pfi[l] = pfr[l] * ri[a][l] + pfi[l] * rr[a][l];
        pfr[l] = tr;
      }
    }
  }
  // close the open runs (column b's sign now: bit b-1 of the last Gray code); column 0's sign is always +1
  const double scale = 1.0 / double(1u << (NR - 1));
  for (int a = 0; a < NR; ++a) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      cr[a][0][l] = dr[a][l] * scale;
      ci[a][0][l] = di[a][l] * scale;
    }
    for (int b = 1; b < NR; ++b) {
      const double now = ((gray >> (b - 1)) & 1u) ? -1.0 : 1.0;
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        cr[a][b][l] = (run_r[a][b][l] + now * (dr[a][l] - cr[a][b][l])) * scale;
        ci[a][b][l] = (run_i[a][b][l] + now * (di[a][l] - ci[a][b][l])) * scale;
      }
    }
  }
}

// The pairs of a tile's walk: row ii of the tile and columns jj..jj+kLanes-1; whether any of them is to be computed.
static inline bool block_needed(int64_t i, int64_t j0, int64_t N, int64_t M, bool symmetric) {
  return i < N && j0 < M && !(symmetric && j0 + kLanes <= i);
}

// K (N x M, double). symmetric: Q is P and only the pairs j >= i are computed (the caller mirrors).
template <int NR, typename T>
static void forward_impl(const c10::complex<T>* p, const c10::complex<T>* q, int64_t N, int64_t M, int64_t m,
                         bool symmetric, double* out, qrkd::Interrupt& interrupt) {
  const Tiles t = tiles_for<T>(NR, m, M);
  const std::vector<T> right = pack_right(q, M, t);
  const int64_t row_tiles = (N + kTileRows - 1) / kTileRows, col_tiles = (M + t.cols - 1) / t.cols;
  const double pairs = double(N) * double(M) * (symmetric ? 0.5 : 1.0);
  const int threads = threads_for(pairs * (NR * NR * m + (1 << (NR - 1)) * NR));
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> left(static_cast<size_t>(t.l_size())), prod(static_cast<size_t>(t.c_size()));
    double ar[NR][NR][kLanes], ai[NR][NR][kLanes], pr[kLanes], pi[kLanes];
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < row_tiles; ++s) {
      const int64_t i0 = s * kTileRows;
      pack_left(p, N, i0, t, left.data());
      for (int64_t ct = symmetric ? i0 / t.cols : 0; ct < col_tiles; ++ct) {
        if (interrupt.check(qrkd::thread_id() == 0)) break;
        tile_product(left.data(), right.data() + ct * t.r_size(), t, prod.data());
        for (int64_t ii = 0; ii < kTileRows; ++ii) {
          const int64_t i = i0 + ii;
          for (int64_t jj = 0; jj < t.cols; jj += kLanes) {
            const int64_t j0 = ct * t.cols + jj;
            if (!block_needed(i, j0, N, M, symmetric)) continue;
            gather_pairs<NR>(prod.data(), t, ii, jj, ar, ai);
            glynn_permanent<NR>(ar, ai, pr, pi);
            for (int l = 0; l < kLanes; ++l) {
              const int64_t j = j0 + l;
              if (j < M && !(symmetric && j < i)) out[i * M + j] = pr[l] * pr[l] + pi[l] * pi[l];
            }
          }
        }
      }
    }
  }
}

// Backward: for a real loss L = sum_ij G_ij K_ij and torch's convention for complex gradients
// (dL/dz = dL/dRe z + i dL/dIm z), with A = P_i Q_j^H and Y = 2 G_ij Perm(A) conj(C):
//   dL/dP_i += Y Q_j,   dL/dQ_j += Y^H P_i.
// symmetric: Q is P, G is already G + G^T (its diagonal G_ii), only the pairs j >= i are visited and both roles land
// in dL/dP. The P role of a row tile is summed by the thread that owns it; the Q role goes to a per-thread buffer
// (M x n x 2m, double) summed at the end.
template <int NR, typename T>
static void backward_impl(const c10::complex<T>* p, const c10::complex<T>* q, const double* g, int64_t N, int64_t M,
                          int64_t m, bool symmetric, c10::complex<double>* grad_p, c10::complex<double>* grad_q,
                          qrkd::Interrupt& interrupt) {
  const Tiles t = tiles_for<T>(NR, m, M);
  const std::vector<T> right = pack_right(q, M, t);
  const int64_t row_tiles = (N + kTileRows - 1) / kTileRows, col_tiles = (M + t.cols - 1) / t.cols;
  const int64_t width = 2 * m, half = kTileRows * NR, ld = t.ldc();
  const double pairs = double(N) * double(M) * (symmetric ? 0.5 : 1.0);
  const int threads = threads_for(pairs * (3 * NR * NR * m + (1 << (NR - 1)) * NR * 5));
  std::vector<std::vector<double>> q_role(static_cast<size_t>(threads));
#pragma omp parallel num_threads(threads)
  {
    std::vector<double>& gq = q_role[static_cast<size_t>(qrkd::thread_id())];
    gq.assign(static_cast<size_t>(M * NR * width), 0.0);
    std::vector<T> left(static_cast<size_t>(t.l_size())), prod(static_cast<size_t>(t.c_size()));
    std::vector<T> w(static_cast<size_t>(2 * half * width)), wq(static_cast<size_t>(ld * width));
    std::vector<double> gp(static_cast<size_t>(2 * half * width));
    double ar[NR][NR][kLanes], ai[NR][NR][kLanes], cr[NR][NR][kLanes], ci[NR][NR][kLanes];
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < row_tiles; ++s) {
      const int64_t i0 = s * kTileRows;
      pack_left(p, N, i0, t, left.data());
      std::fill(gp.begin(), gp.end(), 0.0);
      for (int64_t ct = symmetric ? i0 / t.cols : 0; ct < col_tiles; ++ct) {
        if (interrupt.check(qrkd::thread_id() == 0)) break;
        const T* r = right.data() + ct * t.r_size();
        tile_product(left.data(), r, t, prod.data());
        // Y over the product, in place; zero where no pair is to be counted
        for (int64_t ii = 0; ii < kTileRows; ++ii) {
          const int64_t i = i0 + ii;
          for (int64_t jj = 0; jj < t.cols; jj += kLanes) {
            const int64_t j0 = ct * t.cols + jj;
            T* yr = prod.data() + ii * NR * ld + jj;
            T* yi = yr + half * ld;
            if (!block_needed(i, j0, N, M, symmetric)) {
              for (int a = 0; a < NR; ++a)
                for (int b = 0; b < NR; ++b)
                  for (int l = 0; l < kLanes; ++l) yr[a * ld + b * t.cols + l] = yi[a * ld + b * t.cols + l] = T(0);
              continue;
            }
            gather_pairs<NR>(prod.data(), t, ii, jj, ar, ai);
            glynn_cofactors<NR>(ar, ai, cr, ci);
            double wr[kLanes], wi[kLanes];
            for (int l = 0; l < kLanes; ++l) {
              double sr = 0.0, si = 0.0;  // Perm(A) by cofactor expansion along the first row
              for (int b = 0; b < NR; ++b) {
                sr += ar[0][b][l] * cr[0][b][l] - ai[0][b][l] * ci[0][b][l];
                si += ar[0][b][l] * ci[0][b][l] + ai[0][b][l] * cr[0][b][l];
              }
              const int64_t j = j0 + l;
              const bool counted = j < M && !(symmetric && j < i);  // padding, or the other triangle: exactly 0
              wr[l] = counted ? 2.0 * g[i * M + j] * sr : 0.0;
              wi[l] = counted ? 2.0 * g[i * M + j] * si : 0.0;
            }
            for (int a = 0; a < NR; ++a)
              for (int b = 0; b < NR; ++b)
#pragma omp simd
                for (int l = 0; l < kLanes; ++l) {
                  yr[a * ld + b * t.cols + l] = T(wr[l] * cr[a][b][l] + wi[l] * ci[a][b][l]);
                  yi[a * ld + b * t.cols + l] = T(wi[l] * cr[a][b][l] - wr[l] * ci[a][b][l]);
                }
          }
        }
        // P role: W = Y R^T (2 TI n x 2m); column-major W^T = R Y^T
        gemm<T>(true, false, width, 2 * half, ld, r, ld, prod.data(), ld, w.data(), width);
        for (int64_t x = 0; x < 2 * half * width; ++x) gp[x] += double(w[x]);
        // Q role: Y^T L (n TJ x 2m); column-major L^T Y
        gemm<T>(false, true, width, ld, 2 * half, left.data(), width, prod.data(), ld, wq.data(), width);
        for (int64_t jj = 0; jj < t.cols; ++jj) {
          const int64_t j = ct * t.cols + jj;
          if (j >= M) break;
          for (int b = 0; b < NR; ++b) {
            const T* src = wq.data() + (b * t.cols + jj) * width;
            double* dst = gq.data() + (j * NR + b) * width;
            for (int64_t k = 0; k < width; ++k) dst[k] += double(src[k]);
          }
        }
      }
      // dL/dP_i[a][k] = (Re Y Re Q - Im Y Im Q) + i (Re Y Im Q + Im Y Re Q), from W's four quarters
      for (int64_t ii = 0; ii < kTileRows && i0 + ii < N; ++ii)
        for (int a = 0; a < NR; ++a) {
          const double* top = gp.data() + (ii * NR + a) * width;
          const double* bottom = gp.data() + (half + ii * NR + a) * width;
          c10::complex<double>* dst = grad_p + ((i0 + ii) * NR + a) * m;
          for (int64_t k = 0; k < m; ++k) dst[k] = {top[k] - bottom[m + k], top[m + k] + bottom[k]};
        }
    }
  }
  // Q role: (Re, Im) pairs of every thread, added into dL/dQ (or dL/dP when symmetric)
  c10::complex<double>* dq = symmetric ? grad_p : grad_q;
  for (const std::vector<double>& part : q_role) {
    if (part.empty()) continue;
    for (int64_t row = 0; row < M * NR; ++row)
      for (int64_t k = 0; k < m; ++k)
        dq[row * m + k] += c10::complex<double>(part[row * width + k], part[row * width + m + k]);
  }
}

static void check_devices(const at::Tensor& P, const at::Tensor& Q, const char* op) {
  TORCH_CHECK(P.device().is_cpu() && Q.device().is_cpu(), op, ": CPU tensors expected");
}

template <int NR>
static void forward_dispatch(const at::Tensor& p, const at::Tensor& q, bool symmetric, at::Tensor& out,
                             qrkd::Interrupt& interrupt) {
  const int64_t N = p.size(0), M = q.size(0), m = p.size(2);
  if (p.scalar_type() == at::kComplexFloat)
    forward_impl<NR, float>(p.data_ptr<c10::complex<float>>(), q.data_ptr<c10::complex<float>>(), N, M, m, symmetric,
                            out.data_ptr<double>(), interrupt);
  else
    forward_impl<NR, double>(p.data_ptr<c10::complex<double>>(), q.data_ptr<c10::complex<double>>(), N, M, m,
                             symmetric, out.data_ptr<double>(), interrupt);
}

template <int NR>
static void backward_dispatch(const at::Tensor& p, const at::Tensor& q, const at::Tensor& g, bool symmetric,
                              at::Tensor& grad_p, at::Tensor& grad_q, qrkd::Interrupt& interrupt) {
  const int64_t N = p.size(0), M = q.size(0), m = p.size(2);
  auto* gp = grad_p.data_ptr<c10::complex<double>>();
  auto* gq = symmetric ? nullptr : grad_q.data_ptr<c10::complex<double>>();
  if (p.scalar_type() == at::kComplexFloat)
    backward_impl<NR, float>(p.data_ptr<c10::complex<float>>(), q.data_ptr<c10::complex<float>>(), g.data_ptr<double>(),
                             N, M, m, symmetric, gp, gq, interrupt);
  else
    backward_impl<NR, double>(p.data_ptr<c10::complex<double>>(), q.data_ptr<c10::complex<double>>(),
                              g.data_ptr<double>(), N, M, m, symmetric, gp, gq, interrupt);
}

// complex64 stays complex64 (float32 products), anything else is worked in complex128
static at::Tensor working(const at::Tensor& x) {
  return (x.scalar_type() == at::kComplexFloat ? x : x.to(at::kComplexDouble)).contiguous();
}

at::Tensor photonic_fidelity_cpu(const at::Tensor& P, const at::Tensor& Q, bool symmetric) {
  qrkd::check_photonic_matrices(P, Q, symmetric, "photonic_fidelity");
  check_devices(P, Q, "photonic_fidelity");
  const int64_t N = P.size(0), M = Q.size(0), n = P.size(1);
  const at::Tensor p = working(P), q = working(Q);
  at::Tensor out = at::empty({N, M}, P.options().dtype(at::kDouble));
  if (N > 0 && M > 0) {
    qrkd::Interrupt interrupt;
    QRKD_PHOTONIC_DISPATCH(n, forward_dispatch, p, q, symmetric, out, interrupt);
    interrupt.rethrow();
    if (symmetric) qrkd::mirror_upper(out.data_ptr<double>(), N);
  }
  return out.to(c10::toRealValueType(P.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor> photonic_fidelity_backward_cpu(const at::Tensor& grad, const at::Tensor& P,
                                                                   const at::Tensor& Q, bool symmetric) {
  qrkd::check_photonic_matrices(P, Q, symmetric, "photonic_fidelity_backward");
  check_devices(P, Q, "photonic_fidelity_backward");
  qrkd::check_photonic_grad(grad, P, Q);
  const int64_t N = P.size(0), M = Q.size(0), n = P.size(1), m = P.size(2);
  const at::Tensor p = working(P), q = working(Q);
  at::Tensor g = grad.to(at::kDouble).contiguous();
  if (symmetric) {  // G + G^T, on a copy (the diagonal stays G_ii: its pair counts in both roles)
    g = g.clone();
    qrkd::symmetrise_sum(g.data_ptr<double>(), N);
  }
  at::Tensor grad_p = at::zeros({N, n, m}, P.options().dtype(at::kComplexDouble));
  at::Tensor grad_q = at::zeros({symmetric ? 0 : M, n, m}, grad_p.options());
  if (N > 0 && M > 0) {
    qrkd::Interrupt interrupt;
    QRKD_PHOTONIC_DISPATCH(n, backward_dispatch, p, q, g, symmetric, grad_p, grad_q, interrupt);
    interrupt.rethrow();
  }
  return {grad_p.to(P.scalar_type()), grad_q.to(Q.scalar_type())};
}

}  // namespace qrkd_photonic

TORCH_LIBRARY_IMPL(qrkd, CPU, m) {
  m.impl("photonic_fidelity", &qrkd_photonic::photonic_fidelity_cpu);
  m.impl("photonic_fidelity_backward", &qrkd_photonic::photonic_fidelity_backward_cpu);
}
