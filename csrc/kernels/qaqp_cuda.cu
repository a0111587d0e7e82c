// QAQ over width-binned pages ("qaqp"), CUDA kernels. Semantics, page layout,
// addresses and allocation state: qaqp.h (its "CUDA twins" paragraph).
//
// No torch, no Python: raw device pointers, sizes and a cudaStream_t. No entry
// point reads anything on the host; workspaces are sized from shapes, so every
// call is graph-capturable.
//
//   append       n <= QP_SEQ_MAX tokens per call (decode): one kernel, one block
//                per (b, hk) that places its tokens in order (the CPU's
//                sequential rule, verbatim) and quantizes each one (a warp per
//                group: K and V), then takes its page bounds.
//                Larger n (prefill): three kernels.
//                  plan     one block per (b, hk): per-class ranks of its tokens
//                           (two passes of match.any over warp segments), the new
//                           pages each class needs, one compare-and-swap on top
//                           for all of them (per class contiguous), headers,
//                           page list, open pages; each token gets (class, new
//                           page k or the open page, slot)
//                  quantize two tokens per block (a warp per group), in parallel
//                  bounds   a block per touched page: min / max over its new
//                           slots in slot order (nb = 1 only)
//   dequantize   a block per listed page
//   attention    split-K over page ranges of each (b, hk) on tensor cores, then
//                a merge kernel (and a p_max kernel); see the attention section.
//   requant_take, compact: qaqp_maint_cuda.cu. Device code both files use (dtype
//                bits, page_at, deq_elem, bound_slots): qaqp_cuda_common.cuh.
//
// Quantization of a group (one warp): outliers by 2 n_side rounds of a warp
// minimum over the 48-bit rank keys of qaq.h (rank << 16 | e; a round takes
// the smallest key above the last one taken, so no element is picked twice),
// then the inlier range (ks_qaq_ord keys, warp min / max), fp16 (scale, zero)
// and the codes, one 32-bit word per lane at a time; every step uses the IEEE
// intrinsics of qaq_cuda.cu's quantize (__fdiv_rn, __fmul_rn, __fadd_rn, never
// contracted), so codes, scales and outliers equal the CPU's bit for bit.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>
#include <stdint.h>
#include <stdlib.h>

#include "ks_cuda.cuh"
#include "qaqp.h"
#include "qaqp_cuda_common.cuh"

namespace {

using namespace ks_qaqp_cu;

using ks_cuda::finish;
using ks_cuda::from_f;
using ks_cuda::merge_w;
using ks_cuda::to_f;

constexpr int QP_SEQ_MAX = 4;     // append: tokens per call handled by the one-kernel path
constexpr int QP_PLAN_NT = 512;   // append plan: threads per (b, hk) block
constexpr int QP_PLAN_NW = QP_PLAN_NT / 32;

// Takes sz16 units of 16 bytes at *top (one compare-and-swap loop): the first
// address, or -1 when the arena (lim16 units, at most 2^31) cannot hold them
// or top is corrupt.
__device__ __forceinline__ int64_t arena_take(int64_t *top, int64_t sz16, int64_t lim16) {
  unsigned long long *t = reinterpret_cast<unsigned long long *>(top);
  unsigned long long old = atomicAdd(t, 0ull);
  for (;;) {
    const int64_t o = (int64_t)old;
    if (o < 0 || o > lim16 || sz16 > lim16 - o) return -1;
    const unsigned long long prev = atomicCAS(t, old, (unsigned long long)(o + sz16));
    if (prev == old) return o;
    old = prev;
  }
}

// ------------------------------------------------------ group quantization ----

constexpr uint64_t QP_KNONE = 0xffffffffffffull;  // above every rank key (ranks <= 0xff800000)

__device__ __forceinline__ uint64_t rank_key(uint32_t u, int e, int high) {
  return ((uint64_t)ks_qaq_rank_key(u, high) << 16) | (uint64_t)(uint32_t)e;
}
// warp minimum of 48-bit keys: the smallest rank, then the smallest element among it
__device__ __forceinline__ uint64_t warp_min_key(uint64_t k) {
  const uint32_t r = __reduce_min_sync(QP_FULL, (uint32_t)(k >> 16));
  const uint32_t e = __reduce_min_sync(QP_FULL, (uint32_t)(k >> 16) == r ? (uint32_t)(k & 0xffffu) : 0xffffffffu);
  return ((uint64_t)r << 16) | (uint64_t)e;
}

__device__ __forceinline__ unsigned code_of(float x, float sf, float zf, int w) {
  const float maxc = (float)((1 << w) - 1);
  float r = sf > 0.f ? floorf(__fadd_rn(__fdiv_rn(__fsub_rn(x, zf), sf), 0.5f)) : 0.f;
  r = r >= 0.f ? r : 0.f;  // also NaN -> 0
  r = r > maxc ? maxc : r;
  return (unsigned)r;
}

// (scale, zero) fp16 bits of a group from its inlier range keys (qaq.h; the
// same steps as qaq_cuda.cu's range_sz)
__device__ __forceinline__ void range_sz(uint32_t kmn, uint32_t kmx, uint32_t nan, int w, uint16_t &s16,
                                         uint16_t &z16) {
  float mn, mx;
  if (nan) {
    mn = mx = CUDART_NAN_F;
  } else if (kmn > kmx) {  // no inlier
    mn = mx = 0.f;
  } else {
    mn = __uint_as_float(ks_qaq_unord(kmn));
    mx = __uint_as_float(ks_qaq_unord(kmx));
    if (isfinite(mn) && isfinite(mx) &&
        (__fsub_rn(mx, mn) > KS_QAQ_SZ_MAX || mx > KS_QAQ_SZ_MAX || mn < -KS_QAQ_SZ_MAX))
      mn = mx = CUDART_NAN_F;  // out of fp16's reach: NaN scale / zero alone (qaq.h)
  }
  const float s = w > 0 ? __fdiv_rn(__fsub_rn(mx, mn), (float)((1 << w) - 1)) : __fsub_rn(mx, mn);
  s16 = s != s ? (uint16_t)KS_QAQ_H_NAN : f2h(s);
  z16 = mn != mn ? (uint16_t)KS_QAQ_H_NAN : f2h(mn);
}

// One warp quantizes a group of E elements (raw(e): the element's raw bits) at
// width w with n_side outliers per side into: codes (nwords 32-bit words, the
// code stride sk / 4, zero padded), *sz (scale | zero << 16), oi / ov
// (2 n_side outlier slots). Whole warp, all lanes.
template <typename T, typename RawF>
__device__ __forceinline__ void warp_quant(RawF raw, int E, int w, int n_side, uint32_t *codes, int nwords,
                                           uint32_t *sz, int16_t *oi, typename QR<T>::R *ov) {
  using R = typename QR<T>::R;
  const int lane = threadIdx.x & 31;
  auto fb = [&](int e) { return __float_as_uint(QR<T>::f(raw(e))); };
  int64_t tlo = -1, thi = -1;  // largest low / high outlier key taken (-1: none)
  for (int pass = 0; pass < 2 && n_side > 0; ++pass) {
    int64_t thr = -1;
    for (int j = 0; j < n_side; ++j) {
      uint64_t best = QP_KNONE;
      for (int e = lane; e < E; e += 32) {
        const uint32_t u = fb(e);
        if (pass == 1 && tlo >= 0 && (int64_t)rank_key(u, e, 0) <= tlo) continue;  // a low outlier
        const uint64_t k = rank_key(u, e, pass);
        if ((int64_t)k > thr && k < best) best = k;
      }
      const uint64_t sel = warp_min_key(best);
      int idx = -1;
      if (sel != QP_KNONE) {
        idx = (int)(sel & 0xffffu);
        thr = (int64_t)sel;
      }
      if (lane == 0) {
        oi[pass * n_side + j] = (int16_t)idx;
        ov[pass * n_side + j] = idx >= 0 ? raw(idx) : (R)0;
      }
    }
    if (pass == 0) tlo = thr;
    else thi = thr;
  }
  auto is_out = [&](int e, uint32_t u) {
    if (tlo >= 0 && (int64_t)rank_key(u, e, 0) <= tlo) return true;
    return thi >= 0 && (int64_t)rank_key(u, e, 1) <= thi;
  };
  uint32_t kmn = ~0u, kmx = 0u, nan = 0u;
  for (int e = lane; e < E; e += 32) {
    const uint32_t u = fb(e);
    if (is_out(e, u)) continue;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      nan = 1u;
    } else {
      const uint32_t o = ks_qaq_ord(u);
      kmn = min(kmn, o);
      kmx = max(kmx, o);
    }
  }
  kmn = __reduce_min_sync(QP_FULL, kmn);
  kmx = __reduce_max_sync(QP_FULL, kmx);
  nan = __reduce_or_sync(QP_FULL, nan);
  uint16_t s16, z16;
  range_sz(kmn, kmx, nan, w, s16, z16);
  if (lane == 0) *sz = (uint32_t)s16 | ((uint32_t)z16 << 16);
  if (w > 0) {
    const float sf = h2f(s16), zf = h2f(z16);
    const int n = 32 / w;
    for (int j = lane; j < nwords; j += 32) {
      const bool whole = (j + 1) * n <= E;
      uint32_t word = 0;
      for (int i = 0; i < n; ++i) {
        const int e = j * n + i;
        if (e >= E) break;
        const uint32_t u = fb(e);
        const unsigned c = is_out(e, u) ? 0u : code_of(__uint_as_float(u), sf, zf, w);
        const int s = whole ? (i >> 1) + (i & 1) * (n >> 1) : i;
        word |= c << (s * w);
      }
      codes[j] = word;
    }
  }
}


// ------------------------------------------------------------------ append ----

struct AppArgs {
  const void *k, *v;
  int64_t B, Hkv, n;
  ks_qaqp_geom g;
  const uint8_t *wk, *wv;
  const int32_t *pos0, *pos, *count;  // pos: per-token positions [B, Hkv, n] or NULL (pos0[b] + i)
  uint8_t *arena;
  int64_t A;
  int64_t *top;
  int32_t *open, *pages;
  int64_t maxp;
  int32_t *n_pages, *flags;
  uint8_t *ws;     // plan workspace (three-kernel path)
  int64_t ws_bh;   // its bytes per (b, hk)
  int64_t maxe;    // new pages per (b, hk) at most (tab / event entries)
};

__device__ __forceinline__ int64_t clamp_cnt(const int32_t *count, int64_t b, int64_t n) {
  const int64_t c = count[b];
  return c < 0 ? 0 : (c > n ? n : c);
}

// Header of a new page of widths (wk, wv) with n_used slots handed out, then
// positions -1 and (nb) bounds +inf / -inf: threads t of nt.
template <typename T>
__device__ __forceinline__ void init_page(uint8_t *pg, const ks_qaqp_geom &g, const ks_qaqp_layout &L, int wk,
                                          int wv, int n_used, int t, int nt) {
  using R = typename QR<T>::R;
  if (t == 0)
    *reinterpret_cast<uint4 *>(pg) =
        make_uint4(0u, 0u, (uint32_t)wk | ((uint32_t)wv << 8) | ((uint32_t)n_used << 16), 0u);
  int32_t *pos = reinterpret_cast<int32_t *>(pg + L.pos);
  for (int i = t; i < QP; i += nt) pos[i] = -1;
  if (g.nb) {
    R *mn = reinterpret_cast<R *>(pg + L.kmin), *mx = reinterpret_cast<R *>(pg + L.kmax);
    for (int64_t i = t; i < g.D; i += nt) {
      mn[i] = inf_bits<T>(false);
      mx[i] = inf_bits<T>(true);
    }
  }
}

// Quantizes token i of (b, hk) into slot s of the page at pg (class layout L):
// warp kw the keys, warp kw + 1 the values; lane 0 of warp kw the position and
// the mask bit. Called by both warps (each returns after its group).
template <typename T>
__device__ __forceinline__ void quant_token(const AppArgs &a, int64_t bh, int64_t i, uint8_t *pg,
                                            const ks_qaqp_layout &L, int wk, int wv, int s, bool keys,
                                            const typename QR<T>::R *x) {
  using R = typename QR<T>::R;
  const int D = (int)a.g.D;
  const int w = keys ? wk : wv;
  const int nout = (int)(keys ? a.g.n_out_k : a.g.n_out_v);
  const int64_t stride = keys ? L.sk : L.sv;
  uint32_t *codes = reinterpret_cast<uint32_t *>(pg + (keys ? L.kc : L.vc) + s * stride);
  uint32_t *sz = reinterpret_cast<uint32_t *>(pg + (keys ? L.ksz : L.vsz)) + s;
  int16_t *oi = reinterpret_cast<int16_t *>(pg + (keys ? L.koi : L.voi)) + (int64_t)s * nout;
  R *ov = reinterpret_cast<R *>(pg + (keys ? L.kov : L.vov)) + (int64_t)s * nout;
  warp_quant<T>([&](int e) { return x[e]; }, D, w, nout / 2, codes, (int)(stride / 4), sz, oi, ov);
  if (keys && (threadIdx.x & 31) == 0) {
    reinterpret_cast<int32_t *>(pg + L.pos)[s] =
        a.pos ? a.pos[bh * a.n + i] : (int32_t)((int64_t)a.pos0[bh / a.Hkv] + i);
    atomicOr(reinterpret_cast<unsigned long long *>(pg), 1ull << s);
  }
}


// validated open page of class c of (b, hk): its address and n_used (64 when
// it is not a page of that class: tokens then take a new page)
__device__ __forceinline__ void open_state(const AppArgs &a, int64_t bh, int c, int &addr, int &used) {
  addr = -1;
  used = QP;
  const int64_t o = a.open[bh * QP_NC + c];
  int k, v;
  ks_qaqp_layout L;
  if (page_at(a.arena, a.A, a.g, o, k, v, L) && ks_qaqp_class(k, v) == c) {
    const int u = a.arena[o * 16 + 10];
    addr = (int)o;
    used = u > QP ? QP : u;
  }
}

// One block (2 warps) per (b, hk): tokens in order, as qaqp.h says. Each
// token's K (warp 0) and V (warp 1) rows and widths are fetched while the
// previous step (the open pages' validation, for the first) is in flight.
template <typename T>
__global__ void __launch_bounds__(64) k_append_seq(AppArgs a) {
  using R = typename QR<T>::R;
  const int64_t bh = blockIdx.x, b = bh / a.Hkv;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  extern __shared__ __align__(16) uint8_t s_dyn[];
  R *xrow = reinterpret_cast<R *>(s_dyn) + warp * a.g.D;  // this warp's row (K: warp 0, V: warp 1)
  __shared__ int s_open[QP_NC], s_used[QP_NC], s_chg[QP_NC];
  __shared__ int s_np, s_flags, s_addr, s_slot, s_new, s_wk, s_wv;
  if (tid < QP_NC) {
    open_state(a, bh, tid, s_open[tid], s_used[tid]);
    s_chg[tid] = 0;
  }
  __shared__ int s_np0;
  if (tid == 0) {
    const int64_t np = a.n_pages[bh];
    // a negative count or one past maxp: the list takes no page (as the CPU)
    s_np = (int)(np < 0 || np > a.maxp ? a.maxp : np);
    s_np0 = s_np;
    s_flags = 0;
  }
  const int64_t cnt = clamp_cnt(a.count, b, a.n), lim16 = (a.A / 16 < 0x7fffffffLL ? a.A / 16 : 0x7fffffffLL);
  for (int64_t i = 0; i < cnt; ++i) {
    {
      const R *x = reinterpret_cast<const R *>(warp ? a.v : a.k) + (bh * a.n + i) * a.g.D;
      for (int64_t e = lane; e < a.g.D; e += 32) xrow[e] = x[e];
    }
    const int wk_i = tid == 0 ? a.wk[bh * a.n + i] : 0, wv_i = tid == 0 ? a.wv[bh * a.n + i] : 0;
    __syncthreads();  // the rows; (first token) the open pages' state; (later) the previous token done
    if (tid == 0) {
      const int wk = wk_i, wv = wv_i, c = ks_qaqp_class(wk, wv);
      int addr = -1, nw = 0;
      if (c >= 0) {
        if (s_open[c] < 0 || s_used[c] >= QP) {
          const ks_qaqp_layout L = ks_qaqp_layout_of(a.g, wk, wv);
          if (s_np >= a.maxp) {
            s_flags |= KS_QAQP_FLAG_PAGES;
          } else {
            const int64_t na = arena_take(a.top, L.bytes / 16, lim16);
            if (na < 0) {
              s_flags |= KS_QAQP_FLAG_ARENA;
            } else {
              a.pages[bh * a.maxp + s_np++] = (int32_t)na;
              s_open[c] = (int)na;
              s_used[c] = 0;
              s_chg[c] = 1;
              nw = 1;
            }
          }
        }
        if (s_open[c] >= 0 && s_used[c] < QP) addr = s_open[c];
      }
      s_addr = addr;
      s_new = nw;
      s_wk = wk;
      s_wv = wv;
      if (addr >= 0) s_slot = s_used[c]++;
      // n_used of a new page goes in with its header (init_page)
      if (addr >= 0 && !nw) a.arena[(int64_t)addr * 16 + 10] = (uint8_t)s_used[c];
    }
    __syncthreads();
    const int addr = s_addr;
    if (addr >= 0) {
      const int wk = s_wk, wv = s_wv, s = s_slot;
      const ks_qaqp_layout L = ks_qaqp_layout_of(a.g, wk, wv);
      uint8_t *pg = a.arena + (int64_t)addr * 16;
      if (s_new) {
        init_page<T>(pg, a.g, L, wk, wv, 1, tid, 64);
        __syncthreads();  // the header and positions before the token's own writes
      }
      quant_token<T>(a, bh, i, pg, L, wk, wv, s, warp == 0, xrow);
      if (a.g.nb) {
        __threadfence_block();
        __syncthreads();  // the token's codes before its bounds
        bound_slots<T>(pg, a.g, L, wk, s, s + 1, tid, 64);
      }
    }
    __syncthreads();  // before thread 0 places the next token
  }
  if (tid < QP_NC && s_chg[tid]) a.open[bh * QP_NC + tid] = s_open[tid];
  if (tid == 0) {
    if (s_np != s_np0) a.n_pages[bh] = s_np;
    if (s_flags) atomicOr(a.flags, s_flags);
  }
}

// ---- the three-kernel path (prefill)
//
// Workspace per (b, hk) (ws_bh bytes): tok int64 [n] (per token: slot | class << 6
// | (k + 1) << 11, k = -1 for the open page; -1: no slot), then int32 arrays:
// cls_open, cls_u, cls_n, cls_off [25 each], misc [8] (0: tab entries), tab
// [maxe] (address of new page k of class c at cls_off[c] + k, -1 if not taken),
// ev [maxe] (event e: class | k << 5; events are the tokens that open a new
// page, in token order: page list entry n_pages0 + e when every page is taken).
struct PlanWs {
  int64_t *tok;
  int32_t *cls_open, *cls_u, *cls_n, *cls_off, *misc, *tab, *ev;
};
__device__ __forceinline__ PlanWs plan_ws(const AppArgs &a, int64_t bh) {
  PlanWs w;
  uint8_t *base = a.ws + bh * a.ws_bh;
  w.tok = reinterpret_cast<int64_t *>(base);
  int32_t *p = reinterpret_cast<int32_t *>(base + 8 * a.n);
  w.cls_open = p;
  w.cls_u = p + QP_NC;
  w.cls_n = p + 2 * QP_NC;
  w.cls_off = p + 3 * QP_NC;
  w.misc = p + 4 * QP_NC;
  w.tab = p + 4 * QP_NC + 8;
  w.ev = w.tab + a.maxe;
  return w;
}
// new pages of a class whose open page had u slots handed out, for n more tokens
__device__ __forceinline__ int pages_for(int u, int n) {
  const int x = u + n - 1;
  return x >= 0 ? x >> 6 : 0;
}

template <typename T>
__global__ void __launch_bounds__(QP_PLAN_NT) k_append_plan(AppArgs a) {
  const int64_t bh = blockIdx.x, b = bh / a.Hkv;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const PlanWs w = plan_ws(a, bh);
  __shared__ int s_cnt[QP_PLAN_NW][QP_NC], s_base[QP_PLAN_NW][QP_NC];
  __shared__ int s_u[QP_NC], s_open[QP_NC], s_n[QP_NC], s_off[QP_NC], s_K[QP_NC], s_sz16[QP_NC];
  __shared__ int s_lpos[QP_NC], s_lmin[QP_NC], s_lmax[QP_NC];  // region offsets per class
  __shared__ int s_evb[QP_PLAN_NW];
  __shared__ int s_nev, s_ntab, s_np0, s_np, s_ok, s_flags;
  __shared__ int64_t s_base_addr;
  const int64_t cnt = clamp_cnt(a.count, b, a.n);
  for (int i = tid; i < QP_PLAN_NW * QP_NC; i += QP_PLAN_NT) (&s_cnt[0][0])[i] = 0;
  if (tid < QP_NC) {
    open_state(a, bh, tid, s_open[tid], s_u[tid]);
    s_K[tid] = 0;
    const ks_qaqp_layout L = ks_qaqp_layout_of(a.g, qp_width(tid / 5), qp_width(tid % 5));
    s_sz16[tid] = (int)(L.bytes / 16);
    s_lpos[tid] = (int)L.pos;
    s_lmin[tid] = (int)L.kmin;
    s_lmax[tid] = (int)L.kmax;
  }
  if (tid == 0) {
    const int64_t np = a.n_pages[bh];
    s_np0 = (int)(np < 0 || np > a.maxp ? a.maxp : np);  // (as k_append_seq)
    s_flags = 0;
  }
  __syncthreads();
  // warp segments: seg tokens each (a multiple of 32), in token order
  const int64_t seg = ((cnt + QP_PLAN_NW * 32 - 1) / (QP_PLAN_NW * 32)) * 32;
  const int64_t i0 = warp * seg, i1 = i0 + seg < cnt ? i0 + seg : cnt;
  auto cls = [&](int64_t i) {
    return i < i1 ? ks_qaqp_class(a.wk[bh * a.n + i], a.wv[bh * a.n + i]) : -1;
  };
  for (int64_t j = i0; j < i1; j += 32) {  // pass 1: tokens per class and warp
    const int c = cls(j + lane);
    const unsigned m = __match_any_sync(QP_FULL, c);
    if (c >= 0 && lane == __ffs(m) - 1) s_cnt[warp][c] += __popc(m);
    __syncwarp();  // (the next leader of a class may be another lane)
  }
  __syncthreads();
  if (tid < QP_NC) {
    int s = 0;
    for (int v = 0; v < QP_PLAN_NW; ++v) {
      s_base[v][tid] = s;
      s += s_cnt[v][tid];
    }
    s_n[tid] = s;
  }
  __syncthreads();
  if (tid < QP_PLAN_NW) {  // events before warp tid's segment
    int e = 0;
    for (int c = 0; c < QP_NC; ++c) e += pages_for(s_u[c], s_base[tid][c]);
    s_evb[tid] = e;
  }
  if (tid == 0) {
    int o = 0;
    for (int c = 0; c < QP_NC; ++c) {
      s_off[c] = o;
      o += pages_for(s_u[c], s_n[c]);
    }
    s_ntab = o;
    s_nev = o;
  }
  __syncthreads();
  {  // pass 2: each token's slot; the events (s_cnt now holds the warp's running counts)
    for (int i = lane; i < QP_NC; i += 32) s_cnt[warp][i] = 0;
    __syncwarp();
    int evr = 0;
    for (int64_t j = i0; j < i1; j += 32) {
      const int64_t i = j + lane;
      const int c = cls(i);
      const unsigned m = __match_any_sync(QP_FULL, c);
      bool ev = false;
      int k = -1, slot = 0;
      if (c >= 0) {
        const int r = s_base[warp][c] + s_cnt[warp][c] + __popc(m & ((1u << lane) - 1u));
        const int x = s_u[c] + r;
        if (x < QP) {
          slot = x;
        } else {
          k = (x - QP) >> 6;
          slot = (x - QP) & 63;
          ev = slot == 0;
        }
      }
      const unsigned eb = __ballot_sync(QP_FULL, ev);
      if (ev) w.ev[s_evb[warp] + evr + __popc(eb & ((1u << lane) - 1u))] = c | (k << 5);
      if (i < i1) w.tok[i] = c < 0 ? -1 : (int64_t)slot | ((int64_t)c << 6) | ((int64_t)(k + 1) << 11);
      __syncwarp();
      if (c >= 0 && lane == __ffs(m) - 1) s_cnt[warp][c] += __popc(m);
      evr += __popc(eb);
      __syncwarp();
    }
  }
  __syncthreads();
  // allocation: events e < ecap fit the page list; per class a prefix of k
  const int nev = s_nev, np0 = s_np0;
  const int64_t ecap = a.maxp - np0;
  for (int e = tid; e < nev; e += QP_PLAN_NT)
    if (e < ecap) {
      const int ck = w.ev[e];
      atomicMax(&s_K[ck & 31], (ck >> 5) + 1);
    }
  __syncthreads();
  const int64_t lim16 = (a.A / 16 < 0x7fffffffLL ? a.A / 16 : 0x7fffffffLL);
  if (tid == 0) {
    int64_t tot = 0;
    for (int c = 0; c < QP_NC; ++c) tot += (int64_t)s_K[c] * s_sz16[c];
    const int64_t base = tot > 0 ? arena_take(a.top, tot, lim16) : 0;
    s_ok = base >= 0;
    s_base_addr = base;
    if (base >= 0 && (int64_t)nev > ecap) s_flags |= KS_QAQP_FLAG_PAGES;
    if (base >= 0) s_np = np0 + (int)((int64_t)nev < ecap ? nev : ecap);
  }
  __syncthreads();
  if (s_ok) {
    // class c's pages one after the other from the base, classes in order
    __shared__ int64_t s_cbase[QP_NC];
    if (tid == 0) {
      int64_t o = s_base_addr;
      for (int c = 0; c < QP_NC; ++c) {
        s_cbase[c] = o;
        o += (int64_t)s_K[c] * s_sz16[c];
      }
    }
    __syncthreads();
    for (int e = tid; e < nev; e += QP_PLAN_NT) {
      const int ck = w.ev[e], c = ck & 31, k = ck >> 5;
      int32_t addr = -1;
      if (e < ecap) {
        addr = (int32_t)(s_cbase[c] + (int64_t)k * s_sz16[c]);
        a.pages[bh * a.maxp + np0 + e] = addr;
      }
      w.tab[s_off[c] + k] = addr;
    }
  } else if (tid == 0) {
    // the arena cannot hold them all: page by page in event order, as the CPU
    // would (a class whose page fails takes no more pages)
    int np = np0, failed = 0;
    for (int e = 0; e < nev; ++e) {
      const int ck = w.ev[e], c = ck & 31, k = ck >> 5;
      int32_t addr = -1;
      if (!((failed >> c) & 1)) {
        if (np >= a.maxp) {
          s_flags |= KS_QAQP_FLAG_PAGES;
          failed |= 1 << c;
        } else {
          const int64_t na = arena_take(a.top, s_sz16[c], lim16);
          if (na < 0) {
            s_flags |= KS_QAQP_FLAG_ARENA;
            failed |= 1 << c;
          } else {
            addr = (int32_t)na;
            a.pages[bh * a.maxp + np++] = addr;
          }
        }
      }
      w.tab[s_off[c] + k] = addr;
    }
    s_np = np;
  }
  __syncthreads();
  // headers of the new pages (n_used final), positions, bounds
  {
    using R = typename QR<T>::R;
    const int64_t per = QP + (a.g.nb ? 2 * a.g.D : 0);
    for (int64_t it = tid; it < (int64_t)nev * per; it += QP_PLAN_NT) {
      const int e = (int)(it / per), r = (int)(it % per);
      const int ck = w.ev[e], c = ck & 31, k = ck >> 5;
      const int32_t addr = w.tab[s_off[c] + k];
      if (addr < 0) continue;
      uint8_t *pg = a.arena + (int64_t)addr * 16;
      if (r == 0) {
        const int wk = qp_width(c / 5), wv = qp_width(c % 5);
        const int rem = s_u[c] + s_n[c] - QP - QP * k;
        const int used = rem < QP ? rem : QP;
        *reinterpret_cast<uint4 *>(pg) =
            make_uint4(0u, 0u, (uint32_t)wk | ((uint32_t)wv << 8) | ((uint32_t)used << 16), 0u);
      }
      if (r < QP) {
        reinterpret_cast<int32_t *>(pg + s_lpos[c])[r] = -1;
      } else {
        const int64_t q = r - QP;
        const bool hi = q >= a.g.D;
        const int64_t d = hi ? q - a.g.D : q;
        reinterpret_cast<R *>(pg + (hi ? s_lmax[c] : s_lmin[c]))[d] = inf_bits<T>(hi);
      }
    }
  }
  if (tid < QP_NC) {
    const int c = tid;
    if (s_open[c] >= 0 && s_n[c] > 0 && s_u[c] < QP) {
      const int nu = s_u[c] + s_n[c];
      a.arena[(int64_t)s_open[c] * 16 + 10] = (uint8_t)(nu < QP ? nu : QP);
    }
    const int need = pages_for(s_u[c], s_n[c]);
    int last = -1;
    for (int k = 0; k < need; ++k) {
      const int32_t ad = w.tab[s_off[c] + k];
      if (ad >= 0) last = ad;
    }
    if (last >= 0) a.open[bh * QP_NC + c] = last;
    w.cls_open[c] = s_open[c];
    w.cls_u[c] = s_u[c];
    w.cls_n[c] = s_n[c];
    w.cls_off[c] = s_off[c];
  }
  if (tid == 0) {
    w.misc[0] = s_ntab;
    if (s_np != np0) a.n_pages[bh] = s_np;
    if (s_flags) atomicOr(a.flags, s_flags);
  }
}

// Two tokens per block (a warp per group: K of token 0, V of token 0, K of
// token 1, V of token 1), blocks striding over (b, hk, i).
template <typename T>
__global__ void __launch_bounds__(128) k_append_quant(AppArgs a) {
  const int warp = threadIdx.x >> 5;
  const int64_t items = a.B * a.Hkv * a.n;
  for (int64_t base = (int64_t)blockIdx.x * 2; base < items; base += (int64_t)gridDim.x * 2) {
    const int64_t it = base + (warp >> 1);
    if (it >= items) continue;  // (per warp: no block barrier below)
    const int64_t bh = it / a.n, i = it % a.n, b = bh / a.Hkv;
    if (i >= clamp_cnt(a.count, b, a.n)) continue;
    const PlanWs w = plan_ws(a, bh);
    const int64_t enc = w.tok[i];
    if (enc < 0) continue;
    const int s = (int)(enc & 63), c = (int)((enc >> 6) & 31), k = (int)(enc >> 11) - 1;
    const int addr = k < 0 ? w.cls_open[c] : w.tab[w.cls_off[c] + k];
    if (addr < 0) continue;  // dropped (arena or page list full)
    const int wk = qp_width(c / 5), wv = qp_width(c % 5);
    const ks_qaqp_layout L = ks_qaqp_layout_of(a.g, wk, wv);
    const bool keys = (warp & 1) == 0;
    const typename QR<T>::R *x = reinterpret_cast<const typename QR<T>::R *>(keys ? a.k : a.v) + it * a.g.D;
    quant_token<T>(a, bh, i, a.arena + (int64_t)addr * 16, L, wk, wv, s, keys, x);
  }
}

// Page bounds of the pages this call touched: grid (B * Hkv, Y); entry j < 25:
// the open page of class j (its new slots), else new page j - 25 of the tab.
template <typename T>
__global__ void __launch_bounds__(128) k_append_bounds(AppArgs a) {
  const int64_t bh = blockIdx.x;
  const PlanWs w = plan_ws(a, bh);
  const int ntab = w.misc[0];
  for (int j = blockIdx.y; j < QP_NC + ntab; j += gridDim.y) {
    int addr, s0;
    if (j < QP_NC) {
      addr = w.cls_open[j];
      if (addr < 0 || w.cls_n[j] == 0 || w.cls_u[j] >= QP) continue;
      s0 = w.cls_u[j];
    } else {
      addr = w.tab[j - QP_NC];
      if (addr < 0) continue;
      s0 = 0;
    }
    uint8_t *pg = a.arena + (int64_t)addr * 16;
    const int wk = pg[8], wv = pg[9], s1 = pg[10];
    const ks_qaqp_layout L = ks_qaqp_layout_of(a.g, wk, wv);
    bound_slots<T>(pg, a.g, L, wk, s0, s1 < QP ? s1 : QP, threadIdx.x, blockDim.x);
  }
}

// -------------------------------------------------------------- dequantize ----

// a block per listed page (b, hk, j): rows j * 64 + slot
template <typename T>
__global__ void __launch_bounds__(256) k_dequant(const uint8_t *arena, int64_t A, ks_qaqp_geom g,
                                                 const int32_t *plist, T *kout, T *vout, int32_t *pos_out) {
  using R = typename QR<T>::R;
  const int64_t pj = blockIdx.x;  // (b * Hkv + hk) * L + j
  __shared__ int s_ok, s_wk, s_wv;
  __shared__ unsigned long long s_mask;
  __shared__ ks_qaqp_layout s_L;
  if (threadIdx.x == 0) {
    int wk = 0, wv = 0;
    ks_qaqp_layout L;
    const int64_t a = plist[pj];
    const bool ok = page_at(arena, A, g, a, wk, wv, L);
    s_ok = ok;
    s_wk = wk;
    s_wv = wv;
    if (ok) {
      s_L = L;
      s_mask = *reinterpret_cast<const unsigned long long *>(arena + a * 16);
    } else {
      s_mask = 0ull;
    }
  }
  __syncthreads();
  const int D = (int)g.D;
  const uint64_t mask = s_mask;
  const uint8_t *pg = s_ok ? arena + (int64_t)plist[pj] * 16 : arena;
  R *ko = reinterpret_cast<R *>(kout) + pj * QP * g.D;
  R *vo = reinterpret_cast<R *>(vout) + pj * QP * g.D;
  for (int64_t idx = threadIdx.x; idx < (int64_t)QP * D; idx += blockDim.x) {
    const int s = (int)(idx / D), e = (int)(idx % D);
    float xk = 0.f, xv = 0.f;
    if ((mask >> s) & 1ull) {
      const ks_qaqp_layout &L = s_L;
      xk = deq_elem<T>(pg, L.ksz, L.kc, L.koi, L.kov, L.sk, s_wk, (int)g.n_out_k, D, s, e);
      xv = deq_elem<T>(pg, L.vsz, L.vc, L.voi, L.vov, L.sv, s_wv, (int)g.n_out_v, D, s, e);
    }
    ko[idx] = store_bits<T>(xk);
    vo[idx] = store_bits<T>(xv);
  }
  for (int s = threadIdx.x; s < QP; s += blockDim.x)
    pos_out[pj * QP + s] = ((mask >> s) & 1ull) ? reinterpret_cast<const int32_t *>(pg + s_L.pos)[s] : -1;
}

// --------------------------------------------------------------- attention ----
//
// Grid (nsplit, Hkv, B): a block of 4 warps takes up to QA_PPS consecutive
// listed pages of one (b, hk) (a split) for all G <= 8 query heads, each warp
// one 16-slot tile of every page (warp w: slots 16 w .. 16 w + 15). Two phases
// per split, so that the softmax maximum is known before any value is read:
//
//   K phase   for each page: S = K Q^T on tensor cores (mma m16n8k16, A = the
//             K codes as fp16 integers, B = q in fp16, scaled per head by a
//             power of two so that max |q| lies in [2^14, 2^15); float32 q as
//             hi + lo pieces), in code space:
//               s = scale log2(e) (ks q.c + kz sum(q) + sum_outliers q_e (x_e - kz))
//             (kz: the zero, or zero + scale / 2 at width 0; an outlier's code
//             is 0). Dead slots get -inf. The logits stay in shared memory;
//             the split's maximum M per head and largest value scale are kept.
//   V phase   for each page: p = exp2(s - M) (0 for dead slots, never a
//             product with their bytes), O^T += V^T P' on tensor cores (A = the
//             V codes as fp16 integers, B = P' = p * value scale * sigma in fp16
//             pieces, sigma a power of two per split that puts the largest
//             value scale in [2^13, 2^14)), sum p * zero per head, and V
//             outliers p (x_e - zero) added to the warp's [G][D] sums (a lane
//             per (slot, outlier); lanes that share an element add in lane
//             order, one round each: deterministic).
//
// Per split one record per head (acc[D], M, L) goes to the workspace; a merge
// kernel (launched with programmatic dependent launch) combines the splits in
// split order (ks_cuda.cuh's NaN policy: merge_w, finish) and writes out; with
// p_max the K phase also stores the logits of live slots and a third kernel
// normalizes them with the final maximum and sum.
//
// Codes to fp16 without byte shuffles (qaq.h's interleaved order): in a 32-bit
// word the pair (element 2m, 2m + 1) sits at bits (b, b + 16), b = w m; or-ing
// the masked word into 0x6400 (fp16 1024) gives 1024 + c 2^b while b + w <= 10,
// and one HFMA2 (times 2^-b, less 1024 2^-b) gives c exactly; pairs further up
// use the word shifted by 8 first. Lane (gid, tig) holds for K the codes of
// slots gid, gid + 8 over elements [tig DP/4, (tig + 1) DP/4) (pair 2s, 2s + 1:
// k-step s), for V the codes of slots 2 tig, 2 tig + 1, 2 tig + 8, 2 tig + 9
// over elements [gid DP/8, (gid + 1) DP/8): a byte permute of the words of two
// slots pairs them per element (output row gid of m-tile s is element
// gid DP/8 + 2 s, row gid + 8 the next one), and movmatrix turns P from the
// first product's accumulator layout into the second product's B fragment.
// DP is the head dim of the tiles: D, or 128 for D = 80 and 96 (q is zero past
// D; padded V rows are never stored; reads past a slot's codes stay inside the
// staged buffer and only ever meet zero q or discarded rows). D = 80 at width
// 1 ends in a partial word in plain order, re-ordered in registers.
//
// Data movement: the pages' K halves (scale / zero of K and V, K codes, K
// outliers) and V halves (scale / zero of V, V codes, V outliers) are staged
// in a ring of QA_NST buffers with cp.async (16-byte copies, the whole block),
// two jobs ahead of use; one barrier per job.

constexpr int QA_NT = 128;
constexpr int QA_NST = 3;  // staging buffers
constexpr int QA_PPS = 8;  // pages per split at most
constexpr int QA_GMAX = 8;

template <int D> struct QaDim {
  static_assert(D == 64 || D == 80 || D == 96 || D == 128 || D == 256, "qaqp attention: head dim");
  static constexpr int DP = D == 80 || D == 96 ? 128 : D;
  static constexpr int NS = DP / 16;
  static constexpr int MINB = DP <= 128 ? 4 : 2;  // blocks per SM the registers are budgeted for
};
__host__ __device__ constexpr bool qa_dim_ok(int64_t D) {
  return D == 64 || D == 80 || D == 96 || D == 128 || D == 256;
}
__host__ __device__ constexpr int qa_dp(int64_t D) { return D == 80 || D == 96 ? 128 : (int)D; }

// fp16 pieces of q (NQ) and of P' (NP) per cache dtype
template <typename T> struct QaPrec { static constexpr int NQ = 2, NP = 2; };
template <> struct QaPrec<__half> { static constexpr int NQ = 1, NP = 2; };
template <> struct QaPrec<__nv_bfloat16> { static constexpr int NQ = 1, NP = 1; };

struct AttP {
  const void *q;
  const uint8_t *arena;
  int64_t A;
  ks_qaqp_geom g;
  const int32_t *plist;
  int64_t L;
  float *part, *slog;
  int H, Hkv, G, G2, nk, nv, pps, nsplit, RS, esz;
  int off_lg, off_vo, off_qT, off_qf;  // dynamic shared memory regions (bytes)
  float scale_log2;
};

// one listed page as the attention reads it
struct QaPage {
  int64_t base;  // byte offset in the arena
  unsigned long long mask;
  int kc, vc, koi, voi, kmin, sk, sv, wk, wv, orig;
};

__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void mma_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t trans8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}
__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<uint32_t *>(&h); }
__device__ __forceinline__ __half2 u2h(uint32_t u) { return *reinterpret_cast<__half2 *>(&u); }
__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) { return h2u(__floats2half2_rn(lo, hi)); }

// the pair of codes at bits (bit, bit + 16) of x as an exact fp16 pair (see above)
template <int W> __device__ __forceinline__ uint32_t cvt_pair(uint32_t x, int bit) {
  constexpr uint32_t M = ((1u << W) - 1u) * 0x00010001u;
  if (bit + W > 10) {  // (x >> 8) is shared by every such pair of the word
    x >>= 8;
    bit -= 8;
  }
  const uint32_t t = (x & (M << bit)) | 0x64006400u;
  const uint32_t mul = (uint32_t)((15 - bit) << 10) * 0x00010001u;           // 2^-bit
  const uint32_t add = (uint32_t)(0x8000u | ((25 - bit) << 10)) * 0x00010001u;  // -2^(10 - bit)
  return h2u(__hfma2(u2h(t), u2h(mul), u2h(add)));
}

// the first 16 codes of a 1-bit word in plain order (a final partial word)
// into the interleaved order of a whole word
__device__ __forceinline__ uint32_t deint16(uint32_t x) {
  uint32_t e = x & 0x5555u, o = (x >> 1) & 0x5555u;
  e = (e | (e >> 1)) & 0x3333u;
  e = (e | (e >> 2)) & 0x0f0fu;
  e = (e | (e >> 4)) & 0x00ffu;
  o = (o | (o >> 1)) & 0x3333u;
  o = (o | (o >> 2)) & 0x0f0fu;
  o = (o | (o >> 4)) & 0x00ffu;
  return e | (o << 16);
}

// NW words from shared memory at p, VEC bytes at a time (p VEC-aligned)
template <int NW, int VEC> __device__ __forceinline__ void load_words(const uint8_t *p, uint32_t (&r)[NW]) {
  if constexpr (VEC == 16) {
#pragma unroll
    for (int k = 0; k < NW / 4; ++k) {
      const uint4 v = reinterpret_cast<const uint4 *>(p)[k];
      r[4 * k] = v.x;
      r[4 * k + 1] = v.y;
      r[4 * k + 2] = v.z;
      r[4 * k + 3] = v.w;
    }
  } else if constexpr (VEC == 8) {
#pragma unroll
    for (int k = 0; k < NW / 2; ++k) {
      const uint2 v = reinterpret_cast<const uint2 *>(p)[k];
      r[2 * k] = v.x;
      r[2 * k + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int k = 0; k < NW; ++k) r[k] = reinterpret_cast<const uint32_t *>(p)[k];
  }
}
// widest load for NW words at offsets slot * SB + k * CB (CB: bytes between lanes' chunks)
__host__ __device__ constexpr int qa_vec(int NW, int SB, int CB) {
  return (NW % 4 == 0 && SB % 16 == 0 && CB % 16 == 0) ? 16 : (NW % 2 == 0 && SB % 8 == 0 && CB % 8 == 0) ? 8 : 4;
}

// S += K Q^T for slots slot0 (rows gid) and slot1 (rows gid + 8) at width W
// (kc: the staged K codes, sk bytes a slot)
template <int W, int D, int NQ>
__device__ __forceinline__ void qa_kmma(const uint8_t *kc, int slot0, int slot1, int tig, int lane,
                                        const uint2 *qf, float (&sc)[4]) {
  constexpr int DP = QaDim<D>::DP, NS = QaDim<D>::NS, CK = DP / 4, N = 32 / W;
  constexpr int NW = CK * W / 32 >= 1 ? CK * W / 32 : 1;
  constexpr int SB = ((D * W / 8) + 3) & ~3;
  constexpr int VEC = qa_vec(NW, SB, CK >= N ? CK * W / 8 : 4);
  const int c0 = tig * CK;
  const uint8_t *base = kc + 4 * (c0 / N);
  uint32_t r0[NW], r1[NW];
  float sc2[4] = {0.f, 0.f, 0.f, 0.f};
  load_words<NW, VEC>(base + slot0 * SB, r0);
  load_words<NW, VEC>(base + slot1 * SB, r1);
  if constexpr (D == 80 && W == 1) {
    if (tig == 2) {  // elements 64 .. 79: the partial word
      r0[0] = deint16(r0[0]);
      r1[0] = deint16(r1[0]);
    }
  }
  if constexpr (CK < N) {  // the chunk lies inside one word
    const int sh = W * ((c0 % N) / 2);
    r0[0] >>= sh;
    r1[0] >>= sh;
  }
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    const int m0 = 2 * s, m1 = 2 * s + 1;
    const int k0 = CK >= N ? (2 * m0) / N : 0, k1 = CK >= N ? (2 * m1) / N : 0;
    const int b0 = W * (m0 % (N / 2)), b1 = W * (m1 % (N / 2));
    const uint32_t a0 = cvt_pair<W>(r0[k0], b0), a2 = cvt_pair<W>(r0[k1], b1);
    const uint32_t a1 = cvt_pair<W>(r1[k0], b0), a3 = cvt_pair<W>(r1[k1], b1);
#pragma unroll
    for (int pc = 0; pc < NQ; ++pc) {
      const uint2 bq = qf[(pc * NS + s) * 32 + lane];
      mma_f16((s & 1) ? sc2 : sc, a0, a1, a2, a3, bq.x, bq.y);  // two independent chains
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) sc[i] += sc2[i];
}

// O^T += V^T P' at width W over the tile of slots sb .. sb + 15 (vc: the
// staged V codes, sv bytes a slot)
template <int W, int D, int NP>
__device__ __forceinline__ void qa_vmma(const uint8_t *vc, int sb, int gid, int tig,
                                        const uint32_t (&pb)[NP][2], float (&o)[QaDim<D>::NS][4]) {
  constexpr int DP = QaDim<D>::DP, NS = QaDim<D>::NS, CV = DP / 8, N = 32 / W;
  constexpr int NW = CV * W / 32 >= 1 ? CV * W / 32 : 1;
  constexpr int SB = ((D * W / 8) + 3) & ~3;
  constexpr int VEC = qa_vec(NW, SB, CV >= N ? CV * W / 8 : 4);
  const int b0 = gid * CV;
  const uint8_t *base = vc + 4 * (b0 / N);
  uint32_t ra[NW], rb[NW], rc[NW], rd[NW];
  load_words<NW, VEC>(base + (sb + 2 * tig) * SB, ra);
  load_words<NW, VEC>(base + (sb + 2 * tig + 1) * SB, rb);
  load_words<NW, VEC>(base + (sb + 2 * tig + 8) * SB, rc);
  load_words<NW, VEC>(base + (sb + 2 * tig + 9) * SB, rd);
  if constexpr (D == 80 && W == 1) {
    if (gid == 4) {  // elements 64 .. 79: the partial word
      ra[0] = deint16(ra[0]);
      rb[0] = deint16(rb[0]);
      rc[0] = deint16(rc[0]);
      rd[0] = deint16(rd[0]);
    }
  }
  if constexpr (CV < N) {  // the block lies inside one word
    const int sh = W * ((b0 % N) / 2);
    ra[0] >>= sh;
    rb[0] >>= sh;
    rc[0] >>= sh;
    rd[0] >>= sh;
  }
  uint32_t e01[NW], o01[NW], e23[NW], o23[NW];  // (slot a, slot b) pairs of even / odd elements
#pragma unroll
  for (int k = 0; k < NW; ++k) {
    e01[k] = __byte_perm(ra[k], rb[k], 0x5410);
    o01[k] = __byte_perm(ra[k], rb[k], 0x7632);
    e23[k] = __byte_perm(rc[k], rd[k], 0x5410);
    o23[k] = __byte_perm(rc[k], rd[k], 0x7632);
  }
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    const int k = CV >= N ? (2 * s) / N : 0;
    const int bit = W * (s % (N / 2));
    const uint32_t a0 = cvt_pair<W>(e01[k], bit), a1 = cvt_pair<W>(o01[k], bit);
    const uint32_t a2 = cvt_pair<W>(e23[k], bit), a3 = cvt_pair<W>(o23[k], bit);
#pragma unroll
    for (int pc = 0; pc < NP; ++pc) mma_f16(o[s], a0, a1, a2, a3, pb[pc][0], pb[pc][1]);
  }
}

// max / sum over the 8 lanes of equal tig
__device__ __forceinline__ float gid_max(float v) {
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) v = fmaxf(v, __shfl_xor_sync(QP_FULL, v, o));
  return v;
}
__device__ __forceinline__ float gid_sum(float v) {
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) v += __shfl_xor_sync(QP_FULL, v, o);
  return v;
}

__device__ __forceinline__ void sz_of(uint32_t w, float &s, float &z, bool w0) {
  s = h2f((uint16_t)(w & 0xffffu));
  z = h2f((uint16_t)(w >> 16));
  if (w0) z = __fadd_rn(z, __fmul_rn(s, 0.5f));  // width 0: every element is the midpoint
}

template <typename T, int D>
__global__ void __launch_bounds__(QA_NT, QaDim<D>::MINB) k_att(const AttP p) {
  using R = typename QR<T>::R;
  constexpr int DP = QaDim<D>::DP, NS = QaDim<D>::NS, CK = DP / 4, CV = DP / 8;
  constexpr int NQ = QaPrec<T>::NQ, NP = QaPrec<T>::NP;
  (void)CK;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ QaPage s_pg[QA_PPS];
  __shared__ int s_vp[QA_PPS];
  __shared__ int s_npv;
  __shared__ float s_kA[QA_GMAX], s_kB[QA_GMAX], s_qpow[QA_GMAX];
  __shared__ float s_mx[4][QA_GMAX], s_mvs[4], s_l[4][QA_GMAX], s_z[4][QA_GMAX];

  ks_cuda::pdl_wait();
  ks_cuda::pdl_launch_dependents();
  const int sp = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
  const int G = p.G, G2 = p.G2, nk = p.nk, nv = p.nv;
  const int64_t row = (int64_t)b * p.Hkv + hk;
  const int64_t p0 = (int64_t)sp * p.pps;
  const int np = (int)(p.L - p0 < p.pps ? p.L - p0 : p.pps);
  uint8_t *ring = smem;
  float *s_lg = reinterpret_cast<float *>(smem + p.off_lg);  // [QA_PPS][4][16][G2] logits
  float *s_vo = reinterpret_cast<float *>(smem + p.off_vo);  // [4][G][DP] V outlier sums per warp
  float *s_qT = reinterpret_cast<float *>(smem + p.off_qT);  // [DP][8] q scale log2(e) (K phase)
  float *s_pt = s_qT;                                         // [4][16][8] p (V phase)
  uint2 *s_qf = reinterpret_cast<uint2 *>(smem + p.off_qf);  // [NQ][NS][32] q fragments
  float *qraw = reinterpret_cast<float *>(ring);              // [8][DP] q (prologue)

  // ---- prologue: q, the split's pages
  {
    const T *q = reinterpret_cast<const T *>(p.q) + ((int64_t)b * p.H + (int64_t)hk * G) * D;
    for (int i = tid; i < QA_GMAX * DP; i += QA_NT) {
      const int g = i / DP, d = i - g * DP;
      qraw[i] = g < G && d < D ? to_f<T>(q[g * D + d]) : 0.f;
    }
  }
  if (tid < np) {
    QaPage pi;
    pi.base = 0;
    pi.mask = 0ull;
    pi.kc = pi.vc = pi.koi = pi.voi = pi.kmin = pi.sk = pi.sv = pi.wk = pi.wv = 0;
    pi.orig = tid;
    int wk, wv;
    ks_qaqp_layout L;
    const int64_t a = p.plist[row * p.L + p0 + tid];
    if (page_at(p.arena, p.A, p.g, a, wk, wv, L)) {
      pi.base = a * 16;
      pi.mask = *reinterpret_cast<const unsigned long long *>(p.arena + a * 16);
      pi.kc = (int)L.kc;
      pi.vc = (int)L.vc;
      pi.koi = (int)L.koi;
      pi.voi = (int)L.voi;
      pi.kmin = (int)L.kmin;
      pi.sk = (int)L.sk;
      pi.sv = (int)L.sv;
      pi.wk = wk;
      pi.wv = wv;
    }
    s_pg[tid] = pi;
  }
  for (int i = tid; i < 4 * G * DP; i += QA_NT) s_vo[i] = 0.f;
  float *vo = s_vo + warp * G * DP;
  if (tid < 4 * QA_GMAX) (&s_mx[0][0])[tid] = -CUDART_INF_F;
  if (tid < 4) s_mvs[tid] = 0.f;
  __syncthreads();
  for (int g = warp; g < QA_GMAX; g += 4) {  // per head: sum(q), max |q|, finiteness
    float sm = 0.f, mx = 0.f;
    bool bad = false;
    for (int d = lane; d < D; d += 32) {
      const float x = qraw[g * DP + d];
      sm += x;
      mx = fmaxf(mx, fabsf(x));
      bad |= !isfinite(x);
    }
    sm = ks_cuda::warp_sum(sm);
    mx = ks_cuda::warp_max(mx);
    bad = __any_sync(QP_FULL, bad);
    if (lane == 0) {
      int e = 0;
      (void)frexpf(mx, &e);  // mx < 2^e
      const int k = 15 - e < 127 ? 15 - e : 127;
      const float pw = mx > 0.f && !bad ? ldexpf(1.f, k) : 1.f;
      s_qpow[g] = pw;
      // a NaN / Inf in q: every logit NaN (the row is NaN if it has a live slot)
      s_kA[g] = bad ? CUDART_NAN_F : p.scale_log2 / pw;
      s_kB[g] = p.scale_log2 * sm;
    }
  }
  for (int i = tid; i < DP * QA_GMAX; i += QA_NT) {
    const int d = i >> 3, g = i & 7;
    s_qT[i] = qraw[g * DP + d] * p.scale_log2;
  }
  __syncthreads();
  for (int i = tid; i < NS * 32; i += QA_NT) {  // B fragments: column gid, k-step s
    const int s = i >> 5, ln = i & 31, gg = ln >> 2, e = (ln & 3) * (DP / 4) + 4 * s;
    const float pw = s_qpow[gg];
    const float x0 = qraw[gg * DP + e] * pw, x1 = qraw[gg * DP + e + 1] * pw;
    const float x2 = qraw[gg * DP + e + 2] * pw, x3 = qraw[gg * DP + e + 3] * pw;
    const __half2 h0 = __floats2half2_rn(x0, x1), h1 = __floats2half2_rn(x2, x3);
    s_qf[s * 32 + ln] = make_uint2(h2u(h0), h2u(h1));
    if (NQ > 1)
      s_qf[(NS + s) * 32 + ln] = make_uint2(pack_h2(x0 - __low2float(h0), x1 - __high2float(h0)),
                                            pack_h2(x2 - __low2float(h1), x3 - __high2float(h1)));
  }
  if (tid == 0) {
    int n = 0;
    for (int t = 0; t < np; ++t)
      if (s_pg[t].mask) s_vp[n++] = t;
    s_npv = n;
  }
  __syncthreads();  // q fragments, page list; the ring is free from here on

  const int npv = s_npv, nj = 2 * npv, esz = p.esz;
  const uint32_t ring_s = smem_u32(ring);
  auto issue = [&](int j) {
    if (j < nj) {
      const bool kj = j < npv;
      const QaPage &pi = s_pg[s_vp[kj ? j : j - npv]];
      const uint8_t *src = p.arena + pi.base;
      const uint32_t dst = ring_s + (uint32_t)((j % QA_NST) * esz);
      // K job: ksz + vsz, K codes, K outliers (indices, values); V job: vsz, V codes, V outliers
      const int n0 = kj ? 32 : 16, s0 = kj ? 272 : 528;
      const int n1 = 4 * (kj ? pi.sk : pi.sv), s1 = kj ? pi.kc : pi.vc;
      const int s2 = kj ? pi.koi : pi.voi, n2 = ((kj ? pi.voi : pi.kmin) - s2) >> 4;
      if (tid < n0) cp_async16(dst + 16 * tid, src + s0 + 16 * tid);  // (n0 <= 32)
      for (int c = tid; c < n1; c += QA_NT) cp_async16(dst + 16 * (n0 + c), src + s1 + 16 * c);
      for (int c = tid; c < n2; c += QA_NT) cp_async16(dst + 16 * (n0 + n1 + c), src + s2 + 16 * c);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int j = 0; j < QA_NST - 1; ++j) issue(j);

  const float kA0 = s_kA[2 * tig], kA1 = s_kA[2 * tig + 1], kB0 = s_kB[2 * tig], kB1 = s_kB[2 * tig + 1];
  const bool hv0 = 2 * tig < G, hv1 = 2 * tig + 1 < G;  // this lane's heads are real
  float mloc0 = -CUDART_INF_F, mloc1 = -CUDART_INF_F, mvs = 0.f;
  float M0 = -CUDART_INF_F, M1 = -CUDART_INF_F, sig = 1.f;
  float l0 = 0.f, l1 = 0.f, z0 = 0.f, z1 = 0.f;
  float o[NS][4];
#pragma unroll
  for (int s = 0; s < NS; ++s) o[s][0] = o[s][1] = o[s][2] = o[s][3] = 0.f;
  const int slot0 = 16 * warp + gid, slot1 = slot0 + 8;

  for (int j = 0; j < nj; ++j) {
    cp_async_wait<QA_NST - 2>();
    __syncthreads();  // job j staged for every thread; job j - 1 done by every warp
    issue(j + QA_NST - 1);
    const uint8_t *ent = ring + (j % QA_NST) * esz;
    if (j < npv) {
      // ---------------- K phase
      const QaPage &pi = s_pg[s_vp[j]];
      const uint32_t m16 = (uint32_t)(pi.mask >> (16 * warp)) & 0xffffu;
      if (m16) {
        const bool lv0 = (m16 >> gid) & 1u, lv1 = (m16 >> (gid + 8)) & 1u;
        float sc[4] = {0.f, 0.f, 0.f, 0.f};
        const uint8_t *kc = ent + 512;
        switch (pi.wk) {
          case 1: qa_kmma<1, D, NQ>(kc, slot0, slot1, tig, lane, s_qf, sc); break;
          case 2: qa_kmma<2, D, NQ>(kc, slot0, slot1, tig, lane, s_qf, sc); break;
          case 4: qa_kmma<4, D, NQ>(kc, slot0, slot1, tig, lane, s_qf, sc); break;
          case 8: qa_kmma<8, D, NQ>(kc, slot0, slot1, tig, lane, s_qf, sc); break;
          default: break;  // width 0: no codes
        }
        const uint32_t *szw = reinterpret_cast<const uint32_t *>(ent);
        float ks[2], kz[2], vs[2], vz_unused;
        sz_of(szw[slot0], ks[0], kz[0], pi.wk == 0);
        sz_of(szw[slot1], ks[1], kz[1], pi.wk == 0);
        sz_of(szw[64 + slot0], vs[0], vz_unused, false);
        sz_of(szw[64 + slot1], vs[1], vz_unused, false);
        float lg[4];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          lg[2 * r] = fmaf(ks[r] * kA0, sc[2 * r], kz[r] * kB0);
          lg[2 * r + 1] = fmaf(ks[r] * kA1, sc[2 * r + 1], kz[r] * kB1);
        }
        if (nk > 0) {  // K outliers: q_e (x_e - kz), code 0
          const int16_t *oi = reinterpret_cast<const int16_t *>(ent + 512 + 64 * pi.sk);
          const R *ov = reinterpret_cast<const R *>(ent + 512 + 64 * pi.sk + 128 * nk);
          if (nk == 2) {  // the usual case: both slots of a row in one load each
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int sl = r ? slot1 : slot0;
              const uint32_t iw = reinterpret_cast<const uint32_t *>(oi)[sl];
              float xv[2];
              if constexpr (sizeof(R) == 2) {
                const uint32_t vw = reinterpret_cast<const uint32_t *>(ov)[sl];
                xv[0] = QR<T>::f((R)(vw & 0xffffu));
                xv[1] = QR<T>::f((R)(vw >> 16));
              } else {
                const float2 v2 = reinterpret_cast<const float2 *>(ov)[sl];
                xv[0] = v2.x;
                xv[1] = v2.y;
              }
#pragma unroll
              for (int jj = 0; jj < 2; ++jj) {
                const int e = (int)(int16_t)(jj ? iw >> 16 : iw & 0xffffu);
                if ((unsigned)e < (unsigned)D) {
                  const float dx = xv[jj] - kz[r];
                  const float2 qq = *reinterpret_cast<const float2 *>(s_qT + e * 8 + 2 * tig);
                  lg[2 * r] = fmaf(qq.x, dx, lg[2 * r]);
                  lg[2 * r + 1] = fmaf(qq.y, dx, lg[2 * r + 1]);
                }
              }
            }
          } else {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int sl = r ? slot1 : slot0;
            for (int jj = 0; jj < nk; ++jj) {
              const int e = oi[sl * nk + jj];
              if ((unsigned)e < (unsigned)D) {
                const float dx = QR<T>::f(ov[sl * nk + jj]) - kz[r];
                const float2 qq = *reinterpret_cast<const float2 *>(s_qT + e * 8 + 2 * tig);
                lg[2 * r] = fmaf(qq.x, dx, lg[2 * r]);
                lg[2 * r + 1] = fmaf(qq.y, dx, lg[2 * r + 1]);
              }
            }
          }
          }
        }
        if (!lv0) lg[0] = lg[1] = -CUDART_INF_F;
        if (!lv1) lg[2] = lg[3] = -CUDART_INF_F;
        if (hv0) {
          float *dst = s_lg + ((j * 4 + warp) * 16 + gid) * G2 + 2 * tig;
          *reinterpret_cast<float2 *>(dst) = make_float2(lg[0], lg[1]);
          *reinterpret_cast<float2 *>(dst + 8 * G2) = make_float2(lg[2], lg[3]);
        }
        mloc0 = fmaxf(mloc0, fmaxf(lg[0], lg[2]));
        mloc1 = fmaxf(mloc1, fmaxf(lg[1], lg[3]));
        if (lv0) mvs = fmaxf(mvs, vs[0]);
        if (lv1) mvs = fmaxf(mvs, vs[1]);
        if (p.slog) {
          float *sl = p.slog + ((row * p.L + p0 + pi.orig) * QP) * G;
          if (lv0 && hv0) sl[slot0 * G + 2 * tig] = lg[0];
          if (lv0 && hv1) sl[slot0 * G + 2 * tig + 1] = lg[1];
          if (lv1 && hv0) sl[slot1 * G + 2 * tig] = lg[2];
          if (lv1 && hv1) sl[slot1 * G + 2 * tig + 1] = lg[3];
        }
      }
      if (j == npv - 1) {  // the warp's maxima, read after the next barrier
        const float a0 = gid_max(mloc0), a1 = gid_max(mloc1), av = ks_cuda::warp_max(mvs);
        if (gid == 0) {
          s_mx[warp][2 * tig] = a0;
          s_mx[warp][2 * tig + 1] = a1;
        }
        if (lane == 0) s_mvs[warp] = av;
      }
    } else {
      // ---------------- V phase
      const int jv = j - npv;
      if (jv == 0) {
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          M0 = fmaxf(M0, s_mx[w][2 * tig]);
          M1 = fmaxf(M1, s_mx[w][2 * tig + 1]);
        }
        const float mv = fmaxf(fmaxf(s_mvs[0], s_mvs[1]), fmaxf(s_mvs[2], s_mvs[3]));
        if (mv > 0.f && mv <= 65504.f) {
          int e = 0;
          (void)frexpf(mv, &e);  // mv < 2^e
          sig = ldexpf(1.f, 13 - e);
        }
      }
      const QaPage &pi = s_pg[s_vp[jv]];
      const uint32_t m16 = (uint32_t)(pi.mask >> (16 * warp)) & 0xffffu;
      if (m16) {
        const bool lv0 = (m16 >> gid) & 1u, lv1 = (m16 >> (gid + 8)) & 1u;
        const float *lgp = s_lg + ((jv * 4 + warp) * 16 + gid) * G2 + 2 * tig;
        float pr[4];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const bool lv = r ? lv1 : lv0;
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const bool on = lv && (i ? hv1 : hv0);
            const float Mi = i ? M1 : M0;
            const float lg = on ? lgp[8 * G2 * r + i] : -CUDART_INF_F;
            const float pv = on && Mi != -CUDART_INF_F ? exp2f(lg - Mi) : 0.f;
            pr[2 * r + i] = pv;
            // no finite logit in the split: -inf / NaN marks (ks_cuda.cuh)
            const float add = on ? (Mi == -CUDART_INF_F ? ks_cuda::ninf_mark(lg) : pv) : 0.f;
            if (i) l1 += add;
            else l0 += add;
          }
        }
        const uint32_t *szw = reinterpret_cast<const uint32_t *>(ent);
        float vsc[2], vzr[2];
        sz_of(szw[slot0], vsc[0], vzr[0], pi.wv == 0);
        sz_of(szw[slot1], vsc[1], vzr[1], pi.wv == 0);
        if (lv0) {
          z0 = fmaf(pr[0], vzr[0], z0);
          z1 = fmaf(pr[1], vzr[0], z1);
        }
        if (lv1) {
          z0 = fmaf(pr[2], vzr[1], z0);
          z1 = fmaf(pr[3], vzr[1], z1);
        }
        if (pi.wv) {
          uint32_t pb[NP][2];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const bool lv = r ? lv1 : lv0;
            const float f = vsc[r] * sig;
            const float x0 = lv ? pr[2 * r] * f : 0.f, x1 = lv ? pr[2 * r + 1] * f : 0.f;
            const __half2 h = __floats2half2_rn(x0, x1);
            pb[0][r] = trans8x8(h2u(h));
            if (NP > 1) pb[NP - 1][r] = trans8x8(pack_h2(x0 - __low2float(h), x1 - __high2float(h)));
          }
          const uint8_t *vc = ent + 256;
          switch (pi.wv) {
            case 1: qa_vmma<1, D, NP>(vc, 16 * warp, gid, tig, pb, o); break;
            case 2: qa_vmma<2, D, NP>(vc, 16 * warp, gid, tig, pb, o); break;
            case 4: qa_vmma<4, D, NP>(vc, 16 * warp, gid, tig, pb, o); break;
            default: qa_vmma<8, D, NP>(vc, 16 * warp, gid, tig, pb, o); break;
          }
        }
        if (nv > 0) {  // V outliers: p (x_e - vz) into the warp's sums vo[g][e]
          float *pt = s_pt + warp * 16 * 8;
          *reinterpret_cast<float2 *>(pt + gid * 8 + 2 * tig) = make_float2(pr[0], pr[1]);
          *reinterpret_cast<float2 *>(pt + (gid + 8) * 8 + 2 * tig) = make_float2(pr[2], pr[3]);
          __syncwarp();
          const int16_t *oi = reinterpret_cast<const int16_t *>(ent + 256 + 64 * pi.sv);
          const R *ov = reinterpret_cast<const R *>(ent + 256 + 64 * pi.sv + 128 * nv);
          for (int it0 = 0; it0 < 16 * nv; it0 += 32) {  // a lane per (slot, outlier)
            const int it = it0 + lane, rr = nv == 2 ? lane >> 1 : it / nv, sl = 16 * warp + rr;
            int e = -1;
            float dx = 0.f;
            if (it < 16 * nv && ((m16 >> rr) & 1u)) {
              e = oi[sl * nv + it - rr * nv];
              if ((unsigned)e < (unsigned)D) {
                float s_, z_;
                sz_of(szw[sl], s_, z_, pi.wv == 0);
                dx = QR<T>::f(ov[sl * nv + it - rr * nv]) - z_;
              } else {
                e = -1;
              }
            }
            // lanes of one element add in lane order, one round each (deterministic)
            const unsigned same = __match_any_sync(QP_FULL, e >= 0 ? e : -1 - lane);
            const int rank = __popc(same & ((1u << lane) - 1u));
            const int rounds = (int)__reduce_max_sync(QP_FULL, (unsigned)(e >= 0 ? rank : 0));
            for (int r = 0; r <= rounds; ++r) {
              if (e >= 0 && rank == r) {
                float pg8[QA_GMAX];
#pragma unroll
                for (int g = 0; g < QA_GMAX; ++g) pg8[g] = pt[rr * 8 + g];
#pragma unroll
                for (int g = 0; g < QA_GMAX; ++g)
                  if (g < G) vo[g * DP + e] = fmaf(pg8[g], dx, vo[g * DP + e]);
              }
              __syncwarp();
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every job done: the ring is free, s_vo complete

  // ---- the split's record per head: acc = O / sigma + sum p zero + V outliers, M, L
  l0 = gid_sum(l0);
  l1 = gid_sum(l1);
  z0 = gid_sum(z0);
  z1 = gid_sum(z1);
  if (gid == 0) {
    s_l[warp][2 * tig] = l0;
    s_l[warp][2 * tig + 1] = l1;
    s_z[warp][2 * tig] = z0;
    s_z[warp][2 * tig + 1] = z1;
  }
  float *red = reinterpret_cast<float *>(ring);  // [4][8][DP]
  {
    const float is = 1.f / sig;
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      const int e = gid * CV + 2 * s;
      float *r0 = red + (warp * QA_GMAX + 2 * tig) * DP + e;
      r0[0] = o[s][0] * is;
      r0[DP] = o[s][1] * is;
      r0[1] = o[s][2] * is;
      r0[DP + 1] = o[s][3] * is;
    }
  }
  __syncthreads();
  float *rec = p.part + (row * p.nsplit + sp) * (int64_t)G * p.RS;
  for (int ix = tid; ix < G * D; ix += QA_NT) {
    const int g = ix / D, e = ix - g * D;
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) acc += red[(w * QA_GMAX + g) * DP + e] + s_z[w][g] + s_vo[(w * G + g) * DP + e];
    rec[g * p.RS + e] = acc;
  }
  if (tid < G) {
    float M = -CUDART_INF_F, Ls = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      M = fmaxf(M, s_mx[w][tid]);
      Ls += s_l[w][tid];
    }
    rec[tid * p.RS + D] = M;
    rec[tid * p.RS + D + 1] = Ls;
  }
}

// One block per (b, h): the splits' records merged (weights merge_w, fixed
// order: deterministic); lam (p_max only) gets M + log2 L.
template <typename T>
__global__ void __launch_bounds__(256) k_att_merge(const float *part, int nsplit, int H, int Hkv, int D, int RS,
                                                   float *lam, T *out) {
  ks_cuda::pdl_wait();
  ks_cuda::pdl_launch_dependents();
  const int bh = blockIdx.x, b = bh / H, h = bh - b * H, G = H / Hkv, hk = h / G, g = h - hk * G;
  const int tid = threadIdx.x, lane = tid & 31;
  const int64_t st = (int64_t)G * RS;
  const float *rp = part + ((int64_t)(b * Hkv + hk) * nsplit * G + g) * RS;
  __shared__ float s_M, s_L;
  __shared__ float4 s_acc[256];
  if (tid < 32) {
    float M = -CUDART_INF_F;
#pragma unroll 4
    for (int s = lane; s < nsplit; s += 32) M = fmaxf(M, rp[s * st + D]);
    M = ks_cuda::warp_max(M);
    float L = 0.f;
#pragma unroll 4
    for (int s = lane; s < nsplit; s += 32) L += rp[s * st + D + 1] * merge_w(rp[s * st + D], M);
    L = ks_cuda::warp_sum(L);
    if (lane == 0) {
      s_M = M;
      s_L = L;
    }
  }
  __syncthreads();
  const float M = s_M, L = s_L;
  const int nq = D / 4, ng = 256 / nq, grp = tid / nq, q4 = tid - grp * nq;
  float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
  if (grp < ng) {
#pragma unroll 8
    for (int s = grp; s < nsplit; s += ng) {
      const float w = merge_w(rp[s * st + D], M);
      const float4 v = *reinterpret_cast<const float4 *>(rp + s * st + 4 * q4);
      a.x = fmaf(w, v.x, a.x);
      a.y = fmaf(w, v.y, a.y);
      a.z = fmaf(w, v.z, a.z);
      a.w = fmaf(w, v.w, a.w);
    }
  }
  s_acc[tid] = a;
  __syncthreads();
  if (tid < nq) {
    float4 t = s_acc[tid];
    for (int k = 1; k < ng; ++k) {
      const float4 u = s_acc[k * nq + tid];
      t.x += u.x;
      t.y += u.y;
      t.z += u.z;
      t.w += u.w;
    }
    T *dst = out + (int64_t)bh * D + 4 * tid;
    dst[0] = from_f<T>(finish(t.x, M, L));
    dst[1] = from_f<T>(finish(t.y, M, L));
    dst[2] = from_f<T>(finish(t.z, M, L));
    dst[3] = from_f<T>(finish(t.w, M, L));
  }
  if (lam && tid == 0)
    lam[bh] = M == -CUDART_INF_F ? (L == 0.f ? 0.f : CUDART_NAN_F) : M + log2f(L);
}

// p_max[b, hk, j, i] = max over the G heads of exp2(s - lam) for live slots, else 0
__global__ void __launch_bounds__(256) k_att_pmax(const uint8_t *arena, int64_t A, ks_qaqp_geom g,
                                                  const int32_t *plist, int64_t L, int H, int Hkv,
                                                  const float *slog, const float *lam, float *p_max) {
  ks_cuda::pdl_wait();
  const int hk = blockIdx.y, b = blockIdx.z, G = H / Hkv;
  const int64_t row = (int64_t)b * Hkv + hk;
  const int64_t j = (int64_t)blockIdx.x * 4 + (threadIdx.x >> 6);
  const int s = threadIdx.x & 63;
  __shared__ unsigned long long s_mask[4];
  if (s == 0) {
    unsigned long long m = 0ull;
    int wk, wv;
    ks_qaqp_layout Lo;
    if (j < L) {
      const int64_t a = plist[row * L + j];
      if (page_at(arena, A, g, a, wk, wv, Lo)) m = *reinterpret_cast<const unsigned long long *>(arena + a * 16);
    }
    s_mask[threadIdx.x >> 6] = m;
  }
  __syncthreads();
  if (j >= L) return;
  float pm = 0.f;
  if ((s_mask[threadIdx.x >> 6] >> s) & 1ull) {
    const float *sl = slog + ((row * L + j) * QP + s) * G;
    const float *lm = lam + (int64_t)b * H + (int64_t)hk * G;
    for (int k = 0; k < G; ++k) {
      const float v = exp2f(sl[k] - lm[k]);
      pm = k == 0 ? v : (v > pm ? v : pm);
    }
  }
  p_max[(row * L + j) * QP + s] = pm;
}

// ------------------------------------------------------------ host helpers ----

inline size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

int qp_sm_count() {
  static int n = 0;
  if (n == 0) {
    int dev = 0, v = 0;
    if (cudaGetDevice(&dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && v > 0) {
      n = v;
    } else {
      (void)cudaGetLastError();
      return 132;
    }
  }
  return n;
}

// launch with the programmatic-dependent-launch attribute where the device has it
template <typename... KArgs, typename... Args>
cudaError_t qp_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                      Args... args) {
  return ks_cuda::launch_kernel_smem(ks_cuda::pdl_enabled(), kernel, grid, block, smem, st, args...);
}


// ---- attention sizing (shapes only: the workspace function and the launch agree)
struct QaPlan {
  int64_t pps, nsplit;
};
QaPlan qa_plan(int64_t B, int64_t Hkv, int64_t L, int64_t D) {
  QaPlan pl;
  const int64_t per_sm = qa_dp(D) <= 128 ? 4 : 2;
  const int64_t target = per_sm * qp_sm_count(), total = B * Hkv * L;
  int64_t pps = (total + target - 1) / target;
  if (const char *e = getenv("KVSPARSE_QAQP_PPS")) {  // experiment switch (benchmarks): pages per split
    const int v = atoi(e);
    if (v >= 1 && v <= QA_PPS) pps = v;
  }
  pps = pps < 1 ? 1 : (pps > QA_PPS ? QA_PPS : pps);
  pl.pps = pps;
  pl.nsplit = L > 0 ? (L + pps - 1) / pps : 0;
  return pl;
}
// bytes of one staging buffer: the largest K or V job of any class, plus the
// reads past the last slot's codes (padded tiles), at least a quarter of the
// epilogue's per-warp sums [4][8][DP] (the ring holds them at the end)
int64_t qa_esz(const ks_qaqp_geom &g) {
  int64_t m = 0;
  for (int w = 1; w <= 8; w <<= 1) {
    const int64_t sk = ks_qaqp_code_stride(g.D, w);
    const int64_t kj = 512 + 64 * sk + 128 * g.n_out_k + 64 * g.n_out_k * g.ds;
    const int64_t vj = 256 + 64 * sk + 128 * g.n_out_v + 64 * g.n_out_v * g.ds;
    m = kj > m ? kj : m;
    m = vj > m ? vj : m;
  }
  m += 64;
  const int64_t red = (4 * QA_GMAX * qa_dp(g.D) * 4 + QA_NST - 1) / QA_NST;
  m = m > red ? m : red;
  return (m + 15) & ~(int64_t)15;
}
struct QaSmem {
  int off_lg, off_vo, off_qT, off_qf, total;
};
QaSmem qa_smem(const ks_qaqp_geom &g, int G, int NQ) {
  const int DP = qa_dp(g.D), NS = DP / 16, G2 = (G + 1) & ~1;
  QaSmem s;
  int o = (int)(QA_NST * qa_esz(g));
  s.off_lg = o;
  o += QA_PPS * 4 * 16 * G2 * 4;
  s.off_vo = o;
  o += 4 * G * DP * 4;
  s.off_qT = o;
  o += DP * 8 * 4 > 4 * 16 * 8 * 4 ? DP * 8 * 4 : 4 * 16 * 8 * 4;
  s.off_qf = o;
  o += NQ * NS * 32 * 8;
  s.total = o;
  return s;
}
// workspace: partial records [B, Hkv, nsplit, G, D + 4] | lam [B, H] | logits [B, Hkv, L, 64, G]
struct QaWs {
  size_t part, lam, slog, total;
};
QaWs qa_ws(int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t D) {
  const QaPlan pl = qa_plan(B, Hkv, L, D);
  const int64_t G = H / Hkv;
  QaWs w;
  w.part = 0;
  w.lam = align256((size_t)(B * Hkv * pl.nsplit * G * (D + 4)) * 4);
  w.slog = w.lam + align256((size_t)(B * H) * 4);
  w.total = w.slog + align256((size_t)(B * Hkv * L * QP * G) * 4);
  return w;
}

template <typename T, int D>
int qa_run(const void *q, int64_t B, int64_t H, int64_t Hkv, const uint8_t *arena, int64_t A,
           const ks_qaqp_geom &g, const int32_t *plist, int64_t L, float scale, float *p_max, void *workspace,
           void *out, cudaStream_t st) {
  const int G = (int)(H / Hkv);
  const QaPlan pl = qa_plan(B, Hkv, L, D);
  const QaWs wl = qa_ws(B, H, Hkv, L, D);
  uint8_t *ws = reinterpret_cast<uint8_t *>(workspace);
  float *part = reinterpret_cast<float *>(ws + wl.part);
  float *lam = p_max ? reinterpret_cast<float *>(ws + wl.lam) : nullptr;
  float *slog = p_max ? reinterpret_cast<float *>(ws + wl.slog) : nullptr;
  cudaError_t e = cudaSuccess;
  if (pl.nsplit > 0) {
    const QaSmem sm = qa_smem(g, G, QaPrec<T>::NQ);
    if (sm.total > 227 * 1024) return (int)cudaErrorInvalidValue;
    static int attr_set = 0;  // per instantiation: the largest dynamic size allowed so far
    static bool carve = false;
    if (!carve) {
      // all of the unified L1 / shared memory as shared memory: the default
      // carveout is a hint the driver may size for fewer resident blocks
      (void)cudaFuncSetAttribute(k_att<T, D>, cudaFuncAttributePreferredSharedMemoryCarveout,
                                 (int)cudaSharedmemCarveoutMaxShared);
      (void)cudaGetLastError();
      carve = true;
    }
    if (sm.total > 48 * 1024 && sm.total > attr_set) {
      e = cudaFuncSetAttribute(k_att<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, sm.total);
      if (e != cudaSuccess) return (int)e;
      attr_set = sm.total;
    }
    AttP p;
    p.q = q;
    p.arena = arena;
    p.A = A;
    p.g = g;
    p.plist = plist;
    p.L = L;
    p.part = part;
    p.slog = slog;
    p.H = (int)H;
    p.Hkv = (int)Hkv;
    p.G = G;
    p.G2 = (G + 1) & ~1;
    p.nk = (int)g.n_out_k;
    p.nv = (int)g.n_out_v;
    if (const char *e = getenv("KVSPARSE_QAQP_SKIP")) {  // timing attribution only (wrong results)
      const int v = atoi(e);
      if (v & 1) p.nk = 0;
      if (v & 2) p.nv = 0;
    }
    p.pps = (int)pl.pps;
    p.nsplit = (int)pl.nsplit;
    p.RS = (int)D + 4;
    p.esz = (int)qa_esz(g);
    p.off_lg = sm.off_lg;
    p.off_vo = sm.off_vo;
    p.off_qT = sm.off_qT;
    p.off_qf = sm.off_qf;
    p.scale_log2 = scale * 1.4426950408889634f;
    e = qp_launch(k_att<T, D>, dim3((unsigned)pl.nsplit, (unsigned)Hkv, (unsigned)B), dim3(QA_NT),
                  (size_t)sm.total, st, p);
    if (e != cudaSuccess) return (int)e;
  }
  e = qp_launch(k_att_merge<T>, dim3((unsigned)(B * H)), dim3(256), 0, st, (const float *)part, (int)pl.nsplit,
                (int)H, (int)Hkv, (int)D, (int)D + 4, lam, reinterpret_cast<T *>(out));
  if (e != cudaSuccess) return (int)e;
  if (p_max && L > 0) {
    e = qp_launch(k_att_pmax, dim3((unsigned)((L + 3) / 4), (unsigned)Hkv, (unsigned)B), dim3(256), 0, st,
                  arena, A, g, plist, L, (int)H, (int)Hkv, (const float *)slog, (const float *)lam, p_max);
    if (e != cudaSuccess) return (int)e;
  }
  return (int)cudaGetLastError();
}

template <typename T>
int qa_dispatch(const void *q, int64_t B, int64_t H, int64_t Hkv, const uint8_t *arena, int64_t A,
                const ks_qaqp_geom &g, const int32_t *plist, int64_t L, float scale, float *p_max,
                void *workspace, void *out, cudaStream_t st) {
  switch (g.D) {
    case 64: return qa_run<T, 64>(q, B, H, Hkv, arena, A, g, plist, L, scale, p_max, workspace, out, st);
    case 80: return qa_run<T, 80>(q, B, H, Hkv, arena, A, g, plist, L, scale, p_max, workspace, out, st);
    case 96: return qa_run<T, 96>(q, B, H, Hkv, arena, A, g, plist, L, scale, p_max, workspace, out, st);
    case 128: return qa_run<T, 128>(q, B, H, Hkv, arena, A, g, plist, L, scale, p_max, workspace, out, st);
    case 256: return qa_run<T, 256>(q, B, H, Hkv, arena, A, g, plist, L, scale, p_max, workspace, out, st);
    default: return (int)cudaErrorInvalidValue;
  }
}

// ---- append sizing
int64_t qp_maxe(int64_t n) { return n / QP + QP_NC + 1; }
int64_t qp_ws_bh(int64_t n) { return (8 * n + 4 * (4 * QP_NC + 8 + 2 * qp_maxe(n)) + 15) & ~(int64_t)15; }

// the one-kernel path: a few tokens per call, rows that fit shared memory
inline bool qp_seq(int64_t n, const ks_qaqp_geom &g) { return n <= QP_SEQ_MAX && g.D <= 4096; }

template <typename T>
int qp_append(AppArgs &a, cudaStream_t st) {
  const int64_t nbh = a.B * a.Hkv;
  if (qp_seq(a.n, a.g)) {
    k_append_seq<T><<<(unsigned)nbh, 64, (size_t)(2 * a.g.D * sizeof(typename QR<T>::R)), st>>>(a);
    return (int)cudaGetLastError();
  }
  a.ws_bh = qp_ws_bh(a.n);
  a.maxe = qp_maxe(a.n);
  k_append_plan<T><<<(unsigned)nbh, QP_PLAN_NT, 0, st>>>(a);
  const int64_t items = nbh * a.n, nb2 = (items + 1) / 2;
  k_append_quant<T><<<(unsigned)(nb2 < (1 << 20) ? nb2 : (1 << 20)), 128, 0, st>>>(a);
  if (a.g.nb) {
    const int64_t y = QP_NC + a.maxe;
    k_append_bounds<T><<<dim3((unsigned)nbh, (unsigned)(y < 1024 ? y : 1024)), 128, 0, st>>>(a);
  }
  return (int)cudaGetLastError();
}

}  // namespace

// ------------------------------------------------------------ entry points ----

extern "C" {

size_t ks_qaqp_append_cuda_workspace(int64_t B, int64_t Hkv, int64_t n, ks_qaqp_geom g) {
  if (B <= 0 || Hkv <= 0 || qp_seq(n, g)) return 0;
  return (size_t)(B * Hkv * qp_ws_bh(n));
}

int ks_qaqp_append_cuda(const void *k, const void *v, ks_dtype dt, int64_t B, int64_t Hkv, int64_t n,
                        ks_qaqp_geom g, const uint8_t *wk, const uint8_t *wv, const int32_t *pos0,
                        const int32_t *pos, const int32_t *count, uint8_t *arena, int64_t A, int64_t *top,
                        int32_t *open, int32_t *pages, int64_t maxp, int32_t *n_pages, int32_t *flags,
                        void *workspace, void *stream) {
  if (B <= 0 || Hkv <= 0 || n <= 0) return 0;
  if (!qp_geom_ok(g, dt) || ((uintptr_t)arena & 15) != 0 || (!qp_seq(n, g) && !workspace))
    return (int)cudaErrorInvalidValue;
  AppArgs a;
  a.k = k;
  a.v = v;
  a.B = B;
  a.Hkv = Hkv;
  a.n = n;
  a.g = g;
  a.wk = wk;
  a.wv = wv;
  a.pos0 = pos0;
  a.pos = pos;
  a.count = count;
  a.arena = arena;
  a.A = A < 0 ? 0 : A & ~(int64_t)15;
  a.top = top;
  a.open = open;
  a.pages = pages;
  a.maxp = maxp < 0 ? 0 : maxp;
  a.n_pages = n_pages;
  a.flags = flags;
  a.ws = reinterpret_cast<uint8_t *>(workspace);
  a.ws_bh = 0;
  a.maxe = 0;
  cudaStream_t st = (cudaStream_t)stream;
  if (dt == KS_F32) return qp_append<float>(a, st);
  if (dt == KS_F16) return qp_append<__half>(a, st);
  return qp_append<__nv_bfloat16>(a, st);
}

int ks_qaqp_dequantize_cuda(const uint8_t *arena, int64_t A, ks_qaqp_geom g, ks_dtype dt, int64_t B, int64_t Hkv,
                            const int32_t *plist, int64_t L, void *kout, void *vout, int32_t *pos_out,
                            void *stream) {
  const int64_t nb = B * Hkv * L;
  if (B <= 0 || Hkv <= 0 || L <= 0) return 0;
  if (!qp_geom_ok(g, dt) || ((uintptr_t)arena & 15) != 0) return (int)cudaErrorInvalidValue;
  const int64_t A16 = A < 0 ? 0 : A & ~(int64_t)15;
  cudaStream_t st = (cudaStream_t)stream;
  if (dt == KS_F32)
    k_dequant<float><<<(unsigned)nb, 256, 0, st>>>(arena, A16, g, plist, (float *)kout, (float *)vout, pos_out);
  else if (dt == KS_F16)
    k_dequant<__half><<<(unsigned)nb, 256, 0, st>>>(arena, A16, g, plist, (__half *)kout, (__half *)vout, pos_out);
  else
    k_dequant<__nv_bfloat16><<<(unsigned)nb, 256, 0, st>>>(arena, A16, g, plist, (__nv_bfloat16 *)kout,
                                                          (__nv_bfloat16 *)vout, pos_out);
  return (int)cudaGetLastError();
}

size_t ks_qaqp_attention_cuda_workspace(int64_t B, int64_t H, int64_t Hkv, int64_t L, ks_qaqp_geom g) {
  if (B <= 0 || Hkv <= 0 || H <= 0 || H % Hkv != 0 || L < 0 || !qa_dim_ok(g.D)) return 0;
  return qa_ws(B, H, Hkv, L, g.D).total;
}

int ks_qaqp_attention_cuda(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv, const uint8_t *arena,
                           int64_t A, ks_qaqp_geom g, const int32_t *plist, int64_t L, float scale, float *p_max,
                           void *workspace, void *out, void *stream) {
  if (B <= 0 || H <= 0) return 0;
  if (Hkv < 1 || H % Hkv != 0 || H / Hkv > QA_GMAX || !qa_dim_ok(g.D) || !qp_geom_ok(g, dt) || L < 0 ||
      ((uintptr_t)arena & 15) != 0 || g.n_out_k > 64 || g.n_out_v > 64)
    return (int)cudaErrorInvalidValue;
  const int64_t A16 = A < 0 ? 0 : A & ~(int64_t)15;
  cudaStream_t st = (cudaStream_t)stream;
  if (dt == KS_F32)
    return qa_dispatch<float>(q, B, H, Hkv, arena, A16, g, plist, L, scale, p_max, workspace, out, st);
  if (dt == KS_F16)
    return qa_dispatch<__half>(q, B, H, Hkv, arena, A16, g, plist, L, scale, p_max, workspace, out, st);
  return qa_dispatch<__nv_bfloat16>(q, B, H, Hkv, arena, A16, g, plist, L, scale, p_max, workspace, out, st);
}

}  // extern "C"
