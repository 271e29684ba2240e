// Classical ("simple") fidelity kernel on the CPU (DESIGN.md 3.4): psi_i = x_i / max(|x_i|, 1e-12),
// K = (psi psi^T)^2. The Gram by a GEMM, the elementwise tail (square, smooth_l1, its derivative) fused in one OpenMP
// pass over the upper triangle, the gradient by a GEMM (dpsi = 2 W psi, W = dL/dC symmetric) and the row-wise
// normalisation backward.
#include "common.h"

namespace qrkd {
namespace {

// psi and the clamped norms max(|x_i|, 1e-12)
template <typename T>
at::Tensor normalise_rows(const at::Tensor& x, at::Tensor* norms) {
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor psi = at::empty_like(x);
  *norms = at::empty({n}, x.options());
  const T* px = x.data_ptr<T>();
  T* psi_data = psi.data_ptr<T>();
  T* pn = norms->data_ptr<T>();
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (worth_parallel(n * d))
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = px + i * d;
    T sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t k = 0; k < d; ++k) sq += xi[k] * xi[k];
    const T nrm = std::max(std::sqrt(sq), T(kEps));
    pn[i] = nrm;
    const T inv = T(1) / nrm;
    T* yi = psi_data + i * d;
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) yi[k] = xi[k] * inv;
  }
  return psi;
}

// dx from dpsi through psi = x / max(|x|, eps): (dpsi - psi (psi . dpsi)) / |x| above the clamp, dpsi / eps below
template <typename T>
void normalise_rows_backward(const at::Tensor& psi, const at::Tensor& norms, at::Tensor& dpsi_to_dx) {
  const int64_t n = psi.size(0), d = psi.size(1);
  const T* psi_data = psi.data_ptr<T>();
  const T* pn = norms.data_ptr<T>();
  T* pg = dpsi_to_dx.data_ptr<T>();
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (worth_parallel(n * d))
  for (int64_t i = 0; i < n; ++i) {
    const T* yi = psi_data + i * d;
    T* gi = pg + i * d;
    const T nrm = pn[i];
    const T inv = T(1) / nrm;
    if (nrm > T(kEps)) {
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < d; ++k) dot += yi[k] * gi[k];
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) gi[k] = (gi[k] - yi[k] * dot) * inv;
    } else {
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) gi[k] *= inv;
    }
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> fidelity_loss_impl(const at::Tensor& s, const at::Tensor& t, bool with_grad) {
  const int64_t n = s.size(0);
  at::Tensor ns, nt;
  at::Tensor psi_s = normalise_rows<T>(s, &ns);
  at::Tensor psi_t = normalise_rows<T>(t, &nt);
  at::Tensor cs = at::empty({n, n}, s.options()), ct = at::empty({n, n}, s.options());
  gram_upper(psi_s, cs);  // the pass below reads the upper triangles only
  gram_upper(psi_t, ct);
  T* pcs = cs.data_ptr<T>();
  const T* pct = ct.data_ptr<T>();
  const double inv_n2 = 1.0 / (double(n) * double(n));
  // W_ij = dL/dC_ij = 2 clamp(u_ij) C_ij / N^2, written over C_s's upper triangle, then mirrored
  const T wscale = T(2.0 * inv_n2);
  double loss = 0.0;
#pragma omp parallel for schedule(dynamic, 8) reduction(+ : loss) num_threads(num_threads()) \
    if (worth_parallel(n * n))
  for (int64_t i = 0; i < n; ++i) {
    T* ci = pcs + i * n;
    const T* ti = pct + i * n;
    T row = 0;
    {
      const T c = ci[i], tt = ti[i];
      const T u = c * c - tt * tt;
      row += T(0.5) * smooth_l1(u);
      if (with_grad) ci[i] = wscale * smooth_l1_grad(u) * c;
    }
    if (with_grad) {
#pragma omp simd reduction(+ : row)
      for (int64_t j = i + 1; j < n; ++j) {
        const T c = ci[j], tt = ti[j];
        const T u = c * c - tt * tt;
        row += smooth_l1(u);
        ci[j] = wscale * smooth_l1_grad(u) * c;
      }
    } else {
#pragma omp simd reduction(+ : row)
      for (int64_t j = i + 1; j < n; ++j) {
        const T c = ci[j], tt = ti[j];
        row += smooth_l1(c * c - tt * tt);
      }
    }
    loss += 2.0 * double(row);
  }
  at::Tensor loss_t = at::full({}, loss * inv_n2, s.options());
  if (!with_grad) return {loss_t, at::empty({0}, s.options())};
  mirror_upper(pcs, n);
  at::Tensor grad = symmetric_times<T>(cs, psi_s).mul_(2.0);
  normalise_rows_backward<T>(psi_s, ns, grad);
  return {loss_t, grad};
}

template <typename T>
at::Tensor fidelity_matrix_impl(const at::Tensor& x) {
  at::Tensor norms;
  at::Tensor psi = normalise_rows<T>(x, &norms);
  return at::mm(psi, psi.t()).square_();
}

template <typename T>
at::Tensor fidelity_matrix_backward_impl(const at::Tensor& grad_k, const at::Tensor& x) {
  at::Tensor norms;
  at::Tensor psi = normalise_rows<T>(x, &norms);
  at::Tensor c = at::mm(psi, psi.t());
  // dL/dC = 2 grad_K * C; dpsi = (W + W^T) psi
  at::Tensor w = grad_k.mul(c).mul_(2.0);
  at::Tensor grad = symmetric_times<T>(w.add(w.t()), psi);
  normalise_rows_backward<T>(psi, norms, grad);
  return grad;
}

std::tuple<at::Tensor, at::Tensor> fidelity_loss_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                     bool with_grad) {
  at::Tensor s = check_features(student, "student");
  at::Tensor t = check_features(teacher, "teacher");
  check_pair(s, t);
  TORCH_CHECK(s.size(1) == t.size(1), "qrkd cpp kernels: fidelity_loss needs equal widths (truncate first), got ",
              s.size(1), " and ", t.size(1));
  if (!all_finite(s) || !all_finite(t)) return non_finite_loss(s, with_grad);
  at::NoGradGuard no_grad;
  if (s.scalar_type() == at::kDouble) return fidelity_loss_impl<double>(s, t, with_grad);
  return fidelity_loss_impl<float>(s, t, with_grad);
}

at::Tensor fidelity_matrix_cpu(const at::Tensor& x_in) {
  at::Tensor x = check_features(x_in, "x");
  at::NoGradGuard no_grad;
  if (x.scalar_type() == at::kDouble) return fidelity_matrix_impl<double>(x);
  return fidelity_matrix_impl<float>(x);
}

at::Tensor fidelity_matrix_backward_cpu(const at::Tensor& grad_k, const at::Tensor& x_in) {
  at::Tensor x = check_features(x_in, "x");
  const int64_t n = x.size(0);
  TORCH_CHECK(grad_k.dim() == 2 && grad_k.size(0) == n && grad_k.size(1) == n,
              "qrkd cpp kernels: grad of the kernel matrix must be N x N, got ", grad_k.sizes());
  at::NoGradGuard no_grad;
  at::Tensor g = grad_k.to(x.scalar_type()).contiguous();
  if (x.scalar_type() == at::kDouble) return fidelity_matrix_backward_impl<double>(g, x);
  return fidelity_matrix_backward_impl<float>(g, x);
}

}  // namespace
}  // namespace qrkd

TORCH_LIBRARY_IMPL(qrkd, CPU, m) {
  m.impl("fidelity_loss", &qrkd::fidelity_loss_cpu);
  m.impl("fidelity_matrix", &qrkd::fidelity_matrix_cpu);
  m.impl("fidelity_matrix_backward", &qrkd::fidelity_matrix_backward_cpu);
}
