// Python module init of qrkd._C. The ops themselves are registered by the relation files (csrc/cpu/*.cpp,
// csrc/cuda/*) into the torch.ops.qrkd namespace when this library is loaded.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qrkd compiled kernels (ops live under torch.ops.qrkd)";
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
