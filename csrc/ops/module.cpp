// kvsparse._C: the Python module that carries the torch ops. Importing it runs
// the static registrations of quest.cpp, sparq.cpp and qaq.cpp (one
// TORCH_LIBRARY_FRAGMENT each, with their CPU and CUDA implementations); this
// file owns the `kvsparse` library itself.

#include <Python.h>

#include <torch/library.h>

// ---------------------------------------------------------------------------
// Python module: importing kvsparse._C loads the registrations.
extern "C" {
PyObject *PyInit__C(void) {
  static struct PyModuleDef def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                   // name
      "kvsparse torch custom ops (registered as torch.ops.kvsparse.*)",  // doc
      -1,                                                     // size
      nullptr,                                                // methods
  };
  PyObject *m = PyModule_Create(&def);
  if (m == nullptr) return nullptr;
#ifdef KVSPARSE_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}

// The one definition of the `kvsparse` op library (a second TORCH_LIBRARY
// (kvsparse) anywhere fails at load time). Its ops are defined by the
// fragments of quest.cpp, sparq.cpp and qaq.cpp.
TORCH_LIBRARY(kvsparse, m) {}
