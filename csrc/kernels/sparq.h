/*
 * SparQ (sparse-query attention with mean-value reallocation) kernels: the C
 * interface.
 *
 * Plain C99: raw pointers, sizes and element counts. No torch, no Python.
 * Every function is implemented twice: a CPU version (sparq_cpu.c,
 * OpenMP-parallel) and a CUDA version (sparq_cuda.cu, suffix _cuda, taking a
 * cudaStream_t passed as void*). Callers validate shapes, dtypes and devices;
 * the kernels trust their arguments (the CUDA ones clamp seq_lens to [0, cap]
 * and skip out-of-range indices, since validating values would need a sync).
 *
 * Layouts (all contiguous, row-major), dtype dt unless noted:
 *   q          [B, H, D]        decode query; H % Hkv == 0, G = H / Hkv;
 *                               query head h reads KV head h / G
 *   k, v       [B, Hkv, cap, D] key / value cache
 *   kt         [B, Hkv, D, cap] channel-major copy of k: kt[b,h,d,t] = k[b,h,t,d]
 *   v_mean     [B, Hkv, D]      float32, mean of v[b,h,t,:] over t < seq_lens[b]
 *                               (zeros for an empty sequence)
 *   seq_lens   [B] int32        valid tokens per sequence, 0 <= len <= cap
 *   i1         [B, Hs1, r] int32  top-r channels, ascending channel order;
 *                               Hs1 = H (one set per query head) or Hkv (one
 *                               set per KV head, shared by its G query heads)
 *   s_hat      [B, H, cap] float32  approximate attention probabilities
 *   i2         [B, Hs2, n_sel] int32  kept token positions, ascending, padded
 *                               with -1; Hs2 = H or Hkv as for i1
 *   out        [B, H, D]        attention output
 *
 * A "row" of i1 / i2 serves nh query heads: nh = 1 when it has H rows, nh = G
 * (heads r*G .. r*G+G-1) when it has Hkv rows.
 *
 * Ordering of floats (top channels, top positions): NaN ranks above every
 * number (as +inf); ties go to the lower index. The CPU functions that
 * allocate scratch return 0 or KS_ERR_NOMEM; the NaN / Inf policy of the
 * attention is ks_dtype.h's. Every sum whose rounding decides a selection is a
 * float32 sum in head order g = 0, 1, ..., starting from 0.
 */
#ifndef KVSPARSE_SPARQ_H
#define KVSPARSE_SPARQ_H

#include <stddef.h>
#include <stdint.h>

#include "ks_dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- 1. cache maintenance ---------------------------------------------------
 * build: kt[b,h,d,t] = k[b,h,t,d] for every t < cap (the whole cache, valid or
 *        not), v_mean[b,h,:] = (1/len) * sum_{t < len} v[b,h,t,:] accumulated in
 *        float32 (zeros when len == 0), len = seq_lens[b].
 * append: n_new tokens per sequence, k_new / v_new [B, Hkv, n_new, D] (dtype dt):
 *        with len = seq_lens[b] (the length BEFORE the append; the kernel does
 *        not modify seq_lens, the caller adds n_new afterwards), for i < n_new:
 *          k[b,h,len+i,:] = k_new[b,h,i,:], v[b,h,len+i,:] = v_new[b,h,i,:],
 *          kt[b,h,:,len+i] = k_new[b,h,i,:],
 *        and v_mean[b,h,:] += (sum_i v_new[b,h,i,:] - n_new * v_mean[b,h,:]) / (len + n_new)
 *        (float32; the incremental form of the running mean, never recomputed
 *        from the cache). Requires 0 <= len and len + n_new <= cap; a sequence
 *        that breaks this is left untouched (the CPU binding rejects it). */
void ks_sparq_build_cpu(const void *k, const void *v, ks_dtype dt, int64_t B, int64_t Hkv,
                        int64_t cap, int64_t D, const int32_t *seq_lens, void *kt,
                        float *v_mean);
void ks_sparq_append_cpu(const void *k_new, const void *v_new, ks_dtype dt, int64_t B,
                         int64_t Hkv, int64_t cap, int64_t D, int64_t n_new,
                         const int32_t *seq_lens, void *k, void *v, void *kt, float *v_mean);

/* ---- 2. top-r channels --------------------------------------------------------
 * For each (b, row), row in [0, Hs1), Hs1 = H / group_size:
 *   key[d] = sum_{g < group_size} |q[b, row*group_size + g, d]|  (float32, g order)
 *   i1[b,row,:] = the r channels with the largest keys (ties to the lower
 *                 channel), written in ascending channel order.
 * group_size = 1: one set per query head; group_size = G: one per KV head.
 * 1 <= r <= D. */
int ks_sparq_top_channels_cpu(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t D,
                               int64_t r, int64_t group_size, int32_t *i1);

/* ---- 3. approximate scores ------------------------------------------------------
 * For each (b, h), with row = h (Hs1 == H) or h / G (Hs1 == Hkv), c_j = i1[b,row,j],
 * hk = h / G, len = seq_lens[b]:
 *   tau   = sqrt(D * sum_j |q[b,h,c_j]| / sum_d |q[b,h,d]|)
 *   z[t]  = sum_j (q[b,h,c_j] / tau) * kt[b,hk,c_j,t]        (float32, j order)
 *   s_hat[b,h,t] = exp(z[t] - max z) / sum_{t' < len} exp(z[t'] - max z) for t < len,
 *   s_hat[b,h,t] = 0 for len <= t < cap (probability 0; never -inf).
 * If sum_j |q[c_j]| == 0 the logits are all 0 and s_hat is uniform over t < len.
 * i1 values must be in [0, D). */
int ks_sparq_approx_scores_cpu(const void *q, const void *kt, ks_dtype dt, int64_t B, int64_t H,
                                int64_t Hkv, int64_t cap, int64_t D, const int32_t *i1,
                                int64_t Hs1, int64_t r, const int32_t *seq_lens, float *s_hat);

/* ---- 4. top-k positions -----------------------------------------------------------
 * For each (b, row), row in [0, Hs2), Hs2 = H / group_size, len = seq_lens[b]:
 *   key[t] = sum_{g < group_size} s_hat[b, row*group_size + g, t]  (float32, g order)
 *   if n_sel >= len: all positions 0 .. len-1;
 *   else with w = min(local_window, n_sel): the last w positions len-w .. len-1
 *        plus the n_sel - w positions with the largest keys among 0 .. len-w-1
 *        (ties to the lower position).
 * Written ascending into i2[b,row,:], the rest of the row -1. n_sel >= 1,
 * local_window >= 0, n_sel <= cap. */
int ks_sparq_top_positions_cpu(const float *s_hat, int64_t B, int64_t H, int64_t cap,
                                const int32_t *seq_lens, int64_t n_sel, int64_t local_window,
                                int64_t group_size, int32_t *i2);

/* ---- 5. sparse attention with mean-value reallocation ------------------------------
 * For each (b, h), row = h (Hs2 == H) or h / G (Hs2 == Hkv), T = the entries t of
 * i2[b,row,:] with 0 <= t < seq_lens[b] (-1 and out-of-range entries skipped;
 * entries are expected distinct, a repeated one counts once per occurrence):
 *   y_topk = softmax_{t in T}(scale * q[b,h,:] . k[b,hk,t,:]) @ v[b,hk,t,:]
 *            (float32 accumulation, stable softmax; zeros when T is empty)
 *   reallocate != 0: alpha = sum_{t in T} s_hat[b,h,t] (float32, i2 order),
 *                    out = alpha * y_topk + (1 - alpha) * v_mean[b,hk,:]
 *   reallocate == 0: out = y_topk (s_hat and v_mean are not read; may be NULL). */
int ks_sparq_sparse_attention_cpu(const void *q, const void *k, const void *v, ks_dtype dt,
                                  int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                                  const int32_t *i2, int64_t Hs2, int64_t n_sel,
                                  const float *s_hat, const float *v_mean, const int32_t *seq_lens,
                                  float scale, int reallocate, void *out);

/* ---- 6. fused decode ------------------------------------------------------------------
 * Same result as calling 2, 3, 4 and 5 in turn with group_size = G (group_mode
 * != 0) or 1, n_sel = k_top (1 <= k_top <= cap). The CPU version takes caller
 * workspaces: i1_ws [B, Hs, r] int32, s_hat_ws [B, H, cap] float32,
 * i2_ws [B, Hs, k_top] int32 (Hs = Hkv or H). */
int ks_sparq_attention_cpu(const void *q, const void *k, const void *v, const void *kt,
                           const float *v_mean, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                           int64_t cap, int64_t D, const int32_t *seq_lens, int64_t r,
                           int64_t k_top, int64_t local_window, int group_mode, int reallocate,
                           float scale, int32_t *i1_ws, float *s_hat_ws, int32_t *i2_ws,
                           void *out);

/* ---- CUDA twins (sparq_cuda.cu) -------------------------------------------------------
 * Same semantics; device pointers; stream is a cudaStream_t. Return 0 on
 * success, else a cudaError_t code. They never synchronise with the host and
 * are CUDA-graph capturable (workspaces are sized from shapes only). The GPU
 * supports D in {64, 80, 96, 128, 256}; a row of i1 / i2 may serve at most 8 query heads
 * (G <= 8 in group mode). float results can differ from the CPU's in the last
 * bits (exp, FMA), so near-tied selections may differ between devices.
 * ks_sparq_attention_cuda on sm_90 with cap <= 131072 runs three kernels
 * instead of the steps' five: the logits kernel also picks the channels, the
 * selection also normalises the scores and sums alpha. It keeps the positions
 * the steps keep; alpha is summed in another order (float rounding). */
int ks_sparq_build_cuda(const void *k, const void *v, ks_dtype dt, int64_t B, int64_t Hkv,
                        int64_t cap, int64_t D, const int32_t *seq_lens, void *kt,
                        float *v_mean, void *stream);
int ks_sparq_append_cuda(const void *k_new, const void *v_new, ks_dtype dt, int64_t B,
                         int64_t Hkv, int64_t cap, int64_t D, int64_t n_new,
                         const int32_t *seq_lens, void *k, void *v, void *kt, float *v_mean,
                         void *stream);
int ks_sparq_top_channels_cuda(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t D,
                               int64_t r, int64_t group_size, int32_t *i1, void *stream);
int ks_sparq_approx_scores_cuda(const void *q, const void *kt, ks_dtype dt, int64_t B, int64_t H,
                                int64_t Hkv, int64_t cap, int64_t D, const int32_t *i1,
                                int64_t Hs1, int64_t r, const int32_t *seq_lens, float *s_hat,
                                void *workspace, void *stream);
/* Bytes of device workspace for ks_sparq_approx_scores_cuda (uninitialised is fine). */
size_t ks_sparq_approx_scores_cuda_workspace(int64_t B, int64_t H, int64_t cap);
int ks_sparq_top_positions_cuda(const float *s_hat, int64_t B, int64_t H, int64_t cap,
                                const int32_t *seq_lens, int64_t n_sel, int64_t local_window,
                                int64_t group_size, int32_t *i2, void *workspace, void *stream);
size_t ks_sparq_top_positions_cuda_workspace(int64_t B, int64_t H, int64_t cap,
                                             int64_t group_size);
int ks_sparq_sparse_attention_cuda(const void *q, const void *k, const void *v, ks_dtype dt,
                                   int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                                   const int32_t *i2, int64_t Hs2, int64_t n_sel,
                                   const float *s_hat, const float *v_mean, const int32_t *seq_lens,
                                   float scale, int reallocate, void *workspace, void *out,
                                   void *stream);
size_t ks_sparq_sparse_attention_cuda_workspace(int64_t B, int64_t H, int64_t Hs2, int64_t D,
                                                int64_t n_sel);
int ks_sparq_attention_cuda(const void *q, const void *k, const void *v, const void *kt,
                            const float *v_mean, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                            int64_t cap, int64_t D, const int32_t *seq_lens, int64_t r,
                            int64_t k_top, int64_t local_window, int group_mode, int reallocate,
                            float scale, void *workspace, void *out, void *stream);
size_t ks_sparq_attention_cuda_workspace(int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                                         int64_t r, int64_t k_top, int group_mode);

#ifdef __cplusplus
}
#endif
#endif /* KVSPARSE_SPARQ_H */
