/*
 * SparQ kernels, CPU (OpenMP) implementation. See sparq.h for the semantics.
 *
 * fp16 / bf16 rows are converted chunk by chunk into small float32 buffers;
 * all arithmetic is float32. Per-thread scratch is allocated once per
 * parallel region. Every parallel region has an if() clause: decode-sized
 * work runs on the calling thread, since forking a team costs more than it.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ks_cpu_util.h"
#include "ks_cpu_dtype.h"
#include "sparq.h"

/* Work (element visits / multiply-adds) from which a kernel goes parallel. */
#define SP_PAR_MIN ((int64_t)1 << 16)
/* Channels / tokens handled per chunk with stack buffers. */
#define SP_CHUNK 256

static inline int64_t sp_clamp_len(int32_t len, int64_t cap)
{
    return len < 0 ? 0 : (len > cap ? cap : (int64_t)len);
}

/* ---- 1. cache maintenance -------------------------------------------------- */

#define SP_TT 64 /* tokens per transpose tile */

void ks_sparq_build_cpu(const void *k, const void *v, ks_dtype dt, int64_t B, int64_t Hkv,
                        int64_t cap, int64_t D, const int32_t *seq_lens, void *kt,
                        float *v_mean)
{
    const int64_t BH = B * Hkv, ntile = (cap + SP_TT - 1) / SP_TT;
    int64_t bh, tile;
    /* kt: tiles of SP_TT tokens x D channels, read row-major, written column-major */
#pragma omp parallel for collapse(2) schedule(static) if (BH * cap * D >= SP_PAR_MIN)
    for (bh = 0; bh < BH; bh++)
        for (tile = 0; tile < ntile; tile++) {
            const int64_t t0 = tile * SP_TT, t1 = t0 + SP_TT < cap ? t0 + SP_TT : cap;
            int64_t t, d;
            if (dt == KS_F32) {
                const float *src = (const float *)k + bh * cap * D;
                float *dst = (float *)kt + bh * D * cap;
                for (d = 0; d < D; d++)
                    for (t = t0; t < t1; t++)
                        dst[d * cap + t] = src[t * D + d];
            } else {
                const uint16_t *src = (const uint16_t *)k + bh * cap * D;
                uint16_t *dst = (uint16_t *)kt + bh * D * cap;
                for (d = 0; d < D; d++)
                    for (t = t0; t < t1; t++)
                        dst[d * cap + t] = src[t * D + d];
            }
        }
    /* v_mean: float32 sums over the valid tokens */
#pragma omp parallel for schedule(static) if (BH * cap * D >= SP_PAR_MIN)
    for (bh = 0; bh < BH; bh++) {
        const int64_t len = sp_clamp_len(seq_lens[bh / Hkv], cap);
        float acc[SP_CHUNK], row[SP_CHUNK];
        int64_t c0, t, d;
        for (c0 = 0; c0 < D; c0 += SP_CHUNK) {
            const int64_t cn = D - c0 < SP_CHUNK ? D - c0 : SP_CHUNK;
            for (d = 0; d < cn; d++)
                acc[d] = 0.f;
            for (t = 0; t < len; t++) {
                const float *x = ks_row_f32(ks_cptr(v, dt, (bh * cap + t) * D + c0), dt, cn, row);
                for (d = 0; d < cn; d++)
                    acc[d] += x[d];
            }
            for (d = 0; d < cn; d++)
                v_mean[bh * D + c0 + d] = len > 0 ? acc[d] / (float)len : 0.f;
        }
    }
}

void ks_sparq_append_cpu(const void *k_new, const void *v_new, ks_dtype dt, int64_t B,
                         int64_t Hkv, int64_t cap, int64_t D, int64_t n_new,
                         const int32_t *seq_lens, void *k, void *v, void *kt, float *v_mean)
{
    const int64_t BH = B * Hkv;
    const size_t esz = ks_dtype_size(dt);
    int64_t bh;
    if (n_new <= 0)
        return;
#pragma omp parallel for schedule(static) if (BH * n_new * D >= SP_PAR_MIN)
    for (bh = 0; bh < BH; bh++) {
        const int64_t len = seq_lens[bh / Hkv];
        float sum[SP_CHUNK], row[SP_CHUNK];
        int64_t i, d, c0;
        if (len < 0 || len + n_new > cap)
            continue;
        for (i = 0; i < n_new; i++) {
            const int64_t src = (bh * n_new + i) * D, dst = (bh * cap + len + i) * D;
            memcpy(ks_ptr(k, dt, dst), ks_cptr(k_new, dt, src), (size_t)D * esz);
            memcpy(ks_ptr(v, dt, dst), ks_cptr(v_new, dt, src), (size_t)D * esz);
            if (dt == KS_F32) {
                const float *s = (const float *)k_new + src;
                float *o = (float *)kt + bh * D * cap + len + i;
                for (d = 0; d < D; d++)
                    o[d * cap] = s[d];
            } else {
                const uint16_t *s = (const uint16_t *)k_new + src;
                uint16_t *o = (uint16_t *)kt + bh * D * cap + len + i;
                for (d = 0; d < D; d++)
                    o[d * cap] = s[d];
            }
        }
        for (c0 = 0; c0 < D; c0 += SP_CHUNK) {
            const int64_t cn = D - c0 < SP_CHUNK ? D - c0 : SP_CHUNK;
            const float n_tot = (float)(len + n_new), nn = (float)n_new;
            float *vm = v_mean + bh * D + c0;
            for (d = 0; d < cn; d++)
                sum[d] = 0.f;
            for (i = 0; i < n_new; i++) {
                const float *x =
                    ks_row_f32(ks_cptr(v_new, dt, (bh * n_new + i) * D + c0), dt, cn, row);
                for (d = 0; d < cn; d++)
                    sum[d] += x[d];
            }
            for (d = 0; d < cn; d++)
                vm[d] += (sum[d] - nn * vm[d]) / n_tot;
        }
    }
}

/* ---- 2. top-r channels ------------------------------------------------------ */

typedef struct {
    float key;
    int32_t idx;
} sp_item;

/* descending key, ties to the lower index */
static int sp_item_cmp(const void *pa, const void *pb)
{
    const sp_item *a = (const sp_item *)pa, *b = (const sp_item *)pb;
    if (a->key > b->key)
        return -1;
    if (a->key < b->key)
        return 1;
    return (a->idx > b->idx) - (a->idx < b->idx);
}

int ks_sparq_top_channels_cpu(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t D,
                              int64_t r, int64_t group_size, int32_t *i1)
{
    const int64_t G = group_size, Hs = H / G;
    int64_t b, row;
    int oom = 0;
#pragma omp parallel if (B * H * D >= SP_PAR_MIN)
    {
        /* items[D], keys[D], qrow[D], flags[D] */
        sp_item *items = (sp_item *)malloc((size_t)D * sizeof(sp_item));
        float *buf = (float *)malloc((size_t)(2 * D) * sizeof(float));
        unsigned char *flag = (unsigned char *)malloc((size_t)D);
        if (!items || !buf || !flag) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for collapse(2) schedule(static)
        for (b = 0; b < B; b++)
            for (row = 0; row < Hs; row++) {
                int32_t *out = i1 + (b * Hs + row) * r;
                int64_t g, d, w = 0;
                if (!items || !buf || !flag)
                    continue;
                {
                    float *key = buf, *qr = buf + D;
                    for (d = 0; d < D; d++)
                        key[d] = 0.f;
                    for (g = 0; g < G; g++) {
                        const float *x =
                            ks_row_f32(ks_cptr(q, dt, (b * H + row * G + g) * D), dt, D, qr);
                        for (d = 0; d < D; d++)
                            key[d] += fabsf(x[d]);
                    }
                    for (d = 0; d < D; d++) {
                        items[d].key = ks_key(key[d]);
                        items[d].idx = (int32_t)d;
                        flag[d] = 0;
                    }
                }
                qsort(items, (size_t)D, sizeof(sp_item), sp_item_cmp);
                for (d = 0; d < r; d++)
                    flag[items[d].idx] = 1;
                for (d = 0; d < D && w < r; d++)
                    if (flag[d])
                        out[w++] = (int32_t)d;
            }
        free(items);
        free(buf);
        free(flag);
    }
    return oom ? KS_ERR_NOMEM : 0;
}

/* ---- 3. approximate scores --------------------------------------------------- */

#define SP_TCH 512 /* tokens per chunk of the score accumulation */

int ks_sparq_approx_scores_cpu(const void *q, const void *kt, ks_dtype dt, int64_t B, int64_t H,
                                int64_t Hkv, int64_t cap, int64_t D, const int32_t *i1,
                                int64_t Hs1, int64_t r, const int32_t *seq_lens, float *s_hat)
{
    const int64_t G = H / Hkv;
    const int64_t nh = (Hs1 == H) ? 1 : G;
    int64_t b, row;
    int oom = 0;
#pragma omp parallel if (B * H * cap * (r + 4) >= SP_PAR_MIN)
    {
        /* qf: D, qs: nh*r, xbuf: SP_TCH */
        float *buf = (float *)malloc((size_t)(D + nh * r + SP_TCH) * sizeof(float));
        if (!buf) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (b = 0; b < B; b++)
            for (row = 0; row < Hs1; row++) {
                const int64_t h0 = (Hs1 == H) ? row : row * G, hk = h0 / G;
                const int64_t len = sp_clamp_len(seq_lens[b], cap);
                const int32_t *ci = i1 + (b * Hs1 + row) * r;
                float *qf, *qs, *xb;
                int64_t g, j, t, t0;
                for (g = 0; g < nh; g++) { /* the invalid tail first */
                    float *s = s_hat + (b * H + h0 + g) * cap;
                    for (t = buf ? len : 0; t < cap; t++)
                        s[t] = 0.f;
                }
                if (!buf || len == 0)
                    continue;
                qf = buf;
                qs = qf + D;
                xb = qs + nh * r;
                for (g = 0; g < nh; g++) {
                    float l1 = 0.f, l1s = 0.f, inv_tau;
                    ks_load_row(ks_cptr(q, dt, (b * H + h0 + g) * D), dt, D, qf);
                    for (j = 0; j < D; j++)
                        l1 += fabsf(qf[j]);
                    for (j = 0; j < r; j++)
                        l1s += fabsf(qf[ci[j]]);
                    inv_tau = l1s > 0.f ? 1.f / sqrtf((float)D * (l1s / l1)) : 0.f;
                    for (j = 0; j < r; j++)
                        qs[g * r + j] = qf[ci[j]] * inv_tau;
                    memset(s_hat + (b * H + h0 + g) * cap, 0, (size_t)len * sizeof(float));
                }
                /* logits: channel-major, one contiguous kt row chunk at a time */
                for (t0 = 0; t0 < len; t0 += SP_TCH) {
                    const int64_t n = len - t0 < SP_TCH ? len - t0 : SP_TCH;
                    for (j = 0; j < r; j++) {
                        const float *x = ks_row_f32(
                            ks_cptr(kt, dt, ((b * Hkv + hk) * D + ci[j]) * cap + t0), dt, n, xb);
                        for (g = 0; g < nh; g++) {
                            const float w = qs[g * r + j];
                            float *s = s_hat + (b * H + h0 + g) * cap + t0;
                            for (t = 0; t < n; t++)
                                s[t] += w * x[t];
                        }
                    }
                }
                /* softmax over the valid tokens */
                for (g = 0; g < nh; g++) {
                    float *s = s_hat + (b * H + h0 + g) * cap;
                    float m = -INFINITY, sum = 0.f;
                    for (t = 0; t < len; t++)
                        m = s[t] > m ? s[t] : m;
                    for (t = 0; t < len; t++) {
                        s[t] = expf(s[t] - m);
                        sum += s[t];
                    }
                    for (t = 0; t < len; t++)
                        s[t] = s[t] / sum;
                }
            }
        free(buf);
    }
    return oom ? KS_ERR_NOMEM : 0;
}

/* ---- 4. top-k positions ------------------------------------------------------- */

int ks_sparq_top_positions_cpu(const float *s_hat, int64_t B, int64_t H, int64_t cap,
                               const int32_t *seq_lens, int64_t n_sel, int64_t local_window,
                               int64_t group_size, int32_t *i2)
{
    const int64_t G = group_size, Hs = H / G;
    int64_t b, row;
    int oom = 0;
#pragma omp parallel if (B * H * cap * 4 >= SP_PAR_MIN)
    {
        int32_t *heap = (int32_t *)malloc((size_t)(n_sel > 0 ? n_sel : 1) * sizeof(int32_t));
        float *keys = G > 1 ? (float *)malloc((size_t)(cap > 0 ? cap : 1) * sizeof(float)) : NULL;
        if (!heap || (G > 1 && !keys)) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (b = 0; b < B; b++)
            for (row = 0; row < Hs; row++) {
                const int64_t len = sp_clamp_len(seq_lens[b], cap);
                int32_t *out = i2 + (b * Hs + row) * n_sel;
                int64_t t, w = 0;
                if (n_sel >= len) {
                    for (t = 0; t < len; t++)
                        out[w++] = (int32_t)t;
                } else if (heap && (G == 1 || keys)) {
                    const int64_t lw = local_window < n_sel ? local_window : n_sel;
                    const int64_t m = len - lw, kk = n_sel - lw;
                    const float *key;
                    if (G == 1) {
                        key = s_hat + (b * H + row) * cap;
                    } else {
                        int64_t g;
                        for (t = 0; t < m; t++)
                            keys[t] = 0.f;
                        for (g = 0; g < G; g++) {
                            const float *s = s_hat + (b * H + row * G + g) * cap;
                            for (t = 0; t < m; t++)
                                keys[t] += s[t];
                        }
                        key = keys;
                    }
                    if (kk > 0) {
                        int64_t n = 0;
                        for (t = 0; t < m; t++) {
                            if (n < kk) {
                                heap[n] = (int32_t)t;
                                ks_heap_up(heap, n, key);
                                n++;
                            } else if (ks_above(key, (int32_t)t, heap[0])) {
                                heap[0] = (int32_t)t;
                                ks_heap_down(heap, n, 0, key);
                            }
                        }
                        /* heap[0] is the kk-th best; the order is total, so exactly
                         * kk positions rank at or above it */
                        {
                            const int32_t thr = heap[0];
                            for (t = 0; t < m && w < kk; t++)
                                if (t == thr || ks_above(key, (int32_t)t, thr))
                                    out[w++] = (int32_t)t;
                        }
                    }
                    for (t = m; t < len; t++)
                        out[w++] = (int32_t)t;
                }
                for (; w < n_sel; w++)
                    out[w] = -1;
            }
        free(heap);
        free(keys);
    }
    return oom ? KS_ERR_NOMEM : 0;
}

/* ---- 5. sparse attention + mean-value reallocation ------------------------------ */

#define SP_ACH 64 /* i2 entries per online-softmax step */

int ks_sparq_sparse_attention_cpu(const void *q, const void *k, const void *v, ks_dtype dt,
                                  int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                                  const int32_t *i2, int64_t Hs2, int64_t n_sel,
                                  const float *s_hat, const float *v_mean, const int32_t *seq_lens,
                                  float scale, int reallocate, void *out)
{
    const int64_t G = H / Hkv;
    const int64_t nh = (Hs2 == H) ? 1 : G;
    int64_t b, row;
    int oom = 0;
#pragma omp parallel if (B * H * n_sel * D * 2 >= SP_PAR_MIN)
    {
        /* qf, acc: nh*D; kbuf, vbuf: D; sbuf: nh*SP_ACH; m, l, alpha, bad: nh */
        float *buf = (float *)malloc((size_t)(2 * nh * D + 2 * D + nh * SP_ACH + 4 * nh) *
                                     sizeof(float));
        if (!buf) {
#pragma omp atomic write
            oom = 1;
        }
        int32_t tok[SP_ACH];
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (b = 0; b < B; b++)
            for (row = 0; row < Hs2; row++) {
                const int64_t h0 = (Hs2 == H) ? row : row * G, hk = h0 / G;
                const int64_t len = sp_clamp_len(seq_lens[b], cap);
                const int32_t *sel = i2 + (b * Hs2 + row) * n_sel;
                const int64_t kvbase = (b * Hkv + hk) * cap;
                float *qf, *acc, *kbuf, *vbuf, *sbuf, *m, *l, *alpha, *bad;
                int64_t e0, d, j, t;
                int seen = 0;
                if (!buf)
                    continue;
                qf = buf;
                acc = qf + nh * D;
                kbuf = acc + nh * D;
                vbuf = kbuf + D;
                sbuf = vbuf + D;
                m = sbuf + nh * SP_ACH;
                l = m + nh;
                alpha = l + nh;
                bad = alpha + nh;
                ks_load_row(ks_cptr(q, dt, (b * H + h0) * D), dt, nh * D, qf);
                for (d = 0; d < nh * D; d++) {
                    qf[d] *= scale;
                    acc[d] = 0.f;
                }
                for (j = 0; j < nh; j++) {
                    m[j] = -INFINITY;
                    l[j] = 0.f;
                    alpha[j] = 0.f;
                    bad[j] = 0.f;
                }
                for (e0 = 0; e0 < n_sel; e0 += SP_ACH) {
                    const int64_t e1 = e0 + SP_ACH < n_sel ? e0 + SP_ACH : n_sel;
                    int64_t n = 0, e;
                    for (e = e0; e < e1; e++)
                        if (sel[e] >= 0 && sel[e] < len)
                            tok[n++] = sel[e];
                    if (n == 0)
                        continue;
                    seen = 1;
                    if (reallocate)
                        for (j = 0; j < nh; j++) {
                            const float *sh = s_hat + (b * H + h0 + j) * cap;
                            for (t = 0; t < n; t++)
                                alpha[j] += sh[tok[t]];
                        }
                    for (t = 0; t < n; t++) {
                        const float *kr =
                            ks_row_f32(ks_cptr(k, dt, (kvbase + tok[t]) * D), dt, D, kbuf);
                        for (j = 0; j < nh; j++)
                            sbuf[j * SP_ACH + t] = ks_dot(qf + j * D, kr, D);
                    }
                    for (j = 0; j < nh; j++) {
                        float pm = -INFINITY, psum = 0.f;
                        float *sj = sbuf + j * SP_ACH;
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
                            sj[t] = m[j] == -INFINITY ? 0.f : expf(sj[t] - m[j]);
                            psum += sj[t];
                        }
                        l[j] += psum;
                    }
                    for (t = 0; t < n; t++) {
                        const float *vr =
                            ks_row_f32(ks_cptr(v, dt, (kvbase + tok[t]) * D), dt, D, vbuf);
                        for (j = 0; j < nh; j++) {
                            const float ew = sbuf[j * SP_ACH + t];
                            float *aj = acc + j * D;
                            for (d = 0; d < D; d++)
                                aj[d] += ew * vr[d];
                        }
                    }
                }
                for (j = 0; j < nh; j++) {
                    float *aj = acc + j * D;
                    const float inv = l[j] > 0.f ? 1.f / l[j] : 0.f;
                    /* NaN policy (ks_dtype.h): NaN / +inf logits, or all -inf, give NaN */
                    const int nan_row = bad[j] != 0.f || (seen && m[j] == -INFINITY);
                    for (d = 0; d < D; d++)
                        aj[d] = nan_row ? NAN : aj[d] * inv;
                    if (reallocate) {
                        const float a = alpha[j], ma = 1.f - alpha[j];
                        const float *vm = v_mean + (b * Hkv + hk) * D;
                        for (d = 0; d < D; d++)
                            aj[d] = a * aj[d] + ma * vm[d];
                    }
                    ks_store_row(aj, dt, D, ks_ptr(out, dt, (b * H + h0 + j) * D));
                }
            }
        free(buf);
    }
    return oom ? KS_ERR_NOMEM : 0;
}

/* ---- 6. fused decode ------------------------------------------------------------- */

int ks_sparq_attention_cpu(const void *q, const void *k, const void *v, const void *kt,
                           const float *v_mean, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                           int64_t cap, int64_t D, const int32_t *seq_lens, int64_t r,
                           int64_t k_top, int64_t local_window, int group_mode, int reallocate,
                           float scale, int32_t *i1_ws, float *s_hat_ws, int32_t *i2_ws,
                           void *out)
{
    const int64_t gs = group_mode ? H / Hkv : 1, Hs = H / gs;
    int rc = ks_sparq_top_channels_cpu(q, dt, B, H, D, r, gs, i1_ws);
    if (rc == 0)
        rc = ks_sparq_approx_scores_cpu(q, kt, dt, B, H, Hkv, cap, D, i1_ws, Hs, r, seq_lens,
                                        s_hat_ws);
    if (rc == 0)
        rc = ks_sparq_top_positions_cpu(s_hat_ws, B, H, cap, seq_lens, k_top, local_window, gs,
                                        i2_ws);
    if (rc == 0)
        rc = ks_sparq_sparse_attention_cpu(q, k, v, dt, B, H, Hkv, cap, D, i2_ws, Hs, k_top,
                                           s_hat_ws, v_mean, seq_lens, scale, reallocate, out);
    return rc;
}
