/*
 * QAQ (quality-adaptive quantization of the KV cache) kernels: the C interface.
 *
 * Plain C99: raw pointers, sizes and element counts. No torch, no Python.
 * Every function is implemented twice: a CPU version (qaq_cpu.c, OpenMP) and
 * a CUDA version (qaq_cuda.cu, suffix _cuda, taking a cudaStream_t as void*).
 * Callers validate shapes, dtypes, devices (and, on CPU, values); the CUDA
 * kernels clamp lengths and skip what would fall out of bounds instead.
 *
 * ---- Storage of one quantized cache (the keys or the values of one layer) ----
 * A "group" is the set of elements that share a bit-width, a scale and a zero
 * point: per token per KV head (Hg = Hkv groups per token, E = D elements) or
 * per token shared across the layer's KV heads (Hg = 1, E = Hkv * D elements,
 * KV head h owning elements [h*D, (h+1)*D)). Arrays (contiguous, row-major):
 *
 *   arena    [B, A]              uint8   codes; sequence b owns row b
 *   offsets  [B, Hg, cap]        int32   byte offset of a group's codes in arena[b]
 *   widths   [B, Hg, cap]        uint8   bit-width w in {0, 1, 2, 4, 8}
 *   sz       [B, Hg, cap, 2]     fp16    (scale, zero) of the group
 *   oidx     [B, Hg, cap, n_out] int16   outlier element index in [0, E), -1 = unused
 *   oval     [B, Hg, cap, n_out] dt      outlier value (the cache dtype: exact)
 *
 * Codes: a group with width w > 0 owns the code bytes arena[b][off .. off + E*w/8),
 * read as little-endian 32-bit words (word j = bytes 4j .. 4j+3), each holding
 * n = 32/w w-bit unsigned codes. Element e lives in word j = e / n at slot
 * s = sigma(e % n), i.e. bits [s*w, s*w + w) of the word, where in a whole word
 *   sigma(i) = i/2 + (i%2) * n/2     (even elements in the low half-word,
 *                                     odd ones in the high half-word)
 * and in a final partial word (E*w not a multiple of 32) sigma(i) = i.
 * ks_qaq_code_bit() below gives the bit position. The interleave lets the CUDA
 * attention turn one shifted and masked word into a pair of 16-bit floats
 * (element 2m in the low half, 2m+1 in the high half) with no byte shuffling.
 * w divides 8, so a code never straddles a byte. w = 0 stores no codes. A group whose code bytes would not lie inside
 * [0, A) is read and written as if w were 0 (CPU bindings reject it). Widths
 * outside {0,1,2,4,8} read as 0. The code bytes of different groups must not
 * overlap (the kernels write groups in parallel); offsets are the caller's.
 *
 * Dequantization (float32, written as fl(zero + fl(scale * code))):
 *   w > 0:  x[e] = zero + scale * code[e]
 *   w = 0:  x[e] = zero + scale * 0.5        (scale holds max - min: the midpoint)
 *   then every slot j with 0 <= oidx[j] < E sets x[oidx[j]] = oval[j].
 *
 * Quantization of a group x[0..E) at width w, n_out = 2 * n_side slots:
 *   outliers: the n_side smallest values (ascending; ties to the lower index)
 *             go to slots 0 .. n_side-1, then the n_side largest of the
 *             remaining elements (descending; ties to the lower index) to
 *             slots n_side .. n_out-1, so never the same element twice; slot
 *             values are x itself (exact). Ranking is a total order per pass:
 *             NaN ranks first in both passes (below every number in the
 *             ascending one, above every number in the descending one), NaNs
 *             among themselves by index, -0 ties with +0 and +-inf are
 *             ordinary numbers; ks_qaq_rank_key() below gives the key (a NaN
 *             therefore becomes an outlier first and is stored exactly).
 *   mn, mx:   min / max over the other elements (the inliers, float32), -0
 *             counting below +0; if an inlier is NaN, mn = mx = NaN
 *   scale     = fp16(w > 0 ? (mx - mn) / (2^w - 1) : mx - mn), zero = fp16(mn)
 *             (a NaN scale or zero is stored as the fp16 NaN 0x7e00; no
 *             inlier at all gives mn = mx = 0)
 *   code[e]   = clamp(floor((x[e] - zero) / scale + 0.5), 0, 2^w - 1)
 *               (float32, IEEE division; 0 when scale == 0 or the quotient is
 *               NaN); outlier elements get code 0 (so that a kernel can take
 *               the outlier's correction x - zero without reading its code).
 * Per element the error of an inlier is at most scale/2 plus the fp16
 * rounding of zero and scale; outliers are exact. The scale and zero point
 * are fp16, so a group's finite inliers must have min, max and range (max -
 * min) within +-KS_QAQ_SZ_MAX (a margin below fp16's 65504 that re-quantization
 * keeps): the CPU quantize writes such a group with NaN scale / zero and
 * returns KS_ERR_RANGE (the bindings raise a ValueError naming x); the CUDA
 * quantize cannot report without a host sync and writes the NaN scale / zero
 * alone, so the attention over it is NaN, never a wrong finite value. A group
 * holding a NaN / Inf inlier dequantizes its inliers to NaN / Inf (so the
 * attention over it is NaN, see ks_dtype.h's NaN policy); a NaN outlier
 * dequantizes to itself. So NaN in a group gives NaN out, even with n_out = 0.
 * Cost: the outliers are selected in O(E log n_side) (CPU) or by one thread
 * block per group (CUDA); see the kernels.
 * E <= KS_QAQ_MAX_GROUP (oidx is int16); the bindings reject larger groups.
 * The CPU functions that allocate scratch return 0 or KS_ERR_NOMEM.
 *
 * Bytes per token (per group: E*w/8 codes + 4 offset + 1 width + 4 scale/zero
 * + n_out * (2 + sizeof dt) outliers); qaq.py's memory_report sums them.
 *
 * Requantization (lowering a width in place): the group is dequantized, its
 * outliers stay as they are (same slots, same values), mn / mx are taken over
 * the dequantized non-outlier elements and the group is re-quantized at the
 * new width into its own code bytes (the offset stays; the freed tail bytes
 * are unused until the caller compacts the arena).
 */
#ifndef KVSPARSE_QAQ_H
#define KVSPARSE_QAQ_H

#include <stddef.h>
#include <stdint.h>

#include "ks_dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__CUDACC__)
#define KS_QAQ_HD __host__ __device__
#else
#define KS_QAQ_HD
#endif

/* Largest group size E: outlier indices are int16, in [0, E). */
#define KS_QAQ_MAX_GROUP 32768

/* Bit position of element e's code inside the code bytes of a group of E
 * elements at width w in {1, 2, 4, 8} (see "Codes" above). */
static inline KS_QAQ_HD int64_t ks_qaq_code_bit(int64_t e, int w, int64_t E)
{
    const int ln = w == 1 ? 5 : w == 2 ? 4 : w == 4 ? 3 : 2; /* log2(32 / w) */
    const int64_t n = (int64_t)1 << ln, j = e >> ln, i = e & (n - 1);
    const int64_t s = (j + 1) * n <= E ? (i >> 1) + (i & 1) * (n >> 1) : i;
    return j * 32 + s * w;
}

/* Outlier ranking key of a float32 value given by its bits u (see
 * "Quantization" above): smaller keys rank first. high = 0: the ascending
 * pass, high = 1: the descending one. NaN gives 0 (first in both passes), -0
 * the key of +0; numbers get keys in [0x007fffff, 0xff800000], monotone in
 * the value (increasing for the ascending pass, decreasing for the other).
 * Element e of a group ranks by the 48-bit key (rank_key << 16) | e, distinct
 * per element, which breaks ties towards the lower index. */
static inline KS_QAQ_HD uint32_t ks_qaq_rank_key(uint32_t u, int high)
{
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u)
        return 0u;
    if (a == 0u)
        u = 0u;
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return high ? ~u : u;
}

/* Order key of a non-NaN float32 given by its bits: monotone, -0 below +0
 * (the order of mn / mx); ks_qaq_unord() inverts it. */
static inline KS_QAQ_HD uint32_t ks_qaq_ord(uint32_t u)
{
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
static inline KS_QAQ_HD uint32_t ks_qaq_unord(uint32_t k)
{
    return (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
}

/* fp16 NaN stored as the scale / zero of a group with a NaN range */
#define KS_QAQ_H_NAN 0x7e00u
/* largest magnitude of a group's finite inlier min, max and range that its
 * fp16 scale / zero hold at every width (65504 less a margin for the fp16
 * rounding of the scale, so that a re-quantized group stays in range) */
#define KS_QAQ_SZ_MAX 65000.0f

/* One quantized cache (keys or values). Hg is Hkv (per-head groups) or 1
 * (shared groups); E = D * Hkv / Hg. */
typedef struct {
    uint8_t *arena;
    int64_t A;          /* arena bytes per sequence */
    const int32_t *offsets;
    uint8_t *widths;
    uint16_t *sz;       /* fp16 bits, (scale, zero) pairs */
    int16_t *oidx;
    void *oval;         /* dtype dt */
    int64_t Hg, n_out;
} ks_qaq_store;

/* ---- 1. bit-widths ---------------------------------------------------------
 * For b < B, g < Hg, t < cap, T = len = seq_lens[b] (clamped to [0, cap]):
 *   t >= len:                 w = 0
 *   t >= len - n_recent:      w = the largest allowed width
 *   else                      B_t = ceil(log2(rng / (2 sqrt(3) sigma_t))) (float64),
 *                             w = the smallest allowed width >= B_t, or the largest
 *                             allowed one if there is none (also when B_t is NaN)
 * with
 *   keys:   sigma_t^2 = log(T^3 / (T - 1) * sigma_s^2 + 1) / q_sq[b, g]
 *   values: sigma_t   = sigma_x / (sqrt(T) * s_max[b, g, t])
 * (rng = rng[b, g, t], the quantizer's range max - min). allowed_mask: bit w set
 * for each allowed width w in {0, 1, 2, 4, 8}; non-empty. is_key selects the
 * formula; q_sq [B, Hg] is read for keys, s_max [B, Hg, cap] for values. */
void ks_qaq_bits_cpu(const float *rng, const float *q_sq, const float *s_max, int is_key,
                     int64_t B, int64_t Hg, int64_t cap, const int32_t *seq_lens, double sigma,
                     int allowed_mask, int64_t n_recent, uint8_t *widths);

/* ---- 2. quantize + pack -------------------------------------------------------
 * x [B, Hkv, n, D] (dtype dt). For b, g < Hg, i < n with t = pos[b] + i, 0 <= t < cap:
 * widths[b,g,t] = new_w[b,g,i], offsets[b,g,t] = new_off[b,g,i] (the caller
 * allocates the code bytes; qaq.py has helpers), and the group of token t (x[b, :, i, :] restricted to the group) is quantized
 * as described above. Tokens with t outside [0, cap) are skipped. */
int ks_qaq_quantize_cpu(const void *x, ks_dtype dt, int64_t B, int64_t Hkv, int64_t n,
                         int64_t D, int64_t cap, const int32_t *pos, const uint8_t *new_w,
                         const int32_t *new_off, int32_t *offsets, ks_qaq_store st);

/* ---- 3. unpack + dequantize ------------------------------------------------------
 * out [B, Hkv, cap, D] (dtype dt): the dequantized groups of tokens t < seq_lens[b],
 * zeros for t >= seq_lens[b]. */
int ks_qaq_dequantize_cpu(ks_qaq_store st, ks_dtype dt, int64_t B, int64_t Hkv, int64_t cap,
                           int64_t D, const int32_t *seq_lens, void *out);

/* ---- 4. lower widths in place -------------------------------------------------------
 * For t < seq_lens[b]: where new_w[b,g,t] is a valid width below widths[b,g,t],
 * requantize the group at new_w (see above) and set widths[b,g,t] = new_w. */
int ks_qaq_requantize_cpu(ks_qaq_store st, ks_dtype dt, int64_t B, int64_t Hkv, int64_t cap,
                           int64_t D, const int32_t *seq_lens, const uint8_t *new_w);

/* ---- 5. fused decode attention over the packed cache ------------------------------------
 * q [B, H, D], out [B, H, D] (dtype dt); K and V quantized caches as above (same B,
 * Hkv, cap, D, dtype). For each (b, h), hk = h / G, len = seq_lens[b]:
 *   s[t] = scale * q[b,h,:] . K~[b,hk,t,:]   (K~: dequantized row, float32)
 *   p    = softmax over t < len (stable, float32); out = sum_t p[t] V~[b,hk,t,:]
 *   (zeros for an empty sequence).
 * Dequantization happens in registers / a row buffer: no dense copy is made.
 * p_max (float32 [B, Hkv, cap], may be NULL): p_max[b,hk,t] = max over the G
 * query heads of KV head hk of p[t] for t < len, 0 for t >= len. */
int ks_qaq_attention_cpu(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                          int64_t cap, int64_t D, ks_qaq_store kq, ks_qaq_store vq,
                          const int32_t *seq_lens, float scale, float *p_max, void *out);

/* ---- 6. fused decode attention over selected pages -------------------------------------------
 * As 5, restricted per (b, hk) to the tokens of the pages listed in
 * page_idx[b, hk, 0 .. n_sel) (int32 [B, Hkv, n_sel]; Quest's selection,
 * quest.h): page p holds tokens [p*P, p*P + P) of the sequence. Slot
 * u = i*P + j (i < n_sel, j < P) is token page_idx[b,hk,i]*P + j; a slot whose
 * page is negative or whose token is >= len selects nothing (so -1 padding and
 * a partial last page are fine). The pages of a row should be distinct (a
 * repeated page is attended twice). Only the selected tokens' metadata and
 * code bytes are read. out[b, h] = softmax over the selected tokens (zeros when
 * a row selects nothing). p_max (float32 [B, Hkv, n_sel*P], may be NULL):
 * per slot, the largest probability over the G query heads of its token, 0
 * for a slot that selects nothing. */
int ks_qaq_sparse_attention_cpu(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                                 int64_t cap, int64_t D, ks_qaq_store kq, ks_qaq_store vq,
                                 const int32_t *page_idx, int64_t n_sel, int64_t P,
                                 const int32_t *seq_lens, float scale, float *p_max, void *out);

/* ---- CUDA twins (qaq_cuda.cu) -------------------------------------------------------------
 * Same semantics and results: codes, scales and dequantized values are
 * bit-identical to the CPU's (IEEE division / non-contracted multiply-add);
 * attention outputs agree to float32 rounding. Device pointers, return 0 or a
 * cudaError_t code, never synchronise with the host, graph-capturable
 * (workspaces sized from shapes). Attention: D in {64, 96, 128, 256}, G = H / Hkv <= 8
 * (quantize / dequantize / requantize: any D).
 * n_out <= 64. */
int ks_qaq_bits_cuda(const float *rng, const float *q_sq, const float *s_max, int is_key,
                     int64_t B, int64_t Hg, int64_t cap, const int32_t *seq_lens, double sigma,
                     int allowed_mask, int64_t n_recent, uint8_t *widths, void *stream);
int ks_qaq_quantize_cuda(const void *x, ks_dtype dt, int64_t B, int64_t Hkv, int64_t n,
                         int64_t D, int64_t cap, const int32_t *pos, const uint8_t *new_w,
                         const int32_t *new_off, int32_t *offsets, ks_qaq_store st, void *stream);
int ks_qaq_dequantize_cuda(ks_qaq_store st, ks_dtype dt, int64_t B, int64_t Hkv, int64_t cap,
                           int64_t D, const int32_t *seq_lens, void *out, void *stream);
int ks_qaq_requantize_cuda(ks_qaq_store st, ks_dtype dt, int64_t B, int64_t Hkv, int64_t cap,
                           int64_t D, const int32_t *seq_lens, const uint8_t *new_w,
                           void *stream);
/* Workspace bytes of ks_qaq_attention_cuda (with_p_max: p_max will be non-NULL). */
size_t ks_qaq_attention_cuda_workspace(int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                                       int with_p_max);
int ks_qaq_attention_cuda(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                          int64_t cap, int64_t D, ks_qaq_store kq, ks_qaq_store vq,
                          const int32_t *seq_lens, float scale, float *p_max, void *workspace,
                          void *out, void *stream);

/* Workspace bytes of ks_qaq_sparse_attention_cuda. */
size_t ks_qaq_sparse_attention_cuda_workspace(int64_t B, int64_t H, int64_t Hkv, int64_t n_sel,
                                              int64_t P, int64_t D, int with_p_max);
/* The same kernel as ks_qaq_attention_cuda, reading each row's tokens through its page list. */
int ks_qaq_sparse_attention_cuda(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                                 int64_t cap, int64_t D, ks_qaq_store kq, ks_qaq_store vq,
                                 const int32_t *page_idx, int64_t n_sel, int64_t P,
                                 const int32_t *seq_lens, float scale, float *p_max,
                                 void *workspace, void *out, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* KVSPARSE_QAQ_H */
