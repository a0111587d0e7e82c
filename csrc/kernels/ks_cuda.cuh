// Device helpers shared by the CUDA kernels (quest_cuda.cu, sparq_cuda.cu,
// qaq_cuda.cu): dtype conversions, warp reductions, a block-wide scan, the
// clamped sequence length. No torch, no Python.
#ifndef KVSPARSE_KS_CUDA_CUH
#define KVSPARSE_KS_CUDA_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

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

}  // namespace ks_cuda

#endif  // KVSPARSE_KS_CUDA_CUH
