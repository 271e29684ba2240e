// Shared helpers of the qrkd CPU kernels.
#pragma once

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace qrkd {

constexpr double kEps = 1e-12;

inline int num_threads() {
  return std::max(1, at::get_num_threads());
}

inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// GCC vector types of 32 bytes of T, loaded and stored unaligned (as immintrin.h's __m256_u); a build without AVX
// lowers them to pairs of 16-byte operations
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32), may_alias, aligned(1)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32), may_alias, aligned(1)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int kVecLanes = 32 / int(sizeof(T));

template <typename T>
inline Vec<T> load(const T* p) {
  return *reinterpret_cast<const Vec<T>*>(p);
}

template <typename T>
inline void store(T* p, Vec<T> v) {
  *reinterpret_cast<Vec<T>*>(p) = v;
}

// smooth_l1 with beta = 1 and its derivative clamp(u, -1, 1)
template <typename T>
inline T smooth_l1(T u) {
  T au = std::abs(u);
  return au < T(1) ? T(0.5) * u * u : au - T(0.5);
}

template <typename T>
inline T smooth_l1_grad(T u) {
  return std::min(std::max(u, T(-1)), T(1));
}

// Features: a 2-D floating CPU tensor; returns it contiguous.
inline at::Tensor check_features(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "qrkd cpp kernels: ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "qrkd cpp kernels: ", name, " must be 2-D (batch, features), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "qrkd cpp kernels: ", name, " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) >= 1 && x.size(1) >= 1, "qrkd cpp kernels: ", name, " must be non-empty, got ", x.sizes());
  return x.contiguous();
}

inline void check_pair(const at::Tensor& s, const at::Tensor& t) {
  TORCH_CHECK(s.size(0) == t.size(0), "qrkd cpp kernels: student and teacher batch sizes differ (", s.size(0),
              " vs ", t.size(0), ")");
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), "qrkd cpp kernels: student and teacher dtypes differ (",
              s.scalar_type(), " vs ", t.scalar_type(), ")");
}

// Whether every entry of a contiguous float32/float64 tensor is finite.
inline bool all_finite(const at::Tensor& x) {
  auto scan = [](const auto* p, int64_t count) {
    for (int64_t i = 0; i < count; ++i)
      if (!std::isfinite(p[i])) return false;
    return true;
  };
  return x.scalar_type() == at::kDouble ? scan(x.data_ptr<double>(), x.numel()) : scan(x.data_ptr<float>(), x.numel());
}

// A loss op's result (loss, dL/dstudent) for features holding a NaN or an inf: NaN, like every other backend, even
// where no pair is formed (N = 1), and without the O(N^2) or O(N^3) passes.
inline std::tuple<at::Tensor, at::Tensor> non_finite_loss(const at::Tensor& s, bool with_grad) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  return {at::full({}, nan, s.options()), with_grad ? at::full(s.sizes(), nan, s.options()) : at::empty({0}, s.options())};
}

// Parallel regions (a fork and a barrier each) only pay off above some tens of thousands of elements of work.
inline bool worth_parallel(int64_t work) {
  return work > 65536;
}

// Calls block(i0, i1, j0, j1) for blocks of the upper triangle of an n x n matrix: rows [i0, i1) and columns [j0, j1)
// of at most kTransposeBlock each, j0 >= i0, together covering every j > i once. Threads share bands of rows.
constexpr int64_t kTransposeBlock = 16;

template <typename Block>
void for_each_upper_block(int64_t n, Block block) {
  constexpr int64_t kBand = 64;
  const int64_t bands = (n + kBand - 1) / kBand;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads()) if (worth_parallel(n * n))
  for (int64_t band = 0; band < bands; ++band)
    for (int64_t i0 = band * kBand; i0 < std::min(n, (band + 1) * kBand); i0 += kTransposeBlock)
      for (int64_t j0 = i0; j0 < n; j0 += kTransposeBlock)
        block(i0, std::min(n, i0 + kTransposeBlock), j0, std::min(n, j0 + kTransposeBlock));
}

// Both transposes below go through a small buffer, so that every row of either block is read or written whole: an
// element-wise transpose walks a column at a stride of n elements, and at n a multiple of 1024 (float) every element
// of that column falls in the same L1 set.

// a[j][i] = a[i][j] for j > i
template <typename T>
void mirror_upper(T* a, int64_t n) {
  for_each_upper_block(n, [a, n](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    T buf[kTransposeBlock][kTransposeBlock];
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = std::max(j0, i + 1); j < j1; ++j) buf[j - j0][i - i0] = a[i * n + j];
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t i = i0; i < std::min(i1, j); ++i) a[j * n + i] = buf[j - j0][i - i0];
  });
}

// a[i][j] = a[j][i] = a[i][j] + a[j][i] for j > i (the symmetric part times 2)
template <typename T>
void symmetrise_sum(T* a, int64_t n) {
  for_each_upper_block(n, [a, n](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    T buf[kTransposeBlock][kTransposeBlock];
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t i = i0; i < std::min(i1, j); ++i) buf[j - j0][i - i0] = a[j * n + i];
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = std::max(j0, i + 1); j < j1; ++j) {
        const T sum = a[i * n + j] + buf[j - j0][i - i0];
        a[i * n + j] = sum;
        buf[j - j0][i - i0] = sum;
      }
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t i = i0; i < std::min(i1, j); ++i) a[j * n + i] = buf[j - j0][i - i0];
  });
}

// Products of at most this many multiply-adds run here in one thread instead of at::mm: the BLAS's parallel region
// costs more than they do (the seed's 128 x 4 Gram: 13 us in two threads, 6 in one; a serial loop, under 2).
constexpr int64_t kSmallProduct = int64_t(1) << 18;

// h x for a symmetric n x n h and x n x d (both contiguous, of type T): at::mm, or for a small product one pass over
// the rows of h (row j is column j), vectorised over the rows of the result on its transpose
template <typename T>
at::Tensor symmetric_times(const at::Tensor& h, const at::Tensor& x) {
  const int64_t n = x.size(0), d = x.size(1);
  if (n * n * d > kSmallProduct) return at::mm(h, x);
  const at::Tensor hc = h.contiguous(), xc = x.contiguous();
  const T* ph = hc.data_ptr<T>();
  const T* px = xc.data_ptr<T>();
  std::vector<T> out_t(size_t(d) * size_t(n), T(0));
  for (int64_t j = 0; j < n; ++j) {
    const T* hj = ph + j * n;
    for (int64_t k = 0; k < d; ++k) {
      const T xjk = px[j * d + k];
      T* o = out_t.data() + k * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] += xjk * hj[i];
    }
  }
  at::Tensor out = at::empty({n, d}, x.options());
  T* po = out.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) po[i * d + k] = out_t[size_t(k) * n + i];
  return out;
}

// The gradient tail of the distance and angle losses: sum_v H_uv (x_u - x_v) for every row u, that is
// rowsum(H) x - H x, for a symmetric n x n H (contiguous, of x's dtype) and features x (n x d).
template <typename T>
at::Tensor weighted_differences(const at::Tensor& h, const at::Tensor& x) {
  const int64_t n = h.size(0);
  const T* ph = h.data_ptr<T>();
  at::Tensor rowsum = at::empty({n, 1}, h.options());
  T* prow = rowsum.data_ptr<T>();
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (worth_parallel(n * n))
  for (int64_t i = 0; i < n; ++i) {
    const T* hi = ph + i * n;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) acc += hi[j];
    prow[i] = acc;
  }
  return rowsum * x - symmetric_times<T>(h, x);
}

// c_ij = a_i . a_j for j >= i, one thread, vectorised over j on a^T (a small product: see kSmallProduct): each block
// of 2 vectors of columns sums its k terms in registers, k in order (the sums of a scalar loop, so the same values as
// adding each k's terms into c_i, which kept c_i in memory and read and wrote it d times: at N = 64, D = 128 the
// fidelity loss's forward took 179 us against the reference's 136). The last block of a row ends at column n, so it
// may reach below the diagonal, where c is unspecified.
template <typename T>
void small_gram_upper(const T* a, int64_t n, int64_t d, T* c) {
  using V = Vec<T>;
  constexpr int64_t L = kVecLanes<T>, kBlock = 2 * L;
  std::vector<T> a_t(size_t(d) * size_t(n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) a_t[size_t(k) * n + i] = a[i * d + k];
  for (int64_t i = 0; i < n; ++i) {
    T* ci = c + i * n;
    const T* ai = a + i * d;
    auto block = [&](int64_t j0) {  // columns [j0, j0 + kBlock)
      V s0{}, s1{};
      for (int64_t k = 0; k < d; ++k) {
        const V aik = V{} + ai[k];
        const T* col = a_t.data() + size_t(k) * n + j0;
        s0 += aik * load(col);
        s1 += aik * load(col + L);
      }
      store(ci + j0, s0);
      store(ci + j0 + L, s1);
    };
    int64_t j0 = i;
    for (; j0 + kBlock <= n; j0 += kBlock) block(j0);
    if (j0 < n && n >= kBlock) {
      block(n - kBlock);
    } else {  // n < kBlock: term by term into c_i
      std::fill(ci + j0, ci + n, T(0));
      for (int64_t k = 0; k < d; ++k) {
        const T aik = ai[k];
        const T* col = a_t.data() + size_t(k) * n;
#pragma omp simd
        for (int64_t j = j0; j < n; ++j) ci[j] += aik * col[j];
      }
    }
  }
}

// The upper triangle (j >= i, diagonal included) of a a^T into the n x n matrix c (both contiguous); what lies below
// the diagonal is unspecified. Large n: row stripes against the columns from the stripe on, about 2/3 of a full
// GEMM's time.
inline void gram_upper(const at::Tensor& a, at::Tensor& c) {
  const int64_t n = a.size(0);
  constexpr int64_t kStripe = 512;
  if (n * n * a.size(1) <= 2 * kSmallProduct) {  // n^2 d / 2 multiply-adds
    if (a.scalar_type() == at::kDouble)
      small_gram_upper(a.data_ptr<double>(), n, a.size(1), c.data_ptr<double>());
    else
      small_gram_upper(a.data_ptr<float>(), n, a.size(1), c.data_ptr<float>());
    return;
  }
  if (n < 2 * kStripe) {
    at::mm_out(c, a, a.t());
    return;
  }
  for (int64_t i0 = 0; i0 < n; i0 += kStripe) {
    const int64_t rows = std::min(kStripe, n - i0);
    at::Tensor out = c.narrow(0, i0, rows).narrow(1, i0, n - i0);
    at::mm_out(out, a.narrow(0, i0, rows), a.narrow(0, i0, n - i0).t());
  }
}

}  // namespace qrkd
