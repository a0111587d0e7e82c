// Quest kernels for NVIDIA GPUs (CUDA C). Semantics: quest.h.
//
// No torch, no Python: raw device pointers, sizes, and a cudaStream_t.
// Decode attention is memory-bound, so every kernel reads its operands with
// 16-byte loads, one 8-element chunk of head_dim per thread, and keeps several
// loads in flight before their first use.
//
//   metadata   grid (page blocks, Hkv, B); one thread = (page, 8-dim chunk)
//   scores     grid (page blocks, Hkv, B); Lanes<D> lanes per page, 4 pages/thread
//   select     grid (Hs, B), 1024 threads: 4-pass radix select of the
//              (n_sel-1)-th largest score, then an order-preserving compaction
//   attention  grid (splits, Hs, B), 4 warps; a warp walks one selected page
//              at a time with online softmax for all query heads of its row;
//              splits merge in the last block to finish (no second launch)
//
// Head dims: D in {64, 80, 96, 128, 256} (the launch dispatches). The
// scores and attention kernels give a token (a page) LPT lanes, D/8 rounded up
// to a power of two (Lanes<D>: 8, 16, 16, 16, 32), so that the __shfl_xor_sync
// reductions stay butterflies inside aligned lane groups. For D = 80 and 96
// (10 and 12 chunks) lanes c >= D/8 are padding: they load nothing (zeros in
// registers), add zeros to every reduction and store nothing; the tensors
// stay D-contiguous. D = 256 takes a whole warp per token (one token per warp
// step). The metadata kernel has no reductions: one thread per (page, chunk)
// for any D. The split records (D + 2 floats per head) and the merges are
// sized from D.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>
#include <stdint.h>
#include <stdlib.h>

#include "ks_cuda.cuh"
#include "quest.h"

namespace {

using ks_cuda::block_exclusive_scan;
using ks_cuda::launch_kernel;
using ks_cuda::pdl_enabled;
using ks_cuda::pdl_launch_dependents;
using ks_cuda::pdl_wait;
using ks_cuda::clamp_len;
using ks_cuda::finish;
using ks_cuda::from_f;
using ks_cuda::merge_w;
using ks_cuda::ninf_mark;

constexpr float kLog2e = 1.4426950408889634f;

// Lanes of one token (one page in the scores kernel): D/8 chunks of 8
// elements, rounded up to a power of two; chunks c >= CH are padding.
template <int D> struct Lanes {
  static_assert(D % 8 == 0 && D >= 8 && D <= 256, "head_dim: a multiple of 8 up to 256");
  static constexpr int CH = D / 8;                                    // real chunks
  static constexpr int N = CH <= 8 ? 8 : CH <= 16 ? 16 : 32;          // lanes
};

// ---------------------------------------------------------------- loads ----
template <typename T> struct Vec8;
template <> struct Vec8<float> {
  struct Raw { float4 a, b; };
  static __device__ __forceinline__ void load_raw(const float *p, Raw &r) {
    r.a = __ldg(reinterpret_cast<const float4 *>(p));
    r.b = __ldg(reinterpret_cast<const float4 *>(p) + 1);
  }
  static __device__ __forceinline__ void zero_raw(Raw &r) { r.a = r.b = make_float4(0.f, 0.f, 0.f, 0.f); }
  static __device__ __forceinline__ void cvt(const Raw &r, float f[8]) {
    f[0] = r.a.x; f[1] = r.a.y; f[2] = r.a.z; f[3] = r.a.w;
    f[4] = r.b.x; f[5] = r.b.y; f[6] = r.b.z; f[7] = r.b.w;
  }
  static __device__ __forceinline__ void load(const float *p, float f[8]) {
    float4 a = __ldg(reinterpret_cast<const float4 *>(p));
    float4 b = __ldg(reinterpret_cast<const float4 *>(p) + 1);
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
  }
  static __device__ __forceinline__ void store(float *p, const float f[8]) {
    reinterpret_cast<float4 *>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4 *>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
  }
};
template <> struct Vec8<__half> {
  typedef uint4 Raw;
  static __device__ __forceinline__ void load_raw(const __half *p, Raw &r) {
    r = __ldg(reinterpret_cast<const uint4 *>(p));
  }
  static __device__ __forceinline__ void zero_raw(Raw &r) { r = make_uint4(0, 0, 0, 0); }
  static __device__ __forceinline__ void cvt(const Raw &r, float f[8]) {
    const __half2 *h = reinterpret_cast<const __half2 *>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 x = __half22float2(h[i]);
      f[2 * i] = x.x; f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ void load(const __half *p, float f[8]) {
    uint4 u = __ldg(reinterpret_cast<const uint4 *>(p));
    const __half2 *h = reinterpret_cast<const __half2 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 x = __half22float2(h[i]);
      f[2 * i] = x.x; f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ void store(__half *p, const float f[8]) {
    uint4 u;
    __half2 *h = reinterpret_cast<__half2 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    *reinterpret_cast<uint4 *>(p) = u;
  }
};
template <> struct Vec8<__nv_bfloat16> {
  typedef uint4 Raw;
  static __device__ __forceinline__ void load_raw(const __nv_bfloat16 *p, Raw &r) {
    r = __ldg(reinterpret_cast<const uint4 *>(p));
  }
  static __device__ __forceinline__ void zero_raw(Raw &r) { r = make_uint4(0, 0, 0, 0); }
  static __device__ __forceinline__ void cvt(const Raw &r, float f[8]) {
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x; f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ void load(const __nv_bfloat16 *p, float f[8]) {
    uint4 u = __ldg(reinterpret_cast<const uint4 *>(p));
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x; f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ void store(__nv_bfloat16 *p, const float f[8]) {
    uint4 u;
    __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    *reinterpret_cast<uint4 *>(p) = u;
  }
};


__device__ __forceinline__ int n_pages_of(int len, int P) { return (len + P - 1) / P; }



// ------------------------------------------------------------- metadata ----
template <typename T, int D>
__global__ void metadata_kernel(const T *__restrict__ k, int64_t cap, const int32_t *start_lens,
                                const int32_t *seq_lens, int P, int max_pages, T *kmin, T *kmax) {
  constexpr int LPP = D / 8;
  const int b = blockIdx.z, h = blockIdx.y, Hkv = gridDim.y;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  const int p = idx / LPP, c = idx % LPP;
  if (p >= max_pages) return;
  const int len = clamp_len(seq_lens, b, cap);
  const int np = n_pages_of(len, P);
  if (start_lens) {
    int s = start_lens[b];
    s = s < 0 ? 0 : (s > len ? len : s);
    if (p < s / P || p >= np) return;  // untouched by the append
  }
  const size_t row = ((size_t)b * Hkv + h) * max_pages + p;
  float mn[8], mx[8];
  if (p >= np) {
#pragma unroll
    for (int i = 0; i < 8; ++i) mn[i] = mx[i] = 0.f;
  } else {
    const T *kp = k + (((size_t)b * Hkv + h) * cap + (size_t)p * P) * D + c * 8;
    const int t_end = min(P, len - p * P);
    Vec8<T>::load(kp, mn);
#pragma unroll
    for (int i = 0; i < 8; ++i) mx[i] = mn[i];
    for (int t = 1; t < t_end; ++t) {
      float x[8];
      Vec8<T>::load(kp + (size_t)t * D, x);
#pragma unroll
      // NaN-propagating min / max (ks_dtype.h's NaN policy), as on the CPU
      for (int i = 0; i < 8; ++i) {
        mn[i] = (x[i] < mn[i] || x[i] != x[i]) ? x[i] : mn[i];
        mx[i] = (x[i] > mx[i] || x[i] != x[i]) ? x[i] : mx[i];
      }
    }
  }
  Vec8<T>::store(kmin + row * D + c * 8, mn);  // min/max of values is exact in T
  Vec8<T>::store(kmax + row * D + c * 8, mx);
}

// --------------------------------------------------------------- scores ----
// One thread block covers SC_PAGES_PER_BLOCK pages of one (b, kv head).
constexpr int SC_THREADS = 256;
// pages per thread, their min/max loads all in flight together (8 for 16-bit
// types was tried: the compiler then needs ~175 registers and occupancy drops)
template <typename T> __host__ __device__ constexpr int sc_ppt() { return 4; }

template <typename T, int D, int MAXG>
__global__ void __launch_bounds__(SC_THREADS)
scores_kernel(const T *__restrict__ q, const T *__restrict__ kmin, const T *__restrict__ kmax,
              int H, int G, int max_pages, const int32_t *seq_lens, int P, int64_t cap,
              int group_mode, float *__restrict__ scores) {
  constexpr int LPP = Lanes<D>::N;           // lanes per page
  constexpr int CH = Lanes<D>::CH;           // lanes that hold channels (the rest: zeros)
  constexpr int PPS = SC_THREADS / LPP;      // pages per step
  const int b = blockIdx.z, hk = blockIdx.y, Hkv = gridDim.y;
  const int lane_c = threadIdx.x % LPP;      // which 8-dim chunk
  const int sub = threadIdx.x / LPP;
  const int len = clamp_len(seq_lens, b, cap);
  const int np = n_pages_of(len, P);

  float qv[MAXG][8];
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    if (g < G && lane_c < CH) Vec8<T>::load(q + ((size_t)b * H + (size_t)hk * G + g) * D + lane_c * 8, qv[g]);
    else {
#pragma unroll
      for (int i = 0; i < 8; ++i) qv[g][i] = 0.f;
    }
  }
  constexpr int SC_PPT = sc_ppt<T>();
  const int p0 = blockIdx.x * (PPS * SC_PPT) + sub;
  const size_t meta_row = ((size_t)b * Hkv + hk) * max_pages;
  typename Vec8<T>::Raw mnr[SC_PPT], mxr[SC_PPT];
#pragma unroll
  for (int j = 0; j < SC_PPT; ++j) {
    const int p = p0 + j * PPS;
    if (p < np && lane_c < CH) {
      Vec8<T>::load_raw(kmin + (meta_row + p) * D + lane_c * 8, mnr[j]);
      Vec8<T>::load_raw(kmax + (meta_row + p) * D + lane_c * 8, mxr[j]);
    } else {
      Vec8<T>::zero_raw(mnr[j]);
      Vec8<T>::zero_raw(mxr[j]);
    }
  }
  pdl_launch_dependents();  // the selection may get ready while pages are scored
#pragma unroll
  for (int j = 0; j < SC_PPT; ++j) {
    const int p = p0 + j * PPS;
    float part[MAXG];
    float mn[8], mx[8];
    Vec8<T>::cvt(mnr[j], mn);
    Vec8<T>::cvt(mxr[j], mx);
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float x = qv[g][i] * mn[i], y = qv[g][i] * mx[i];
        s += x > y ? x : (x == x ? y : x);  // NaN if either product is NaN
      }
      part[g] = s;
    }
    if (group_mode) {
      float s = 0.f;
#pragma unroll
      for (int g = 0; g < MAXG; ++g) s += part[g];
#pragma unroll
      for (int o = LPP / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane_c == 0 && p < max_pages)
        scores[meta_row + p] = p < np ? s : -CUDART_INF_F;
    } else {
#pragma unroll
      for (int g = 0; g < MAXG; ++g) {
        float s = part[g];
#pragma unroll
        for (int o = LPP / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane_c == 0 && g < G && p < max_pages)
          scores[((size_t)b * H + (size_t)hk * G + g) * max_pages + p] = p < np ? s : -CUDART_INF_F;
      }
    }
  }
}

// --------------------------------------------------------------- select ----
constexpr int SEL_THREADS = 1024;

// Order key: larger float -> larger key; NaN ranks as +inf (ks_dtype.h's NaN
// policy: a page with a NaN score is selected, as on the CPU).
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) u = 0x7f800000u;  // NaN -> +inf
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}


__global__ void __launch_bounds__(SEL_THREADS)
select_kernel(const float *__restrict__ scores, int max_pages, const int32_t *seq_lens, int P,
              int64_t cap, int n_sel, int32_t *__restrict__ page_idx, int *counters) {
  __shared__ int hist[256];
  __shared__ int scan_smem[64];
  __shared__ uint32_t s_prefix;
  __shared__ int s_need;
  const int b = blockIdx.y, r = blockIdx.x, Hs = gridDim.x;
  const size_t row = (size_t)b * Hs + r;
  if (counters && threadIdx.x == 0) counters[row] = 0;  // for the attention that follows
  pdl_wait();  // scores come from the previous kernel
  const float *sc = scores + row * max_pages;
  int32_t *out = page_idx + row * n_sel;
  const int len = clamp_len(seq_lens, b, cap);
  const int np = n_pages_of(len, P);

  if (np <= n_sel) {
    for (int i = threadIdx.x; i < n_sel; i += blockDim.x) out[i] = i < np ? i : -1;
    return;
  }
  pdl_launch_dependents();
  const int m = np - 1;       // candidates 0..m-1; page m is always taken
  const int K = n_sel - 1;    // how many candidates to take (K < m)
  if (threadIdx.x == 0) out[n_sel - 1] = m;
  if (K == 0) return;

  // radix select: the K-th largest key
  uint32_t prefix = 0, mask = 0;
  int need = K;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    // warp-aggregated histogram: scores of similar magnitude share their top
    // bits, so plain shared atomics would serialise on one or two bins
    for (int base = 0; base < m; base += blockDim.x) {
      const int i = base + threadIdx.x;
      bool act = false;
      int bin = 0;
      if (i < m) {
        const uint32_t key = order_key(sc[i]);
        act = (key & mask) == prefix;
        bin = (key >> shift) & 0xFF;
      }
      const unsigned am = __ballot_sync(0xffffffffu, act);
      if (act) {
        const unsigned peers = __match_any_sync(am, bin);
        if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
      }
    }
    __syncthreads();
    // suffix sums over bins: thread t < 256 handles bin 255 - t
    int t = threadIdx.x;
    int v = t < 256 ? hist[255 - t] : 0;
    int total;
    int excl = block_exclusive_scan(v, scan_smem, &total);  // count of bins above 255-t
    if (t < 256 && excl < need && excl + v >= need) {
      s_prefix = prefix | ((uint32_t)(255 - t) << shift);
      s_need = need - excl;
    }
    __syncthreads();
    prefix = s_prefix;
    need = s_need;
    mask |= 0xFFu << shift;
    __syncthreads();
  }
  // compaction in index order: keys > prefix all taken; keys == prefix: the
  // first `need` of them by index.
  int taken_before = 0, eq_before = 0;
  for (int base = 0; base < m; base += blockDim.x) {
    const int i = base + threadIdx.x;
    uint32_t key = i < m ? order_key(sc[i]) : 0;
    int is_eq = (i < m && key == prefix) ? 1 : 0;
    int tot_eq;
    int eq_rank = eq_before + block_exclusive_scan(is_eq, scan_smem, &tot_eq);
    int take = (i < m) && (key > prefix || (is_eq && eq_rank < need)) ? 1 : 0;
    int tot_take;
    int pos = taken_before + block_exclusive_scan(take, scan_smem, &tot_take);
    if (take) out[pos] = i;
    taken_before += tot_take;
    eq_before += tot_eq;
  }
}

// Register-resident variant for up to SEL_THREADS * ITEMS candidate pages:
// every score is read once (all loads in flight together), and the four
// radix passes and the compaction run from registers. Thread t owns the
// contiguous candidates [t*ITEMS, (t+1)*ITEMS), so one block scan of per-thread
// counts yields positions in index order.
template <int ITEMS>
__global__ void __launch_bounds__(SEL_THREADS)
select_reg_kernel(const float *__restrict__ scores, int max_pages, const int32_t *seq_lens, int P,
                  int64_t cap, int n_sel, int32_t *__restrict__ page_idx, int *counters) {
  __shared__ int hist[256];
  __shared__ int scan_smem[64];
  __shared__ uint32_t s_prefix;
  __shared__ int s_need;
  const int b = blockIdx.y, r = blockIdx.x, Hs = gridDim.x;
  const size_t row = (size_t)b * Hs + r;
  if (counters && threadIdx.x == 0) counters[row] = 0;  // for the attention that follows
  pdl_wait();  // scores come from the previous kernel
  const float *sc = scores + row * max_pages;
  int32_t *out = page_idx + row * n_sel;
  const int len = clamp_len(seq_lens, b, cap);
  const int np = n_pages_of(len, P);
  if (np <= n_sel) {
    for (int i = threadIdx.x; i < n_sel; i += blockDim.x) out[i] = i < np ? i : -1;
    return;
  }
  const int m = np - 1, K = n_sel - 1;
  if (threadIdx.x == 0) out[n_sel - 1] = m;
  if (K == 0) return;
  const int i0 = threadIdx.x * ITEMS;
  uint32_t key[ITEMS];
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) key[j] = (i0 + j < m) ? order_key(__ldg(sc + i0 + j)) : 0u;
  pdl_launch_dependents();

  uint32_t prefix = 0, mask = 0;
  int need = K;
  const int lane = threadIdx.x & 31;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const bool act = (i0 + j < m) && (key[j] & mask) == prefix;
      const int bin = (key[j] >> shift) & 0xFF;
      const unsigned am = __ballot_sync(0xffffffffu, act);
      if (act) {
        const unsigned peers = __match_any_sync(am, bin);
        if (lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
      }
    }
    __syncthreads();
    const int t = threadIdx.x;
    const int v = t < 256 ? hist[255 - t] : 0;
    int total;
    const int excl = block_exclusive_scan(v, scan_smem, &total);
    if (t < 256 && excl < need && excl + v >= need) {
      s_prefix = prefix | ((uint32_t)(255 - t) << shift);
      s_need = need - excl;
    }
    __syncthreads();
    prefix = s_prefix;
    need = s_need;
    mask |= 0xFFu << shift;
  }
  int n_eq = 0;
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) n_eq += (i0 + j < m && key[j] == prefix) ? 1 : 0;
  int tot;
  int eq_rank = block_exclusive_scan(n_eq, scan_smem, &tot);
  int take_flags = 0, n_take = 0;
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const bool valid = i0 + j < m;
    const bool eq = valid && key[j] == prefix;
    const bool take = valid && (key[j] > prefix || (eq && eq_rank < need));
    eq_rank += eq ? 1 : 0;
    if (take) { take_flags |= 1 << j; ++n_take; }
  }
  int pos = block_exclusive_scan(n_take, scan_smem, &tot);
#pragma unroll
  for (int j = 0; j < ITEMS; ++j)
    if (take_flags & (1 << j)) out[pos++] = i0 + j;
}


// Picks the register-resident select for up to 16K candidate pages, else the
// general one that streams the scores from L2 on every pass.
void launch_select(const float *scores, int64_t B, int64_t Hs, int64_t max_pages,
                   const int32_t *seq_lens, int64_t P, int64_t cap, int64_t n_sel, int32_t *pidx,
                   int *counters, cudaStream_t st, bool pdl) {
  dim3 grid((unsigned)Hs, (unsigned)B);
  const int64_t m = max_pages;  // upper bound on the candidates of any row
#define KS_SEL(IT)                                                                           \
  launch_kernel(pdl, select_reg_kernel<IT>, grid, dim3(SEL_THREADS), st, scores, (int)max_pages,  \
                seq_lens, (int)P, cap, (int)n_sel, pidx, counters)
  if (m <= SEL_THREADS * 1) KS_SEL(1);
  else if (m <= SEL_THREADS * 2) KS_SEL(2);
  else if (m <= SEL_THREADS * 4) KS_SEL(4);
  else if (m <= SEL_THREADS * 8) KS_SEL(8);
  else if (m <= SEL_THREADS * 16) KS_SEL(16);
  else
    launch_kernel(pdl, select_kernel, grid, dim3(SEL_THREADS), st, scores, (int)max_pages,
                  seq_lens, (int)P, cap, (int)n_sel, pidx, counters);
#undef KS_SEL
}

// ------------------------------------------------------------ attention ----
constexpr int AT_WARPS = 4;
constexpr int AT_U = 4;  // load steps in flight per warp

template <typename T, int D, int MAXG>
__global__ void __launch_bounds__(AT_WARPS * 32)
attn_kernel(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
            int H, int Hkv, int64_t cap, const int32_t *__restrict__ page_idx, int n_sel,
            const int32_t *seq_lens, int P, float scale_log2, int pages_per_split,
            float *__restrict__ part, int *counters, T *__restrict__ out) {
  constexpr int LPT = Lanes<D>::N;  // lanes per token
  constexpr int CH = Lanes<D>::CH;  // lanes c < CH hold channels; the others zeros
  constexpr int TPS = 32 / LPT;     // tokens per warp step (1 at D = 256)
  // load steps in flight: 16 tokens of fp16/bf16 (a whole default page at D=128)
  constexpr int U = (sizeof(T) == 2 && MAXG <= 4) ? 8 : AT_U;
  const int b = blockIdx.z, r = blockIdx.y, Hs = gridDim.y, split = blockIdx.x;
  const int nsplit = gridDim.x;
  const int G = H / Hkv;
  const int qh = (Hs == H) ? 1 : G;           // query heads in this row
  const int h0 = (Hs == H) ? r : r * G;       // first query head
  const int hk = (Hs == H) ? r / G : r;       // kv head
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c = lane % LPT, sub = lane / LPT;
  const int len = clamp_len(seq_lens, b, cap);

  float qv[MAXG][8];
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    if (g < qh && c < CH) {
      Vec8<T>::load(q + ((size_t)b * H + h0 + g) * D + c * 8, qv[g]);
#pragma unroll
      for (int i = 0; i < 8; ++i) qv[g][i] *= scale_log2;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) qv[g][i] = 0.f;
    }
  }
  float mrun[MAXG], lrun[MAXG], acc[MAXG][8];
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    mrun[g] = -CUDART_INF_F; lrun[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
  }

  const size_t kv_base = ((size_t)b * Hkv + hk) * cap;
  pdl_wait();  // page indices and counters come from the selection kernel
  const int32_t *pidx = page_idx + ((size_t)b * Hs + r) * n_sel;
  const int e_begin = split * pages_per_split;
  const int e_end = min(n_sel, e_begin + pages_per_split);
  for (int e = e_begin + warp; e < e_end; e += AT_WARPS) {
    const int p = pidx[e];
    if (p < 0) continue;
    const int t_begin = p * P;
    const int t_end = min(t_begin + P, len);
    for (int t0 = t_begin; t0 < t_end; t0 += TPS * U) {
      // issue every K and V load of this chunk before the first use
      typename Vec8<T>::Raw kr[U], vr[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int t = t0 + u * TPS + sub;
        if (t < t_end && c < CH) {
          Vec8<T>::load_raw(k + (kv_base + t) * D + c * 8, kr[u]);
          Vec8<T>::load_raw(v + (kv_base + t) * D + c * 8, vr[u]);
        } else {
          Vec8<T>::zero_raw(kr[u]);
          Vec8<T>::zero_raw(vr[u]);
        }
      }
      float s[MAXG][U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float kx[8];
        Vec8<T>::cvt(kr[u], kx);
        const int t = t0 + u * TPS + sub;
#pragma unroll
        for (int g = 0; g < MAXG; ++g) {
          float d = 0.f;
#pragma unroll
          for (int i = 0; i < 8; ++i) d = fmaf(qv[g][i], kx[i], d);
#pragma unroll
          for (int o = LPT / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
          s[g][u] = t < t_end ? d : -CUDART_INF_F;
        }
      }
#pragma unroll
      for (int g = 0; g < MAXG; ++g) {
        if (g >= qh) break;
        float smax = -CUDART_INF_F;
#pragma unroll
        for (int u = 0; u < U; ++u) smax = fmaxf(smax, s[g][u]);
        const float mnew = fmaxf(mrun[g], smax);
        if (mnew == -CUDART_INF_F) {  // no finite logit yet: mark -inf / NaN ones (ks_cuda.cuh)
#pragma unroll
          for (int u = 0; u < U; ++u)
            if (t0 + u * TPS + sub < t_end) lrun[g] += ninf_mark(s[g][u]);
          continue;
        }
        const float corr = exp2f(mrun[g] - mnew);
        lrun[g] *= corr;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] *= corr;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const float pr = exp2f(s[g][u] - mnew);
          lrun[g] += pr;
          float vx[8];
          Vec8<T>::cvt(vr[u], vx);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(pr, vx[i], acc[g][i]);
        }
        mrun[g] = mnew;
      }
    }
  }

  // merge the TPS token sub-groups of the warp (lanes with the same c)
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
#pragma unroll
    for (int o = LPT; o < 32; o <<= 1) {
      const float mo = __shfl_xor_sync(0xffffffffu, mrun[g], o);
      const float lo = __shfl_xor_sync(0xffffffffu, lrun[g], o);
      const float mnew = fmaxf(mrun[g], mo);
      const float ca = merge_w(mrun[g], mnew);  // both 1 at mnew == -inf: acc is 0 there
      const float cb = merge_w(mo, mnew);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[g][i], o);
        acc[g][i] = acc[g][i] * ca + ao * cb;
      }
      lrun[g] = lrun[g] * ca + lo * cb;
      mrun[g] = mnew;
    }
  }

  // merge the warps through shared memory
  __shared__ float s_m[AT_WARPS][MAXG], s_l[AT_WARPS][MAXG];
  __shared__ float s_acc[AT_WARPS][MAXG][D];
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      if (c < CH) {
#pragma unroll
        for (int i = 0; i < 8; ++i) s_acc[warp][g][c * 8 + i] = acc[g][i];
      }
      if (c == 0) { s_m[warp][g] = mrun[g]; s_l[warp][g] = lrun[g]; }
    }
  }
  __syncthreads();
  // thread layout for the block-level merge: (g, d) pairs
  float *my_part = part + (((size_t)b * Hs + r) * nsplit + split) * (size_t)MAXG * (D + 2);
  for (int idx = threadIdx.x; idx < qh * D; idx += blockDim.x) {
    const int g = idx / D, d = idx % D;
    float M = -CUDART_INF_F;
#pragma unroll
    for (int w = 0; w < AT_WARPS; ++w) M = fmaxf(M, s_m[w][g]);
    float L = 0.f, A = 0.f;
    if (M != -CUDART_INF_F) {
#pragma unroll
      for (int w = 0; w < AT_WARPS; ++w) {
        const float cw = exp2f(s_m[w][g] - M);
        L += s_l[w][g] * cw;
        A += s_acc[w][g][d] * cw;
      }
    } else {  // -inf / NaN marks only (ks_cuda.cuh)
#pragma unroll
      for (int w = 0; w < AT_WARPS; ++w) L += s_l[w][g];
    }
    if (nsplit == 1) {
      // single split: finish here
      out[((size_t)b * H + h0 + g) * D + d] = from_f<T>(finish(A, M, L));
    } else {
      my_part[g * (D + 2) + d] = A;
      if (d == 0) { my_part[g * (D + 2) + D] = M; my_part[g * (D + 2) + D + 1] = L; }
    }
  }
  if (nsplit == 1) return;

  // the last split of this row to finish merges all splits
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int done = atomicAdd(&counters[(size_t)b * Hs + r], 1);
    s_last = (done == nsplit - 1);
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const float *row_part = part + ((size_t)b * Hs + r) * nsplit * (size_t)MAXG * (D + 2);
  constexpr int MAXS = 64;  // splits merged through shared memory at a time
  __shared__ float s_w[MAXS][MAXG];
  __shared__ float s_M[MAXG];
  // global max per query head (each warp computes it; thread 0 stores it)
  for (int g = 0; g < qh; ++g) {
    float M = -CUDART_INF_F;
    for (int sp = lane; sp < nsplit; sp += 32)
      M = fmaxf(M, __ldcg(row_part + ((size_t)sp * MAXG + g) * (D + 2) + D));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    if (threadIdx.x == 0) s_M[g] = M;
  }
  __syncthreads();
  // weights of the splits, chunk by chunk; every thread accumulates its
  // (g, d) outputs (at most PER of them: blockDim * PER >= MAXG * D >= qh * D)
  constexpr int PER = (MAXG * D + AT_WARPS * 32 - 1) / (AT_WARPS * 32);
  __shared__ float s_L[MAXG];
  if (threadIdx.x < MAXG) s_L[threadIdx.x] = 0.f;
  float A[PER];
#pragma unroll
  for (int it = 0; it < PER; ++it) A[it] = 0.f;
  for (int c0 = 0; c0 < nsplit; c0 += MAXS) {
    const int nc = min(MAXS, nsplit - c0);
    __syncthreads();
    for (int i = threadIdx.x; i < nc * qh; i += blockDim.x) {
      const int sp = i / qh, gg = i % qh;
      const float *ps = row_part + ((size_t)(c0 + sp) * MAXG + gg) * (D + 2);
      const float ms = __ldcg(ps + D);
      s_w[sp][gg] = merge_w(ms, s_M[gg]);
    }
    __syncthreads();
    if (threadIdx.x < qh) {
      float L = 0.f;
      for (int sp = 0; sp < nc; ++sp)
        L = fmaf(s_w[sp][threadIdx.x],
                 __ldcg(row_part + ((size_t)(c0 + sp) * MAXG + threadIdx.x) * (D + 2) + D + 1), L);
      s_L[threadIdx.x] += L;
    }
#pragma unroll
    for (int it = 0; it < PER; ++it) {
      const int idx = it * blockDim.x + threadIdx.x;
      if (idx < qh * D) {
        const int g = idx / D, d = idx % D;
        float acc_it = 0.f;
#pragma unroll 8
        for (int sp = 0; sp < nc; ++sp)
          acc_it = fmaf(s_w[sp][g], __ldcg(row_part + ((size_t)(c0 + sp) * MAXG + g) * (D + 2) + d), acc_it);
        A[it] += acc_it;
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int it = 0; it < PER; ++it) {
    const int idx = it * blockDim.x + threadIdx.x;
    if (idx < qh * D) {
      const int g = idx / D, d = idx % D;
      out[((size_t)b * H + h0 + g) * D + d] = from_f<T>(finish(A[it], s_M[g], s_L[g]));
    }
  }
  if (threadIdx.x == 0) counters[(size_t)b * Hs + r] = 0;  // ready for reuse
}

// ---------------------------------------------------------- dispatching ----

int maxg_bucket(int g) { return g <= 1 ? 1 : g <= 2 ? 2 : g <= 4 ? 4 : g <= 8 ? 8 : 16; }

int attn_pages_per_split(int64_t B, int64_t Hs, int64_t n_sel) {
  // one page per warp gives the most parallelism; grow the split while the
  // grid would still fill the GPU many times over (fewer partials to merge)
  int pps = AT_WARPS;
  while (pps < 64 && B * Hs * ((n_sel + pps - 1) / pps) > 2048) pps *= 2;
  return pps;
}

size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

template <typename T, int D>
int launch_attn_t(const void *q, const void *k, const void *v, int64_t B, int64_t H, int64_t Hkv,
                  int64_t cap, const int32_t *page_idx, int64_t Hs, int64_t n_sel,
                  const int32_t *seq_lens, int64_t P, float scale, float *part, int *counters,
                  void *out, cudaStream_t st, bool pdl) {
  const int qh = (Hs == H) ? 1 : (int)(H / Hkv);
  const int pps = attn_pages_per_split(B, Hs, n_sel);
  const int nsplit = (int)((n_sel + pps - 1) / pps);
  dim3 grid(nsplit, (unsigned)Hs, (unsigned)B);
  const float sl = scale * kLog2e;
#define KS_ATTN(MG)                                                                            \
  launch_kernel(pdl, attn_kernel<T, D, MG>, grid, dim3(AT_WARPS * 32), st, (const T *)q,       \
                (const T *)k, (const T *)v, (int)H, (int)Hkv, cap, page_idx, (int)n_sel,       \
                seq_lens, (int)P, sl, pps, part, counters, (T *)out)
  switch (maxg_bucket(qh)) {
    case 1: KS_ATTN(1); break;
    case 2: KS_ATTN(2); break;
    case 4: KS_ATTN(4); break;
    case 8: KS_ATTN(8); break;
    default: return (int)cudaErrorInvalidValue;  // G > 8 not supported in group mode
  }
#undef KS_ATTN
  return (int)cudaGetLastError();
}

template <typename T>
int launch_attn(int64_t D, const void *q, const void *k, const void *v, int64_t B, int64_t H,
                int64_t Hkv, int64_t cap, const int32_t *page_idx, int64_t Hs, int64_t n_sel,
                const int32_t *seq_lens, int64_t P, float scale, float *part, int *counters,
                void *out, cudaStream_t st, bool pdl) {
#define KS_AT_D(DD)                                                                            \
  case DD:                                                                                     \
    return launch_attn_t<T, DD>(q, k, v, B, H, Hkv, cap, page_idx, Hs, n_sel, seq_lens, P,     \
                                scale, part, counters, out, st, pdl);
  switch (D) {
    KS_AT_D(64) KS_AT_D(80) KS_AT_D(96) KS_AT_D(128) KS_AT_D(256)
    default: return (int)cudaErrorInvalidValue;
  }
#undef KS_AT_D
}

template <typename T, int D>
int launch_scores_t(const void *q, const void *kmin, const void *kmax, int64_t B, int64_t H,
                    int64_t Hkv, int64_t max_pages, const int32_t *seq_lens, int64_t P,
                    int64_t cap, int group_mode, float *scores, cudaStream_t st) {
  constexpr int PPB = (SC_THREADS / Lanes<D>::N) * sc_ppt<T>();
  const int G = (int)(H / Hkv);
  dim3 grid((unsigned)((max_pages + PPB - 1) / PPB), (unsigned)Hkv, (unsigned)B);
#define KS_SC(MG)                                                                              \
  scores_kernel<T, D, MG><<<grid, SC_THREADS, 0, st>>>(                                        \
      (const T *)q, (const T *)kmin, (const T *)kmax, (int)H, G, (int)max_pages, seq_lens,     \
      (int)P, cap, group_mode, scores)
  switch (maxg_bucket(G)) {
    case 1: KS_SC(1); break;
    case 2: KS_SC(2); break;
    case 4: KS_SC(4); break;
    case 8: KS_SC(8); break;
    case 16: KS_SC(16); break;
    default: return (int)cudaErrorInvalidValue;
  }
#undef KS_SC
  return (int)cudaGetLastError();
}

template <typename T>
int launch_scores(int64_t D, const void *q, const void *kmin, const void *kmax, int64_t B,
                  int64_t H, int64_t Hkv, int64_t max_pages, const int32_t *seq_lens, int64_t P,
                  int64_t cap, int group_mode, float *scores, cudaStream_t st) {
#define KS_SC_D(DD)                                                                            \
  case DD:                                                                                     \
    return launch_scores_t<T, DD>(q, kmin, kmax, B, H, Hkv, max_pages, seq_lens, P, cap,       \
                                  group_mode, scores, st);
  switch (D) {
    KS_SC_D(64) KS_SC_D(80) KS_SC_D(96) KS_SC_D(128) KS_SC_D(256)
    default: return (int)cudaErrorInvalidValue;
  }
#undef KS_SC_D
}

template <typename T>
int launch_metadata(const void *k, int64_t B, int64_t Hkv, int64_t cap, int64_t D,
                    const int32_t *start_lens, const int32_t *seq_lens, int64_t P,
                    int64_t max_pages, void *kmin, void *kmax, cudaStream_t st) {
  const int threads = 256;
  dim3 grid((unsigned)((max_pages * (D / 8) + threads - 1) / threads), (unsigned)Hkv, (unsigned)B);
#define KS_MD_D(DD)                                                                            \
  case DD:                                                                                     \
    metadata_kernel<T, DD><<<grid, threads, 0, st>>>((const T *)k, cap, start_lens, seq_lens,  \
                                                     (int)P, (int)max_pages, (T *)kmin,        \
                                                     (T *)kmax);                               \
    break;
  switch (D) {
    KS_MD_D(64) KS_MD_D(80) KS_MD_D(96) KS_MD_D(128) KS_MD_D(256)
    default: return (int)cudaErrorInvalidValue;
  }
#undef KS_MD_D
  return (int)cudaGetLastError();
}

}  // namespace

#define KS_DISPATCH(dt, FN, ...)                                      \
  ((dt) == KS_F32    ? FN<float>(__VA_ARGS__)                         \
   : (dt) == KS_F16  ? FN<__half>(__VA_ARGS__)                        \
   : (dt) == KS_BF16 ? FN<__nv_bfloat16>(__VA_ARGS__)                 \
                     : (int)cudaErrorInvalidValue)

extern "C" {

int ks_quest_page_metadata_cuda(const void *k, ks_dtype dt, int64_t B, int64_t Hkv, int64_t cap,
                                int64_t D, const int32_t *start_lens, const int32_t *seq_lens,
                                int64_t page_size, int64_t max_pages, void *kmin, void *kmax,
                                void *stream) {
  if (B == 0 || Hkv == 0 || max_pages == 0) return 0;
  return KS_DISPATCH(dt, launch_metadata, k, B, Hkv, cap, D, start_lens, seq_lens, page_size,
                     max_pages, kmin, kmax, (cudaStream_t)stream);
}

int ks_quest_page_scores_cuda(const void *q, const void *kmin, const void *kmax, ks_dtype dt,
                              int64_t B, int64_t H, int64_t Hkv, int64_t max_pages, int64_t D,
                              const int32_t *seq_lens, int64_t page_size, int group_mode,
                              float *scores, void *stream) {
  if (B == 0 || H == 0 || max_pages == 0) return 0;
  // cap only bounds seq_lens; metadata covers max_pages * page_size tokens
  const int64_t cap = max_pages * page_size;
  return KS_DISPATCH(dt, launch_scores, D, q, kmin, kmax, B, H, Hkv, max_pages, seq_lens,
                     page_size, cap, group_mode, scores, (cudaStream_t)stream);
}

int ks_quest_select_pages_cuda(const float *scores, int64_t B, int64_t Hs, int64_t max_pages,
                               const int32_t *seq_lens, int64_t page_size, int64_t n_sel,
                               int32_t *page_idx, void *stream) {
  if (B == 0 || Hs == 0 || n_sel == 0) return 0;
  launch_select(scores, B, Hs, max_pages, seq_lens, page_size, max_pages * page_size, n_sel,
                page_idx, nullptr, (cudaStream_t)stream, false);
  return (int)cudaGetLastError();
}

size_t ks_quest_sparse_attention_cuda_workspace(int64_t B, int64_t H, int64_t D, int64_t n_sel,
                                                int64_t page_size) {
  (void)page_size;
  const int64_t max_splits = (n_sel + AT_WARPS - 1) / AT_WARPS;
  // partials: per (b, row, split) MAXG*(D+2) floats; rows*MAXG <= H*8 covers both modes
  const size_t part = (size_t)B * H * 8 * max_splits * (D + 2) * sizeof(float);
  const size_t counters = (size_t)B * H * sizeof(int);
  return align256(counters) + align256(part);
}

int ks_quest_sparse_attention_cuda(const void *q, const void *k, const void *v, ks_dtype dt,
                                   int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                                   const int32_t *page_idx, int64_t Hs, int64_t n_sel,
                                   const int32_t *seq_lens, int64_t page_size, float scale,
                                   void *workspace, void *out, void *stream) {
  if (B == 0 || H == 0) return 0;
  cudaStream_t st = (cudaStream_t)stream;
  int *counters = (int *)workspace;
  float *part = (float *)((char *)workspace + align256((size_t)B * H * sizeof(int)));
  cudaError_t e = cudaMemsetAsync(counters, 0, (size_t)B * Hs * sizeof(int), st);
  if (e != cudaSuccess) return (int)e;
  return KS_DISPATCH(dt, launch_attn, D, q, k, v, B, H, Hkv, cap, page_idx, Hs, n_sel, seq_lens,
                     page_size, scale, part, counters, out, st, false);
}

size_t ks_quest_attention_cuda_workspace(int64_t B, int64_t H, int64_t Hkv, int64_t D,
                                         int64_t max_pages, int64_t n_sel, int64_t page_size,
                                         int group_mode) {
  const int64_t Hs = group_mode ? Hkv : H;
  return align256((size_t)B * Hs * max_pages * sizeof(float)) +
         align256((size_t)B * Hs * n_sel * sizeof(int32_t)) +
         ks_quest_sparse_attention_cuda_workspace(B, H, D, n_sel, page_size);
}

int ks_quest_attention_cuda(const void *q, const void *k, const void *v, const void *kmin,
                            const void *kmax, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                            int64_t cap, int64_t D, int64_t max_pages, const int32_t *seq_lens,
                            int64_t page_size, int64_t n_sel, int group_mode, float scale,
                            void *workspace, void *out, void *stream) {
  if (B == 0 || H == 0) return 0;
  cudaStream_t st = (cudaStream_t)stream;
  const int64_t Hs = group_mode ? Hkv : H;
  char *ws = (char *)workspace;
  float *scores = (float *)ws;
  ws += align256((size_t)B * Hs * max_pages * sizeof(float));
  int32_t *pidx = (int32_t *)ws;
  ws += align256((size_t)B * Hs * n_sel * sizeof(int32_t));
  int *counters = (int *)ws;
  float *part = (float *)(ws + align256((size_t)B * H * sizeof(int)));

  int rc = KS_DISPATCH(dt, launch_scores, D, q, kmin, kmax, B, H, Hkv, max_pages, seq_lens,
                       page_size, cap, group_mode, scores, st);
  if (rc) return rc;
  const bool pdl = pdl_enabled();
  launch_select(scores, B, Hs, max_pages, seq_lens, page_size, cap, n_sel, pidx, counters, st, pdl);
  rc = (int)cudaGetLastError();
  if (rc) return rc;
  return KS_DISPATCH(dt, launch_attn, D, q, k, v, B, H, Hkv, cap, pidx, Hs, n_sel, seq_lens,
                     page_size, scale, part, counters, out, st, pdl);
}

}  // extern "C"
