// RKD distance loss on the CPU (DESIGN.md 3.2): the centred Gram by a GEMM, then the elementwise tail (clamp, sqrt,
// mean over the positive entries, smooth_l1 and, when asked, its derivative) fused in OpenMP passes over the upper
// triangle, and the student gradient by a second GEMM: dx = 4 (rowsum(P) x_c - P x_c), P = dL/dq (symmetric).
#include "common.h"

#include <vector>

namespace qrkd {
namespace {

struct Normaliser {
  double inv_mu = 0.0;  // 1 / (mean of the positive entries + 1e-12); 0 when no entry is positive
  double count = 0.0;   // number of positive entries
};

// A pair whose Gram formula cancels below this fraction of |x_i|^2 + |x_j|^2 is summed again from differences.
constexpr double kGramRefine = 0.125;

// In place on the upper triangle (j >= i): the Gram matrix of the centred features xc (n x d) -> pd (the diagonal
// sqrt(1e-12) or 0). The pairs where the Gram formula cancels (duplicate and nearly coincident rows) take q from
// differences: a GEMM does not promise equal entries for equal rows, and the cancellation costs close pairs their
// digits.
template <typename T>
Normaliser gram_to_distances(T* g, const T* xc, int64_t n, int64_t d, bool zero_diagonal) {
  std::vector<T> sq(n);
  for (int64_t i = 0; i < n; ++i) sq[i] = g[i * n + i];
  const T eps = T(kEps);
  const T diag = zero_diagonal ? T(0) : std::sqrt(eps);
  double sum = 0.0, count = 0.0;
#pragma omp parallel for schedule(dynamic, 8) reduction(+ : sum, count) num_threads(num_threads()) \
    if (worth_parallel(n * n))
  for (int64_t i = 0; i < n; ++i) {
    T* gi = g + i * n;
    const T sqi = sq[i];
    double row_sum = 0.0, row_count = 0.0;
    gi[i] = diag;
    if (diag > T(0)) {
      row_sum += double(diag);
      row_count += 1.0;
    }
    for (int64_t j = i + 1; j < n; ++j) {
      T q = sqi + sq[j] - T(2) * gi[j];
      if (q < T(kGramRefine) * (sqi + sq[j])) {
        q = T(0);
        for (int64_t k = 0; k < d; ++k) {
          const T diff = xc[i * d + k] - xc[j * d + k];
          q += diff * diff;
        }
      }
      T dij = std::sqrt(std::max(q, eps));  // NaN stays NaN
      gi[j] = dij;
      if (dij > T(0)) {
        row_sum += 2.0 * double(dij);
        row_count += 2.0;
      }
    }
    sum += row_sum;
    count += row_count;
  }
  Normaliser out;
  out.count = count;
  if (count > 0) out.inv_mu = 1.0 / (sum / count + kEps);
  return out;
}

template <typename T>
at::Tensor centred_gram(const at::Tensor& x, at::Tensor* centred) {
  *centred = (x - x.mean(0, /*keepdim=*/true)).contiguous();
  at::Tensor g = at::empty({x.size(0), x.size(0)}, x.options());
  gram_upper(*centred, g);  // the passes below read the upper triangle only
  return g;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> distance_impl(const at::Tensor& s, const at::Tensor& t, bool zero_diagonal,
                                                 bool with_grad) {
  const int64_t n = s.size(0);
  at::Tensor sc, tc;
  at::Tensor ds = centred_gram<T>(s, &sc).contiguous();
  at::Tensor dt = centred_gram<T>(t, &tc).contiguous();
  T* pds = ds.data_ptr<T>();
  T* pdt = dt.data_ptr<T>();
  const Normaliser ns = gram_to_distances(pds, sc.data_ptr<T>(), n, s.size(1), zero_diagonal);
  const Normaliser nt = gram_to_distances(pdt, tc.data_ptr<T>(), n, t.size(1), zero_diagonal);
  // u = ds / mu_s - dt / mu_t is formed as (ds - dt k) / mu_s with k = mu_s / mu_t: when both sides are equal this
  // is exactly 0 even where the compiler fuses the multiply-subtract (ds * ims - dt * imt would leave its rounding)
  const T ims = T(ns.inv_mu);
  const T k = ns.inv_mu > 0 ? T(nt.inv_mu / ns.inv_mu) : T(0);

  // smooth_l1 sum and, for the gradient, clamp(u) (into the teacher buffer) and S = sum clamp(u) ds; upper triangle,
  // off-diagonal entries counted twice
  double loss = 0.0, s_dot = 0.0;
#pragma omp parallel for schedule(dynamic, 8) reduction(+ : loss, s_dot) num_threads(num_threads()) \
    if (worth_parallel(n * n))
  for (int64_t i = 0; i < n; ++i) {
    const T* dsi = pds + i * n;
    T* dti = pdt + i * n;
    T row_loss = 0, row_dot = 0;
    {
      const T u = (dsi[i] - dti[i] * k) * ims;
      row_loss += T(0.5) * smooth_l1(u);
      if (with_grad) {
        const T g = smooth_l1_grad(u);
        row_dot += T(0.5) * g * dsi[i];
        dti[i] = g;
      }
    }
    if (with_grad) {
#pragma omp simd reduction(+ : row_loss, row_dot)
      for (int64_t j = i + 1; j < n; ++j) {
        const T u = (dsi[j] - dti[j] * k) * ims;
        row_loss += smooth_l1(u);
        const T g = smooth_l1_grad(u);
        row_dot += g * dsi[j];
        dti[j] = g;
      }
    } else {
#pragma omp simd reduction(+ : row_loss)
      for (int64_t j = i + 1; j < n; ++j) row_loss += smooth_l1((dsi[j] - dti[j] * k) * ims);
    }
    loss += 2.0 * double(row_loss);
    s_dot += 2.0 * double(row_dot);
  }
  const double inv_n2 = 1.0 / (double(n) * double(n));
  at::Tensor loss_t = at::full({}, loss * inv_n2, s.options());
  if (!with_grad) return {loss_t, at::empty({0}, s.options())};

  // P_ij = dL/dq_ij = (g_ij / mu - [d_ij > 0] S / (mu^2 count)) * 0.5 / d_ij on the unclamped entries, over N^2
  const T a = T(ns.inv_mu * inv_n2);
  const T b = ns.count > 0 ? T(s_dot * ns.inv_mu * ns.inv_mu / ns.count * inv_n2) : T(0);
  const T dmin = std::sqrt(T(kEps));
#pragma omp parallel for schedule(dynamic, 8) num_threads(num_threads()) if (worth_parallel(n * n))
  for (int64_t i = 0; i < n; ++i) {
    T* pi = pds + i * n;  // d_ij in, P_ij out (upper triangle)
    const T* gi = pdt + i * n;
#pragma omp simd
    for (int64_t j = i; j < n; ++j) {
      const T d = pi[j];
      const T half_inv = T(0.5) / std::max(d, dmin);  // unconditional: GCC vectorises no division under a condition
      const T dq = d > dmin ? half_inv : T(0);
      pi[j] = (gi[j] * a - (d > T(0) ? b : T(0))) * dq;
    }
  }
  mirror_upper(pds, n);
  at::Tensor grad = weighted_differences<T>(ds, sc).mul_(4.0);
  return {loss_t, grad};
}

std::tuple<at::Tensor, at::Tensor> rkd_distance_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                    bool zero_diagonal, bool with_grad) {
  at::Tensor s = check_features(student, "student");
  at::Tensor t = check_features(teacher, "teacher");
  check_pair(s, t);
  if (!all_finite(s) || !all_finite(t)) return non_finite_loss(s, with_grad);
  at::NoGradGuard no_grad;
  if (s.scalar_type() == at::kDouble) return distance_impl<double>(s, t, zero_diagonal, with_grad);
  return distance_impl<float>(s, t, zero_diagonal, with_grad);
}

}  // namespace
}  // namespace qrkd

TORCH_LIBRARY_IMPL(qrkd, CPU, m) {
  m.impl("rkd_distance", &qrkd::rkd_distance_cpu);
}
