// QAQ kernels for NVIDIA GPUs (CUDA C). Semantics and storage layout: qaq.h.
//
// No torch, no Python: raw device pointers, sizes, and a cudaStream_t. No
// kernel reads a value on the host, so every entry point is graph-capturable
// (the attention workspace is sized from shapes only).
//
//   bits         one thread per (sequence, group, token); float64 formulas
//   quantize     one thread block per (sequence, group, new token): outlier
//                picks by warp-parallel sorting networks, a block reduction for
//                the range, codes packed a whole 32-bit word per thread
//                (interleaved order); see the quantize section
//   dequantize   one thread per output element
//   requantize   one thread block per group; the old codes are staged in
//                shared memory before the new words overwrite them
//   attention    one split-K kernel over (splits, KV heads, sequences) on
//                tensor cores: all G <= 8 query heads of a KV head per block,
//                16 tokens per warp step, dot products in code space, online
//                softmax, last-block merge of the splits (fixed order:
//                deterministic); p_max: the kernel stores the log2-logits and
//                a light kernel normalizes them (see the attention section).
// Arithmetic that decides codes uses IEEE-rounded intrinsics (__fdiv_rn,
// __fadd_rn, __fmul_rn), unaffected by --use_fast_math and never contracted
// into FMAs, so codes, scales and dequantized values equal the CPU's bit for bit.
//
// Head dims: bits, quantize, dequantize and requantize loop over the group at
// run time (any D). The attention takes D in {64, 96, 128, 256}
// (qa_head_dim_ok; QaDim below): its lanes read whole 32-bit code words of
// D/4 (K) and D/8 (V) elements, and a head's codes start on a word boundary
// at every width, which needs D % 32 == 0. D = 96 runs the D = 128 tiles
// (DP = 128): q is zero past D (padded K elements add 0 to every logit), the
// padded V rows are computed from whatever the staging area holds there and
// never stored, and every copy, offset and record uses the real D, so memory
// stays D-contiguous. D = 80 is not taken: at width 1 its 80 codes end in a
// partial word (plain order, not the interleaved one) and a head of a shared
// group starts mid-word. D = 256 moves the per-warp sums to dynamic shared
// memory (static shared memory is limited to 48 KiB) and is built for one
// block per SM (its shared memory allows no more; up to 255 registers).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>
#include <stdint.h>
#include <stdlib.h>

#include "ks_cuda.cuh"
#include "qaq.h"

namespace {

using ks_cuda::finish;
using ks_cuda::from_f;
using ks_cuda::merge_splits;
using ks_cuda::to_f;
using ks_cuda::warp_max;
using ks_cuda::warp_sum;


__device__ __forceinline__ float h2f(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ uint16_t f2h(float f) { return __half_as_ushort(__float2half_rn(f)); }

__device__ __forceinline__ int64_t clamp_len(int32_t len, int64_t cap) {
  return len < 0 ? 0 : (len > cap ? cap : (int64_t)len);
}

__device__ __forceinline__ bool valid_w(int w) { return w == 1 || w == 2 || w == 4 || w == 8; }

__device__ __forceinline__ int eff_w(int w, int64_t off, int64_t E, int64_t A) {
  if (!valid_w(w)) return 0;
  return (off >= 0 && off + E * w / 8 <= A) ? w : 0;
}

// dequantized element e of a group (codes may be null when w == 0)
__device__ __forceinline__ float deq(const uint8_t *codes, int w, float s, float z, int64_t e,
                                     int64_t E) {
  if (w == 0) return __fadd_rn(z, __fmul_rn(s, 0.5f));
  const int64_t bit = ks_qaq_code_bit(e, w, E);
  const unsigned c = (codes[bit >> 3] >> (bit & 7)) & ((1u << w) - 1u);
  return __fadd_rn(z, __fmul_rn(s, (float)c));
}

__device__ __forceinline__ unsigned code_of(float x, float sf, float zf, int w) {
  const float maxc = (float)((1 << w) - 1);
  float r = sf > 0.f ? floorf(__fadd_rn(__fdiv_rn(__fsub_rn(x, zf), sf), 0.5f)) : 0.f;
  r = r >= 0.f ? r : 0.f;
  r = r > maxc ? maxc : r;
  return (unsigned)r;
}

// Packs the codes of a group with the block's threads, one whole 32-bit word
// per thread at a time (see "Codes" in qaq.h: interleaved order in whole words,
// plain order in a final partial word); code(e) gives element e's code. A word
// whose 4 bytes are 4-byte aligned is one store, any other (a partial final
// word, an unaligned group) byte stores of the group's own bytes only.
template <typename F>
__device__ __forceinline__ void pack_words(uint8_t *codes, int E, int w, F code) {
  const int n = 32 / w, nbytes = E * w / 8, nwords = (E + n - 1) / n;
  const bool aligned = (reinterpret_cast<uintptr_t>(codes) & 3) == 0;
  for (int j = threadIdx.x; j < nwords; j += blockDim.x) {
    const bool whole = (j + 1) * n <= E;
    uint32_t word = 0;
    for (int i = 0; i < n && j * n + i < E; ++i) {
      const int s = whole ? (i >> 1) + (i & 1) * (n >> 1) : i;
      word |= code(j * n + i) << (s * w);
    }
    if (whole && aligned) {
      *reinterpret_cast<uint32_t *>(codes + 4 * j) = word;
    } else {
      for (int q = 0; q < 4 && 4 * j + q < nbytes; ++q) codes[4 * j + q] = (uint8_t)(word >> (8 * q));
    }
  }
}

// ------------------------------------------------------------------ bits ----

__device__ __forceinline__ int round_up_w(double bt, int mask) {
  int hi = 0;
  for (int w = 8; w >= 0; --w)
    if (mask & (1 << w)) { hi = w; break; }
  if (bt != bt) return hi;
  for (int w = 0; w <= 8; ++w)
    if ((mask & (1 << w)) && (double)w >= bt) return w;
  return hi;
}

__global__ void k_bits(const float *rng, const float *q_sq, const float *s_max, int is_key,
                       int64_t B, int64_t Hg, int64_t cap, const int32_t *seq_lens, double sigma,
                       int mask, int64_t n_recent, uint8_t *widths) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= B * Hg * cap) return;
  const int64_t bg = i / cap, t = i % cap, b = bg / Hg;
  const int64_t len = clamp_len(seq_lens[b], cap);
  const double T = (double)len;
  if (t >= len) { widths[i] = 0; return; }
  if (t >= len - n_recent) { widths[i] = (uint8_t)round_up_w(CUDART_NAN, mask); return; }
  double sg;
  if (is_key)
    sg = sqrt(log(T * T * T / (T - 1.0) * sigma * sigma + 1.0) / (double)q_sq[bg]);
  else
    sg = sigma / (sqrt(T) * (double)s_max[i]);
  const double bt = ceil(log2((double)rng[i] / (2.0 * sqrt(3.0) * sg)));
  widths[i] = (uint8_t)round_up_w(bt, mask);
}

// -------------------------------------------------------------- quantize ----
//
// quantize and requantize give each group one thread block of qq_threads(E)
// threads (64 .. QQ_NT, a multiple of 64: an even number of warps); a grid of
// at most QQ_GRID blocks strides over the groups. Shared memory: a bit mask of
// the group's outliers (E bits, dynamic), per-warp key lists (static) and, for
// requantize, the group's old code bytes (dynamic, E bytes at most), all sized
// from shapes (< 48 KiB for E <= 32768: no opt-in, graph-capturable).
//
// Outlier selection (qaq.h "Quantization") ranks element e by the key
// rank << 16 | e, distinct per element: rank = ks_qaq_rank_key of the float32
// value (64-bit keys, float32 caches) or, for fp16 / bf16 caches, a 16-bit
// rank of the value's own bits in the same order (32-bit keys: NaN 0, -0 as
// +0, numbers monotone), so both kernels pick exactly the CPU's elements.
// The n_side smallest keys of a pass are found as follows: each warp keeps
// the 32 smallest keys of its share of the elements as a list sorted across
// its lanes (lane i holds the i-th). It first takes each lane's smallest key
// and sorts those 32 (bitonic, over shuffles); the kk-th of them bounds the
// warp's kk-th smallest key from above (kk lanes hold a key at most that
// large), so only keys up to that bound are candidates: they are gathered 32
// at a time in shared memory (ballot), sorted and merged into the list
// (bitonic merge of the list with the reversed batch). The first warp of the
// pass then merges the other warps' lists the same way. With n_side <= 16 the
// two passes run at once, the first half of the warps on the ascending one,
// the second half on the descending one over all elements, keeping its 2 n_side
// first keys (at most n_side of them are low outliers, dropped afterwards: the
// first n_side others are the high outliers); with 16 < n_side <= 32 every warp
// runs the ascending pass, then the descending one over the non-outliers.
// mn / mx: per-thread minimum / maximum of ks_qaq_ord keys and a NaN flag,
// reduced over the block (order-independent: bit-identical to the CPU).

#define QQ_MAX_OUT 64
#define QQ_NT 256               // most threads per block (quantize / requantize)
#define QQ_WMAX (QQ_NT / 32)
#define QQ_GRID (1 << 16)       // most blocks per launch (they stride over the groups)
#define QQ_RQ_ITEMS 32          // groups a requantize block examines at a time (one warp's lanes)
#define QQ_FULL 0xffffffffu

// key type, raw element bits and value of a cache dtype (see above)
template <typename T> struct QqKey;
template <> struct QqKey<float> {
  using K = unsigned long long;
  using R = uint32_t;
  static constexpr K NONE = ~0ull;
  static __device__ __forceinline__ R ld(const R *p) { return __ldg(p); }
  static __device__ __forceinline__ float val(R r) { return __uint_as_float(r); }
  static __device__ __forceinline__ K key(R r, int e, bool high) {
    return ((K)ks_qaq_rank_key(r, high ? 1 : 0) << 16) | (K)e;
  }
};
// 16-bit floats: INF is the bits of +inf (NaN above it)
template <uint32_t INF> struct QqKey16 {
  using K = uint32_t;
  using R = uint16_t;
  static constexpr K NONE = ~0u;
  static __device__ __forceinline__ R ld(const R *p) { return __ldg(p); }
  static __device__ __forceinline__ K key(R r, int e, bool high) {
    const uint32_t a = r & 0x7fffu;
    if (a > INF) return (K)e;  // NaN: rank 0
    const uint32_t v = a == 0 ? 0u : (uint32_t)r;  // -0 ties with +0
    uint32_t o = (v & 0x8000u) ? (~v & 0xffffu) : (v | 0x8000u);
    if (high) o = ~o & 0xffffu;
    return (o << 16) | (K)e;
  }
};
template <> struct QqKey<__half> : QqKey16<0x7c00u> {
  static __device__ __forceinline__ float val(R r) { return h2f(r); }
};
template <> struct QqKey<__nv_bfloat16> : QqKey16<0x7f80u> {
  static __device__ __forceinline__ float val(R r) { return __uint_as_float((uint32_t)r << 16); }
};

template <typename K> __device__ __forceinline__ K kmin(K a, K b) { return a < b ? a : b; }
template <typename K> __device__ __forceinline__ K kmax(K a, K b) { return a < b ? b : a; }

// bitonic sort of one key per lane: lane i gets the i-th smallest
template <typename K> __device__ __forceinline__ K warp_sort(K v, int lane) {
#pragma unroll
  for (int k = 2; k <= 32; k <<= 1)
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1) {
      const K o = __shfl_xor_sync(QQ_FULL, v, j);
      v = (((lane & j) == 0) == ((lane & k) == 0)) ? kmin(v, o) : kmax(v, o);
    }
  return v;
}

// the 32 smallest of two sorted lists, sorted: a[lane] and b[31 - lane]
// (min(a[i], b[31 - i]) holds them as a bitonic sequence, then a bitonic merge)
template <typename K> __device__ __forceinline__ K warp_merge(K a, K b_rev, int lane) {
  K v = kmin(a, b_rev);
#pragma unroll
  for (int j = 16; j > 0; j >>= 1) {
    const K o = __shfl_xor_sync(QQ_FULL, v, j);
    v = (lane & j) ? kmax(v, o) : kmin(v, o);
  }
  return v;
}

// merges up to 32 keys buf[0 .. nb) into the sorted list (whole warp)
template <typename K> __device__ __forceinline__ K warp_merge_buf(K list, const K *buf, int nb, K none,
                                                                int lane) {
  const K s = warp_sort(lane < nb ? buf[lane] : none, lane);
  return warp_merge(list, __shfl_sync(QQ_FULL, s, 31 - lane), lane);
}

// One warp: the sorted list of the 32 smallest keys (NONE past the number of
// elements) of elements e = e0 + lane, e0 = first, first + step, ... < E,
// exact in its first kk (1 <= kk <= 32) entries; key(e) gives a key or NONE
// (excluded); buf: 32 keys of the warp's shared memory. Whole warp; step and
// first multiples of 32.
template <typename Q, typename KeyF>
__device__ __forceinline__ typename Q::K warp_top(int E, int first, int step, int kk, KeyF key,
                                                  typename Q::K *buf) {
  using K = typename Q::K;
  const int lane = threadIdx.x & 31;
  K lm = Q::NONE;
  for (int e0 = first; e0 < E; e0 += step)
    if (e0 + lane < E) lm = kmin(lm, key(e0 + lane));
  const K bound = __shfl_sync(QQ_FULL, warp_sort(lm, lane), kk - 1);
  K list = Q::NONE;
  int nb = 0;
  for (int e0 = first; e0 < E; e0 += step) {
    const K c = e0 + lane < E ? key(e0 + lane) : Q::NONE;
    const bool want = c != Q::NONE && c <= bound;
    const unsigned bal = __ballot_sync(QQ_FULL, want);
    const int cnt = __popc(bal);
    if (nb + cnt > 32) {
      __syncwarp();
      list = warp_merge_buf(list, buf, nb, Q::NONE, lane);
      nb = 0;
      __syncwarp();
    }
    if (want) buf[nb + __popc(bal & ((1u << lane) - 1u))] = c;
    nb += cnt;
  }
  __syncwarp();
  if (nb > 0) list = warp_merge_buf(list, buf, nb, Q::NONE, lane);
  __syncwarp();
  return list;
}

// block-wide minimum / maximum of the ord keys and or of the NaN flags (all
// threads get them); red: 3 x QQ_WMAX words of shared memory. Contains
// __syncthreads: call uniformly.
__device__ __forceinline__ void block_range(uint32_t &mn, uint32_t &mx, uint32_t &nan,
                                            uint32_t (*red)[QQ_WMAX]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  mn = __reduce_min_sync(QQ_FULL, mn);
  mx = __reduce_max_sync(QQ_FULL, mx);
  nan = __reduce_or_sync(QQ_FULL, nan);
  if (lane == 0) {
    red[0][warp] = mn;
    red[1][warp] = mx;
    red[2][warp] = nan;
  }
  __syncthreads();
  for (int v = 0; v < nw; ++v) {
    mn = min(mn, red[0][v]);
    mx = max(mx, red[1][v]);
    nan |= red[2][v];
  }
}

// (scale, zero) fp16 bits from the reduced range (qaq.h)
__device__ __forceinline__ void range_sz(uint32_t kmn, uint32_t kmx, uint32_t nan, int w,
                                         uint16_t &s16, uint16_t &z16) {
  float mn, mx;
  if (nan) {
    mn = mx = CUDART_NAN_F;
  } else if (kmn > kmx) {  // no inlier
    mn = mx = 0.f;
  } else {
    mn = __uint_as_float(ks_qaq_unord(kmn));
    mx = __uint_as_float(ks_qaq_unord(kmx));
    // finite inliers beyond what fp16 sz holds at every width: NaN scale / zero
    // (qaq.h; the CPU quantize also raises, the CUDA one cannot without a sync)
    if (isfinite(mn) && isfinite(mx) &&
        (__fsub_rn(mx, mn) > KS_QAQ_SZ_MAX || mx > KS_QAQ_SZ_MAX || mn < -KS_QAQ_SZ_MAX))
      mn = mx = CUDART_NAN_F;
  }
  const float s = w > 0 ? __fdiv_rn(__fsub_rn(mx, mn), (float)((1 << w) - 1)) : __fsub_rn(mx, mn);
  s16 = s != s ? (uint16_t)KS_QAQ_H_NAN : f2h(s);
  z16 = mn != mn ? (uint16_t)KS_QAQ_H_NAN : f2h(mn);
}

// range keys of one value into a thread's running (mn, mx, nan)
__device__ __forceinline__ void range_add(float v, uint32_t &mn, uint32_t &mx, uint32_t &nan) {
  const uint32_t u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    nan = 1u;
  } else {
    const uint32_t o = ks_qaq_ord(u);
    mn = min(mn, o);
    mx = max(mx, o);
  }
}

__device__ __forceinline__ bool mask_bit(const uint32_t *mask, int e) {
  return (mask[e >> 5] >> (e & 31)) & 1u;
}
__device__ __forceinline__ void mask_set(uint32_t *mask, int e) {
  atomicOr(mask + (e >> 5), 1u << (e & 31));
}

template <typename T>
__global__ void __launch_bounds__(QQ_NT)
    k_quantize(const T *x, int64_t B, int64_t Hkv, int64_t n, int64_t D, int64_t cap,
               const int32_t *pos, const uint8_t *new_w, const int32_t *new_off, int32_t *offsets,
               ks_qaq_store st) {
  using Q = QqKey<T>;
  using K = typename Q::K;
  using R = typename Q::R;
  __shared__ K s_top[QQ_WMAX][32];  // per warp: its list
  __shared__ K s_buf[QQ_WMAX][32];  // per warp: its candidate batch
  __shared__ uint32_t s_red[3][QQ_WMAX];
  extern __shared__ uint32_t s_mask[];  // (E + 31) / 32 words: outlier bits
  const int64_t Hg = st.Hg, hpg = Hkv / Hg, n_out = st.n_out, items = B * Hg * n;
  const int E = (int)(hpg * D), Di = (int)D, k = (int)(n_out / 2);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nt = blockDim.x, nw = nt >> 5;
  const bool split = k <= 16;
  const int nl = split ? nw / 2 : nw;  // warps of the ascending pass (the first ones)
  for (int64_t it = blockIdx.x; it < items; it += gridDim.x) {
    const int64_t b = it / (Hg * n), g = (it / n) % Hg, i = it % n;
    const int64_t t = (int64_t)pos[b] + i;
    if (t < 0 || t >= cap) continue;  // the whole block
    const int64_t gi = (b * Hg + g) * cap + t;
    const int32_t off = new_off[it];
    const int w = eff_w(new_w[it], off, E, st.A);
    if (tid == 0) {
      st.widths[gi] = new_w[it];
      offsets[gi] = off;
    }
    // element e of the group: head g*hpg + e/D, channel e%D
    const R *xr = reinterpret_cast<const R *>(x) + ((b * Hkv + g * hpg) * n + i) * D;
    const int64_t hs = n * D;
    auto raw = [&](int e) { return Q::ld(xr + (int64_t)(e / Di) * hs + e % Di); };
    int16_t *oi = st.oidx + gi * n_out;
    R *ov = reinterpret_cast<R *>(st.oval) + gi * n_out;
    for (int j = tid; j < (E + 31) / 32; j += nt) s_mask[j] = 0u;
    // lane j < k of a warp holding a final sorted list writes slot s0 + j
    auto put = [&](K key, int s0, int j) {
      const int e = key == Q::NONE ? -1 : (int)(key & 0xffffu);
      oi[s0 + j] = (int16_t)e;
      ov[s0 + j] = e >= 0 ? raw(e) : (R)0;
      if (e >= 0) mask_set(s_mask, e);
    };
    if (k > 0) {
      // pass 1: warps < nl the ascending lists; split: the others the descending
      // lists over all elements (2k first keys exact)
      const bool hw = warp >= nl;
      const int gw = hw ? warp - nl : warp, ng = hw ? nw - nl : nl;
      const K lst = warp_top<Q>(E, gw * 32, ng * 32, hw ? 2 * k : k,
                                [&](int e) { return Q::key(raw(e), e, hw); }, s_buf[warp]);
      s_top[warp][lane] = lst;
      __syncthreads();  // lists written; the mask cleared
      K hl = Q::NONE;
      if (warp == 0 || warp == nl) {  // warp nl < nw only when split
        K l = lst;
        for (int v = warp + 1; v < (warp == 0 ? nl : nw); ++v) l = warp_merge(l, s_top[v][31 - lane], lane);
        if (warp == 0) {
          if (lane < k) put(l, 0, lane);
        } else {
          hl = l;
        }
      }
      __syncthreads();  // low outliers in the mask; s_top free
      if (split) {
        if (warp == nl) {  // drop the low outliers from the descending list, keep k
          const int e = hl == Q::NONE ? -1 : (int)(hl & 0xffffu);
          const bool keep = e >= 0 && !mask_bit(s_mask, e);
          const unsigned bal = __ballot_sync(QQ_FULL, keep);
          const int p = __popc(bal & ((1u << lane) - 1u)), kept = __popc(bal);
          if (keep && p < k) put(hl, k, p);
          if (lane >= kept && lane < k) put(Q::NONE, k, lane);  // fewer elements than slots
        }
      } else {
        const K l2 = warp_top<Q>(
            E, warp * 32, nw * 32, k,
            [&](int e) { return mask_bit(s_mask, e) ? Q::NONE : Q::key(raw(e), e, true); },
            s_buf[warp]);
        s_top[warp][lane] = l2;
        __syncthreads();
        if (warp == 0) {
          K l = l2;
          for (int v = 1; v < nw; ++v) l = warp_merge(l, s_top[v][31 - lane], lane);
          if (lane < k) put(l, k, lane);
        }
      }
    }
    __syncthreads();  // the mask complete
    uint32_t kmn = ~0u, kmx = 0u, nan = 0u;
    for (int e = tid; e < E; e += nt)
      if (!mask_bit(s_mask, e)) range_add(Q::val(raw(e)), kmn, kmx, nan);
    block_range(kmn, kmx, nan, s_red);
    uint16_t s16, z16;
    range_sz(kmn, kmx, nan, w, s16, z16);
    if (tid == 0) {
      st.sz[2 * gi] = s16;
      st.sz[2 * gi + 1] = z16;
    }
    if (w > 0) {
      const float sf = h2f(s16), zf = h2f(z16);
      pack_words(st.arena + b * st.A + off, E, w, [&](int e) {
        return mask_bit(s_mask, e) ? 0u : code_of(Q::val(raw(e)), sf, zf, w);  // outliers: code 0
      });
    }
    __syncthreads();  // before the next group reuses the shared memory
  }
}

// ------------------------------------------------------------ dequantize ----

template <typename T>
__global__ void k_dequantize(ks_qaq_store st, int64_t B, int64_t Hkv, int64_t cap, int64_t D,
                             const int32_t *seq_lens, T *out) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= B * Hkv * cap * D) return;
  const int64_t d = i % D, t = (i / D) % cap, hk = (i / (D * cap)) % Hkv, b = i / (D * cap * Hkv);
  if (t >= clamp_len(seq_lens[b], cap)) { out[i] = from_f<T>(0.f); return; }
  const int64_t hpg = Hkv / st.Hg, E = hpg * D, gi = (b * st.Hg + hk / hpg) * cap + t;
  const int64_t e = (hk % hpg) * D + d;
  const int32_t off = st.offsets[gi];
  const int w = eff_w(st.widths[gi], off, E, st.A);
  float v = deq(st.arena + b * st.A + off, w, h2f(st.sz[2 * gi]), h2f(st.sz[2 * gi + 1]), e, E);
  const T *ov = reinterpret_cast<const T *>(st.oval) + gi * st.n_out;
  for (int64_t j = 0; j < st.n_out; ++j)
    if (st.oidx[gi * st.n_out + j] == e) v = to_f<T>(ov[j]);
  out[i] = from_f<T>(v);
}

// ------------------------------------------------------------ requantize ----

// One block per group (see quantize): the old code bytes are staged in shared
// memory first, so the new, narrower codes can overwrite them in place.
template <typename T>
__global__ void __launch_bounds__(QQ_NT)
    k_requantize(ks_qaq_store st, int64_t B, int64_t Hkv, int64_t cap, int64_t D,
                 const int32_t *seq_lens, const uint8_t *new_w) {
  __shared__ uint32_t s_red[3][QQ_WMAX];
  extern __shared__ uint32_t s_dyn[];  // (E + 31) / 32 mask words, then E code bytes (at most)
  const int64_t n_out = st.n_out, items = B * st.Hg * cap;
  const int E = (int)((Hkv / st.Hg) * D), tid = threadIdx.x, nt = blockDim.x;
  uint32_t *s_mask = s_dyn;
  uint8_t *s_codes = reinterpret_cast<uint8_t *>(s_dyn + (E + 31) / 32);
  __shared__ uint32_t s_todo;
  // A block takes QQ_RQ_ITEMS consecutive groups at a time: warp 0 finds those
  // whose width falls (one lane per group, a ballot), then the whole block
  // re-packs them one after the other. A step that lowers few widths (most of
  // a decode step's groups keep theirs) costs one wave of blocks, not a block
  // per group.
  for (int64_t base = (int64_t)blockIdx.x * QQ_RQ_ITEMS; base < items;
       base += (int64_t)gridDim.x * QQ_RQ_ITEMS) {
    if (tid < 32) {
      bool need = false;
      const int64_t gi = base + tid;
      if (tid < QQ_RQ_ITEMS && gi < items) {
        const int64_t b = gi / (st.Hg * cap), t = gi % cap;
        const int nw = new_w[gi], ow = st.widths[gi];
        need = t < clamp_len(seq_lens[b], cap) && (nw == 0 || valid_w(nw)) && nw < ow &&
               (ow == 0 || valid_w(ow));
      }
      const uint32_t m = __ballot_sync(0xffffffffu, need);
      if (tid == 0) s_todo = m;
    }
    __syncthreads();
    uint32_t todo = s_todo;
    __syncthreads();  // s_todo is rewritten by the next round
    while (todo) {
      const int64_t gi = base + __ffs(todo) - 1;
      todo &= todo - 1;
      const int64_t b = gi / (st.Hg * cap);
      const int nw = new_w[gi], ow = st.widths[gi];
      const int32_t off = st.offsets[gi];
      const int w_old = eff_w(ow, off, E, st.A), w_new = eff_w(nw, off, E, st.A);
      uint8_t *codes = st.arena + b * st.A + off;
      const float s_old = h2f(st.sz[2 * gi]), z_old = h2f(st.sz[2 * gi + 1]);
      const int16_t *oi = st.oidx + gi * n_out;
      for (int j = tid; j < (E + 31) / 32; j += nt) s_mask[j] = 0u;
      for (int q = tid; q < E * w_old / 8; q += nt) s_codes[q] = codes[q];
      __syncthreads();
      for (int j = tid; j < n_out; j += nt) {
        const int e = oi[j];
        if (e >= 0 && e < E) mask_set(s_mask, e);
      }
      __syncthreads();
      uint32_t kmn = ~0u, kmx = 0u, nan = 0u;
      for (int e = tid; e < E; e += nt)
        if (!mask_bit(s_mask, e)) range_add(deq(s_codes, w_old, s_old, z_old, e, E), kmn, kmx, nan);
      block_range(kmn, kmx, nan, s_red);
      uint16_t s16, z16;
      range_sz(kmn, kmx, nan, w_new, s16, z16);
      if (w_new > 0) {
        const float sf = h2f(s16), zf = h2f(z16);
        pack_words(codes, E, w_new, [&](int e) {
          return mask_bit(s_mask, e) ? 0u : code_of(deq(s_codes, w_old, s_old, z_old, e, E), sf, zf, w_new);
        });
      }
      if (tid == 0) {
        st.sz[2 * gi] = s16;
        st.sz[2 * gi + 1] = z16;
        st.widths[gi] = (uint8_t)nw;
      }
      __syncthreads();  // before the next group reuses the shared memory
    }
  }
}

// ------------------------------------------------------------- attention ----
//
// One split-K kernel on tensor cores (+ an optional p_max kernel); a memset
// zeroes the merge counters first. Grid (nsplit, Hkv, B): a block of QA_WARPS
// warps streams a token range of one KV head for all G <= 8 query heads of it,
// a warp 16 tokens (a tile) at a time, with two mma.m16n8k16 products per tile:
//
//   S = K Q^T   (16 tokens x 8 heads, k = D): A = the K codes as fp16 integers,
//               B = q in fp16 (scaled by a power of two per head so that its
//               largest |q_d| lies in [2^14, 2^15); float32 q as hi + lo pieces)
//   O^T += V^T P'  (D x 8 heads, k = 16 tokens): A = the V codes as bf16
//               integers, B = P' = p * (value scale) in bf16 (hi + lo pieces
//               for fp16 / float32 caches)
//
// The dot products run in code space, x = zero + scale * code:
//   q . x = scale * (q . codes) + zero * sum(q) + sum_outliers q_e (x_e - x~_e)
//   sum_t p_t x_t = sum_t (p_t scale_t) codes_t + sum_t p_t zero_t + outliers
// (width 0: codes 0, zero + scale / 2 as the zero; an outlier's code is 0, so
// its correction is q_e (x_e - zero)). Codes become 16-bit floats
// by or-ing a shifted, masked word into a magic exponent (1024 + c in fp16,
// 128 + c in bf16, then a packed subtraction); the interleaved code order of
// qaq.h makes each such word a pair (element 2m, 2m + 1), so
//   - lane (gid = lane / 4, tig = lane % 4) holds the K codes of tokens gid and
//     gid + 8 of the tile for elements [tig * D/4, (tig + 1) * D/4): pair 2s and
//     2s + 1 are its k-step s (the element order inside the product is free as
//     long as q's fragment uses the same one);
//   - for V it holds tokens 2 tig, 2 tig + 1, 2 tig + 8, 2 tig + 9 over elements
//     [gid * D/8, (gid + 1) * D/8); a byte permute pairs two tokens per element,
//     and output row gid (gid + 8) of m-tile s is element gid * D/8 + 2s (+1);
//   - P leaves the first product in the accumulator layout (tokens x heads) and
//     movmatrix.trans turns it into the second product's B fragment;
//   - the lane's output heads (2 tig, 2 tig + 1) are the heads of its logits, so
//     the online-softmax rescaling of the accumulators needs no data exchange.
// Data movement: each warp stages the next tile in shared memory with cp.async
// while it computes the current one (lane L copies the K (L < 16) or V codes of
// token L % 16 and its first two outlier slots, with its own metadata, read two
// tiles ahead); the lanes then read their chunks from there. A tile whose 16
// tokens share one K and one V width runs code compiled for those widths; in a
// mixed tile each row's width picks its unpack code (a switch: tokens of mixed
// widths in one warp diverge). K outliers correct the logits in registers; V
// outliers go to a per-warp shared-memory accumulator kept relative to a
// reference maximum (rescaled only when the running maximum passes it by 2^64).
// Per-split partials (acc, M, L); the last block of a (b, hk) merges the splits
// in split order (deterministic). p_max: the kernel writes the G log2-logits
// per token when asked and the merge writes lambda = M + log2 L per head; a
// light kernel then takes max_g exp2(s_g - lambda_g) per token.

#define QQ_GMAX 8
#define QA_WARPS 4
#define QA_BLOCKS 3       // blocks per SM asked of the register allocator (<= 168 registers)
#define QA_MIN_SPLIT 256  // fewest tokens per split
#define QA_MIN_SPLIT_SEL 64  // with a page list (a few thousand slots: more, shorter splits)
#define QA_OUT 2          // outlier slots per row read ahead of use (more are read when used)
static_assert(QA_OUT == 2, "the outlier loops pick slot 0 or 1 of the read-ahead");

// max / sum over the 8 lanes of equal tig (lane bits 2..4)
__device__ __forceinline__ float gid_max(float v) {
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float gid_sum(float v) {
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// precision of the two products per cache dtype: NQ fp16 pieces of q, NP bf16
// pieces of P' (float32: ~22 and ~16 significant bits; fp16: q exact, P' ~16;
// bf16: q exact, P' 8 bits, the output's own precision)
template <typename T> struct QaPrec { static constexpr int NQ = 2, NP = 2; };
template <> struct QaPrec<__half> { static constexpr int NQ = 1, NP = 2; };
template <> struct QaPrec<__nv_bfloat16> { static constexpr int NQ = 1, NP = 1; };

__device__ __forceinline__ void mma_f16(float c[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_bf16(float c[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// the transpose of an 8x8 16-bit matrix held one row pair per lane
__device__ __forceinline__ uint32_t trans8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ uint32_t h2_bits(__half2 h) { return *reinterpret_cast<uint32_t *>(&h); }
__device__ __forceinline__ uint32_t b2_bits(__nv_bfloat162 h) {
  return *reinterpret_cast<uint32_t *>(&h);
}
__device__ __forceinline__ float bf_lo(uint32_t x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float bf_hi(uint32_t x) { return __uint_as_float(x & 0xffff0000u); }

// two codes (bits 0.. and 16..) as an fp16 pair
__device__ __forceinline__ uint32_t f16_pair(uint32_t v) {
  uint32_t r = v | 0x64006400u;
  __half2 h = __hsub2(*reinterpret_cast<__half2 *>(&r), __half2(__ushort_as_half(0x6400), __ushort_as_half(0x6400)));
  return h2_bits(h);
}
// two codes < 128 (bits 0.. and 16..) as a bf16 pair
__device__ __forceinline__ uint32_t bf16_pair(uint32_t v) {
  uint32_t r = v | 0x43004300u;
  const uint32_t m = 0x43004300u;
  __nv_bfloat162 h = __hsub2(*reinterpret_cast<__nv_bfloat162 *>(&r),
                             *reinterpret_cast<const __nv_bfloat162 *>(&m));
  return b2_bits(h);
}
// two 8-bit codes (bits 0..7 and 16..23) as a bf16 pair (through float32: exact)
__device__ __forceinline__ uint32_t bf16_pair8(uint32_t v) {
  const float lo = __uint_as_float(0x4B000000u | (v & 0xffu)) - 8388608.f;
  const float hi = __uint_as_float(0x4B000000u | (v >> 16)) - 8388608.f;
  return b2_bits(__floats2bfloat162_rn(lo, hi));
}

template <int W> struct QaW { static constexpr int value = W; };

// The head dims of the attention (see the top of the file): D the stored head
// dim, P the head dim of the MMA tiles and lane chunks (D, or 128 for D = 96:
// with 96 / 4 = 24 K elements per lane a chunk would start mid-word at widths
// 1 and 2; with 32 every chunk is whole words), BUF_DYN: the per-warp sums
// s_buf live in dynamic shared memory after the staging areas.
template <int D> struct QaDim {
  static_assert(D == 64 || D == 96 || D == 128 || D == 256, "QAQ attention: head_dim 64, 96, 128 or 256");
  static constexpr int P = D == 96 ? 128 : D;
  static constexpr bool BUF_DYN = D > 128;
};
__host__ __device__ constexpr bool qa_head_dim_ok(int64_t D) {
  return D == 64 || D == 96 || D == 128 || D == 256;
}

// ---- asynchronous copies into a warp's staging area (cp.async, sm_80+).
// A warp stages the next tile in shared memory while it computes the current
// one. Per stage: the codes of the tile's 16 tokens for this KV head, K then V,
// QA_KS bytes a token (D bytes at 8 bits, padded), then per token 16 bytes of
// K outlier slots 0-1 (4 bytes of indices, 4 or 8 of values) and 16 of V's.
// Lane L copies token L % 16 of K (L < 16) or V (L >= 16), with its own
// metadata; the lanes then read their chunks of the tokens they compute.
template <int D> struct QaStage {
  static constexpr int KS = D + 16;            // bytes per token's codes (padded)
  static constexpr int CODES = 16 * KS;        // one store's codes
  static constexpr int OUT = 2 * CODES;        // offset of the outlier slots
  static constexpr int BYTES = OUT + 2 * 16 * 16;
};
__device__ __forceinline__ uint32_t smem_addr(const void *p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}
template <int N>
__device__ __forceinline__ void cp_async(uint32_t dst, const void *src) {
  if (N == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(dst), "l"(src), "n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

// n bytes (a multiple of 4) from src to dst, with the widest copies the source
// alignment allows (synchronous byte loads when it is not even 4-byte aligned)
__device__ __forceinline__ void copy_bytes(uint32_t dst, const uint8_t *src, int n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(src);
  if ((a & 15) == 0 && (n & 15) == 0) {
    for (int k = 0; k < n; k += 16) cp_async<16>(dst + k, src + k);
  } else if ((a & 7) == 0 && (n & 7) == 0) {
    for (int k = 0; k < n; k += 8) cp_async<8>(dst + k, src + k);
  } else if ((a & 3) == 0) {
    for (int k = 0; k < n; k += 4) cp_async<4>(dst + k, src + k);
  } else {
    for (int k = 0; k < n; k += 4) {
      const uint32_t v = (uint32_t)__ldg(src + k) | ((uint32_t)__ldg(src + k + 1) << 8) |
                         ((uint32_t)__ldg(src + k + 2) << 16) | ((uint32_t)__ldg(src + k + 3) << 24);
      asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(dst + k), "r"(v) : "memory");
    }
  }
}
// NW 32-bit words at a shared address (4-byte aligned; 16-byte loads when NW is
// a multiple of 4 and ALIGNED16)
template <int NW, bool ALIGNED16>
__device__ __forceinline__ void read_words(uint32_t src, uint32_t *w) {
  if (ALIGNED16 && NW % 4 == 0) {
#pragma unroll
    for (int g = 0; g < NW / 4; ++g)
      asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(w[4 * g]), "=r"(w[4 * g + 1]), "=r"(w[4 * g + 2]), "=r"(w[4 * g + 3])
                   : "r"(src + 16 * g)
                   : "memory");
  } else {
#pragma unroll
    for (int k = 0; k < NW; ++k)
      asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(w[k]) : "r"(src + 4 * k) : "memory");
  }
}

// A lane's chunk: elements [e0, e0 + 2 NPAIR) of a group (e0 a multiple of
// 2 NPAIR); at width W it spans NW whole words, or lies inside one word.
template <int W, int NPAIR> struct QaChunk {
  static constexpr int N = 32 / W;  // codes per word
  static constexpr int NW = 2 * NPAIR >= N ? 2 * NPAIR / N : 1;
};

// pair m of the chunk: codes of elements e0 + 2m, e0 + 2m + 1 at bits 0.. and 16..
template <int W, int NPAIR, int NMAX>
__device__ __forceinline__ uint32_t chunk_pair(const uint32_t (&raw)[NMAX], int e0, int m) {
  constexpr int N = 32 / W;
  constexpr uint32_t M = ((1u << W) - 1u) * 0x00010001u;
  if (2 * NPAIR >= N) return (raw[m / (N / 2)] >> (W * (m % (N / 2)))) & M;
  return (raw[0] >> (W * ((e0 % N) / 2 + m))) & M;
}

// pairs [M0, M0 + NM) of the chunk as fp16 (K) or bf16 (V) integer pairs
// (out[m - M0]); zeros for width 0. WF > 0: every row of the tile has width WF
// (the switch on the row's width folds away)
template <bool BF, int NPAIR, int M0, int NM, int WF, int NMAX>
__device__ __forceinline__ void unpack_chunk(const uint32_t (&raw)[NMAX], int w_row, int e0,
                                             uint32_t (&out)[NM]) {
  const int w = WF ? WF : w_row;
#define QA_UNPACK(W_, CVT)                                                                  \
  _Pragma("unroll") for (int m = 0; m < NM; ++m) out[m] = CVT(chunk_pair<W_, NPAIR>(raw, e0, M0 + m)); \
  break;
  if (BF) {
    switch (w) {
      case 1: QA_UNPACK(1, bf16_pair)
      case 2: QA_UNPACK(2, bf16_pair)
      case 4: QA_UNPACK(4, bf16_pair)
      case 8: QA_UNPACK(8, bf16_pair8)
      default:
#pragma unroll
        for (int m = 0; m < NM; ++m) out[m] = 0u;
    }
  } else {
    switch (w) {
      case 1: QA_UNPACK(1, f16_pair)
      case 2: QA_UNPACK(2, f16_pair)
      case 4: QA_UNPACK(4, f16_pair)
      case 8: QA_UNPACK(8, f16_pair)
      default:
#pragma unroll
        for (int m = 0; m < NM; ++m) out[m] = 0u;
    }
  }
#undef QA_UNPACK
}

// the per-block view of one store's metadata for one (sequence, group row)
struct QaRow {
  const int32_t *off;
  const uint8_t *w;
  const uint32_t *sz;  // (scale, zero) fp16 pairs
  const int16_t *oidx;
  int lim;             // largest valid end byte of a group's codes (arena bytes, clamped to int)
};

__device__ __forceinline__ QaRow qa_row(const ks_qaq_store &st, int64_t g0) {
  QaRow r;
  r.off = st.offsets + g0;
  r.w = st.widths + g0;
  r.sz = reinterpret_cast<const uint32_t *>(st.sz) + g0;
  r.oidx = st.oidx + g0 * st.n_out;
  r.lim = st.A < 0x7fffffff ? (int)st.A : 0x7fffffff;
  return r;
}

// value j of the outlier values stored from word w on (cache dtype)
template <typename T> __device__ __forceinline__ float qa_word_val(const uint32_t *w, int j);
template <> __device__ __forceinline__ float qa_word_val<float>(const uint32_t *w, int j) {
  return __uint_as_float(w[j]);
}
template <> __device__ __forceinline__ float qa_word_val<__half>(const uint32_t *w, int j) {
  return h2f((uint16_t)(w[0] >> (16 * j)));
}
template <> __device__ __forceinline__ float qa_word_val<__nv_bfloat16>(const uint32_t *w, int j) {
  return __uint_as_float((w[0] >> (16 * j)) << 16);
}

// outlier slot j of token t of a row (n slots per group): its element relative
// to the head's base hb (-1 when !ok) and its value
template <typename T>
__device__ __forceinline__ void qa_outlier(const QaRow &row, const T *oval, int t, int n, int j, int hb,
                                           bool ok, int &rel, float &xo) {
  rel = -1;
  xo = 0.f;
  if (ok) {
    rel = (int)__ldg(row.oidx + t * n + j) - hb;
    xo = to_f<T>(oval[t * n + j]);
  }
}

// one token's group, read (qa_token_load) and decoded later (qa_token_decode, so
// that a prefetch does not wait for its loads): effective width (0 when invalid
// or out of the arena), code byte offset, scale, zero (the midpoint for width 0);
// zeros when !ok
struct QaRaw {
  int off, w;
  uint32_t sz;
};
__device__ __forceinline__ QaRaw qa_token_load(const QaRow &r, int t, bool ok) {
  QaRaw x;
  x.off = 0; x.w = 0; x.sz = 0u;
  if (ok) {
    x.off = __ldg(r.off + t);
    x.w = __ldg(r.w + t);
    x.sz = __ldg(r.sz + t);
  }
  return x;
}
__device__ __forceinline__ void qa_token_decode(const QaRaw &x, int lim, int E, int &off, int &w,
                                                float &sc, float &z) {
  const int wr = x.w;
  off = x.off;
  const bool valid = (wr == 1 || wr == 2 || wr == 4 || wr == 8) && off >= 0 && off <= lim - ((E * wr) >> 3);
  w = valid ? wr : 0;
  sc = h2f((uint16_t)(x.sz & 0xffffu));
  z = h2f((uint16_t)(x.sz >> 16));
  if (w == 0) z = __fadd_rn(z, __fmul_rn(sc, 0.5f));
}

// the tokens a (b, hk) row attends: pidx == nullptr: tokens [0, len); else the
// pages pidx[row * n_sel + i] (P tokens each): slot u = i * P + j is token
// pidx[i] * P + j, or nothing when the page is negative or the token >= len
struct QaSel {
  const int32_t *pidx;
  int64_t n_sel, P;
};
// token of slot u (< n_slot) of row `row` (b * Hkv + hk), or -1
__device__ __forceinline__ int qa_locate(const QaSel &sel, int64_t row, int64_t u, int64_t n_slot,
                                         int64_t len) {
  if (u >= n_slot) return -1;
  if (!sel.pidx) return u < len ? (int)u : -1;
  // 32-bit division: n_slot = n_sel * P < cap + P <= 2^32 (n_sel <= ceil(cap / P), checked by the binding)
  const uint32_t uu = (uint32_t)u, pp = (uint32_t)sel.P, i = uu / pp;
  const int64_t pg = __ldg(sel.pidx + row * sel.n_sel + i);
  const int64_t t = pg * sel.P + (int64_t)(uu - i * pp);
  return pg >= 0 && t < len ? (int)t : -1;
}

template <typename T, int D, int MINB>
__global__ void __launch_bounds__(QA_WARPS * 32, MINB)
    qa_attn_kernel(const T *__restrict__ q, ks_qaq_store kq, ks_qaq_store vq, int H, int Hkv,
                   int64_t cap, const int32_t *__restrict__ seq_lens, QaSel sel, float scale_log2,
                   int per_split, float *__restrict__ part, int *__restrict__ counters,
                   float *__restrict__ lam, float *__restrict__ slog, T *__restrict__ out) {
  constexpr int W = QA_WARPS, NT = W * 32, MAXG = QQ_GMAX;
  constexpr int NQ = QaPrec<T>::NQ, NP = QaPrec<T>::NP;
  constexpr int DP = QaDim<D>::P;             // head dim of the tiles (D, or 128 for D = 96)
  constexpr int NS = DP / 16;                 // k-steps of S = m-tiles of O^T
  constexpr int EPK = DP / 4, NPK = EPK / 2;  // K elements / pairs of a lane per token
  constexpr int EPV = DP / 8, NPV = EPV / 2;  // V elements / pairs of a lane per token (NPV = NS)
  constexpr int NWK = DP / 16, NWV = DP / 32; // most words of a lane's K / V chunk (width 8)
  constexpr int REC = D + 2;                  // partial record: acc[D], M, L
  const int split = blockIdx.x, nsplit = gridDim.x, hk = blockIdx.y, b = blockIdx.z;
  const int G = H / Hkv;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
  const int64_t tlen = clamp_len(seq_lens[b], cap);
  // slots: the tokens themselves, or the selected pages' (QaSel)
  const int64_t len = sel.pidx ? sel.n_sel * sel.P : tlen;
  const int64_t srow = (int64_t)b * Hkv + hk;

  __shared__ float qs[MAXG][DP];  // q (float32; zero rows past G, zero columns past D)
  __shared__ float s_qsum[MAXG], s_qpow[MAXG];
  // per warp: V outlier sums relative to m_ref during the stream, the warp's
  // merge record afterwards (static, or after the staging areas when BUF_DYN)
  constexpr bool BUF_DYN = QaDim<D>::BUF_DYN;
  __shared__ float s_buf_static[BUF_DYN ? 1 : W][MAXG][BUF_DYN ? 1 : D];
  __shared__ float s_m[W][MAXG], s_l[W][MAXG];
  extern __shared__ uint4 s_stage[];  // [W][2 stages] staging areas (QaStage<DP>), then s_buf if BUF_DYN
  float (*s_buf)[MAXG][D] =
      BUF_DYN ? reinterpret_cast<float (*)[MAXG][D]>(s_stage + W * 2 * QaStage<DP>::BYTES / 16)
              : reinterpret_cast<float (*)[MAXG][D]>(&s_buf_static[0][0][0]);

  if (DP == D) {
    for (int i = tid; i < MAXG * D; i += NT) {
      const int g = i / D;
      qs[g][i % D] = g < G ? to_f<T>(q[((int64_t)b * H + (int64_t)hk * G) * D + i]) : 0.f;
    }
  } else {
    for (int i = tid; i < MAXG * DP; i += NT) {
      const int g = i / DP, d = i % DP;
      qs[g][d] = g < G && d < D ? to_f<T>(q[((int64_t)b * H + (int64_t)hk * G + g) * D + d]) : 0.f;
    }
  }
  for (int i = tid; i < W * MAXG * D; i += NT) (&s_buf[0][0][0])[i] = 0.f;
  __syncthreads();
  for (int g = warp; g < MAXG; g += W) {
    float sm = 0.f, mx = 0.f;
    for (int d = lane; d < D; d += 32) {
      sm += qs[g][d];
      mx = fmaxf(mx, fabsf(qs[g][d]));
    }
    sm = warp_sum(sm);
    mx = warp_max(mx);
    if (lane == 0) {
      int e = 0;
      (void)frexpf(mx, &e);  // mx < 2^e
      const int k = 15 - e < 127 ? 15 - e : 127;
      s_qsum[g] = sm;
      s_qpow[g] = mx > 0.f && mx <= 3.0e38f ? ldexpf(1.f, k) : 1.f;
    }
  }
  __syncthreads();
  // B fragments of q: column gid, k-step s: elements tig*EPK + 4s + {0,1} / {2,3}
  // (kept in shared memory, one 8-byte fragment per lane and k-step: registers
  // are what limits the warps per SM)
  __shared__ uint2 s_qf[NQ][NS][32];
  if (warp == 0) {
    const float pw = s_qpow[gid];
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      uint32_t f[NQ][2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int e = tig * EPK + 4 * s + 2 * h;
        const float x0 = qs[gid][e] * pw, x1 = qs[gid][e + 1] * pw;
        const __half2 hi = __floats2half2_rn(x0, x1);
        f[0][h] = h2_bits(hi);
        if (NQ > 1) f[NQ - 1][h] = h2_bits(__floats2half2_rn(x0 - __low2float(hi), x1 - __high2float(hi)));
      }
#pragma unroll
      for (int pq = 0; pq < NQ; ++pq) s_qf[pq][s][lane] = make_uint2(f[pq][0], f[pq][1]);
    }
  }
  __syncthreads();
  // this lane's heads: g0 = 2 tig, g1 = 2 tig + 1
  float kc[2], kz[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    kc[i] = scale_log2 / s_qpow[2 * tig + i];
    kz[i] = scale_log2 * s_qsum[2 * tig + i];
  }

  const int64_t hpg_k = Hkv / kq.Hg, E_k = hpg_k * D, hb_k = (hk % hpg_k) * D;
  const int64_t hpg_v = Hkv / vq.Hg, E_v = hpg_v * D, hb_v = (hk % hpg_v) * D;
  const int64_t gk0 = ((int64_t)b * kq.Hg + hk / hpg_k) * cap;
  const int64_t gv0 = ((int64_t)b * vq.Hg + hk / hpg_v) * cap;
  const uint8_t *ak = kq.arena + (int64_t)b * kq.A;
  const uint8_t *av = vq.arena + (int64_t)b * vq.A;
  const int nk = (int)kq.n_out, nv = (int)vq.n_out;
  const T *okv = reinterpret_cast<const T *>(kq.oval) + gk0 * nk;
  const T *ovv = reinterpret_cast<const T *>(vq.oval) + gv0 * nv;
  const QaRow rowk = qa_row(kq, gk0), rowv = qa_row(vq, gv0);
  const int Ek = (int)E_k, Ev = (int)E_v, hbk = (int)hb_k, hbv = (int)hb_v;
  const int e0k = hbk + tig * EPK, e0v = hbv + gid * EPV;
  // lanes 0-15 read the K metadata of the tile's tokens, lanes 16-31 the V's
  const QaRow rowm = lane < 16 ? rowk : rowv;
  const int Em = lane < 16 ? Ek : Ev;
  // V outliers go to the shared sums only from lanes of real heads
  const bool vheads = 2 * tig < G;

  const int64_t t_begin = (int64_t)split * per_split;
  const int64_t t_end = t_begin + per_split < len ? t_begin + per_split : len;
  float *slog_b = slog ? slog + srow * (sel.pidx ? len : cap) * G : nullptr;

  float oacc[NS][4];
#pragma unroll
  for (int s = 0; s < NS; ++s) oacc[s][0] = oacc[s][1] = oacc[s][2] = oacc[s][3] = 0.f;
  float m_run[2] = {-CUDART_INF_F, -CUDART_INF_F}, l_run[2] = {0.f, 0.f}, z_run[2] = {0.f, 0.f};
  float m_ref[2] = {-CUDART_INF_F, -CUDART_INF_F};
  float *vc0 = &s_buf[warp][2 * tig][0], *vc1 = &s_buf[warp][2 * tig + 1][0];

  // Pipeline per warp, tile i: its metadata was read two steps ahead (one lane
  // per token, K or V), its codes and first outlier slots were copied into
  // stage i % 2 one step ahead (cp.async); step i issues the copies of tile
  // i + 1 and the metadata reads of tile i + 2, then waits for tile i's copies.
  using SG = QaStage<DP>;
  const uint32_t stage0 = smem_addr(s_stage) + (uint32_t)(warp * 2 * SG::BYTES);
  const int wstep = W * 16;
  const bool mine_k = lane < 16;
  const uint8_t *arena_m = mine_k ? ak : av;
  const int hbm = mine_k ? hbk : hbv, nm = mine_k ? nk : nv;
  const int16_t *oidx_m = rowm.oidx;
  const T *oval_m = mine_k ? okv : ovv;
  // this lane's token of tile tt: its codes (width w_l at offset off_l) and outlier slots 0-1
  // (t_l: the lane's token, -1 when its slot selects nothing)
  auto issue = [&](int t_l, int off_l, int w_l, int stage) {
    const uint32_t base = stage0 + (uint32_t)(stage * SG::BYTES);
    const int k = lane & 15, t = t_l;
    if (w_l) copy_bytes(base + (mine_k ? 0 : SG::CODES) + k * SG::KS, arena_m + off_l + ((hbm * w_l) >> 3),
                        (D * w_l) >> 3 >= 4 ? (D * w_l) >> 3 : 4);
    if (t >= 0 && nm) {
      // (n_out is even, so slot 0 of a row starts 4-byte aligned)
      const uint32_t o = base + SG::OUT + (mine_k ? 0 : 256) + k * 16;
      cp_async<4>(o, oidx_m + (int64_t)t * nm);
      const uint32_t *vals = reinterpret_cast<const uint32_t *>(oval_m + (int64_t)t * nm);
#pragma unroll
      for (int j = 0; j < (int)(QA_OUT * sizeof(T)) / 4; ++j) cp_async<4>(o + 4 + 4 * j, vals + j);
    }
  };
  int m_off, m_w, n_off, n_w, m_t, n_t;  // m_t / n_t: the lane's token of this / the next tile, or -1
  float m_s, m_z, n_s, n_z;
  {
    const int64_t t = t_begin + (int64_t)warp * 16 + (lane & 15);
    m_t = qa_locate(sel, srow, t, t_end, tlen);
    qa_token_decode(qa_token_load(rowm, m_t, m_t >= 0), rowm.lim, Em, m_off, m_w, m_s, m_z);
    if (t_begin + (int64_t)warp * 16 < t_end) issue(m_t, m_off, m_w, 0);
    cp_async_commit();
    n_t = qa_locate(sel, srow, t + wstep, t_end, tlen);
    qa_token_decode(qa_token_load(rowm, n_t, n_t >= 0), rowm.lim, Em, n_off, n_w, n_s, n_z);
  }
  int stage = 0;
  for (int64_t t0 = t_begin + (int64_t)warp * 16; t0 < t_end; t0 += wstep, stage ^= 1) {
    if (t0 + wstep < t_end) issue(n_t, n_off, n_w, stage ^ 1);
    cp_async_commit();
    QaRaw nn;  // tile i + 2, decoded at the end of this step
    const int nn_t = qa_locate(sel, srow, t0 + 2 * wstep + (lane & 15), t_end, tlen);
    nn = qa_token_load(rowm, nn_t, nn_t >= 0);
    bool okr[2];
    int trow[2];  // the tokens of rows gid, gid + 8 (-1: nothing)
    int kw[2];
    float ks_[2], kz_[2], vs_[2], vz_[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int src = gid + 8 * r;
      trow[r] = __shfl_sync(0xffffffffu, m_t, src);
      okr[r] = trow[r] >= 0;
      kw[r] = __shfl_sync(0xffffffffu, m_w, src);
      ks_[r] = __shfl_sync(0xffffffffu, m_s, src);
      kz_[r] = __shfl_sync(0xffffffffu, m_z, src);
      vs_[r] = __shfl_sync(0xffffffffu, m_s, 16 + src);
      vz_[r] = __shfl_sync(0xffffffffu, m_z, 16 + src);
    }
    int vw[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) vw[i] = __shfl_sync(0xffffffffu, m_w, 16 + 2 * tig + (i & 1) + 8 * (i >> 1));
    cp_async_wait1();  // this tile's copies have landed (each lane reads only its own record)
    const uint32_t sbase = stage0 + (uint32_t)(stage * SG::BYTES);
    // ---- the width-dependent part of the tile, compiled for tiles whose 16
    // tokens share one K and one V width (no per-row dispatch) and for any mix
    float p[4];
    int voi[2][QA_OUT];
    float vov[2][QA_OUT];
    auto tile = [&](auto kt, auto vt) {
      constexpr int WK = decltype(kt)::value, WV = decltype(vt)::value;
      // ---- code words and the first outlier slots, from the staging area
      constexpr int RWK = WK ? QaChunk<WK ? WK : 1, NPK>::NW : NWK;
      constexpr int RWV = WV ? QaChunk<WV ? WV : 1, NPV>::NW : NWV;
      uint32_t rk[2][NWK], rv[4][NWV];
      {
        const int wk_ = WK ? WK : 0;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int w = WK ? wk_ : kw[r];
          const uint32_t a = sbase + (gid + 8 * r) * SG::KS + (((tig * EPK * w) >> 5) << 2);
          read_words<RWK, (WK * EPK) % 128 == 0 && WK != 0>(a, rk[r]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int w = WV ? WV : vw[i];
          const uint32_t a = sbase + SG::CODES + (2 * tig + (i & 1) + 8 * (i >> 1)) * SG::KS +
                             (((gid * EPV * w) >> 5) << 2);
          read_words<RWV, (WV * EPV) % 128 == 0 && WV != 0>(a, rv[i]);
        }
      }
      int koi[2][QA_OUT];
      float kov[2][QA_OUT];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        uint32_t ok4[4], ov4[4];
        read_words<4, true>(sbase + SG::OUT + (gid + 8 * r) * 16, ok4);
        read_words<4, true>(sbase + SG::OUT + 256 + (gid + 8 * r) * 16, ov4);
        const bool okk = okr[r] && nk > 0, okv_ = okr[r] && nv > 0;
#pragma unroll
        for (int j = 0; j < QA_OUT; ++j) {
          koi[r][j] = okk ? (int)(int16_t)(ok4[0] >> (16 * j)) - hbk : -1;
          voi[r][j] = okv_ ? (int)(int16_t)(ov4[0] >> (16 * j)) - hbv : -1;
          kov[r][j] = okk ? qa_word_val<T>(ok4 + 1, j) : 0.f;
          vov[r][j] = okv_ ? qa_word_val<T>(ov4 + 1, j) : 0.f;
        }
      }

      // ---- S = K Q^T: lane holds (row gid, heads g0 g1), (row gid + 8, heads g0 g1)
      float sc[4] = {0.f, 0.f, 0.f, 0.f};
      // in two halves of the k-steps (fewer live registers)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        uint32_t kp[2][NPK / 2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          if (hh == 0) unpack_chunk<false, NPK, 0, NPK / 2, WK>(rk[r], kw[r], e0k, kp[r]);
          else unpack_chunk<false, NPK, NPK / 2, NPK / 2, WK>(rk[r], kw[r], e0k, kp[r]);
        }
#pragma unroll
        for (int s2 = 0; s2 < NS / 2; ++s2) {
          const int s = hh * (NS / 2) + s2;
#pragma unroll
          for (int p = 0; p < NQ; ++p)
          {
            const uint2 qb = s_qf[p][s][lane];
            mma_f16(sc, kp[0][2 * s2], kp[1][2 * s2], kp[0][2 * s2 + 1], kp[1][2 * s2 + 1], qb.x, qb.y);
          }
        }
      }
      float lg[4];
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int i = 0; i < 2; ++i)
          lg[2 * r + i] = okr[r] ? fmaf(ks_[r] * kc[i], sc[2 * r + i], kz_[r] * kz[i]) : -CUDART_INF_F;
      // K outliers: q_e (x_e - zero) for this lane's heads (an outlier's code is 0)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int t = trow[r];
        for (int j = 0; j < nk; ++j) {
          int rel;
          float xo;
          if (j < QA_OUT) {
            rel = j == 0 ? koi[r][0] : koi[r][QA_OUT - 1];
            xo = j == 0 ? kov[r][0] : kov[r][QA_OUT - 1];
          } else {
            qa_outlier(rowk, okv, t, nk, j, hbk, okr[r], rel, xo);
          }
          if ((unsigned)rel < (unsigned)D) {
            const float delta = xo - kz_[r];
#pragma unroll
            for (int i = 0; i < 2; ++i)
              lg[2 * r + i] = fmaf(qs[2 * tig + i][rel] * scale_log2, delta, lg[2 * r + i]);
          }
        }
      }
      if (slog_b) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int i = 0; i < 2; ++i)
            if (okr[r] && 2 * tig + i < G) slog_b[(t0 + gid + 8 * r) * G + 2 * tig + i] = lg[2 * r + i];
      }
      // ---- online softmax (exp2 domain) for heads g0, g1
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float mnew = fmaxf(m_run[i], gid_max(fmaxf(lg[i], lg[2 + i])));
        const float corr = mnew == -CUDART_INF_F ? 1.f : exp2f(m_run[i] - mnew);
        m_run[i] = mnew;
        l_run[i] *= corr;
        z_run[i] *= corr;
        if (corr != 1.f) {
#pragma unroll
          for (int s = 0; s < NS; ++s) {
            oacc[s][i] *= corr;
            oacc[s][2 + i] *= corr;
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          p[2 * r + i] = mnew == -CUDART_INF_F ? 0.f : exp2f(lg[2 * r + i] - mnew);
          // no finite logit yet: -inf / NaN marks instead (NaN policy, ks_cuda.cuh)
          l_run[i] += mnew == -CUDART_INF_F ? (okr[r] ? ks_cuda::ninf_mark(lg[2 * r + i]) : 0.f)
                                            : p[2 * r + i];
          z_run[i] = fmaf(p[2 * r + i], vz_[r], z_run[i]);
        }
        if (m_ref[i] == -CUDART_INF_F) m_ref[i] = mnew;
      }
      // ---- P' = p * value scale in bf16 pieces, transposed into B fragments
      uint32_t pb[NP][2];
      {
        uint32_t ph[2], pl[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float x0 = p[2 * r] * vs_[r], x1 = p[2 * r + 1] * vs_[r];
          ph[r] = b2_bits(__floats2bfloat162_rn(x0, x1));
          if (NP > 1) pl[r] = b2_bits(__floats2bfloat162_rn(x0 - bf_lo(ph[r]), x1 - bf_hi(ph[r])));
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          pb[0][r] = trans8x8(ph[r]);
          if (NP > 1) pb[NP - 1][r] = trans8x8(pl[r]);
        }
      }
      // ---- O^T += V^T P'
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        uint32_t vp[4][NPV / 2];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (hh == 0) unpack_chunk<true, NPV, 0, NPV / 2, WV>(rv[i], vw[i], e0v, vp[i]);
          else unpack_chunk<true, NPV, NPV / 2, NPV / 2, WV>(rv[i], vw[i], e0v, vp[i]);
        }
#pragma unroll
        for (int s2 = 0; s2 < NS / 2; ++s2) {
          const int s = hh * (NS / 2) + s2;
          const uint32_t a0 = __byte_perm(vp[0][s2], vp[1][s2], 0x5410);
          const uint32_t a1 = __byte_perm(vp[0][s2], vp[1][s2], 0x7632);
          const uint32_t a2 = __byte_perm(vp[2][s2], vp[3][s2], 0x5410);
          const uint32_t a3 = __byte_perm(vp[2][s2], vp[3][s2], 0x7632);
#pragma unroll
          for (int pp = 0; pp < NP; ++pp) mma_bf16(oacc[s], a0, a1, a2, a3, pb[pp][0], pb[pp][1]);
        }
      }
    };
    {
      const int wk0 = __shfl_sync(0xffffffffu, m_w, 0), wv0 = __shfl_sync(0xffffffffu, m_w, 16);
      const bool uni = __all_sync(0xffffffffu, m_w == (lane < 16 ? wk0 : wv0));
      // one width for K and V across the tile: the width-specialised code; any
      // other tile switches per row. (Specialising every (K, V) pair of {2, 4,
      // 8} was measured on the H200 with tiles of one K and one V width drawn
      // from QAQ's SmolLM2 shares: 0.105 ms against 0.101 ms per-row at
      // B = 1, H_kv = 8, 32k; no gain, for twice the compile time.)
      if (uni && wk0 == 4 && wv0 == 4) tile(QaW<4>{}, QaW<4>{});
      else if (uni && wk0 == 2 && wv0 == 2) tile(QaW<2>{}, QaW<2>{});
      else if (uni && wk0 == 8 && wv0 == 8) tile(QaW<8>{}, QaW<8>{});
      else tile(QaW<0>{}, QaW<0>{});
    }
    // ---- V outliers: p (x_e - x~_e) into the warp's shared sums (relative to m_ref)
    bool big = false;
#pragma unroll
    for (int i = 0; i < 2; ++i) big |= m_run[i] - m_ref[i] > 64.f;
    if (__any_sync(0xffffffffu, big)) {  // rare: move the reference up first
      __syncwarp();
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (m_run[i] - m_ref[i] > 64.f) {
          const float f = exp2f(m_ref[i] - m_run[i]);
          float *vc = i ? vc1 : vc0;
          for (int d = gid; d < D; d += 8) vc[d] *= f;
          m_ref[i] = m_run[i];
        }
      }
      __syncwarp();
    }
    float cr[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) cr[i] = m_ref[i] == -CUDART_INF_F ? 0.f : exp2f(m_run[i] - m_ref[i]);
    // every lane runs the same (row, slot) steps; lanes that would add to the
    // same (head, element) in one step take the atomic path, the others a plain
    // read-modify-write (lanes of equal tig share heads; other tigs never collide).
    // The read-ahead slots are matched first, all at once (the matches' latency
    // overlaps), then added; further slots one at a time.
    auto vadd = [&](int rel, float a0, float a1, unsigned same) {
      if (rel >= 0) {
        if (__popc(same) == 1) {
          vc0[rel] += a0;
          vc1[rel] += a1;
        } else {
          atomicAdd(vc0 + rel, a0);
          atomicAdd(vc1 + rel, a1);
        }
      }
      __syncwarp();
    };
    {
      int rel[2 * QA_OUT];
      float a0[2 * QA_OUT], a1[2 * QA_OUT];
      unsigned same[2 * QA_OUT];
#pragma unroll
      for (int k = 0; k < 2 * QA_OUT; ++k) {
        const int r = k / QA_OUT, j = k % QA_OUT;
        const int e = j < nv ? voi[r][j] : -1;
        rel[k] = (unsigned)e < (unsigned)D && vheads ? e : -1;
        const float d0 = vov[r][j] - vz_[r];
        a0[k] = p[2 * r] * cr[0] * d0;
        a1[k] = p[2 * r + 1] * cr[1] * d0;
      }
#pragma unroll
      for (int k = 0; k < 2 * QA_OUT; ++k)
        same[k] = __match_any_sync(0xffffffffu, rel[k] >= 0 ? rel[k] + (tig << 16) : -1 - lane);
#pragma unroll
      for (int k = 0; k < 2 * QA_OUT; ++k) vadd(rel[k], a0[k], a1[k], same[k]);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int t = trow[r];
      for (int j = QA_OUT; j < nv; ++j) {
        int e;
        float xo;
        qa_outlier(rowv, ovv, t, nv, j, hbv, okr[r], e, xo);
        const int rel = (unsigned)e < (unsigned)D && vheads ? e : -1;
        const float d0 = xo - vz_[r];
        const unsigned same = __match_any_sync(0xffffffffu, rel >= 0 ? rel + (tig << 16) : -1 - lane);
        vadd(rel, p[2 * r] * cr[0] * d0, p[2 * r + 1] * cr[1] * d0, same);
      }
    }
    m_off = n_off; m_w = n_w; m_s = n_s; m_z = n_z; m_t = n_t;
    n_t = nn_t;
    qa_token_decode(nn, rowm.lim, Em, n_off, n_w, n_s, n_z);
  }
  // ---- the warp's record: acc[g][d] = O + z_run + outlier sums, M, L
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] = gid_sum(l_run[i]);
    z_run[i] = gid_sum(z_run[i]);
  }
  __syncwarp();
  {
    float f[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) f[i] = m_ref[i] == -CUDART_INF_F ? 0.f : exp2f(m_ref[i] - m_run[i]);
    // (D = 96: the lanes gid >= 6 hold the padded rows 96 .. 127, not stored)
    if (DP == D || gid * EPV < D) {
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        const int d = gid * EPV + 2 * s;
        vc0[d] = oacc[s][0] + z_run[0] + vc0[d] * f[0];
        vc1[d] = oacc[s][1] + z_run[1] + vc1[d] * f[1];
        vc0[d + 1] = oacc[s][2] + z_run[0] + vc0[d + 1] * f[0];
        vc1[d + 1] = oacc[s][3] + z_run[1] + vc1[d + 1] * f[1];
      }
    }
    if (gid == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        s_m[warp][2 * tig + i] = m_run[i];
        s_l[warp][2 * tig + i] = l_run[i];
      }
    }
  }
  __syncthreads();
  const int64_t row0 = (int64_t)b * Hkv + hk;  // (b, hk)
  float *my_part = part + (row0 * nsplit + split) * (int64_t)G * REC;
  for (int ix = tid; ix < G * D; ix += NT) {
    const int g = ix / D, d = ix % D;
    float M = -CUDART_INF_F, L = 0.f, A = 0.f;
#pragma unroll
    for (int wi = 0; wi < W; ++wi) M = fmaxf(M, s_m[wi][g]);
    if (M != -CUDART_INF_F) {
#pragma unroll
      for (int wi = 0; wi < W; ++wi) {
        const float cw = exp2f(s_m[wi][g] - M);
        L += s_l[wi][g] * cw;
        A += s_buf[wi][g][d] * cw;
      }
    } else {  // -inf / NaN marks only (ks_cuda.cuh)
#pragma unroll
      for (int wi = 0; wi < W; ++wi) L += s_l[wi][g];
    }
    if (nsplit == 1) {
      out[((int64_t)b * H + (int64_t)hk * G + g) * D + d] = from_f<T>(finish(A, M, L));
      if (d == 0 && lam)
        lam[(int64_t)b * H + (int64_t)hk * G + g] =
            M != -CUDART_INF_F && L > 0.f ? M + __log2f(L) : 0.f;
    } else {
      my_part[g * REC + d] = A;
      if (d == 0) {
        my_part[g * REC + D] = M;
        my_part[g * REC + D + 1] = L;
      }
    }
  }
  if (nsplit == 1) return;

  // the last split block of (b, hk) merges every split, in split order
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(&counters[row0], 1) == nsplit - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const float *rp = part + row0 * nsplit * (int64_t)G * REC;
  __shared__ float s_M[MAXG], s_L[MAXG];
  constexpr int PER = (MAXG * D + NT - 1) / NT;
  float A[PER];
  merge_splits<MAXG>(rp, nsplit, G, D, REC, s_M, s_L, A);
  if (lam)
    for (int g = tid; g < G; g += NT)
      lam[(int64_t)b * H + (int64_t)hk * G + g] =
          s_M[g] != -CUDART_INF_F && s_L[g] > 0.f ? s_M[g] + __log2f(s_L[g]) : 0.f;
#pragma unroll
  for (int it = 0; it < PER; ++it) {
    const int ix = it * NT + tid;
    if (ix < G * D) {
      const int g = ix / D, d = ix % D;
      out[((int64_t)b * H + (int64_t)hk * G + g) * D + d] = from_f<T>(finish(A[it], s_M[g], s_L[g]));
    }
  }
}

// p_max[b, hk, u] = max_g exp2(s_g[u] - lambda_g) for the slots u < n_slot that
// select a token (the tokens t < len themselves without a page list), else 0
__global__ void qa_pmax_kernel(const float *__restrict__ slog, const float *__restrict__ lam, int H,
                               int Hkv, int64_t cap, const int32_t *seq_lens, QaSel sel,
                               int64_t n_slot, float *p_max) {
  const int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int hk = blockIdx.y, b = blockIdx.z, G = H / Hkv;
  if (u >= n_slot) return;
  const int64_t len = clamp_len(seq_lens[b], cap);
  const int64_t row = (int64_t)b * Hkv + hk;
  float m = 0.f;
  if (qa_locate(sel, row, u, n_slot, len) >= 0) {
    const float *s = slog + (row * n_slot + u) * G;
    const float *lm = lam + (int64_t)b * H + (int64_t)hk * G;
    for (int g = 0; g < G; ++g) m = fmaxf(m, exp2f(__ldg(s + g) - __ldg(lm + g)));
  }
  p_max[row * n_slot + u] = m;
}

inline unsigned nblocks(int64_t n, int per) { return (unsigned)((n + per - 1) / per); }

// quantize / requantize: threads per block for groups of E elements (about 4
// elements per thread; a multiple of 64 in [64, QQ_NT]) and blocks per launch
inline int qq_threads(int64_t E) {
  const int64_t t = (E / 4 + 63) / 64 * 64;
  return (int)(t < 64 ? 64 : (t > QQ_NT ? QQ_NT : t));
}
inline unsigned qq_grid(int64_t items) { return (unsigned)(items < QQ_GRID ? items : QQ_GRID); }

inline size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

// multiprocessors of the current device (shape-only sizing: never changes in a process)
int qa_sm_count() {
  static int n = 0;
  if (n == 0) {
    int dev = 0, v = 0;
    if (cudaGetDevice(&dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && v > 0)
      n = v;
    else {
      (void)cudaGetLastError();
      return 132;
    }
  }
  return n;
}

// dynamic shared memory of the attention kernel: the staging records (and,
// for D = 256, the per-warp sums; see QaDim)
template <int D> constexpr size_t qa_dyn_bytes() {
  return (size_t)QA_WARPS * 2 * QaStage<QaDim<D>::P>::BYTES +
         (QaDim<D>::BUF_DYN ? (size_t)QA_WARPS * QQ_GMAX * D * sizeof(float) : 0);
}
// lets a kernel take that much on top of its static shared memory (once per kernel)
template <typename T, int D, int MINB>
void qa_set_smem() {
  static bool done = false;
  if (!done) {
    cudaFuncSetAttribute(qa_attn_kernel<T, D, MINB>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         (int)qa_dyn_bytes<D>());
    done = true;
  }
}

// blocks per SM the kernel is built for: QA_BLOCKS, or KVSPARSE_QA_BLOCKS
// (2, 3 or 4; an experiment switch of the benchmarks, for D = 64 and 128 only:
// D = 96 is built for QA_BLOCKS alone and D = 256 for one block, see launch_attn)
int qa_blocks() {
  static int n = 0;
  if (n == 0) {
    const char *e = getenv("KVSPARSE_QA_BLOCKS");
    n = e && (e[0] == '2' || e[0] == '3' || e[0] == '4') && e[1] == 0 ? e[0] - '0' : QA_BLOCKS;
  }
  return n;
}

// tokens per split: about one full wave of blocks (the blocks per SM the
// kernel is built for), at least QA_MIN_SPLIT tokens each, a multiple of 64
int64_t qa_per_split(int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t min_split = QA_MIN_SPLIT) {
  if (cap <= 0) return min_split;
  const int per_sm = qa_blocks();
  const int64_t rows = B * Hkv > 0 ? B * Hkv : 1;
  const int64_t want = ((int64_t)per_sm * qa_sm_count() + rows - 1) / rows;
  int64_t ns = (cap + min_split - 1) / min_split;
  if (want < ns) ns = want;
  if (ns < 1) ns = 1;
  int64_t per = (cap + ns - 1) / ns;
  per = (per + 63) / 64 * 64;
  return per;
}

inline int64_t qa_nsplit(int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t min_split = QA_MIN_SPLIT) {
  const int64_t per = qa_per_split(B, H, Hkv, cap, min_split);
  return cap > 0 ? (cap + per - 1) / per : 1;
}

}  // namespace

// ------------------------------------------------------------ entry points ----

namespace {

// n_slot: the slots of a row (cap, or n_sel * P with a page list)
template <typename T, int D>
int launch_attn(const T *q, int64_t B, int64_t H, int64_t Hkv, int64_t cap, const ks_qaq_store &kq,
                const ks_qaq_store &vq, const int32_t *seq_lens, const QaSel &sel, int64_t n_slot,
                float scale, float *lam, float *slog, float *part, int *counters, T *out,
                cudaStream_t s) {
  const int64_t ms = sel.pidx ? QA_MIN_SPLIT_SEL : QA_MIN_SPLIT;
  const int64_t per = qa_per_split(B, H, Hkv, n_slot, ms);
  const int64_t ns = qa_nsplit(B, H, Hkv, n_slot, ms);
  const dim3 grid((unsigned)ns, (unsigned)Hkv, (unsigned)B);
  const float sl2 = scale * 1.4426950408889634f;
  const size_t dyn = qa_dyn_bytes<D>();
  // D = 96 and 256: one build each (fewer instantiations: compile time); 256
  // fits one block per SM (about 120 KiB of shared memory) with 255 registers
  constexpr int FIXED = D == 96 ? QA_BLOCKS : D == 256 ? 1 : 0;
  if constexpr (FIXED != 0) {
    qa_set_smem<T, D, FIXED>();
    qa_attn_kernel<T, D, FIXED><<<grid, QA_WARPS * 32, dyn, s>>>(q, kq, vq, (int)H, (int)Hkv, cap,
        seq_lens, sel, sl2, (int)per, part, counters, lam, slog, out);
    return (int)cudaGetLastError();
  } else {
    switch (qa_blocks()) {
      case 2:
        qa_set_smem<T, D, 2>();
        qa_attn_kernel<T, D, 2><<<grid, QA_WARPS * 32, dyn, s>>>(q, kq, vq, (int)H, (int)Hkv, cap,
            seq_lens, sel, sl2, (int)per, part, counters, lam, slog, out);
        break;
      case 3:
        qa_set_smem<T, D, 3>();
        qa_attn_kernel<T, D, 3><<<grid, QA_WARPS * 32, dyn, s>>>(q, kq, vq, (int)H, (int)Hkv, cap,
            seq_lens, sel, sl2, (int)per, part, counters, lam, slog, out);
        break;
      default:
        qa_set_smem<T, D, 4>();
        qa_attn_kernel<T, D, 4><<<grid, QA_WARPS * 32, dyn, s>>>(q, kq, vq, (int)H, (int)Hkv, cap,
            seq_lens, sel, sl2, (int)per, part, counters, lam, slog, out);
    }
    return (int)cudaGetLastError();
  }
}

// workspace: counters [B * Hkv] int | partials [B * H * nsplit * (D + 2)] |
// lambda [B * H] | (p_max only) log2-logits [B * H * cap]
size_t qa_workspace(int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D, int with_p_max,
                    int64_t min_split = QA_MIN_SPLIT) {
  const int64_t ns = qa_nsplit(B, H, Hkv, cap, min_split);
  size_t n = align256((size_t)B * Hkv * sizeof(int));
  n += align256((size_t)B * H * ns * (D + 2) * sizeof(float));
  n += align256((size_t)B * H * sizeof(float));
  if (with_p_max) n += align256((size_t)B * H * cap * sizeof(float));
  return n;
}

template <typename T>
int attention_t(const T *q, int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                const ks_qaq_store &kq, const ks_qaq_store &vq, const int32_t *seq_lens,
                const QaSel &sel, float scale, float *p_max, void *workspace, T *out, cudaStream_t s) {
  const int64_t n_slot = sel.pidx ? sel.n_sel * sel.P : cap;
  const int64_t ns = qa_nsplit(B, H, Hkv, n_slot, sel.pidx ? QA_MIN_SPLIT_SEL : QA_MIN_SPLIT);
  char *ws = (char *)workspace;
  int *counters = (int *)ws;
  ws += align256((size_t)B * Hkv * sizeof(int));
  float *part = (float *)ws;
  ws += align256((size_t)B * H * ns * (D + 2) * sizeof(float));
  float *lam = p_max ? (float *)ws : nullptr;
  ws += align256((size_t)B * H * sizeof(float));
  float *slog = p_max ? (float *)ws : nullptr;
  if (ns > 1) {
    cudaError_t e = cudaMemsetAsync(counters, 0, (size_t)B * Hkv * sizeof(int), s);
    if (e != cudaSuccess) return (int)e;
  }
  int rc;
  switch (D) {
#define KS_QA_D(DD)                                                                            \
  case DD:                                                                                     \
    rc = launch_attn<T, DD>(q, B, H, Hkv, cap, kq, vq, seq_lens, sel, n_slot, scale, lam, slog, \
                            part, counters, out, s);                                           \
    break;
    KS_QA_D(64) KS_QA_D(96) KS_QA_D(128) KS_QA_D(256)
#undef KS_QA_D
    default: return (int)cudaErrorInvalidValue;
  }
  if (rc != 0) return rc;
  if (p_max && n_slot > 0) {
    const dim3 gm(nblocks(n_slot, 256), (unsigned)Hkv, (unsigned)B);
    qa_pmax_kernel<<<gm, 256, 0, s>>>(slog, lam, (int)H, (int)Hkv, cap, seq_lens, sel, n_slot, p_max);
  }
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

int ks_qaq_bits_cuda(const float *rng, const float *q_sq, const float *s_max, int is_key,
                     int64_t B, int64_t Hg, int64_t cap, const int32_t *seq_lens, double sigma,
                     int allowed_mask, int64_t n_recent, uint8_t *widths, void *stream) {
  const int64_t n = B * Hg * cap;
  if (n == 0) return 0;
  k_bits<<<nblocks(n, 256), 256, 0, (cudaStream_t)stream>>>(
      rng, q_sq, s_max, is_key, B, Hg, cap, seq_lens, sigma, allowed_mask, n_recent, widths);
  return (int)cudaGetLastError();
}

int ks_qaq_quantize_cuda(const void *x, ks_dtype dt, int64_t B, int64_t Hkv, int64_t n,
                         int64_t D, int64_t cap, const int32_t *pos, const uint8_t *new_w,
                         const int32_t *new_off, int32_t *offsets, ks_qaq_store st,
                         void *stream) {
  const int64_t items = B * st.Hg * n;
  if (items == 0) return 0;
  const int64_t E = st.Hg > 0 ? Hkv / st.Hg * D : 0;
  if (st.n_out > QQ_MAX_OUT || E < 1 || E > KS_QAQ_MAX_GROUP) return (int)cudaErrorInvalidValue;
  cudaStream_t s = (cudaStream_t)stream;
  const unsigned nb = qq_grid(items);
  const int nt = qq_threads(E);
  const size_t smem = (size_t)(E + 31) / 32 * 4;
  if (dt == KS_F32)
    k_quantize<float><<<nb, nt, smem, s>>>((const float *)x, B, Hkv, n, D, cap, pos, new_w,
                                           new_off, offsets, st);
  else if (dt == KS_F16)
    k_quantize<__half><<<nb, nt, smem, s>>>((const __half *)x, B, Hkv, n, D, cap, pos, new_w,
                                            new_off, offsets, st);
  else
    k_quantize<__nv_bfloat16><<<nb, nt, smem, s>>>((const __nv_bfloat16 *)x, B, Hkv, n, D, cap,
                                                   pos, new_w, new_off, offsets, st);
  return (int)cudaGetLastError();
}

int ks_qaq_dequantize_cuda(ks_qaq_store st, ks_dtype dt, int64_t B, int64_t Hkv, int64_t cap,
                           int64_t D, const int32_t *seq_lens, void *out, void *stream) {
  const int64_t n = B * Hkv * cap * D;
  if (n == 0) return 0;
  cudaStream_t s = (cudaStream_t)stream;
  const unsigned nb = nblocks(n, 256);
  if (dt == KS_F32)
    k_dequantize<float><<<nb, 256, 0, s>>>(st, B, Hkv, cap, D, seq_lens, (float *)out);
  else if (dt == KS_F16)
    k_dequantize<__half><<<nb, 256, 0, s>>>(st, B, Hkv, cap, D, seq_lens, (__half *)out);
  else
    k_dequantize<__nv_bfloat16><<<nb, 256, 0, s>>>(st, B, Hkv, cap, D, seq_lens,
                                                   (__nv_bfloat16 *)out);
  return (int)cudaGetLastError();
}

int ks_qaq_requantize_cuda(ks_qaq_store st, ks_dtype dt, int64_t B, int64_t Hkv, int64_t cap,
                           int64_t D, const int32_t *seq_lens, const uint8_t *new_w,
                           void *stream) {
  const int64_t items = B * st.Hg * cap;
  if (items == 0) return 0;
  const int64_t E = st.Hg > 0 ? Hkv / st.Hg * D : 0;
  if (E < 1 || E > KS_QAQ_MAX_GROUP) return (int)cudaErrorInvalidValue;
  cudaStream_t s = (cudaStream_t)stream;
  const unsigned nb = qq_grid((items + QQ_RQ_ITEMS - 1) / QQ_RQ_ITEMS);
  const int nt = qq_threads(E);
  const size_t smem = (size_t)(E + 31) / 32 * 4 + (size_t)(E + 3) / 4 * 4;  // mask + old codes
  if (dt == KS_F32)
    k_requantize<float><<<nb, nt, smem, s>>>(st, B, Hkv, cap, D, seq_lens, new_w);
  else if (dt == KS_F16)
    k_requantize<__half><<<nb, nt, smem, s>>>(st, B, Hkv, cap, D, seq_lens, new_w);
  else
    k_requantize<__nv_bfloat16><<<nb, nt, smem, s>>>(st, B, Hkv, cap, D, seq_lens, new_w);
  return (int)cudaGetLastError();
}

size_t ks_qaq_attention_cuda_workspace(int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                                       int with_p_max) {
  if (Hkv < 1) return 0;
  return qa_workspace(B, H, Hkv, cap, D, with_p_max);
}

}  // extern "C"

namespace {
int attention_any(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv, int64_t cap,
                  int64_t D, const ks_qaq_store &kq, const ks_qaq_store &vq,
                  const int32_t *seq_lens, const QaSel &sel, float scale, float *p_max,
                  void *workspace, void *out, void *stream) {
  if (B * H * D == 0) return 0;
  if (!qa_head_dim_ok(D) || Hkv < 1 || H % Hkv != 0 || H / Hkv > QQ_GMAX)
    return (int)cudaErrorInvalidValue;
  cudaStream_t s = (cudaStream_t)stream;
  if (dt == KS_F32)
    return attention_t<float>((const float *)q, B, H, Hkv, cap, D, kq, vq, seq_lens, sel, scale,
                              p_max, workspace, (float *)out, s);
  if (dt == KS_F16)
    return attention_t<__half>((const __half *)q, B, H, Hkv, cap, D, kq, vq, seq_lens, sel, scale,
                               p_max, workspace, (__half *)out, s);
  return attention_t<__nv_bfloat16>((const __nv_bfloat16 *)q, B, H, Hkv, cap, D, kq, vq, seq_lens,
                                    sel, scale, p_max, workspace, (__nv_bfloat16 *)out, s);
}
}  // namespace

extern "C" {

int ks_qaq_attention_cuda(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                          int64_t cap, int64_t D, ks_qaq_store kq, ks_qaq_store vq,
                          const int32_t *seq_lens, float scale, float *p_max, void *workspace,
                          void *out, void *stream) {
  const QaSel none = {nullptr, 0, 1};
  return attention_any(q, dt, B, H, Hkv, cap, D, kq, vq, seq_lens, none, scale, p_max, workspace,
                       out, stream);
}

size_t ks_qaq_sparse_attention_cuda_workspace(int64_t B, int64_t H, int64_t Hkv, int64_t n_sel,
                                              int64_t P, int64_t D, int with_p_max) {
  if (Hkv < 1 || n_sel < 0 || P < 1) return 0;
  return qa_workspace(B, H, Hkv, n_sel * P, D, with_p_max, QA_MIN_SPLIT_SEL);
}

int ks_qaq_sparse_attention_cuda(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                                 int64_t cap, int64_t D, ks_qaq_store kq, ks_qaq_store vq,
                                 const int32_t *page_idx, int64_t n_sel, int64_t P,
                                 const int32_t *seq_lens, float scale, float *p_max,
                                 void *workspace, void *out, void *stream) {
  if (!page_idx || n_sel < 0 || P < 1) return (int)cudaErrorInvalidValue;
  const QaSel sel = {page_idx, n_sel, P};
  return attention_any(q, dt, B, H, Hkv, cap, D, kq, vq, seq_lens, sel, scale, p_max, workspace,
                       out, stream);
}

}  // extern "C"
