/*
 * QAQ over width-binned pages, CPU (OpenMP) implementation. See qaqp.h for the
 * format and the semantics.
 *
 * append: a serial pass hands out pages and slots in the order of qaqp.h
 * (cheap: a few integer operations per token), then the tokens are quantized
 * in parallel into their slots, then (with bounds) a serial pass folds each
 * token's dequantized keys into its page's bounds.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ks_cpu_util.h"
#include "ks_cpu_dtype.h"
#include "qaqp.h"
#include "qaq_group_cpu.h"

#define QP_PAR_MIN ((int64_t)1 << 16)

/* ---- page fields ---------------------------------------------------------- */

static inline uint8_t *qp_page(uint8_t *arena, int32_t a) { return arena + (int64_t)a * 16; }

static inline uint64_t qp_mask(const uint8_t *pg)
{
    uint64_t m;
    memcpy(&m, pg, 8);
    return m;
}

static inline void qp_set_mask(uint8_t *pg, uint64_t m) { memcpy(pg, &m, 8); }

/* Writes a fresh page header of class (wk, wv): empty mask, no slot used,
 * positions -1, bounds +inf / -inf. */
static void qp_init_page(uint8_t *pg, ks_qaqp_geom g, ks_dtype dt, int wk, int wv,
                         const ks_qaqp_layout *L)
{
    int64_t i;
    int32_t *pos = (int32_t *)(pg + L->pos);
    memset(pg, 0, 16);
    pg[8] = (uint8_t)wk;
    pg[9] = (uint8_t)wv;
    for (i = 0; i < KS_QAQP_P; i++)
        pos[i] = -1;
    if (g.nb) {
        for (i = 0; i < g.D; i++) {
            const float inf = INFINITY, ninf = -INFINITY;
            ks_store_row(&inf, dt, 1, ks_ptr(pg + L->kmin, dt, i));
            ks_store_row(&ninf, dt, 1, ks_ptr(pg + L->kmax, dt, i));
        }
    }
}

/* Folds the dequantized keys of slot s into its page's bounds (rounded to the
 * cache dtype first: min / max commute with rounding; NaN propagates).
 * row: 3 * D floats of scratch. */
static void qp_bound_slot(uint8_t *pg, ks_qaqp_geom g, ks_dtype dt, int64_t s, float *row)
{
    const int64_t D = g.D;
    const size_t esz = ks_dtype_size(dt);
    const ks_qaqp_layout L = ks_qaqp_layout_of(g, pg[8], pg[9]);
    float *mn = row + D, *mx = row + 2 * D;
    int64_t d;
    ks_qaqg_unpack(pg[8] ? pg + L.kc + s * L.sk : NULL, pg[8], (const uint16_t *)(pg + L.ksz) + 2 * s,
                   (const int16_t *)(pg + L.koi) + s * g.n_out_k,
                   pg + L.kov + s * g.n_out_k * (int64_t)esz, dt, g.n_out_k, D, 0, D, row);
    {
        uint8_t *tmp = (uint8_t *)mn; /* mn's bytes serve as the dtype buffer */
        ks_store_row(row, dt, D, tmp);
        ks_load_row(tmp, dt, D, row);
    }
    ks_load_row(pg + L.kmin, dt, D, mn);
    ks_load_row(pg + L.kmax, dt, D, mx);
    for (d = 0; d < D; d++) {
        const float x = row[d];
        if (x != x || mn[d] != mn[d])
            mn[d] = NAN;
        else
            mn[d] = x < mn[d] ? x : mn[d];
        if (x != x || mx[d] != mx[d])
            mx[d] = NAN;
        else
            mx[d] = x > mx[d] ? x : mx[d];
    }
    ks_store_row(mn, dt, D, pg + L.kmin);
    ks_store_row(mx, dt, D, pg + L.kmax);
}

/* ---- 1. append -------------------------------------------------------------------- */

int ks_qaqp_append_cpu(const void *k, const void *v, ks_dtype dt, int64_t B, int64_t Hkv,
                       int64_t n, ks_qaqp_geom g, const uint8_t *wk, const uint8_t *wv,
                       const int32_t *pos0, const int32_t *pos, const int32_t *count,
                       uint8_t *arena, int64_t A, int64_t *top, int32_t *open, int32_t *pages,
                       int64_t maxp, int32_t *n_pages, int32_t *flags)
{
    const int64_t D = g.D, ntok = B * Hkv * n;
    const size_t esz = ks_dtype_size(dt);
    /* per token: its page address (-1: skipped) and slot */
    int32_t *addr = (int32_t *)malloc((size_t)(ntok > 0 ? ntok : 1) * sizeof(int32_t));
    uint8_t *slot = (uint8_t *)malloc((size_t)(ntok > 0 ? ntok : 1));
    int64_t bh, it;
    int oom = 0, range = 0;
    if (!addr || !slot) {
        free(addr);
        free(slot);
        return KS_ERR_NOMEM;
    }
    /* pass 1 (serial): pages and slots, in the order of qaqp.h */
    for (bh = 0; bh < B * Hkv; bh++) {
        const int64_t b = bh / Hkv;
        const int64_t cnt = count[b] < 0 ? 0 : (count[b] > n ? n : count[b]);
        int32_t *op = open + bh * KS_QAQP_NCLASS, *pl = pages + bh * maxp;
        int64_t i;
        for (i = 0; i < n; i++)
            addr[bh * n + i] = -1;
        for (i = 0; i < cnt; i++) {
            const int64_t ti = bh * n + i;
            const int kw = wk[ti], vw = wv[ti], c = ks_qaqp_class(kw, vw);
            int32_t a;
            int pk, pv;
            ks_qaqp_layout L = {0};
            uint8_t *pg;
            if (c < 0)
                continue;
            a = op[c];
            if (!(ks_qaqp_page_at(arena, A, g, a, &pk, &pv, &L) && pk == kw && pv == vw
                  && qp_page(arena, a)[10] < KS_QAQP_P)) {
                /* a new page */
                const int64_t np = n_pages[bh];
                L = ks_qaqp_layout_of(g, kw, vw);
                if (np < 0 || np >= maxp) {
                    *flags |= KS_QAQP_FLAG_PAGES;
                    continue;
                }
                if (*top < 0 || *top > INT32_MAX || *top * 16 + L.bytes > A) {
                    *flags |= KS_QAQP_FLAG_ARENA;
                    continue;
                }
                a = (int32_t)*top;
                *top += L.bytes / 16;
                qp_init_page(qp_page(arena, a), g, dt, kw, vw, &L);
                pl[np] = a;
                n_pages[bh] = (int32_t)(np + 1);
                op[c] = a;
            }
            pg = qp_page(arena, a);
            {
                const int s = pg[10];
                pg[10] = (uint8_t)(s + 1);
                qp_set_mask(pg, qp_mask(pg) | ((uint64_t)1 << s));
                ((int32_t *)(pg + L.pos))[s] = pos ? pos[ti] : (int32_t)((int64_t)pos0[b] + i);
                addr[ti] = a;
                slot[ti] = (uint8_t)s;
            }
        }
    }
    /* pass 2 (parallel): quantize every placed token into its slot */
#pragma omp parallel if (ntok * D * 8 >= QP_PAR_MIN)
    {
        const int64_t ns = (g.n_out_k > g.n_out_v ? g.n_out_k : g.n_out_v) / 2 + 1;
        float *buf = (float *)malloc((size_t)D * sizeof(float));
        uint64_t *heap = (uint64_t *)malloc((size_t)ns * sizeof(uint64_t));
        uint8_t *out = (uint8_t *)malloc((size_t)D);
        if (!buf || !heap || !out) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (it = 0; it < ntok; it++) {
            int side;
            uint8_t *pg;
            ks_qaqp_layout L = {0};
            if (addr[it] < 0 || !buf || !heap || !out)
                continue;
            pg = qp_page(arena, addr[it]);
            L = ks_qaqp_layout_of(g, pg[8], pg[9]);
            for (side = 0; side < 2; side++) {
                const void *x = side ? v : k;
                const int w = side ? pg[9] : pg[8];
                const int64_t n_out = side ? g.n_out_v : g.n_out_k, s = slot[it];
                const int64_t st = side ? L.sv : L.sk;
                int16_t *oi = (int16_t *)(pg + (side ? L.voi : L.koi)) + s * n_out;
                uint8_t *ov = pg + (side ? L.vov : L.kov) + s * n_out * (int64_t)esz;
                uint8_t *codes = pg + (side ? L.vc : L.kc) + s * st;
                uint16_t *sz = (uint16_t *)(pg + (side ? L.vsz : L.ksz)) + 2 * s;
                int64_t j;
                ks_load_row(ks_cptr(x, dt, it * D), dt, D, buf);
                ks_qaqg_pick_outliers(buf, D, n_out / 2, oi, out, heap);
                for (j = 0; j < n_out; j++) { /* the element's own bits (exact) */
                    if (oi[j] >= 0)
                        memcpy(ov + j * esz, ks_cptr(x, dt, it * D + oi[j]), esz);
                    else
                        memset(ov + j * esz, 0, esz);
                }
                if (w > 0)
                    memset(codes, 0, (size_t)st);
                if (ks_qaqg_pack(buf, D, w, out, w ? codes : NULL, sz)) {
#pragma omp atomic write
                    range = 1;
                }
            }
        }
        free(buf);
        free(heap);
        free(out);
    }
    /* pass 3 (serial): page bounds over the dequantized keys */
    if (g.nb && !oom) {
        float *row = (float *)malloc((size_t)D * 3 * sizeof(float));
        if (!row)
            oom = 1;
        for (it = 0; row && it < ntok; it++)
            if (addr[it] >= 0)
                qp_bound_slot(qp_page(arena, addr[it]), g, dt, slot[it], row);
        free(row);
    }
    free(addr);
    free(slot);
    return oom ? KS_ERR_NOMEM : range ? KS_ERR_RANGE : 0;
}

/* ---- slot access ------------------------------------------------------------------ */

/* the dequantized keys (side 0) or values (side 1) of slot s of a page */
static inline void qp_slot(const uint8_t *pg, const ks_qaqp_layout *L, ks_qaqp_geom g,
                           ks_dtype dt, int side, int64_t s, float *dst)
{
    const size_t esz = ks_dtype_size(dt);
    const int w = side ? pg[9] : pg[8];
    const int64_t n_out = side ? g.n_out_v : g.n_out_k;
    ks_qaqg_unpack(w ? pg + (side ? L->vc + s * L->sv : L->kc + s * L->sk) : NULL, w,
                   (const uint16_t *)(pg + (side ? L->vsz : L->ksz)) + 2 * s,
                   (const int16_t *)(pg + (side ? L->voi : L->koi)) + s * n_out,
                   pg + (side ? L->vov : L->kov) + s * n_out * (int64_t)esz, dt, n_out, g.D, 0,
                   g.D, dst);
}

/* ---- 2. dequantize ---------------------------------------------------------------- */

int ks_qaqp_dequantize_cpu(const uint8_t *arena, int64_t A, ks_qaqp_geom g, ks_dtype dt,
                           int64_t B, int64_t Hkv, const int32_t *plist, int64_t L,
                           void *kout, void *vout, int32_t *pos_out)
{
    const int64_t D = g.D, P = KS_QAQP_P;
    int64_t it;
    int oom = 0;
#pragma omp parallel if (B * Hkv * L * P * D >= QP_PAR_MIN)
    {
        float *row = (float *)malloc((size_t)D * sizeof(float));
        if (!row) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (it = 0; it < B * Hkv * L; it++) {
            int wk, wv;
            ks_qaqp_layout lay = {0};
            const int ok = ks_qaqp_page_at(arena, A, g, plist[it], &wk, &wv, &lay);
            const uint8_t *pg = ok ? arena + (int64_t)plist[it] * 16 : NULL;
            const uint64_t m = ok ? qp_mask(pg) : 0;
            int64_t s, d;
            if (!row)
                continue;
            for (s = 0; s < P; s++) {
                const int64_t r = it * P + s;
                if (!((m >> s) & 1u)) {
                    for (d = 0; d < D; d++)
                        row[d] = 0.f;
                    ks_store_row(row, dt, D, ks_ptr(kout, dt, r * D));
                    ks_store_row(row, dt, D, ks_ptr(vout, dt, r * D));
                    pos_out[r] = -1;
                    continue;
                }
                qp_slot(pg, &lay, g, dt, 0, s, row);
                ks_store_row(row, dt, D, ks_ptr(kout, dt, r * D));
                qp_slot(pg, &lay, g, dt, 1, s, row);
                ks_store_row(row, dt, D, ks_ptr(vout, dt, r * D));
                pos_out[r] = ((const int32_t *)(pg + lay.pos))[s];
            }
        }
        free(row);
    }
    return oom ? KS_ERR_NOMEM : 0;
}

/* ---- 3. attention ----------------------------------------------------------------- */

int ks_qaqp_attention_cpu(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                          const uint8_t *arena, int64_t A, ks_qaqp_geom g,
                          const int32_t *plist, int64_t L, float scale, float *p_max,
                          void *out)
{
    const int64_t G = H / Hkv, D = g.D, P = KS_QAQP_P, n_slot = L * P;
    int64_t bh;
    int oom = 0;
#pragma omp parallel if (B * H * n_slot * D * 2 >= QP_PAR_MIN)
    {
        /* qf, acc: G*D; row: D; s: G*n_slot; slot list: n_slot */
        const int64_t ns1 = n_slot > 0 ? n_slot : 1;
        float *buf = (float *)malloc((size_t)(2 * G * D + D + G * ns1) * sizeof(float));
        int64_t *live = (int64_t *)malloc((size_t)ns1 * sizeof(int64_t));
        if (!buf || !live) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (bh = 0; bh < B * Hkv; bh++) {
            const int64_t b = bh / Hkv, hk = bh % Hkv;
            const int32_t *pl = plist + bh * L;
            float *qf, *acc, *row, *s;
            int64_t gq, t, d, u, n = 0; /* n live slots, live[0 .. n) = j * P + slot */
            if (!buf || !live)
                continue;
            qf = buf;
            acc = qf + G * D;
            row = acc + G * D;
            s = row + D;
            ks_load_row(ks_cptr(q, dt, (b * H + hk * G) * D), dt, G * D, qf);
            for (d = 0; d < G * D; d++) {
                qf[d] *= scale;
                acc[d] = 0.f;
            }
            for (u = 0; u < L; u++) {
                int wk, wv;
                ks_qaqp_layout lay = {0};
                const uint8_t *pg;
                uint64_t m;
                int64_t i;
                if (!ks_qaqp_page_at(arena, A, g, pl[u], &wk, &wv, &lay))
                    continue;
                pg = arena + (int64_t)pl[u] * 16;
                m = qp_mask(pg);
                for (i = 0; i < P; i++) {
                    if (!((m >> i) & 1u))
                        continue;
                    qp_slot(pg, &lay, g, dt, 0, i, row);
                    for (gq = 0; gq < G; gq++)
                        s[gq * ns1 + n] = ks_dot(qf + gq * D, row, D);
                    live[n++] = u * P + i;
                }
            }
            for (gq = 0; gq < G; gq++) {
                float *sg = s + gq * ns1, mx = -INFINITY, sum = 0.f, inv;
                int bad = 0;
                for (t = 0; t < n; t++) {
                    /* NaN policy (ks_dtype.h): a NaN or +inf logit, or all -inf, give NaN */
                    if (sg[t] != sg[t] || sg[t] == INFINITY)
                        bad = 1;
                    mx = sg[t] > mx ? sg[t] : mx;
                }
                if (n > 0 && mx == -INFINITY)
                    bad = 1;
                for (t = 0; t < n; t++) {
                    sg[t] = bad ? NAN : expf(sg[t] - mx);
                    sum += sg[t];
                }
                inv = sum > 0.f ? 1.f / sum : (bad ? NAN : 0.f);
                for (t = 0; t < n; t++)
                    sg[t] *= inv;
            }
            for (t = 0; t < n; t++) {
                const int64_t j = live[t] / P, i = live[t] % P;
                const uint8_t *pg = arena + (int64_t)pl[j] * 16;
                const ks_qaqp_layout lay = ks_qaqp_layout_of(g, pg[8], pg[9]);
                qp_slot(pg, &lay, g, dt, 1, i, row);
                for (gq = 0; gq < G; gq++) {
                    const float p = s[gq * ns1 + t];
                    float *a = acc + gq * D;
                    for (d = 0; d < D; d++)
                        a[d] += p * row[d];
                }
            }
            ks_store_row(acc, dt, G * D, ks_ptr(out, dt, (b * H + hk * G) * D));
            if (p_max) {
                float *pm = p_max + bh * n_slot;
                for (u = 0; u < n_slot; u++)
                    pm[u] = 0.f;
                for (t = 0; t < n; t++) {
                    float m = s[t];
                    for (gq = 1; gq < G; gq++)
                        m = s[gq * ns1 + t] > m ? s[gq * ns1 + t] : m;
                    pm[live[t]] = m;
                }
            }
        }
        free(buf);
        free(live);
    }
    return oom ? KS_ERR_NOMEM : 0;
}

/* ---- 4. re-quantization: take out the tokens that move ------------------------------ */

int ks_qaqp_requant_take_cpu(uint8_t *arena, int64_t A, ks_qaqp_geom g, ks_dtype dt, int64_t B,
                             int64_t Hkv, const int32_t *plist, int64_t L, const uint8_t *new_wk,
                             const uint8_t *new_wv, int64_t n, void *kout, void *vout,
                             uint8_t *wk_out, uint8_t *wv_out, int32_t *pos_out, int32_t *moved)
{
    const int64_t D = g.D, P = KS_QAQP_P;
    int64_t bh;
    int oom = 0;
#pragma omp parallel if (B * Hkv * L * P * D >= QP_PAR_MIN)
    {
        float *row = (float *)malloc((size_t)(D > 0 ? D : 1) * sizeof(float));
        if (!row) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (bh = 0; bh < B * Hkv; bh++) {
            int64_t j, r = 0, d;
            if (!row)
                continue;
            /* the move set is decided from the masks at entry; a page is visited in
             * the order of its listing, and its own slots are cleared as they go,
             * so a later listing of the same page sees them gone */
            for (j = 0; j < L && r < n; j++) {
                const int32_t a = plist[bh * L + j];
                int wk, wv;
                ks_qaqp_layout lay = {0};
                uint8_t *pg;
                uint64_t m, gone = 0;
                int64_t i;
                if (!ks_qaqp_page_at(arena, A, g, a, &wk, &wv, &lay))
                    continue;
                pg = qp_page(arena, a);
                m = qp_mask(pg);
                for (i = 0; i < P && r < n; i++) {
                    const int64_t ti = (bh * L + j) * P + i;
                    const int nk = new_wk[ti], nv = new_wv[ti];
                    if (!((m >> i) & 1u) || ks_qaqp_class(nk, nv) < 0 || (nk == wk && nv == wv)
                        || nk > wk || nv > wv)
                        continue;
                    qp_slot(pg, &lay, g, dt, 0, i, row);
                    ks_store_row(row, dt, D, ks_ptr(kout, dt, (bh * n + r) * D));
                    qp_slot(pg, &lay, g, dt, 1, i, row);
                    ks_store_row(row, dt, D, ks_ptr(vout, dt, (bh * n + r) * D));
                    wk_out[bh * n + r] = (uint8_t)nk;
                    wv_out[bh * n + r] = (uint8_t)nv;
                    pos_out[bh * n + r] = ((const int32_t *)(pg + lay.pos))[i];
                    gone |= (uint64_t)1 << i;
                    r++;
                }
                qp_set_mask(pg, m & ~gone);
            }
            moved[bh] = (int32_t)r;
            for (d = 0; d < D; d++)
                row[d] = 0.f;
            for (; r < n; r++) {
                ks_store_row(row, dt, D, ks_ptr(kout, dt, (bh * n + r) * D));
                ks_store_row(row, dt, D, ks_ptr(vout, dt, (bh * n + r) * D));
                wk_out[bh * n + r] = 255;
                wv_out[bh * n + r] = 255;
                pos_out[bh * n + r] = -1;
            }
        }
        free(row);
    }
    return oom ? KS_ERR_NOMEM : 0;
}

/* ---- 5. compaction ---------------------------------------------------------------------
 * Two passes over each (b, hk)'s source pages: count the live tokens of each class
 * (which fixes every new page's address: consecutive in (b, hk, class) order), then
 * copy the tokens slot by slot into their new pages. Serial over (b, hk) for the
 * addresses, parallel over (b, hk) for the copies. */

/* copies slot s of page src (layout L) to slot t of page dst (same class) */
static void qp_copy_slot(uint8_t *dst, const uint8_t *src, const ks_qaqp_layout *L, ks_qaqp_geom g,
                         int64_t t, int64_t s)
{
    const int64_t ds = g.ds;
    memcpy(dst + L->pos + 4 * t, src + L->pos + 4 * s, 4);
    memcpy(dst + L->ksz + 4 * t, src + L->ksz + 4 * s, 4);
    memcpy(dst + L->vsz + 4 * t, src + L->vsz + 4 * s, 4);
    memcpy(dst + L->kc + L->sk * t, src + L->kc + L->sk * s, (size_t)L->sk);
    memcpy(dst + L->vc + L->sv * t, src + L->vc + L->sv * s, (size_t)L->sv);
    memcpy(dst + L->koi + 2 * g.n_out_k * t, src + L->koi + 2 * g.n_out_k * s, (size_t)(2 * g.n_out_k));
    memcpy(dst + L->kov + ds * g.n_out_k * t, src + L->kov + ds * g.n_out_k * s, (size_t)(ds * g.n_out_k));
    memcpy(dst + L->voi + 2 * g.n_out_v * t, src + L->voi + 2 * g.n_out_v * s, (size_t)(2 * g.n_out_v));
    memcpy(dst + L->vov + ds * g.n_out_v * t, src + L->vov + ds * g.n_out_v * s, (size_t)(ds * g.n_out_v));
}

int ks_qaqp_compact_cpu(const uint8_t *src, int64_t A_src, ks_qaqp_geom g, ks_dtype dt, int64_t B,
                        int64_t Hkv, const int32_t *pages_src, int64_t maxp_src,
                        const int32_t *n_pages_src, uint8_t *dst, int64_t A_dst, int64_t *top,
                        int32_t *open, int32_t *pages, int64_t maxp, int32_t *n_pages,
                        int32_t *flags)
{
    const int64_t NB = B * Hkv, NC = KS_QAQP_NCLASS, P = KS_QAQP_P;
    /* live tokens per (b, hk, class), and the address of its first new page (-1: none) */
    int64_t *live = (int64_t *)calloc((size_t)(NB > 0 ? NB : 1) * NC, sizeof(int64_t));
    int64_t *first = (int64_t *)malloc((size_t)(NB > 0 ? NB : 1) * NC * sizeof(int64_t));
    /* how many new pages of (b, hk) come before its class c */
    int64_t *rank0 = (int64_t *)malloc((size_t)(NB > 0 ? NB : 1) * NC * sizeof(int64_t));
    int64_t bh, end = 0, last = 0;
    int oom = 0, fl = 0;
    if (!live || !first || !rank0) {
        free(live);
        free(first);
        free(rank0);
        return KS_ERR_NOMEM;
    }
#pragma omp parallel for schedule(static) if (NB * maxp_src >= 4096)
    for (bh = 0; bh < NB; bh++) {
        const int64_t np = n_pages_src[bh] < 0 ? 0 : (n_pages_src[bh] > maxp_src ? maxp_src : n_pages_src[bh]);
        int64_t j;
        for (j = 0; j < np; j++) {
            int wk, wv;
            ks_qaqp_layout lay = {0};
            const int32_t a = pages_src[bh * maxp_src + j];
            if (ks_qaqp_page_at(src, A_src, g, a, &wk, &wv, &lay))
                live[bh * NC + ks_qaqp_class(wk, wv)] += __builtin_popcountll(qp_mask(src + (int64_t)a * 16));
        }
    }
    /* addresses (serial): which new pages are written, top, the page lists */
    for (bh = 0; bh < NB; bh++) {
        int64_t c, np = 0, rank = 0;
        for (c = 0; c < NC; c++) {
            const int64_t cnt = live[bh * NC + c], npg = (cnt + P - 1) / P;
            const int64_t sz = ks_qaqp_layout_of(g, c / 5 == 0 ? 0 : 1 << (c / 5 - 1),
                                                 c % 5 == 0 ? 0 : 1 << (c % 5 - 1)).bytes / 16;
            int64_t p;
            first[bh * NC + c] = npg ? end : -1;
            rank0[bh * NC + c] = rank;
            rank += npg;
            open[bh * NC + c] = -1;
            for (p = 0; p < npg; p++, end += sz) {
                if ((end + sz) * 16 > A_dst || end > INT32_MAX) {
                    fl |= KS_QAQP_FLAG_ARENA;
                    continue;
                }
                if (np >= maxp) {
                    fl |= KS_QAQP_FLAG_PAGES;
                    continue;
                }
                pages[bh * maxp + np++] = (int32_t)end;
                open[bh * NC + c] = (int32_t)end;
                last = end + sz;
            }
        }
        n_pages[bh] = (int32_t)np;
        for (; np < maxp; np++)
            pages[bh * maxp + np] = -1;
    }
    *top = last;
    *flags |= fl;
    /* copies (parallel over (b, hk)) */
#pragma omp parallel if (NB * maxp_src * P * g.D >= QP_PAR_MIN)
    {
        float *row = (float *)malloc((size_t)g.D * 3 * sizeof(float));
        if (!row) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (bh = 0; bh < NB; bh++) {
            const int64_t np = n_pages_src[bh] < 0 ? 0 : (n_pages_src[bh] > maxp_src ? maxp_src : n_pages_src[bh]);
            int64_t c;
            if (!row)
                continue;
            for (c = 0; c < NC; c++) {
                const int wk = c / 5 == 0 ? 0 : 1 << (c / 5 - 1), wv = c % 5 == 0 ? 0 : 1 << (c % 5 - 1);
                const ks_qaqp_layout lay = ks_qaqp_layout_of(g, wk, wv);
                const int64_t cnt = live[bh * NC + c];
                int64_t j, t = 0; /* t: the class's token index */
                const int64_t sz = lay.bytes / 16;
                uint8_t *pg;
                if (!cnt)
                    continue;
                for (j = 0; j < np && t < cnt; j++) {
                    int pk, pv;
                    ks_qaqp_layout sl = {0};
                    const int32_t a = pages_src[bh * maxp_src + j];
                    const uint8_t *sp;
                    uint64_t m;
                    int64_t s;
                    if (!ks_qaqp_page_at(src, A_src, g, a, &pk, &pv, &sl) || pk != wk || pv != wv)
                        continue;
                    sp = src + (int64_t)a * 16;
                    m = qp_mask(sp);
                    for (s = 0; s < P; s++) {
                        int64_t addr, u;
                        if (!((m >> s) & 1u))
                            continue;
                        addr = first[bh * NC + c] + (t / P) * sz;
                        u = t % P;
                        t++;
                        /* the page was written iff it fits dst and the page list (as above) */
                        if ((addr + sz) * 16 > A_dst || addr > INT32_MAX
                            || rank0[bh * NC + c] + (t - 1) / P >= maxp)
                            continue;
                        pg = dst + addr * 16;
                        if (u == 0) { /* a new page: header of its final count */
                            const int64_t m2 = cnt - t + 1 < P ? cnt - t + 1 : P;
                            qp_init_page(pg, g, dt, wk, wv, &lay);
                            qp_set_mask(pg, m2 == 64 ? ~(uint64_t)0 : (((uint64_t)1 << m2) - 1));
                            pg[10] = (uint8_t)m2;
                        }
                        qp_copy_slot(pg, sp, &lay, g, u, s);
                        if (g.nb)
                            qp_bound_slot(pg, g, dt, u, row);
                    }
                }
            }
        }
        free(row);
    }
    free(live);
    free(first);
    free(rank0);
    return oom ? KS_ERR_NOMEM : 0;
}
