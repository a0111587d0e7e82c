// Device helpers shared by the CUDA kernels (quest_cuda.cu, sparq_cuda.cu,
// qaq_cuda.cu): dtype conversions, warp reductions, a block-wide scan, the
// clamped sequence length, the merge of split-K attention partials, programmatic
// dependent launch. No torch,
// no Python.
#ifndef KVSPARSE_KS_CUDA_CUH
#define KVSPARSE_KS_CUDA_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>

namespace ks_cuda {

// T <-> float without relying on implicit conversions (torch builds define
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__)
template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// seq_lens[b] clamped to [0, cap]
__device__ __forceinline__ int clamp_len(const int32_t *seq_lens, int b, int64_t cap) {
  int len = seq_lens[b];
  len = len < 0 ? 0 : len;
  return (int64_t)len > cap ? (int)cap : len;
}

// Exclusive block-wide prefix sum (blockDim.x a multiple of 32, <= 1024; smem
// holds 64 ints); *total gets the block total. Contains __syncthreads: call
// uniformly.
__device__ __forceinline__ int block_exclusive_scan(int v, int *smem, int *total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) smem[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nw ? smem[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    smem[32 + lane] = w;  // inclusive sums of the warp totals
  }
  __syncthreads();
  const int before = warp > 0 ? smem[32 + warp - 1] : 0;
  *total = smem[32 + nw - 1];
  __syncthreads();
  return before + x - v;
}

// NaN/Inf policy of the attention kernels (README "Limits and NaN/Inf policy"),
// carried by the online-softmax state (M: running maximum of the attended
// logits, L: sum of exp2(logit - M), A: sum of exp2(logit - M) * v):
// * a NaN or +inf logit makes L NaN (exp2(NaN - M), exp2(inf - inf)) and NaN
//   stays in L through every rescale and merge (0 * NaN = NaN);
// * while M == -inf (every logit seen so far is -inf or NaN) the tile step adds
//   ninf_mark(logit) per attended token to L instead of exp2(logit - M): 1 for
//   -inf (a positive L at M == -inf means "attended only -inf logits"), NaN for
//   NaN; a later finite M rescales that mark by exp2(-inf) = 0;
// * merges weight a part by merge_w(m, M): exp2(m - M), or 1 when M == -inf
//   (then every part has m == -inf and L in {0, mark, NaN}: they add up);
// * finish(A, M, L): zeros for a head that attended nothing (M == -inf, L == 0),
//   NaN for all -inf (M == -inf, L > 0) or a NaN/+inf logit (L NaN), else A / L.
// For finite logits this is the plain online softmax, bit for bit.
__device__ __forceinline__ float ninf_mark(float logit) { return logit == logit ? 1.f : logit; }
__device__ __forceinline__ float merge_w(float m, float M) {
  return M == -CUDART_INF_F ? 1.f : exp2f(m - M);
}
__device__ __forceinline__ float finish(float A, float M, float L) {
  if (M == -CUDART_INF_F) return L == 0.f ? 0.f : CUDART_NAN_F;
  return A / L;
}

// The merge step of a split-K decode attention, run by the last block of a row
// once every split has written its record rp[sp][g][0 .. REC): the unnormalised
// output acc[0 .. D), the log2-domain maximum M at D and the sum L at D + 1,
// for heads g < G <= MAXG. Splits are merged in split order (deterministic).
// Leaves the merged maximum and sum in s_M[g], s_L[g] (finish(A, s_M, s_L)
// gives the output) (shared, MAXG entries
// each) and returns in A[it] the merged acc of output ix = it * blockDim.x +
// threadIdx.x for ix < G * D (head ix / D, element ix % D). Every thread of the
// block calls it (it contains __syncthreads); blockDim.x is a multiple of 32.
template <int MAXG, int PER>
__device__ __forceinline__ void merge_splits(const float *rp, int nsplit, int G, int D, int REC,
                                             float *s_M, float *s_L, float (&A)[PER]) {
  constexpr int MS = 64;  // splits weighted at a time through shared memory
  __shared__ float s_w[MS][MAXG];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int g = warp; g < G; g += nwarps) {  // a warp: maximum and sum of head g
    float M = -CUDART_INF_F;
    for (int sp = lane; sp < nsplit; sp += 32) M = fmaxf(M, __ldcg(rp + ((int64_t)sp * G + g) * REC + D));
    M = warp_max(M);
    float L = 0.f;
    for (int sp = lane; sp < nsplit; sp += 32) {
      const float *ps = rp + ((int64_t)sp * G + g) * REC;
      L += __ldcg(ps + D + 1) * merge_w(__ldcg(ps + D), M);  // NaN policy: see above
    }
    L = warp_sum(L);
    if (lane == 0) {
      s_M[g] = M;
      s_L[g] = L;
    }
  }
#pragma unroll
  for (int it = 0; it < PER; ++it) A[it] = 0.f;
  for (int c0 = 0; c0 < nsplit; c0 += MS) {
    const int nc = min(MS, nsplit - c0);
    __syncthreads();
    for (int i = threadIdx.x; i < nc * G; i += blockDim.x) {
      const int sp = i / G, g = i % G;
      const float ms = __ldcg(rp + ((int64_t)(c0 + sp) * G + g) * REC + D);
      s_w[sp][g] = merge_w(ms, s_M[g]);
    }
    __syncthreads();
#pragma unroll
    for (int it = 0; it < PER; ++it) {
      const int ix = it * blockDim.x + threadIdx.x;
      if (ix < G * D) {
        const int g = ix / D, d = ix % D;
        float a = 0.f;
#pragma unroll 8
        for (int sp = 0; sp < nc; ++sp)
          a = fmaf(s_w[sp][g], __ldcg(rp + ((int64_t)(c0 + sp) * G + g) * REC + d), a);
        A[it] += a;
      }
    }
  }
  __syncthreads();
}

// Programmatic dependent launch (Hopper): a kernel launched with the PDL
// attribute may start while its predecessor is still running; it must wait
// here before reading what the predecessor writes. Without the attribute (or
// below sm_90) both are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Launch with the PDL attribute where the device supports it (sm_90+).
// KVSPARSE_NO_PDL=1 in the environment turns it off (for A/B timing).
inline bool pdl_enabled() {
  static int env = -1;
  if (env < 0) {
    const char *e = getenv("KVSPARSE_NO_PDL");
    env = (e && e[0] && e[0] != '0') ? 0 : 1;
  }
  if (!env) return false;
  static int cache[64] = {0};  // 0 unknown, 1 no, 2 yes
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (!cache[dev]) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cache[dev] = major >= 9 ? 2 : 1;
  }
  return cache[dev] == 2;
}

// launch with `smem` bytes of dynamic shared memory, with the
// programmatic-dependent-launch attribute when `pdl`; the launch's error code
template <typename... KArgs, typename... Args>
inline cudaError_t launch_kernel_smem(bool pdl, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                                      cudaStream_t st, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}

template <typename... KArgs, typename... Args>
inline void launch_kernel(bool pdl, void (*kernel)(KArgs...), dim3 grid, dim3 block, cudaStream_t st,
                   Args... args) {
  (void)launch_kernel_smem(pdl, kernel, grid, block, 0, st, args...);
}

}  // namespace ks_cuda

#endif  // KVSPARSE_KS_CUDA_CUH
