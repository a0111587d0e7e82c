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
//   attention    one split-K kernel over (splits, KV heads, sequences): all G
//                query heads of a KV head per block, codes read as one word
//                per lane and token, dot products in code space, online
//                softmax, last-block merge of the splits (fixed order:
//                deterministic); p_max: the kernel stores the log2-logits and
//                a light kernel normalizes them (see the attention section).
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
//
// One split-K kernel (+ an optional p_max kernel); a memset zeroes the merge
// counters first. Grid (nsplit, Hkv, B); a block streams a contiguous token
// range of one KV head for all G query heads of that head.
//
// Lane layout: a token's D elements are covered by LPT = D / 8 lanes of
// 8 elements each (c = lane % LPT), so a warp step covers TPS = 32 / LPT
// tokens (sub = lane / LPT), U steps per chunk. Per token a lane reads the
// group's offset / width / (scale, zero) (broadcast loads, coalesced over the
// tokens of the warp) and its 8 codes as one w-byte word (u8 / u16 / u32 /
// uint2, byte loads only when the arena address is misaligned). Codes become
// floats with the 0x4B000000 trick; the dot product runs in code space:
//   q . x = s * sum_e q_e c_e + z * sum_e q_e + sum_outliers q_j (oval_j - x_j)
// (width 0: codes 0, z + s / 2 as the zero). The outlier owner lane adds the
// correction; V outliers go to a lane-private shared-memory accumulator.
// Online softmax per chunk (exp2 domain), per-split partials (acc, M, L), the
// last block of a (b, hk) merges the splits in split order (deterministic).
// p_max: the kernel writes the G log2-logits per token when asked and the
// merge writes lambda = M + log2 L per head; a light kernel then takes
// max_g exp2(s_g - lambda_g) per token.

#define QQ_GMAX 8
#define QA_MIN_SPLIT 256  // fewest tokens per split

template <int MAXG> __host__ __device__ constexpr int qa_warps() { return MAXG >= 4 ? 4 : 8; }
// blocks per SM asked of the register allocator: 16 warps per SM for G <= 2
// (<= 128 registers), 12 for G <= 4 (<= 170), 4 for G <= 8
template <int MAXG> __host__ __device__ constexpr int qa_min_blocks() { return MAXG >= 8 ? 1 : MAXG >= 4 ? 3 : 2; }
template <int MAXG> __host__ __device__ constexpr int qa_unroll() { return MAXG >= 8 ? 2 : 4; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// the metadata of one group (per token)
struct QaMeta {
  int32_t off;
  int w;        // effective width (0 when invalid / out of the arena)
  uint32_t sz;  // fp16 scale (low half), fp16 zero (high half)
};

__device__ __forceinline__ QaMeta qa_meta(const ks_qaq_store &st, int64_t gi, int64_t E) {
  QaMeta m;
  m.off = __ldg(st.offsets + gi);
  m.w = eff_w(__ldg(st.widths + gi), m.off, E, st.A);
  m.sz = __ldg(reinterpret_cast<const uint32_t *>(st.sz) + gi);
  return m;
}

// the w bytes of a lane's 8 codes (w in {0, 1, 2, 4, 8}) as a 64-bit word (lo, hi)
__device__ __forceinline__ uint2 qa_codes(const uint8_t *p, int w) {
  uint2 r = make_uint2(0u, 0u);
  if (w == 0) return r;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if ((a & (uintptr_t)(w - 1)) == 0) {
    if (w == 8) r = __ldg(reinterpret_cast<const uint2 *>(p));
    else if (w == 4) r.x = __ldg(reinterpret_cast<const unsigned int *>(p));
    else if (w == 2) r.x = __ldg(reinterpret_cast<const unsigned short *>(p));
    else r.x = __ldg(p);
  } else {  // misaligned arena address: byte by byte
    for (int k = 0; k < w; ++k) {
      const uint32_t byte = __ldg(p + k);
      if (k < 4) r.x |= byte << (8 * k);
      else r.y |= byte << (8 * (k - 4));
    }
  }
  return r;
}

// the 8 codes as floats (exact); mask 0 gives zeros
__device__ __forceinline__ void qa_unpack(uint2 bits, int w, uint32_t mask, float cf[8]) {
  uint32_t x = bits.x;
  const int sh = w > 0 ? w : 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (i == 4 && w == 8) x = bits.y;
    cf[i] = __uint_as_float((x & mask) | 0x4B000000u) - 8388608.f;
    x >>= sh;
  }
}

// code rel (0..7) of the word
__device__ __forceinline__ float qa_code_at(uint2 bits, int w, uint32_t mask, int rel) {
  const int bit = rel * w;
  const uint32_t x = bit >= 32 ? (bits.y >> (bit - 32)) : (bits.x >> bit);
  return (float)(x & mask);
}

template <typename T, int D, int MAXG>
__global__ void __launch_bounds__(qa_warps<MAXG>() * 32, qa_min_blocks<MAXG>())
    qa_attn_kernel(const T *__restrict__ q, ks_qaq_store kq, ks_qaq_store vq, int H, int Hkv,
                   int64_t cap, const int32_t *__restrict__ seq_lens, float scale_log2,
                   int per_split, float *__restrict__ part, int *__restrict__ counters,
                   float *__restrict__ lam, float *__restrict__ slog, T *__restrict__ out) {
  constexpr int W = qa_warps<MAXG>();
  constexpr int NT = W * 32;
  constexpr int EPL = 8;
  constexpr int LPT = D / EPL;   // lanes per token
  constexpr int TPS = 32 / LPT;  // tokens per warp step
  constexpr int U = qa_unroll<MAXG>();
  constexpr int CH = TPS * U;    // tokens per warp chunk
  constexpr int REC = D + 2;     // partial record: acc[D], M, L
  const int split = blockIdx.x, nsplit = gridDim.x, hk = blockIdx.y, b = blockIdx.z;
  const int G = H / Hkv;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int c = lane % LPT, sub = lane / LPT;
  const int64_t len = clamp_len(seq_lens[b], cap);

  __shared__ float qs[MAXG][D];
  __shared__ float s_qsum[MAXG];
  // lane-private V outlier sums [MAXG][8][NT] during the stream; the warps'
  // merge buffers afterwards
  constexpr int VC = MAXG * 8 * NT;
  constexpr int MB = W * MAXG * D;
  __shared__ float s_buf[VC > MB ? VC : MB];
  __shared__ float s_m[W][MAXG], s_l[W][MAXG];

  for (int i = tid; i < MAXG * D; i += NT) {
    const int g = i / D;
    qs[g][i % D] = g < G ? to_f<T>(q[((int64_t)b * H + (int64_t)hk * G) * D + i]) * scale_log2 : 0.f;
  }
  __syncthreads();
  for (int g = warp; g < MAXG; g += W) {
    float x = 0.f;
    for (int d = lane; d < D; d += 32) x += qs[g][d];
    x = warp_sum(x);
    if (lane == 0) s_qsum[g] = x;
  }
  __syncthreads();
  float qv[MAXG][EPL], qsum[MAXG];
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    qsum[g] = s_qsum[g];
#pragma unroll
    for (int i = 0; i < EPL; ++i) qv[g][i] = qs[g][c * EPL + i];
  }
  float *vcorr = s_buf + tid;  // entry (g, i) at vcorr[(g * 8 + i) * NT]
#pragma unroll
  for (int k = 0; k < MAXG * 8; ++k) vcorr[k * NT] = 0.f;

  float m_run[MAXG], l_run[MAXG], z_run[MAXG], acc[MAXG][EPL];
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    m_run[g] = -CUDART_INF_F; l_run[g] = 0.f; z_run[g] = 0.f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) acc[g][i] = 0.f;
  }

  const int64_t hpg_k = Hkv / kq.Hg, E_k = hpg_k * D, hb_k = (hk % hpg_k) * D;
  const int64_t hpg_v = Hkv / vq.Hg, E_v = hpg_v * D, hb_v = (hk % hpg_v) * D;
  const int64_t gk0 = ((int64_t)b * kq.Hg + hk / hpg_k) * cap;
  const int64_t gv0 = ((int64_t)b * vq.Hg + hk / hpg_v) * cap;
  const uint8_t *ak = kq.arena + (int64_t)b * kq.A;  // codes of a lane: + off + (hb + 8c) * w / 8
  const uint8_t *av = vq.arena + (int64_t)b * vq.A;
  const int64_t nk = kq.n_out, nv = vq.n_out;
  const T *okv = reinterpret_cast<const T *>(kq.oval);
  const T *ovv = reinterpret_cast<const T *>(vq.oval);
  const int rel0_k = (int)hb_k + c * EPL, rel0_v = (int)hb_v + c * EPL;

  const int64_t t_begin = (int64_t)split * per_split;
  const int64_t t_end = t_begin + per_split < len ? t_begin + per_split : len;
  float *slog_b = slog ? slog + ((int64_t)b * Hkv + hk) * cap * G : nullptr;

  for (int64_t t0 = t_begin + (int64_t)warp * CH; t0 < t_end; t0 += (int64_t)W * CH) {
    QaMeta mk[U], mv[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = t0 + u * TPS + sub;
      ok[u] = t < t_end;
      if (ok[u]) {
        mk[u] = qa_meta(kq, gk0 + t, E_k);
        mv[u] = qa_meta(vq, gv0 + t, E_v);
      } else {
        mk[u].off = 0; mk[u].w = 0; mk[u].sz = 0u;
        mv[u].off = 0; mv[u].w = 0; mv[u].sz = 0u;
      }
    }
    uint2 bk[U], bv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      bk[u] = qa_codes(ak + mk[u].off + (hb_k / 8 + c) * mk[u].w, mk[u].w);
      bv[u] = qa_codes(av + mv[u].off + (hb_v / 8 + c) * mv[u].w, mv[u].w);
    }
    // ---- K: log2-domain logits of the chunk's tokens
    float sc[MAXG][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int w = mk[u].w;
      const uint32_t mask = w > 0 ? (1u << w) - 1u : 0u;
      const float s = h2f((uint16_t)(mk[u].sz & 0xffffu)), z = h2f((uint16_t)(mk[u].sz >> 16));
      const float ze = w > 0 ? z : __fadd_rn(z, __fmul_rn(s, 0.5f));
      float cf[EPL];
      qa_unpack(bk[u], w, mask, cf);
      float part_g[MAXG];
#pragma unroll
      for (int g = 0; g < MAXG; ++g) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < EPL; ++i) d = fmaf(qv[g][i], cf[i], d);
        part_g[g] = s * d;
      }
      if (ok[u]) {
        const int64_t t = t0 + u * TPS + sub;
        const int16_t *oi = kq.oidx + (gk0 + t) * nk;
        for (int64_t j = 0; j < nk; ++j) {
          const int rel = (int)__ldg(oi + j) - rel0_k;
          if ((unsigned)rel < (unsigned)EPL) {
            const float xo = to_f<T>(okv[(gk0 + t) * nk + j]);
            const float xd = __fadd_rn(ze, __fmul_rn(s, qa_code_at(bk[u], w, mask, rel)));
            const float delta = xo - xd;
#pragma unroll
            for (int g = 0; g < MAXG; ++g) part_g[g] = fmaf(qs[g][c * EPL + rel], delta, part_g[g]);
          }
        }
      }
#pragma unroll
      for (int g = 0; g < MAXG; ++g) {
        float x = part_g[g];
#pragma unroll
        for (int o = LPT / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
        sc[g][u] = ok[u] ? fmaf(ze, qsum[g], x) : -CUDART_INF_F;
      }
      if (slog_b && ok[u] && c == 0) {
        const int64_t t = t0 + u * TPS + sub;
#pragma unroll
        for (int g = 0; g < MAXG; ++g)
          if (g < G) slog_b[t * G + g] = sc[g][u];
      }
    }
    // ---- online softmax (the LPT lanes of a token slot agree on everything)
    float p[MAXG][U];
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      float smax = -CUDART_INF_F;
#pragma unroll
      for (int u = 0; u < U; ++u) smax = fmaxf(smax, sc[g][u]);
      const float mnew = fmaxf(m_run[g], smax);
      if (mnew != m_run[g]) {  // mnew > -inf here
        const float corr = exp2f(m_run[g] - mnew);
        l_run[g] *= corr;
        z_run[g] *= corr;
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
          acc[g][i] *= corr;
          vcorr[(g * 8 + i) * NT] *= corr;
        }
        m_run[g] = mnew;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        p[g][u] = m_run[g] == -CUDART_INF_F ? 0.f : exp2f(sc[g][u] - m_run[g]);
        l_run[g] += p[g][u];
      }
    }
    // ---- V: acc += p * s * codes, z_run += p * zero, outliers apart
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int w = mv[u].w;
      const uint32_t mask = w > 0 ? (1u << w) - 1u : 0u;
      const float s = h2f((uint16_t)(mv[u].sz & 0xffffu)), z = h2f((uint16_t)(mv[u].sz >> 16));
      const float ze = w > 0 ? z : __fadd_rn(z, __fmul_rn(s, 0.5f));
      float cf[EPL];
      qa_unpack(bv[u], w, mask, cf);
#pragma unroll
      for (int g = 0; g < MAXG; ++g) {
        const float pw = p[g][u] * s;
#pragma unroll
        for (int i = 0; i < EPL; ++i) acc[g][i] = fmaf(pw, cf[i], acc[g][i]);
        z_run[g] = fmaf(p[g][u], ze, z_run[g]);
      }
      if (ok[u]) {
        const int64_t t = t0 + u * TPS + sub;
        const int16_t *oi = vq.oidx + (gv0 + t) * nv;
        for (int64_t j = 0; j < nv; ++j) {
          const int rel = (int)__ldg(oi + j) - rel0_v;
          if ((unsigned)rel < (unsigned)EPL) {
            const float xo = to_f<T>(ovv[(gv0 + t) * nv + j]);
            const float xd = __fadd_rn(ze, __fmul_rn(s, qa_code_at(bv[u], w, mask, rel)));
            const float delta = xo - xd;
#pragma unroll
            for (int g = 0; g < MAXG; ++g) vcorr[(g * 8 + rel) * NT] += p[g][u] * delta;
          }
        }
      }
    }
  }
  // fold the zero-point and outlier sums into acc
#pragma unroll
  for (int g = 0; g < MAXG; ++g)
#pragma unroll
    for (int i = 0; i < EPL; ++i) acc[g][i] += z_run[g] + vcorr[(g * 8 + i) * NT];
  // merge the TPS token slots of the warp (lanes with equal c)
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
#pragma unroll
    for (int o = LPT; o < 32; o <<= 1) {
      const float mo = __shfl_xor_sync(0xffffffffu, m_run[g], o);
      const float lo = __shfl_xor_sync(0xffffffffu, l_run[g], o);
      const float mnew = fmaxf(m_run[g], mo);
      const float ca = mnew == -CUDART_INF_F ? 0.f : exp2f(m_run[g] - mnew);
      const float cb = mnew == -CUDART_INF_F ? 0.f : exp2f(mo - mnew);
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[g][i], o);
        acc[g][i] = acc[g][i] * ca + ao * cb;
      }
      l_run[g] = l_run[g] * ca + lo * cb;
      m_run[g] = mnew;
    }
  }
  // merge the warps through shared memory (s_buf reused: [W][MAXG][D])
  __syncthreads();
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
#pragma unroll
      for (int i = 0; i < EPL; ++i) s_buf[(warp * MAXG + g) * D + c * EPL + i] = acc[g][i];
      if (c == 0) { s_m[warp][g] = m_run[g]; s_l[warp][g] = l_run[g]; }
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
        A += s_buf[(wi * MAXG + g) * D + d] * cw;
      }
    }
    if (nsplit == 1) {
      out[((int64_t)b * H + (int64_t)hk * G + g) * D + d] = from_f<T>(L > 0.f ? A / L : 0.f);
      if (d == 0 && lam) lam[(int64_t)b * H + (int64_t)hk * G + g] = L > 0.f ? M + __log2f(L) : 0.f;
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
  constexpr int MS = 64;  // splits weighted at a time through shared memory
  __shared__ float s_w[MS][MAXG];
  __shared__ float s_M[MAXG], s_L[MAXG];
  for (int g = warp; g < G; g += W) {
    float M = -CUDART_INF_F;
    for (int sp = lane; sp < nsplit; sp += 32) M = fmaxf(M, __ldcg(rp + ((int64_t)sp * G + g) * REC + D));
    M = warp_max(M);
    float L = 0.f;
    for (int sp = lane; sp < nsplit; sp += 32) {
      const float *ps = rp + ((int64_t)sp * G + g) * REC;
      const float ms = __ldcg(ps + D);
      if (ms != -CUDART_INF_F) L += __ldcg(ps + D + 1) * exp2f(ms - M);
    }
    L = warp_sum(L);
    if (lane == 0) {
      s_M[g] = M;
      s_L[g] = L;
      if (lam) lam[(int64_t)b * H + (int64_t)hk * G + g] = L > 0.f ? M + __log2f(L) : 0.f;
    }
  }
  constexpr int PER = (MAXG * D + NT - 1) / NT;
  float A[PER];
#pragma unroll
  for (int it = 0; it < PER; ++it) A[it] = 0.f;
  for (int c0 = 0; c0 < nsplit; c0 += MS) {
    const int nc = min(MS, nsplit - c0);
    __syncthreads();
    for (int i = tid; i < nc * G; i += NT) {
      const int sp = i / G, g = i % G;
      const float ms = __ldcg(rp + ((int64_t)(c0 + sp) * G + g) * REC + D);
      s_w[sp][g] = ms == -CUDART_INF_F ? 0.f : exp2f(ms - s_M[g]);
    }
    __syncthreads();
#pragma unroll
    for (int it = 0; it < PER; ++it) {
      const int ix = it * NT + tid;
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
#pragma unroll
  for (int it = 0; it < PER; ++it) {
    const int ix = it * NT + tid;
    if (ix < G * D) {
      const int g = ix / D, d = ix % D;
      const float L = s_L[g];
      out[((int64_t)b * H + (int64_t)hk * G + g) * D + d] = from_f<T>(L > 0.f ? A[it] / L : 0.f);
    }
  }
}

// p_max[b, hk, t] = max_g exp2(s_g[t] - lambda_g) for t < len, else 0
__global__ void qa_pmax_kernel(const float *__restrict__ slog, const float *__restrict__ lam, int H,
                               int Hkv, int64_t cap, const int32_t *seq_lens, float *p_max) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int hk = blockIdx.y, b = blockIdx.z, G = H / Hkv;
  if (t >= cap) return;
  const int64_t len = clamp_len(seq_lens[b], cap);
  const int64_t row = (int64_t)b * Hkv + hk;
  float m = 0.f;
  if (t < len) {
    const float *s = slog + (row * cap + t) * G;
    const float *lm = lam + (int64_t)b * H + (int64_t)hk * G;
    for (int g = 0; g < G; ++g) m = fmaxf(m, exp2f(__ldg(s + g) - __ldg(lm + g)));
  }
  p_max[row * cap + t] = m;
}

inline unsigned nblocks(int64_t n, int per) { return (unsigned)((n + per - 1) / per); }

inline size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

inline int maxg_bucket(int64_t g) { return g <= 1 ? 1 : g <= 2 ? 2 : g <= 4 ? 4 : g <= 8 ? 8 : 0; }

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

// tokens per split: about one full wave of blocks (the blocks per SM the
// kernel is built for), at least QA_MIN_SPLIT tokens each, a multiple of 64
int64_t qa_per_split(int64_t B, int64_t H, int64_t Hkv, int64_t cap) {
  if (cap <= 0) return QA_MIN_SPLIT;
  const int mg = maxg_bucket(H / Hkv);
  const int per_sm = mg >= 8 ? qa_min_blocks<8>() : mg >= 4 ? qa_min_blocks<4>() : qa_min_blocks<2>();
  const int64_t rows = B * Hkv > 0 ? B * Hkv : 1;
  const int64_t want = ((int64_t)per_sm * qa_sm_count() + rows - 1) / rows;
  int64_t ns = (cap + QA_MIN_SPLIT - 1) / QA_MIN_SPLIT;
  if (want < ns) ns = want;
  if (ns < 1) ns = 1;
  int64_t per = (cap + ns - 1) / ns;
  per = (per + 63) / 64 * 64;
  return per;
}

inline int64_t qa_nsplit(int64_t B, int64_t H, int64_t Hkv, int64_t cap) {
  const int64_t per = qa_per_split(B, H, Hkv, cap);
  return cap > 0 ? (cap + per - 1) / per : 1;
}

}  // namespace

// ------------------------------------------------------------ entry points ----

namespace {

template <typename T, int D, int MAXG>
int launch_attn(const T *q, int64_t B, int64_t H, int64_t Hkv, int64_t cap, const ks_qaq_store &kq,
                const ks_qaq_store &vq, const int32_t *seq_lens, float scale, float *lam,
                float *slog, float *part, int *counters, T *out, cudaStream_t s) {
  const int64_t per = qa_per_split(B, H, Hkv, cap);
  const int64_t ns = qa_nsplit(B, H, Hkv, cap);
  const dim3 grid((unsigned)ns, (unsigned)Hkv, (unsigned)B);
  qa_attn_kernel<T, D, MAXG><<<grid, qa_warps<MAXG>() * 32, 0, s>>>(
      q, kq, vq, (int)H, (int)Hkv, cap, seq_lens, scale * 1.4426950408889634f, (int)per, part,
      counters, lam, slog, out);
  return (int)cudaGetLastError();
}

template <typename T, int D>
int launch_attn_d(const T *q, int64_t B, int64_t H, int64_t Hkv, int64_t cap,
                  const ks_qaq_store &kq, const ks_qaq_store &vq, const int32_t *seq_lens,
                  float scale, float *lam, float *slog, float *part, int *counters, T *out,
                  cudaStream_t s) {
  switch (maxg_bucket(H / Hkv)) {
    case 1: return launch_attn<T, D, 1>(q, B, H, Hkv, cap, kq, vq, seq_lens, scale, lam, slog, part, counters, out, s);
    case 2: return launch_attn<T, D, 2>(q, B, H, Hkv, cap, kq, vq, seq_lens, scale, lam, slog, part, counters, out, s);
    case 4: return launch_attn<T, D, 4>(q, B, H, Hkv, cap, kq, vq, seq_lens, scale, lam, slog, part, counters, out, s);
    case 8: return launch_attn<T, D, 8>(q, B, H, Hkv, cap, kq, vq, seq_lens, scale, lam, slog, part, counters, out, s);
    default: return (int)cudaErrorInvalidValue;
  }
}

// workspace: counters [B * Hkv] int | partials [B * H * nsplit * (D + 2)] |
// lambda [B * H] | (p_max only) log2-logits [B * H * cap]
size_t qa_workspace(int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D, int with_p_max) {
  const int64_t ns = qa_nsplit(B, H, Hkv, cap);
  size_t n = align256((size_t)B * Hkv * sizeof(int));
  n += align256((size_t)B * H * ns * (D + 2) * sizeof(float));
  n += align256((size_t)B * H * sizeof(float));
  if (with_p_max) n += align256((size_t)B * H * cap * sizeof(float));
  return n;
}

template <typename T>
int attention_t(const T *q, int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                const ks_qaq_store &kq, const ks_qaq_store &vq, const int32_t *seq_lens,
                float scale, float *p_max, void *workspace, T *out, cudaStream_t s) {
  const int64_t ns = qa_nsplit(B, H, Hkv, cap);
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
  int rc = D == 64 ? launch_attn_d<T, 64>(q, B, H, Hkv, cap, kq, vq, seq_lens, scale, lam, slog,
                                          part, counters, out, s)
                   : launch_attn_d<T, 128>(q, B, H, Hkv, cap, kq, vq, seq_lens, scale, lam, slog,
                                           part, counters, out, s);
  if (rc != 0) return rc;
  if (p_max && cap > 0) {
    const dim3 gm(nblocks(cap, 256), (unsigned)Hkv, (unsigned)B);
    qa_pmax_kernel<<<gm, 256, 0, s>>>(slog, lam, (int)H, (int)Hkv, cap, seq_lens, p_max);
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

size_t ks_qaq_attention_cuda_workspace(int64_t B, int64_t H, int64_t Hkv, int64_t cap, int64_t D,
                                       int with_p_max) {
  if (Hkv < 1) return 0;
  return qa_workspace(B, H, Hkv, cap, D, with_p_max);
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
