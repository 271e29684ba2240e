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
#ifdef __AVX__
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

namespace qrkd {
namespace {

// q_ij = |x_i - x_j|^2 from differences, in double, vectorised over j on the transposed features: each block of
// columns j sums its k terms in registers (k in order, as a scalar loop would)
template <typename T>
void squared_distances_exact(const T* x, int64_t n, int64_t d, double* q, Interrupt& interrupt) {
  using V = Vec<double>;
  constexpr int64_t L = kVecLanes<double>, kBlock = 4 * L;
  std::vector<double> xt(size_t(n) * size_t(d));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) xt[size_t(k) * n + i] = x[i * d + k];
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads()) if (worth_parallel(n * n * d / 2))
  for (int64_t i = 0; i < n; ++i) {
    if (interrupt.check(thread_id() == 0)) continue;
    double* qi = q + i * n;
    qi[i] = 0.0;
    const double* xi = xt.data() + i;  // x_ik = xi[k * n]
    auto block = [&](int64_t j0) {  // columns [j0, j0 + kBlock)
      V s0{}, s1{}, s2{}, s3{};
      for (int64_t k = 0; k < d; ++k) {
        const V xik = V{} + xi[size_t(k) * n];
        const double* col = xt.data() + size_t(k) * n + j0;
        const V d0 = load(col) - xik, d1 = load(col + L) - xik, d2 = load(col + 2 * L) - xik,
                d3 = load(col + 3 * L) - xik;
        s0 += d0 * d0;
        s1 += d1 * d1;
        s2 += d2 * d2;
        s3 += d3 * d3;
      }
      store(qi + j0, s0);
      store(qi + j0 + L, s1);
      store(qi + j0 + 2 * L, s2);
      store(qi + j0 + 3 * L, s3);
    };
    int64_t j0 = i + 1;
    for (; j0 + kBlock <= n; j0 += kBlock) block(j0);
    if (j0 < n && n >= kBlock) {
      block(n - kBlock);  // the last columns: it may reach the diagonal (exactly 0) and below (rewritten by the mirror)
    } else {
      for (int64_t j = j0; j < n; ++j) {
        double sum = 0.0;
        for (int64_t k = 0; k < d; ++k) {
          const double diff = xt[size_t(k) * n + j] - xi[size_t(k) * n];
          sum += diff * diff;
        }
        qi[j] = sum;
      }
    }
  }
  mirror_upper(q, n);
}

// What the triplet pass reads per pair (u, v), each an n x ld row-major table (ld >= n, see angle_impl; the columns
// past n zero): the squared distances q (float32 input: q = hi + lo, both float32, so that the law-of-cosines
// numerator keeps the digits that float64 q has), 1/d (0 where d = 0; 1/max(d, 1e-12) otherwise, as the reference's
// normalisation) and, for the gradient, h = 1/(2q).
template <typename T>
struct PairTables {
  int64_t ld = 0;
  const T* qs = nullptr;
  const T* qs_lo = nullptr;  // float32 only
  const T* qt = nullptr;
  const T* qt_lo = nullptr;
  const T* is = nullptr;
  const T* it = nullptr;
  const T* hs = nullptr;  // gradient only
};

// From q (n x n, double) into the n x ld tables: 1/d, h = 1/(2q) when half_inv_q is given, q itself (float32: hi
// and, when lo is given, the remainder lo); a loop per table, each vectorised (the sqrt too, under -fno-math-errno)
template <typename T>
void pair_tables(const double* q, int64_t n, int64_t ld, T* inv_d, T* half_inv_q, T* hi, T* lo) {
  const T eps = T(kEps);
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (worth_parallel(n * n))
  for (int64_t i = 0; i < n; ++i) {
    const double* qi = q + i * n;
    T* inv = inv_d + i * ld;
    T* h = half_inv_q ? half_inv_q + i * ld : nullptr;
    T* root = h ? h : inv;  // d, overwritten in place below
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) root[j] = T(std::sqrt(qi[j]));
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {  // the division unconditional: GCC does not vectorise one under a condition
      const T r = T(1) / std::max(root[j], eps);
      inv[j] = root[j] > T(0) ? r : T(0);
    }
    if (h) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) h[j] = h[j] >= eps ? T(0.5) * inv[j] * inv[j] : T(0);
    }
    T* high = hi + i * ld;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) high[j] = T(qi[j]);
    if (lo) {
      T* low = lo + i * ld;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) low[j] = T(qi[j] - double(high[j]));
    }
    for (int64_t j = n; j < ld; ++j) {
      inv[j] = high[j] = T(0);
      if (h) h[j] = T(0);
      if (lo) lo[i * ld + j] = T(0);
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

// a * b + c: std::fma for float32 where the target has FMA (without it std::fma would be a library call in the inner
// loops); for float64 the plain expression, which GCC's default -ffp-contract=fast fuses as well on an FMA target
// (GCC 12, -O3 -march=native: one vfmadd), so two roundings only without FMA
template <typename T>
inline T mul_add(T a, T b, T c) {
#ifdef __FMA__
  if constexpr (std::is_same<T, float>::value) return std::fma(a, b, c);
#endif
  return a * b + c;
}

// For the near points' vectorised loop: smooth_l1(u) = m (|u| - m / 2) with m = min(|u|, 1), both branches in one
// expression, and its derivative
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

// Tiles of the triplet pass. kAnchors anchors share each row b they load, over a chunk of kColumns columns c, kRows
// rows b at a time; dL/dq_ac's float32 sums go to float64 after those rows, a segment's loss and dL/dq_ab sums (at most
// kColumns / 8 terms a lane) after the segment. The kGroupBlocks anchor blocks of a group
// take the same kRows rows b in turn, so that those rows come from L2 (a chunk's rows over all b are 8 MiB at N = 2048
// and kColumns = 512; read from L3 per anchor block, they set the pace of the pass). Each segment (anchor, row b) has a
// fixed cost (broadcasts, its sums widened to float64, a masked first vector on the diagonal), so long chunks pay:
// against 128 columns (the anchors' rows then in L1), 512 took N = 2048 (Ds = 4, Dt = 31, two threads, in turns) from
// 1.28 s to 0.96-1.04 s forward and from 2.0-2.13 s to 1.70-1.93 s forward+backward; 1024 read the same as 512.
constexpr int64_t kAnchors = 8;
constexpr int64_t kColumns = 512;
constexpr int64_t kRows = 64;
constexpr int64_t kGroupBlocks = 8;

// float32: a point c is near the anchor a when 0 < d_ac < d_max(a) / 8 on the student or the teacher side. Triplets
// whose b and c are both far (or coincide with a) have d_ab / d_ac within [1/8, 8] (or a zero r): their numerator
// from float32 q alone is off by at most ~10 float32 ulps of the angle. The few triplets with a near point take the
// hi + lo numerator, in rows of their own. (Exact duplicates of a need no care: their r is 0.)
constexpr double kNearRatio = 1.0 / 8.0;

// clamp(u, -1, 1) in two instructions where AVX has them (vminps / vmaxps; a comparison and a blend each otherwise)
template <typename T>
inline Vec<T> clamp_lanes(Vec<T> u) {
  const Vec<T> one = Vec<T>{} + T(1);
#ifdef __AVX__
  if constexpr (std::is_same<T, float>::value)
    return (Vec<T>)_mm256_max_ps(_mm256_min_ps((__m256)u, (__m256)one), (__m256)-one);
  else
    return (Vec<T>)_mm256_max_pd(_mm256_min_pd((__m256d)u, (__m256d)one), (__m256d)-one);
#else
  const Vec<T> upper = u < one ? u : one;
  return upper > -one ? upper : -one;
#endif
}

// the float64 lanes of a vector's sum: float32 lanes are added in pairs after their conversion
inline Vec<double> widen(Vec<float> v) {
#ifdef __AVX__
  const __m256 x = (__m256)v;
  return (Vec<double>)_mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)),
                                    _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
#else
  return Vec<double>{double(v[0]) + double(v[4]), double(v[1]) + double(v[5]), double(v[2]) + double(v[6]),
                     double(v[3]) + double(v[7])};
#endif
}

inline Vec<double> widen(Vec<double> v) {
  return v;
}

inline double lane_sum(Vec<double> v) {
  return (v[0] + v[1]) + (v[2] + v[3]);
}

// What one segment of the far triplets (anchor a, row b, columns c) reads: the anchor's rows (1/d with the near
// columns zeroed), row b, and the pair (a, b)'s scalars broadcast
template <typename T>
struct Segment {
  const T *qsa, *qta, *isa, *ita, *hsa, *qsb, *qtb;
  Vec<T> qs_ab, qt_ab, rs_b, rt_b;
};

// The triplets (a, b, c) of the column vector at c: their loss terms into lsum; with kGrad, the two parts of their
// dL/dq_ab, g r and g A, into s1 and s2 (dL/dq_ab = s1 - h_ab s2, formed in float64), their dL/dq_ac into acc[c] and
// minus their dL/dq_bc into pb[c]. With kMasked, w weighs the lanes (0 off the segment, 1/2 on the c == b diagonal,
// whose triplet is the same formula: q_bb = 0).
template <typename T, bool kGrad, bool kMasked>
inline void triplet_vector(const Segment<T>& s, int64_t c, Vec<T> w, T* acc, T* pb, Vec<T>& lsum, Vec<T>& s1,
                           Vec<T>& s2) {
  using V = Vec<T>;
  const V r = s.rs_b * load(s.isa + c);
  const V as = ((s.qs_ab + load(s.qsa + c)) - load(s.qsb + c)) * r;
  const V u = as - ((s.qt_ab + load(s.qta + c)) - load(s.qtb + c)) * (s.rt_b * load(s.ita + c));
  V g = clamp_lanes<T>(u);  // smooth_l1's derivative; smooth_l1(u) = g (u - g / 2)
  V term = g * (u - T(0.5) * g);
  if (kMasked) term *= w;
  lsum += term;
  if (kGrad) {
    if (kMasked) g *= w;
    const V gr = g * r;
    s1 += gr;
    s2 += g * as;
    store(acc + c, load(acc + c) + g * (r - as * load(s.hsa + c)));
    store(pb + c, load(pb + c) - gr);
  }
}

// A row b's columns [lo, hi) of a chunk (c >= b: lo = max(k0, b)) in whole vectors from lo rounded down: the first
// and the last vector take weights when they reach outside [lo, hi) or hold the diagonal c == b
template <typename T>
struct RowVectors {
  static constexpr int L = kVecLanes<T>;
  int64_t first, last, inner_begin, inner_end;
  bool head, tail;
  Vec<T> w_head, w_tail;

  RowVectors(int64_t lo, int64_t hi, int64_t b) {
    first = lo / L * L;
    const int64_t end = (hi + L - 1) / L * L;
    last = end - L;
    head = lo != first || b == lo;
    tail = hi != end;
    if (first == last) {
      head = head || tail;
      tail = false;
    }
    inner_begin = head ? first + L : first;
    inner_end = tail ? last : end;
    T wh[L], wt[L];
    for (int l = 0; l < L; ++l) {
      wh[l] = weight(first + l, lo, hi, b);
      wt[l] = weight(last + l, lo, hi, b);
    }
    w_head = load(wh);
    w_tail = load(wt);
  }
  static T weight(int64_t c, int64_t lo, int64_t hi, int64_t b) {
    return c < lo || c >= hi ? T(0) : c == b ? T(0.5) : T(1);
  }
};

template <typename T, bool kGrad>
inline void triplet_row(const Segment<T>& s, const RowVectors<T>& row, T* acc, T* pb, Vec<T>& lsum, Vec<T>& s1,
                        Vec<T>& s2) {
  constexpr int L = kVecLanes<T>;
  if (row.head) triplet_vector<T, kGrad, true>(s, row.first, row.w_head, acc, pb, lsum, s1, s2);
  for (int64_t c = row.inner_begin; c < row.inner_end; c += L)
    triplet_vector<T, kGrad, false>(s, c, Vec<T>{}, acc, pb, lsum, s1, s2);
  if (row.tail) triplet_vector<T, kGrad, true>(s, row.last, row.w_tail, acc, pb, lsum, s1, s2);
}

// Loss sum over the triplets (a, b, c), a in [a0, a1), c >= b (the c == b diagonal at half weight); with kGrad,
// dL/dq over unordered pairs added into P (n x n float64: where P_uv or P_vu holds a term does not matter, H = P + P^T).
// Parallel over groups of anchors: the terms outside the anchors' own rows go to thread-private float64 buffers over a
// band of columns, summed into P after the band; a single thread adds them into P directly.
template <typename T, bool kSplit, bool kGrad>
double triplet_pass(int64_t n, int64_t a0, int64_t a1, const PairTables<T>& tab, double* P, Interrupt& interrupt) {
  using V = Vec<T>;
  constexpr int L = kVecLanes<T>;
  constexpr int64_t kGroup = kAnchors * kGroupBlocks;
  constexpr int64_t kSpan = kColumns + 2 * L;  // a chunk's columns in whole vectors, from its start rounded down
  const int64_t ld = tab.ld;
  const int threads = num_threads();
  const bool parallel = threads > 1 && worth_parallel((a1 - a0) * n * n);
  const int64_t W = band_width(n, parallel ? threads : 1);
  at::Tensor priv_t;
  if (kGrad && parallel) priv_t = at::empty({int64_t(threads) * n * W}, at::kDouble);
  double* priv = kGrad && parallel ? priv_t.data_ptr<double>() : nullptr;
  const int64_t blocks = (a1 - a0 + kAnchors - 1) / kAnchors;
  // at least four groups a thread, for the dynamic schedule to balance
  const int64_t group_blocks = std::clamp<int64_t>(blocks / (4 * (parallel ? threads : 1)), 1, kGroupBlocks);
  const int64_t groups = (blocks + group_blocks - 1) / group_blocks;
  const T near_q = T(kNearRatio * kNearRatio);
  double loss = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : loss) if (parallel)
  {
    const int tid = thread_id();
    const int team = team_size();  // 1 when the region runs serially: the other rows' terms then go straight into P
    double* mine = kGrad && team > 1 ? priv + size_t(tid) * n * W : nullptr;
    alignas(64) T acc[kAnchors][kSpan];  // P_ac of a block's anchors over a chunk, float32 between flushes
    alignas(64) T pbc[kSpan];            // P_bc of one row b over a chunk, summed over a block's anchors
    // per anchor of the group: 1/d rows with the near columns zeroed (their triplets then vanish from the main loop),
    // near flags, and the near points
    std::vector<T> is_far(size_t(kGroup) * ld), it_far(size_t(kGroup) * ld);
    std::vector<char> is_near(kSplit ? size_t(kGroup) * n : 0);
    std::vector<int64_t> near_points[kGroup];
    Vec<double> loss_lanes{};
    for (int64_t c0 = 0; c0 < n; c0 += W) {
      const int64_t c1 = std::min(n, c0 + W);
      // once interrupted, the remaining bands only pass their barriers (every thread meets the same constructs)
      if (mine && !interrupt.stopped()) std::fill(mine, mine + n * W, 0.0);
      double* pbc_rows = mine ? mine - c0 : P;  // the term of pair (u, v), v in the band: pbc_rows[u * stride + v]
      const int64_t stride = mine ? W : n;
#pragma omp for schedule(dynamic, 1)
      for (int64_t group = 0; group < groups; ++group) {
        if (interrupt.check(tid == 0)) continue;
        const int64_t g0 = a0 + group * group_blocks * kAnchors, g1 = std::min(a1, g0 + group_blocks * kAnchors);
        for (int64_t a = g0; a < g1; ++a) {
          const int64_t i = a - g0;
          const T* isa = tab.is + a * ld;
          const T* ita = tab.it + a * ld;
          T* fs = is_far.data() + i * ld;
          T* ft = it_far.data() + i * ld;
          std::copy(isa, isa + ld, fs);
          std::copy(ita, ita + ld, ft);
          if (!kSplit) continue;
          const T* qsa = tab.qs + a * ld;
          const T* qta = tab.qt + a * ld;
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
            if (is_near_c) {
              fs[c] = ft[c] = T(0);
              near_points[i].push_back(c);
            }
          }
        }
        // triplets with b and c far from a (or coinciding with it), c >= b, in tiles
        for (int64_t k0 = c0; k0 < c1 && !interrupt.stopped(); k0 += kColumns) {
          const int64_t k1 = std::min(c1, k0 + kColumns);
          const int64_t kb = k0 / L * L;  // acc and pbc hold the columns from kb
          for (int64_t b0 = 0; b0 < k1; b0 += kRows) {
            const int64_t b1 = std::min(k1, b0 + kRows);
            for (int64_t ab = g0; ab < g1; ab += kAnchors) {
              const int64_t ae = std::min(g1, ab + kAnchors);
              if (kGrad)
                for (int64_t a = ab; a < ae; ++a) std::fill(acc[a - ab], acc[a - ab] + kSpan, T(0));
              for (int64_t b = b0; b < b1; ++b) {
                const RowVectors<T> row(std::max(k0, b), k1, b);
                T* pb = pbc - kb;  // indexed by c
                if (kGrad) std::fill(pb + row.first, pb + row.last + L, T(0));
                Segment<T> seg;
                seg.qsb = tab.qs + b * ld;
                seg.qtb = tab.qt + b * ld;
                for (int64_t a = ab; a < ae; ++a) {
                  const int64_t i = a - g0;
                  // d_aa = 0 on both sides: every triplet with b == a is 0 - 0; near rows b come later
                  if (a == b || (kSplit && is_near[i * n + b])) continue;
                  seg.qsa = tab.qs + a * ld;
                  seg.qta = tab.qt + a * ld;
                  seg.isa = is_far.data() + i * ld;
                  seg.ita = it_far.data() + i * ld;
                  seg.hsa = kGrad ? tab.hs + a * ld : nullptr;
                  seg.qs_ab = V{} + seg.qsa[b];
                  seg.qt_ab = V{} + seg.qta[b];
                  seg.rs_b = V{} + T(0.5) * seg.isa[b];
                  seg.rt_b = V{} + T(0.5) * seg.ita[b];
                  V lsum{}, s1{}, s2{};
                  triplet_row<T, kGrad>(seg, row, acc[a - ab] - kb, pb, lsum, s1, s2);
                  loss_lanes += widen(lsum);
                  if (kGrad) P[a * n + b] += lane_sum(widen(s1)) - double(seg.hsa[b]) * lane_sum(widen(s2));
                }
                if (kGrad) {
                  double* dst = pbc_rows + b * stride;
                  for (int64_t c = std::max(b + 1, k0); c < k1; ++c) dst[c] += double(pb[c]);
                }
              }
              if (kGrad)
                for (int64_t a = ab; a < ae; ++a) {
                  double* Pa = P + a * n;
                  const T* src = acc[a - ab] - kb;
                  for (int64_t c = k0; c < k1; ++c) Pa[c] += double(src[c]);
                }
            }
          }
        }
        if (!kSplit) continue;
        // triplets (a, m, c) with m near a, c in the band: c far (any side of m; far rows skip m as a column), c near
        // and c > m, or c == m at half weight; hi + lo numerators, sums in float64 per row
        for (int64_t a = g0; a < g1; ++a) {
          const int64_t i = a - g0;
          const T* qsa = tab.qs + a * ld;
          const T* qta = tab.qt + a * ld;
          const T* lsa = tab.qs_lo + a * ld;
          const T* lta = tab.qt_lo + a * ld;
          const T* hsa = kGrad ? tab.hs + a * ld : nullptr;
          double* Pa = P + a * n;
          for (const int64_t m : near_points[i]) {
            const T* qsm = tab.qs + m * ld;
            const T* qtm = tab.qt + m * ld;
            const T* lsm = tab.qs_lo + m * ld;
            const T* ltm = tab.qt_lo + m * ld;
            double* pm = pbc_rows + m * stride;
            const T qs_am = qsa[m], qt_am = qta[m], ls_am = lsa[m], lt_am = lta[m];
            const T rs_m = T(0.5) * tab.is[a * ld + m], rt_m = T(0.5) * tab.it[a * ld + m];
            double row_s1 = 0.0, row_s2 = 0.0;
            if (m >= c0 && m < c1) {
              const T r = rs_m * tab.is[a * ld + m], rt = rt_m * tab.it[a * ld + m];
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
              const T* isa = part == 0 ? is_far.data() + i * ld : tab.is + a * ld;
              const T* ita = part == 0 ? it_far.data() + i * ld : tab.it + a * ld;
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
    loss += lane_sum(loss_lanes);
  }
  return loss;
}

// dx_u = c sum_v H_uv (x_u - x_v) with H = P + P^T, on the centred features in float64, returned in T. A small
// product (kSmallProduct) takes one pass over P in one thread, each entry P_uv sent to both of its rows, vectorised
// over v on the transposed features: no symmetrised copy, no GEMM, none of the tensor ops around them (the seed's op
// with gradient, without anchors: 152 against 174 us, minima in turns). Larger ones symmetrise P in place and take
// weighted_differences' GEMM.
template <typename T>
at::Tensor pair_gradient(at::Tensor& P, const at::Tensor& s, double c) {
  const int64_t n = s.size(0), d = s.size(1);
  double* p = P.data_ptr<double>();
  if (n * n * d > kSmallProduct) {
    symmetrise_sum(p, n);
    for (int64_t i = 0; i < n; ++i) p[i * n + i] = 0.0;  // x_u - x_u = 0
    at::Tensor x = s.to(at::kDouble);
    x = x - x.mean(0, true);
    return weighted_differences<double>(P, x).mul_(c).to(s.scalar_type());
  }
  const T* x = s.data_ptr<T>();
  std::vector<double> xt(size_t(d) * size_t(n)), gt(size_t(d) * size_t(n), 0.0);
  for (int64_t k = 0; k < d; ++k) {
    double mean = 0.0;
    for (int64_t i = 0; i < n; ++i) mean += double(x[i * d + k]);
    mean /= double(n);
    for (int64_t i = 0; i < n; ++i) xt[size_t(k) * n + i] = double(x[i * d + k]) - mean;
  }
  for (int64_t u = 0; u < n; ++u) {
    const double* pu = p + u * n;
    for (int64_t k = 0; k < d; ++k) {
      const double* xk = xt.data() + size_t(k) * n;
      double* gk = gt.data() + size_t(k) * n;
      const double xu = xk[u];
      double row = 0.0;
#pragma omp simd reduction(+ : row)
      for (int64_t v = 0; v < n; ++v) {  // v == u adds 0: x_u - x_u
        const double w = pu[v] * (xu - xk[v]);
        row += w;
        gk[v] -= w;
      }
      gk[u] += row;
    }
  }
  at::Tensor grad = at::empty({n, d}, s.options());
  T* g = grad.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) g[i * d + k] = T(c * gt[size_t(k) * n + i]);
  return grad;
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
  // the tables, each n x ld: 1/d student, 1/d teacher, [h student,] q student, [lo student,] q teacher[, lo teacher]
  // (float32 keeps q as hi + lo). The pass reads the same columns of 8 consecutive rows of 4 or 5 tables at once: at a
  // row stride of a multiple of 4 KiB (N = 1024 and 2048, float32) those all fall in one set of the 8-way L1 and evict
  // each other. So ld is an odd number of cache lines (consecutive rows in consecutive sets) and the tables lie 8
  // lines apart modulo 4 KiB.
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  int64_t ld = (n + kLine - 1) / kLine * kLine;
  if ((ld / kLine) % 2 == 0) ld += kLine;
  const int64_t size = (n * ld + 63 * kLine) / (64 * kLine) * (64 * kLine) + 8 * kLine;
  const int64_t q_tables = kSplit ? 4 : 2;
  at::Tensor tables = at::empty({((with_grad ? 3 : 2) + q_tables) * size}, opts);
  T* next = tables.data_ptr<T>();
  auto take = [&](bool wanted) {
    T* table = wanted ? next : nullptr;
    if (wanted) next += size;
    return table;
  };
  T *is = take(true), *it = take(true), *hs = take(with_grad);
  T *qs_hi = take(true), *qs_lo = take(kSplit), *qt_hi = take(true), *qt_lo = take(kSplit);
  pair_tables(qs.data_ptr<double>(), n, ld, is, hs, qs_hi, qs_lo);
  pair_tables(qt.data_ptr<double>(), n, ld, it, static_cast<T*>(nullptr), qt_hi, qt_lo);
  qs.reset();
  qt.reset();
  PairTables<T> tab;
  tab.ld = ld;
  tab.is = is;
  tab.it = it;
  tab.hs = hs;
  tab.qs = qs_hi;
  tab.qs_lo = qs_lo;
  tab.qt = qt_hi;
  tab.qt_lo = qt_lo;

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
  tables.reset();
  return {at::full({}, loss * scale, opts), pair_gradient<T>(P, s, 2.0 * scale)};
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
