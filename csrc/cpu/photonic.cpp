// Photonic fidelity kernel on the CPU (DESIGN.md 3.5): K_ij = |Perm(P_i Q_j^H)|^2 for per-sample n x m complex
// matrices P (N x n x m) and Q (M x n x m), and its backward (the gradients in P and Q).
//
// A tile of TI rows i and TJ columns j is worked in two stages.
// 1. All its n x n blocks A_ij = P_i Q_j^H are one real matrix product C = L R, real and imaginary parts apart:
//    L = [[Re P, Im P], [Im P, -Re P]] (2 TI n x 2m, rows (i, a)),  R = [Re Q^T; Im Q^T] (2m x n TJ,
//    columns (b, j)), so C[(i, a)][(b, j)] = Re A_ij[a][b] and C[TI n + (i, a)][(b, j)] = Im A_ij[a][b]: for fixed
//    (i, a, b) consecutive j are contiguous, the structure-of-arrays layout the second stage reads. Columns that are
//    the same in every matrix of P and Q add one constant block to every A_ij (Columns below): the product runs over
//    the other columns only, started from that block.
// 2. The permanents, many pairs (i, j..j+lanes-1) at a time, every operation a vector over the lanes. Glynn's
//    formula with the sign vectors in Gray-code order (one column flipped per step, 2^(n-1) steps):
//      Perm(A) = 2^-(n-1) sum_{d in {+-1}^n, d_0 = 1} (prod_b d_b) prod_a r_a(d),   r_a(d) = sum_b d_b A_ab,
//    and for the backward its cofactors (the derivative of Perm(A) in A_ab) from the same walk:
//      C_ab = 2^-(n-1) sum_d (prod d) d_b E_a(d),   E_a(d) = prod_{a' != a} r_a'(d)   (prefix / suffix products).
//    d_b is constant between two flips of column b, so sum_d d_b E_a(d) is accumulated per run: a running sum of
//    E_a, read at each flip (O(n) per step, not O(n^2)).
// The backward's per-pair weights Y = 2 G_ij Perm(A) conj(C) overwrite C in the same layout, and two more products
// contract them: dL/dP = Y Q (from Y R^T, dot products along the tile's columns) and dL/dQ = Y^H P (from L^T Y),
// both over the varying columns; a shared column's parts need only Y summed over the tile's j or i.
//
// Precision: the products and, up to kFloatWalkPhotons photons, the walks run in the input's precision (float32 for
// complex64, as torch's own complex64 matmul and the float32 reference would); every sum over tiles is kept in double.
// The photon count n is a template parameter (1..kMaxPhotons) so that the n-loops unroll. Every walk takes one 256-bit
// vector of pairs (GCC vector extensions: AVX2 where the build targets it, narrower vectors elsewhere). OpenMP threads
// share the row tiles; thread 0 polls for Ctrl-C between tiles (interrupt.h).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "interrupt.h"
#include "photonic.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace qrkd_photonic {

using qrkd::kVecLanes;
using qrkd::Vec;

// The walks' precision. complex64 inputs walk in float up to kFloatWalkPhotons photons, like their products, and in
// double above: the hard case of a Gray-code walk is a rank-one A, whose 2^(n-1) terms reach n^n / n! times the
// permanent and cancel down to it (26x at n = 5, 416x at n = 8, 18,600x at n = 12, where a float walk loses 3e-5).
constexpr int kFloatWalkPhotons = 8;
template <int NR, typename T>
using Walk = std::conditional_t<std::is_same<T, float>::value && NR <= kFloatWalkPhotons, float, double>;

constexpr int64_t kTileRows = 8;            // TI
constexpr int64_t kTileBytes = 192 * 1024;  // the product buffer C of a tile, to stay in L2 with its R tile

// Threads for a job of `units` multiply-adds: one per ~2M (about half a millisecond), so that a tiny kernel matrix
// stays on one thread while the seed's 128 x 128 (about 3.4M) already uses two.
static int threads_for(double units) {
  const double want = units / double(1 << 21);
  return static_cast<int>(std::max(1.0, std::min<double>(qrkd::num_threads(), want)));
}

// Tile geometry for n photons, m modes and products in T. The rows 2 TI n are even (TI is 8) and the columns n TJ a
// multiple of 16 (TJ is), so of the product's two-vector panels.
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

// The column order of L and R. A column whose entries are the same in every matrix of P and of Q (the m - d modes
// of the seed's circuit, which carry no phase) adds the same n x n block to every A_ij: `shared`, the sum of
// P_0[:, k] P_0[:, k]^H over those columns, computed once in double. L's columns and R's rows put the varying
// columns first, [Re varying, Im varying, Re shared, Im shared], so a product over the first 2 `varying` of them,
// started from the shared block, is A. The backward's gradient products run over the same 2 `varying`; the shared
// columns' parts come from sums of Y (SharedTables).
struct Columns {
  std::vector<int64_t> order;  // the input column at each position: the varying ones, then the shared ones
  int64_t varying = 0;
  std::vector<c10::complex<double>> shared;  // n x n, row-major; zero when no column is shared
  int64_t m() const { return static_cast<int64_t>(order.size()); }
  int64_t re(int64_t pos) const { return pos < varying ? pos : varying + pos; }  // where the real part goes
  int64_t im(int64_t pos) const { return pos < varying ? varying + pos : m() + pos; }
};

template <typename T>
static Columns split_columns(const c10::complex<T>* p, const c10::complex<T>* q, int64_t N, int64_t M, int64_t n,
                             int64_t m) {
  auto same_everywhere = [&](int64_t k) {
    for (const auto& [x, rows] : {std::pair{p, N}, std::pair{q, M}})
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t a = 0; a < n; ++a) {
          const c10::complex<T> v = x[(i * n + a) * m + k], first = p[a * m + k];
          if (!(v.real() == first.real() && v.imag() == first.imag())) return false;  // NaN is never shared
        }
    return true;
  };
  Columns c;
  std::vector<int64_t> shared;
  for (int64_t k = 0; k < m; ++k) (same_everywhere(k) ? shared : c.order).push_back(k);
  c.varying = static_cast<int64_t>(c.order.size());
  c.order.insert(c.order.end(), shared.begin(), shared.end());
  c.shared.assign(static_cast<size_t>(n * n), c10::complex<double>(0, 0));
  for (int64_t k : shared)
    for (int64_t a = 0; a < n; ++a)
      for (int64_t b = 0; b < n; ++b)
        c.shared[a * n + b] += c10::complex<double>(p[a * m + k]) * std::conj(c10::complex<double>(p[b * m + k]));
  return c;
}

// L of the row tile starting at row i0 (zero rows past N), times `scale` (a power of two: exact).
template <typename T>
static void pack_left(const c10::complex<T>* p, int64_t N, int64_t i0, const Tiles& t, const Columns& cols, T* l,
                      T scale = T(1)) {
  const int64_t n = t.n, m = t.m, half = kTileRows * n, width = 2 * m;
  std::fill(l, l + t.l_size(), T(0));
  for (int64_t ii = 0; ii < kTileRows && i0 + ii < N; ++ii)
    for (int64_t a = 0; a < n; ++a) {
      const c10::complex<T>* row = p + ((i0 + ii) * n + a) * m;
      T* top = l + (ii * n + a) * width;
      T* bottom = l + (half + ii * n + a) * width;
      for (int64_t pos = 0; pos < m; ++pos) {
        const c10::complex<T> v = row[cols.order[pos]];
        top[cols.re(pos)] = scale * v.real();
        top[cols.im(pos)] = scale * v.imag();
        bottom[cols.re(pos)] = scale * v.imag();
        bottom[cols.im(pos)] = -scale * v.real();
      }
    }
}

// R of every column tile of Q, one after another (zero columns past M).
template <typename T>
static std::vector<T> pack_right(const c10::complex<T>* q, int64_t M, const Tiles& t, const Columns& cols) {
  const int64_t n = t.n, m = t.m, tiles = (M + t.cols - 1) / t.cols, ld = t.ldc();
  std::vector<T> r(static_cast<size_t>(tiles * t.r_size()), T(0));
  for (int64_t j = 0; j < M; ++j) {
    T* tile = r.data() + (j / t.cols) * t.r_size();
    const int64_t jj = j % t.cols;
    for (int64_t b = 0; b < n; ++b)
      for (int64_t pos = 0; pos < m; ++pos) {
        const c10::complex<T> v = q[(j * n + b) * m + cols.order[pos]];
        tile[cols.re(pos) * ld + b * t.cols + jj] = v.real();
        tile[cols.im(pos) * ld + b * t.cols + jj] = v.imag();
      }
  }
  return r;
}

// What a tile's product starts from: the shared block times `scale`, entry (x, b) for product row x = (part, ii, a)
// (part 0 the real parts, 1 the imaginary ones) and column block b; empty when no column is shared.
template <typename T>
static std::vector<T> product_start(const Columns& cols, int64_t n, T scale) {
  if (cols.varying == cols.m()) return {};
  std::vector<T> start(static_cast<size_t>(2 * kTileRows * n * n));
  for (int64_t part = 0; part < 2; ++part)
    for (int64_t ii = 0; ii < kTileRows; ++ii)
      for (int64_t a = 0; a < n; ++a)
        for (int64_t b = 0; b < n; ++b) {
          const c10::complex<double> v = cols.shared[a * n + b];
          start[((part * kTileRows + ii) * n + a) * n + b] = scale * T(part == 0 ? v.real() : v.imag());
        }
  return start;
}

// The backward's gradient products over the shared columns. Their rows of R are the same for every j and their
// columns of L the same for every i (up to zero padding, where Y is zero), so Y's sums over a tile's j (for dL/dP)
// and over its i (for dL/dQ) take the place of full products: R's and L's entries there, at layout positions
// 2 varying + e (e < 2 shared), are
//   right[e][b]          = Re / Im P_0[b][k]       (R's row: Q_j[b][k] for every j)
//   left[e][part n + a]  = L's column entry of row (part, any i, a)
template <typename T>
struct SharedTables {
  std::vector<double> right;  // 2s x n
  std::vector<T> left;        // 2s x 2n
};

template <typename T>
static SharedTables<T> shared_tables(const c10::complex<T>* p, const Columns& cols, int64_t n) {
  const int64_t shared = cols.m() - cols.varying;
  SharedTables<T> tables{std::vector<double>(static_cast<size_t>(2 * shared * n)),
                         std::vector<T>(static_cast<size_t>(2 * shared * 2 * n))};
  for (int64_t e = 0; e < 2 * shared; ++e) {
    const bool imag = e >= shared;  // [Re shared, Im shared]
    const int64_t k = cols.order[cols.varying + e % shared];
    for (int64_t a = 0; a < n; ++a) {
      const c10::complex<T> v = p[a * cols.m() + k];
      tables.right[e * n + a] = imag ? double(v.imag()) : double(v.real());
      // L's row (top, a) is [Re p, Im p] and (bottom, a) [Im p, -Re p] at the Re / Im positions
      tables.left[e * 2 * n + a] = imag ? v.imag() : v.real();
      tables.left[e * 2 * n + n + a] = imag ? -v.real() : v.imag();
    }
  }
  return tables;
}

// The products of a tile are too small for a BLAS call to pay off (MKL's sgemm ran them at about half its large-GEMM
// rate here), so register-blocked kernels. A B: RB rows of A against a panel of two vectors of B's columns, the
// RB x 2 vectors of the result accumulating in registers over the depth, each panel vector loaded once per depth step
// and each A entry broadcast once (at RB = 6: 8 loads for 12 multiply-adds, so the multiply-adds set the pace).
constexpr int kRowBlock = 6;

template <int RB, typename T>
static inline void tile_block(const T* l, int64_t lda, const T* r, int64_t depth, int64_t cols, T* c, const T* start,
                              int64_t start_ld) {
  using V = Vec<T>;
  constexpr int W = kVecLanes<T>;
  V acc[RB][2];
  for (int rr = 0; rr < RB; ++rr) acc[rr][0] = acc[rr][1] = V{} + (start ? start[rr * start_ld] : T(0));
  for (int64_t k = 0; k < depth; ++k) {
    const V p0 = *reinterpret_cast<const V*>(r + k * cols), p1 = *reinterpret_cast<const V*>(r + k * cols + W);
    for (int rr = 0; rr < RB; ++rr) {
      const T lv = l[rr * lda + k];
      acc[rr][0] += lv * p0;
      acc[rr][1] += lv * p1;
    }
  }
  for (int rr = 0; rr < RB; ++rr) {
    *reinterpret_cast<V*>(c + rr * cols) = acc[rr][0];
    *reinterpret_cast<V*>(c + rr * cols + W) = acc[rr][1];
  }
}

// C (rows x cols) = S + A B for A (rows x depth, rows lda apart) and B row-major (depth x cols), rows even and cols a
// multiple of two vectors. S is zero, or constant along runs of `span` columns (a multiple of two vectors):
// S[x][c] = start[x start_ld + c / span].
template <typename T>
static void block_product(const T* a, int64_t lda, int64_t rows, int64_t depth, const T* b, int64_t cols, T* c,
                          const T* start = nullptr, int64_t start_ld = 0, int64_t span = 1) {
  constexpr int CB = 2 * kVecLanes<T>;
  for (int64_t c0 = 0; c0 < cols; c0 += CB) {
    const T* s0 = start ? start + c0 / span : nullptr;
    int64_t r0 = 0;
    for (; r0 + kRowBlock <= rows; r0 += kRowBlock)
      tile_block<kRowBlock>(a + r0 * lda, lda, b + c0, depth, cols, c + r0 * cols + c0,
                            s0 ? s0 + r0 * start_ld : nullptr, start_ld);
    for (; r0 < rows; r0 += 2)
      tile_block<2>(a + r0 * lda, lda, b + c0, depth, cols, c + r0 * cols + c0, s0 ? s0 + r0 * start_ld : nullptr,
                    start_ld);
  }
}

// A of a tile, real and imaginary parts apart: the product over the varying columns, started from the shared block
// (`start`, from product_start; empty when none is shared). The columns n TJ are a multiple of 16, kColAlign.
template <typename T>
static void tile_product(const T* l, const T* r, const Tiles& t, const Columns& cols, const std::vector<T>& start,
                         T* c) {
  block_product(l, 2 * t.m, 2 * kTileRows * t.n, 2 * cols.varying, r, t.ldc(), c,
                start.empty() ? nullptr : start.data(), t.n, t.cols);
}

// C (rows x k) = A B^T for A (rows x len) and B (k x len), both row-major: dot products along len (a multiple of one
// vector), XB rows of A against KB rows of B in registers, one horizontal sum per entry at the end.
template <int XB, int KB, typename T>
static inline void dot_block(const T* a, const T* b, int64_t len, int64_t ldc, T* c) {
  using V = Vec<T>;
  constexpr int VL = kVecLanes<T>;
  V acc[XB][KB];
  for (int x = 0; x < XB; ++x)
    for (int k = 0; k < KB; ++k) acc[x][k] = V{};
  for (int64_t e = 0; e < len; e += VL) {
    V bv[KB];
    for (int k = 0; k < KB; ++k) bv[k] = *reinterpret_cast<const V*>(b + k * len + e);
    for (int x = 0; x < XB; ++x) {
      const V av = *reinterpret_cast<const V*>(a + x * len + e);
      for (int k = 0; k < KB; ++k) acc[x][k] += av * bv[k];
    }
  }
  for (int x = 0; x < XB; ++x)
    for (int k = 0; k < KB; ++k) {
      T sum = 0;
      for (int l = 0; l < VL; ++l) sum += acc[x][k][l];
      c[x * ldc + k] = sum;
    }
}

// C (rows x k) = A B^T, rows a multiple of 4
template <typename T>
static void dot_product(const T* a, int64_t rows, int64_t len, const T* b, int64_t k, T* c) {
  for (int64_t x0 = 0; x0 < rows; x0 += 4) {
    int64_t k0 = 0;
    for (; k0 + 3 <= k; k0 += 3) dot_block<4, 3>(a + x0 * len, b + k0 * len, len, k, c + x0 * k + k0);
    for (; k0 < k; ++k0) dot_block<4, 1>(a + x0 * len, b + k0 * len, len, k, c + x0 * k + k0);
  }
}

// The sum of len entries (a multiple of one vector), in double
template <typename T>
static inline double row_sum(const T* x, int64_t len) {
  using V = Vec<T>;
  constexpr int VL = kVecLanes<T>;
  V acc = V{};
  for (int64_t e = 0; e < len; e += VL) acc += *reinterpret_cast<const V*>(x + e);
  double sum = 0;
  for (int l = 0; l < VL; ++l) sum += double(acc[l]);
  return sum;
}

// Where a walk reads A of its vector of pairs: entry (a, b) at re / im + a sa + b sb, the lanes contiguous.
template <typename W>
struct PairView {
  const W* re;
  const W* im;
  int64_t sa, sb;
};

// A of the vector of pairs at `src` in the product (real parts there, imaginary parts at src + imag; entry (a, b) at
// a ld + b cols): read in place when the walk's type is the product's, else converted into `scratch` (2 NR NR L).
template <int NR, int L, typename T, typename W>
static inline PairView<W> pairs_for_walk(const T* src, int64_t imag, int64_t ld, int64_t cols, W* scratch) {
  if constexpr (std::is_same<W, T>::value) {
    return {src, src + imag, ld, cols};
  } else {
    W* re = scratch;
    W* im = scratch + NR * NR * L;
    for (int a = 0; a < NR; ++a)
      for (int b = 0; b < NR; ++b)
        for (int l = 0; l < L; ++l) {
          re[(a * NR + b) * L + l] = W(src[a * ld + b * cols + l]);
          im[(a * NR + b) * L + l] = W(src[imag + a * ld + b * cols + l]);
        }
    return {re, im, NR * L, L};
  }
}

// Whether pair (i, j) is one of K's: inside the matrix and, when symmetric, on or above the diagonal.
static inline bool pair_counted(int64_t i, int64_t j, int64_t M, bool symmetric) {
  return j < M && !(symmetric && j < i);
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

// r_a = sum_b A_ab (the sign vector of all +1) of one vector of pairs, entry (a, b) of A at re / im + a sa + b sb
template <int NR, typename W>
static inline void full_row_sums(const W* re, const W* im, int64_t sa, int64_t sb, Vec<W> (&rr)[NR], Vec<W> (&ri)[NR]) {
  using V = Vec<W>;
  for (int a = 0; a < NR; ++a) {
    rr[a] = *reinterpret_cast<const V*>(re + a * sa);
    ri[a] = *reinterpret_cast<const V*>(im + a * sa);
    for (int b = 1; b < NR; ++b) {
      rr[a] += *reinterpret_cast<const V*>(re + a * sa + b * sb);
      ri[a] += *reinterpret_cast<const V*>(im + a * sa + b * sb);
    }
  }
}

// Perm(A) of one vector of pairs, given 2A: entry (a, b) of theirs at re / im + a sa + b sb (the lanes contiguous).
// The row sums live in registers (2 NR vectors); each step adds or subtracts the flipped column of 2A (no multiply:
// the adders, not the multiply-add units, take it) and multiplies the row sums in a chain.
template <int NR, typename W>
static inline void glynn_permanent(const W* re, const W* im, int64_t sa, int64_t sb, Vec<W>& pr, Vec<W>& pi) {
  using V = Vec<W>;
  auto entry = [sa, sb](const W* x, int a, int b) { return *reinterpret_cast<const V*>(x + a * sa + b * sb); };
  V rr[NR], ri[NR];
  full_row_sums<NR, W>(re, im, sa, sb, rr, ri);
  for (int a = 0; a < NR; ++a) {
    rr[a] *= W(0.5);
    ri[a] *= W(0.5);
  }
  auto product = [&rr, &ri](V& xr, V& xi) {
    xr = rr[0];
    xi = ri[0];
    for (int a = 1; a < NR; ++a) {
      const V tr = xr * rr[a] - xi * ri[a];
      xi = xr * ri[a] + xi * rr[a];
      xr = tr;
    }
  };
  V sr, si;
  product(sr, si);
  for (uint32_t step = 1; step < (1u << (NR - 1)); ++step) {
    const GrayStep g(step);
    if (g.twice > 0) {
      for (int a = 0; a < NR; ++a) {
        rr[a] += entry(re, a, g.col);
        ri[a] += entry(im, a, g.col);
      }
    } else {
      for (int a = 0; a < NR; ++a) {
        rr[a] -= entry(re, a, g.col);
        ri[a] -= entry(im, a, g.col);
      }
    }
    V xr, xi;
    product(xr, xi);
    if (g.sign > 0) {
      sr += xr;
      si += xi;
    } else {
      sr -= xr;
      si -= xi;
    }
  }
  const W scale = W(1) / W(1u << (NR - 1));  // a power of two: exact
  pr = sr * scale;
  pi = si * scale;
}

// The cofactors C[a][b] = d Perm(A) / d A[a][b] of one vector of pairs, entry (a, b) of A at re / im + a sa + b sb.
template <int NR, typename W>
static inline void glynn_cofactors(const W* re, const W* im, int64_t sa, int64_t sb, Vec<W> (&cr)[NR][NR],
                                   Vec<W> (&ci)[NR][NR]) {
  using V = Vec<W>;
  auto entry = [sa, sb](const W* x, int a, int b) { return *reinterpret_cast<const V*>(x + a * sa + b * sb); };
  V rr[NR], ri[NR];
  V dr[NR], di[NR];  // D_a: running sum of E_a over the sign vectors visited
  V run_r[NR][NR], run_i[NR][NR];  // sum of d_b E_a over the closed runs of column b
  // cr/ci[a][b] for b >= 1 hold, until the end, the D_a read at column b's last flip
  full_row_sums<NR, W>(re, im, sa, sb, rr, ri);
  for (int a = 0; a < NR; ++a) {
    dr[a] = di[a] = V{};
    for (int b = 0; b < NR; ++b) cr[a][b] = ci[a][b] = run_r[a][b] = run_i[a][b] = V{};
  }
  uint32_t gray = 0;
  for (uint32_t step = 0; step < (1u << (NR - 1)); ++step) {
    bool positive = true;  // prod_b d_b
    if (step > 0) {
      const GrayStep g(step);
      const int col = g.col;
      // column col closes a run: its sign before the flip was the opposite of the new one
      for (int a = 0; a < NR; ++a) {
        if (g.twice > 0) {
          run_r[a][col] -= dr[a] - cr[a][col];
          run_i[a][col] -= di[a] - ci[a][col];
        } else {
          run_r[a][col] += dr[a] - cr[a][col];
          run_i[a][col] += di[a] - ci[a][col];
        }
        cr[a][col] = dr[a];
        ci[a][col] = di[a];
      }
      const W twice = W(g.twice);
      for (int a = 0; a < NR; ++a) {
        rr[a] += twice * entry(re, a, col);
        ri[a] += twice * entry(im, a, col);
      }
      gray = step ^ (step >> 1);
      positive = g.sign > 0;
    }
    // E_a = prod_{a' != a} r_a': suffix products, then prefix products
    V sfr[NR + 1], sfi[NR + 1];
    sfr[NR] = V{} + W(1);
    sfi[NR] = V{};
    for (int a = NR - 1; a >= 1; --a) {
      sfr[a] = sfr[a + 1] * rr[a] - sfi[a + 1] * ri[a];
      sfi[a] = sfr[a + 1] * ri[a] + sfi[a + 1] * rr[a];
    }
    V pfr = V{} + W(1), pfi = V{};
    for (int a = 0; a < NR; ++a) {
      const V er = pfr * sfr[a + 1] - pfi * sfi[a + 1], ei = pfr * sfi[a + 1] + pfi * sfr[a + 1];
      if (positive) {
        dr[a] += er;
        di[a] += ei;
      } else {
        dr[a] -= er;
        di[a] -= ei;
      }
      const V tr = pfr * rr[a] - pfi * ri[a];
      pfi = pfr * ri[a] + pfi * rr[a];
      pfr = tr;
    }
  }
  // close the open runs (column b's sign now: bit b-1 of the last Gray code); column 0's sign is always +1
  const W scale = W(1) / W(1u << (NR - 1));
  for (int a = 0; a < NR; ++a) {
    cr[a][0] = dr[a] * scale;
    ci[a][0] = di[a] * scale;
    for (int b = 1; b < NR; ++b) {
      const W now = ((gray >> (b - 1)) & 1u) ? W(-1) : W(1);
      cr[a][b] = (run_r[a][b] + now * (dr[a] - cr[a][b])) * scale;
      ci[a][b] = (run_i[a][b] + now * (di[a] - ci[a][b])) * scale;
    }
  }
}

// The pairs of a tile's walk: row ii of the tile and columns jj..jj+lanes-1; whether any of them is to be computed.
static inline bool block_needed(int64_t i, int64_t j0, int64_t lanes, int64_t N, int64_t M, bool symmetric) {
  return i < N && j0 < M && !(symmetric && j0 + lanes <= i);
}

// K (N x M, in T). symmetric: Q is P and only the pairs j >= i are computed (the caller mirrors).
template <int NR, typename T>
static void forward_impl(const c10::complex<T>* p, const c10::complex<T>* q, int64_t N, int64_t M, int64_t m,
                         bool symmetric, T* out, qrkd::Interrupt& interrupt) {
  using W = Walk<NR, T>;
  constexpr int L = kVecLanes<W>;  // pairs per walk: one vector
  const Tiles t = tiles_for<T>(NR, m, M);
  const int64_t ld = t.ldc(), imag = kTileRows * NR * ld;
  const Columns cols = split_columns(p, q, N, M, NR, m);
  const std::vector<T> right = pack_right(q, M, t, cols), start = product_start(cols, NR, T(2));
  const int64_t row_tiles = (N + kTileRows - 1) / kTileRows, col_tiles = (M + t.cols - 1) / t.cols;
  const double pairs = double(N) * double(M) * (symmetric ? 0.5 : 1.0);
  const int threads = threads_for(pairs * (NR * NR * m + (1 << (NR - 1)) * NR));
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> left(static_cast<size_t>(t.l_size())), prod(static_cast<size_t>(t.c_size()));
    std::vector<W> converted(std::is_same<W, T>::value ? 0 : 2 * NR * NR * L);  // pairs_for_walk's scratch
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < row_tiles; ++s) {
      const int64_t i0 = s * kTileRows;
      pack_left(p, N, i0, t, cols, left.data(), T(2));  // the walk takes 2A
      for (int64_t ct = symmetric ? i0 / t.cols : 0; ct < col_tiles; ++ct) {
        if (interrupt.check(qrkd::thread_id() == 0)) break;
        tile_product(left.data(), right.data() + ct * t.r_size(), t, cols, start, prod.data());
        for (int64_t ii = 0; ii < kTileRows; ++ii) {
          const int64_t i = i0 + ii;
          for (int64_t jj = 0; jj < t.cols; jj += L) {
            const int64_t j0 = ct * t.cols + jj;
            if (!block_needed(i, j0, L, N, M, symmetric)) continue;
            const PairView<W> pairs =
                pairs_for_walk<NR, L>(prod.data() + ii * NR * ld + jj, imag, ld, t.cols, converted.data());
            Vec<W> pr, pi;
            glynn_permanent<NR, W>(pairs.re, pairs.im, pairs.sa, pairs.sb, pr, pi);
            const Vec<W> k = pr * pr + pi * pi;
            for (int l = 0; l < L; ++l)
              if (pair_counted(i, j0 + l, M, symmetric)) out[i * M + j0 + l] = T(k[l]);
          }
        }
      }
    }
  }
}

// Backward: for a real loss L = sum_ij G_ij K_ij and torch's convention for complex gradients
// (dL/dz = dL/dRe z + i dL/dIm z), with A = P_i Q_j^H and Y = 2 G_ij Perm(A) conj(C):
//   dL/dP_i += Y Q_j,   dL/dQ_j += Y^H P_i.
// symmetric: Q is P, only the pairs j >= i are visited, each weighing G_ij + G_ji (the diagonal G_ii), and both roles
// land in dL/dP. The P role of a row tile is summed by the thread that owns it; the Q role goes to a per-thread buffer
// (2m x n x M padded to whole column tiles, double: the layout of a tile's L^T Y, so that adding it is contiguous)
// summed at the end.
template <int NR, typename T>
static void backward_impl(const c10::complex<T>* p, const c10::complex<T>* q, const T* g, int64_t N, int64_t M,
                          int64_t m, bool symmetric, c10::complex<double>* grad_p, c10::complex<double>* grad_q,
                          qrkd::Interrupt& interrupt) {
  using W = Walk<NR, T>;
  using V = Vec<W>;
  constexpr int L = kVecLanes<W>;  // pairs per walk: one vector
  const Tiles t = tiles_for<T>(NR, m, M);
  const Columns cols = split_columns(p, q, N, M, NR, m);
  const std::vector<T> right = pack_right(q, M, t, cols), start = product_start(cols, NR, T(1));
  const SharedTables<T> shared = shared_tables(p, cols, NR);
  const int64_t vary = 2 * cols.varying;  // L's columns and R's rows of the varying columns: the first 2 varying
  const int64_t row_tiles = (N + kTileRows - 1) / kTileRows, col_tiles = (M + t.cols - 1) / t.cols;
  const int64_t width = 2 * m, half = kTileRows * NR, ld = t.ldc();
  const double pairs = double(N) * double(M) * (symmetric ? 0.5 : 1.0);
  const int threads = threads_for(pairs * (3 * NR * NR * m + (1 << (NR - 1)) * NR * 5));
  std::vector<std::vector<double>> q_role(static_cast<size_t>(threads));
  const int64_t padded = col_tiles * t.cols;  // the Q role's columns j
#pragma omp parallel num_threads(threads)
  {
    std::vector<double>& gq = q_role[static_cast<size_t>(qrkd::thread_id())];
    gq.assign(static_cast<size_t>(width * NR * padded), 0.0);
    std::vector<T> left(static_cast<size_t>(t.l_size())), prod(static_cast<size_t>(t.c_size()));
    std::vector<T> left_t(left.size()), w(static_cast<size_t>(2 * half * vary)), wq(static_cast<size_t>(ld * width));
    std::vector<T> y_over_i(static_cast<size_t>(2 * NR * ld));  // Y summed over the tile's i, rows (part, a)
    std::vector<double> gp(static_cast<size_t>(2 * half * width));
    std::vector<W> converted(std::is_same<W, T>::value ? 0 : 2 * NR * NR * L);  // pairs_for_walk's scratch
    V cr[NR][NR], ci[NR][NR];
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < row_tiles; ++s) {
      const int64_t i0 = s * kTileRows;
      pack_left(p, N, i0, t, cols, left.data());
      for (int64_t x = 0; x < 2 * half; ++x)
        for (int64_t k = 0; k < width; ++k) left_t[k * 2 * half + x] = left[x * width + k];
      std::fill(gp.begin(), gp.end(), 0.0);
      for (int64_t ct = symmetric ? i0 / t.cols : 0; ct < col_tiles; ++ct) {
        if (interrupt.check(qrkd::thread_id() == 0)) break;
        const T* r = right.data() + ct * t.r_size();
        tile_product(left.data(), r, t, cols, start, prod.data());
        // Y over the product, in place; zero where no pair is to be counted
        for (int64_t ii = 0; ii < kTileRows; ++ii) {
          const int64_t i = i0 + ii;
          for (int64_t jj = 0; jj < t.cols; jj += L) {
            const int64_t j0 = ct * t.cols + jj;
            T* yr = prod.data() + ii * NR * ld + jj;
            T* yi = yr + half * ld;
            if (!block_needed(i, j0, L, N, M, symmetric)) {
              for (int a = 0; a < NR; ++a)
                for (int b = 0; b < NR; ++b)
                  for (int l = 0; l < L; ++l) yr[a * ld + b * t.cols + l] = yi[a * ld + b * t.cols + l] = T(0);
              continue;
            }
            const PairView<W> pairs = pairs_for_walk<NR, L>(yr, half * ld, ld, t.cols, converted.data());
            glynn_cofactors<NR, W>(pairs.re, pairs.im, pairs.sa, pairs.sb, cr, ci);
            V sr = V{}, si = V{};  // Perm(A) by cofactor expansion along the first row
            for (int b = 0; b < NR; ++b) {
              const V a_r = *reinterpret_cast<const V*>(pairs.re + b * pairs.sb);
              const V a_i = *reinterpret_cast<const V*>(pairs.im + b * pairs.sb);
              sr += a_r * cr[0][b] - a_i * ci[0][b];
              si += a_r * ci[0][b] + a_i * cr[0][b];
            }
            V wr, wi;
            for (int l = 0; l < L; ++l) {  // padding, or the other triangle: exactly 0
              const int64_t j = j0 + l;
              const double weight = !pair_counted(i, j, M, symmetric) ? 0.0
                                    : symmetric && j != i         ? double(g[i * M + j]) + double(g[j * M + i])
                                                                  : double(g[i * M + j]);
              wr[l] = W(2.0 * weight * sr[l]);
              wi[l] = W(2.0 * weight * si[l]);
            }
            for (int a = 0; a < NR; ++a)
              for (int b = 0; b < NR; ++b) {
                const V y_re = wr * cr[a][b] + wi * ci[a][b], y_im = wi * cr[a][b] - wr * ci[a][b];
                T* dst_re = yr + a * ld + b * t.cols;
                T* dst_im = yi + a * ld + b * t.cols;
                if constexpr (std::is_same<W, T>::value) {
                  *reinterpret_cast<V*>(dst_re) = y_re;
                  *reinterpret_cast<V*>(dst_im) = y_im;
                } else {
                  for (int l = 0; l < L; ++l) {
                    dst_re[l] = T(y_re[l]);
                    dst_im[l] = T(y_im[l]);
                  }
                }
              }
          }
        }
        // P role: W = Y R^T (2 TI n x 2m); the shared columns from Y's sums over j
        dot_product(prod.data(), 2 * half, ld, r, vary, w.data());
        for (int64_t x = 0; x < 2 * half; ++x) {
          for (int64_t e = 0; e < vary; ++e) gp[x * width + e] += double(w[x * vary + e]);
          if (vary == width) continue;
          double y_over_j[NR];
          for (int b = 0; b < NR; ++b) y_over_j[b] = row_sum(prod.data() + x * ld + b * t.cols, t.cols);
          for (int64_t e = 0; e < width - vary; ++e) {
            double sum = 0;
            for (int b = 0; b < NR; ++b) sum += y_over_j[b] * shared.right[e * NR + b];
            gp[x * width + vary + e] += sum;
          }
        }
        // Q role: (Y^T L)^T = L^T Y (2m x n TJ); the shared columns from Y's sums over i
        block_product(left_t.data(), 2 * half, vary, 2 * half, prod.data(), ld, wq.data());
        if (vary < width) {
          std::fill(y_over_i.begin(), y_over_i.end(), T(0));
          for (int64_t part = 0; part < 2; ++part)
            for (int64_t ii = 0; ii < kTileRows; ++ii)
              for (int a = 0; a < NR; ++a) {
                const T* src = prod.data() + ((part * kTileRows + ii) * NR + a) * ld;
                T* dst = y_over_i.data() + (part * NR + a) * ld;
                for (int64_t c = 0; c < ld; ++c) dst[c] += src[c];
              }
          block_product(shared.left.data(), 2 * NR, width - vary, 2 * NR, y_over_i.data(), ld, wq.data() + vary * ld);
        }
        for (int64_t row = 0; row < width * NR; ++row) {  // row (k, b) of L^T Y; zero past M
          double* dst = gq.data() + row * padded + ct * t.cols;
          const T* src = wq.data() + row * t.cols;
          for (int64_t jj = 0; jj < t.cols; ++jj) dst[jj] += double(src[jj]);
        }
      }
      // dL/dP_i[a][k] = (Re Y Re Q - Im Y Im Q) + i (Re Y Im Q + Im Y Re Q), from W's four quarters
      for (int64_t ii = 0; ii < kTileRows && i0 + ii < N; ++ii)
        for (int a = 0; a < NR; ++a) {
          const double* top = gp.data() + (ii * NR + a) * width;
          const double* bottom = gp.data() + (half + ii * NR + a) * width;
          c10::complex<double>* dst = grad_p + ((i0 + ii) * NR + a) * m;
          for (int64_t pos = 0; pos < m; ++pos)
            dst[cols.order[pos]] = {top[cols.re(pos)] - bottom[cols.im(pos)], top[cols.im(pos)] + bottom[cols.re(pos)]};
        }
    }
  }
  // Q role: (Re, Im) pairs of every thread, added into dL/dQ (or dL/dP when symmetric)
  c10::complex<double>* dq = symmetric ? grad_p : grad_q;
  for (const std::vector<double>& part : q_role) {
    if (part.empty()) continue;
    for (int64_t pos = 0; pos < m; ++pos)
      for (int b = 0; b < NR; ++b) {
        const double* re = part.data() + (cols.re(pos) * NR + b) * padded;
        const double* im = part.data() + (cols.im(pos) * NR + b) * padded;
        for (int64_t j = 0; j < M; ++j) dq[(j * NR + b) * m + cols.order[pos]] += c10::complex<double>(re[j], im[j]);
      }
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
                            out.data_ptr<float>(), interrupt);
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
    backward_impl<NR, float>(p.data_ptr<c10::complex<float>>(), q.data_ptr<c10::complex<float>>(), g.data_ptr<float>(),
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
  at::Tensor out = at::empty({N, M}, P.options().dtype(c10::toRealValueType(p.scalar_type())));
  if (N > 0 && M > 0) {
    qrkd::Interrupt interrupt;
    QRKD_PHOTONIC_DISPATCH(n, forward_dispatch, p, q, symmetric, out, interrupt);
    interrupt.rethrow();
    if (symmetric) {
      if (out.scalar_type() == at::kFloat)
        qrkd::mirror_upper(out.data_ptr<float>(), N);
      else
        qrkd::mirror_upper(out.data_ptr<double>(), N);
    }
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
  const at::Tensor g = grad.to(c10::toRealValueType(p.scalar_type())).contiguous();  // K's dtype, as autograd hands it
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
