// RKD angle loss on the CPU (DESIGN.md 3.3), O(N^2) memory.
//
// 1. Squared distances q summed from differences in double whatever the features' type (exact duplicates give
//    exactly 0, close points stay accurate), and per pair 1/d (0 where d = 0; 1/max(d, 1e-12) otherwise, as the
//    reference's normalisation) and h = 1/(2q). float32 features keep q as two float32 tables, hi + lo: the
//    numerator q_ab + q_ac - q_bc cancels to ~d_ab d_ac when d_ab << d_ac (near-duplicate, collinear and
//    one-dimensional points), which q rounded to float32 cannot resolve (see cosine_numerator). Only the few
//    triplets with a point near the anchor need it (see kNearRatio); all others use hi alone.
// 2. One pass over the triplets (a, b, c) with c >= b (angle(a,b,c) = angle(a,c,b): weight 2 off the b == c
//    diagonal), in tiles of anchors x rows b x columns c, vectorised over c; arithmetic in the features' type, the
//    float32 partial sums of each tile added into float64. The angle is A = (q_ab + q_ac - q_bc) r with
//    r = 1/(2 d_ab d_ac); the same pass accumulates P = dL/dq over unordered pairs: with g = clamp(A_s - A_t, -1, 1),
//    dA/dq_ab = r - A h_ab, dA/dq_ac = r - A h_ac, dA/dq_bc = -r.
// 3. dx_u = 2 sum_v H_uv (x_u - x_v), H = P + P^T, as a GEMM on the centred features.
// A triplet whose student d_ab or d_ac is 0 has r = 0: its student angle is 0 and it sends no gradient.
// Steps 1 and 2 poll for Ctrl-C between rows and tiles (interrupt.h); features with a NaN or inf give NaN at once.
#include "common.h"
#include "interrupt.h"

#include <cstdlib>
#include <type_traits>
#include <vector>

namespace qrkd {
namespace {

// q_ij = |x_i - x_j|^2 from differences, in double, vectorised over j on the transposed features.
template <typename T>
void squared_distances_exact(const T* x, int64_t n, int64_t d, double* q, Interrupt& interrupt) {
  std::vector<double> xt(size_t(n) * size_t(d));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) xt[size_t(k) * n + i] = x[i * d + k];
  constexpr int64_t kBlock = 512;
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads()) if (worth_parallel(n * n * d / 2))
  for (int64_t i = 0; i < n; ++i) {
    if (interrupt.check(thread_id() == 0)) continue;
    double* qi = q + i * n;
    qi[i] = 0.0;
    const double* xi = xt.data() + i;  // x_ik = xi[k * n]
    for (int64_t j0 = i + 1; j0 < n; j0 += kBlock) {
      const int64_t j1 = std::min(n, j0 + kBlock);
      for (int64_t j = j0; j < j1; ++j) qi[j] = 0.0;
      for (int64_t k = 0; k < d; ++k) {
        const double xik = xi[size_t(k) * n];
        const double* col = xt.data() + size_t(k) * n;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          const double diff = col[j] - xik;
          qi[j] += diff * diff;
        }
      }
    }
  }
  mirror_upper(q, n);
}

// What the triplet pass reads per pair (u, v), each an n x n row-major table: the squared distances q (float32 input:
// q = hi + lo, both float32, so that the law-of-cosines numerator keeps the digits that float64 q has), 1/d (0 where
// d = 0; 1/max(d, 1e-12) otherwise, as the reference's normalisation) and, for the gradient, h = 1/(2q).
template <typename T>
struct PairTables {
  const T* qs = nullptr;
  const T* qs_lo = nullptr;  // float32 only
  const T* qt = nullptr;
  const T* qt_lo = nullptr;
  const T* is = nullptr;
  const T* it = nullptr;
  const T* hs = nullptr;  // gradient only
};

template <typename T>
void pair_tables(const double* q, int64_t count, T* inv_d, T* half_inv_q, T* hi, T* lo) {
  const T eps = T(kEps);
#pragma omp parallel for simd schedule(static) num_threads(num_threads()) if (worth_parallel(count))
  for (int64_t i = 0; i < count; ++i) {
    const T d = T(std::sqrt(q[i]));
    const T inv = d > T(0) ? T(1) / std::max(d, eps) : T(0);
    inv_d[i] = inv;
    if (half_inv_q) half_inv_q[i] = d >= eps ? T(0.5) * inv * inv : T(0);
    if (hi) {
      const T h = T(q[i]);
      hi[i] = h;
      lo[i] = T(q[i] - double(h));
    }
  }
}

// q_ab + q_ac - q_bc, the law of cosines' numerator 2 d_ab d_ac cos, with q = hi + lo. It cancels when one of d_ab,
// d_ac is much smaller than the other: then the larger of q_ab, q_ac and q_bc agree to within a factor 2 and their
// difference is exact in floating point (Sterbenz), so it is taken first; the low parts add the digits float32 q lacks.
template <typename T>
inline T cosine_numerator(T q_ab, T lo_ab, T q_ac, T lo_ac, T q_bc, T lo_bc) {
  const bool ab_far = q_ab > q_ac;
  const T far = ab_far ? q_ab : q_ac, near = ab_far ? q_ac : q_ab;
  return ((far - q_bc) + near) + ((lo_ab + lo_ac) - lo_bc);
}

// a * b + c, fused for float32 where the target has FMA (without it std::fma would be a library call in the inner
// loops); float64 keeps two roundings, as the float64 parity tests were set with (one-dimensional features, where
// every gradient term cancels to rounding)
template <typename T>
inline T mul_add(T a, T b, T c) {
#ifdef __FMA__
  if constexpr (std::is_same<T, float>::value) return std::fma(a, b, c);
#endif
  return a * b + c;
}

// For the vectorised loops: smooth_l1(u) = m (|u| - m / 2) with m = min(|u|, 1), both branches in one expression,
// and its derivative
template <typename T>
inline T smooth_l1_branchless(T u) {
  const T au = std::abs(u), m = au < T(1) ? au : T(1);
  return m * mul_add(T(-0.5), m, au);
}

template <typename T>
inline T clamp_unit(T u) {  // clamp(u, -1, 1) as the sign of u on min(|u|, 1): a clamp by comparisons is not vectorised
  const T au = std::abs(u);
  return std::copysign(au < T(1) ? au : T(1), u);
}

// columns per band so that the private gradient buffers (threads x N x band, float64) stay within a fixed budget;
// QRKD_CPP_ANGLE_BAND=k forces k columns (the tests use it to cover the multi-band path at small N)
inline int64_t band_width(int64_t n, int threads) {
  if (const char* forced = std::getenv("QRKD_CPP_ANGLE_BAND")) {
    const long long k = std::atoll(forced);
    if (k > 0) return std::min<int64_t>(n, k);
  }
  const size_t budget = size_t(96) << 20;
  int64_t w = int64_t(budget / (size_t(threads) * size_t(n) * sizeof(double)));
  w = std::max<int64_t>(64, w - w % 16);
  return std::min(n, w);
}

// Tiles of the triplet pass: kAnchors anchors share each row b they load; their rows of a chunk of kColumns columns c
// stay in cache while every row b streams past; the float32 sums of a tile go to float64 after kRows rows b.
constexpr int64_t kAnchors = 8;
constexpr int64_t kColumns = 128;
constexpr int64_t kRows = 64;

// float32: a point c is near the anchor a when 0 < d_ac < d_max(a) / 8 on the student or the teacher side. Triplets
// whose b and c are both far (or coincide with a) have d_ab / d_ac within [1/8, 8] (or a zero r): their numerator
// from float32 q alone is off by at most ~10 float32 ulps of the angle. The few triplets with a near point take the
// hi + lo numerator, in rows of their own. (Exact duplicates of a need no care: their r is 0.)
constexpr double kNearRatio = 1.0 / 8.0;

// Loss sum over the triplets (a, b, c), a in [a0, a1), c >= b (the c == b diagonal at half weight); with kGrad,
// dL/dq over unordered pairs added into P (n x n float64: where P_uv or P_vu holds a term does not matter, H = P + P^T).
// Parallel over blocks of anchors: the terms outside the anchors' own rows go to thread-private float64 buffers over a
// band of columns, summed into P after the band; a single thread adds them into P directly.
template <typename T, bool kSplit, bool kGrad>
double triplet_pass(int64_t n, int64_t a0, int64_t a1, const PairTables<T>& tab, double* P, Interrupt& interrupt) {
  const int threads = num_threads();
  const bool parallel = threads > 1 && worth_parallel((a1 - a0) * n * n);
  const int64_t W = band_width(n, parallel ? threads : 1);
  at::Tensor priv_t;
  if (kGrad && parallel) priv_t = at::empty({int64_t(threads) * n * W}, at::kDouble);
  double* priv = kGrad && parallel ? priv_t.data_ptr<double>() : nullptr;
  const int64_t blocks = (a1 - a0 + kAnchors - 1) / kAnchors;
  const T near_q = T(kNearRatio * kNearRatio);
  double loss = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : loss) if (parallel)
  {
    const int tid = thread_id();
    const int team = team_size();  // 1 when the region runs serially: the other rows' terms then go straight into P
    double* mine = kGrad && team > 1 ? priv + size_t(tid) * n * W : nullptr;
    alignas(64) T acc[kAnchors][kColumns];  // P_ac of the tile's anchors over a chunk, float32 between flushes
    alignas(64) T pbc[kColumns];            // P_bc of one row b over a chunk, summed over the tile's anchors
    // per anchor of the block: 1/d rows with the near columns zeroed (their triplets then vanish from the main loop),
    // near flags, and the near points
    std::vector<T> is_far(size_t(kAnchors) * n), it_far(size_t(kAnchors) * n);
    std::vector<char> is_near(kSplit ? size_t(kAnchors) * n : 0);
    std::vector<int64_t> near_points[kAnchors];
    for (int64_t c0 = 0; c0 < n; c0 += W) {
      const int64_t c1 = std::min(n, c0 + W);
      // once interrupted, the remaining bands only pass their barriers (every thread meets the same constructs)
      if (mine && !interrupt.stopped()) std::fill(mine, mine + n * W, 0.0);
      double* pbc_rows = mine ? mine - c0 : P;  // the term of pair (u, v), v in the band: pbc_rows[u * stride + v]
      const int64_t stride = mine ? W : n;
#pragma omp for schedule(dynamic, 1)
      for (int64_t block = 0; block < blocks; ++block) {
        if (interrupt.check(tid == 0)) continue;
        const int64_t ab = a0 + block * kAnchors, ae = std::min(a1, ab + kAnchors);
        for (int64_t a = ab; a < ae; ++a) {
          const int64_t i = a - ab;
          const T* isa = tab.is + a * n;
          const T* ita = tab.it + a * n;
          T* fs = is_far.data() + i * n;
          T* ft = it_far.data() + i * n;
          if (!kSplit) {
            std::copy(isa, isa + n, fs);
            std::copy(ita, ita + n, ft);
            continue;
          }
          const T* qsa = tab.qs + a * n;
          const T* qta = tab.qt + a * n;
          T qs_max = 0, qt_max = 0;
          for (int64_t c = 0; c < n; ++c) {
            qs_max = std::max(qs_max, qsa[c]);
            qt_max = std::max(qt_max, qta[c]);
          }
          const T qs_near = near_q * qs_max, qt_near = near_q * qt_max;
          char* near = is_near.data() + i * n;
          near_points[i].clear();
          for (int64_t c = 0; c < n; ++c) {
            const bool is_near_c = (qsa[c] > T(0) && qsa[c] < qs_near) || (qta[c] > T(0) && qta[c] < qt_near);
            near[c] = is_near_c;
            fs[c] = is_near_c ? T(0) : isa[c];
            ft[c] = is_near_c ? T(0) : ita[c];
            if (is_near_c) near_points[i].push_back(c);
          }
        }
        // triplets with b and c far from a (or coinciding with it), c >= b, in tiles
        for (int64_t k0 = c0; k0 < c1; k0 += kColumns) {
          const int64_t k1 = std::min(c1, k0 + kColumns);
          for (int64_t b0 = 0; b0 < k1; b0 += kRows) {
            const int64_t b1 = std::min(k1, b0 + kRows);
            if (kGrad)
              for (int64_t a = ab; a < ae; ++a) std::fill(acc[a - ab], acc[a - ab] + (k1 - k0), T(0));
            for (int64_t b = b0; b < b1; ++b) {
              const int64_t cs = std::max(b + 1, k0);
              T* pb = pbc - k0;  // indexed by c
              if (kGrad) std::fill(pb + cs, pb + k1, T(0));
              const T* qsb = tab.qs + b * n;
              const T* qtb = tab.qt + b * n;
              for (int64_t a = ab; a < ae; ++a) {
                const int64_t i = a - ab;
                // d_aa = 0 on both sides: every triplet with b == a is 0 - 0; near rows b come later
                if (a == b || (kSplit && is_near[i * n + b])) continue;
                const T* qsa = tab.qs + a * n;
                const T* qta = tab.qt + a * n;
                const T* isa = is_far.data() + i * n;
                const T* ita = it_far.data() + i * n;
                const T* hsa = kGrad ? tab.hs + a * n : nullptr;
                T* acc_a = acc[i] - k0;  // indexed by c
                const T qs_ab = qsa[b], qt_ab = qta[b];
                const T rs_b = T(0.5) * isa[b], rt_b = T(0.5) * ita[b];
                T lsum = 0, s1 = 0, s2 = 0;
                if (b >= k0) {  // c == b: half the weight of the c > b triplets (everything is doubled at the end)
                  const T r = rs_b * isa[b], rt = rt_b * ita[b];
                  const T as = T(2) * qs_ab * r, at_ = T(2) * qt_ab * rt;
                  const T u = as - at_;
                  lsum += T(0.5) * smooth_l1(u);
                  if (kGrad) {
                    const T g = smooth_l1_grad(u);
                    const T gr = T(0.5) * g * r, ga = T(0.5) * g * as;
                    s1 += gr;
                    s2 += ga;
                    acc_a[b] += gr - ga * hsa[b];
                  }
                }
                if (kGrad) {
#pragma omp simd reduction(+ : lsum, s1, s2)
                  for (int64_t c = cs; c < k1; ++c) {
                    const T r = rs_b * isa[c];
                    const T as = ((qs_ab + qsa[c]) - qsb[c]) * r;
                    const T u = mul_add(-((qt_ab + qta[c]) - qtb[c]), rt_b * ita[c], as);
                    lsum += smooth_l1_branchless(u);
                    const T g = clamp_unit(u);
                    const T gr = g * r;
                    s1 += gr;
                    s2 += g * as;
                    acc_a[c] = mul_add(g, mul_add(-as, hsa[c], r), acc_a[c]);  // += g (r - A h_ac)
                    pb[c] -= gr;
                  }
                  P[a * n + b] += double(s1) - double(hsa[b]) * double(s2);
                } else {
#pragma omp simd reduction(+ : lsum)
                  for (int64_t c = cs; c < k1; ++c) {
                    const T as = ((qs_ab + qsa[c]) - qsb[c]) * (rs_b * isa[c]);
                    lsum += smooth_l1_branchless(mul_add(-((qt_ab + qta[c]) - qtb[c]), rt_b * ita[c], as));
                  }
                }
                loss += double(lsum);
              }
              if (kGrad) {
                double* dst = pbc_rows + b * stride;
                for (int64_t c = cs; c < k1; ++c) dst[c] += double(pb[c]);
              }
            }
            if (kGrad)
              for (int64_t a = ab; a < ae; ++a) {
                double* Pa = P + a * n;
                const T* src = acc[a - ab] - k0;
                for (int64_t c = k0; c < k1; ++c) Pa[c] += double(src[c]);
              }
          }
        }
        if (!kSplit) continue;
        // triplets (a, m, c) with m near a, c in the band: c far (any side of m; far rows skip m as a column), c near
        // and c > m, or c == m at half weight; hi + lo numerators, sums in float64 per row
        for (int64_t a = ab; a < ae; ++a) {
          const int64_t i = a - ab;
          const T* qsa = tab.qs + a * n;
          const T* qta = tab.qt + a * n;
          const T* lsa = tab.qs_lo + a * n;
          const T* lta = tab.qt_lo + a * n;
          const T* hsa = kGrad ? tab.hs + a * n : nullptr;
          double* Pa = P + a * n;
          for (const int64_t m : near_points[i]) {
            const T* qsm = tab.qs + m * n;
            const T* qtm = tab.qt + m * n;
            const T* lsm = tab.qs_lo + m * n;
            const T* ltm = tab.qt_lo + m * n;
            double* pm = pbc_rows + m * stride;
            const T qs_am = qsa[m], qt_am = qta[m], ls_am = lsa[m], lt_am = lta[m];
            const T rs_m = T(0.5) * tab.is[a * n + m], rt_m = T(0.5) * tab.it[a * n + m];
            double row_s1 = 0.0, row_s2 = 0.0;
            if (m >= c0 && m < c1) {
              const T r = rs_m * tab.is[a * n + m], rt = rt_m * tab.it[a * n + m];
              const T as = T(2) * (qs_am + ls_am) * r, at_ = T(2) * (qt_am + lt_am) * rt;
              const T u = as - at_;
              loss += double(T(0.5) * smooth_l1(u));
              if (kGrad) {
                const T g = smooth_l1_grad(u);
                const T gr = T(0.5) * g * r, ga = T(0.5) * g * as;
                row_s1 += double(gr);
                row_s2 += double(ga);
                Pa[m] += double(gr - ga * hsa[m]);
              }
            }
            // columns below m: far ones only (zeroed 1/d rows); above m: all
            for (int part = 0; part < 2; ++part) {
              const int64_t lo = part == 0 ? c0 : std::max(c0, m + 1), hi = part == 0 ? std::min(c1, m) : c1;
              const T* isa = part == 0 ? is_far.data() + i * n : tab.is + a * n;
              const T* ita = part == 0 ? it_far.data() + i * n : tab.it + a * n;
              T lsum = 0, s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : lsum, s1, s2)
              for (int64_t c = lo; c < hi; ++c) {
                const T r = rs_m * isa[c];
                const T as = cosine_numerator(qs_am, ls_am, qsa[c], lsa[c], qsm[c], lsm[c]) * r;
                const T u = as - cosine_numerator(qt_am, lt_am, qta[c], lta[c], qtm[c], ltm[c]) * (rt_m * ita[c]);
                lsum += smooth_l1_branchless(u);
                if (kGrad) {
                  const T g = clamp_unit(u);
                  const T gr = g * r, ga = g * as;
                  s1 += gr;
                  s2 += ga;
                  Pa[c] += double(gr - ga * hsa[c]);
                  pm[c] -= double(gr);
                }
              }
              loss += double(lsum);
              row_s1 += double(s1);
              row_s2 += double(s2);
            }
            if (kGrad) Pa[m] += row_s1 - double(hsa[m]) * row_s2;
          }
        }
      }  // implicit barrier: every thread's private band is complete
      if (mine) {
#pragma omp for schedule(dynamic, 16)
        for (int64_t b = 0; b < n; ++b) {
          if (interrupt.stopped()) continue;
          double* Pb = P + b * n;
          for (int tt = 0; tt < team; ++tt) {
            const double* src = priv + (size_t(tt) * n + b) * W - c0;
            for (int64_t c = c0; c < c1; ++c) Pb[c] += src[c];
          }
        }
      }  // implicit barrier before the buffers are cleared for the next band
    }
  }
  return loss;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> angle_impl(const at::Tensor& s, const at::Tensor& t, int64_t a0, int64_t a1,
                                              bool with_grad) {
  constexpr bool kSplit = std::is_same<T, float>::value;
  const int64_t n = s.size(0);
  const auto opts = s.options();
  Interrupt interrupt;
  at::Tensor qs = at::empty({n, n}, opts.dtype(at::kDouble)), qt = at::empty({n, n}, opts.dtype(at::kDouble));
  squared_distances_exact(s.data_ptr<T>(), n, s.size(1), qs.data_ptr<double>(), interrupt);
  squared_distances_exact(t.data_ptr<T>(), n, t.size(1), qt.data_ptr<double>(), interrupt);
  interrupt.rethrow();
  // float32: the tables hold q as hi + lo in a (4, n, n) tensor; float64 reads q itself
  at::Tensor split = kSplit ? at::empty({4, n, n}, opts) : at::Tensor();
  at::Tensor inv = at::empty({with_grad ? 3 : 2, n, n}, opts);
  PairTables<T> tab;
  T* pinv = inv.data_ptr<T>();
  T* psplit = kSplit ? split.data_ptr<T>() : nullptr;
  const int64_t nn = n * n;
  pair_tables(qs.data_ptr<double>(), nn, pinv, with_grad ? pinv + 2 * nn : nullptr, psplit,
              kSplit ? psplit + nn : nullptr);
  pair_tables<T>(qt.data_ptr<double>(), nn, pinv + nn, nullptr, kSplit ? psplit + 2 * nn : nullptr,
                 kSplit ? psplit + 3 * nn : nullptr);
  tab.is = pinv;
  tab.it = pinv + nn;
  tab.hs = with_grad ? pinv + 2 * nn : nullptr;
  if constexpr (kSplit) {
    tab.qs = psplit;
    tab.qs_lo = psplit + nn;
    tab.qt = psplit + 2 * nn;
    tab.qt_lo = psplit + 3 * nn;
    qs.reset();
    qt.reset();
  } else {
    tab.qs = qs.data_ptr<double>();
    tab.qt = qt.data_ptr<double>();
  }

  const double scale = 2.0 / (double(n) * double(n) * double(n));  // weight 2 of the c > b half, mean over N^3
  if (!with_grad) {
    const double loss = triplet_pass<T, kSplit, false>(n, a0, a1, tab, nullptr, interrupt);
    interrupt.rethrow();
    return {at::full({}, loss * scale, opts), at::empty({0}, opts)};
  }
  at::Tensor P = at::zeros({n, n}, opts.dtype(at::kDouble));
  double* dl_dq = P.data_ptr<double>();
  const double loss = triplet_pass<T, kSplit, true>(n, a0, a1, tab, dl_dq, interrupt);
  interrupt.rethrow();
  qs.reset(); qt.reset(); split.reset(); inv.reset();
  // H = P + P^T in place (zero diagonal: x_u - x_u = 0)
  symmetrise_sum(dl_dq, n);
  for (int64_t i = 0; i < n; ++i) dl_dq[i * n + i] = 0.0;
  at::Tensor x = s.to(at::kDouble);
  x = x - x.mean(0, true);
  at::Tensor grad = weighted_differences<double>(P, x).mul_(2.0 * scale).to(s.scalar_type());
  return {at::full({}, loss * scale, opts), grad};
}

std::tuple<at::Tensor, at::Tensor> rkd_angle_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                 int64_t anchor_start, int64_t anchor_stop, bool with_grad) {
  at::Tensor s = check_features(student, "student");
  at::Tensor t = check_features(teacher, "teacher");
  check_pair(s, t);
  const int64_t n = s.size(0);
  TORCH_CHECK(0 <= anchor_start && anchor_start <= anchor_stop && anchor_stop <= n,
              "qrkd cpp kernels: anchors must satisfy 0 <= start <= stop <= N=", n, ", got (", anchor_start, ", ",
              anchor_stop, ")");
  if (!all_finite(s) || !all_finite(t)) return non_finite_loss(s, with_grad);
  at::NoGradGuard no_grad;
  if (s.scalar_type() == at::kDouble) return angle_impl<double>(s, t, anchor_start, anchor_stop, with_grad);
  if (s.size(1) == 1) {
    // one-dimensional students: every angle is +-1 and the true gradient vanishes by cancellation between the
    // pairs of each triplet, which float32 cosines (~10 ulps) leave at ~1e-5 of the gradient's scale; in float64
    // the cancellation holds to the accuracy of the other inputs
    auto [loss, grad] = angle_impl<double>(s.to(at::kDouble), t.to(at::kDouble), anchor_start, anchor_stop, with_grad);
    return {loss.to(s.scalar_type()), grad.to(s.scalar_type())};
  }
  return angle_impl<float>(s, t, anchor_start, anchor_stop, with_grad);
}

}  // namespace
}  // namespace qrkd

TORCH_LIBRARY_IMPL(qrkd, CPU, m) {
  m.impl("rkd_angle", &qrkd::rkd_angle_cpu);
}
