/*
 * kvsparse._kernels_np: CPU kernels for NumPy arrays of float32 / float16,
 * without torch: every Quest kernel (csrc/kernels/quest_cpu.c), SparQ's cache
 * build and fused decode attention (sparq_cpu.c) and QAQ's decode attention
 * over a quantized cache (qaq_cpu.c).
 *
 * Every argument is validated here (the kernels trust their inputs); errors
 * name the offending argument. The GIL is released around the kernel calls.
 *
 * One file per method (quest.c, sparq.c, qaq.c, as csrc/ops/), the checks
 * they share in common.c / common.h; this file makes the module.
 */
#define KVSPARSE_NUMPY_MODULE /* this file calls import_array() */
#include "common.h"

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    "_kernels_np",
    "kvsparse CPU kernels for NumPy arrays (float32 / float16): Quest, SparQ build and\n"
    "attention, QAQ attention.",
    -1,
    NULL, /* the methods: each method's table, added in PyInit__kernels_np */
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__kernels_np(void)
{
    PyObject *m;
    import_array();
    m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    if (PyModule_AddFunctions(m, ks_np_quest_methods) < 0 ||
        PyModule_AddFunctions(m, ks_np_sparq_methods) < 0 ||
        PyModule_AddFunctions(m, ks_np_qaq_methods) < 0 ||
        PyModule_AddIntConstant(m, "MAX_HEAD_DIM", KS_MAX_D) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
