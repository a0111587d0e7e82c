/*
 * Quest (query-aware page selection) kernels: the C interface.
 *
 * Plain C99: raw pointers, sizes and element counts. No torch, no Python.
 * Every function here is implemented twice: a CPU version (quest_cpu.c,
 * OpenMP-parallel) and a CUDA version (quest_cuda.cu, suffix _cuda, taking a
 * cudaStream_t passed as void*). Callers (the torch binding and the NumPy
 * module) validate shapes, dtypes and devices before calling; the kernels
 * trust their arguments.
 *
 * Layouts (all contiguous, row-major):
 *   k, v         [B, Hkv, cap, D]          key / value cache, dtype dt
 *   kmin, kmax   [B, Hkv, max_pages, D]    per-page channel-wise min / max of k, dtype dt
 *   q            [B, H, D]                 decode query, dtype dt; H % Hkv == 0,
 *                                          query head h reads KV head h / (H / Hkv)
 *   seq_lens     [B] int32                 valid tokens per sequence, 0 <= len <= cap
 *   scores       [B, Hs, max_pages] float  Hs = H ("head" mode) or Hkv ("group" mode)
 *   page_idx     [B, Hs, n_sel] int32      selected page indices, ascending, padded with -1
 *   out          [B, H, D]                 attention output, dtype dt
 *
 * Pages: page p holds tokens [p*P, min((p+1)*P, len)). A sequence of length len
 * has n_pages(len) = ceil(len / P) pages; pages at or past n_pages are "empty".
 * The page arithmetic never forms len + P or (p+1)*P, so any P >= 1 is safe
 * (the bindings still cap page_size at KS_MAX_PAGE_SIZE).
 *
 * Errors (0 or KS_ERR_NOMEM on CPU) and the NaN / Inf policy: ks_dtype.h.
 * Sizes are the caller's: they must fit the tensors.
 */
#ifndef KVSPARSE_QUEST_H
#define KVSPARSE_QUEST_H

#include <stddef.h>
#include <stdint.h>

#include "ks_dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest page_size the bindings accept: a page never needs more tokens than
 * an int32 length can count. */
#define KS_MAX_PAGE_SIZE ((int64_t)INT32_MAX)

/* ---- 1. page metadata ------------------------------------------------------
 * For every b, kv head and page p in [first_page(b), max_pages):
 *   kmin[b,h,p,:] = min over the page's valid tokens of k[b,h,t,:] (same for kmax),
 * where first_page(b) = start_lens ? start_lens[b] / P : 0.
 * With start_lens == NULL this builds metadata for the whole cache, and pages
 * past n_pages(seq_lens[b]) (empty pages) are written with zeros. With
 * start_lens (the lengths before an append) it rewrites only the pages that
 * the appended tokens [start_lens[b], seq_lens[b]) touched; every other page
 * is left as it is (the CPU version may also re-zero the empty pages after
 * them; either way incremental metadata equals a full build).
 * Requires start_lens[b] <= seq_lens[b]. */
void ks_quest_page_metadata_cpu(const void *k, ks_dtype dt, int64_t B, int64_t Hkv, int64_t cap,
                                int64_t D, const int32_t *start_lens, const int32_t *seq_lens,
                                int64_t page_size, int64_t max_pages, void *kmin, void *kmax);

/* ---- 2. page scores -------------------------------------------------------
 * score[b,h,p] = sum_d max(q[b,h,d]*kmin[b,hk,p,d], q[b,h,d]*kmax[b,hk,p,d])
 * computed in float32, for p < n_pages(seq_lens[b]); -INFINITY for empty pages.
 * group_mode == 0: Hs = H, one row per query head.
 * group_mode != 0: Hs = Hkv, row hk = sum of the scores of query heads
 *                  hk*G .. hk*G+G-1 (G = H / Hkv); empty pages still -INFINITY. */
int ks_quest_page_scores_cpu(const void *q, const void *kmin, const void *kmax, ks_dtype dt,
                             int64_t B, int64_t H, int64_t Hkv, int64_t max_pages, int64_t D,
                             const int32_t *seq_lens, int64_t page_size, int group_mode,
                             float *scores);

/* ---- 3. page selection ----------------------------------------------------
 * For each (b, row): with np = n_pages(seq_lens[b]):
 *   if np <= n_sel: all pages 0..np-1;
 *   else: the last page np-1, plus the n_sel-1 highest-scoring pages among
 *         0..np-2, ties broken towards the lower page index (NaN ranks
 *         above every number).
 * Written ascending into page_idx[b,row,0..], the rest of the row = -1.
 * (A sequence of length 0 gets a row of -1.) n_sel >= 1. */
int ks_quest_select_pages_cpu(const float *scores, int64_t B, int64_t Hs, int64_t max_pages,
                              const int32_t *seq_lens, int64_t page_size, int64_t n_sel,
                              int32_t *page_idx);

/* ---- 4. sparse decode attention -------------------------------------------
 * out[b,h,:] = softmax_t(scale * q[b,h,:] . k[b,hk,t,:]) @ v[b,hk,t,:]
 * over the tokens t of the pages listed in page_idx[b, r(h), :] (entries -1
 * skipped, tokens t >= seq_lens[b] masked), r(h) = h if Hs == H else h / G.
 * float32 accumulation, numerically stable. A row with no token gives zeros;
 * NaN / Inf as described at the top. */
int ks_quest_sparse_attention_cpu(const void *q, const void *k, const void *v, ks_dtype dt,
                                  int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                                  const int32_t *page_idx, int64_t Hs, int64_t n_sel,
                                  const int32_t *seq_lens, int64_t page_size, float scale,
                                  void *out);

/* ---- 5. fused decode (scores + selection + attention) ----------------------
 * Same result as calling 2, 3 and 4 in turn with n_sel = token_budget / P
 * capped at max_pages. The CPU version takes caller-provided workspaces:
 * scores [B, Hs, max_pages] float and page_idx [B, Hs, n_sel] int32. */
int ks_quest_attention_cpu(const void *q, const void *k, const void *v, const void *kmin,
                           const void *kmax, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                           int64_t cap, int64_t D, int64_t max_pages, const int32_t *seq_lens,
                           int64_t page_size, int64_t n_sel, int group_mode, float scale,
                           float *scores_ws, int32_t *page_idx_ws, void *out);

/* ---- CUDA twins (quest_cuda.cu) ---------------------------------------------
 * Same semantics; all pointers are device pointers; stream is a cudaStream_t.
 * Return 0 on success, else a cudaError_t code (launch error). They never
 * synchronise with the host. The GPU supports D in {64, 80, 96, 128, 256}. */
int ks_quest_page_metadata_cuda(const void *k, ks_dtype dt, int64_t B, int64_t Hkv, int64_t cap,
                                int64_t D, const int32_t *start_lens, const int32_t *seq_lens,
                                int64_t page_size, int64_t max_pages, void *kmin, void *kmax,
                                void *stream);
int ks_quest_page_scores_cuda(const void *q, const void *kmin, const void *kmax, ks_dtype dt,
                              int64_t B, int64_t H, int64_t Hkv, int64_t max_pages, int64_t D,
                              const int32_t *seq_lens, int64_t page_size, int group_mode,
                              float *scores, void *stream);
int ks_quest_select_pages_cuda(const float *scores, int64_t B, int64_t Hs, int64_t max_pages,
                               const int32_t *seq_lens, int64_t page_size, int64_t n_sel,
                               int32_t *page_idx, void *stream);
int ks_quest_sparse_attention_cuda(const void *q, const void *k, const void *v, ks_dtype dt,
                                   int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                                   const int32_t *page_idx, int64_t Hs, int64_t n_sel,
                                   const int32_t *seq_lens, int64_t page_size, float scale,
                                   void *workspace, void *out, void *stream);
/* Bytes of device workspace ks_quest_sparse_attention_cuda needs (uninitialised memory is fine). */
size_t ks_quest_sparse_attention_cuda_workspace(int64_t B, int64_t H, int64_t D, int64_t n_sel,
                                                int64_t page_size);
int ks_quest_attention_cuda(const void *q, const void *k, const void *v, const void *kmin,
                            const void *kmax, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                            int64_t cap, int64_t D, int64_t max_pages, const int32_t *seq_lens,
                            int64_t page_size, int64_t n_sel, int group_mode, float scale,
                            void *workspace, void *out, void *stream);
/* Bytes of device workspace ks_quest_attention_cuda needs (uninitialised memory is fine). */
size_t ks_quest_attention_cuda_workspace(int64_t B, int64_t H, int64_t Hkv, int64_t D,
                                         int64_t max_pages, int64_t n_sel, int64_t page_size,
                                         int group_mode);

#ifdef __cplusplus
}
#endif
#endif /* KVSPARSE_QUEST_H */
