/*
 * kvsparse._kernels_np: SparQ (csrc/kernels/sparq_cpu.c): the cache's side
 * data (channel-major keys, value mean) and the fused decode attention.
 */
#include "common.h"

#include "sparq.h"

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

/* ---- method table --------------------------------------------------------- */

PyMethodDef ks_np_sparq_methods[] = {
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
    {NULL, NULL, 0, NULL},
};
