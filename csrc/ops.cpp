// The schemas of every qrkd op, in one device-neutral place. The kernels register their implementations for a
// dispatch key (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA); the fake (meta) implementations and the autograd
// formulas are registered from Python (qrkd/backends/cpp.py).
#include <torch/library.h>

TORCH_LIBRARY(qrkd, m) {
  m.def("rkd_distance(Tensor student, Tensor teacher, bool zero_diagonal, bool with_grad) -> (Tensor, Tensor)");
  m.def(
      "rkd_angle(Tensor student, Tensor teacher, int anchor_start, int anchor_stop, bool with_grad) "
      "-> (Tensor, Tensor)");
  m.def("fidelity_loss(Tensor student, Tensor teacher, bool with_grad) -> (Tensor, Tensor)");
  m.def("fidelity_matrix(Tensor x) -> Tensor");
  m.def("fidelity_matrix_backward(Tensor grad, Tensor x) -> Tensor");
  // K_ij = |Perm(P_i Q_j^H)|^2 (DESIGN.md 3.5); symmetric: Q is P
  m.def("photonic_fidelity(Tensor P, Tensor Q, bool symmetric) -> Tensor");
  m.def("photonic_fidelity_backward(Tensor grad, Tensor P, Tensor Q, bool symmetric) -> (Tensor, Tensor)");
}
