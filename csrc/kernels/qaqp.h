/*
 * QAQ over width-binned pages ("qaqp"): the packed KV format built for the
 * decode kernel. The C interface.
 *
 * Plain C99: raw pointers, sizes and element counts. No torch, no Python.
 * Implemented twice: qaqp_cpu.c (OpenMP) and qaqp_cuda.cu (suffix _cuda,
 * taking a cudaStream_t as void*). Callers (csrc/ops/qaqp.cpp) validate shapes,
 * dtypes and devices; the kernels never read or write outside the arena and
 * the listed arrays whatever their contents (a corrupt address reads as an
 * empty page; see "Addresses").
 *
 * Why: attention over a cache does not depend on token order once RoPE is
 * applied. So each (sequence b, KV head hk) keeps its tokens in pages of
 * KS_QAQP_P = 64 slots, every page holding tokens of one class (key width wk,
 * value width wv), widths in {0, 1, 2, 4, 8}. A page's bytes sit at fixed
 * offsets given by its class: the attention's inner loop does no per-token
 * offset lookup and no per-token width dispatch (one dispatch per page).
 *
 * ---- Quantization of one token (unchanged from qaq.h) ------------------------
 * The keys of one token of one KV head are a group of E = D elements quantized
 * at width wk exactly as qaq.h's "Quantization" says (per-token asymmetric
 * fp16 scale / zero, n_side_k smallest and n_side_k largest elements kept exact
 * as outliers with code 0, the same code packing, ks_qaq_code_bit), the values
 * likewise at wv with n_side_v. Dequantization is qaq.h's, bit for bit.
 *
 * ---- One page of class (wk, wv) --------------------------------------------
 * Parameters shared by a layer's pages ("ks_qaqp_geom"): D, n_out_k = 2 n_side_k,
 * n_out_v = 2 n_side_v, the byte size ds of the cache dtype (2 or 4), and nb
 * (1: the page keeps Quest bounds). Regions, in this order, each starting at a
 * multiple of 16 bytes (ks_qaqp_layout gives the offsets):
 *
 *   hdr    16 B        uint64 live mask (bit i: slot i holds a token), then
 *                      uint8 wk, uint8 wv, uint8 n_used (slots handed out,
 *                      0..64, never decreases), 5 bytes zero
 *   pos    P int32     position of the token in slot i (-1: never used)
 *   ksz    P x 2 fp16  (scale, zero) of slot i's keys
 *   vsz    P x 2 fp16  (scale, zero) of slot i's values
 *   kc     P x sk B    key codes of slot i at i * sk, sk = ks_qaqp_code_stride(D, wk)
 *   vc     P x sv B    value codes, sv = ks_qaqp_code_stride(D, wv)
 *   koi    P x n_out_k int16   key outlier element index (in [0, D)); slot i's
 *                              outliers at [i * n_out_k, (i + 1) * n_out_k)
 *   kov    P x n_out_k ds B    key outlier values (the cache dtype: exact)
 *   voi    P x n_out_v int16
 *   vov    P x n_out_v ds B
 *   kmin   D x ds B    (nb = 1 only) elementwise min of the dequantized keys of
 *   kmax   D x ds B    the slots ever used (Quest's page bounds; they stay a
 *                      superset when a slot dies). NaN propagates (quest.h).
 *
 * Codes of a token: the E * w / 8 code bytes of qaq.h's group, zero-padded to
 * sk = round_up(D * w / 8, 4) bytes (so every token's codes start at a 32-bit
 * boundary). w = 0 stores no codes (sk = 0).
 *
 * A slot holds a token iff its mask bit is set; unused or dead slots hold
 * whatever was there (the kernels never read them as tokens).
 *
 * What a token costs (D = 128, 4-bit K and V, n_out = 2 each, bf16): codes 64 +
 * 64 B, scale / zero 4 + 4, outliers 8 + 8, position 4, header 1/4: about 156 B,
 * against 512 B in bf16. The attention reads the codes, scale / zero and
 * outliers (152 B), not the positions.
 *
 * ---- Addresses and the arena -----------------------------------------------
 * A layer's pages live in one byte arena of A bytes (A a multiple of 16). A page
 * is named by its address: its byte offset / 16, an int32 (so A <= 32 GiB). An
 * address a names a page iff a >= 0 and 16 a + page_bytes(class) <= A, where
 * the class is read from the header at 16 a (a header whose widths are not in
 * {0, 1, 2, 4, 8} names no page). Anything else in a page list reads as an
 * empty page (padding is -1).
 *
 * ---- Allocation state (per layer, on the kernels' device) --------------------
 *   top      int64 [1]              next free address (units of 16 B)
 *   open     int32 [B, Hkv, 25]     address of the page of class c that new
 *                                   tokens of (b, hk) fill, -1 = none yet;
 *                                   c = ks_qaqp_class(wk, wv)
 *   pages    int32 [B, Hkv, maxp]   every page (b, hk) owns, in allocation order
 *   n_pages  int32 [B, Hkv]         how many of them (<= maxp)
 *   flags    int32 [1]              bit 0: the arena was full, bit 1: a page
 *                                   list was full (tokens were dropped: the
 *                                   caller must check and raise)
 */
#ifndef KVSPARSE_QAQP_H
#define KVSPARSE_QAQP_H

#include <stddef.h>
#include <stdint.h>

#include "ks_dtype.h"
#include "qaq.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KS_QAQP_P 64        /* slots per page */
#define KS_QAQP_NCLASS 25   /* (wk, wv) pairs, widths in {0, 1, 2, 4, 8} */
#define KS_QAQP_FLAG_ARENA 1
#define KS_QAQP_FLAG_PAGES 2

typedef struct {
    int64_t D, n_out_k, n_out_v, ds, nb;
} ks_qaqp_geom;

/* byte offsets of a page's regions, and its total size (a multiple of 16) */
typedef struct {
    int64_t pos, ksz, vsz, kc, vc, koi, kov, voi, vov, kmin, kmax, bytes;
    int64_t sk, sv; /* code bytes per slot */
} ks_qaqp_layout;

/* index of a width in {0, 1, 2, 4, 8}, -1 for anything else */
static inline KS_QAQ_HD int ks_qaqp_widx(int w)
{
    return w == 0 ? 0 : w == 1 ? 1 : w == 2 ? 2 : w == 4 ? 3 : w == 8 ? 4 : -1;
}

/* class of (wk, wv): widx(wk) * 5 + widx(wv), -1 if either width is invalid */
static inline KS_QAQ_HD int ks_qaqp_class(int wk, int wv)
{
    const int a = ks_qaqp_widx(wk), b = ks_qaqp_widx(wv);
    return (a < 0 || b < 0) ? -1 : a * 5 + b;
}

static inline KS_QAQ_HD int64_t ks_qaqp_up16(int64_t x) { return (x + 15) & ~(int64_t)15; }

/* code bytes per token: D * w / 8 rounded up to a multiple of 4 */
static inline KS_QAQ_HD int64_t ks_qaqp_code_stride(int64_t D, int w)
{
    return ((D * w / 8) + 3) & ~(int64_t)3;
}

static inline KS_QAQ_HD ks_qaqp_layout ks_qaqp_layout_of(ks_qaqp_geom g, int wk, int wv)
{
    ks_qaqp_layout L;
    const int64_t P = KS_QAQP_P;
    int64_t o = 16;
    L.sk = ks_qaqp_code_stride(g.D, wk);
    L.sv = ks_qaqp_code_stride(g.D, wv);
    L.pos = o;  o = ks_qaqp_up16(o + P * 4);
    L.ksz = o;  o = ks_qaqp_up16(o + P * 4);
    L.vsz = o;  o = ks_qaqp_up16(o + P * 4);
    L.kc = o;   o = ks_qaqp_up16(o + P * L.sk);
    L.vc = o;   o = ks_qaqp_up16(o + P * L.sv);
    L.koi = o;  o = ks_qaqp_up16(o + P * g.n_out_k * 2);
    L.kov = o;  o = ks_qaqp_up16(o + P * g.n_out_k * g.ds);
    L.voi = o;  o = ks_qaqp_up16(o + P * g.n_out_v * 2);
    L.vov = o;  o = ks_qaqp_up16(o + P * g.n_out_v * g.ds);
    L.kmin = o; o = ks_qaqp_up16(o + (g.nb ? g.D * g.ds : 0));
    L.kmax = o; o = ks_qaqp_up16(o + (g.nb ? g.D * g.ds : 0));
    L.bytes = o;
    return L;
}

/* Reads the header at address a of an arena of A bytes: returns 1 and sets
 * *wk, *wv, *L if a names a page (see "Addresses"), 0 otherwise. */
static inline KS_QAQ_HD int ks_qaqp_page_at(const uint8_t *arena, int64_t A, ks_qaqp_geom g,
                                            int32_t a, int *wk, int *wv, ks_qaqp_layout *L)
{
    if (a < 0 || (int64_t)a * 16 + 16 > A)
        return 0;
    {
        const uint8_t *h = arena + (int64_t)a * 16;
        const int k = h[8], v = h[9];
        if (ks_qaqp_class(k, v) < 0)
            return 0;
        *L = ks_qaqp_layout_of(g, k, v);
        if ((int64_t)a * 16 + L->bytes > A)
            return 0;
        *wk = k;
        *wv = v;
    }
    return 1;
}

/* ---- 1. append ----------------------------------------------------------------------
 * k, v [B, Hkv, n, D] (dtype dt), wk, wv uint8 [B, Hkv, n]. For b < B, hk < Hkv and
 * i < count[b] (clamped to [0, n]), in order of i: the token at position
 * pos0[b] + i (pos, int32 [B, Hkv, n], may be NULL: if given, the token's
 * position is pos[b, hk, i] and pos0 is not read) goes to the open page of its
 * class c = class(wk, wv) for (b, hk):
 * if there is none or it is full (n_used = 64), a new page is taken at address
 * top (top += bytes / 16; header written: mask 0, widths, n_used 0, positions
 * -1, and with nb the bounds +inf / -inf) and appended to pages[b, hk]. The
 * token takes slot n_used (n_used += 1, its mask bit set, pos written), its keys
 * and values are quantized into the slot, and with nb the page bounds take the
 * min / max with its dequantized keys. An invalid class skips the token. If the
 * new page would not fit the arena, flags |= ARENA and the token is dropped; if
 * pages[b, hk] is full, flags |= PAGES and the token is dropped.
 * Pages of (b, hk) are taken in order of its tokens (so a (b, hk)'s page list
 * and the slots of its tokens are the same on every device; only the
 * addresses may differ between devices, which take pages for different (b, hk)
 * in a different order). Returns 0, KS_ERR_NOMEM, or KS_ERR_RANGE (CPU: a
 * group's range does not fit fp16, as qaq.h: written with a NaN scale). */
int ks_qaqp_append_cpu(const void *k, const void *v, ks_dtype dt, int64_t B, int64_t Hkv,
                       int64_t n, ks_qaqp_geom g, const uint8_t *wk, const uint8_t *wv,
                       const int32_t *pos0, const int32_t *pos, const int32_t *count,
                       uint8_t *arena, int64_t A, int64_t *top, int32_t *open, int32_t *pages,
                       int64_t maxp, int32_t *n_pages, int32_t *flags);

/* ---- 2. dequantize -------------------------------------------------------------------
 * kout, vout [B, Hkv, L * 64, D] (dtype dt), pos_out int32 [B, Hkv, L * 64]: for each
 * listed page plist[b, hk, j] (j < L) and slot i, row j * 64 + i holds the
 * dequantized keys / values of the token in that slot and its position, or zeros
 * and position -1 if the page is not a page or the slot is not live. */
int ks_qaqp_dequantize_cpu(const uint8_t *arena, int64_t A, ks_qaqp_geom g, ks_dtype dt,
                           int64_t B, int64_t Hkv, const int32_t *plist, int64_t L,
                           void *kout, void *vout, int32_t *pos_out);

/* ---- 3. decode attention over listed pages -------------------------------------------
 * q [B, H, D], out [B, H, D] (dtype dt), G = H / Hkv, plist int32 [B, Hkv, L]. For each
 * (b, h), hk = h / G, over the live slots u of the listed pages (a page listed twice
 * counts twice):
 *   s[u] = scale * q[b,h,:] . K~[u,:]   (K~: the dequantized keys, float32)
 *   out[b,h] = sum_u softmax(s)[u] V~[u,:]   (zeros if there is no live slot)
 * p_max (float32 [B, Hkv, L, 64], may be NULL): the largest softmax probability
 * over the G heads of hk of slot i of listed page j, 0 where the slot is not
 * live or the page is not a page. The attention over every page of the
 * cache passes plist = pages (padded with -1); Quest over QAQ passes the
 * selected ones. Dense in the number of listed pages; no dense copy. */
int ks_qaqp_attention_cpu(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                          const uint8_t *arena, int64_t A, ks_qaqp_geom g,
                          const int32_t *plist, int64_t L, float scale, float *p_max,
                          void *out);

/* ---- 4. re-quantization, first half: take out the tokens that move ---------------------
 * QAQ lowers a stored token's widths when its importance falls. On these pages a
 * token that changes class moves: it is taken out of its page (a hole) and appended
 * again at its new widths. This call takes the tokens out; ks_qaqp_append with
 * pos = pos_out, wk = wk_out, wv = wv_out, count = n puts them back (the two calls
 * are one re-quantization: a token taken out and not appended is lost).
 *
 * new_wk, new_wv uint8 [B, Hkv, L, 64]: target widths of slot i of listed page
 * plist[b, hk, j]. Slot i of listed page j moves iff plist[b, hk, j] names a page,
 * slot i is live, (new_wk, new_wv) is a class (both widths in {0, 1, 2, 4, 8}) other
 * than the page's (wk, wv), and new_wk <= wk, new_wv <= wv (re-quantization only
 * lowers; anything else, e.g. 255, leaves the slot alone). Which slots move is
 * decided from the live masks at entry. For each (b, hk), the first n moving slots
 * in order of (j, i) are taken: row r of kout / vout [B, Hkv, n, D] (dtype dt) gets
 * the r-th one's dequantized keys / values (bit for bit what dequantize gives),
 * wk_out / wv_out uint8 [B, Hkv, n] its new widths, pos_out int32 [B, Hkv, n] its
 * position, and its mask bit is cleared (the page's bounds stay a superset). Rows
 * r >= moved[b, hk] get widths 255 (append skips them), position -1 and zeros.
 * moved int32 [B, Hkv]: how many were taken (<= n). A moving slot beyond the first
 * n stays where it is. plist should list a page at most once (a page listed twice
 * may give its tokens twice; memory stays in bounds either way). */
int ks_qaqp_requant_take_cpu(uint8_t *arena, int64_t A, ks_qaqp_geom g, ks_dtype dt, int64_t B,
                             int64_t Hkv, const int32_t *plist, int64_t L, const uint8_t *new_wk,
                             const uint8_t *new_wv, int64_t n, void *kout, void *vout,
                             uint8_t *wk_out, uint8_t *wv_out, int32_t *pos_out, int32_t *moved);

/* ---- 5. compaction -----------------------------------------------------------------------
 * Rewrites a layer's pages without holes, out of place: from the store (src, A_src,
 * pages_src [B, Hkv, maxp_src], n_pages_src [B, Hkv]) into (dst, A_dst, top, open,
 * pages [B, Hkv, maxp], n_pages, flags). For (b, hk) in order, class c = 0 .. 24 in
 * order: the live slots of the pages of class c among pages_src[b, hk, j], j <
 * n_pages_src[b, hk] (clamped to [0, maxp_src]; entries that name no page are
 * skipped; a page listed twice gives its tokens twice), in order of (j, slot), go
 * to consecutive new pages of class c, 64 to a page: slot s of a new page gets the
 * s-th token's positions, scale / zero, codes and outliers byte for byte; the
 * header's mask has bits 0 .. m - 1 set and n_used = m (its m tokens); the other
 * slots' positions are -1; with nb the bounds are the min / max of the page's
 * dequantized keys (as append computes them: tighter than the source's).
 * Addresses: the new pages are consecutive from address 0 in this order (so they
 * are the same on every device); top = the end. pages[b, hk] = its new pages in
 * order, -1 after n_pages[b, hk]; open[b, hk, c] = its last new page of class c,
 * or -1. A new page that does not fit dst (A_dst) is not written (flags |= ARENA;
 * its tokens and those after it are dropped); one beyond maxp likewise (flags |=
 * PAGES). Compaction never needs more pages or bytes than the source used, so
 * A_dst >= 16 * (src top) and maxp >= maxp_src always suffice. src and dst must
 * not overlap. Returns 0 or KS_ERR_NOMEM. */
int ks_qaqp_compact_cpu(const uint8_t *src, int64_t A_src, ks_qaqp_geom g, ks_dtype dt, int64_t B,
                        int64_t Hkv, const int32_t *pages_src, int64_t maxp_src,
                        const int32_t *n_pages_src, uint8_t *dst, int64_t A_dst, int64_t *top,
                        int32_t *open, int32_t *pages, int64_t maxp, int32_t *n_pages,
                        int32_t *flags);

/* ---- CUDA twins (qaqp_cuda.cu) ------------------------------------------------------
 * Same semantics; codes, scales, outliers and bounds bit-identical to the CPU's;
 * attention agrees to float32 rounding. Device pointers; return 0 or a
 * cudaError_t code; no host synchronisation; graph-capturable (the workspace is
 * sized from shapes). Attention: D in {64, 80, 96, 128, 256}, G <= 8. The CUDA
 * append cannot report KS_ERR_RANGE: such a group keeps the NaN scale alone.
 * requant_take: the same rows, widths, positions, moved counts and cleared mask
 * bits as the CPU's. compact: the same dst bytes, top, open, pages, n_pages and
 * flags as the CPU's (its addresses do not depend on the device); its workspace is
 * sized from (B, Hkv, maxp_src). */
int ks_qaqp_append_cuda(const void *k, const void *v, ks_dtype dt, int64_t B, int64_t Hkv,
                        int64_t n, ks_qaqp_geom g, const uint8_t *wk, const uint8_t *wv,
                        const int32_t *pos0, const int32_t *pos, const int32_t *count,
                        uint8_t *arena, int64_t A, int64_t *top, int32_t *open, int32_t *pages,
                        int64_t maxp, int32_t *n_pages, int32_t *flags, void *workspace,
                        void *stream);
size_t ks_qaqp_append_cuda_workspace(int64_t B, int64_t Hkv, int64_t n, ks_qaqp_geom g);
int ks_qaqp_dequantize_cuda(const uint8_t *arena, int64_t A, ks_qaqp_geom g, ks_dtype dt,
                            int64_t B, int64_t Hkv, const int32_t *plist, int64_t L,
                            void *kout, void *vout, int32_t *pos_out, void *stream);
size_t ks_qaqp_attention_cuda_workspace(int64_t B, int64_t H, int64_t Hkv, int64_t L,
                                        ks_qaqp_geom g);
int ks_qaqp_attention_cuda(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                           const uint8_t *arena, int64_t A, ks_qaqp_geom g,
                           const int32_t *plist, int64_t L, float scale, float *p_max,
                           void *workspace, void *out, void *stream);

int ks_qaqp_requant_take_cuda(uint8_t *arena, int64_t A, ks_qaqp_geom g, ks_dtype dt, int64_t B,
                              int64_t Hkv, const int32_t *plist, int64_t L, const uint8_t *new_wk,
                              const uint8_t *new_wv, int64_t n, void *kout, void *vout,
                              uint8_t *wk_out, uint8_t *wv_out, int32_t *pos_out, int32_t *moved,
                              void *stream);
size_t ks_qaqp_compact_cuda_workspace(int64_t B, int64_t Hkv, int64_t maxp_src);
int ks_qaqp_compact_cuda(const uint8_t *src, int64_t A_src, ks_qaqp_geom g, ks_dtype dt, int64_t B,
                         int64_t Hkv, const int32_t *pages_src, int64_t maxp_src,
                         const int32_t *n_pages_src, uint8_t *dst, int64_t A_dst, int64_t *top,
                         int32_t *open, int32_t *pages, int64_t maxp, int32_t *n_pages,
                         int32_t *flags, void *workspace, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* KVSPARSE_QAQP_H */
