/*
 * kvsparse._kernels_np: the argument checks and small helpers that the
 * functions of every method share (declared in common.h).
 */
#include "common.h"

#include <math.h>

/* o must be an aligned, native-byte-order, C-contiguous ndarray of rank ndim. */
PyArrayObject *as_array(PyObject *o, const char *name, int ndim, int writeable)
{
    PyArrayObject *a;
    if (!PyArray_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name,
                     Py_TYPE(o)->tp_name);
        return NULL;
    }
    a = (PyArrayObject *)o;
    if (PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimensions, got %d", name, ndim,
                     PyArray_NDIM(a));
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous", name);
        return NULL;
    }
    if (!PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be aligned", name);
        return NULL;
    }
    if (!PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be in native byte order", name);
        return NULL;
    }
    if (writeable && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be writeable", name);
        return NULL;
    }
    return a;
}

/* float32 -> KS_F32, float16 -> KS_F16, else TypeError. */
int float_dtype(PyArrayObject *a, const char *name, ks_dtype *dt)
{
    switch (PyArray_TYPE(a)) {
    case NPY_FLOAT32:
        *dt = KS_F32;
        return 0;
    case NPY_FLOAT16:
        *dt = KS_F16;
        return 0;
    default:
        PyErr_Format(PyExc_TypeError, "%s must be float32 or float16, got dtype %s", name,
                     PyArray_DESCR(a)->typeobj->tp_name);
        return -1;
    }
}

int same_dtype(PyArrayObject *a, const char *name, ks_dtype want, const char *ref)
{
    ks_dtype dt;
    if (float_dtype(a, name, &dt) < 0)
        return -1;
    if (dt != want) {
        PyErr_Format(PyExc_TypeError, "%s must have the same dtype as %s (%s), got %s", name,
                     ref, want == KS_F32 ? "float32" : "float16",
                     dt == KS_F32 ? "float32" : "float16");
        return -1;
    }
    return 0;
}

int is_int32(PyArrayObject *a, const char *name)
{
    if (PyArray_TYPE(a) != NPY_INT32) {
        PyErr_Format(PyExc_TypeError, "%s must be an int32 array, got dtype %s", name,
                     PyArray_DESCR(a)->typeobj->tp_name);
        return -1;
    }
    return 0;
}

/* a has the numpy type want (named want_name in the message), else TypeError. */
int is_type(PyArrayObject *a, const char *name, int want, const char *want_name)
{
    if (PyArray_TYPE(a) != want) {
        PyErr_Format(PyExc_TypeError, "%s must be a %s array, got dtype %s", name, want_name,
                     PyArray_DESCR(a)->typeobj->tp_name);
        return -1;
    }
    return 0;
}

int check_dim(PyArrayObject *a, const char *name, int axis, npy_intp want,
              const char *what)
{
    if (PyArray_DIM(a, axis) != want) {
        PyErr_Format(PyExc_ValueError, "%s.shape[%d] must be %s = %zd, got %zd", name, axis,
                     what, (Py_ssize_t)want, (Py_ssize_t)PyArray_DIM(a, axis));
        return -1;
    }
    return 0;
}

/* lengths: int32 [B], each in [0, capacity]. */
const int32_t *lens_array(PyObject *o, const char *name, npy_intp B, int64_t capacity)
{
    PyArrayObject *a = as_array(o, name, 1, 0);
    const int32_t *p;
    npy_intp i;
    if (!a || is_int32(a, name) < 0 || check_dim(a, name, 0, B, "B") < 0)
        return NULL;
    p = (const int32_t *)PyArray_DATA(a);
    for (i = 0; i < B; i++) {
        if (p[i] < 0) {
            PyErr_Format(PyExc_ValueError, "%s[%zd] = %d is negative", name, (Py_ssize_t)i,
                         (int)p[i]);
            return NULL;
        }
        if ((int64_t)p[i] > capacity) {
            PyErr_Format(PyExc_ValueError, "%s[%zd] = %d exceeds the capacity %lld", name,
                         (Py_ssize_t)i, (int)p[i], (long long)capacity);
            return NULL;
        }
    }
    return p;
}

int check_head_dim(npy_intp D, const char *name)
{
    if (D <= 0 || D % 8 != 0 || D > KS_MAX_D) {
        PyErr_Format(PyExc_ValueError,
                     "%s: head dim D must be a positive multiple of 8 up to %d, got %zd", name,
                     KS_MAX_D, (Py_ssize_t)D);
        return -1;
    }
    return 0;
}

int check_heads(npy_intp H, npy_intp Hkv)
{
    if (Hkv <= 0 || H <= 0 || H % Hkv != 0) {
        PyErr_Format(PyExc_ValueError,
                     "the number of query heads H = %zd must be a positive multiple of the "
                     "number of KV heads Hkv = %zd",
                     (Py_ssize_t)H, (Py_ssize_t)Hkv);
        return -1;
    }
    return 0;
}

/* scale: None -> 1/sqrt(D), else a real number. */
int parse_scale(PyObject *o, npy_intp D, float *scale)
{
    double s;
    if (o == NULL || o == Py_None) {
        *scale = (float)(1.0 / sqrt((double)D));
        return 0;
    }
    s = PyFloat_AsDouble(o);
    if (s == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "scale must be a real number or None, got %s",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    *scale = (float)s;
    return 0;
}

/* k (and v) : [B, Hkv, cap, D] float. */
PyArrayObject *kv_array(PyObject *o, const char *name, ks_dtype *dt)
{
    PyArrayObject *a = as_array(o, name, 4, 0);
    if (!a || float_dtype(a, name, dt) < 0 || check_head_dim(PyArray_DIM(a, 3), name) < 0)
        return NULL;
    if ((int64_t)PyArray_DIM(a, 2) > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s.shape[2] (cap) must be <= 2^31 - 1, got %zd", name,
                     (Py_ssize_t)PyArray_DIM(a, 2));
        return NULL;
    }
    return a;
}

/* The common arguments of the attention functions: q [B, H, D] (already
 * checked, dtype dt) and k, v [B, Hkv, cap, D] of q's dtype, H a multiple of
 * Hkv. 0, or -1 with the exception set. */
int qkv_arrays(PyArrayObject *q, ks_dtype dt, PyObject *ko, PyObject *vo, PyArrayObject **k,
               PyArrayObject **v, npy_intp *B, npy_intp *H, npy_intp *Hkv, npy_intp *cap,
               npy_intp *D)
{
    ks_dtype kdt;
    *B = PyArray_DIM(q, 0);
    *H = PyArray_DIM(q, 1);
    *D = PyArray_DIM(q, 2);
    if (check_head_dim(*D, "q") < 0 || !(*k = kv_array(ko, "k", &kdt)) ||
        same_dtype(*k, "k", dt, "q") < 0)
        return -1;
    *Hkv = PyArray_DIM(*k, 1);
    *cap = PyArray_DIM(*k, 2);
    if (check_dim(*k, "k", 0, *B, "B") < 0 || check_dim(*k, "k", 3, *D, "D") < 0 ||
        check_heads(*H, *Hkv) < 0 || !(*v = as_array(vo, "v", 4, 0)) ||
        same_dtype(*v, "v", dt, "q") < 0 || check_dim(*v, "v", 0, *B, "B") < 0 ||
        check_dim(*v, "v", 1, *Hkv, "Hkv") < 0 || check_dim(*v, "v", 2, *cap, "cap") < 0 ||
        check_dim(*v, "v", 3, *D, "D") < 0)
        return -1;
    return 0;
}

PyArrayObject *new_array(int nd, npy_intp *dims, int type)
{
    return (PyArrayObject *)PyArray_ZEROS(nd, dims, type, 0);
}

int np_type(ks_dtype dt)
{
    return dt == KS_F32 ? NPY_FLOAT32 : NPY_FLOAT16;
}

npy_intp ceil_div(npy_intp a, npy_intp b)
{
    return a / b + (a % b != 0);
}

/* a * b for a, b >= 0, saturated at INT64_MAX (only compared against lengths) */
int64_t sat_mul(int64_t a, int64_t b)
{
    if (a == 0 || b == 0)
        return 0;
    return a > INT64_MAX / b ? INT64_MAX : a * b;
}

/* PyMem_RawMalloc of n >= 0 elements of size elsize (n as sat_mul gives it);
 * MemoryError on overflow or failure. At least one byte, so that NULL always
 * means failure. */
void *raw_alloc(int64_t n, size_t elsize)
{
    void *p;
    if (n < 0 || (uint64_t)n > (uint64_t)(PY_SSIZE_T_MAX / elsize)) {
        PyErr_NoMemory();
        return NULL;
    }
    p = PyMem_RawMalloc(n > 0 ? (size_t)n * elsize : 1);
    if (!p)
        PyErr_NoMemory();
    return p;
}

/* CPU kernels return 0 or KS_ERR_NOMEM; call with the GIL held. */
int kernel_rc(int rc)
{
    if (rc != 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* C-contiguous arrays a (written) and b must not share bytes. */
int no_overlap(PyArrayObject *a, const char *an, PyArrayObject *b, const char *bn)
{
    const char *pa = (const char *)PyArray_DATA(a), *pb = (const char *)PyArray_DATA(b);
    const npy_intp na = PyArray_NBYTES(a), nb = PyArray_NBYTES(b);
    if (na > 0 && nb > 0 && pa < pb + nb && pb < pa + na) {
        PyErr_Format(PyExc_ValueError,
                     "%s (written in place) shares memory with %s; pass separate arrays", an, bn);
        return -1;
    }
    return 0;
}
