// RKD angle loss on the CPU (DESIGN.md 3.3), O(N^2) memory.
//
// 1. Squared distances q summed from differences in double whatever the features' type (exact duplicates give
//    exactly 0, close points stay accurate; q_ab + q_ac - q_bc cancels to ~d_ab d_ac when d_ab << d_ac, on
//    near-duplicate, collinear and one-dimensional points, which float q cannot resolve), and per pair 1/d (0 where
//    d = 0; 1/max(d, 1e-12) otherwise, as the reference's normalisation) and h = 1/(2q).
// 2. One pass over the triplets (a, b, c) with c >= b (angle(a,b,c) = angle(a,c,b): weight 2 off the b == c
//    diagonal), parallel over the anchors a. The angle is A = (q_ab + q_ac - q_bc) r with r = 1/(2 d_ab d_ac); the
//    same pass accumulates P = dL/dq over unordered pairs: with g = clamp(A_s - A_t, -1, 1),
//    dA/dq_ab = r - A h_ab, dA/dq_ac = r - A h_ac, dA/dq_bc = -r. The P_ab and P_ac terms land in the anchor's own
//    row; the P_bc terms go to a thread-private buffer over a band of columns c (bounded memory), summed into P after
//    the band.
// 3. dx_u = 2 sum_v H_uv (x_u - x_v), H = P + P^T, as a GEMM on the centred features.
// A triplet whose student d_ab or d_ac is 0 has r = 0: its student angle is 0 and it sends no gradient.
// Steps 1 and 2 poll for Ctrl-C between rows (interrupt.h); features with a NaN or inf give NaN at once.
#include "common.h"
#include "interrupt.h"

#include <cstdlib>
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

template <typename T>
void pair_tables(const double* q, int64_t count, T* inv_d, T* half_inv_q) {
  const T eps = T(kEps);
#pragma omp parallel for simd schedule(static) num_threads(num_threads()) if (worth_parallel(count))
  for (int64_t i = 0; i < count; ++i) {
    const T d = T(std::sqrt(q[i]));
    const T inv = d > T(0) ? T(1) / std::max(d, eps) : T(0);
    inv_d[i] = inv;
    if (half_inv_q) half_inv_q[i] = d >= eps ? T(0.5) * inv * inv : T(0);
  }
}

// columns per band so that the private buffers (threads x N x band) stay within a fixed budget;
// QRKD_CPP_ANGLE_BAND=k forces k columns (the tests use it to cover the multi-band path at small N)
inline int64_t band_width(int64_t n, int threads, size_t elem) {
  if (const char* forced = std::getenv("QRKD_CPP_ANGLE_BAND")) {
    const long long k = std::atoll(forced);
    if (k > 0) return std::min<int64_t>(n, k);
  }
  const size_t budget = size_t(96) << 20;
  int64_t w = int64_t(budget / (size_t(threads) * size_t(n) * elem));
  w = std::max<int64_t>(64, w - w % 16);
  return std::min(n, w);
}

template <typename T, bool kGrad>
double triplet_pass(int64_t n, int64_t a0, int64_t a1, const double* qs, const double* qt, const T* is,
                    const T* it, const T* hs, double* P, Interrupt& interrupt) {
  const int threads = num_threads();
  const int64_t W = band_width(n, threads, sizeof(T));
  at::Tensor priv_t;
  T* priv = nullptr;
  if (kGrad) {
    priv_t = at::empty({int64_t(threads) * n * W}, at::CPU(c10::CppTypeToScalarType<T>::value));
    priv = priv_t.data_ptr<T>();
  }
  double loss = 0.0;
  const bool parallel = worth_parallel((a1 - a0) * n * n);
#pragma omp parallel num_threads(threads) reduction(+ : loss) if (parallel)
  {
    const int tid = thread_id();
    const int team = team_size();  // 1 when the region runs serially: only buffer 0 is written then
    T* mine = kGrad ? priv + size_t(tid) * n * W : nullptr;
    std::vector<T> rowacc(kGrad ? W : 0);
    for (int64_t c0 = 0; c0 < n; c0 += W) {
      const int64_t c1 = std::min(n, c0 + W);
      // once interrupted, the remaining bands only pass their barriers (every thread meets the same constructs)
      if (kGrad && !interrupt.stopped()) std::fill(mine, mine + c1 * W, T(0));
#pragma omp for schedule(static)
      for (int64_t a = a0; a < a1; ++a) {
        if (interrupt.check(tid == 0)) continue;
        const double* qsa = qs + a * n;
        const double* qta = qt + a * n;
        const T* isa = is + a * n;
        const T* ita = it + a * n;
        const T* hsa = kGrad ? hs + a * n : nullptr;
        if (kGrad) std::fill(rowacc.begin(), rowacc.begin() + (c1 - c0), T(0));
        T* acc = kGrad ? rowacc.data() - c0 : nullptr;  // indexed by c
        double* Pa = kGrad ? P + a * n : nullptr;
        for (int64_t b = 0; b < c1; ++b) {
          if (b == a) continue;  // d_aa = 0 on both sides: every such triplet is 0 - 0
          const T rs_b = T(0.5) * isa[b], rt_b = T(0.5) * ita[b];
          const double qs_ab = qsa[b], qt_ab = qta[b];
          T lsum = 0, s1 = 0, s2 = 0;
          if (b >= c0) {  // c == b: half the weight of the c > b triplets (everything is doubled at the end)
            const T r = rs_b * isa[b], rt = rt_b * ita[b];
            const T as = T(2.0 * qs_ab) * r, at_ = T(2.0 * qt_ab) * rt;
            const T u = as - at_;
            lsum += T(0.5) * smooth_l1(u);
            if (kGrad) {
              const T g = smooth_l1_grad(u);
              const T gr = T(0.5) * g * r, ga = T(0.5) * g * as;
              s1 += gr;
              s2 += ga;
              acc[b] += gr - ga * hsa[b];
            }
          }
          const int64_t cs = std::max(b + 1, c0);
          const double* qsb = qs + b * n;
          const double* qtb = qt + b * n;
          if (kGrad) {
            T* pb = mine + b * W - c0;  // indexed by c
#pragma omp simd reduction(+ : lsum, s1, s2)
            for (int64_t c = cs; c < c1; ++c) {
              const T r = rs_b * isa[c];
              const T as = T(qs_ab + qsa[c] - qsb[c]) * r;
              const T at_ = T(qt_ab + qta[c] - qtb[c]) * (rt_b * ita[c]);
              const T u = as - at_;
              lsum += smooth_l1(u);
              const T g = smooth_l1_grad(u);
              const T gr = g * r, ga = g * as;
              s1 += gr;
              s2 += ga;
              acc[c] += gr - ga * hsa[c];
              pb[c] -= gr;
            }
            Pa[b] += double(s1) - double(hsa[b]) * double(s2);
          } else {
#pragma omp simd reduction(+ : lsum)
            for (int64_t c = cs; c < c1; ++c) {
              const T as = T(qs_ab + qsa[c] - qsb[c]) * (rs_b * isa[c]);
              const T at_ = T(qt_ab + qta[c] - qtb[c]) * (rt_b * ita[c]);
              lsum += smooth_l1(as - at_);
            }
          }
          loss += double(lsum);
        }
        if (kGrad)
          for (int64_t c = c0; c < c1; ++c) Pa[c] += double(acc[c]);
      }  // implicit barrier: every thread's private band is complete
      if (kGrad) {
#pragma omp for schedule(dynamic, 16)
        for (int64_t b = 0; b < c1; ++b) {
          if (interrupt.stopped()) continue;
          double* Pb = P + b * n;
          const int64_t cs = std::max(b + 1, c0);
          for (int tt = 0; tt < team; ++tt) {
            const T* src = priv + (size_t(tt) * n + b) * W - c0;
            for (int64_t c = cs; c < c1; ++c) Pb[c] += double(src[c]);
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
  const int64_t n = s.size(0);
  const auto opts = s.options();
  Interrupt interrupt;
  at::Tensor qs = at::empty({n, n}, opts.dtype(at::kDouble)), qt = at::empty({n, n}, opts.dtype(at::kDouble));
  squared_distances_exact(s.data_ptr<T>(), n, s.size(1), qs.data_ptr<double>(), interrupt);
  squared_distances_exact(t.data_ptr<T>(), n, t.size(1), qt.data_ptr<double>(), interrupt);
  interrupt.rethrow();
  at::Tensor is = at::empty({n, n}, opts), it = at::empty({n, n}, opts);
  at::Tensor hs = with_grad ? at::empty({n, n}, opts) : at::Tensor();
  pair_tables(qs.data_ptr<double>(), n * n, is.data_ptr<T>(), with_grad ? hs.data_ptr<T>() : nullptr);
  pair_tables<T>(qt.data_ptr<double>(), n * n, it.data_ptr<T>(), nullptr);

  const double scale = 2.0 / (double(n) * double(n) * double(n));  // weight 2 of the c > b half, mean over N^3
  if (!with_grad) {
    const double loss = triplet_pass<T, false>(n, a0, a1, qs.data_ptr<double>(), qt.data_ptr<double>(),
                                               is.data_ptr<T>(), it.data_ptr<T>(), nullptr, nullptr, interrupt);
    interrupt.rethrow();
    return {at::full({}, loss * scale, opts), at::empty({0}, opts)};
  }
  at::Tensor P = at::zeros({n, n}, opts.dtype(at::kDouble));
  double* pp = P.data_ptr<double>();
  const double loss = triplet_pass<T, true>(n, a0, a1, qs.data_ptr<double>(), qt.data_ptr<double>(),
                                            is.data_ptr<T>(), it.data_ptr<T>(), hs.data_ptr<T>(), pp, interrupt);
  interrupt.rethrow();
  qs.reset(); qt.reset(); is.reset(); it.reset(); hs.reset();
  // H = P + P^T in place (zero diagonal: x_u - x_u = 0), and its row sums
  at::Tensor rowsum = at::empty({n, 1}, opts.dtype(at::kDouble));
  double* prs = rowsum.data_ptr<double>();
  symmetrise_sum(pp, n);
  for (int64_t i = 0; i < n; ++i) pp[i * n + i] = 0.0;
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (worth_parallel(n * n))
  for (int64_t i = 0; i < n; ++i) {
    const double* pi = pp + i * n;
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) acc += pi[j];
    prs[i] = acc;
  }
  at::Tensor x = s.to(at::kDouble);
  x = x - x.mean(0, true);
  at::Tensor grad = (rowsum * x - at::mm(P, x)).mul_(2.0 * scale).to(s.scalar_type());
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
  return angle_impl<float>(s, t, anchor_start, anchor_stop, with_grad);
}

}  // namespace
}  // namespace qrkd

TORCH_LIBRARY_IMPL(qrkd, CPU, m) {
  m.impl("rkd_angle", &qrkd::rkd_angle_cpu);
}
