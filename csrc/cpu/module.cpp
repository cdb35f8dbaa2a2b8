// The s2hk._C Python module and the schemas of the s2hk operators.
//
// The module itself is empty: importing it runs the static registrations of the operators (TORCH_LIBRARY here,
// TORCH_LIBRARY_IMPL in each op's file), which are then called as torch.ops.s2hk.<name>. No pybind11: the
// module is made with the plain CPython API, which keeps torch/extension.h out of the build.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(s2hk, m) {
  // Fake (meta) kernels and autograd formulas are registered in Python, in this module.
  m.set_python_module("s2hk.ops");

  // Gates of every channel group at once; `layout` is int64 (G, 4): channel offset, logit offset, C_g, d_g, on the
  // logits' device (the kernels read it), and `host_layout` its CPU copy (validated: reading a CUDA layout would
  // synchronise with the device on every call).
  m.def(
      "gates(Tensor logits, Tensor ranks, Tensor layout, Tensor host_layout, float tau) -> "
      "(Tensor keep_probs, Tensor hard_widths, Tensor expected, Tensor mask)");
  m.def(
      "gates_backward(Tensor grad_keep_probs, Tensor grad_hard_widths, Tensor grad_expected, Tensor logits, "
      "Tensor ranks, Tensor layout, Tensor host_layout, float tau) -> Tensor");

  // Decoupled KD terms [G_h, G_s] and the routed gradients dG_h/dh, dG_s/ds.
  m.def(
      "decoupled_kd(Tensor soft, Tensor hard, float temperature, float alpha) -> "
      "(Tensor losses, Tensor grad_hard, Tensor grad_soft)");

  // Mean filter L1 importance, importance order and ranks of every channel group; layer l feeds groups[l].
  m.def("group_importance(Tensor[] weights, int[] groups) -> (Tensor importance, Tensor order, Tensor ranks)");
}

static PyModuleDef s2hk_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "s2hk's C++/CUDA operators, registered as torch.ops.s2hk.* on import (use them through s2hk.ops).",
    -1,
    nullptr,
};

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&s2hk_module);
  if (module == nullptr) return nullptr;
#ifdef S2HK_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
