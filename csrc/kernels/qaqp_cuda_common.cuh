// Device code shared by the qaqp CUDA translation units (qaqp_cuda.cu: append,
// dequantize, attention; qaqp_maint_cuda.cu: requant_take, compact): cache
// dtype bits, the page header check, the dequantization of one element and the
// page bounds fold. One copy of each, so that every kernel dequantizes and
// bounds bit for bit alike. No torch, no Python.
#ifndef KVSPARSE_QAQP_CUDA_COMMON_CUH
#define KVSPARSE_QAQP_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "qaqp.h"

namespace ks_qaqp_cu {

constexpr int QP = KS_QAQP_P;  // slots per page
constexpr int QP_NC = KS_QAQP_NCLASS;
constexpr unsigned QP_FULL = 0xffffffffu;

__device__ __forceinline__ float h2f(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ uint16_t f2h(float f) { return __half_as_ushort(__float2half_rn(f)); }

// width of a width index 0..4
__host__ __device__ __forceinline__ int qp_width(int i) { return i == 0 ? 0 : 1 << (i - 1); }

// raw element bits of a cache dtype and their float32 value (exact)
template <typename T> struct QR;
template <> struct QR<float> {
  using R = uint32_t;
  static __device__ __forceinline__ float f(R r) { return __uint_as_float(r); }
};
template <> struct QR<__half> {
  using R = uint16_t;
  static __device__ __forceinline__ float f(R r) { return h2f(r); }
};
template <> struct QR<__nv_bfloat16> {
  using R = uint16_t;
  static __device__ __forceinline__ float f(R r) { return __uint_as_float((uint32_t)r << 16); }
};

// float32 -> dtype bits as the CPU's ks_store_row rounds them (nearest even;
// NaN keeps its payload the CPU's way), for bounds and dequantized rows
template <typename T> __device__ __forceinline__ typename QR<T>::R store_bits(float f);
template <> __device__ __forceinline__ uint32_t store_bits<float>(float f) { return __float_as_uint(f); }
template <> __device__ __forceinline__ uint16_t store_bits<__half>(float f) {
  const uint32_t x = __float_as_uint(f), ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return (uint16_t)(((x >> 16) & 0x8000u) | 0x7e00u | ((ax >> 13) & 0x3ffu));
  return f2h(f);
}
template <> __device__ __forceinline__ uint16_t store_bits<__nv_bfloat16>(float f) {
  uint32_t x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}
// +inf / -inf of a dtype
template <typename T> __device__ __forceinline__ typename QR<T>::R inf_bits(bool neg);
template <> __device__ __forceinline__ uint32_t inf_bits<float>(bool neg) { return neg ? 0xff800000u : 0x7f800000u; }
template <> __device__ __forceinline__ uint16_t inf_bits<__half>(bool neg) { return neg ? 0xfc00u : 0x7c00u; }
template <> __device__ __forceinline__ uint16_t inf_bits<__nv_bfloat16>(bool neg) {
  return neg ? 0xff80u : 0x7f80u;
}

// Running page bound a with a dequantized key x already rounded to the cache
// dtype, as qaqp_cpu.c folds them: NaN in either gives the float NaN 0x7fc00000
// (C's NAN), ties keep the bound
__device__ __forceinline__ float bmin(float a, float x) {
  return (x != x || a != a) ? __uint_as_float(0x7fc00000u) : (x < a ? x : a);
}
__device__ __forceinline__ float bmax(float a, float x) {
  return (x != x || a != a) ? __uint_as_float(0x7fc00000u) : (x > a ? x : a);
}

// Reads the page header at address a (see qaqp.h "Addresses"); layout and
// widths when it names a page.
__device__ __forceinline__ bool page_at(const uint8_t *arena, int64_t A, const ks_qaqp_geom &g, int64_t a,
                                        int &wk, int &wv, ks_qaqp_layout &L) {
  if (a < 0 || a > 0x7fffffffLL || a * 16 + 16 > A) return false;
  const uint4 h = *reinterpret_cast<const uint4 *>(arena + a * 16);
  const int k = (int)(h.z & 0xffu), v = (int)((h.z >> 8) & 0xffu);
  if (ks_qaqp_class(k, v) < 0) return false;
  L = ks_qaqp_layout_of(g, k, v);
  if (a * 16 + L.bytes > A) return false;
  wk = k;
  wv = v;
  return true;
}

// dequantized key element e of slot s of a page (float32, qaq.h: fl(z + fl(s c)),
// the midpoint at width 0, outliers exact)
template <typename T>
__device__ __forceinline__ float deq_elem(const uint8_t *pg, int64_t sz_off, int64_t c_off, int64_t oi_off,
                                          int64_t ov_off, int64_t stride, int w, int n_out, int D, int s, int e) {
  const uint32_t szw = *reinterpret_cast<const uint32_t *>(pg + sz_off + 4 * s);
  const float sc = h2f((uint16_t)(szw & 0xffffu)), z = h2f((uint16_t)(szw >> 16));
  float x;
  if (w == 0) {
    x = __fadd_rn(z, __fmul_rn(sc, 0.5f));
  } else {
    const int64_t bit = ks_qaq_code_bit(e, w, D);
    const unsigned c = (pg[c_off + s * stride + (bit >> 3)] >> (bit & 7)) & ((1u << w) - 1u);
    x = __fadd_rn(z, __fmul_rn(sc, (float)c));
  }
  const int16_t *oi = reinterpret_cast<const int16_t *>(pg + oi_off) + s * n_out;
  const typename QR<T>::R *ov = reinterpret_cast<const typename QR<T>::R *>(pg + ov_off) + s * n_out;
  for (int j = 0; j < n_out; ++j)
    if (oi[j] == e) x = QR<T>::f(ov[j]);
  return x;
}

// min / max of the dequantized keys of slots [s0, s1) into the page bounds, in
// slot order (the CPU's token order): threads t of nt over the elements
template <typename T>
__device__ __forceinline__ void bound_slots(uint8_t *pg, const ks_qaqp_geom &g, const ks_qaqp_layout &L, int wk,
                                            int s0, int s1, int t, int nt) {
  using R = typename QR<T>::R;
  R *bmn = reinterpret_cast<R *>(pg + L.kmin), *bmx = reinterpret_cast<R *>(pg + L.kmax);
  const int D = (int)g.D, nk = (int)g.n_out_k;
  for (int e = t; e < D; e += nt) {
    float mn = QR<T>::f(bmn[e]), mx = QR<T>::f(bmx[e]);
    for (int s = s0; s < s1; ++s) {
      const float x = QR<T>::f(store_bits<T>(deq_elem<T>(pg, L.ksz, L.kc, L.koi, L.kov, L.sk, wk, nk, D, s, e)));
      mn = bmin(mn, x);
      mx = bmax(mx, x);
    }
    bmn[e] = store_bits<T>(mn);
    bmx[e] = store_bits<T>(mx);
  }
}

// ---- host side

inline int qp_dsize(ks_dtype dt) { return dt == KS_F32 ? 4 : 2; }

inline bool qp_geom_ok(const ks_qaqp_geom &g, ks_dtype dt) {
  return g.D >= 1 && g.D <= KS_QAQ_MAX_GROUP && g.ds == qp_dsize(dt) && g.n_out_k >= 0 && g.n_out_v >= 0 &&
         g.n_out_k % 2 == 0 && g.n_out_v % 2 == 0 && g.n_out_k <= g.D && g.n_out_v <= g.D &&
         (g.nb == 0 || g.nb == 1);
}

}  // namespace ks_qaqp_cu

#endif  // KVSPARSE_QAQP_CUDA_COMMON_CUH
