/*
 * What the files of kvsparse._kernels_np (csrc/numpy/) share: the Python and
 * NumPy headers and the argument checks of every method's functions (defined
 * in common.c). Each method's functions are one file, quest.c, sparq.c and
 * qaq.c, ending with its method table; module.c makes the module from them.
 *
 * Errors name the offending argument; every check returns -1 (or NULL) with
 * the Python exception set.
 */
#ifndef KVSPARSE_NUMPY_COMMON_H
#define KVSPARSE_NUMPY_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
/* one NumPy C-API table for the whole module, filled by import_array() in
 * module.c (the only file that defines KVSPARSE_NUMPY_MODULE) */
#define PY_ARRAY_UNIQUE_SYMBOL kvsparse_kernels_np_ARRAY_API
#ifndef KVSPARSE_NUMPY_MODULE
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include <stdint.h>

#include "ks_dtype.h"

#define KS_MAX_D 256

/* the names below are the module's own: not exported from the shared object */
#pragma GCC visibility push(hidden)

/* o must be an aligned, native-byte-order, C-contiguous ndarray of rank ndim. */
PyArrayObject *as_array(PyObject *o, const char *name, int ndim, int writeable);

/* float32 -> KS_F32, float16 -> KS_F16, else TypeError. */
int float_dtype(PyArrayObject *a, const char *name, ks_dtype *dt);

int same_dtype(PyArrayObject *a, const char *name, ks_dtype want, const char *ref);

int is_int32(PyArrayObject *a, const char *name);

/* a has the numpy type want (named want_name in the message), else TypeError. */
int is_type(PyArrayObject *a, const char *name, int want, const char *want_name);

int check_dim(PyArrayObject *a, const char *name, int axis, npy_intp want,
              const char *what);

/* lengths: int32 [B], each in [0, capacity]. */
const int32_t *lens_array(PyObject *o, const char *name, npy_intp B, int64_t capacity);

int check_head_dim(npy_intp D, const char *name);

int check_heads(npy_intp H, npy_intp Hkv);

/* scale: None -> 1/sqrt(D), else a real number. */
int parse_scale(PyObject *o, npy_intp D, float *scale);

/* k (and v) : [B, Hkv, cap, D] float. */
PyArrayObject *kv_array(PyObject *o, const char *name, ks_dtype *dt);

/* The common arguments of the attention functions: q [B, H, D] (already
 * checked, dtype dt) and k, v [B, Hkv, cap, D] of q's dtype, H a multiple of
 * Hkv. 0, or -1 with the exception set. */
int qkv_arrays(PyArrayObject *q, ks_dtype dt, PyObject *ko, PyObject *vo, PyArrayObject **k,
               PyArrayObject **v, npy_intp *B, npy_intp *H, npy_intp *Hkv, npy_intp *cap,
               npy_intp *D);

PyArrayObject *new_array(int nd, npy_intp *dims, int type);

int np_type(ks_dtype dt);

npy_intp ceil_div(npy_intp a, npy_intp b);

/* a * b for a, b >= 0, saturated at INT64_MAX (only compared against lengths) */
int64_t sat_mul(int64_t a, int64_t b);

/* PyMem_RawMalloc of n >= 0 elements of size elsize (n as sat_mul gives it);
 * MemoryError on overflow or failure. At least one byte, so that NULL always
 * means failure. */
void *raw_alloc(int64_t n, size_t elsize);

/* CPU kernels return 0 or KS_ERR_NOMEM; call with the GIL held. */
int kernel_rc(int rc);

/* C-contiguous arrays a (written) and b must not share bytes. */
int no_overlap(PyArrayObject *a, const char *an, PyArrayObject *b, const char *bn);

/* the method tables (quest.c, sparq.c, qaq.c), in the module's order */
extern PyMethodDef ks_np_quest_methods[];
extern PyMethodDef ks_np_sparq_methods[];
extern PyMethodDef ks_np_qaq_methods[];

#pragma GCC visibility pop

#endif /* KVSPARSE_NUMPY_COMMON_H */
