/*
 * kvsparse._kernels_np: CPU kernels for NumPy arrays of float32 / float16,
 * without torch: every Quest kernel (csrc/kernels/quest_cpu.c), SparQ's cache
 * build and fused decode attention (sparq_cpu.c) and QAQ's decode attention
 * over a quantized cache (qaq_cpu.c).
 *
 * Every argument is validated here (the kernels trust their inputs); errors
 * name the offending argument. The GIL is released around the kernel calls.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qaq.h"
#include "quest.h"
#include "sparq.h"

#define KS_MAX_D 256

/* ---- validation helpers --------------------------------------------------- */

/* o must be an aligned, native-byte-order, C-contiguous ndarray of rank ndim. */
static PyArrayObject *as_array(PyObject *o, const char *name, int ndim, int writeable)
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
static int float_dtype(PyArrayObject *a, const char *name, ks_dtype *dt)
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

static int same_dtype(PyArrayObject *a, const char *name, ks_dtype want, const char *ref)
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

static int is_int32(PyArrayObject *a, const char *name)
{
    if (PyArray_TYPE(a) != NPY_INT32) {
        PyErr_Format(PyExc_TypeError, "%s must be an int32 array, got dtype %s", name,
                     PyArray_DESCR(a)->typeobj->tp_name);
        return -1;
    }
    return 0;
}

static int check_dim(PyArrayObject *a, const char *name, int axis, npy_intp want,
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
static const int32_t *lens_array(PyObject *o, const char *name, npy_intp B, int64_t capacity)
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

static int check_page_size(Py_ssize_t P)
{
    if (P <= 0) {
        PyErr_Format(PyExc_ValueError, "page_size must be positive, got %zd", P);
        return -1;
    }
    if (P > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "page_size is too large: %zd", P);
        return -1;
    }
    return 0;
}

static int check_head_dim(npy_intp D, const char *name)
{
    if (D <= 0 || D % 8 != 0 || D > KS_MAX_D) {
        PyErr_Format(PyExc_ValueError,
                     "%s: head dim D must be a positive multiple of 8 up to %d, got %zd", name,
                     KS_MAX_D, (Py_ssize_t)D);
        return -1;
    }
    return 0;
}

static int check_heads(npy_intp H, npy_intp Hkv)
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

static int check_budget(Py_ssize_t token_budget, Py_ssize_t P)
{
    if (token_budget < P) {
        PyErr_Format(PyExc_ValueError, "token_budget (%zd) must be >= page_size (%zd)",
                     token_budget, P);
        return -1;
    }
    return 0;
}

/* scale: None -> 1/sqrt(D), else a real number. */
static int parse_scale(PyObject *o, npy_intp D, float *scale)
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
static PyArrayObject *kv_array(PyObject *o, const char *name, ks_dtype *dt)
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

/* kmin/kmax: [B, Hkv, max_pages, D] of dtype dt, matching the given sizes. */
static PyArrayObject *meta_array(PyObject *o, const char *name, ks_dtype dt, const char *ref,
                                 npy_intp B, npy_intp Hkv, npy_intp max_pages, npy_intp D,
                                 int writeable)
{
    PyArrayObject *a = as_array(o, name, 4, writeable);
    if (!a || same_dtype(a, name, dt, ref) < 0 || check_dim(a, name, 0, B, "B") < 0 ||
        check_dim(a, name, 1, Hkv, "Hkv") < 0)
        return NULL;
    if (max_pages >= 0 && check_dim(a, name, 2, max_pages, "ceil(cap / page_size)") < 0)
        return NULL;
    if (check_dim(a, name, 3, D, "D") < 0)
        return NULL;
    return a;
}

static PyArrayObject *new_array(int nd, npy_intp *dims, int type)
{
    return (PyArrayObject *)PyArray_ZEROS(nd, dims, type, 0);
}

static int np_type(ks_dtype dt)
{
    return dt == KS_F32 ? NPY_FLOAT32 : NPY_FLOAT16;
}

static npy_intp ceil_div(npy_intp a, npy_intp b)
{
    return a / b + (a % b != 0);
}

/* a * b for a, b >= 0, saturated at INT64_MAX (only compared against lengths) */
static int64_t sat_mul(int64_t a, int64_t b)
{
    if (a == 0 || b == 0)
        return 0;
    return a > INT64_MAX / b ? INT64_MAX : a * b;
}

/* CPU kernels return 0 or KS_ERR_NOMEM; call with the GIL held. */
static int kernel_rc(int rc)
{
    if (rc != 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* C-contiguous arrays a (written) and b must not share bytes. */
static int no_overlap(PyArrayObject *a, const char *an, PyArrayObject *b, const char *bn)
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

/* ---- page_metadata -------------------------------------------------------- */

static PyObject *py_page_metadata(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"k", "seq_lens", "page_size", NULL};
    PyObject *ko, *lo;
    Py_ssize_t P = 16;
    PyArrayObject *k, *kmin, *kmax;
    const int32_t *lens;
    ks_dtype dt;
    npy_intp B, Hkv, cap, D, mp, dims[4];
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|n:page_metadata", kwlist, &ko, &lo, &P))
        return NULL;
    if (check_page_size(P) < 0 || !(k = kv_array(ko, "k", &dt)))
        return NULL;
    B = PyArray_DIM(k, 0);
    Hkv = PyArray_DIM(k, 1);
    cap = PyArray_DIM(k, 2);
    D = PyArray_DIM(k, 3);
    if (!(lens = lens_array(lo, "seq_lens", B, cap)))
        return NULL;
    mp = ceil_div(cap, P);
    dims[0] = B;
    dims[1] = Hkv;
    dims[2] = mp;
    dims[3] = D;
    kmin = new_array(4, dims, np_type(dt));
    kmax = new_array(4, dims, np_type(dt));
    if (!kmin || !kmax) {
        Py_XDECREF(kmin);
        Py_XDECREF(kmax);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    ks_quest_page_metadata_cpu(PyArray_DATA(k), dt, B, Hkv, cap, D, NULL, lens, P, mp,
                               PyArray_DATA(kmin), PyArray_DATA(kmax));
    Py_END_ALLOW_THREADS
    return Py_BuildValue("NN", (PyObject *)kmin, (PyObject *)kmax);
}

/* ---- update_metadata ------------------------------------------------------ */

static PyObject *py_update_metadata(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"k", "kmin", "kmax", "start_lens", "seq_lens", "page_size", NULL};
    PyObject *ko, *mino, *maxo, *so, *lo;
    Py_ssize_t P = 16;
    PyArrayObject *k, *kmin, *kmax;
    const int32_t *starts, *lens;
    ks_dtype dt;
    npy_intp B, Hkv, cap, D, mp, i;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|n:update_metadata", kwlist, &ko,
                                     &mino, &maxo, &so, &lo, &P))
        return NULL;
    if (check_page_size(P) < 0 || !(k = kv_array(ko, "k", &dt)))
        return NULL;
    B = PyArray_DIM(k, 0);
    Hkv = PyArray_DIM(k, 1);
    cap = PyArray_DIM(k, 2);
    D = PyArray_DIM(k, 3);
    mp = ceil_div(cap, P);
    if (!(kmin = meta_array(mino, "kmin", dt, "k", B, Hkv, mp, D, 1)) ||
        !(kmax = meta_array(maxo, "kmax", dt, "k", B, Hkv, mp, D, 1)))
        return NULL;
    if (kmin == kmax || PyArray_DATA(kmin) == PyArray_DATA(kmax)) {
        PyErr_SetString(PyExc_ValueError, "kmin and kmax must be different arrays");
        return NULL;
    }
    if (!(lens = lens_array(lo, "seq_lens", B, cap)) ||
        !(starts = lens_array(so, "start_lens", B, cap)))
        return NULL;
    if (no_overlap(kmin, "kmin", kmax, "kmax") < 0 || no_overlap(kmin, "kmin", k, "k") < 0 ||
        no_overlap(kmax, "kmax", k, "k") < 0 ||
        no_overlap(kmin, "kmin", (PyArrayObject *)lo, "seq_lens") < 0 ||
        no_overlap(kmax, "kmax", (PyArrayObject *)lo, "seq_lens") < 0 ||
        no_overlap(kmin, "kmin", (PyArrayObject *)so, "start_lens") < 0 ||
        no_overlap(kmax, "kmax", (PyArrayObject *)so, "start_lens") < 0)
        return NULL;
    for (i = 0; i < B; i++)
        if (starts[i] > lens[i]) {
            PyErr_Format(PyExc_ValueError, "start_lens[%zd] = %d exceeds seq_lens[%zd] = %d",
                         (Py_ssize_t)i, (int)starts[i], (Py_ssize_t)i, (int)lens[i]);
            return NULL;
        }
    Py_BEGIN_ALLOW_THREADS
    ks_quest_page_metadata_cpu(PyArray_DATA(k), dt, B, Hkv, cap, D, starts, lens, P, mp,
                               PyArray_DATA(kmin), PyArray_DATA(kmax));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- page_scores ---------------------------------------------------------- */

static PyObject *py_page_scores(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"q", "kmin", "kmax", "seq_lens", "page_size", "group", NULL};
    PyObject *qo, *mino, *maxo, *lo;
    Py_ssize_t P = 16;
    int group = 1;
    PyArrayObject *q, *kmin, *kmax, *scores;
    const int32_t *lens;
    ks_dtype dt;
    npy_intp B, H, Hkv, D, mp, dims[3];
    int rc = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|np:page_scores", kwlist, &qo, &mino,
                                     &maxo, &lo, &P, &group))
        return NULL;
    if (check_page_size(P) < 0 || !(q = as_array(qo, "q", 3, 0)) || float_dtype(q, "q", &dt) < 0)
        return NULL;
    B = PyArray_DIM(q, 0);
    H = PyArray_DIM(q, 1);
    D = PyArray_DIM(q, 2);
    if (check_head_dim(D, "q") < 0 || !(kmin = as_array(mino, "kmin", 4, 0)))
        return NULL;
    Hkv = PyArray_DIM(kmin, 1);
    mp = PyArray_DIM(kmin, 2);
    if (!(kmin = meta_array(mino, "kmin", dt, "q", B, Hkv, mp, D, 0)) ||
        !(kmax = meta_array(maxo, "kmax", dt, "q", B, Hkv, mp, D, 0)) ||
        check_heads(H, Hkv) < 0 || !(lens = lens_array(lo, "seq_lens", B, sat_mul(mp, P))))
        return NULL;
    dims[0] = B;
    dims[1] = group ? Hkv : H;
    dims[2] = mp;
    if (!(scores = new_array(3, dims, NPY_FLOAT32)))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = ks_quest_page_scores_cpu(PyArray_DATA(q), PyArray_DATA(kmin), PyArray_DATA(kmax), dt, B, H,
                                  Hkv, mp, D, lens, P, group, (float *)PyArray_DATA(scores));
    Py_END_ALLOW_THREADS
    if (kernel_rc(rc) < 0) {
        Py_DECREF(scores);
        return NULL;
    }
    return (PyObject *)scores;
}

/* ---- select_pages --------------------------------------------------------- */

static PyObject *py_select_pages(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"scores", "seq_lens", "page_size", "token_budget", NULL};
    PyObject *so, *lo;
    Py_ssize_t P = 16, budget = 2048;
    PyArrayObject *scores, *idx;
    const int32_t *lens;
    npy_intp B, Hs, mp, n_sel, dims[3];
    int rc = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|nn:select_pages", kwlist, &so, &lo, &P,
                                     &budget))
        return NULL;
    if (check_page_size(P) < 0 || check_budget(budget, P) < 0 ||
        !(scores = as_array(so, "scores", 3, 0)))
        return NULL;
    if (PyArray_TYPE(scores) != NPY_FLOAT32) {
        PyErr_Format(PyExc_TypeError, "scores must be float32, got dtype %s",
                     PyArray_DESCR(scores)->typeobj->tp_name);
        return NULL;
    }
    B = PyArray_DIM(scores, 0);
    Hs = PyArray_DIM(scores, 1);
    mp = PyArray_DIM(scores, 2);
    if (!(lens = lens_array(lo, "seq_lens", B, sat_mul(mp, P))))
        return NULL;
    n_sel = budget / P < mp ? budget / P : mp;
    dims[0] = B;
    dims[1] = Hs;
    dims[2] = n_sel;
    if (!(idx = new_array(3, dims, NPY_INT32)))
        return NULL;
    if (n_sel > 0) {
        Py_BEGIN_ALLOW_THREADS
        rc = ks_quest_select_pages_cpu((const float *)PyArray_DATA(scores), B, Hs, mp, lens, P,
                                       n_sel, (int32_t *)PyArray_DATA(idx));
        Py_END_ALLOW_THREADS
        if (kernel_rc(rc) < 0) {
            Py_DECREF(idx);
            return NULL;
        }
    }
    return (PyObject *)idx;
}

/* ---- sparse_attention ----------------------------------------------------- */

/* The common arguments of the attention functions: q [B, H, D] (already
 * checked, dtype dt) and k, v [B, Hkv, cap, D] of q's dtype, H a multiple of
 * Hkv. 0, or -1 with the exception set. */
static int qkv_arrays(PyArrayObject *q, ks_dtype dt, PyObject *ko, PyObject *vo, PyArrayObject **k,
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

static PyObject *py_sparse_attention(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"q", "k", "v", "page_idx", "seq_lens", "page_size", "scale", NULL};
    PyObject *qo, *ko, *vo, *io, *lo, *scale_o = Py_None;
    Py_ssize_t P = 16;
    PyArrayObject *q, *k, *v, *idx, *out;
    const int32_t *lens, *ip;
    ks_dtype dt;
    npy_intp B, H, Hkv, cap, D, Hs, n_sel, mp, i, n;
    float scale;
    int rc = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|nO:sparse_attention", kwlist, &qo, &ko,
                                     &vo, &io, &lo, &P, &scale_o))
        return NULL;
    if (check_page_size(P) < 0 || !(q = as_array(qo, "q", 3, 0)) || float_dtype(q, "q", &dt) < 0)
        return NULL;
    if (qkv_arrays(q, dt, ko, vo, &k, &v, &B, &H, &Hkv, &cap, &D) < 0)
        return NULL;
    if (parse_scale(scale_o, D, &scale) < 0)
        return NULL;
    if (!(idx = as_array(io, "page_idx", 3, 0)) || is_int32(idx, "page_idx") < 0 ||
        check_dim(idx, "page_idx", 0, B, "B") < 0)
        return NULL;
    Hs = PyArray_DIM(idx, 1);
    n_sel = PyArray_DIM(idx, 2);
    if (Hs != H && Hs != Hkv) {
        PyErr_Format(PyExc_ValueError, "page_idx.shape[1] must be H = %zd or Hkv = %zd, got %zd",
                     (Py_ssize_t)H, (Py_ssize_t)Hkv, (Py_ssize_t)Hs);
        return NULL;
    }
    mp = ceil_div(cap, P);
    ip = (const int32_t *)PyArray_DATA(idx);
    n = B * Hs * n_sel;
    for (i = 0; i < n; i++)
        if (ip[i] < -1 || ip[i] >= mp) {
            PyErr_Format(PyExc_ValueError,
                         "page_idx values must be -1 or in [0, ceil(cap / page_size) = %zd), "
                         "got %d",
                         (Py_ssize_t)mp, (int)ip[i]);
            return NULL;
        }
    if (!(lens = lens_array(lo, "seq_lens", B, cap)))
        return NULL;
    {
        npy_intp dims[3] = {B, H, D};
        if (!(out = new_array(3, dims, np_type(dt))))
            return NULL;
    }
    if (B * H > 0 && n_sel > 0 && cap > 0) {
        Py_BEGIN_ALLOW_THREADS
        rc = ks_quest_sparse_attention_cpu(PyArray_DATA(q), PyArray_DATA(k), PyArray_DATA(v), dt,
                                           B, H, Hkv, cap, D, ip, Hs, n_sel, lens, P, scale,
                                           PyArray_DATA(out));
        Py_END_ALLOW_THREADS
    }
    if (kernel_rc(rc) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

/* ---- attention (fused) ---------------------------------------------------- */

static PyObject *py_attention(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"q",         "k",            "v",     "kmin",  "kmax", "seq_lens",
                             "page_size", "token_budget", "group", "scale", NULL};
    PyObject *qo, *ko, *vo, *mino, *maxo, *lo, *scale_o = Py_None;
    Py_ssize_t P = 16, budget = 2048;
    int group = 1;
    PyArrayObject *q, *k, *v, *kmin, *kmax, *out;
    const int32_t *lens;
    ks_dtype dt;
    npy_intp B, H, Hkv, cap, D, mp, Hs, n_sel;
    float scale, *scores_ws = NULL;
    int32_t *idx_ws = NULL;
    int rc = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOO|nnpO:attention", kwlist, &qo, &ko,
                                     &vo, &mino, &maxo, &lo, &P, &budget, &group, &scale_o))
        return NULL;
    if (check_page_size(P) < 0 || check_budget(budget, P) < 0 ||
        !(q = as_array(qo, "q", 3, 0)) || float_dtype(q, "q", &dt) < 0)
        return NULL;
    if (qkv_arrays(q, dt, ko, vo, &k, &v, &B, &H, &Hkv, &cap, &D) < 0)
        return NULL;
    mp = ceil_div(cap, P);
    if (!(kmin = meta_array(mino, "kmin", dt, "q", B, Hkv, mp, D, 0)) ||
        !(kmax = meta_array(maxo, "kmax", dt, "q", B, Hkv, mp, D, 0)) ||
        !(lens = lens_array(lo, "seq_lens", B, cap)) || parse_scale(scale_o, D, &scale) < 0)
        return NULL;
    Hs = group ? Hkv : H;
    n_sel = budget / P < mp ? budget / P : mp;
    {
        npy_intp dims[3] = {B, H, D};
        if (!(out = new_array(3, dims, np_type(dt))))
            return NULL;
    }
    if (n_sel == 0) /* cap == 0: no token anywhere, output stays zero */
        return (PyObject *)out;
    scores_ws = (float *)PyMem_RawMalloc((size_t)(B * Hs * mp) * sizeof(float));
    idx_ws = (int32_t *)PyMem_RawMalloc((size_t)(B * Hs * n_sel) * sizeof(int32_t));
    if (!scores_ws || !idx_ws) {
        PyMem_RawFree(scores_ws);
        PyMem_RawFree(idx_ws);
        Py_DECREF(out);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    rc = ks_quest_attention_cpu(PyArray_DATA(q), PyArray_DATA(k), PyArray_DATA(v),
                                PyArray_DATA(kmin), PyArray_DATA(kmax), dt, B, H, Hkv, cap, D, mp,
                                lens, P, n_sel, group, scale, scores_ws, idx_ws, PyArray_DATA(out));
    Py_END_ALLOW_THREADS
    PyMem_RawFree(scores_ws);
    PyMem_RawFree(idx_ws);
    if (kernel_rc(rc) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

/* ---- helpers of the SparQ and QAQ functions -------------------------------- */

/* a has the numpy type want (named want_name in the message), else TypeError. */
static int is_type(PyArrayObject *a, const char *name, int want, const char *want_name)
{
    if (PyArray_TYPE(a) != want) {
        PyErr_Format(PyExc_TypeError, "%s must be a %s array, got dtype %s", name, want_name,
                     PyArray_DESCR(a)->typeobj->tp_name);
        return -1;
    }
    return 0;
}

/* PyMem_RawMalloc of n >= 0 elements of size elsize (n as sat_mul gives it);
 * MemoryError on overflow or failure. At least one byte, so that NULL always
 * means failure. */
static void *raw_alloc(int64_t n, size_t elsize)
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

/* ---- sparq_build ---------------------------------------------------------- */

static PyObject *py_sparq_build(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"k", "v", "seq_lens", NULL};
    PyObject *ko, *vo, *lo;
    PyArrayObject *k, *v, *kt, *v_mean;
    const int32_t *lens;
    ks_dtype dt;
    npy_intp B, Hkv, cap, D;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO:sparq_build", kwlist, &ko, &vo, &lo))
        return NULL;
    if (!(k = kv_array(ko, "k", &dt)))
        return NULL;
    B = PyArray_DIM(k, 0);
    Hkv = PyArray_DIM(k, 1);
    cap = PyArray_DIM(k, 2);
    D = PyArray_DIM(k, 3);
    if (!(v = as_array(vo, "v", 4, 0)) || same_dtype(v, "v", dt, "k") < 0 ||
        check_dim(v, "v", 0, B, "B") < 0 || check_dim(v, "v", 1, Hkv, "Hkv") < 0 ||
        check_dim(v, "v", 2, cap, "cap") < 0 || check_dim(v, "v", 3, D, "D") < 0 ||
        !(lens = lens_array(lo, "seq_lens", B, cap)))
        return NULL;
    {
        npy_intp kt_dims[4] = {B, Hkv, D, cap}, vm_dims[3] = {B, Hkv, D};
        kt = new_array(4, kt_dims, np_type(dt));
        v_mean = new_array(3, vm_dims, NPY_FLOAT32);
    }
    if (!kt || !v_mean) {
        Py_XDECREF(kt);
        Py_XDECREF(v_mean);
        return NULL;
    }
    if (B * Hkv * D > 0) {
        Py_BEGIN_ALLOW_THREADS
        ks_sparq_build_cpu(PyArray_DATA(k), PyArray_DATA(v), dt, B, Hkv, cap, D, lens,
                           PyArray_DATA(kt), (float *)PyArray_DATA(v_mean));
        Py_END_ALLOW_THREADS
    }
    return Py_BuildValue("NN", (PyObject *)kt, (PyObject *)v_mean);
}

/* ---- sparq_attention (fused) ---------------------------------------------- */

static PyObject *py_sparq_attention(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"q", "k", "v", "kt", "v_mean", "seq_lens", "r", "k_top",
                             "local_window", "group", "reallocate", "scale", NULL};
    PyObject *qo, *ko, *vo, *kto, *vmo, *lo, *scale_o = Py_None;
    Py_ssize_t r, k_top, local_window = 0;
    int group = 1, reallocate = 1, rc = 0;
    PyArrayObject *q, *k, *v, *kt, *v_mean, *out;
    const int32_t *lens;
    ks_dtype dt;
    npy_intp B, H, Hkv, cap, D, Hs;
    float scale, *s_hat_ws = NULL;
    int32_t *i1_ws = NULL, *i2_ws = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOnn|nppO:sparq_attention", kwlist, &qo,
                                     &ko, &vo, &kto, &vmo, &lo, &r, &k_top, &local_window, &group,
                                     &reallocate, &scale_o))
        return NULL;
    if (!(q = as_array(qo, "q", 3, 0)) || float_dtype(q, "q", &dt) < 0)
        return NULL;
    if (qkv_arrays(q, dt, ko, vo, &k, &v, &B, &H, &Hkv, &cap, &D) < 0)
        return NULL;
    if (!(kt = as_array(kto, "kt", 4, 0)) ||
        same_dtype(kt, "kt", dt, "q") < 0 || check_dim(kt, "kt", 0, B, "B") < 0 ||
        check_dim(kt, "kt", 1, Hkv, "Hkv") < 0 || check_dim(kt, "kt", 2, D, "D") < 0 ||
        check_dim(kt, "kt", 3, cap, "cap") < 0 || !(v_mean = as_array(vmo, "v_mean", 3, 0)) ||
        is_type(v_mean, "v_mean", NPY_FLOAT32, "float32") < 0 ||
        check_dim(v_mean, "v_mean", 0, B, "B") < 0 ||
        check_dim(v_mean, "v_mean", 1, Hkv, "Hkv") < 0 ||
        check_dim(v_mean, "v_mean", 2, D, "D") < 0 || !(lens = lens_array(lo, "seq_lens", B, cap)) ||
        parse_scale(scale_o, D, &scale) < 0)
        return NULL;
    if (r < 1 || r > D) {
        PyErr_Format(PyExc_ValueError,
                     "r (the number of query channels) must be in [1, D = %zd], got %zd",
                     (Py_ssize_t)D, r);
        return NULL;
    }
    if (k_top < 1 || k_top > cap) {
        PyErr_Format(PyExc_ValueError,
                     "k_top (the number of kept positions) must be in [1, cap = %zd], got %zd",
                     (Py_ssize_t)cap, k_top);
        return NULL;
    }
    if (local_window < 0) {
        PyErr_Format(PyExc_ValueError, "local_window must be >= 0, got %zd", local_window);
        return NULL;
    }
    Hs = group ? Hkv : H;
    {
        npy_intp dims[3] = {B, H, D};
        if (!(out = new_array(3, dims, np_type(dt))))
            return NULL;
    }
    if (B * H * D == 0)
        return (PyObject *)out;
    if (!(i1_ws = (int32_t *)raw_alloc(sat_mul(sat_mul(B, Hs), r), sizeof(int32_t))) ||
        !(s_hat_ws = (float *)raw_alloc(sat_mul(sat_mul(B, H), cap), sizeof(float))) ||
        !(i2_ws = (int32_t *)raw_alloc(sat_mul(sat_mul(B, Hs), k_top), sizeof(int32_t)))) {
        PyMem_RawFree(i1_ws);
        PyMem_RawFree(s_hat_ws);
        Py_DECREF(out);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = ks_sparq_attention_cpu(PyArray_DATA(q), PyArray_DATA(k), PyArray_DATA(v),
                                PyArray_DATA(kt), (const float *)PyArray_DATA(v_mean), dt, B, H,
                                Hkv, cap, D, lens, r, k_top, local_window, group, reallocate,
                                scale, i1_ws, s_hat_ws, i2_ws, PyArray_DATA(out));
    Py_END_ALLOW_THREADS
    PyMem_RawFree(i1_ws);
    PyMem_RawFree(s_hat_ws);
    PyMem_RawFree(i2_ws);
    if (kernel_rc(rc) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

/* ---- qaq_attention -------------------------------------------------------- */

/* One quantized cache given as a sequence of six arrays (arena, offsets,
 * widths, sz, oidx, oval), checked against q (B, D, dtype dt) and Hkv; errors
 * name the arrays with the prefix ("k_" / "v_"). Fills st, *cap and *E and
 * returns a new reference to the sequence (it keeps the arrays alive: the
 * caller releases it after the kernel call), or NULL with an exception set. */
static PyObject *qaq_store_arrays(PyObject *o, const char *prefix, npy_intp B, npy_intp Hkv,
                                  npy_intp D, ks_dtype dt, ks_qaq_store *st, npy_intp *cap,
                                  npy_intp *E)
{
    static const char *const names[6] = {"arena", "offsets", "widths", "sz", "oidx", "oval"};
    static const int ndims[6] = {2, 3, 3, 4, 4, 4};
    static const char *const axes[4] = {"B", "Hg", "cap", "n_out"};
    char nm[6][16];
    PyArrayObject *a[6];
    PyObject *seq;
    npy_intp Hg, n_out, A, i;
    int j, ok = 0;
    for (j = 0; j < 6; j++)
        snprintf(nm[j], sizeof nm[j], "%s%s", prefix, names[j]);
    seq = PySequence_Fast(o, "");
    if (!seq || PySequence_Fast_GET_SIZE(seq) != 6) {
        PyErr_Format(PyExc_TypeError,
                     "%sstore must be a sequence of six arrays (arena, offsets, widths, sz, oidx, "
                     "oval), got %s",
                     prefix, Py_TYPE(o)->tp_name);
        Py_XDECREF(seq);
        return NULL;
    }
    for (j = 0; j < 6; j++)
        if (!(a[j] = as_array(PySequence_Fast_GET_ITEM(seq, j), nm[j], ndims[j], 0)))
            goto done;
    if (is_type(a[0], nm[0], NPY_UINT8, "uint8") < 0 || check_dim(a[0], nm[0], 0, B, "B") < 0)
        goto done;
    A = PyArray_DIM(a[0], 1);
    if ((int64_t)A >= ((int64_t)1 << 31)) {
        PyErr_Format(PyExc_ValueError,
                     "%s.shape[1] (bytes per sequence) must be < 2^31 (int32 offsets), got %zd",
                     nm[0], (Py_ssize_t)A);
        goto done;
    }
    if (is_int32(a[1], nm[1]) < 0 || check_dim(a[1], nm[1], 0, B, "B") < 0)
        goto done;
    Hg = PyArray_DIM(a[1], 1);
    *cap = PyArray_DIM(a[1], 2);
    if (Hg != Hkv && Hg != 1) {
        PyErr_Format(PyExc_ValueError,
                     "%s.shape[1] (Hg) must be Hkv = %zd (per-head groups) or 1 (groups shared "
                     "across KV heads), got %zd",
                     nm[1], (Py_ssize_t)Hkv, (Py_ssize_t)Hg);
        goto done;
    }
    if ((int64_t)*cap > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s.shape[2] (cap) must be <= 2^31 - 1, got %zd", nm[1],
                     (Py_ssize_t)*cap);
        goto done;
    }
    if (is_type(a[2], nm[2], NPY_UINT8, "uint8") < 0 || check_dim(a[2], nm[2], 0, B, "B") < 0 ||
        check_dim(a[2], nm[2], 1, Hg, "Hg") < 0 || check_dim(a[2], nm[2], 2, *cap, "cap") < 0 ||
        is_type(a[3], nm[3], NPY_FLOAT16, "float16") < 0 ||
        check_dim(a[3], nm[3], 0, B, "B") < 0 || check_dim(a[3], nm[3], 1, Hg, "Hg") < 0 ||
        check_dim(a[3], nm[3], 2, *cap, "cap") < 0 || check_dim(a[3], nm[3], 3, 2, "2") < 0 ||
        is_type(a[4], nm[4], NPY_INT16, "int16") < 0 || check_dim(a[4], nm[4], 0, B, "B") < 0 ||
        check_dim(a[4], nm[4], 1, Hg, "Hg") < 0 || check_dim(a[4], nm[4], 2, *cap, "cap") < 0)
        goto done;
    n_out = PyArray_DIM(a[4], 3);
    *E = D * (Hkv / Hg);
    if (*E > KS_QAQ_MAX_GROUP) {
        PyErr_Format(PyExc_ValueError,
                     "the group size E = D * Hkv / Hg = %zd (from q and %s) must be <= %d "
                     "(outlier indices are int16)",
                     (Py_ssize_t)*E, nm[1], KS_QAQ_MAX_GROUP);
        goto done;
    }
    if (n_out % 2 != 0 || n_out >= *E) {
        PyErr_Format(PyExc_ValueError,
                     "%s.shape[3] (n_out, outlier slots) must be even and smaller than the "
                     "group size E = %zd, got %zd",
                     nm[4], (Py_ssize_t)*E, (Py_ssize_t)n_out);
        goto done;
    }
    if (same_dtype(a[5], nm[5], dt, "q") < 0)
        goto done;
    for (i = 0; i < 4; i++)
        if (check_dim(a[5], nm[5], (int)i, PyArray_DIM(a[4], i), axes[i]) < 0)
            goto done;
    st->arena = (uint8_t *)PyArray_DATA(a[0]);
    st->A = A;
    st->offsets = (const int32_t *)PyArray_DATA(a[1]);
    st->widths = (uint8_t *)PyArray_DATA(a[2]);
    st->sz = (uint16_t *)PyArray_DATA(a[3]);
    st->oidx = (int16_t *)PyArray_DATA(a[4]);
    st->oval = PyArray_DATA(a[5]);
    st->Hg = Hg;
    st->n_out = n_out;
    ok = 1;
done:
    if (ok)
        return seq;
    Py_DECREF(seq);
    return NULL;
}

static int qaq_valid_width(int w)
{
    return w == 0 || w == 1 || w == 2 || w == 4 || w == 8;
}

/* Values of the groups of tokens t < seq_lens[b]: widths in {0, 1, 2, 4, 8},
 * code bytes inside the arena, outlier indices -1 or in [0, E). */
static int qaq_store_values(const ks_qaq_store *st, const char *prefix, npy_intp B,
                            npy_intp cap, npy_intp E, const int32_t *lens)
{
    npy_intp b, g, t, j;
    for (b = 0; b < B; b++)
        for (g = 0; g < st->Hg; g++)
            for (t = 0; t < lens[b]; t++) {
                const npy_intp i = (b * st->Hg + g) * cap + t;
                const int w = st->widths[i];
                const int64_t nb = (int64_t)E * w / 8, off = st->offsets[i];
                if (!qaq_valid_width(w)) {
                    PyErr_Format(PyExc_ValueError,
                                 "%swidths[%zd, %zd, %zd] = %d is not a width in {0, 1, 2, 4, 8}",
                                 prefix, (Py_ssize_t)b, (Py_ssize_t)g, (Py_ssize_t)t, w);
                    return -1;
                }
                if (nb != 0 && (off < 0 || off + nb > st->A)) {
                    PyErr_Format(PyExc_ValueError,
                                 "%soffsets[%zd, %zd, %zd] = %lld with %lld code bytes does not "
                                 "fit in the arena of %lld bytes",
                                 prefix, (Py_ssize_t)b, (Py_ssize_t)g, (Py_ssize_t)t,
                                 (long long)off, (long long)nb, (long long)st->A);
                    return -1;
                }
                for (j = 0; j < st->n_out; j++) {
                    const int e = st->oidx[i * st->n_out + j];
                    if (e != -1 && (e < 0 || e >= E)) {
                        PyErr_Format(PyExc_ValueError,
                                     "%soidx[%zd, %zd, %zd, %zd] = %d must be -1 or in [0, E = %zd)",
                                     prefix, (Py_ssize_t)b, (Py_ssize_t)g, (Py_ssize_t)t,
                                     (Py_ssize_t)j, e, (Py_ssize_t)E);
                        return -1;
                    }
                }
            }
    return 0;
}

static PyObject *py_qaq_attention(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"q",     "k_store",      "v_store", "seq_lens", "num_kv_heads",
                             "scale", "return_p_max", NULL};
    PyObject *qo, *kso, *vso, *lo, *scale_o = Py_None;
    Py_ssize_t Hkv;
    int return_p_max = 0, rc = 0;
    PyObject *kseq = NULL, *vseq = NULL, *ret = NULL;
    PyArrayObject *q, *out = NULL, *p_max = NULL;
    ks_qaq_store kst, vst;
    const int32_t *lens;
    ks_dtype dt;
    npy_intp B, H, D, kcap, vcap, kE, vE;
    float scale;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOn|Op:qaq_attention", kwlist, &qo, &kso,
                                     &vso, &lo, &Hkv, &scale_o, &return_p_max))
        return NULL;
    if (!(q = as_array(qo, "q", 3, 0)) || float_dtype(q, "q", &dt) < 0)
        return NULL;
    B = PyArray_DIM(q, 0);
    H = PyArray_DIM(q, 1);
    D = PyArray_DIM(q, 2);
    if (Hkv < 1) {
        PyErr_Format(PyExc_ValueError, "num_kv_heads must be >= 1, got %zd", Hkv);
        return NULL;
    }
    if (check_head_dim(D, "q") < 0 || check_heads(H, Hkv) < 0 ||
        !(kseq = qaq_store_arrays(kso, "k_", B, Hkv, D, dt, &kst, &kcap, &kE)) ||
        !(vseq = qaq_store_arrays(vso, "v_", B, Hkv, D, dt, &vst, &vcap, &vE)))
        goto done;
    if (vcap != kcap) {
        PyErr_Format(PyExc_ValueError,
                     "v_offsets.shape[2] (cap) must equal k_offsets.shape[2] = %zd, got %zd",
                     (Py_ssize_t)kcap, (Py_ssize_t)vcap);
        goto done;
    }
    if (!(lens = lens_array(lo, "seq_lens", B, kcap)) ||
        qaq_store_values(&kst, "k_", B, kcap, kE, lens) < 0 ||
        qaq_store_values(&vst, "v_", B, kcap, vE, lens) < 0 || parse_scale(scale_o, D, &scale) < 0)
        goto done;
    {
        npy_intp dims[3] = {B, H, D}, pdims[3] = {B, Hkv, kcap};
        if (!(out = new_array(3, dims, np_type(dt))) ||
            (return_p_max && !(p_max = new_array(3, pdims, NPY_FLOAT32))))
            goto done;
    }
    if (B * H * D > 0) {
        Py_BEGIN_ALLOW_THREADS
        rc = ks_qaq_attention_cpu(PyArray_DATA(q), dt, B, H, Hkv, kcap, D, kst, vst, lens, scale,
                                  p_max ? (float *)PyArray_DATA(p_max) : NULL, PyArray_DATA(out));
        Py_END_ALLOW_THREADS
    }
    if (kernel_rc(rc) < 0)
        goto done;
    if (p_max) {
        ret = Py_BuildValue("OO", (PyObject *)out, (PyObject *)p_max);
    } else {
        Py_INCREF(out);
        ret = (PyObject *)out;
    }
done:
    Py_XDECREF(out);
    Py_XDECREF(p_max);
    Py_XDECREF(kseq);
    Py_XDECREF(vseq);
    return ret;
}

/* ---- module --------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"page_metadata", (PyCFunction)(void (*)(void))py_page_metadata,
     METH_VARARGS | METH_KEYWORDS,
     "page_metadata(k, seq_lens, page_size=16) -> (kmin, kmax)\n\n"
     "Per-page channel-wise min / max of k [B, Hkv, cap, D] over the valid tokens;\n"
     "shape [B, Hkv, ceil(cap / page_size), D]; empty pages are zeros."},
    {"update_metadata", (PyCFunction)(void (*)(void))py_update_metadata,
     METH_VARARGS | METH_KEYWORDS,
     "update_metadata(k, kmin, kmax, start_lens, seq_lens, page_size=16) -> None\n\n"
     "Rewrites in place the pages touched by tokens [start_lens, seq_lens) and the\n"
     "empty pages after them."},
    {"page_scores", (PyCFunction)(void (*)(void))py_page_scores, METH_VARARGS | METH_KEYWORDS,
     "page_scores(q, kmin, kmax, seq_lens, page_size=16, group=True) -> float32 scores\n\n"
     "[B, Hkv or H, max_pages]: sum_d max(q*kmin, q*kmax); -inf for empty pages; group\n"
     "mode sums the scores of the query heads sharing a KV head."},
    {"select_pages", (PyCFunction)(void (*)(void))py_select_pages, METH_VARARGS | METH_KEYWORDS,
     "select_pages(scores, seq_lens, page_size=16, token_budget=2048) -> int32 page_idx\n\n"
     "[B, Hs, min(token_budget // page_size, max_pages)]: the last page plus the best\n"
     "others (ties to the lower index), ascending, padded with -1."},
    {"sparse_attention", (PyCFunction)(void (*)(void))py_sparse_attention,
     METH_VARARGS | METH_KEYWORDS,
     "sparse_attention(q, k, v, page_idx, seq_lens, page_size=16, scale=None) -> out\n\n"
     "Decode attention over the tokens of the selected pages; scale defaults to 1/sqrt(D)."},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_VARARGS | METH_KEYWORDS,
     "attention(q, k, v, kmin, kmax, seq_lens, page_size=16, token_budget=2048, group=True,\n"
     "          scale=None) -> out\n\n"
     "Fused Quest decode: page_scores, select_pages and sparse_attention."},
    {"sparq_build", (PyCFunction)(void (*)(void))py_sparq_build, METH_VARARGS | METH_KEYWORDS,
     "sparq_build(k, v, seq_lens) -> (kt, v_mean)\n\n"
     "SparQ's cache side data: kt [B, Hkv, D, cap] = k transposed (the whole cache), and\n"
     "v_mean float32 [B, Hkv, D], the mean of v over the valid tokens (zeros if none)."},
    {"sparq_attention", (PyCFunction)(void (*)(void))py_sparq_attention,
     METH_VARARGS | METH_KEYWORDS,
     "sparq_attention(q, k, v, kt, v_mean, seq_lens, r, k_top, local_window=0, group=True,\n"
     "                reallocate=True, scale=None) -> out\n\n"
     "Fused SparQ decode: the r largest |q| channels, approximate scores from kt, the\n"
     "k_top best positions (the last local_window always kept), exact attention over them\n"
     "and, with reallocate, the mean-value reallocation with v_mean. group: one channel /\n"
     "position set per KV head (else per query head). scale defaults to 1/sqrt(D)."},
    {"qaq_attention", (PyCFunction)(void (*)(void))py_qaq_attention, METH_VARARGS | METH_KEYWORDS,
     "qaq_attention(q, k_store, v_store, seq_lens, num_kv_heads, scale=None,\n"
     "              return_p_max=False) -> out, or (out, p_max)\n\n"
     "Decode attention over QAQ-quantized caches, dequantized on the fly. k_store / v_store:\n"
     "six arrays each (arena uint8 [B, A], offsets int32 [B, Hg, cap], widths uint8\n"
     "[B, Hg, cap], sz float16 [B, Hg, cap, 2], oidx int16 [B, Hg, cap, n_out], oval\n"
     "[B, Hg, cap, n_out] in q's dtype), e.g. the tensors() of a kvsparse.qaq store as\n"
     "arrays. p_max float32 [B, Hkv, cap]: each token's largest attention probability\n"
     "over the query heads of its KV head. scale defaults to 1/sqrt(D)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    "_kernels_np",
    "kvsparse CPU kernels for NumPy arrays (float32 / float16): Quest, SparQ build and\n"
    "attention, QAQ attention.",
    -1,
    methods,
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
    if (PyModule_AddIntConstant(m, "MAX_HEAD_DIM", KS_MAX_D) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
