// QAQ kernels for NVIDIA GPUs (CUDA C). Semantics and storage layout: qaq.h.
//
// No torch, no Python: raw device pointers, sizes, and a cudaStream_t. No
// kernel reads a value on the host, so every entry point is graph-capturable
// (the attention workspace is sized from shapes only).
//
//   bits         one thread per (sequence, group, token); float64 formulas
//   quantize     one thread per (sequence, group, new token): outlier picks,
//                range, codes packed a byte at a time
//   dequantize   one thread per output element
//   requantize   one thread per group; reads every old code of a byte before
//                the new byte overwrites it (the new width is lower, so in
//                element order a new byte never covers an old byte still to read)
//   attention    scores: one warp per token, D/32 elements per lane
//                dequantized in registers, all G query heads of the KV head;
//                softmax: one block per (sequence, query head), probabilities
//                written over the scores; PV: token splits of 256, one warp
//                per token, per-split partial sums; reduce: fixed split order
//                (deterministic); p_max: max over the G heads per token.
// Arithmetic that decides codes uses IEEE-rounded intrinsics (__fdiv_rn,
// __fadd_rn, __fmul_rn), unaffected by --use_fast_math and never contracted
// into FMAs, so codes, scales and dequantized values equal the CPU's bit for bit.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>
#include <stdint.h>

#include "qaq.h"

namespace {

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
__device__ __forceinline__ float deq(const uint8_t *codes, int w, float s, float z, int64_t e) {
  if (w == 0) return __fadd_rn(z, __fmul_rn(s, 0.5f));
  const int64_t bit = e * w;
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

#define QQ_MAX_OUT 64

template <typename T>
__global__ void k_quantize(const T *x, int64_t B, int64_t Hkv, int64_t n, int64_t D, int64_t cap,
                           const int32_t *pos, const uint8_t *new_w, const int32_t *new_off,
                           int32_t *offsets, ks_qaq_store st) {
  const int64_t Hg = st.Hg, hpg = Hkv / Hg, E = hpg * D, n_out = st.n_out, n_side = n_out / 2;
  const int64_t it = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (it >= B * Hg * n) return;
  const int64_t b = it / (Hg * n), g = (it / n) % Hg, i = it % n;
  const int64_t t = (int64_t)pos[b] + i;
  if (t < 0 || t >= cap) return;
  const int64_t gi = (b * Hg + g) * cap + t;
  const int32_t off = new_off[it];
  st.widths[gi] = new_w[it];
  offsets[gi] = off;
  // element e of the group: head g*hpg + e/D, channel e%D
  const T *xb = x + ((b * Hkv + g * hpg) * n + i) * D;
  const int64_t hstride = n * D;
#define QQ_X(e) to_f<T>(xb[((e) / D) * hstride + (e) % D])
  int16_t idx[QQ_MAX_OUT];
  for (int64_t j = 0; j < n_out; ++j) {
    const bool low = j < n_side;
    int64_t best = -1;
    float bv = 0.f;
    for (int64_t e = 0; e < E; ++e) {
      bool taken = false;
      for (int64_t k = 0; k < j; ++k) taken |= (idx[k] == e);
      if (taken) continue;
      const float v = QQ_X(e);
      if (best < 0 || (low ? v < bv : v > bv)) { best = e; bv = v; }
    }
    idx[j] = (int16_t)best;
    st.oidx[gi * n_out + j] = (int16_t)best;
    reinterpret_cast<T *>(st.oval)[gi * n_out + j] = xb[(best / D) * hstride + best % D];
  }
  float mn = CUDART_INF_F, mx = -CUDART_INF_F;
  for (int64_t e = 0; e < E; ++e) {
    bool taken = false;
    for (int64_t k = 0; k < n_out; ++k) taken |= (idx[k] == e);
    if (taken) continue;
    const float v = QQ_X(e);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  if (mn > mx) mn = mx = 0.f;
  const int w = eff_w(new_w[it], off, E, st.A);
  const float s = w > 0 ? __fdiv_rn(__fsub_rn(mx, mn), (float)((1 << w) - 1)) : __fsub_rn(mx, mn);
  const uint16_t s16 = f2h(s), z16 = f2h(mn);
  st.sz[2 * gi] = s16;
  st.sz[2 * gi + 1] = z16;
  if (w == 0) return;
  const float sf = h2f(s16), zf = h2f(z16);
  uint8_t *codes = st.arena + b * st.A + off;
  unsigned acc = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t bit = e * w;
    acc |= code_of(QQ_X(e), sf, zf, w) << (bit & 7);
    if (((bit + w) & 7) == 0) {
      codes[bit >> 3] = (uint8_t)acc;
      acc = 0;
    }
  }
#undef QQ_X
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
  float v = deq(st.arena + b * st.A + off, w, h2f(st.sz[2 * gi]), h2f(st.sz[2 * gi + 1]), e);
  const T *ov = reinterpret_cast<const T *>(st.oval) + gi * st.n_out;
  for (int64_t j = 0; j < st.n_out; ++j)
    if (st.oidx[gi * st.n_out + j] == e) v = to_f<T>(ov[j]);
  out[i] = from_f<T>(v);
}

// ------------------------------------------------------------ requantize ----

template <typename T>
__global__ void k_requantize(ks_qaq_store st, int64_t B, int64_t Hkv, int64_t cap, int64_t D,
                             const int32_t *seq_lens, const uint8_t *new_w) {
  const int64_t gi = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (gi >= B * st.Hg * cap) return;
  const int64_t b = gi / (st.Hg * cap), t = gi % cap;
  const int64_t E = (Hkv / st.Hg) * D, n_out = st.n_out;
  if (t >= clamp_len(seq_lens[b], cap)) return;
  const int nw = new_w[gi], ow = st.widths[gi];
  if (!(nw == 0 || valid_w(nw)) || !(nw < ow) || !(ow == 0 || valid_w(ow))) return;
  const int32_t off = st.offsets[gi];
  const int w_old = eff_w(ow, off, E, st.A), w_new = eff_w(nw, off, E, st.A);
  uint8_t *codes = st.arena + b * st.A + off;
  const float s_old = h2f(st.sz[2 * gi]), z_old = h2f(st.sz[2 * gi + 1]);
  const int16_t *oi = st.oidx + gi * n_out;
  const T *ov = reinterpret_cast<const T *>(st.oval) + gi * n_out;
  float mn = CUDART_INF_F, mx = -CUDART_INF_F;
  for (int64_t e = 0; e < E; ++e) {
    bool taken = false;
    for (int64_t j = 0; j < n_out; ++j) taken |= (oi[j] == e);
    if (taken) continue;
    const float v = deq(codes, w_old, s_old, z_old, e);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  if (mn > mx) mn = mx = 0.f;
  const float s = w_new > 0 ? __fdiv_rn(__fsub_rn(mx, mn), (float)((1 << w_new) - 1))
                            : __fsub_rn(mx, mn);
  const uint16_t s16 = f2h(s), z16 = f2h(mn);
  if (w_new > 0) {
    const float sf = h2f(s16), zf = h2f(z16);
    unsigned acc = 0;
    for (int64_t e = 0; e < E; ++e) {
      float v = deq(codes, w_old, s_old, z_old, e);
      for (int64_t j = 0; j < n_out; ++j)
        if (oi[j] == e) v = to_f<T>(ov[j]);
      const int64_t bit = e * w_new;
      acc |= code_of(v, sf, zf, w_new) << (bit & 7);
      if (((bit + w_new) & 7) == 0) {
        codes[bit >> 3] = (uint8_t)acc;
        acc = 0;
      }
    }
  }
  st.sz[2 * gi] = s16;
  st.sz[2 * gi + 1] = z16;
  st.widths[gi] = (uint8_t)nw;
}

// ------------------------------------------------------------- attention ----

#define QQ_WARPS 4
#define QQ_GMAX 8
#define QQ_EPL 4         // elements per lane (D <= 128)
#define QQ_SCORE_TOK 64  // tokens per score block
#define QQ_SPLIT 256     // tokens per PV split

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// row t of KV head hk, lane's elements [lane*epl, lane*epl + epl) into v[]
template <typename T>
__device__ __forceinline__ void load_row(const ks_qaq_store &st, int64_t b, int64_t hk,
                                         int64_t hpg, int64_t cap, int64_t D, int64_t t, int lane,
                                         int epl, float v[QQ_EPL]) {
  const int64_t E = hpg * D, gi = (b * st.Hg + hk / hpg) * cap + t;
  const int64_t e0 = (hk % hpg) * D + (int64_t)lane * epl;
  const int32_t off = st.offsets[gi];
  const int w = eff_w(st.widths[gi], off, E, st.A);
  const float s = h2f(st.sz[2 * gi]), z = h2f(st.sz[2 * gi + 1]);
  const uint8_t *codes = st.arena + b * st.A + off;
#pragma unroll
  for (int i = 0; i < QQ_EPL; ++i)
    if (i < epl) v[i] = deq(codes, w, s, z, e0 + i);
  const int16_t *oi = st.oidx + gi * st.n_out;
  const T *ov = reinterpret_cast<const T *>(st.oval) + gi * st.n_out;
  for (int64_t j = 0; j < st.n_out; ++j) {
    const int64_t rel = (int64_t)oi[j] - e0;
#pragma unroll
    for (int i = 0; i < QQ_EPL; ++i)
      if (i < epl && rel == i) v[i] = to_f<T>(ov[j]);
  }
}

template <typename T>
__global__ void __launch_bounds__(QQ_WARPS * 32)
    k_scores(const T *q, ks_qaq_store kq, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
             const int32_t *seq_lens, float scale, float *S) {
  __shared__ float qs[QQ_GMAX * 128];
  const int64_t hk = blockIdx.y, b = blockIdx.z, G = H / Hkv;
  const int64_t len = clamp_len(seq_lens[b], cap);
  const int64_t t0 = (int64_t)blockIdx.x * QQ_SCORE_TOK;
  if (t0 >= len) return;
  for (int64_t i = threadIdx.x; i < G * D; i += blockDim.x)
    qs[i] = to_f<T>(q[(b * H + hk * G) * D + i]) * scale;
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, epl = (int)(D / 32);
  const int64_t hpg = Hkv / kq.Hg;
  const int64_t t1 = t0 + QQ_SCORE_TOK < len ? t0 + QQ_SCORE_TOK : len;
  for (int64_t t = t0 + warp; t < t1; t += QQ_WARPS) {
    float kv[QQ_EPL];
    load_row<T>(kq, b, hk, hpg, cap, D, t, lane, epl, kv);
#pragma unroll
    for (int g = 0; g < QQ_GMAX; ++g) {
      if (g < G) {
        float p = 0.f;
#pragma unroll
        for (int i = 0; i < QQ_EPL; ++i)
          if (i < epl) p += qs[g * D + lane * epl + i] * kv[i];
        p = warp_sum(p);
        if (lane == 0) S[(b * H + hk * G + g) * cap + t] = p;
      }
    }
  }
}

__device__ __forceinline__ float block_reduce(float v, bool is_max, float *red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, u) : v + u;
  }
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = red[0];
  for (int i = 1; i < nw; ++i) v = is_max ? fmaxf(v, red[i]) : v + red[i];
  return v;
}

__global__ void k_softmax(float *S, int64_t H, int64_t cap, const int32_t *seq_lens) {
  __shared__ float red[32];
  const int64_t h = blockIdx.x, b = blockIdx.y;
  const int64_t len = clamp_len(seq_lens[b], cap);
  float *s = S + (b * H + h) * cap;
  float m = -CUDART_INF_F;
  for (int64_t t = threadIdx.x; t < len; t += blockDim.x) m = fmaxf(m, s[t]);
  m = block_reduce(m, true, red);
  float sum = 0.f;
  for (int64_t t = threadIdx.x; t < len; t += blockDim.x) sum += expf(s[t] - m);
  sum = block_reduce(sum, false, red);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int64_t t = threadIdx.x; t < len; t += blockDim.x) s[t] = expf(s[t] - m) * inv;
}

template <typename T>
__global__ void __launch_bounds__(QQ_WARPS * 32)
    k_pv(const float *P, ks_qaq_store vq, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
         int64_t nsplit, const int32_t *seq_lens, float *part) {
  __shared__ float red[QQ_WARPS][QQ_GMAX * 128];
  const int64_t split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z, G = H / Hkv;
  const int64_t len = clamp_len(seq_lens[b], cap);
  const int64_t t0 = split * QQ_SPLIT;
  if (t0 >= len) return;
  const int64_t t1 = t0 + QQ_SPLIT < len ? t0 + QQ_SPLIT : len;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, epl = (int)(D / 32);
  const int64_t hpg = Hkv / vq.Hg;
  float acc[QQ_GMAX][QQ_EPL];
#pragma unroll
  for (int g = 0; g < QQ_GMAX; ++g)
#pragma unroll
    for (int i = 0; i < QQ_EPL; ++i) acc[g][i] = 0.f;
  const float *pb = P + (b * H + hk * G) * cap;
  for (int64_t t = t0 + warp; t < t1; t += QQ_WARPS) {
    float v[QQ_EPL];
    load_row<T>(vq, b, hk, hpg, cap, D, t, lane, epl, v);
#pragma unroll
    for (int g = 0; g < QQ_GMAX; ++g) {
      if (g < G) {
        const float p = pb[g * cap + t];
#pragma unroll
        for (int i = 0; i < QQ_EPL; ++i) acc[g][i] += p * v[i];
      }
    }
  }
#pragma unroll
  for (int g = 0; g < QQ_GMAX; ++g)
    if (g < G)
#pragma unroll
      for (int i = 0; i < QQ_EPL; ++i)
        if (i < epl) red[warp][g * D + lane * epl + i] = acc[g][i];
  __syncthreads();
  for (int64_t i = threadIdx.x; i < G * D; i += blockDim.x) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < QQ_WARPS; ++w) s += red[w][i];
    const int64_t g = i / D, d = i % D;
    part[((b * H + hk * G + g) * nsplit + split) * D + d] = s;
  }
}

template <typename T>
__global__ void k_reduce(const float *part, int64_t H, int64_t cap, int64_t D, int64_t nsplit,
                         const int32_t *seq_lens, T *out) {
  const int64_t h = blockIdx.x, b = blockIdx.y;
  const int64_t len = clamp_len(seq_lens[b], cap);
  const int64_t used = (len + QQ_SPLIT - 1) / QQ_SPLIT;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float s = 0.f;
    for (int64_t k = 0; k < used; ++k) s += part[((b * H + h) * nsplit + k) * D + d];
    out[(b * H + h) * D + d] = from_f<T>(s);
  }
}

__global__ void k_pmax(const float *P, int64_t H, int64_t Hkv, int64_t cap,
                       const int32_t *seq_lens, float *p_max) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t hk = blockIdx.y, b = blockIdx.z, G = H / Hkv;
  if (t >= cap) return;
  const int64_t len = clamp_len(seq_lens[b], cap);
  float m = 0.f;
  if (t < len) {
    const float *pb = P + (b * H + hk * G) * cap + t;
    m = pb[0];
    for (int64_t g = 1; g < G; ++g) m = fmaxf(m, pb[g * cap]);
  }
  p_max[(b * Hkv + hk) * cap + t] = m;
}

inline unsigned nblocks(int64_t n, int per) { return (unsigned)((n + per - 1) / per); }

inline int64_t n_splits(int64_t cap) { return cap > 0 ? (cap + QQ_SPLIT - 1) / QQ_SPLIT : 1; }

}  // namespace

// ------------------------------------------------------------ entry points ----

namespace {

template <typename T>
int attention_t(const T *q, int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                const ks_qaq_store &kq, const ks_qaq_store &vq, const int32_t *seq_lens,
                float scale, float *p_max, void *workspace, T *out, cudaStream_t s) {
  const int64_t nsplit = n_splits(cap);
  float *S = (float *)workspace;
  float *part = S + B * H * cap;
  if (cap > 0) {
    const dim3 gs(nblocks(cap, QQ_SCORE_TOK), (unsigned)Hkv, (unsigned)B);
    k_scores<T><<<gs, QQ_WARPS * 32, 0, s>>>(q, kq, H, Hkv, cap, D, seq_lens, scale, S);
    k_softmax<<<dim3((unsigned)H, (unsigned)B), 256, 0, s>>>(S, H, cap, seq_lens);
    const dim3 gp((unsigned)nsplit, (unsigned)Hkv, (unsigned)B);
    k_pv<T><<<gp, QQ_WARPS * 32, 0, s>>>(S, vq, H, Hkv, cap, D, nsplit, seq_lens, part);
    if (p_max) {
      const dim3 gm(nblocks(cap, 256), (unsigned)Hkv, (unsigned)B);
      k_pmax<<<gm, 256, 0, s>>>(S, H, Hkv, cap, seq_lens, p_max);
    }
  }
  k_reduce<T><<<dim3((unsigned)H, (unsigned)B), 128, 0, s>>>(part, H, cap, D, nsplit, seq_lens, out);
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
  if (st.n_out > QQ_MAX_OUT) return (int)cudaErrorInvalidValue;
  cudaStream_t s = (cudaStream_t)stream;
  const unsigned nb = nblocks(items, 64);
  if (dt == KS_F32)
    k_quantize<float><<<nb, 64, 0, s>>>((const float *)x, B, Hkv, n, D, cap, pos, new_w, new_off,
                                        offsets, st);
  else if (dt == KS_F16)
    k_quantize<__half><<<nb, 64, 0, s>>>((const __half *)x, B, Hkv, n, D, cap, pos, new_w,
                                         new_off, offsets, st);
  else
    k_quantize<__nv_bfloat16><<<nb, 64, 0, s>>>((const __nv_bfloat16 *)x, B, Hkv, n, D, cap, pos,
                                                new_w, new_off, offsets, st);
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
  const int64_t n = B * st.Hg * cap;
  if (n == 0) return 0;
  cudaStream_t s = (cudaStream_t)stream;
  const unsigned nb = nblocks(n, 64);
  if (dt == KS_F32)
    k_requantize<float><<<nb, 64, 0, s>>>(st, B, Hkv, cap, D, seq_lens, new_w);
  else if (dt == KS_F16)
    k_requantize<__half><<<nb, 64, 0, s>>>(st, B, Hkv, cap, D, seq_lens, new_w);
  else
    k_requantize<__nv_bfloat16><<<nb, 64, 0, s>>>(st, B, Hkv, cap, D, seq_lens, new_w);
  return (int)cudaGetLastError();
}

size_t ks_qaq_attention_cuda_workspace(int64_t B, int64_t H, int64_t cap, int64_t D) {
  return (size_t)(B * H * cap + B * H * n_splits(cap) * D) * sizeof(float);
}

int ks_qaq_attention_cuda(const void *q, ks_dtype dt, int64_t B, int64_t H, int64_t Hkv,
                          int64_t cap, int64_t D, ks_qaq_store kq, ks_qaq_store vq,
                          const int32_t *seq_lens, float scale, float *p_max, void *workspace,
                          void *out, void *stream) {
  if (B * H * D == 0) return 0;
  if ((D != 64 && D != 128) || Hkv < 1 || H % Hkv != 0 || H / Hkv > QQ_GMAX)
    return (int)cudaErrorInvalidValue;
  cudaStream_t s = (cudaStream_t)stream;
  if (dt == KS_F32)
    return attention_t<float>((const float *)q, B, H, Hkv, cap, D, kq, vq, seq_lens, scale,
                              p_max, workspace, (float *)out, s);
  if (dt == KS_F16)
    return attention_t<__half>((const __half *)q, B, H, Hkv, cap, D, kq, vq, seq_lens, scale,
                               p_max, workspace, (__half *)out, s);
  return attention_t<__nv_bfloat16>((const __nv_bfloat16 *)q, B, H, Hkv, cap, D, kq, vq,
                                    seq_lens, scale, p_max, workspace, (__nv_bfloat16 *)out, s);
}

}  // extern "C"
