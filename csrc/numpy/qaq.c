/*
 * kvsparse._kernels_np: QAQ (csrc/kernels/qaq_cpu.c): decode attention over
 * quantized caches. Everything particular to QAQ's storage (the arrays of a
 * store, the checks of their shapes and values) is in this file; it uses
 * only the generic checks of common.h.
 */
#include "common.h"

#include <stdio.h>

#include "qaq.h"

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

/* ---- method table --------------------------------------------------------- */

PyMethodDef ks_np_qaq_methods[] = {
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
