// QAQ over width-binned pages ("qaqp"): the maintenance kernels, CUDA.
// Semantics: qaqp.h sections 4 (re-quantization, first half) and 5
// (compaction) and its "CUDA twins" paragraph. The dequantization of one
// element, the page header check and the bounds fold are qaqp_cuda.cu's
// (qaqp_cuda_common.cuh), so rows and bounds are bit for bit what dequantize
// and append give.
//
// No torch, no Python: raw device pointers, sizes and a cudaStream_t. Nothing
// is read back on the host; workspaces are sized from shapes: every call is
// graph-capturable. Kept apart from qaqp_cuda.cu (append, dequantize,
// attention) so that the two translation units compile in parallel.
//
//   requant_take  two kernels (see "requant_take" below): a plan kernel, one
//                 block per (b, hk), finds the moving slots from the masks at
//                 entry and ranks them in (j, i) order; a rows kernel, a warp
//                 per output row, dequantizes the taken tokens and clears
//                 their mask bits.
//   compact       four kernels (see "compact" below): count (a block per
//                 (b, hk)), scan (one block: every new page's address), scatter
//                 (a block per source page: its live slots to their new
//                 slots), finish (a block per new page: header, unused
//                 positions, bounds; and the page lists).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "qaqp.h"
#include "qaqp_cuda_common.cuh"

namespace {

using namespace ks_qaqp_cu;

// ------------------------------------------------------------ requant_take ----
//
// k_rq_plan: grid B * Hkv, RQ_NT threads. The listed pages of (b, hk) are
// walked in chunks of RQ_NW * RQ_PPW consecutive entries, a warp taking RQ_PPW
// consecutive ones. For each page the warp reads the header once (page_at) and
// the 64 target widths (lane l: slots l and l + 32) and ballots the slots that
// move into a 64-bit mask. Warp totals go through shared memory; each warp's
// first rank is the block's running count before the chunk plus the totals of
// the warps before it, so ranks follow (j, i) order. A moving slot of rank r < n
// writes row r's new widths and, in pos_out[r], its source j * 64 + i (scratch,
// overwritten by the rows kernel). The walk stops once n are ranked. Then
// moved = min(movers, n) and the rows r >= moved get widths 255 and position -1.
// No mask is written here: the move set is the one of the masks at entry, for
// every (b, hk) (a page listed twice gives its movers twice, as qaqp.h allows;
// the CPU's serial walk gives them once when both listings are of one (b, hk)).
//
// k_rq_rows: a warp per output row (b, hk, r), grid-stride. A taken row reads its
// source from pos_out, re-validates the page (headers do not change in between),
// writes the dequantized keys / values (deq_elem + store_bits, as k_dequant),
// the position, and clears the slot's mask bit with a 64-bit atomicAnd (rows of
// one page run in parallel). Other rows get zeros.

constexpr int RQ_NT = 512;
constexpr int RQ_NW = RQ_NT / 32;
constexpr int RQ_PPW = 4;  // listed pages per warp per chunk

// does slot i of a page of widths (wk, wv) move to (nk, nv)? (qaqp.h section 4)
__device__ __forceinline__ bool rq_moves(int nk, int nv, int wk, int wv) {
  return ks_qaqp_class(nk, nv) >= 0 && !(nk == wk && nv == wv) && nk <= wk && nv <= wv;
}

__global__ void __launch_bounds__(RQ_NT) k_rq_plan(const uint8_t *arena, int64_t A, ks_qaqp_geom g,
                                                   const int32_t *plist, int64_t L, const uint8_t *new_wk,
                                                   const uint8_t *new_wv, int64_t n, uint8_t *wk_out,
                                                   uint8_t *wv_out, int32_t *pos_out, int32_t *moved) {
  const int64_t bh = blockIdx.x;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  __shared__ int s_wt[RQ_NW];
  int64_t carry = 0;  // movers ranked before this chunk (block-uniform)
  for (int64_t j0 = 0; j0 < L && carry < n; j0 += RQ_NW * RQ_PPW) {
    uint64_t mv[RQ_PPW];
    int tot = 0;
#pragma unroll
    for (int q = 0; q < RQ_PPW; ++q) {
      const int64_t j = j0 + warp * RQ_PPW + q;
      bool ok = false;
      int wk = 0, wv = 0;
      uint64_t live = 0;
      if (j < L) {  // (warp-uniform: one page per warp)
        ks_qaqp_layout Lo;
        const int64_t a = plist[bh * L + j];
        ok = page_at(arena, A, g, a, wk, wv, Lo);
        if (ok) live = *reinterpret_cast<const unsigned long long *>(arena + a * 16);
      }
      bool f0 = false, f1 = false;
      if (ok) {
        const int64_t t = (bh * L + j) * QP;
        f0 = ((live >> lane) & 1ull) && rq_moves(new_wk[t + lane], new_wv[t + lane], wk, wv);
        f1 = ((live >> (lane + 32)) & 1ull) && rq_moves(new_wk[t + lane + 32], new_wv[t + lane + 32], wk, wv);
      }
      const uint64_t m = (uint64_t)__ballot_sync(QP_FULL, f0) | ((uint64_t)__ballot_sync(QP_FULL, f1) << 32);
      mv[q] = m;
      tot += __popcll(m);
    }
    if (lane == 0) s_wt[warp] = tot;
    __syncthreads();
    int64_t wbase = 0, ctot = 0;
#pragma unroll
    for (int w = 0; w < RQ_NW; ++w) {
      const int x = s_wt[w];
      if (w < warp) wbase += x;
      ctot += x;
    }
    int64_t r0 = carry + wbase;  // rank of the warp's first mover
#pragma unroll
    for (int q = 0; q < RQ_PPW; ++q) {
      const uint64_t m = mv[q];
      if (m && r0 < n) {
        const int64_t j = j0 + warp * RQ_PPW + q, t = (bh * L + j) * QP;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int i = lane + 32 * h;
          if ((m >> i) & 1ull) {
            const int64_t r = r0 + __popcll(m & ((1ull << i) - 1ull));
            if (r < n) {
              wk_out[bh * n + r] = new_wk[t + i];
              wv_out[bh * n + r] = new_wv[t + i];
              pos_out[bh * n + r] = (int32_t)(j * QP + i);  // the source (the rows kernel's input)
            }
          }
        }
      }
      r0 += __popcll(m);
    }
    carry += ctot;
    __syncthreads();  // s_wt is rewritten by the next chunk
  }
  const int64_t mc = carry < n ? carry : n;
  if (tid == 0) moved[bh] = (int32_t)mc;
  for (int64_t r = mc + tid; r < n; r += RQ_NT) {
    wk_out[bh * n + r] = 255;
    wv_out[bh * n + r] = 255;
    pos_out[bh * n + r] = -1;
  }
}

template <typename T>
__global__ void __launch_bounds__(256) k_rq_rows(uint8_t *arena, int64_t A, ks_qaqp_geom g, const int32_t *plist,
                                                 int64_t L, int64_t n, int64_t rows, void *kout, void *vout,
                                                 int32_t *pos_out, const int32_t *moved) {
  using R = typename QR<T>::R;
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  const int D = (int)g.D, nk = (int)g.n_out_k, nv = (int)g.n_out_v;
  for (int64_t row = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < rows; row += nwarps) {
    const int64_t bh = row / n, r = row - bh * n;
    R *ko = reinterpret_cast<R *>(kout) + row * g.D;
    R *vo = reinterpret_cast<R *>(vout) + row * g.D;
    int64_t src = r < (int64_t)moved[bh] ? (int64_t)pos_out[row] : -1;
    __syncwarp();  // every lane has its source before lane 0 writes the position over it
    const int64_t j = src >> 6;
    const int i = (int)(src & 63);
    int64_t a = -1;
    int wk = 0, wv = 0;
    ks_qaqp_layout Lo;
    bool ok = false;
    if (src >= 0 && j < L) {
      a = plist[bh * L + j];
      ok = page_at(arena, A, g, a, wk, wv, Lo);
    }
    if (ok) {
      const uint8_t *pg = arena + a * 16;
      for (int e = lane; e < D; e += 32) {
        ko[e] = store_bits<T>(deq_elem<T>(pg, Lo.ksz, Lo.kc, Lo.koi, Lo.kov, Lo.sk, wk, nk, D, i, e));
        vo[e] = store_bits<T>(deq_elem<T>(pg, Lo.vsz, Lo.vc, Lo.voi, Lo.vov, Lo.sv, wv, nv, D, i, e));
      }
      if (lane == 0) {
        pos_out[row] = reinterpret_cast<const int32_t *>(pg + Lo.pos)[i];
        atomicAnd(reinterpret_cast<unsigned long long *>(arena + a * 16), ~(1ull << i));
      }
    } else {
      for (int e = lane; e < D; e += 32) {
        ko[e] = (R)0;
        vo[e] = (R)0;
      }
      // (a taken row always names its page: only a row past moved gets here,
      // and the plan kernel already gave it position -1)
      if (lane == 0 && src >= 0) pos_out[row] = -1;
    }
  }
}

template <typename T>
int rq_run(uint8_t *arena, int64_t A, const ks_qaqp_geom &g, int64_t nbh, const int32_t *plist, int64_t L,
           const uint8_t *new_wk, const uint8_t *new_wv, int64_t n, void *kout, void *vout, uint8_t *wk_out,
           uint8_t *wv_out, int32_t *pos_out, int32_t *moved, cudaStream_t st) {
  k_rq_plan<<<(unsigned)nbh, RQ_NT, 0, st>>>(arena, A, g, plist, L, new_wk, new_wv, n, wk_out, wv_out, pos_out,
                                              moved);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || n <= 0) return (int)e;
  const int64_t rows = nbh * n, blocks = (rows + 7) / 8;
  k_rq_rows<T><<<(unsigned)(blocks < (1 << 20) ? blocks : (1 << 20)), 256, 0, st>>>(arena, A, g, plist, L, n, rows,
                                                                                    kout, vout, pos_out, moved);
  return (int)cudaGetLastError();
}

// ----------------------------------------------------------------- compact ----
//
// Workspace (CmpWs, sized from B, Hkv, maxp_src): pref int32 [B * Hkv, maxp_src]
// (per listed source page: the live tokens of its class in the earlier entries of
// its (b, hk)), and per (b, hk, class): cnt int32 (live tokens), first int64
// (address of its first new page, as if the arena were unlimited), rank0 int32
// (its first page's index in the (b, hk)'s new page list), nw int32 (how many of
// its new pages are written).
//
//   k_cmp_count    grid B * Hkv, CMP_NT threads: chunks of CMP_NT listed pages,
//                  a thread per entry (page_at, popcount of the mask); the
//                  per-class exclusive prefix within a warp by one masked
//                  shuffle scan per class present in the warp, across warps
//                  and chunks through shared per-class running counts. pref and
//                  cnt.
//   k_cmp_scan     one block: a thread per (b, hk) (chunks of CMP_SCAN_NT) sums
//                  its new pages' bytes over the 25 classes; a block-wide int64
//                  exclusive scan gives each (b, hk)'s first address; the thread
//                  then walks its classes: first, rank0, how many pages fit
//                  (end <= A_dst, start <= INT32_MAX: a prefix, as the ends grow)
//                  and the page list (index < maxp), open, n_pages, the flags and
//                  top (end of the last written page). This is the CPU's serial
//                  walk in closed form: a page is written iff it fits the arena
//                  and its index is < maxp; ARENA when a page does not fit, PAGES
//                  when one fits but is past maxp.
//   k_cmp_scatter  grid (B * Hkv, Y), CMP_NT threads: a block per listed source
//                  page (grid-stride over j): each live slot's class rank t =
//                  pref + popcount of the lower live bits gives new page t / 64
//                  and slot t % 64; the slots' fields (pos, ksz, vsz, kc, vc,
//                  koi, kov, voi, vov: all whole 32-bit words) are copied word
//                  by word, the block's threads over (slot, word) of each field.
//                  Tokens of pages that are not written are not copied.
//   k_cmp_finish   grid (B * Hkv, Y), CMP_NT threads, after the scatter: a block
//                  per page list entry idx < maxp (grid-stride): idx < n_pages:
//                  the page's header (mask of bits 0 .. m - 1, widths, n_used = m),
//                  positions -1 for slots m .. 63, with nb the bounds: +inf / -inf
//                  then bound_slots over slots 0 .. m - 1 in slot order (append's
//                  fold); pages[idx] = its address; idx >= n_pages: pages[idx] = -1.
//                  Bytes of a new page that the CPU does not write either (unused
//                  slots' other fields, padding) are left as they are.

constexpr int CMP_NT = 256;
constexpr int CMP_NW = CMP_NT / 32;
constexpr int CMP_SCAN_NT = 1024;
constexpr int64_t CMP_MAXP_SRC = (int64_t)1 << 25;  // 64 * maxp_src fits int32

inline size_t cmp_align(size_t x) { return (x + 255) & ~(size_t)255; }

struct CmpWs {
  size_t pref, cnt, first, rank0, nw, total;
};
CmpWs cmp_ws(int64_t nbh, int64_t maxp_src) {
  CmpWs w;
  w.pref = 0;
  w.cnt = w.pref + cmp_align((size_t)(nbh * maxp_src) * 4);
  w.first = w.cnt + cmp_align((size_t)(nbh * QP_NC) * 4);
  w.rank0 = w.first + cmp_align((size_t)(nbh * QP_NC) * 8);
  w.nw = w.rank0 + cmp_align((size_t)(nbh * QP_NC) * 4);
  w.total = w.nw + cmp_align((size_t)(nbh * QP_NC) * 4);
  return w;
}

__device__ __forceinline__ int64_t cmp_np(const int32_t *n_pages_src, int64_t bh, int64_t maxp_src) {
  const int64_t np = n_pages_src[bh];
  return np < 0 ? 0 : (np > maxp_src ? maxp_src : np);
}

// new pages' size in units of 16 bytes of class c
__device__ __forceinline__ int64_t cmp_sz16(const ks_qaqp_geom &g, int c) {
  return ks_qaqp_layout_of(g, qp_width(c / 5), qp_width(c % 5)).bytes / 16;
}

__global__ void __launch_bounds__(CMP_NT) k_cmp_count(const uint8_t *src, int64_t A_src, ks_qaqp_geom g,
                                                      const int32_t *pages_src, int64_t maxp_src,
                                                      const int32_t *n_pages_src, int32_t *pref, int32_t *cnt) {
  const int64_t bh = blockIdx.x;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  __shared__ int s_w[CMP_NW][QP_NC], s_wb[CMP_NW][QP_NC], s_carry[QP_NC];
  const int64_t np = cmp_np(n_pages_src, bh, maxp_src);
  if (tid < QP_NC) s_carry[tid] = 0;
  for (int64_t j0 = 0; j0 < np; j0 += CMP_NT) {
    for (int i = tid; i < CMP_NW * QP_NC; i += CMP_NT) (&s_w[0][0])[i] = 0;
    __syncthreads();  // (also: s_carry initialised / the last chunk's s_wb read)
    const int64_t j = j0 + tid;
    int c = -1, live = 0;
    if (j < np) {
      int wk, wv;
      ks_qaqp_layout Lo;
      const int64_t a = pages_src[bh * maxp_src + j];
      if (page_at(src, A_src, g, a, wk, wv, Lo)) {
        c = ks_qaqp_class(wk, wv);
        live = __popcll(*reinterpret_cast<const unsigned long long *>(src + a * 16));
      }
    }
    // exclusive prefix of live among the lanes of the same class, one class at a time
    int excl = 0;
    unsigned todo = __ballot_sync(QP_FULL, c >= 0);
    while (todo) {
      const int cc = __shfl_sync(QP_FULL, c, __ffs(todo) - 1);
      const bool mine = c == cc;
      const int v = mine ? live : 0;
      int x = v;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(QP_FULL, x, o);
        if (lane >= o) x += y;
      }
      if (mine) excl = x - v;
      if (lane == 31) s_w[warp][cc] = x;
      todo &= ~__ballot_sync(QP_FULL, mine);
    }
    __syncthreads();
    if (tid < QP_NC) {
      int s = s_carry[tid];
      for (int w = 0; w < CMP_NW; ++w) {
        s_wb[w][tid] = s;
        s += s_w[w][tid];
      }
      s_carry[tid] = s;
    }
    __syncthreads();
    if (c >= 0) pref[bh * maxp_src + j] = s_wb[warp][c] + excl;
  }
  __syncthreads();
  if (tid < QP_NC) cnt[bh * QP_NC + tid] = s_carry[tid];
}

// exclusive block-wide int64 prefix sum (blockDim.x = NT, a multiple of 32);
// *total: the block's sum. Contains __syncthreads: call uniformly.
template <int NT>
__device__ __forceinline__ int64_t cmp_block_scan(int64_t v, int64_t *sm, int64_t *total) {
  constexpr int NW = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t y = __shfl_up_sync(QP_FULL, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) sm[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < NW ? sm[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(QP_FULL, w, o);
      if (lane >= o) w += y;
    }
    if (lane < NW) sm[lane] = w;  // inclusive sums of the warp totals
  }
  __syncthreads();
  const int64_t before = warp > 0 ? sm[warp - 1] : 0;
  *total = sm[NW - 1];
  __syncthreads();
  return before + x - v;
}

__global__ void __launch_bounds__(CMP_SCAN_NT) k_cmp_scan(ks_qaqp_geom g, int64_t nbh, int64_t A_dst, int64_t maxp,
                                                          const int32_t *cnt, int64_t *first, int32_t *rank0,
                                                          int32_t *nw, int64_t *top, int32_t *open,
                                                          int32_t *n_pages, int32_t *flags) {
  const int tid = threadIdx.x;
  __shared__ int64_t s_sz[QP_NC];
  __shared__ int64_t s_scan[32];
  __shared__ unsigned long long s_top;
  __shared__ int s_fl;
  if (tid < QP_NC) s_sz[tid] = cmp_sz16(g, tid);
  if (tid == 0) {
    s_top = 0ull;
    s_fl = 0;
  }
  __syncthreads();
  const int64_t A16 = A_dst < 0 ? 0 : A_dst / 16, I32 = 0x7fffffffLL;
  int64_t carry = 0, tp = 0;
  int fl = 0;
  for (int64_t b0 = 0; b0 < nbh; b0 += CMP_SCAN_NT) {
    const int64_t bh = b0 + tid;
    int64_t space = 0;
    if (bh < nbh)
      for (int c = 0; c < QP_NC; ++c) space += (((int64_t)cnt[bh * QP_NC + c] + QP - 1) / QP) * s_sz[c];
    int64_t total;
    const int64_t excl = cmp_block_scan<CMP_SCAN_NT>(space, s_scan, &total);
    if (bh < nbh) {
      int64_t start = carry + excl, rank = 0, np = 0;
      for (int c = 0; c < QP_NC; ++c) {
        const int64_t sz = s_sz[c], npg = ((int64_t)cnt[bh * QP_NC + c] + QP - 1) / QP;
        // pages k < ka fit the arena: (start + (k + 1) sz) * 16 <= A_dst and start + k sz <= INT32_MAX
        int64_t ka = A16 >= start ? (A16 - start) / sz : 0;
        const int64_t k2 = I32 >= start ? (I32 - start) / sz + 1 : 0;
        ka = ka < k2 ? ka : k2;
        ka = ka < npg ? ka : npg;
        // ... and the page list: index rank + k < maxp
        const int64_t kp0 = maxp - rank > 0 ? maxp - rank : 0;
        const int64_t w = ka < kp0 ? ka : kp0;
        if (ka < npg) fl |= KS_QAQP_FLAG_ARENA;
        if (ka > kp0) fl |= KS_QAQP_FLAG_PAGES;
        first[bh * QP_NC + c] = start;
        rank0[bh * QP_NC + c] = (int32_t)rank;
        nw[bh * QP_NC + c] = (int32_t)w;
        open[bh * QP_NC + c] = w > 0 ? (int32_t)(start + (w - 1) * sz) : -1;
        if (w > 0) tp = start + w * sz > tp ? start + w * sz : tp;
        start += npg * sz;
        rank += npg;
        np += w;
      }
      n_pages[bh] = (int32_t)np;
    }
    carry += total;
  }
  if (tp > 0) atomicMax(&s_top, (unsigned long long)tp);
  if (fl) atomicOr(&s_fl, fl);
  __syncthreads();
  if (tid == 0) {
    *top = (int64_t)s_top;
    if (s_fl) atomicOr(flags, s_fl);
  }
}

__global__ void __launch_bounds__(CMP_NT) k_cmp_scatter(const uint8_t *src, int64_t A_src, ks_qaqp_geom g,
                                                        const int32_t *pages_src, int64_t maxp_src,
                                                        const int32_t *n_pages_src, const int32_t *pref,
                                                        const int64_t *first, const int32_t *nw, uint8_t *dst) {
  const int64_t bh = blockIdx.x;
  const int tid = threadIdx.x;
  __shared__ int64_t s_dst[QP];  // byte offset in dst of the new page of slot s, -1: not copied
  __shared__ int s_slot[QP];     // its slot there
  __shared__ ks_qaqp_layout s_L;
  __shared__ int64_t s_src;      // byte offset of the source page, -1: not a page
  __shared__ int64_t s_first, s_sz16;
  __shared__ unsigned long long s_mask;
  __shared__ int s_pref, s_nw;
  const int64_t np = cmp_np(n_pages_src, bh, maxp_src);
  for (int64_t j = blockIdx.y; j < np; j += gridDim.y) {
    if (tid == 0) {
      int wk, wv;
      ks_qaqp_layout Lo;
      const int64_t a = pages_src[bh * maxp_src + j];
      s_src = -1;
      if (page_at(src, A_src, g, a, wk, wv, Lo)) {
        const int c = ks_qaqp_class(wk, wv);
        s_src = a * 16;
        s_L = Lo;
        s_mask = *reinterpret_cast<const unsigned long long *>(src + a * 16);
        s_pref = pref[bh * maxp_src + j];
        s_first = first[bh * QP_NC + c];
        s_nw = nw[bh * QP_NC + c];
        s_sz16 = Lo.bytes / 16;
      }
    }
    __syncthreads();
    if (s_src >= 0) {  // (block-uniform)
      if (tid < QP) {
        const uint64_t m = s_mask;
        int64_t d = -1;
        int u = 0;
        if ((m >> tid) & 1ull) {
          const int64_t t = (int64_t)s_pref + __popcll(m & ((1ull << tid) - 1ull)), k = t >> 6;
          if (k < s_nw) d = (s_first + k * s_sz16) * 16;
          u = (int)(t & 63);
        }
        s_dst[tid] = d;
        s_slot[tid] = u;
      }
      __syncthreads();
      const uint8_t *sp = src + s_src;
      const ks_qaqp_layout &L = s_L;
      // one field: bps bytes per slot at offset off (bps a multiple of 4, offsets of 16)
      auto copy = [&](int64_t off, int64_t bps) {
        const int wps = (int)(bps / 4);
        for (int idx = tid; idx < QP * wps; idx += CMP_NT) {
          const int s = idx / wps, w = idx - s * wps;
          const int64_t d = s_dst[s];
          if (d < 0) continue;
          reinterpret_cast<uint32_t *>(dst + d + off + s_slot[s] * bps)[w] =
              reinterpret_cast<const uint32_t *>(sp + off + s * bps)[w];
        }
      };
      copy(L.pos, 4);
      copy(L.ksz, 4);
      copy(L.vsz, 4);
      copy(L.kc, L.sk);
      copy(L.vc, L.sv);
      copy(L.koi, 2 * g.n_out_k);
      copy(L.kov, g.ds * g.n_out_k);
      copy(L.voi, 2 * g.n_out_v);
      copy(L.vov, g.ds * g.n_out_v);
    }
    __syncthreads();  // the shared state is rewritten for the next page
  }
}

template <typename T>
__global__ void __launch_bounds__(CMP_NT) k_cmp_finish(ks_qaqp_geom g, const int32_t *cnt, const int64_t *first,
                                                       const int32_t *rank0, const int32_t *nw,
                                                       const int32_t *n_pages, uint8_t *dst, int32_t *pages,
                                                       int64_t maxp) {
  using R = typename QR<T>::R;
  const int64_t bh = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t npw = n_pages[bh];  // the written pages: the first npw of the list
  for (int64_t idx = blockIdx.y; idx < maxp; idx += gridDim.y) {
    if (idx >= npw) {
      if (tid == 0) pages[bh * maxp + idx] = -1;
      continue;
    }
    // its class: the one whose written pages cover idx (the written pages are a
    // prefix of the list, so every class before it has all its pages written)
    int c = 0;
    for (int cc = 0; cc < QP_NC; ++cc) {
      const int64_t r0 = rank0[bh * QP_NC + cc];
      if (idx >= r0 && idx < r0 + nw[bh * QP_NC + cc]) {
        c = cc;
        break;
      }
    }
    const int64_t k = idx - rank0[bh * QP_NC + c];
    const int64_t rem = (int64_t)cnt[bh * QP_NC + c] - k * QP;
    const int m = (int)(rem < QP ? rem : QP);
    const int wk = qp_width(c / 5), wv = qp_width(c % 5);
    const ks_qaqp_layout L = ks_qaqp_layout_of(g, wk, wv);
    const int64_t addr = first[bh * QP_NC + c] + k * (L.bytes / 16);
    uint8_t *pg = dst + addr * 16;
    if (tid == 0) {
      const uint64_t mask = m >= QP ? ~0ull : ((1ull << m) - 1ull);
      *reinterpret_cast<uint4 *>(pg) = make_uint4((uint32_t)mask, (uint32_t)(mask >> 32),
                                                  (uint32_t)wk | ((uint32_t)wv << 8) | ((uint32_t)m << 16), 0u);
      pages[bh * maxp + idx] = (int32_t)addr;
    }
    int32_t *pos = reinterpret_cast<int32_t *>(pg + L.pos);
    for (int s = m + tid; s < QP; s += CMP_NT) pos[s] = -1;
    if (g.nb) {
      R *mn = reinterpret_cast<R *>(pg + L.kmin), *mx = reinterpret_cast<R *>(pg + L.kmax);
      for (int64_t e = tid; e < g.D; e += CMP_NT) {  // (the same thread folds element e below)
        mn[e] = inf_bits<T>(false);
        mx[e] = inf_bits<T>(true);
      }
      bound_slots<T>(pg, g, L, wk, 0, m, tid, CMP_NT);
    }
  }
}

// blocks along y for nbh rows of `count` items: about 4096 blocks in all
inline unsigned cmp_grid_y(int64_t nbh, int64_t count) {
  int64_t y = (4096 + nbh - 1) / nbh;
  y = y < count ? y : count;
  y = y < 65535 ? y : 65535;
  return (unsigned)(y < 1 ? 1 : y);
}

template <typename T>
int cmp_run(const uint8_t *src, int64_t A_src, const ks_qaqp_geom &g, int64_t nbh, const int32_t *pages_src,
            int64_t maxp_src, const int32_t *n_pages_src, uint8_t *dst, int64_t A_dst, int64_t *top,
            int32_t *open, int32_t *pages, int64_t maxp, int32_t *n_pages, int32_t *flags, void *workspace,
            cudaStream_t st) {
  const CmpWs wl = cmp_ws(nbh, maxp_src);
  uint8_t *ws = reinterpret_cast<uint8_t *>(workspace);
  int32_t *pref = reinterpret_cast<int32_t *>(ws + wl.pref);
  int32_t *cnt = reinterpret_cast<int32_t *>(ws + wl.cnt);
  int64_t *first = reinterpret_cast<int64_t *>(ws + wl.first);
  int32_t *rank0 = reinterpret_cast<int32_t *>(ws + wl.rank0);
  int32_t *nw = reinterpret_cast<int32_t *>(ws + wl.nw);
  cudaError_t e;
  k_cmp_count<<<(unsigned)nbh, CMP_NT, 0, st>>>(src, A_src, g, pages_src, maxp_src, n_pages_src, pref, cnt);
  if ((e = cudaGetLastError()) != cudaSuccess) return (int)e;
  k_cmp_scan<<<1, CMP_SCAN_NT, 0, st>>>(g, nbh, A_dst, maxp, cnt, first, rank0, nw, top, open, n_pages, flags);
  if ((e = cudaGetLastError()) != cudaSuccess) return (int)e;
  if (maxp_src > 0) {
    k_cmp_scatter<<<dim3((unsigned)nbh, cmp_grid_y(nbh, maxp_src)), CMP_NT, 0, st>>>(
        src, A_src, g, pages_src, maxp_src, n_pages_src, pref, first, nw, dst);
    if ((e = cudaGetLastError()) != cudaSuccess) return (int)e;
  }
  if (maxp > 0) {
    k_cmp_finish<T><<<dim3((unsigned)nbh, cmp_grid_y(nbh, maxp)), CMP_NT, 0, st>>>(g, cnt, first, rank0, nw,
                                                                                  n_pages, dst, pages, maxp);
    if ((e = cudaGetLastError()) != cudaSuccess) return (int)e;
  }
  return 0;
}

}  // namespace

// ------------------------------------------------------------ entry points ----

extern "C" {

int ks_qaqp_requant_take_cuda(uint8_t *arena, int64_t A, ks_qaqp_geom g, ks_dtype dt, int64_t B, int64_t Hkv,
                              const int32_t *plist, int64_t L, const uint8_t *new_wk, const uint8_t *new_wv,
                              int64_t n, void *kout, void *vout, uint8_t *wk_out, uint8_t *wv_out,
                              int32_t *pos_out, int32_t *moved, void *stream) {
  if (B <= 0 || Hkv <= 0) return 0;
  if (!qp_geom_ok(g, dt) || ((uintptr_t)arena & 15) != 0 || L > 0x7fffffffLL / QP || n > 0x7fffffffLL ||
      B * Hkv > 0x7fffffffLL)
    return (int)cudaErrorInvalidValue;
  const int64_t A16 = A < 0 ? 0 : A & ~(int64_t)15;
  const int64_t nbh = B * Hkv, L0 = L < 0 ? 0 : L, n0 = n < 0 ? 0 : n;
  cudaStream_t st = (cudaStream_t)stream;
  if (dt == KS_F32)
    return rq_run<float>(arena, A16, g, nbh, plist, L0, new_wk, new_wv, n0, kout, vout, wk_out, wv_out, pos_out,
                         moved, st);
  if (dt == KS_F16)
    return rq_run<__half>(arena, A16, g, nbh, plist, L0, new_wk, new_wv, n0, kout, vout, wk_out, wv_out, pos_out,
                          moved, st);
  return rq_run<__nv_bfloat16>(arena, A16, g, nbh, plist, L0, new_wk, new_wv, n0, kout, vout, wk_out, wv_out,
                               pos_out, moved, st);
}

size_t ks_qaqp_compact_cuda_workspace(int64_t B, int64_t Hkv, int64_t maxp_src) {
  if (B <= 0 || Hkv <= 0) return 0;
  return cmp_ws(B * Hkv, maxp_src < 0 ? 0 : maxp_src).total;
}

int ks_qaqp_compact_cuda(const uint8_t *src, int64_t A_src, ks_qaqp_geom g, ks_dtype dt, int64_t B, int64_t Hkv,
                         const int32_t *pages_src, int64_t maxp_src, const int32_t *n_pages_src, uint8_t *dst,
                         int64_t A_dst, int64_t *top, int32_t *open, int32_t *pages, int64_t maxp,
                         int32_t *n_pages, int32_t *flags, void *workspace, void *stream) {
  const int64_t nbh = (B > 0 && Hkv > 0) ? B * Hkv : 0;
  if (!qp_geom_ok(g, dt) || ((uintptr_t)src & 15) != 0 || ((uintptr_t)dst & 15) != 0 ||
      maxp_src >= CMP_MAXP_SRC || maxp > 0x7fffffffLL || nbh > 0x7fffffffLL || (nbh > 0 && !workspace))
    return (int)cudaErrorInvalidValue;
  const int64_t As = A_src < 0 ? 0 : A_src & ~(int64_t)15;
  const int64_t mps = maxp_src < 0 ? 0 : maxp_src, mp = maxp < 0 ? 0 : maxp;
  cudaStream_t st = (cudaStream_t)stream;
  if (nbh == 0) {  // no (b, hk): nothing to write but top = 0 (as the CPU)
    k_cmp_scan<<<1, CMP_SCAN_NT, 0, st>>>(g, 0, A_dst, mp, nullptr, nullptr, nullptr, nullptr, top, open, n_pages,
                                          flags);
    return (int)cudaGetLastError();
  }
  if (dt == KS_F32)
    return cmp_run<float>(src, As, g, nbh, pages_src, mps, n_pages_src, dst, A_dst, top, open, pages, mp, n_pages,
                          flags, workspace, st);
  if (dt == KS_F16)
    return cmp_run<__half>(src, As, g, nbh, pages_src, mps, n_pages_src, dst, A_dst, top, open, pages, mp,
                           n_pages, flags, workspace, st);
  return cmp_run<__nv_bfloat16>(src, As, g, nbh, pages_src, mps, n_pages_src, dst, A_dst, top, open, pages, mp,
                                n_pages, flags, workspace, st);
}

}  // extern "C"
