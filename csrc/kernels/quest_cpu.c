/*
 * Quest kernels, CPU (OpenMP) implementation. See quest.h for the semantics.
 *
 * fp16 / bf16 rows are converted to small per-thread float32 buffers; all
 * arithmetic is float32. Per-thread scratch is allocated once per parallel
 * region (never per token).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ks_cpu_util.h"
#include "ks_cpu_dtype.h"
#include "quest.h"

/* ceil(len / P) without forming len + P - 1 (P may be as large as INT64_MAX) */
static inline int64_t ks_n_pages(int32_t len, int64_t P)
{
    return len <= 0 ? 0 : (int64_t)len / P + ((int64_t)len % P != 0);
}

/* end of page p's tokens: min((p + 1) * P, len, cap) for p * P < len, without overflow */
static inline int64_t ks_page_end(int64_t p, int64_t P, int64_t len, int64_t cap)
{
    const int64_t t0 = p * P, lim = len < cap ? len : cap;
    return lim - t0 < P ? lim : t0 + P;
}

/* NaN-propagating min / max: a NaN element makes the result NaN */
static inline float ks_nmin(float a, float b)
{
    return (b < a || b != b) ? b : a;
}
static inline float ks_nmax(float a, float b)
{
    return (b > a || b != b) ? b : a;
}

/* sum_d max(q*lo, q*hi); NaN when any product is NaN */
static inline float ks_bound(const float *q, const float *lo, const float *hi, int64_t n)
{
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t d = 0, j;
    for (; d + 8 <= n; d += 8)
        for (j = 0; j < 8; j++) {
            float x = q[d + j] * lo[d + j], y = q[d + j] * hi[d + j];
            acc[j] += x > y ? x : (x == x ? y : x);
        }
    for (; d < n; d++) {
        float x = q[d] * lo[d], y = q[d] * hi[d];
        acc[0] += x > y ? x : (x == x ? y : x);
    }
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* ---- 1. metadata ---------------------------------------------------------- */

#define KS_MD_CHUNK 256

/* Work (in multiply-adds or element visits) below which a kernel runs on the
 * calling thread: forking a team costs tens of microseconds, more when the
 * cores are busy, which is more than a decode-sized step takes serially. */
#define KS_PAR_MIN ((int64_t)1 << 17)

void ks_quest_page_metadata_cpu(const void *k, ks_dtype dt, int64_t B, int64_t Hkv, int64_t cap,
                                int64_t D, const int32_t *start_lens, const int32_t *seq_lens,
                                int64_t page_size, int64_t max_pages, void *kmin, void *kmax)
{
    const int64_t P = page_size;
    int64_t b, h, p;
    /* a full build touches every token; an append only a page or two per head */
    const int64_t Pw = P < cap ? P : cap; /* tokens per page that exist */
    const int64_t work = start_lens ? B * Hkv * max_pages : B * Hkv * max_pages * Pw * D;
#pragma omp parallel for collapse(3) schedule(static) if (work >= KS_PAR_MIN)
    for (b = 0; b < B; b++)
        for (h = 0; h < Hkv; h++)
            for (p = 0; p < max_pages; p++) {
                const int32_t len = seq_lens[b];
                const int64_t first = start_lens ? (int64_t)start_lens[b] / P : 0;
                const int64_t np = ks_n_pages(len, P);
                const int64_t moff = ((b * Hkv + h) * max_pages + p) * D;
                if (p < first)
                    continue;
                if (p >= np) {
                    memset(ks_ptr(kmin, dt, moff), 0, (size_t)D * ks_dtype_size(dt));
                    memset(ks_ptr(kmax, dt, moff), 0, (size_t)D * ks_dtype_size(dt));
                    continue;
                }
                {
                    float lo[KS_MD_CHUNK], hi[KS_MD_CHUNK], row[KS_MD_CHUNK];
                    const int64_t t0 = p * P;
                    const int64_t t1 = ks_page_end(p, P, len, cap);
                    int64_t c0;
                    for (c0 = 0; c0 < D; c0 += KS_MD_CHUNK) {
                        const int64_t cn = D - c0 < KS_MD_CHUNK ? D - c0 : KS_MD_CHUNK;
                        const int64_t kbase = (b * Hkv + h) * cap;
                        int64_t t, d;
                        ks_load_row(ks_cptr(k, dt, (kbase + t0) * D + c0), dt, cn, lo);
                        memcpy(hi, lo, (size_t)cn * sizeof(float));
                        for (t = t0 + 1; t < t1; t++) {
                            const float *r =
                                ks_row_f32(ks_cptr(k, dt, (kbase + t) * D + c0), dt, cn, row);
                            for (d = 0; d < cn; d++) {
                                lo[d] = ks_nmin(lo[d], r[d]);
                                hi[d] = ks_nmax(hi[d], r[d]);
                            }
                        }
                        ks_store_row(lo, dt, cn, ks_ptr(kmin, dt, moff + c0));
                        ks_store_row(hi, dt, cn, ks_ptr(kmax, dt, moff + c0));
                    }
                }
            }
}

/* ---- 2. scores ------------------------------------------------------------ */

/* q as float32: q itself for KS_F32, else a converted copy (NULL on OOM). */
static float *ks_q_to_f32(const void *q, ks_dtype dt, int64_t n)
{
    float *qf = (float *)malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    int64_t r, chunk = 4096, nchunks = (n + chunk - 1) / chunk;
    if (!qf)
        return NULL;
#pragma omp parallel for schedule(static) if (n >= KS_PAR_MIN)
    for (r = 0; r < nchunks; r++) {
        int64_t s = r * chunk, e = s + chunk < n ? s + chunk : n;
        ks_load_row(ks_cptr(q, dt, s), dt, e - s, qf + s);
    }
    return qf;
}

static int ks_scores_impl(const float *qf, const void *kmin, const void *kmax, ks_dtype dt,
                           int64_t B, int64_t H, int64_t Hkv, int64_t max_pages, int64_t D,
                           const int32_t *seq_lens, int64_t page_size, int group_mode,
                           float *scores)
{
    const int64_t G = H / Hkv;
    int64_t b, hk, p;
    int oom = 0;
#pragma omp parallel if (B * H * max_pages * D >= KS_PAR_MIN)
    {
        float *lo = NULL, *hi = NULL;
        if (dt != KS_F32) {
            lo = (float *)malloc((size_t)(2 * D) * sizeof(float));
            hi = lo ? lo + D : NULL;
            if (!lo) {
#pragma omp atomic write
                oom = 1;
            }
        }
#pragma omp for collapse(3) schedule(static)
        for (b = 0; b < B; b++)
            for (hk = 0; hk < Hkv; hk++)
                for (p = 0; p < max_pages; p++) {
                    const int64_t np = ks_n_pages(seq_lens[b], page_size);
                    const int64_t moff = ((b * Hkv + hk) * max_pages + p) * D;
                    int64_t g;
                    if (p >= np || (dt != KS_F32 && !lo)) {
                        if (group_mode)
                            scores[(b * Hkv + hk) * max_pages + p] = -INFINITY;
                        else
                            for (g = 0; g < G; g++)
                                scores[(b * H + hk * G + g) * max_pages + p] = -INFINITY;
                        continue;
                    }
                    {
                        const float *l = ks_row_f32(ks_cptr(kmin, dt, moff), dt, D, lo);
                        const float *u = ks_row_f32(ks_cptr(kmax, dt, moff), dt, D, hi);
                        float sum = 0.f;
                        for (g = 0; g < G; g++) {
                            const int64_t h = hk * G + g;
                            const float s = ks_bound(qf + (b * H + h) * D, l, u, D);
                            if (group_mode)
                                sum += s;
                            else
                                scores[(b * H + h) * max_pages + p] = s;
                        }
                        if (group_mode)
                            scores[(b * Hkv + hk) * max_pages + p] = sum;
                    }
                }
        free(lo);
    }
    return oom ? KS_ERR_NOMEM : 0;
}

int ks_quest_page_scores_cpu(const void *q, const void *kmin, const void *kmax, ks_dtype dt,
                             int64_t B, int64_t H, int64_t Hkv, int64_t max_pages, int64_t D,
                             const int32_t *seq_lens, int64_t page_size, int group_mode,
                             float *scores)
{
    float *qf = NULL;
    const float *qp;
    if (dt == KS_F32) {
        qp = (const float *)q;
    } else {
        qf = ks_q_to_f32(q, dt, B * H * D);
        if (!qf)
            return KS_ERR_NOMEM;
        qp = qf;
    }
    {
        const int rc = ks_scores_impl(qp, kmin, kmax, dt, B, H, Hkv, max_pages, D, seq_lens,
                                      page_size, group_mode, scores);
        free(qf);
        return rc;
    }
}

/* ---- 3. selection --------------------------------------------------------- */

int ks_quest_select_pages_cpu(const float *scores, int64_t B, int64_t Hs, int64_t max_pages,
                              const int32_t *seq_lens, int64_t page_size, int64_t n_sel,
                              int32_t *page_idx)
{
    int64_t b, r;
    int oom = 0;
#pragma omp parallel if (B * Hs * max_pages * 8 >= KS_PAR_MIN)
    {
        int32_t *heap = (int32_t *)malloc((size_t)(n_sel > 0 ? n_sel : 1) * sizeof(int32_t));
        if (!heap) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for collapse(2) schedule(static)
        for (b = 0; b < B; b++)
            for (r = 0; r < Hs; r++) {
                const float *sc = scores + (b * Hs + r) * max_pages;
                int32_t *out = page_idx + (b * Hs + r) * n_sel;
                int64_t np = ks_n_pages(seq_lens[b], page_size), i, w = 0;
                if (np > max_pages)
                    np = max_pages;
                if (np <= n_sel) {
                    for (i = 0; i < np; i++)
                        out[w++] = (int32_t)i;
                } else if (heap) {
                    const int64_t kk = n_sel - 1; /* pages to pick among 0..np-2 */
                    int64_t n = 0;
                    if (kk > 0) {
                        for (i = 0; i < np - 1; i++) {
                            if (n < kk) {
                                heap[n] = (int32_t)i;
                                ks_heap_up(heap, n, sc);
                                n++;
                            } else if (ks_above(sc, (int32_t)i, heap[0])) {
                                heap[0] = (int32_t)i;
                                ks_heap_down(heap, n, 0, sc);
                            }
                        }
                        /* heap[0] is the kk-th best page; the order is total, so
                         * exactly kk pages rank at or above it */
                        {
                            const int32_t thr = heap[0];
                            for (i = 0; i < np - 1 && w < kk; i++)
                                if (i == thr || ks_above(sc, (int32_t)i, thr))
                                    out[w++] = (int32_t)i;
                        }
                    }
                    out[w++] = (int32_t)(np - 1);
                }
                for (; w < n_sel; w++)
                    out[w] = -1;
            }
        free(heap);
    }
    return oom ? KS_ERR_NOMEM : 0;
}

/* ---- 4. sparse attention -------------------------------------------------- */

/* One work item is a selection row (b, r): the nh query heads h0 .. h0+nh-1
 * that read it (all G heads of KV head r in group mode, the single head r in
 * head mode) share every K / V row, so each row is converted once. Online
 * softmax per page: the page's logits are computed first, then the running
 * max / sum / accumulator are rescaled once per page. */
int ks_quest_sparse_attention_cpu(const void *q, const void *k, const void *v, ks_dtype dt,
                                  int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                                  const int32_t *page_idx, int64_t Hs, int64_t n_sel,
                                  const int32_t *seq_lens, int64_t page_size, float scale,
                                  void *out)
{
    const int64_t G = H / Hkv, P = page_size;
    const int64_t nh = (Hs == H) ? 1 : G; /* query heads per selection row */
    /* a page never holds more than min(P, cap) tokens: the logit buffer's row */
    const int64_t Pb = P < cap ? P : (cap > 0 ? cap : 1);
    int64_t b, r;
    int oom = 0;
#pragma omp parallel if (B * H * n_sel * Pb * D * 2 >= KS_PAR_MIN)
    {
        /* qf, acc: nh*D each; kbuf, vbuf: D each; sbuf: nh*Pb; m, l, bad: nh each */
        float *buf = (float *)malloc((size_t)(2 * nh * D + 2 * D + nh * Pb + 3 * nh) *
                                     sizeof(float));
        if (!buf) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (b = 0; b < B; b++)
            for (r = 0; r < Hs; r++) {
                const int64_t h0 = (Hs == H) ? r : r * G;
                const int64_t hk = h0 / G;
                const int32_t len = seq_lens[b];
                const int64_t np = ks_n_pages(len, P);
                const int32_t *sel = page_idx + (b * Hs + r) * n_sel;
                const int64_t kvbase = (b * Hkv + hk) * cap;
                float *qf, *acc, *kbuf, *vbuf, *sbuf, *m, *l, *bad;
                int64_t i, d, j;
                int seen = 0;
                if (!buf)
                    continue;
                qf = buf;
                acc = qf + nh * D;
                kbuf = acc + nh * D;
                vbuf = kbuf + D;
                sbuf = vbuf + D;
                m = sbuf + nh * Pb;
                l = m + nh;
                bad = l + nh;
                ks_load_row(ks_cptr(q, dt, (b * H + h0) * D), dt, nh * D, qf);
                for (d = 0; d < nh * D; d++) {
                    qf[d] *= scale;
                    acc[d] = 0.f;
                }
                for (j = 0; j < nh; j++) {
                    m[j] = -INFINITY;
                    l[j] = 0.f;
                    bad[j] = 0.f;
                }
                for (i = 0; i < n_sel; i++) {
                    const int64_t p = sel[i];
                    int64_t t0, t1, t, n;
                    if (p < 0 || p >= np)
                        continue;
                    t0 = p * P;
                    t1 = ks_page_end(p, P, len, cap);
                    n = t1 - t0;
                    if (n <= 0)
                        continue;
                    seen = 1;
                    /* logits of the page's tokens, per head */
                    for (t = 0; t < n; t++) {
                        const float *kr =
                            ks_row_f32(ks_cptr(k, dt, (kvbase + t0 + t) * D), dt, D, kbuf);
                        for (j = 0; j < nh; j++)
                            sbuf[j * Pb + t] = ks_dot(qf + j * D, kr, D);
                    }
                    /* rescale the running state to the new max, turn logits into weights */
                    for (j = 0; j < nh; j++) {
                        float pm = -INFINITY, psum = 0.f;
                        float *sj = sbuf + j * Pb;
                        for (t = 0; t < n; t++) {
                            /* a NaN or +inf logit makes dense softmax NaN */
                            if (sj[t] != sj[t] || sj[t] == INFINITY)
                                bad[j] = 1.f;
                            pm = sj[t] > pm ? sj[t] : pm;
                        }
                        if (pm > m[j]) {
                            const float corr = expf(m[j] - pm); /* 0 when m == -inf */
                            float *aj = acc + j * D;
                            m[j] = pm;
                            l[j] *= corr;
                            for (d = 0; d < D; d++)
                                aj[d] *= corr;
                        }
                        for (t = 0; t < n; t++) {
                            /* all logits -inf so far: such tokens carry no weight */
                            sj[t] = m[j] == -INFINITY ? 0.f : expf(sj[t] - m[j]);
                            psum += sj[t];
                        }
                        l[j] += psum;
                    }
                    /* accumulate the values */
                    for (t = 0; t < n; t++) {
                        const float *vr =
                            ks_row_f32(ks_cptr(v, dt, (kvbase + t0 + t) * D), dt, D, vbuf);
                        for (j = 0; j < nh; j++) {
                            const float e = sbuf[j * Pb + t];
                            float *aj = acc + j * D;
                            for (d = 0; d < D; d++)
                                aj[d] += e * vr[d];
                        }
                    }
                }
                for (j = 0; j < nh; j++) {
                    void *o = ks_ptr(out, dt, (b * H + h0 + j) * D);
                    /* NaN policy (ks_dtype.h): as dense attention, a NaN / +inf logit,
                     * or tokens whose logits are all -inf, give a NaN row */
                    if (bad[j] != 0.f || (seen && m[j] == -INFINITY)) {
                        for (d = 0; d < D; d++)
                            acc[j * D + d] = NAN;
                        ks_store_row(acc + j * D, dt, D, o);
                    } else if (l[j] > 0.f) {
                        const float inv = 1.f / l[j];
                        float *aj = acc + j * D;
                        for (d = 0; d < D; d++)
                            aj[d] *= inv;
                        ks_store_row(aj, dt, D, o);
                    } else {
                        memset(o, 0, (size_t)D * ks_dtype_size(dt));
                    }
                }
            }
        free(buf);
    }
    return oom ? KS_ERR_NOMEM : 0;
}

/* ---- 5. fused decode ------------------------------------------------------ */

int ks_quest_attention_cpu(const void *q, const void *k, const void *v, const void *kmin,
                           const void *kmax, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                           int64_t cap, int64_t D, int64_t max_pages, const int32_t *seq_lens,
                           int64_t page_size, int64_t n_sel, int group_mode, float scale,
                           float *scores_ws, int32_t *page_idx_ws, void *out)
{
    const int64_t Hs = group_mode ? Hkv : H;
    int rc = ks_quest_page_scores_cpu(q, kmin, kmax, dt, B, H, Hkv, max_pages, D, seq_lens,
                                      page_size, group_mode, scores_ws);
    if (rc == 0)
        rc = ks_quest_select_pages_cpu(scores_ws, B, Hs, max_pages, seq_lens, page_size, n_sel,
                                       page_idx_ws);
    if (rc == 0)
        rc = ks_quest_sparse_attention_cpu(q, k, v, dt, B, H, Hkv, cap, D, page_idx_ws, Hs, n_sel,
                                           seq_lens, page_size, scale, out);
    return rc;
}
