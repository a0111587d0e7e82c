/*
 * QAQ kernels, CPU (OpenMP) implementation. See qaq.h for the semantics and
 * the storage layout.
 *
 * All arithmetic is float32 (the bit-width formulas float64). Groups are
 * independent, so every kernel is a parallel loop over groups (or, for the
 * attention, over (sequence, KV head)); each parallel region has an if()
 * clause so that decode-sized work stays on the calling thread.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ks_cpu_util.h"
#include "ks_cpu_dtype.h"
#include "qaq.h"
#include "qaq_group_cpu.h"

#define QQ_PAR_MIN ((int64_t)1 << 16)

static inline int64_t qq_clamp_len(int32_t len, int64_t cap)
{
    return len < 0 ? 0 : (len > cap ? cap : (int64_t)len);
}

static inline int qq_valid_w(int w)
{
    return w == 1 || w == 2 || w == 4 || w == 8;
}

/* effective width of a group: 0 when invalid or when its codes leave the arena */
static inline int qq_eff_w(int w, int64_t off, int64_t E, int64_t A)
{
    if (!qq_valid_w(w))
        return 0;
    return (off >= 0 && off + E * w / 8 <= A) ? w : 0;
}

/* ---- 1. bit-widths ----------------------------------------------------------- */

static inline int qq_round_up_w(double bt, int mask)
{
    int hi = 0, w;
    for (w = 8; w >= 0; w--)
        if (mask & (1 << w)) {
            hi = w;
            break;
        }
    if (bt != bt)
        return hi;
    for (w = 0; w <= 8; w++)
        if ((mask & (1 << w)) && (double)w >= bt)
            return w;
    return hi;
}

void ks_qaq_bits_cpu(const float *rng, const float *q_sq, const float *s_max, int is_key,
                     int64_t B, int64_t Hg, int64_t cap, const int32_t *seq_lens, double sigma,
                     int allowed_mask, int64_t n_recent, uint8_t *widths)
{
    const int hi = qq_round_up_w(NAN, allowed_mask);
    int64_t bg;
#pragma omp parallel for schedule(static) if (B * Hg * cap >= QQ_PAR_MIN)
    for (bg = 0; bg < B * Hg; bg++) {
        const int64_t b = bg / Hg, len = qq_clamp_len(seq_lens[b], cap);
        const double T = (double)len;
        const float *r = rng + bg * cap;
        uint8_t *w = widths + bg * cap;
        double sig_k = 0.0;
        int64_t t;
        if (is_key)
            sig_k = sqrt(log(T * T * T / (T - 1.0) * sigma * sigma + 1.0) / (double)q_sq[bg]);
        for (t = 0; t < cap; t++) {
            double sg, bt;
            if (t >= len) {
                w[t] = 0;
                continue;
            }
            if (t >= len - n_recent) {
                w[t] = (uint8_t)hi;
                continue;
            }
            sg = is_key ? sig_k : sigma / (sqrt(T) * (double)s_max[bg * cap + t]);
            bt = ceil(log2((double)r[t] / (2.0 * sqrt(3.0) * sg)));
            w[t] = (uint8_t)qq_round_up_w(bt, allowed_mask);
        }
    }
}

/* ---- group quantization ----------------------------------------------------------- */

static inline float qq_h2f(uint16_t h)
{
    return ks_half_to_float(h);
}

/* Moves heap[i] down a max-heap of m keys. */
static void qq_sift_down(uint64_t *heap, int64_t m, int64_t i)
{
    const uint64_t v = heap[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= m)
            break;
        if (c + 1 < m && heap[c + 1] > heap[c])
            c++;
        if (heap[c] <= v)
            break;
        heap[i] = heap[c];
        i = c;
    }
    heap[i] = v;
}

/* The k smallest rank keys (ks_qaq_rank_key(x[e], high) << 16 | e, distinct)
 * of the elements e < E with !skip[e], ascending, into heap[0..k); UINT64_MAX
 * fills the slots past the number of candidates. O(E log k): a max-heap of
 * the k best so far, then a heap sort. */
static void qq_smallest(const float *x, int64_t E, const uint8_t *skip, int high, int64_t k,
                        uint64_t *heap)
{
    int64_t m = 0, e, j;
    if (k <= 0)
        return;
    for (e = 0; e < E; e++) {
        uint64_t key;
        if (skip[e])
            continue;
        key = ((uint64_t)ks_qaq_rank_key(ks_f2u(x[e]), high) << 16) | (uint64_t)e;
        if (m < k) { /* push: sift up */
            j = m++;
            while (j > 0 && heap[(j - 1) / 2] < key) {
                heap[j] = heap[(j - 1) / 2];
                j = (j - 1) / 2;
            }
            heap[j] = key;
        } else if (key < heap[0]) {
            heap[0] = key;
            qq_sift_down(heap, m, 0);
        }
    }
    for (j = m - 1; j > 0; j--) { /* heap sort: ascending */
        const uint64_t top = heap[0];
        heap[0] = heap[j];
        heap[j] = top;
        qq_sift_down(heap, j, 0);
    }
    for (j = m; j < k; j++)
        heap[j] = UINT64_MAX;
}

/* Picks the outliers of x[0..E) into idx[0..2*n_side) (see qaq.h; -1 past the
 * number of elements); out[e] = 1 marks them (out: E bytes, cleared here);
 * heap: n_side scratch keys. */
void ks_qaqg_pick_outliers(const float *x, int64_t E, int64_t n_side, int16_t *idx, uint8_t *out,
                             uint64_t *heap)
{
    int high;
    int64_t j;
    memset(out, 0, (size_t)E);
    for (high = 0; high < 2; high++) {
        qq_smallest(x, E, out, high, n_side, heap);
        for (j = 0; j < n_side; j++) {
            const int64_t e = heap[j] == UINT64_MAX ? -1 : (int64_t)(heap[j] & 0xffffu);
            idx[high * n_side + j] = (int16_t)e;
            if (e >= 0)
                out[e] = 1;
        }
    }
}

/* Marks out[e] = 1 for the outlier slots idx[0..n_out) in [0, E) (out cleared here). */
static void qq_mark_outliers(const int16_t *idx, int64_t n_out, int64_t E, uint8_t *out)
{
    int64_t j;
    memset(out, 0, (size_t)E);
    for (j = 0; j < n_out; j++)
        if (idx[j] >= 0 && idx[j] < E)
            out[idx[j]] = 1;
}

/* Quantizes x[0..E) at width w with the elements marked in out[0..E) excluded
 * from the range (they get code 0); writes codes (if w > 0 and codes) and sz.
 * Returns 1 when the inliers are finite but their min, max or range (the scale
 * at width 0) exceeds KS_QAQ_SZ_MAX in magnitude: fp16 sz could not hold the
 * group at every width (re-quantization included), and the group is written
 * with NaN scale and zero. Returns 0 otherwise. */
int ks_qaqg_pack(const float *x, int64_t E, int w, const uint8_t *out, uint8_t *codes,
                          uint16_t *sz)
{
    uint32_t kmn = UINT32_MAX, kmx = 0;
    float mn, mx, sf, zf, s;
    int nan = 0;
    int64_t e;
    for (e = 0; e < E; e++) {
        uint32_t u, k;
        if (out[e])
            continue;
        u = ks_f2u(x[e]);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            nan = 1;
            continue;
        }
        k = ks_qaq_ord(u);
        kmn = k < kmn ? k : kmn;
        kmx = k > kmx ? k : kmx;
    }
    if (nan)
        mn = mx = NAN;
    else if (kmn > kmx) /* no inlier (cannot happen with n_out < E) */
        mn = mx = 0.f;
    else {
        mn = ks_u2f(ks_qaq_unord(kmn));
        mx = ks_u2f(ks_qaq_unord(kmx));
    }
    if (!nan && kmn <= kmx && (ks_f2u(mn) & 0x7f800000u) != 0x7f800000u
        && (ks_f2u(mx) & 0x7f800000u) != 0x7f800000u
        && (mx - mn > KS_QAQ_SZ_MAX || mx > KS_QAQ_SZ_MAX || mn < -KS_QAQ_SZ_MAX)) {
        sz[0] = sz[1] = (uint16_t)KS_QAQ_H_NAN;
        if (w > 0 && codes)
            memset(codes, 0, (size_t)(E * w / 8));
        return 1;
    }
    s = w > 0 ? (mx - mn) / (float)((1 << w) - 1) : mx - mn;
    sz[0] = s != s ? (uint16_t)KS_QAQ_H_NAN : ks_float_to_half(s);
    sz[1] = mn != mn ? (uint16_t)KS_QAQ_H_NAN : ks_float_to_half(mn);
    if (w == 0 || !codes)
        return 0;
    sf = qq_h2f(sz[0]);
    zf = qq_h2f(sz[1]);
    memset(codes, 0, (size_t)(E * w / 8));
    {
        const float maxc = (float)((1 << w) - 1);
        for (e = 0; e < E; e++) {
            const int64_t bit = ks_qaq_code_bit(e, w, E);
            float r = sf > 0.f && !out[e] ? floorf((x[e] - zf) / sf + 0.5f) : 0.f;
            unsigned c;
            r = r >= 0.f ? r : 0.f; /* also NaN -> 0 */
            r = r > maxc ? maxc : r;
            c = (unsigned)r;
            codes[bit >> 3] |= (uint8_t)(c << (bit & 7));
        }
    }
    return 0;
}

/* Dequantizes elements [e0, e0+n) of a group into dst (outliers applied). */
void ks_qaqg_unpack(const uint8_t *codes, int w, const uint16_t *sz, const int16_t *oidx,
                      const void *oval, ks_dtype dt, int64_t n_out, int64_t E, int64_t e0,
                      int64_t n, float *dst)
{
    const float s = qq_h2f(sz[0]), z = qq_h2f(sz[1]);
    int64_t e, j;
    if (w == 0) {
        const float mid = z + s * 0.5f;
        for (e = 0; e < n; e++)
            dst[e] = mid;
    } else {
        const unsigned mask = (1u << w) - 1u;
        for (e = 0; e < n; e++) {
            const int64_t bit = ks_qaq_code_bit(e0 + e, w, E);
            const unsigned c = (codes[bit >> 3] >> (bit & 7)) & mask;
            dst[e] = z + s * (float)c;
        }
    }
    for (j = 0; j < n_out; j++) {
        const int64_t i = oidx[j];
        if (i >= e0 && i < e0 + n && i < E) {
            float f;
            ks_load_row(ks_cptr(oval, dt, j), dt, 1, &f);
            dst[i - e0] = f;
        }
    }
}

/* ---- 2. quantize ------------------------------------------------------------------------ */

int ks_qaq_quantize_cpu(const void *x, ks_dtype dt, int64_t B, int64_t Hkv, int64_t n,
                         int64_t D, int64_t cap, const int32_t *pos, const uint8_t *new_w,
                         const int32_t *new_off, int32_t *offsets, ks_qaq_store st)
{
    const int64_t Hg = st.Hg, hpg = Hkv / Hg, E = hpg * D, n_out = st.n_out;
    const size_t esz = ks_dtype_size(dt);
    int64_t it;
    int oom = 0, range = 0;
#pragma omp parallel if (B * Hkv * n * D * 8 >= QQ_PAR_MIN)
    {
        /* per thread: the group as float32 (E), its outlier heap (n_side), its outlier mask (E) */
        float *buf = (float *)malloc((size_t)E * sizeof(float));
        uint64_t *heap = (uint64_t *)malloc((size_t)(n_out / 2 + 1) * sizeof(uint64_t));
        uint8_t *out = (uint8_t *)malloc((size_t)(E > 0 ? E : 1));
        if (!buf || !heap || !out) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (it = 0; it < B * Hg * n; it++) {
            const int64_t b = it / (Hg * n), g = (it / n) % Hg, i = it % n;
            const int64_t t = (int64_t)pos[b] + i;
            int64_t gi, h, j;
            int w;
            if (t < 0 || t >= cap || !buf || !heap || !out)
                continue;
            gi = (b * Hg + g) * cap + t;
            st.widths[gi] = new_w[it];
            offsets[gi] = new_off[it];
            for (h = 0; h < hpg; h++)
                ks_load_row(ks_cptr(x, dt, ((b * Hkv + g * hpg + h) * n + i) * D), dt, D,
                            buf + h * D);
            ks_qaqg_pick_outliers(buf, E, n_out / 2, st.oidx + gi * n_out, out, heap);
            for (j = 0; j < n_out; j++) { /* the element's own bits (exact, NaN payloads too) */
                const int64_t e = st.oidx[gi * n_out + j];
                void *dst = ks_ptr(st.oval, dt, gi * n_out + j);
                if (e >= 0)
                    memcpy(dst, ks_cptr(x, dt, ((b * Hkv + g * hpg + e / D) * n + i) * D + e % D), esz);
                else
                    memset(dst, 0, esz);
            }
            w = qq_eff_w(new_w[it], new_off[it], E, st.A);
            if (ks_qaqg_pack(buf, E, w, out, w ? st.arena + b * st.A + new_off[it] : NULL,
                              st.sz + 2 * gi)) {
#pragma omp atomic write
                range = 1;
            }
        }
        free(buf);
        free(heap);
        free(out);
    }
    return oom ? KS_ERR_NOMEM : range ? KS_ERR_RANGE : 0;
}

/* ---- 3. dequantize -------------------------------------------------------------------------- */

int ks_qaq_dequantize_cpu(ks_qaq_store st, ks_dtype dt, int64_t B, int64_t Hkv, int64_t cap,
                           int64_t D, const int32_t *seq_lens, void *out)
{
    const int64_t Hg = st.Hg, hpg = Hkv / Hg, E = hpg * D, n_out = st.n_out;
    int64_t it;
    int oom = 0;
#pragma omp parallel if (B * Hkv * cap * D >= QQ_PAR_MIN)
    {
        float *buf = (float *)malloc((size_t)D * sizeof(float));
        if (!buf) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (it = 0; it < B * Hkv * cap; it++) {
            const int64_t b = it / (Hkv * cap), hk = (it / cap) % Hkv, t = it % cap;
            const int64_t g = hk / hpg, gi = (b * Hg + g) * cap + t;
            void *dst = ks_ptr(out, dt, it * D);
            int w;
            if (!buf)
                continue;
            if (t >= qq_clamp_len(seq_lens[b], cap)) {
                memset(dst, 0, (size_t)D * ks_dtype_size(dt));
                continue;
            }
            w = qq_eff_w(st.widths[gi], st.offsets[gi], E, st.A);
            ks_qaqg_unpack(w ? st.arena + b * st.A + st.offsets[gi] : NULL, w, st.sz + 2 * gi,
                      st.oidx + gi * n_out, ks_cptr(st.oval, dt, gi * n_out), dt, n_out, E,
                      (hk % hpg) * D, D, buf);
            ks_store_row(buf, dt, D, dst);
        }
        free(buf);
    }
    return oom ? KS_ERR_NOMEM : 0;
}

/* ---- 4. requantize ----------------------------------------------------------------------------- */

int ks_qaq_requantize_cpu(ks_qaq_store st, ks_dtype dt, int64_t B, int64_t Hkv, int64_t cap,
                           int64_t D, const int32_t *seq_lens, const uint8_t *new_w)
{
    const int64_t Hg = st.Hg, E = (Hkv / Hg) * D, n_out = st.n_out;
    int64_t gi;
    int oom = 0;
#pragma omp parallel if (B * Hkv * cap * D >= QQ_PAR_MIN)
    {
        float *buf = (float *)malloc((size_t)E * sizeof(float));
        uint8_t *out = (uint8_t *)malloc((size_t)(E > 0 ? E : 1));
        if (!buf || !out) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (gi = 0; gi < B * Hg * cap; gi++) {
            const int64_t b = gi / (Hg * cap), t = gi % cap;
            const int nw = new_w[gi], ow = st.widths[gi];
            int w_old, w_new;
            uint8_t *codes;
            if (t >= qq_clamp_len(seq_lens[b], cap) || !buf || !out)
                continue;
            if (!(nw == 0 || qq_valid_w(nw)) || !(nw < ow) || !(ow == 0 || qq_valid_w(ow)))
                continue;
            w_old = qq_eff_w(ow, st.offsets[gi], E, st.A);
            w_new = qq_eff_w(nw, st.offsets[gi], E, st.A);
            codes = st.arena + b * st.A + st.offsets[gi];
            ks_qaqg_unpack(w_old ? codes : NULL, w_old, st.sz + 2 * gi, st.oidx + gi * n_out,
                      ks_cptr(st.oval, dt, gi * n_out), dt, n_out, E, 0, E, buf);
            qq_mark_outliers(st.oidx + gi * n_out, n_out, E, out);
            /* cannot fail: the group passed quantize's range check, and a
             * dequantized group lies within its stored range */
            (void)ks_qaqg_pack(buf, E, w_new, out, w_new ? codes : NULL, st.sz + 2 * gi);
            st.widths[gi] = (uint8_t)nw;
        }
        free(buf);
        free(out);
    }
    return oom ? KS_ERR_NOMEM : 0;
}

/* ---- 5. attention ---------------------------------------------------------------------------------- */

/* row t of KV head hk of a quantized cache into dst[0..D) */
static inline void qq_row(const ks_qaq_store *s, ks_dtype dt, int64_t b, int64_t hk, int64_t hpg,
                          int64_t cap, int64_t D, int64_t t, float *dst)
{
    const int64_t E = hpg * D, gi = (b * s->Hg + hk / hpg) * cap + t;
    const int w = qq_eff_w(s->widths[gi], s->offsets[gi], E, s->A);
    ks_qaqg_unpack(w ? s->arena + b * s->A + s->offsets[gi] : NULL, w, s->sz + 2 * gi,
              s->oidx + gi * s->n_out, ks_cptr(s->oval, dt, gi * s->n_out), dt, s->n_out, E,
              (hk % hpg) * D, D, dst);
}

/* The attention of ks_qaq_attention_cpu (page_idx == NULL: the tokens t < len)
 * and ks_qaq_sparse_attention_cpu (the tokens of the listed pages): n_slot
 * slots per (b, hk), slot u reading token tok(u) or nothing (-1). */
static int qq_attention(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv, int64_t cap,
                        int64_t D, ks_qaq_store kq, ks_qaq_store vq, const int32_t *page_idx,
                        int64_t n_sel, int64_t P, const int32_t *seq_lens, float scale,
                        float *p_max, void *out)
{
    const int64_t G = H / Hkv, khpg = Hkv / kq.Hg, vhpg = Hkv / vq.Hg;
    const int64_t n_slot = page_idx ? n_sel * P : cap;
    int64_t bh;
    int oom = 0;
#pragma omp parallel if (B * H * n_slot * D * 2 >= QQ_PAR_MIN)
    {
        /* qf, acc: G*D; row: D; s: G*n_slot; tok: n_slot */
        const int64_t ns1 = n_slot > 0 ? n_slot : 1;
        float *buf = (float *)malloc((size_t)(2 * G * D + D + G * ns1) * sizeof(float));
        int64_t *tok = (int64_t *)malloc((size_t)ns1 * sizeof(int64_t));
        if (!buf || !tok) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (bh = 0; bh < B * Hkv; bh++) {
            const int64_t b = bh / Hkv, hk = bh % Hkv, len = qq_clamp_len(seq_lens[b], cap);
            float *qf, *acc, *row, *s;
            int64_t g, t, d, u, n = 0; /* n: the selected tokens, tok[0 .. n) */
            if (!buf || !tok)
                continue;
            qf = buf;
            acc = qf + G * D;
            row = acc + G * D;
            s = row + D;
            if (page_idx) {
                const int32_t *pg = page_idx + bh * n_sel;
                for (u = 0; u < n_slot; u++) {
                    const int64_t p = pg[u / P], tt = p * P + u % P;
                    if (p >= 0 && tt < len)
                        tok[n++] = tt;
                }
            } else {
                for (t = 0; t < len; t++)
                    tok[n++] = t;
            }
            ks_load_row(ks_cptr(q, dt, (b * H + hk * G) * D), dt, G * D, qf);
            for (d = 0; d < G * D; d++) {
                qf[d] *= scale;
                acc[d] = 0.f;
            }
            for (t = 0; t < n; t++) {
                qq_row(&kq, dt, b, hk, khpg, cap, D, tok[t], row);
                for (g = 0; g < G; g++)
                    s[g * ns1 + t] = ks_dot(qf + g * D, row, D);
            }
            for (g = 0; g < G; g++) {
                float *sg = s + g * ns1, m = -INFINITY, sum = 0.f, inv;
                int bad = 0;
                for (t = 0; t < n; t++) {
                    /* NaN policy (ks_dtype.h): a NaN or +inf logit, or all -inf, give NaN */
                    if (sg[t] != sg[t] || sg[t] == INFINITY)
                        bad = 1;
                    m = sg[t] > m ? sg[t] : m;
                }
                if (n > 0 && m == -INFINITY)
                    bad = 1;
                for (t = 0; t < n; t++) {
                    sg[t] = bad ? NAN : expf(sg[t] - m);
                    sum += sg[t];
                }
                inv = sum > 0.f ? 1.f / sum : (bad ? NAN : 0.f);
                for (t = 0; t < n; t++)
                    sg[t] *= inv;
            }
            for (t = 0; t < n; t++) {
                qq_row(&vq, dt, b, hk, vhpg, cap, D, tok[t], row);
                for (g = 0; g < G; g++) {
                    const float p = s[g * ns1 + t];
                    float *a = acc + g * D;
                    for (d = 0; d < D; d++)
                        a[d] += p * row[d];
                }
            }
            ks_store_row(acc, dt, G * D, ks_ptr(out, dt, (b * H + hk * G) * D));
            if (p_max) {
                /* per slot (the dense case: slot = token); the selected tokens in slot order */
                float *pm = p_max + bh * n_slot;
                const int32_t *pg = page_idx ? page_idx + bh * n_sel : NULL;
                int64_t i = 0;
                for (u = 0; u < n_slot; u++) {
                    int sel;
                    if (pg) {
                        const int64_t p = pg[u / P];
                        sel = p >= 0 && p * P + u % P < len;
                    } else {
                        sel = u < len;
                    }
                    if (!sel) {
                        pm[u] = 0.f;
                        continue;
                    }
                    {
                        float m = s[i];
                        for (g = 1; g < G; g++)
                            m = s[g * ns1 + i] > m ? s[g * ns1 + i] : m;
                        pm[u] = m;
                    }
                    i++;
                }
            }
        }
        free(buf);
        free(tok);
    }
    return oom ? KS_ERR_NOMEM : 0;
}

int ks_qaq_attention_cpu(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                          int64_t cap, int64_t D, ks_qaq_store kq, ks_qaq_store vq,
                          const int32_t *seq_lens, float scale, float *p_max, void *out)
{
    return qq_attention(q, dt, B, H, Hkv, cap, D, kq, vq, NULL, 0, 1, seq_lens, scale, p_max, out);
}

int ks_qaq_sparse_attention_cpu(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                                 int64_t cap, int64_t D, ks_qaq_store kq, ks_qaq_store vq,
                                 const int32_t *page_idx, int64_t n_sel, int64_t P,
                                 const int32_t *seq_lens, float scale, float *p_max, void *out)
{
    return qq_attention(q, dt, B, H, Hkv, cap, D, kq, vq, page_idx, n_sel, P, seq_lens, scale, p_max,
                        out);
}
