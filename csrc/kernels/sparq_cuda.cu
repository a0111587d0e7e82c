// SparQ kernels for NVIDIA GPUs (CUDA C). Semantics: sparq.h.
//
// No torch, no Python: raw device pointers, sizes, and a cudaStream_t. No
// kernel reads a value on the host, so every entry point is graph-capturable.
//
//   build        transpose k -> kt through 32x32 shared tiles; v_mean: one
//                block per (b, kv head), float32 column sums
//   append       one block per (b, kv head), one thread per channel
//   top channels grid (rows, B), one thread per channel: rank by counting
//   scores       two passes. logits: grid (token blocks of 1024, rows, B),
//                one thread per 4 tokens, r coalesced reads of kt rows, all
//                query heads of the row at once; per-block (max, sum exp)
//                partials. normalize: merges the partials of each head and
//                rewrites the logits as probabilities (and, in group mode,
//                the group sum that the selection ranks)
//   top-k        sm_90 and rows up to 128k keys: one thread-block cluster of
//                8 blocks per row, the row's keys held in registers (each
//                thread a contiguous run), 4-pass 8-bit radix select with the
//                8 shared histograms summed through distributed shared
//                memory, then an order-preserving compaction (block scans and
//                a cluster-wide prefix of per-block counts).
//                Otherwise: grid (rows, B), 1024 threads, the same radix
//                select streaming the row from L2 (any length)
//   fused op     on sm_90 (cap <= 128k), three kernels: the logits kernel
//                also ranks the channels (every block of a row the same way)
//                and zeroes the split counters; the cluster selection
//                merges the softmax partials itself, ranks p computed from
//                the logits (normalize_kernel's arithmetic) and sums alpha
//                over what it keeps; the attention takes that alpha instead
//                of reading s_hat. The last two launch with PDL. Elsewhere:
//                the step kernels in turn
//   attention    grid (splits, rows, B), 4 warps; each warp takes chunks of
//                i2 entries (16-byte K/V loads, Lanes<D> lanes per token, several
//                tokens in flight), online softmax for all query heads of the
//                row; the last split block of a row merges the partials and
//                applies the mean-value reallocation
//
// Head dims: D in {64, 80, 96, 128, 256} (ks_sparq_build_cuda and the
// attention dispatch check it). Only the attention is templated on D: it gives
// a token LPT lanes, D/8 rounded up to a power of two (Lanes<D>: 8, 16, 16,
// 16, 32), so that the __shfl_xor_sync reductions stay butterflies inside
// aligned lane groups. For D = 80 and 96 (10 and 12 chunks of 8) lanes
// c >= D/8 are padding: they load nothing (zeros in registers), add zeros to
// every reduction and store nothing; the tensors stay D-contiguous. D = 256
// takes a whole warp per token (one token per warp step, so the smallest warp
// chunk, and with it the workspace bound, depends on D: at_min_chunk). The
// other kernels loop over D at run time (any D <= 256).
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>
#include <stdint.h>
#include <stdlib.h>

#include "ks_cuda.cuh"
#include "sparq.h"

namespace {

using ks_cuda::block_exclusive_scan;
using ks_cuda::clamp_len;
using ks_cuda::launch_kernel;
using ks_cuda::pdl_enabled;
using ks_cuda::pdl_launch_dependents;
using ks_cuda::pdl_wait;
using ks_cuda::finish;
using ks_cuda::from_f;
using ks_cuda::merge_w;
using ks_cuda::ninf_mark;
using ks_cuda::merge_splits;
using ks_cuda::to_f;
using ks_cuda::warp_max;
using ks_cuda::warp_sum;

// ---------------------------------------------------------- conversions ----
// read-only scalar load through the texture path
template <typename T> __device__ __forceinline__ float ldf(const T *p) { return to_f<T>(__ldg(p)); }

// 8 consecutive elements with 16-byte loads (two for float32)
template <typename T> struct V8;
template <> struct V8<float> {
  struct Raw { float4 a, b; };
  static __device__ __forceinline__ void load(const float *p, Raw &r) {
    r.a = __ldg(reinterpret_cast<const float4 *>(p));
    r.b = __ldg(reinterpret_cast<const float4 *>(p) + 1);
  }
  static __device__ __forceinline__ void zero(Raw &r) { r.a = r.b = make_float4(0.f, 0.f, 0.f, 0.f); }
  static __device__ __forceinline__ void cvt(const Raw &r, float f[8]) {
    f[0] = r.a.x; f[1] = r.a.y; f[2] = r.a.z; f[3] = r.a.w;
    f[4] = r.b.x; f[5] = r.b.y; f[6] = r.b.z; f[7] = r.b.w;
  }
};
template <> struct V8<__half> {
  typedef uint4 Raw;
  static __device__ __forceinline__ void load(const __half *p, Raw &r) {
    r = __ldg(reinterpret_cast<const uint4 *>(p));
  }
  static __device__ __forceinline__ void zero(Raw &r) { r = make_uint4(0, 0, 0, 0); }
  static __device__ __forceinline__ void cvt(const Raw &r, float f[8]) {
    const __half2 *h = reinterpret_cast<const __half2 *>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __half22float2(h[i]);
      f[2 * i] = x.x; f[2 * i + 1] = x.y;
    }
  }
};
template <> struct V8<__nv_bfloat16> {
  typedef uint4 Raw;
  static __device__ __forceinline__ void load(const __nv_bfloat16 *p, Raw &r) {
    r = __ldg(reinterpret_cast<const uint4 *>(p));
  }
  static __device__ __forceinline__ void zero(Raw &r) { r = make_uint4(0, 0, 0, 0); }
  static __device__ __forceinline__ void cvt(const Raw &r, float f[8]) {
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x; f[2 * i + 1] = x.y;
    }
  }
};



// Order key of a float: larger float -> larger key; NaN ranks as +inf and
// -0 as +0, so that the order matches the CPU's comparisons exactly. Integer
// ops only: builds use --use_fast_math (flush-to-zero), under which float
// compares would treat subnormals as 0 while the CPU orders them.
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f);
  const uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) u = 0x7f800000u;  // NaN -> +inf
  else if (mag == 0u) u = 0u;              // -0 -> +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

// Lanes of one token in the attention: D/8 chunks of 8 elements, rounded up
// to a power of two; chunks c >= CH are padding.
template <int D> struct Lanes {
  static_assert(D % 8 == 0 && D >= 8 && D <= 256, "head_dim: a multiple of 8 up to 256");
  static constexpr int CH = D / 8;                                    // real chunks
  static constexpr int N = CH <= 8 ? 8 : CH <= 16 ? 16 : 32;          // lanes
};
// the head dims the attention is instantiated for
bool attn_head_dim_ok(int64_t D) { return D == 64 || D == 80 || D == 96 || D == 128 || D == 256; }
int lanes_of(int64_t D) { return D <= 64 ? 8 : D <= 128 ? 16 : 32; }

int maxg_bucket(int g) { return g <= 1 ? 1 : g <= 2 ? 2 : g <= 4 ? 4 : g <= 8 ? 8 : 0; }

// ------------------------------------------------------------ build --------
constexpr int TR_TILE = 32;

template <typename T>
__global__ void transpose_kernel(const T *__restrict__ k, int64_t cap, int D, T *__restrict__ kt) {
  __shared__ T tile[TR_TILE][TR_TILE + 1];
  const size_t bh = blockIdx.z;
  const int64_t t0 = (int64_t)blockIdx.x * TR_TILE;
  const int d0 = blockIdx.y * TR_TILE;
  const T *src = k + bh * cap * D;
  T *dst = kt + bh * (size_t)D * cap;
  for (int i = threadIdx.y; i < TR_TILE; i += blockDim.y) {
    const int64_t t = t0 + i;
    const int d = d0 + threadIdx.x;
    if (t < cap && d < D) tile[i][threadIdx.x] = src[t * D + d];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < TR_TILE; i += blockDim.y) {
    const int d = d0 + i;
    const int64_t t = t0 + threadIdx.x;
    if (t < cap && d < D) dst[(size_t)d * cap + t] = tile[threadIdx.x][i];
  }
}

constexpr int VM_THREADS = 1024;

template <typename T>
__global__ void __launch_bounds__(VM_THREADS)
vmean_kernel(const T *__restrict__ v, int Hkv, int64_t cap, int D, const int32_t *seq_lens,
             float *__restrict__ v_mean) {
  __shared__ float red[VM_THREADS];
  const int bh = blockIdx.x, b = bh / Hkv;
  const int len = clamp_len(seq_lens, b, cap);
  const int rows = blockDim.x / D;  // D <= 256: at least 4 rows; threads past rows * D idle
  const int d = threadIdx.x % D, row = threadIdx.x / D;
  float acc = 0.f;
  const T *vp = v + (size_t)bh * cap * D;
  if (row < rows)
    for (int t = row; t < len; t += rows) acc += ldf(vp + (size_t)t * D + d);
  red[threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x < D) {
    float s = 0.f;
    for (int i = 0; i < rows; ++i) s += red[i * D + threadIdx.x];
    v_mean[(size_t)bh * D + threadIdx.x] = len > 0 ? s / (float)len : 0.f;
  }
}

template <typename T>
__global__ void append_kernel(const T *__restrict__ k_new, const T *__restrict__ v_new, int Hkv,
                              int64_t cap, int D, int n_new, const int32_t *seq_lens, T *k, T *v,
                              T *kt, float *v_mean) {
  const int bh = blockIdx.x, b = bh / Hkv;
  const int64_t len = seq_lens[b];
  if (len < 0 || len + n_new > cap) return;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f;
    for (int i = 0; i < n_new; ++i) {
      const size_t src = ((size_t)bh * n_new + i) * D + d;
      const size_t dst = ((size_t)bh * cap + len + i) * D + d;
      const T kx = k_new[src], vx = v_new[src];
      k[dst] = kx;
      v[dst] = vx;
      kt[((size_t)bh * D + d) * cap + len + i] = kx;
      sum += to_f<T>(vx);
    }
    float *vm = v_mean + (size_t)bh * D + d;
    const float m = *vm;
    *vm = m + (sum - (float)n_new * m) / (float)(len + n_new);
  }
}

// ----------------------------------------------------- top channels --------
// The r channels with the largest sum over the nh query heads h0 .. h0+nh-1
// of |q[b, h, d]| (float32, head order; ties to the lower channel), written
// ascending to out[0 .. r). key and flag: D words of shared memory each.
// Contains __syncthreads: call uniformly over the block.
template <typename T>
__device__ __forceinline__ void rank_channels(const T *__restrict__ q, int b, int H, int h0, int nh,
                                              int D, int r, uint32_t *key, uint32_t *flag,
                                              int32_t *out) {
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float s = 0.f;
    for (int g = 0; g < nh; ++g) s += fabsf(ldf(q + ((size_t)b * H + h0 + g) * D + d));
    key[d] = order_key(s);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const uint32_t kd = key[d];
    int rank = 0;
    for (int j = 0; j < D; ++j) {
      const uint32_t kj = key[j];
      rank += (kj > kd || (kj == kd && j < d)) ? 1 : 0;
    }
    flag[d] = rank < r ? 1 : 0;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    if (!flag[d]) continue;
    int pos = 0;
    for (int j = 0; j < d; ++j) pos += (int)flag[j];
    out[pos] = d;
  }
}

template <typename T>
__global__ void top_channels_kernel(const T *__restrict__ q, int H, int D, int r, int gs,
                                    int32_t *__restrict__ i1) {
  extern __shared__ uint32_t tc_smem[];  // [D] order keys, then [D] flags
  const int row = blockIdx.x, Hs = gridDim.x, b = blockIdx.y;
  rank_channels(q, b, H, row * gs, gs, D, r, tc_smem, tc_smem + D, i1 + ((size_t)b * Hs + row) * r);
}

// ------------------------------------------------------------- scores ------
constexpr int AS_THREADS = 256;                    // normalize_kernel
constexpr int AS_TPT = 4;                          // tokens per thread (normalize_kernel)
constexpr int AS_TOK = AS_THREADS * AS_TPT;        // tokens per block (both passes)
constexpr int AS_MAXR = 256;                       // r <= D <= 256
// logits_kernel threads: 128 (8 consecutive tokens each, 16-byte kt loads) for
// one or two query heads per row; 256 (4 strided tokens each) for more, where
// the 8 x MAXG accumulators measured slower (H100, MAXG 4: 23.6 vs 17 us)
template <int MAXG> constexpr int as_logit_threads() { return MAXG <= 2 ? 128 : 256; }

// Pass 1: logits z (written into s_hat for t < len) and per-block (max, sum
// exp(z - max)) for every query head of the row. Blocks at or past len exit.
template <typename T, int MAXG, int NT>
__global__ void __launch_bounds__(NT)
logits_kernel(const T *__restrict__ q, const T *__restrict__ kt, int H, int Hkv, int64_t cap,
              int D, const int32_t *__restrict__ i1, int r, const int32_t *seq_lens,
              float *__restrict__ s_hat, float *__restrict__ part, int *__restrict__ counters) {
  __shared__ int s_c[AS_MAXR];
  __shared__ uint32_t s_key[AS_MAXR], s_flag[AS_MAXR];
  __shared__ float s_q[MAXG][AS_MAXR];
  __shared__ float s_red[NT / 32][MAXG];
  __shared__ float s_bm[MAXG];
  const int row = blockIdx.y, Hs1 = gridDim.y, b = blockIdx.z, blk = blockIdx.x;
  const int nblk = gridDim.x;
  const int G = H / Hkv;
  const int nh = (Hs1 == H) ? 1 : G;
  const int h0 = (Hs1 == H) ? row : row * G;
  const int hk = h0 / G;
  const int len = clamp_len(seq_lens, b, cap);
  const int64_t t0 = (int64_t)blk * AS_TOK;
  // the fused op: this row's attention split counter starts at 0 (the
  // attention kernel runs after this one, so the write is visible there)
  if (counters && blk == 0 && threadIdx.x == 0) counters[(size_t)b * Hs1 + row] = 0;
  if (t0 >= len) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  pdl_launch_dependents();  // the fused op's selection may be scheduled now

  if (i1) {
    for (int j = threadIdx.x; j < r; j += blockDim.x) {
      const int c = i1[((size_t)b * Hs1 + row) * r + j];
      s_c[j] = (c >= 0 && c < D) ? c : 0;
    }
  } else {
    // the fused op: the row's top-r channels, as top_channels_kernel computes them
    rank_channels(q, b, H, h0, nh, D, r, s_key, s_flag, s_c);
  }
  __syncthreads();
  // warp w: tau of query heads g = w, w + 4, ..., then their q values on i1, divided by tau
  for (int g = warp; g < MAXG; g += NT / 32) {
    if (g < nh) {
      const T *qr = q + ((size_t)b * H + h0 + g) * D;
      float l1 = 0.f, l1s = 0.f;
      for (int d = lane; d < D; d += 32) l1 += fabsf(ldf(qr + d));
      for (int j = lane; j < r; j += 32) l1s += fabsf(ldf(qr + s_c[j]));
      l1 = warp_sum(l1);
      l1s = warp_sum(l1s);
      const float inv_tau = l1s > 0.f ? 1.f / sqrtf((float)D * (l1s / l1)) : 0.f;
      for (int j = lane; j < r; j += 32) s_q[g][j] = ldf(qr + s_c[j]) * inv_tau;
    } else {
      for (int j = lane; j < r; j += 32) s_q[g][j] = 0.f;
    }
  }
  __syncthreads();

  constexpr int TPT = AS_TOK / NT;  // tokens per thread
  float acc[MAXG][TPT];
#pragma unroll
  for (int g = 0; g < MAXG; ++g)
#pragma unroll
    for (int i = 0; i < TPT; ++i) acc[g][i] = 0.f;
  const T *ktb = kt + ((size_t)b * Hkv + hk) * (size_t)D * cap;
  // TPT == 8: each thread 8 consecutive tokens, one 16-byte load per kt row
  // when the run is whole and the rows are 16-byte aligned (cap % 8 == 0).
  // Otherwise token i of a thread is t0 + i * NT + thread (coalesced scalars).
  int64_t tt[TPT];
  bool ok[TPT];
  const int64_t tb = t0 + (int64_t)threadIdx.x * TPT;
#pragma unroll
  for (int i = 0; i < TPT; ++i) {
    tt[i] = TPT == 8 ? tb + i : t0 + i * NT + threadIdx.x;
    ok[i] = tt[i] < len;
  }
  const bool vec = TPT == 8 && (cap % 8) == 0 && tb + TPT <= len;
#pragma unroll 4
  for (int j = 0; j < r; ++j) {
    const T *rowp = ktb + (size_t)s_c[j] * cap;
    float x[TPT];
    if (vec) {
      typename V8<T>::Raw raw;
      V8<T>::load(rowp + tb, raw);
      float x8[8];
      V8<T>::cvt(raw, x8);
#pragma unroll
      for (int i = 0; i < TPT; ++i) x[i] = x8[i % 8];
    } else {
#pragma unroll
      for (int i = 0; i < TPT; ++i) x[i] = ok[i] ? ldf(rowp + tt[i]) : 0.f;
    }
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      const float w = s_q[g][j];
#pragma unroll
      for (int i = 0; i < TPT; ++i) acc[g][i] = fmaf(w, x[i], acc[g][i]);
    }
  }
  // write the logits and reduce (max, sum exp) per head over the block
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    if (g >= nh) break;
    float* srow = s_hat + ((size_t)b * H + h0 + g) * cap;
    float m = -CUDART_INF_F;
    if (vec) {
      float4 *dst = reinterpret_cast<float4 *>(srow + tb);
      dst[0] = make_float4(acc[g][0 % TPT], acc[g][1 % TPT], acc[g][2 % TPT], acc[g][3 % TPT]);
      dst[1] = make_float4(acc[g][4 % TPT], acc[g][5 % TPT], acc[g][6 % TPT], acc[g][7 % TPT]);
#pragma unroll
      for (int i = 0; i < TPT; ++i) m = fmaxf(m, acc[g][i]);
    } else {
#pragma unroll
      for (int i = 0; i < TPT; ++i)
        if (ok[i]) {
          srow[tt[i]] = acc[g][i];
          m = fmaxf(m, acc[g][i]);
        }
    }
    m = warp_max(m);
    if (lane == 0) s_red[warp][g] = m;
  }
  __syncthreads();
  if (threadIdx.x < MAXG && threadIdx.x < nh) {
    float m = -CUDART_INF_F;
    for (int w = 0; w < NT / 32; ++w) m = fmaxf(m, s_red[w][threadIdx.x]);
    s_bm[threadIdx.x] = m;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    if (g >= nh) break;
    const float bm = s_bm[g];
    float l = 0.f;
#pragma unroll
    for (int i = 0; i < TPT; ++i)  // bm == -inf: -inf / NaN marks (ks_cuda.cuh)
      if (ok[i]) l += bm == -CUDART_INF_F ? ninf_mark(acc[g][i]) : expf(acc[g][i] - bm);
    l = warp_sum(l);
    if (lane == 0) s_red[warp][g] = l;
  }
  __syncthreads();
  if (threadIdx.x < MAXG && threadIdx.x < nh) {
    float l = 0.f;
    for (int w = 0; w < NT / 32; ++w) l += s_red[w][threadIdx.x];
    float *p = part + (((size_t)b * H + h0 + threadIdx.x) * nblk + blk) * 2;
    p[0] = s_bm[threadIdx.x];
    p[1] = l;
  }
}

// Pass 2: probabilities. Every t < cap is written (0 past len). With rowscore,
// also the row's sum over its query heads in head order (group-mode key).
template <int MAXG>
__global__ void __launch_bounds__(AS_THREADS)
normalize_kernel(int H, int Hkv, int64_t cap, const int32_t *seq_lens, const float *__restrict__ part,
                 float *__restrict__ s_hat, float *__restrict__ rowscore) {
  __shared__ float s_M[MAXG], s_L[MAXG];
  const int row = blockIdx.y, Hs1 = gridDim.y, b = blockIdx.z;
  const int nblk = gridDim.x;
  const int G = H / Hkv;
  const int nh = (Hs1 == H) ? 1 : G;
  const int h0 = (Hs1 == H) ? row : row * G;
  const int len = clamp_len(seq_lens, b, cap);
  const int nvalid = (int)((len + AS_TOK - 1) / AS_TOK);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int g = warp; g < MAXG && g < nh; g += AS_THREADS / 32) {
    const float *p = part + ((size_t)b * H + h0 + g) * nblk * 2;
    float M = -CUDART_INF_F;
    for (int j = lane; j < nvalid; j += 32) M = fmaxf(M, p[2 * j]);
    M = warp_max(M);
    float L = 0.f;  // NaN when a logit is NaN or +inf (kept by 0 * NaN)
    for (int j = lane; j < nvalid; j += 32)
      L += p[2 * j + 1] * (M == -CUDART_INF_F ? 1.f : expf(p[2 * j] - M));
    L = warp_sum(L);
    if (lane == 0) { s_M[g] = M; s_L[g] = L; }
  }
  __syncthreads();
  const int64_t t0 = (int64_t)blockIdx.x * AS_TOK;
#pragma unroll
  for (int i = 0; i < AS_TPT; ++i) {
    const int64_t t = t0 + i * AS_THREADS + threadIdx.x;
    if (t >= cap) break;
    float sum = 0.f;
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      if (g >= nh) break;
      float *sp = s_hat + ((size_t)b * H + h0 + g) * cap + t;
      float p = 0.f;
      if (t < len) {
        // NaN policy (dense softmax): NaN / +inf logits (L NaN) or all -inf give NaN
        p = s_M[g] == -CUDART_INF_F ? CUDART_NAN_F : expf(*sp - s_M[g]) / s_L[g];
      }
      *sp = p;
      sum += p;
    }
    if (rowscore) rowscore[((size_t)b * Hs1 + row) * cap + t] = sum;
  }
}

// group key for the standalone selection: sum of each group's rows, head order
__global__ void group_sum_kernel(const float *__restrict__ s_hat, int H, int gs, int64_t cap,
                                 float *__restrict__ out) {
  const int row = blockIdx.y, Hs = gridDim.y, b = blockIdx.z;
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= cap) return;
  float s = 0.f;
  for (int g = 0; g < gs; ++g) s += s_hat[((size_t)b * H + (size_t)row * gs + g) * cap + t];
  out[((size_t)b * Hs + row) * cap + t] = s;
}

// --------------------------------------------------------------- top-k -----
constexpr int SEL_THREADS = 1024;


// keys: [B, Hs, cap] floats. One block per (row, b).
__global__ void __launch_bounds__(SEL_THREADS)
select_kernel(const float *__restrict__ keys, int64_t cap, const int32_t *seq_lens, int n_sel,
              int local_window, int32_t *__restrict__ i2) {
  __shared__ int hist[256];
  __shared__ int scan_smem[64];
  __shared__ uint32_t s_prefix;
  __shared__ int s_need;
  const int row = blockIdx.x, Hs = gridDim.x, b = blockIdx.y;
  const size_t rid = (size_t)b * Hs + row;
  const float *sc = keys + rid * cap;
  int32_t *out = i2 + rid * n_sel;
  const int len = clamp_len(seq_lens, b, cap);
  if (n_sel >= len) {
    for (int i = threadIdx.x; i < n_sel; i += blockDim.x) out[i] = i < len ? i : -1;
    return;
  }
  const int w = local_window < n_sel ? local_window : n_sel;
  const int m = len - w;   // candidates 0..m-1
  const int K = n_sel - w; // to take among them (K < m)
  for (int i = threadIdx.x; i < w; i += blockDim.x) out[K + i] = m + i;
  if (K == 0) return;

  // radix select of the K-th largest key, 8 bits per pass
  uint32_t prefix = 0, mask = 0;
  int need = K;
  const int lane = threadIdx.x & 31;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int base = 0; base < m; base += blockDim.x) {
      const int i = base + threadIdx.x;
      bool act = false;
      int bin = 0;
      if (i < m) {
        const uint32_t key = order_key(__ldg(sc + i));
        act = (key & mask) == prefix;
        bin = (key >> shift) & 0xFF;
      }
      // probabilities of similar size share their top bits: aggregate the
      // warp's equal bins before touching shared memory
      const unsigned am = __ballot_sync(0xffffffffu, act);
      if (act) {
        const unsigned peers = __match_any_sync(am, bin);
        if (lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
      }
    }
    __syncthreads();
    const int t = threadIdx.x;
    const int v = t < 256 ? hist[255 - t] : 0;  // bins from the top
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
    __syncthreads();
  }
  // order-preserving compaction: every key above the threshold, and the
  // first `need` keys equal to it (lowest positions first)
  int taken = 0, eq_seen = 0;
  for (int base = 0; base < m; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const uint32_t key = i < m ? order_key(__ldg(sc + i)) : 0u;
    const int is_eq = (i < m && key == prefix) ? 1 : 0;
    int tot_eq;
    const int eq_rank = eq_seen + block_exclusive_scan(is_eq, scan_smem, &tot_eq);
    const int take = (i < m && (key > prefix || (is_eq && eq_rank < need))) ? 1 : 0;
    int tot_take;
    const int pos = taken + block_exclusive_scan(take, scan_smem, &tot_take);
    if (take) out[pos] = i;
    taken += tot_take;
    eq_seen += tot_eq;
    if (taken >= K) break;  // uniform: every thread sees the same totals
  }
}

// Cluster variant: CS_CLUSTER blocks share one row. Block c owns candidates
// [c*per, min(m, (c+1)*per)), per = ceil(m / CS_CLUSTER); thread t of it the
// KPT consecutive candidates from c*per + t*KPT. Same result as select_kernel.
constexpr int CS_THREADS = 512;
constexpr int CS_CLUSTER = 8;
constexpr int CS_MAX_KPT = 32;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Radix select over a cluster: the K-th largest order key among the
// candidates (bit i of `cand`: kk[i] is one) of all blocks of the cluster.
// On return `prefix` is that key and `need` how many keys equal to it are
// taken (the lowest positions first). Uniform over the cluster.
template <int KPT>
__device__ __forceinline__ void cluster_threshold(const uint32_t (&kk)[KPT], uint32_t cand, int K,
                                                  int (*hist)[256], int *scan_smem,
                                                  uint32_t *s_prefix, int *s_need,
                                                  uint32_t &prefix, int &need) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int CL = (int)cluster.num_blocks();
  const int lane = threadIdx.x & 31;
  prefix = 0;
  need = K;
  uint32_t mask = 0;
#pragma unroll 1
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    int *h = hist[pass & 1];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) h[i] = 0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < KPT; ++j) {
      const bool act = ((cand >> j) & 1u) && (kk[j] & mask) == prefix;
      const int bin = (int)((kk[j] >> shift) & 0xFFu);
      const unsigned am = __ballot_sync(0xffffffffu, act);
      if (act) {
        const unsigned peers = __match_any_sync(am, bin);
        if (lane == __ffs(peers) - 1) atomicAdd(&h[bin], __popc(peers));
      }
    }
    // every block's histogram of this pass is complete. (hist[pass & 1] is
    // zeroed again two passes later, after the next cluster.sync, by which
    // time every block has finished reading it.)
    cluster.sync();
    const int t = threadIdx.x;
    int v = 0;
    if (t < 256) {
      // the cluster is always CS_CLUSTER blocks: every remote load in flight at once
      int hv[CS_CLUSTER];
#pragma unroll
      for (int r = 0; r < CS_CLUSTER; ++r) hv[r] = r < CL ? cluster.map_shared_rank(h, r)[255 - t] : 0;
#pragma unroll
      for (int r = 0; r < CS_CLUSTER; ++r) v += hv[r];
    }
    int total;
    const int excl = block_exclusive_scan(v, scan_smem, &total);
    if (t < 256 && excl < need && excl + v >= need) {
      *s_prefix = prefix | ((uint32_t)(255 - t) << shift);
      *s_need = need - excl;
    }
    __syncthreads();
    prefix = *s_prefix;
    need = *s_need;
    mask |= 0xFFu << shift;
  }
}

// Order-preserving compaction after cluster_threshold: the candidates above
// the threshold and the first `need` equal to it (in position order across the
// cluster; block c's candidates precede block c+1's, a thread's precede the
// next thread's) go to out[0 ..). Ends with a cluster.sync after the last
// read of another block's memory.
template <int KPT>
__device__ __forceinline__ void cluster_compact(const uint32_t (&kk)[KPT], uint32_t cand,
                                                uint32_t prefix, int need, int base,
                                                int32_t *__restrict__ out, int *scan_smem,
                                                int *s_cnt, int *s_before, int *range = nullptr) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int crank = (int)cluster.block_rank();
  int gt = 0, eq = 0;
#pragma unroll
  for (int j = 0; j < KPT; ++j) {
    const bool c = (cand >> j) & 1u;
    gt += (c && kk[j] > prefix) ? 1 : 0;
    eq += (c && kk[j] == prefix) ? 1 : 0;
  }
  int tot_gt, tot_eq;
  const int excl_gt = block_exclusive_scan(gt, scan_smem, &tot_gt);
  const int excl_eq = block_exclusive_scan(eq, scan_smem, &tot_eq);
  if (threadIdx.x == 0) { s_cnt[0] = tot_gt; s_cnt[1] = tot_eq; }
  cluster.sync();
  if (threadIdx.x == 0) {
    int gb = 0, eb = 0;
    for (int r = 0; r < crank; ++r) {
      const int *c = cluster.map_shared_rank(s_cnt, r);
      gb += c[0];
      eb += c[1];
    }
    s_before[0] = gb;
    s_before[1] = eb;
  }
  __syncthreads();
  const int gt_before = s_before[0], eq_before = s_before[1];
  int take_eq_block = need - eq_before;
  take_eq_block = take_eq_block < 0 ? 0 : (take_eq_block > tot_eq ? tot_eq : take_eq_block);
  const int eq_taken_before = eq_before < need ? eq_before : need;
  int pos = gt_before + eq_taken_before + excl_gt + (excl_eq < take_eq_block ? excl_eq : take_eq_block);
  int e = eq_before + excl_eq;
  // range (a block's shared memory): this block's entries, out[range[0] .. + range[1])
  if (range && threadIdx.x == 0) {
    range[0] = gt_before + eq_taken_before;
    range[1] = tot_gt + take_eq_block;
  }
#pragma unroll
  for (int j = 0; j < KPT; ++j) {
    if ((cand >> j) & 1u) {
      if (kk[j] > prefix) {
        out[pos++] = base + j;
      } else if (kk[j] == prefix) {
        if (e < need) out[pos++] = base + j;
        ++e;
      }
    }
  }
  // no block may exit while another still reads its shared memory
  cluster.sync();
}
#endif

template <int KPT>
__global__ void __launch_bounds__(CS_THREADS)
select_cluster_kernel(const float *__restrict__ keys, int64_t cap, const int32_t *seq_lens, int n_sel,
                      int local_window, int32_t *__restrict__ i2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  __shared__ int hist[2][256];
  __shared__ int scan_smem[64];
  __shared__ int s_cnt[2];
  __shared__ int s_before[2];
  __shared__ uint32_t s_prefix;
  __shared__ int s_need;
  cg::cluster_group cluster = cg::this_cluster();
  const int crank = (int)cluster.block_rank();
  const int CL = (int)cluster.num_blocks();
  const int row = blockIdx.y, Hs = gridDim.y, b = blockIdx.z;
  const size_t rid = (size_t)b * Hs + row;
  const float *sc = keys + rid * cap;
  int32_t *out = i2 + rid * n_sel;
  const int len = clamp_len(seq_lens, b, cap);
  // the conditions below are uniform over the cluster (one row): either every
  // block returns here or none does
  if (n_sel >= len) {
    for (int i = crank * blockDim.x + threadIdx.x; i < n_sel; i += CL * blockDim.x) out[i] = i < len ? i : -1;
    return;
  }
  const int w = local_window < n_sel ? local_window : n_sel;
  const int m = len - w;
  const int K = n_sel - w;
  if (crank == 0)
    for (int i = threadIdx.x; i < w; i += blockDim.x) out[K + i] = m + i;
  if (K == 0) return;

  const int per = (m + CL - 1) / CL;
  const int cs = crank * per;
  const int ce = cs + per < m ? cs + per : m;
  const int base = cs + (int)threadIdx.x * KPT;
  int nval = ce - base;
  nval = nval < 0 ? 0 : (nval > KPT ? KPT : nval);
  const uint32_t cand = nval >= 32 ? 0xffffffffu : ((1u << nval) - 1u);
  uint32_t kk[KPT];
#pragma unroll
  for (int j = 0; j < KPT; ++j) kk[j] = j < nval ? order_key(__ldg(sc + base + j)) : 0u;
  uint32_t prefix;
  int need;
  cluster_threshold<KPT>(kk, cand, K, hist, scan_smem, &s_prefix, &s_need, prefix, need);
  cluster_compact<KPT>(kk, cand, prefix, need, base, out, scan_smem, s_cnt, s_before);
#else
  __trap();
#endif
}

// The fused op's selection (sm_90): the normalize pass and the alpha sums of
// the reallocation folded into the cluster select. z holds the logits of
// logits_kernel ([B, H, cap], t < len written), part its per-block (max, sum
// exp) partials ([B, H, nblk, 2]). The key of a position is the sum over the
// row's query heads, in head order from 0, of p_g = exp(z_g - M_g) / L_g:
// the same float operations as normalize_kernel, so the same selection as
// normalize + select_cluster_kernel. With alpha != NULL, alpha[b, h] = the
// sum of p_h over the selected positions (the window included), reduced over
// the block and then the cluster in a fixed order; the attention reads it in
// place of s_hat.

// Up to 8 keys a thread (rows up to 32k): registers for 3 blocks per
// multiprocessor. At 63 registers (2 per SM) the 32 clusters of H_kv = 32
// did not all fit at once on the H100 and ran in two waves (ncu: 51 us, SMs
// active 54% of the time).
template <int KPT>
__global__ void __launch_bounds__(CS_THREADS, KPT <= 8 ? 3 : 1)
select_fused_kernel(const float *__restrict__ z, const float *__restrict__ part, int nblk, int H,
                    int Hkv, int64_t cap, const int32_t *seq_lens, int n_sel, int local_window,
                    int32_t *__restrict__ i2, float *__restrict__ alpha) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int SF_MAXG = 8;  // query heads per row (G <= 8)
  namespace cg = cooperative_groups;
  __shared__ int hist[2][256];
  __shared__ int scan_smem[64];
  __shared__ int s_cnt[2];
  __shared__ int s_before[2];
  __shared__ uint32_t s_prefix;
  __shared__ int s_need;
  __shared__ float s_M[SF_MAXG], s_L[SF_MAXG];
  __shared__ float s_red[CS_THREADS / 32][SF_MAXG];
  __shared__ float s_al[SF_MAXG];
  __shared__ int s_range[2];
  cg::cluster_group cluster = cg::this_cluster();
  const int crank = (int)cluster.block_rank();
  const int CL = (int)cluster.num_blocks();
  const int row = blockIdx.y, Hs = gridDim.y, b = blockIdx.z;
  const int G = H / Hkv;
  const int nh = (Hs == H) ? 1 : G;
  const int h0 = (Hs == H) ? row : row * G;
  const size_t rid = (size_t)b * Hs + row;
  int32_t *out = i2 + rid * n_sel;
  const int len = clamp_len(seq_lens, b, cap);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  pdl_wait();  // logits and partials come from the previous kernel
  pdl_launch_dependents();
  // the softmax statistics of every head of the row (normalize_kernel's code)
  const int nvalid = (int)((len + AS_TOK - 1) / AS_TOK);
  for (int g = warp; g < nh; g += CS_THREADS / 32) {
    const float *p = part + ((size_t)b * H + h0 + g) * nblk * 2;
    float M = -CUDART_INF_F;
    for (int j = lane; j < nvalid; j += 32) M = fmaxf(M, p[2 * j]);
    M = warp_max(M);
    float L = 0.f;
    for (int j = lane; j < nvalid; j += 32)
      L += p[2 * j + 1] * (M == -CUDART_INF_F ? 1.f : expf(p[2 * j] - M));
    L = warp_sum(L);
    if (lane == 0) { s_M[g] = M; s_L[g] = L; }
  }
  __syncthreads();
  const float *zr = z + ((size_t)b * H + h0) * cap;
  // p of head g at t (t < len)
  auto prob = [&](int g, int t) -> float {
    return s_M[g] == -CUDART_INF_F ? CUDART_NAN_F : expf(__ldg(zr + (size_t)g * cap + t) - s_M[g]) / s_L[g];
  };
  float a[SF_MAXG];
#pragma unroll
  for (int g = 0; g < SF_MAXG; ++g) a[g] = 0.f;
  auto add_alpha = [&](int t) {
#pragma unroll
    for (int g = 0; g < SF_MAXG; ++g)
      if (g < nh) a[g] += prob(g, t);
  };
  // the conditions below are uniform over the cluster (one row)
  if (n_sel >= len) {
    for (int i = crank * blockDim.x + threadIdx.x; i < n_sel; i += CL * blockDim.x) out[i] = i < len ? i : -1;
    if (alpha)
      for (int t = crank * blockDim.x + threadIdx.x; t < len; t += CL * blockDim.x) add_alpha(t);
  } else {
    const int w = local_window < n_sel ? local_window : n_sel;
    const int m = len - w;
    const int K = n_sel - w;
    if (crank == 0)
      for (int i = threadIdx.x; i < w; i += blockDim.x) out[K + i] = m + i;
    if (K > 0) {
      const int per = (m + CL - 1) / CL;
      const int cs = crank * per;
      const int ce = cs + per < m ? cs + per : m;
      const int base = cs + (int)threadIdx.x * KPT;
      int nval = ce - base;
      nval = nval < 0 ? 0 : (nval > KPT ? KPT : nval);
      const uint32_t cand = nval >= 32 ? 0xffffffffu : ((1u << nval) - 1u);
      uint32_t kk[KPT];
#pragma unroll
      for (int j = 0; j < KPT; ++j) {
        float key = 0.f;
        if (j < nval)
          for (int g = 0; g < nh; ++g) key += prob(g, base + j);
        kk[j] = j < nval ? order_key(key) : 0u;
      }
      uint32_t prefix;
      int need;
      cluster_threshold<KPT>(kk, cand, K, hist, scan_smem, &s_prefix, &s_need, prefix, need);
      cluster_compact<KPT>(kk, cand, prefix, need, base, out, scan_smem, s_cnt, s_before, s_range);
      if (alpha) {
        // alpha over the entries this block wrote (visible to the block after
        // the compaction's barriers), read back: kk is dead here, which keeps
        // the kernel's registers (and so the resident clusters) as the plain
        // selection's
        __syncthreads();
        const int r0 = s_range[0], rn = s_range[1];
        for (int i = threadIdx.x; i < rn; i += blockDim.x) add_alpha(out[r0 + i]);
      }
    }
    // the window's share of alpha (after the selection: a[] is not live there)
    if (alpha)
      for (int t = m + crank * blockDim.x + threadIdx.x; t < len; t += CL * blockDim.x) add_alpha(t);
  }
  if (!alpha) return;  // uniform
  // alpha: warp, block, then cluster sums in a fixed order
#pragma unroll
  for (int g = 0; g < SF_MAXG; ++g) {
    if (g >= nh) break;
    const float x = warp_sum(a[g]);
    if (lane == 0) s_red[warp][g] = x;
  }
  __syncthreads();
  if (threadIdx.x < nh) {
    float x = 0.f;
    for (int w = 0; w < CS_THREADS / 32; ++w) x += s_red[w][threadIdx.x];
    s_al[threadIdx.x] = x;
  }
  cluster.sync();
  if (crank == 0 && threadIdx.x < nh) {
    float x = 0.f;
    for (int c = 0; c < CL; ++c) x += cluster.map_shared_rank(s_al, c)[threadIdx.x];
    alpha[(size_t)b * H + h0 + threadIdx.x] = x;
  }
  cluster.sync();  // no block exits while rank 0 reads its s_al
#else
  __trap();
#endif
}

// ----------------------------------------------------------- attention -----
constexpr int AT_WARPS = 4;
// smallest entries per warp chunk (tokens per warp step at the smallest unroll,
// 4): the workspace bound on the number of splits
int at_min_chunk(int64_t D) { return (32 / lanes_of(D)) * 4; }

template <typename T, int MAXG> __host__ __device__ constexpr int at_unroll() {
  return (sizeof(T) == 2 && MAXG <= 4) ? 8 : 4;
}

// partial record per (b, row, split, head): acc[D], m, l, alpha
template <typename T, int D, int MAXG>
__global__ void __launch_bounds__(AT_WARPS * 32)
sparse_attn_kernel(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                   int H, int Hkv, int64_t cap, const int32_t *__restrict__ i2, int n_sel,
                   const float *__restrict__ s_hat, const float *__restrict__ v_mean,
                   const int32_t *seq_lens, float scale_log2, int reallocate, int per_split,
                   float *__restrict__ part, int *counters, const float *__restrict__ alpha_in,
                   T *__restrict__ out) {
  constexpr int LPT = Lanes<D>::N;   // lanes per token
  constexpr int NCH = Lanes<D>::CH;  // lanes c < NCH hold channels; the others zeros
  constexpr int TPS = 32 / LPT;      // tokens per warp step (1 at D = 256)
  constexpr int U = at_unroll<T, MAXG>();
  constexpr int CH = TPS * U;    // entries per warp chunk
  constexpr int REC = D + 3;
  const int row = blockIdx.y, Hs = gridDim.y, b = blockIdx.z, split = blockIdx.x;
  const int nsplit = gridDim.x;
  const int G = H / Hkv;
  const int qh = (Hs == H) ? 1 : G;
  const int h0 = (Hs == H) ? row : row * G;
  const int hk = h0 / G;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c = lane % LPT, sub = lane / LPT;
  const int len = clamp_len(seq_lens, b, cap);

  float qv[MAXG][8];
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    if (g < qh && c < NCH) {
      typename V8<T>::Raw raw;
      V8<T>::load(q + ((size_t)b * H + h0 + g) * D + c * 8, raw);
      V8<T>::cvt(raw, qv[g]);
#pragma unroll
      for (int i = 0; i < 8; ++i) qv[g][i] *= scale_log2;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) qv[g][i] = 0.f;
    }
  }
  float mrun[MAXG], lrun[MAXG], arun[MAXG], acc[MAXG][8];
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    mrun[g] = -CUDART_INF_F; lrun[g] = 0.f; arun[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
  }
  const size_t kv_base = ((size_t)b * Hkv + hk) * cap;
  const int32_t *idx = i2 + ((size_t)b * Hs + row) * n_sel;
  pdl_wait();  // the fused op: i2 and alpha come from the selection kernel
  // alpha_in (the fused op): each head's alpha, summed by the selection
  const bool sum_alpha = reallocate && alpha_in == nullptr;
  const int e_begin = split * per_split;
  const int e_end = min(n_sel, e_begin + per_split);
  for (int e0 = e_begin + warp * CH; e0 < e_end; e0 += AT_WARPS * CH) {
    int tok[U];
    typename V8<T>::Raw kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int e = e0 + u * TPS + sub;
      int t = e < e_end ? idx[e] : -1;
      t = (t >= 0 && t < len) ? t : -1;
      tok[u] = t;
      if (t >= 0 && c < NCH) {
        V8<T>::load(k + (kv_base + t) * D + c * 8, kr[u]);
        V8<T>::load(v + (kv_base + t) * D + c * 8, vr[u]);
      } else {
        V8<T>::zero(kr[u]);
        V8<T>::zero(vr[u]);
      }
    }
    if (sum_alpha && c == 0) {
#pragma unroll
      for (int g = 0; g < MAXG; ++g) {
        if (g >= qh) break;
        const float *sh = s_hat + ((size_t)b * H + h0 + g) * cap;
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (tok[u] >= 0) arun[g] += __ldg(sh + tok[u]);
      }
    }
    float s[MAXG][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kx[8];
      V8<T>::cvt(kr[u], kx);
#pragma unroll
      for (int g = 0; g < MAXG; ++g) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) d = fmaf(qv[g][i], kx[i], d);
#pragma unroll
        for (int o = LPT / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        s[g][u] = tok[u] >= 0 ? d : -CUDART_INF_F;
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
          if (tok[u] >= 0) lrun[g] += ninf_mark(s[g][u]);
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
        V8<T>::cvt(vr[u], vx);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(pr, vx[i], acc[g][i]);
      }
      mrun[g] = mnew;
    }
  }
  // merge the TPS token slots of the warp (lanes with equal c); alpha: sum
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    arun[g] = warp_sum(arun[g]);
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
  __shared__ float s_m[AT_WARPS][MAXG], s_l[AT_WARPS][MAXG], s_a[AT_WARPS][MAXG];
  __shared__ float s_acc[AT_WARPS][MAXG][D];
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      if (c < NCH) {
#pragma unroll
        for (int i = 0; i < 8; ++i) s_acc[warp][g][c * 8 + i] = acc[g][i];
      }
      if (c == 0) { s_m[warp][g] = mrun[g]; s_l[warp][g] = lrun[g]; s_a[warp][g] = arun[g]; }
    }
  }
  __syncthreads();
  float *my_part = part + (((size_t)b * Hs + row) * nsplit + split) * (size_t)qh * REC;
  for (int ix = threadIdx.x; ix < qh * D; ix += blockDim.x) {
    const int g = ix / D, d = ix % D;
    float M = -CUDART_INF_F, L = 0.f, A = 0.f, AL = 0.f;
#pragma unroll
    for (int w = 0; w < AT_WARPS; ++w) M = fmaxf(M, s_m[w][g]);
#pragma unroll
    for (int w = 0; w < AT_WARPS; ++w) {
      AL += s_a[w][g];
      if (M != -CUDART_INF_F) {
        const float cw = exp2f(s_m[w][g] - M);
        L += s_l[w][g] * cw;
        A += s_acc[w][g][d] * cw;
      } else {
        L += s_l[w][g];  // -inf / NaN marks only (ks_cuda.cuh)
      }
    }
    if (alpha_in) AL = alpha_in[(size_t)b * H + h0 + g];
    if (nsplit == 1) {
      float y = finish(A, M, L);  // NaN stays NaN through the mean-V mix below
      if (reallocate) y = AL * y + (1.f - AL) * v_mean[((size_t)b * Hkv + hk) * D + d];
      out[((size_t)b * H + h0 + g) * D + d] = from_f<T>(y);
    } else {
      my_part[g * REC + d] = A;
      if (d == 0) {
        my_part[g * REC + D] = M;
        my_part[g * REC + D + 1] = L;
        my_part[g * REC + D + 2] = AL;
      }
    }
  }
  if (nsplit == 1) return;

  // the last split block of this row merges every split
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(&counters[(size_t)b * Hs + row], 1) == nsplit - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const float *rp = part + ((size_t)b * Hs + row) * nsplit * (size_t)qh * REC;
  __shared__ float s_M[MAXG], s_L[MAXG], s_AL[MAXG];
  // MAXG <= 8 heads and D <= 256: qh * D <= 2048 = 16 outputs per thread
  constexpr int PER = (MAXG * D + AT_WARPS * 32 - 1) / (AT_WARPS * 32);
  float A[PER];
  merge_splits<MAXG>(rp, nsplit, qh, D, REC, s_M, s_L, A);
  for (int g = warp; g < qh; g += AT_WARPS) {  // a warp: the summed alpha of head g
    float AL = 0.f;
    for (int sp = lane; sp < nsplit; sp += 32) AL += __ldcg(rp + ((size_t)sp * qh + g) * REC + D + 2);
    AL = warp_sum(AL);
    if (lane == 0) s_AL[g] = alpha_in ? alpha_in[(size_t)b * H + h0 + g] : AL;
  }
  __syncthreads();
#pragma unroll
  for (int it = 0; it < PER; ++it) {
    const int ix = it * blockDim.x + threadIdx.x;
    if (ix < qh * D) {
      const int g = ix / D, d = ix % D;
      float y = finish(A[it], s_M[g], s_L[g]);  // NaN stays NaN through the mix below
      if (reallocate) y = s_AL[g] * y + (1.f - s_AL[g]) * v_mean[((size_t)b * Hkv + hk) * D + d];
      out[((size_t)b * H + h0 + g) * D + d] = from_f<T>(y);
    }
  }
}

// ---------------------------------------------------------- dispatching ----

int64_t as_nblk(int64_t cap) { return (cap + AS_TOK - 1) / AS_TOK; }

template <typename T>
int launch_build(const void *k, const void *v, int64_t B, int64_t Hkv, int64_t cap, int64_t D,
                 const int32_t *seq_lens, void *kt, float *v_mean, cudaStream_t st) {
  if (cap > 0) {
    dim3 grid((unsigned)((cap + TR_TILE - 1) / TR_TILE), (unsigned)((D + TR_TILE - 1) / TR_TILE),
              (unsigned)(B * Hkv));
    transpose_kernel<T><<<grid, dim3(TR_TILE, 8), 0, st>>>((const T *)k, cap, (int)D, (T *)kt);
  }
  vmean_kernel<T><<<(unsigned)(B * Hkv), VM_THREADS, 0, st>>>((const T *)v, (int)Hkv, cap, (int)D,
                                                             seq_lens, v_mean);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_append(const void *k_new, const void *v_new, int64_t B, int64_t Hkv, int64_t cap,
                  int64_t D, int64_t n_new, const int32_t *seq_lens, void *k, void *v, void *kt,
                  float *v_mean, cudaStream_t st) {
  append_kernel<T><<<(unsigned)(B * Hkv), (unsigned)D, 0, st>>>(
      (const T *)k_new, (const T *)v_new, (int)Hkv, cap, (int)D, (int)n_new, seq_lens, (T *)k,
      (T *)v, (T *)kt, v_mean);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_top_channels(const void *q, int64_t B, int64_t H, int64_t D, int64_t r, int64_t gs,
                        int32_t *i1, cudaStream_t st) {
  dim3 grid((unsigned)(H / gs), (unsigned)B);
  const int threads = D <= 1024 ? (int)((D + 31) / 32 * 32) : 1024;
  top_channels_kernel<T><<<grid, threads, (size_t)D * 2 * sizeof(uint32_t), st>>>(
      (const T *)q, (int)H, (int)D, (int)r, (int)gs, i1);
  return (int)cudaGetLastError();
}

// logits + normalize; rowscore (may be NULL) gets the group sums
template <typename T>
int launch_scores(const void *q, const void *kt, int64_t B, int64_t H, int64_t Hkv, int64_t cap,
                  int64_t D, const int32_t *i1, int64_t Hs1, int64_t r, const int32_t *seq_lens,
                  float *s_hat, float *part, float *rowscore, cudaStream_t st,
                  int *counters = nullptr, bool normalize = true) {
  if (r > AS_MAXR) return (int)cudaErrorInvalidValue;
  const int nh = (Hs1 == H) ? 1 : (int)(H / Hkv);
  dim3 grid((unsigned)as_nblk(cap), (unsigned)Hs1, (unsigned)B);
#define KS_SQ(MG)                                                                              \
  logits_kernel<T, MG, as_logit_threads<MG>()><<<grid, as_logit_threads<MG>(), 0, st>>>((const T *)q, (const T *)kt, (int)H,       \
                                                    (int)Hkv, cap, (int)D, i1, (int)r,         \
                                                    seq_lens, s_hat, part, counters);          \
  if (normalize)                                                                               \
  normalize_kernel<MG><<<grid, AS_THREADS, 0, st>>>((int)H, (int)Hkv, cap, seq_lens, part,     \
                                                    s_hat, rowscore)
  switch (maxg_bucket(nh)) {
    case 1: KS_SQ(1); break;
    case 2: KS_SQ(2); break;
    case 4: KS_SQ(4); break;
    case 8: KS_SQ(8); break;
    default: return (int)cudaErrorInvalidValue;
  }
#undef KS_SQ
  return (int)cudaGetLastError();
}

int num_sms() {
  static int n = 0;
  if (n == 0) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      n = 132;
    }
  }
  return n;
}

int entries_per_split(int64_t B, int64_t Hs, int64_t n_sel, int chunk) {
  // at least one chunk per warp; grow while the grid would take more than
  // about two blocks per multiprocessor (one wave: more blocks only add
  // partials to merge and a second wave's latency)
  int64_t per = (int64_t)AT_WARPS * chunk;
  const int64_t target = 2 * (int64_t)num_sms();
  while (per < 8192 && B * Hs * ((n_sel + per - 1) / per) > target) per *= 2;
  return (int)per;
}

template <typename T, int D>
int launch_attn_t(const void *q, const void *k, const void *v, int64_t B, int64_t H, int64_t Hkv,
                  int64_t cap, const int32_t *i2, int64_t Hs, int64_t n_sel, const float *s_hat,
                  const float *v_mean, const int32_t *seq_lens, float scale,
                  int reallocate, float *part, int *counters, const float *alpha, void *out,
                  cudaStream_t st, bool pdl) {
  const int qh = (Hs == H) ? 1 : (int)(H / Hkv);
  const float sl = scale * 1.4426950408889634f;
#define KS_AT(MG)                                                                              \
  {                                                                                            \
    const int chunk = (32 / Lanes<D>::N) * at_unroll<T, MG>();                                 \
    const int per = entries_per_split(B, Hs, n_sel, chunk);                                    \
    const int64_t ns = n_sel > 0 ? (n_sel + per - 1) / per : 1;                                \
    dim3 grid((unsigned)ns, (unsigned)Hs, (unsigned)B);                                        \
    launch_kernel(pdl, sparse_attn_kernel<T, D, MG>, grid, dim3(AT_WARPS * 32), st,            \
                  (const T *)q, (const T *)k, (const T *)v, (int)H, (int)Hkv, cap, i2,         \
                  (int)n_sel, s_hat, v_mean, seq_lens, sl, reallocate, per, part, counters,    \
                  alpha, (T *)out);                                                            \
  }
  switch (maxg_bucket(qh)) {
    case 1: KS_AT(1); break;
    case 2: KS_AT(2); break;
    case 4: KS_AT(4); break;
    case 8: KS_AT(8); break;
    default: return (int)cudaErrorInvalidValue;
  }
#undef KS_AT
  return (int)cudaGetLastError();
}

template <typename T>
int launch_attn(int64_t D, const void *q, const void *k, const void *v, int64_t B, int64_t H,
                int64_t Hkv, int64_t cap, const int32_t *i2, int64_t Hs, int64_t n_sel,
                const float *s_hat, const float *v_mean, const int32_t *seq_lens, float scale, int reallocate, float *part, int *counters,
                const float *alpha, void *out, cudaStream_t st, bool pdl) {
#define KS_AT_D(DD)                                                                            \
  case DD:                                                                                     \
    return launch_attn_t<T, DD>(q, k, v, B, H, Hkv, cap, i2, Hs, n_sel, s_hat, v_mean,         \
                                seq_lens, scale, reallocate, part, counters, alpha, out, st,   \
                                pdl);
  switch (D) {
    KS_AT_D(64) KS_AT_D(80) KS_AT_D(96) KS_AT_D(128) KS_AT_D(256)
    default: return (int)cudaErrorInvalidValue;
  }
#undef KS_AT_D
}

// grid (CS_CLUSTER, Hs, B) in clusters of CS_CLUSTER blocks (one per row),
// with the PDL attribute when pdl
template <typename... KArgs, typename... Args>
cudaError_t launch_cluster(bool pdl, void (*kernel)(KArgs...), int64_t B, int64_t Hs,
                           cudaStream_t st, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)CS_CLUSTER, (unsigned)Hs, (unsigned)B);
  cfg.blockDim = dim3(CS_THREADS);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = st;
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = CS_CLUSTER;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 2 : 1;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}

// candidates per thread of the cluster selections (CS_MAX_KPT + 1: too many)
int64_t cs_kpt(int64_t cap) {
  const int64_t per_thread = (cap + (int64_t)CS_CLUSTER * CS_THREADS - 1) / ((int64_t)CS_CLUSTER * CS_THREADS);
  int64_t k = 1;
  while (k < per_thread) k *= 2;
  return k;
}

int launch_select_fused(const float *z, const float *part, int nblk, int64_t B, int64_t H,
                        int64_t Hkv, int64_t Hs, int64_t cap, const int32_t *seq_lens, int n_sel,
                        int lw, int32_t *i2, float *alpha, cudaStream_t st, bool pdl) {
#define KS_SF(KK)                                                                                 \
  case KK:                                                                                        \
    return (int)launch_cluster(pdl, select_fused_kernel<KK>, B, Hs, st, z, part, nblk, (int)H,     \
                               (int)Hkv, cap, seq_lens, n_sel, lw, i2, alpha);
  switch (cs_kpt(cap)) {
    KS_SF(1) KS_SF(2) KS_SF(4) KS_SF(8) KS_SF(16) KS_SF(32)
    default: return (int)cudaErrorInvalidValue;
  }
#undef KS_SF
}

// A/B timing switches read once from the environment (KVSPARSE_SPARQ_STEPS=1:
// the fused op runs the step kernels; KVSPARSE_SPARQ_TC=1: the fused path
// ranks the channels in their own kernel)
bool env_flag(const char *name) {
  const char *e = getenv(name);
  return e && e[0] && e[0] != '0';
}

// 1 when the current device runs thread-block clusters (sm_90 and newer)
int clusters_supported() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return 0;
  return major >= 9;
}

// top-k positions of `keys` [B, Hs, cap]: the cluster kernel where it runs,
// the single-block kernel otherwise
int launch_select(const float *keys, int64_t B, int64_t Hs, int64_t cap, const int32_t *seq_lens,
                  int n_sel, int lw, int32_t *i2, cudaStream_t st) {
  if (cs_kpt(cap) <= CS_MAX_KPT && clusters_supported()) {
#define KS_SC(KK)                                                                                 \
  case KK:                                                                                        \
    return (int)launch_cluster(false, select_cluster_kernel<KK>, B, Hs, st, keys, cap, seq_lens,   \
                               n_sel, lw, i2);
    switch (cs_kpt(cap)) {
      KS_SC(1) KS_SC(2) KS_SC(4) KS_SC(8) KS_SC(16) KS_SC(32)
      default: return (int)cudaErrorInvalidValue;
    }
#undef KS_SC
  }
  select_kernel<<<dim3((unsigned)Hs, (unsigned)B), SEL_THREADS, 0, st>>>(keys, cap, seq_lens, n_sel, lw, i2);
  return (int)cudaGetLastError();
}

size_t attn_workspace(int64_t B, int64_t H, int64_t Hs, int64_t D, int64_t n_sel) {
  const int64_t per = (int64_t)AT_WARPS * at_min_chunk(D);  // the smallest entries_per_split
  const int64_t max_splits = n_sel > 0 ? (n_sel + per - 1) / per : 1;
  // per (b, row, split): qh records of D + 3 floats; Hs * qh == H
  return align256((size_t)B * Hs * sizeof(int)) +
         align256((size_t)B * H * max_splits * (D + 3) * sizeof(float));
}

// counters first, partials after (see attn_workspace)
int run_attn(ks_dtype dt, const void *q, const void *k, const void *v, int64_t B, int64_t H,
             int64_t Hkv, int64_t cap, int64_t D, const int32_t *i2, int64_t Hs, int64_t n_sel,
             const float *s_hat, const float *v_mean,
             const int32_t *seq_lens, float scale, int reallocate, void *ws, void *out,
             cudaStream_t st);

}  // namespace

#define KS_DISPATCH(dt, FN, ...)                                      \
  ((dt) == KS_F32    ? FN<float>(__VA_ARGS__)                         \
   : (dt) == KS_F16  ? FN<__half>(__VA_ARGS__)                        \
   : (dt) == KS_BF16 ? FN<__nv_bfloat16>(__VA_ARGS__)                 \
                     : (int)cudaErrorInvalidValue)

namespace {
int run_attn(ks_dtype dt, const void *q, const void *k, const void *v, int64_t B, int64_t H,
             int64_t Hkv, int64_t cap, int64_t D, const int32_t *i2, int64_t Hs, int64_t n_sel,
             const float *s_hat, const float *v_mean,
             const int32_t *seq_lens, float scale, int reallocate, void *ws, void *out,
             cudaStream_t st) {
  int *counters = (int *)ws;
  float *part = (float *)((char *)ws + align256((size_t)B * Hs * sizeof(int)));
  cudaError_t e = cudaMemsetAsync(counters, 0, (size_t)B * Hs * sizeof(int), st);
  if (e != cudaSuccess) return (int)e;
  return KS_DISPATCH(dt, launch_attn, D, q, k, v, B, H, Hkv, cap, i2, Hs, n_sel, s_hat,
                     v_mean, seq_lens, scale, reallocate, part, counters, (const float *)nullptr,
                     out, st, false);
}
}  // namespace

extern "C" {

int ks_sparq_build_cuda(const void *k, const void *v, ks_dtype dt, int64_t B, int64_t Hkv,
                        int64_t cap, int64_t D, const int32_t *seq_lens, void *kt,
                        float *v_mean, void *stream) {
  if (B == 0 || Hkv == 0 || D == 0) return 0;
  if (!attn_head_dim_ok(D)) return (int)cudaErrorInvalidValue;
  return KS_DISPATCH(dt, launch_build, k, v, B, Hkv, cap, D, seq_lens, kt, v_mean,
                     (cudaStream_t)stream);
}

int ks_sparq_append_cuda(const void *k_new, const void *v_new, ks_dtype dt, int64_t B,
                         int64_t Hkv, int64_t cap, int64_t D, int64_t n_new,
                         const int32_t *seq_lens, void *k, void *v, void *kt, float *v_mean,
                         void *stream) {
  if (B == 0 || Hkv == 0 || D == 0 || n_new <= 0) return 0;
  if (D > 1024) return (int)cudaErrorInvalidValue;
  return KS_DISPATCH(dt, launch_append, k_new, v_new, B, Hkv, cap, D, n_new, seq_lens, k, v, kt,
                     v_mean, (cudaStream_t)stream);
}

int ks_sparq_top_channels_cuda(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t D,
                               int64_t r, int64_t group_size, int32_t *i1, void *stream) {
  if (B == 0 || H == 0 || r == 0) return 0;
  return KS_DISPATCH(dt, launch_top_channels, q, B, H, D, r, group_size, i1, (cudaStream_t)stream);
}

size_t ks_sparq_approx_scores_cuda_workspace(int64_t B, int64_t H, int64_t cap) {
  return align256((size_t)B * H * as_nblk(cap) * 2 * sizeof(float));
}

int ks_sparq_approx_scores_cuda(const void *q, const void *kt, ks_dtype dt, int64_t B, int64_t H,
                                int64_t Hkv, int64_t cap, int64_t D, const int32_t *i1,
                                int64_t Hs1, int64_t r, const int32_t *seq_lens, float *s_hat,
                                void *workspace, void *stream) {
  if (B == 0 || H == 0 || cap == 0) return 0;
  return KS_DISPATCH(dt, launch_scores, q, kt, B, H, Hkv, cap, D, i1, Hs1, r, seq_lens, s_hat,
                     (float *)workspace, nullptr, (cudaStream_t)stream);
}

size_t ks_sparq_top_positions_cuda_workspace(int64_t B, int64_t H, int64_t cap,
                                             int64_t group_size) {
  return group_size > 1 ? align256((size_t)B * (H / group_size) * cap * sizeof(float)) : 0;
}

int ks_sparq_top_positions_cuda(const float *s_hat, int64_t B, int64_t H, int64_t cap,
                                const int32_t *seq_lens, int64_t n_sel, int64_t local_window,
                                int64_t group_size, int32_t *i2, void *workspace, void *stream) {
  if (B == 0 || H == 0 || n_sel == 0) return 0;
  cudaStream_t st = (cudaStream_t)stream;
  const int64_t Hs = H / group_size;
  const float *keys = s_hat;
  if (group_size > 1) {
    float *sum = (float *)workspace;
    if (cap > 0) {
      dim3 grid((unsigned)((cap + 255) / 256), (unsigned)Hs, (unsigned)B);
      group_sum_kernel<<<grid, 256, 0, st>>>(s_hat, (int)H, (int)group_size, cap, sum);
    }
    keys = sum;
  }
  const int lw = local_window > n_sel ? (int)n_sel : (int)local_window;
  return launch_select(keys, B, Hs, cap, seq_lens, (int)n_sel, lw, i2, st);
}

size_t ks_sparq_sparse_attention_cuda_workspace(int64_t B, int64_t H, int64_t Hs2, int64_t D,
                                                int64_t n_sel) {
  return attn_workspace(B, H, Hs2, D, n_sel);
}

int ks_sparq_sparse_attention_cuda(const void *q, const void *k, const void *v, ks_dtype dt,
                                   int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                                   const int32_t *i2, int64_t Hs2, int64_t n_sel,
                                   const float *s_hat, const float *v_mean, const int32_t *seq_lens,
                                   float scale, int reallocate, void *workspace, void *out,
                                   void *stream) {
  if (B == 0 || H == 0) return 0;
  return run_attn(dt, q, k, v, B, H, Hkv, cap, D, i2, Hs2, n_sel, s_hat, v_mean, seq_lens,
                  scale, reallocate, workspace, out, (cudaStream_t)stream);
}

// layout: [attention ws][i1][s_hat][score partials][rowscore (group, G > 1)][i2][alpha]
size_t ks_sparq_attention_cuda_workspace(int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                                         int64_t r, int64_t k_top, int group_mode) {
  const int64_t Hs = group_mode ? Hkv : H;
  const bool rows = group_mode && H / Hkv > 1;
  return attn_workspace(B, H, Hs, D, k_top) + align256((size_t)B * Hs * r * sizeof(int32_t)) +
         align256((size_t)B * H * cap * sizeof(float)) +
         ks_sparq_approx_scores_cuda_workspace(B, H, cap) +
         (rows ? align256((size_t)B * Hs * cap * sizeof(float)) : 0) +
         align256((size_t)B * Hs * k_top * sizeof(int32_t)) + align256((size_t)B * H * sizeof(float));
}

int ks_sparq_attention_cuda(const void *q, const void *k, const void *v, const void *kt,
                            const float *v_mean, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                            int64_t cap, int64_t D, const int32_t *seq_lens, int64_t r,
                            int64_t k_top, int64_t local_window, int group_mode, int reallocate,
                            float scale, void *workspace, void *out, void *stream) {
  if (B == 0 || H == 0) return 0;
  if (cap == 0 || k_top < 1) return (int)cudaErrorInvalidValue;
  cudaStream_t st = (cudaStream_t)stream;
  const int64_t gs = group_mode ? H / Hkv : 1, Hs = H / gs;
  char *ws = (char *)workspace;
  void *attn_ws = ws;
  ws += attn_workspace(B, H, Hs, D, k_top);
  int32_t *i1 = (int32_t *)ws;
  ws += align256((size_t)B * Hs * r * sizeof(int32_t));
  float *s_hat = (float *)ws;
  ws += align256((size_t)B * H * cap * sizeof(float));
  float *part = (float *)ws;
  ws += ks_sparq_approx_scores_cuda_workspace(B, H, cap);
  float *rowscore = nullptr;
  if (gs > 1) {
    rowscore = (float *)ws;
    ws += align256((size_t)B * Hs * cap * sizeof(float));
  }
  int32_t *i2 = (int32_t *)ws;

  float *alpha = (float *)(ws + align256((size_t)B * Hs * k_top * sizeof(int32_t)));

  const int lw = local_window > k_top ? (int)k_top : (int)local_window;
  int rc;
  if (clusters_supported() && cs_kpt(cap) <= CS_MAX_KPT && !env_flag("KVSPARSE_SPARQ_STEPS")) {
    // sm_90: three kernels. The logits kernel also picks the channels and
    // zeroes the split counters; the selection also normalises and sums alpha;
    // the last two launch with PDL.
    const bool pdl = pdl_enabled();
    int *counters = (int *)attn_ws;
    float *apart = (float *)((char *)attn_ws + align256((size_t)B * Hs * sizeof(int)));
    const bool tc = env_flag("KVSPARSE_SPARQ_TC");  // A/B: the channels in their own kernel
    if (tc) {
      rc = KS_DISPATCH(dt, launch_top_channels, q, B, H, D, r, gs, i1, st);
      if (rc) return rc;
    }
    rc = KS_DISPATCH(dt, launch_scores, q, kt, B, H, Hkv, cap, D, tc ? (const int32_t *)i1 : nullptr,
                     Hs, r, seq_lens, s_hat, part, (float *)nullptr, st, counters, false);
    if (rc) return rc;
    rc = launch_select_fused(s_hat, part, (int)as_nblk(cap), B, H, Hkv, Hs, cap, seq_lens,
                             (int)k_top, lw, i2, reallocate ? alpha : nullptr, st, pdl);
    if (rc) return rc;
    rc = KS_DISPATCH(dt, launch_attn, D, q, k, v, B, H, Hkv, cap, i2, Hs, k_top, s_hat, v_mean,
                     seq_lens, scale, reallocate, apart, counters, (const float *)alpha, out, st,
                     pdl);
    if (rc) return rc;
    return (int)cudaGetLastError();
  }
  rc = KS_DISPATCH(dt, launch_top_channels, q, B, H, D, r, gs, i1, st);
  if (rc) return rc;
  rc = KS_DISPATCH(dt, launch_scores, q, kt, B, H, Hkv, cap, D, i1, Hs, r, seq_lens, s_hat, part,
                   rowscore, st);
  if (rc) return rc;
  rc = launch_select(rowscore ? rowscore : s_hat, B, Hs, cap, seq_lens, (int)k_top, lw, i2, st);
  if (rc) return rc;
  return run_attn(dt, q, k, v, B, H, Hkv, cap, D, i2, Hs, k_top, s_hat, v_mean, seq_lens,
                  scale, reallocate, attn_ws, out, st);
}

}  // extern "C"
