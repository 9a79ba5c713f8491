// Every pyprune operator schema, and the Python module stub whose import runs the registrations.
// Backend files register only their own dispatch key (csrc/cpu/*.cpp: CPU, csrc/cuda/*.cu: CUDA).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import pyprune._C` loads this library, which runs the TORCH_LIBRARY blocks; no Python API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pyprune, m) {
  // x: (N, C, L) view, any strides; each (n, c) row of L elements is one group.
  // Returns out (x's layout; x where key >= the group's k-th largest key or NaN, else 0) and the
  // per-group threshold (N, C) in x's dtype, which is all backward needs.
  m.def("kwta(Tensor x, int k, bool absolute) -> (Tensor, Tensor)");
  // grad_x = grad where key(x) >= threshold (or x is NaN), else 0; layout of x.
  m.def("_kwta_backward(Tensor grad, Tensor x, Tensor threshold, bool absolute) -> Tensor");
}
