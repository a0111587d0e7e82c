/*
 * kvsparse._kernels_np: Quest (csrc/kernels/quest_cpu.c): page metadata,
 * page scores, page selection, sparse attention over the selected pages and
 * the fused decode attention.
 */
#include "common.h"

#include "quest.h"

/* ---- Quest's checks ------------------------------------------------------- */

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

static int check_budget(Py_ssize_t token_budget, Py_ssize_t P)
{
    if (token_budget < P) {
        PyErr_Format(PyExc_ValueError, "token_budget (%zd) must be >= page_size (%zd)",
                     token_budget, P);
        return -1;
    }
    return 0;
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

/* ---- method table --------------------------------------------------------- */

PyMethodDef ks_np_quest_methods[] = {
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
    {NULL, NULL, 0, NULL},
};
