// QAQ torch ops (torch.ops.kvsparse.qaq_*) over the kernels of
// csrc/kernels/qaq.h: quantized KV cache with per-token bit-widths.
// Conventions and the dispatch idiom: checks.h.
//
// A quantized cache ("store") is six tensors: arena [B, A] uint8, offsets
// [B, Hg, cap] int32, widths [B, Hg, cap] uint8, sz [B, Hg, cap, 2] float16,
// oidx [B, Hg, cap, n_out] int16, oval [B, Hg, cap, n_out] (cache dtype), with
// Hg = Hkv (per-head groups) or 1 (groups shared across the KV heads). Values
// of widths / offsets / oidx / pos / seq_lens are checked on CPU only.

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "qaq.h"

namespace kvsparse {
namespace {

// ---------------------------------------------------------------------------
// validation

struct QStore {
  Tensor arena, offsets, widths, sz, oidx, oval;
  std::string p;  // argument-name prefix ("" or "k_" / "v_")
};

struct QDimsQ {
  int64_t B, Hg, cap, n_out, A;
  ks_dtype dt;
};

std::string qn(const QStore &s, const char *name) { return s.p + name; }

// Structural checks; Hkv / D give the group size E (D * Hkv / Hg).
QDimsQ check_qstore(const QStore &s, const Tensor &ref, const char *ref_name, int64_t Hkv,
                    int64_t D, bool cuda) {
  const std::string na = qn(s, "arena"), no = qn(s, "offsets"), nw = qn(s, "widths"),
                    nz = qn(s, "sz"), ni = qn(s, "oidx"), nv = qn(s, "oval");
  TORCH_CHECK_TYPE(s.arena.scalar_type() == at::kByte, "kvsparse: ", na, " must be uint8, got ",
                   s.arena.scalar_type());
  check_dim(s.arena, 2, na.c_str(), "[B, A]");
  check_contig(s.arena, na.c_str());
  check_device(s.arena, na.c_str(), ref, ref_name);
  const int64_t B = s.arena.size(0), A = s.arena.size(1);
  check_int32(s.offsets, no.c_str());
  check_dim(s.offsets, 3, no.c_str(), "[B, Hg, cap]");
  check_contig(s.offsets, no.c_str());
  check_device(s.offsets, no.c_str(), ref, ref_name);
  check_size(s.offsets, 0, B, no.c_str(), "B, as arena.shape[0]");
  const int64_t Hg = s.offsets.size(1), cap = s.offsets.size(2);
  TORCH_CHECK_VALUE(cap <= INT32_MAX, "kvsparse: ", no,
                    ".shape[2] (cap) must be <= 2^31 - 1 (positions are int32), got ", cap);
  TORCH_CHECK_VALUE(Hg == Hkv || Hg == 1, "kvsparse: ", no, ".shape[1] (Hg) must be Hkv = ", Hkv,
                    " (per-head groups) or 1 (groups shared across KV heads), got shape ",
                    s.offsets.sizes());
  TORCH_CHECK_TYPE(s.widths.scalar_type() == at::kByte, "kvsparse: ", nw, " must be uint8, got ",
                   s.widths.scalar_type());
  check_contig(s.widths, nw.c_str());
  check_device(s.widths, nw.c_str(), ref, ref_name);
  TORCH_CHECK_VALUE(s.widths.sizes() == s.offsets.sizes(), "kvsparse: ", nw,
                    " must have the shape of ", no, " ", s.offsets.sizes(), ", got ",
                    s.widths.sizes());
  TORCH_CHECK_TYPE(s.sz.scalar_type() == at::kHalf, "kvsparse: ", nz,
                   " (scale, zero) must be float16, got ", s.sz.scalar_type());
  check_contig(s.sz, nz.c_str());
  check_device(s.sz, nz.c_str(), ref, ref_name);
  TORCH_CHECK_VALUE(s.sz.dim() == 4 && s.sz.size(0) == B && s.sz.size(1) == Hg &&
                        s.sz.size(2) == cap && s.sz.size(3) == 2,
                    "kvsparse: ", nz, " must have shape [B, Hg, cap, 2] = [", B, ", ", Hg, ", ",
                    cap, ", 2], got ", s.sz.sizes());
  TORCH_CHECK_TYPE(s.oidx.scalar_type() == at::kShort, "kvsparse: ", ni, " must be int16, got ",
                   s.oidx.scalar_type());
  check_contig(s.oidx, ni.c_str());
  check_device(s.oidx, ni.c_str(), ref, ref_name);
  TORCH_CHECK_VALUE(s.oidx.dim() == 4 && s.oidx.size(0) == B && s.oidx.size(1) == Hg &&
                        s.oidx.size(2) == cap,
                    "kvsparse: ", ni, " must have shape [B, Hg, cap, n_out] = [", B, ", ", Hg,
                    ", ", cap, ", n_out], got ", s.oidx.sizes());
  const int64_t n_out = s.oidx.size(3), E = D * (Hkv / Hg);
  TORCH_CHECK_VALUE(E <= KS_QAQ_MAX_GROUP, "kvsparse: the group size E = head_dim * num_kv_heads / Hg = ",
                    D, " * ", Hkv, " / ", Hg, " = ", E, " (from ", ref_name, " and ", no,
                    ") must be <= ", KS_QAQ_MAX_GROUP,
                    " (outlier indices are int16); use per-head groups or fewer KV heads per group");
  TORCH_CHECK_VALUE(n_out % 2 == 0 && n_out < E, "kvsparse: ", ni,
                    ".shape[3] (n_out, outlier slots: 2 * ceil(alpha / 2 * E)) must be even and "
                    "smaller than the group size E = ", E, ", got ", n_out, " (alpha too large?)");
  TORCH_CHECK_VALUE(!cuda || n_out <= 64, "kvsparse: ", ni,
                    ".shape[3] (n_out) must be <= 64 on CUDA, got ", n_out);
  const ks_dtype dt = to_ks_dtype(s.oval, nv.c_str());
  check_contig(s.oval, nv.c_str());
  check_device(s.oval, nv.c_str(), ref, ref_name);
  TORCH_CHECK_VALUE(s.oval.sizes() == s.oidx.sizes(), "kvsparse: ", nv,
                    " must have the shape of ", ni, " ", s.oidx.sizes(), ", got ",
                    s.oval.sizes());
  TORCH_CHECK_VALUE(A < (int64_t(1) << 31), "kvsparse: ", na,
                    ".shape[1] (bytes per sequence) must be < 2^31 (int32 offsets), got ", A);
  return {B, Hg, cap, n_out, A, dt};
}

bool qaq_valid_w(int w) { return w == 0 || w == 1 || w == 2 || w == 4 || w == 8; }

// CPU only: widths in {0,1,2,4,8} and code bytes inside the arena for t < len;
// oidx values -1 or in [0, E).
void check_qstore_values(const QStore &s, const QDimsQ &d, int64_t E, const Tensor &seq_lens) {
  const int32_t *off = s.offsets.data_ptr<int32_t>();
  const uint8_t *w = s.widths.data_ptr<uint8_t>();
  const int16_t *oi = s.oidx.data_ptr<int16_t>();
  const int32_t *len = seq_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t g = 0; g < d.Hg; ++g)
      for (int64_t t = 0; t < len[b]; ++t) {
        const int64_t i = (b * d.Hg + g) * d.cap + t;
        TORCH_CHECK_VALUE(qaq_valid_w(w[i]), "kvsparse: ", qn(s, "widths"), "[", b, ", ", g, ", ",
                          t, "] = ", int(w[i]), " is not a width in {0, 1, 2, 4, 8}");
        const int64_t nb = E * w[i] / 8;
        TORCH_CHECK_VALUE(nb == 0 || (off[i] >= 0 && off[i] + nb <= d.A), "kvsparse: ",
                          qn(s, "offsets"), "[", b, ", ", g, ", ", t, "] = ", off[i], " with ", nb,
                          " code bytes does not fit in the arena of ", d.A, " bytes");
        for (int64_t j = 0; j < d.n_out; ++j) {
          const int16_t e = oi[i * d.n_out + j];
          TORCH_CHECK_VALUE(e == -1 || (e >= 0 && e < E), "kvsparse: ", qn(s, "oidx"), "[", b,
                            ", ", g, ", ", t, ", ", j, "] = ", e, " must be -1 or in [0, E = ",
                            E, ")");
        }
      }
}

ks_qaq_store to_store(const QStore &s, const QDimsQ &d) {
  ks_qaq_store st;
  st.arena = s.arena.data_ptr<uint8_t>();
  st.A = d.A;
  st.offsets = s.offsets.data_ptr<int32_t>();
  st.widths = s.widths.data_ptr<uint8_t>();
  st.sz = reinterpret_cast<uint16_t *>(s.sz.data_ptr());
  st.oidx = s.oidx.data_ptr<int16_t>();
  st.oval = s.oval.data_ptr();
  st.Hg = d.Hg;
  st.n_out = d.n_out;
  return st;
}

void check_qaq_heads(int64_t Hkv, int64_t D, bool cuda) {
  TORCH_CHECK_VALUE(Hkv >= 1, "kvsparse: num_kv_heads must be >= 1, got ", Hkv);
  check_head_dim(D, cuda);
}

// The QAQ attention on CUDA reads whole 32-bit code words per lane and head
// (qaq_cuda.cu): head_dim 64, 96, 128 or 256 (not 80). Quantize, dequantize
// and requantize take every CUDA head dim (check_head_dim).
void check_qaq_attention_head_dim(int64_t head_dim, bool cuda, const char *op) {
  TORCH_CHECK_VALUE(!cuda || head_dim == 64 || head_dim == 96 || head_dim == 128 || head_dim == 256,
                    "kvsparse: ", op, ": head_dim must be 64, 96, 128 or 256 for the QAQ attention on CUDA, got ",
                    head_dim);
}

int check_allowed(c10::ArrayRef<int64_t> allowed) {
  TORCH_CHECK_VALUE(!allowed.empty(), "kvsparse: allowed (the allowed bit-widths) must not be empty");
  int mask = 0;
  for (int64_t w : allowed) {
    TORCH_CHECK_VALUE(w >= 0 && w <= 8 && qaq_valid_w(static_cast<int>(w)),
                      "kvsparse: allowed contains the width ", w,
                      "; each width must be one of {0, 1, 2, 4, 8}");
    mask |= 1 << w;
  }
  return mask;
}

// float32 contiguous tensor of an exact shape
void check_f32(const Tensor &t, const char *name, at::IntArrayRef shape, const char *layout,
               const Tensor &ref, const char *ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "kvsparse: ", name, " must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, "kvsparse: ", name, " must have shape ", layout, " = ",
                    shape, ", got ", t.sizes());
  check_contig(t, name);
  check_device(t, name, ref, ref_name);
}

// ---------------------------------------------------------------------------
// 1. bit-widths

Tensor qaq_bits_impl(const Tensor &rng, const Tensor &aux, const Tensor &seq_lens, double sigma,
                     c10::ArrayRef<int64_t> allowed, int64_t n_recent, bool is_key, bool cuda) {
  TORCH_CHECK_TYPE(rng.scalar_type() == at::kFloat, "kvsparse: rng must be float32, got ",
                   rng.scalar_type());
  check_dim(rng, 3, "rng", "[B, Hg, cap]");
  check_contig(rng, "rng");
  const int64_t B = rng.size(0), Hg = rng.size(1), cap = rng.size(2);
  if (is_key)
    check_f32(aux, "q_sq", {B, Hg}, "[B, Hg]", rng, "rng");
  else
    check_f32(aux, "s_max", {B, Hg, cap}, "[B, Hg, cap]", rng, "rng");
  check_lens_tensor(seq_lens, "seq_lens", B, rng, "rng");
  if (!cuda) check_lens_values(seq_lens, "seq_lens", cap, "cap = rng.shape[2]");
  const int mask = check_allowed(allowed);
  TORCH_CHECK_VALUE(n_recent >= 0, "kvsparse: n_recent must be >= 0, got ", n_recent);
  TORCH_CHECK_VALUE(sigma >= 0.0, "kvsparse: ", is_key ? "sigma_s" : "sigma_x",
                    " must be >= 0, got ", sigma);
  Tensor w = at::empty({B, Hg, cap}, rng.options().dtype(at::kByte));
  if (w.numel() == 0) return w;
  const float *qs = is_key ? aux.data_ptr<float>() : nullptr;
  const float *sm = is_key ? nullptr : aux.data_ptr<float>();
  if (!cuda) {
    ks_qaq_bits_cpu(rng.data_ptr<float>(), qs, sm, is_key ? 1 : 0, B, Hg, cap,
                    seq_lens.data_ptr<int32_t>(), sigma, mask, n_recent, w.data_ptr<uint8_t>());
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_qaq_bits_cuda(rng.data_ptr<float>(), qs, sm, is_key ? 1 : 0, B, Hg, cap,
                              seq_lens.data_ptr<int32_t>(), sigma, mask, n_recent,
                              w.data_ptr<uint8_t>(), cur_stream());
    check_cuda_rc(rc, is_key ? "qaq_key_bits" : "qaq_value_bits");
#endif
  }
  return w;
}

// ---------------------------------------------------------------------------
// 2. quantize

void qaq_quantize_impl(const Tensor &x, const Tensor &pos, const Tensor &new_widths,
                       const Tensor &new_offsets, const QStore &s, int64_t Hkv, int64_t D,
                       bool cuda) {
  check_qaq_heads(Hkv, D, cuda);
  KDims xd = check_cache(x, "x");
  TORCH_CHECK_VALUE(xd.Hkv == Hkv && xd.D == D, "kvsparse: x must have shape [B, Hkv, n, D] with "
                    "the store's num_kv_heads = ", Hkv, " and head_dim = ", D, ", got shape ",
                    x.sizes());
  QDimsQ d = check_qstore(s, x, "x", xd.Hkv, xd.D, cuda);
  check_same_dtype(s.oval, "oval", x, "x");
  check_size(x, 0, d.B, "x", "B, as arena.shape[0]");
  const int64_t n = xd.cap, E = xd.D * (xd.Hkv / d.Hg);
  check_lens_tensor(pos, "pos", d.B, x, "x");
  TORCH_CHECK_TYPE(new_widths.scalar_type() == at::kByte, "kvsparse: new_widths must be uint8, got ",
                   new_widths.scalar_type());
  check_int32(new_offsets, "new_offsets");
  for (const Tensor *t : {&new_widths, &new_offsets}) {
    const char *nm = t == &new_widths ? "new_widths" : "new_offsets";
    TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == d.B && t->size(1) == d.Hg && t->size(2) == n,
                      "kvsparse: ", nm, " must have shape [B, Hg, n] = [", d.B, ", ", d.Hg, ", ",
                      n, "], got ", t->sizes());
    check_contig(*t, nm);
    check_device(*t, nm, x, "x");
  }
  check_no_overlap({{&s.arena, "arena"}, {&s.offsets, "offsets"}, {&s.widths, "widths"},
                    {&s.sz, "sz"}, {&s.oidx, "oidx"}, {&s.oval, "oval"}},
                   {{&x, "x"}, {&pos, "pos"}, {&new_widths, "new_widths"},
                    {&new_offsets, "new_offsets"}});
  if (!cuda) {
    const int32_t *p = pos.data_ptr<int32_t>();
    for (int64_t b = 0; b < d.B; ++b)
      TORCH_CHECK_VALUE(p[b] >= 0 && p[b] + n <= d.cap, "kvsparse: pos[", b, "] = ", p[b],
                        " plus n = ", n, " tokens must fit in [0, cap = ", d.cap, "]");
    const uint8_t *w = new_widths.data_ptr<uint8_t>();
    const int32_t *o = new_offsets.data_ptr<int32_t>();
    for (int64_t i = 0; i < new_widths.numel(); ++i) {
      TORCH_CHECK_VALUE(qaq_valid_w(w[i]), "kvsparse: new_widths value ", int(w[i]),
                        " at flat index ", i, " is not a width in {0, 1, 2, 4, 8}");
      const int64_t nb = E * w[i] / 8;
      TORCH_CHECK_VALUE(nb == 0 || (o[i] >= 0 && o[i] + nb <= d.A), "kvsparse: new_offsets value ",
                        o[i], " at flat index ", i, " with ", nb,
                        " code bytes does not fit in the arena of ", d.A, " bytes");
    }
    // the new groups of one sequence are written in parallel into arena[b]:
    // their code bytes must not overlap (qaq.h)
    std::vector<std::pair<int64_t, int64_t>> iv;  // (start, flat index)
    const int64_t per_b = d.Hg * n;
    for (int64_t b = 0; b < d.B; ++b) {
      iv.clear();
      for (int64_t i = b * per_b; i < (b + 1) * per_b; ++i)
        if (E * w[i] / 8 > 0) iv.emplace_back(o[i], i);
      std::sort(iv.begin(), iv.end());
      for (size_t j = 1; j < iv.size(); ++j) {
        const int64_t prev = iv[j - 1].second, cur = iv[j].second;
        TORCH_CHECK_VALUE(int64_t(o[prev]) + E * w[prev] / 8 <= int64_t(o[cur]),
                          "kvsparse: new_offsets: the code bytes of the groups at flat indices ",
                          prev, " (offset ", o[prev], ", ", E * w[prev] / 8, " bytes) and ", cur,
                          " (offset ", o[cur], ") overlap in arena[", b, "]");
      }
    }
  }
  if (n == 0 || d.B == 0) return;
  ks_qaq_store st = to_store(s, d);
  if (!cuda) {
    const int rc = ks_qaq_quantize_cpu(x.data_ptr(), d.dt, d.B, xd.Hkv, n, xd.D, d.cap,
                                       pos.data_ptr<int32_t>(), new_widths.data_ptr<uint8_t>(),
                                       new_offsets.data_ptr<int32_t>(), s.offsets.data_ptr<int32_t>(), st);
    TORCH_CHECK_VALUE(rc != KS_ERR_RANGE, "kvsparse: qaq_quantize: x holds a group of finite values whose "
                      "min, max or range (max - min) exceeds ", KS_QAQ_SZ_MAX, " in magnitude, beyond what "
                      "QAQ's fp16 scale and zero point hold; those groups were written with a NaN scale. "
                      "Rescale the model's keys / values, or use a method without quantization");
    check_cpu_rc(rc, "qaq_quantize");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_qaq_quantize_cuda(x.data_ptr(), d.dt, d.B, xd.Hkv, n, xd.D, d.cap,
                                  pos.data_ptr<int32_t>(), new_widths.data_ptr<uint8_t>(),
                                  new_offsets.data_ptr<int32_t>(), s.offsets.data_ptr<int32_t>(),
                                  st, cur_stream());
    check_cuda_rc(rc, "qaq_quantize");
#endif
  }
}

// ---------------------------------------------------------------------------
// 3. dequantize, 4. requantize

Tensor qaq_dequantize_impl(const QStore &s, const Tensor &seq_lens, int64_t Hkv, int64_t D,
                           bool cuda) {
  check_qaq_heads(Hkv, D, cuda);
  QDimsQ d = check_qstore(s, s.arena, "arena", Hkv, D, cuda);
  check_lens_tensor(seq_lens, "seq_lens", d.B, s.arena, "arena");
  if (!cuda) {
    check_lens_values(seq_lens, "seq_lens", d.cap, "cap = offsets.shape[2]");
    check_qstore_values(s, d, D * (Hkv / d.Hg), seq_lens);
  }
  Tensor out = at::empty({d.B, Hkv, d.cap, D}, s.oval.options());
  if (out.numel() == 0) return out;
  ks_qaq_store st = to_store(s, d);
  if (!cuda) {
    check_cpu_rc(ks_qaq_dequantize_cpu(st, d.dt, d.B, Hkv, d.cap, D, seq_lens.data_ptr<int32_t>(),
                            out.data_ptr()),
                 "qaq_dequantize");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_qaq_dequantize_cuda(st, d.dt, d.B, Hkv, d.cap, D, seq_lens.data_ptr<int32_t>(),
                                    out.data_ptr(), cur_stream());
    check_cuda_rc(rc, "qaq_dequantize");
#endif
  }
  return out;
}

void qaq_requantize_impl(const QStore &s, const Tensor &new_widths, const Tensor &seq_lens,
                         int64_t Hkv, int64_t D, bool cuda) {
  check_qaq_heads(Hkv, D, cuda);
  QDimsQ d = check_qstore(s, s.arena, "arena", Hkv, D, cuda);
  check_lens_tensor(seq_lens, "seq_lens", d.B, s.arena, "arena");
  TORCH_CHECK_TYPE(new_widths.scalar_type() == at::kByte, "kvsparse: new_widths must be uint8, got ",
                   new_widths.scalar_type());
  TORCH_CHECK_VALUE(new_widths.sizes() == s.widths.sizes(), "kvsparse: new_widths must have the shape of widths ",
                    s.widths.sizes(), ", got ", new_widths.sizes());
  check_contig(new_widths, "new_widths");
  check_device(new_widths, "new_widths", s.arena, "arena");
  check_no_overlap({{&s.arena, "arena"}, {&s.widths, "widths"}, {&s.sz, "sz"}},
                   {{&s.offsets, "offsets"}, {&s.oidx, "oidx"}, {&s.oval, "oval"},
                    {&new_widths, "new_widths"}, {&seq_lens, "seq_lens"}});
  if (!cuda) {
    check_lens_values(seq_lens, "seq_lens", d.cap, "cap = offsets.shape[2]");
    check_qstore_values(s, d, D * (Hkv / d.Hg), seq_lens);
    const uint8_t *w = new_widths.data_ptr<uint8_t>();
    for (int64_t i = 0; i < new_widths.numel(); ++i)
      TORCH_CHECK_VALUE(qaq_valid_w(w[i]), "kvsparse: new_widths value ", int(w[i]),
                        " at flat index ", i, " is not a width in {0, 1, 2, 4, 8}");
  }
  if (d.B == 0 || d.cap == 0) return;
  ks_qaq_store st = to_store(s, d);
  if (!cuda) {
    check_cpu_rc(ks_qaq_requantize_cpu(st, d.dt, d.B, Hkv, d.cap, D, seq_lens.data_ptr<int32_t>(),
                            new_widths.data_ptr<uint8_t>()),
                 "qaq_requantize");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_qaq_requantize_cuda(st, d.dt, d.B, Hkv, d.cap, D, seq_lens.data_ptr<int32_t>(),
                                    new_widths.data_ptr<uint8_t>(), cur_stream());
    check_cuda_rc(rc, "qaq_requantize");
#endif
  }
}

// ---------------------------------------------------------------------------
// 5. attention, and 6. attention over selected pages (Quest's selection over the packed cache)

// q, the K / V stores and seq_lens of a decode attention op (qaq_attention,
// qaq_sparse_attention; the values on CPU only)
struct AttnQDims {
  QDims q;
  QDimsQ k, v;
};
AttnQDims check_attention_args(const Tensor &q, const QStore &ks, const QStore &vs,
                               const Tensor &seq_lens, int64_t Hkv, int64_t head_dim, bool cuda,
                               const char *op) {
  QDims qd = check_q(q);
  check_qaq_heads(Hkv, head_dim, cuda);
  check_qaq_attention_head_dim(head_dim, cuda, op);
  TORCH_CHECK_VALUE(qd.D == head_dim, "kvsparse: q.shape[2] (D) must be the stores' head_dim = ",
                    head_dim, ", got shape ", q.sizes());
  check_gqa(qd.H, Hkv);
  TORCH_CHECK_VALUE(!cuda || qd.H / Hkv <= 8, "kvsparse: ", op,
                    " on CUDA supports at most 8 query heads per KV head (H / Hkv), got ", qd.H / Hkv);
  QDimsQ kd = check_qstore(ks, q, "q", Hkv, qd.D, cuda);
  QDimsQ vd = check_qstore(vs, q, "q", Hkv, qd.D, cuda);
  check_same_dtype(ks.oval, "k_oval", q, "q");
  check_same_dtype(vs.oval, "v_oval", q, "q");
  check_size(ks.arena, 0, qd.B, "k_arena", "B, as q.shape[0]");
  check_size(vs.arena, 0, qd.B, "v_arena", "B, as q.shape[0]");
  TORCH_CHECK_VALUE(vd.cap == kd.cap, "kvsparse: v_offsets.shape[2] (cap) must equal k_offsets.shape[2] = ",
                    kd.cap, ", got ", vd.cap);
  check_lens_tensor(seq_lens, "seq_lens", qd.B, q, "q");
  if (!cuda) {
    check_lens_values(seq_lens, "seq_lens", kd.cap, "cap = k_offsets.shape[2]");
    check_qstore_values(ks, kd, qd.D * (Hkv / kd.Hg), seq_lens);
    check_qstore_values(vs, vd, qd.D * (Hkv / vd.Hg), seq_lens);
  }
  return {qd, kd, vd};
}


// qaq_attention (page_idx == nullptr) and qaq_sparse_attention (the tokens of
// the pages page_idx[b, hk] of page_size tokens): one set of checks, outputs
// and kernel calls
std::tuple<Tensor, Tensor> attention_impl(const Tensor &q, const QStore &ks, const QStore &vs,
                                          const Tensor *page_idx, const Tensor &seq_lens, int64_t Hkv,
                                          int64_t head_dim, int64_t page_size, double scale,
                                          bool return_p_max, bool cuda) {
  const char *op = page_idx ? "qaq_sparse_attention" : "qaq_attention";
  const AttnQDims a = check_attention_args(q, ks, vs, seq_lens, Hkv, head_dim, cuda, op);
  const QDims &qd = a.q;
  const QDimsQ &kd = a.k, &vd = a.v;
  int64_t n_sel = 0, n_slot = kd.cap;  // p_max slots per (b, hk)
  if (page_idx) {
    const Tensor &pi = *page_idx;
    check_page_size(page_size);
    check_int32(pi, "page_idx");
    check_dim(pi, 3, "page_idx", "[B, Hkv, n_sel]");
    check_contig(pi, "page_idx");
    check_device(pi, "page_idx", q, "q");
    check_size(pi, 0, qd.B, "page_idx", "B, as q.shape[0]");
    check_size(pi, 1, Hkv, "page_idx", "num_kv_heads (one page list per KV head)");
    const int64_t max_pages = ceil_div(kd.cap, page_size);
    n_sel = pi.size(2);
    TORCH_CHECK_VALUE(n_sel <= max_pages, "kvsparse: page_idx.shape[2] (n_sel) must be <= ceil(cap / page_size) = ",
                      max_pages, ", got ", n_sel);
    n_slot = n_sel * page_size;  // <= cap + page_size - 1 < 2^32: no overflow
    if (!cuda) check_page_idx_values(pi, max_pages);
  }
  Tensor out = at::empty({qd.B, qd.H, qd.D}, q.options());
  Tensor pm = return_p_max ? at::empty({qd.B, Hkv, n_slot}, q.options().dtype(at::kFloat))
                           : at::empty({0}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    if (pm.numel()) pm.zero_();
    return {out, pm};
  }
  const ks_qaq_store kst = to_store(ks, kd), vst = to_store(vs, vd);
  float *pmp = return_p_max && pm.numel() ? pm.data_ptr<float>() : nullptr;
  const int32_t *pidx = page_idx ? page_idx->data_ptr<int32_t>() : nullptr;
  const int32_t *lens = seq_lens.data_ptr<int32_t>();
  const float sc = static_cast<float>(scale);
  if (!cuda) {
    check_cpu_rc(pidx ? ks_qaq_sparse_attention_cpu(q.data_ptr(), kd.dt, qd.B, qd.H, Hkv, kd.cap, qd.D, kst, vst,
                                                    pidx, n_sel, page_size, lens, sc, pmp, out.data_ptr())
                      : ks_qaq_attention_cpu(q.data_ptr(), kd.dt, qd.B, qd.H, Hkv, kd.cap, qd.D, kst, vst, lens,
                                             sc, pmp, out.data_ptr()),
                 op);
  } else {
#ifdef KVSPARSE_WITH_CUDA
    const int wp = pmp ? 1 : 0;
    Tensor ws = byte_workspace(
        pidx ? ks_qaq_sparse_attention_cuda_workspace(qd.B, qd.H, Hkv, n_sel, page_size, qd.D, wp)
             : ks_qaq_attention_cuda_workspace(qd.B, qd.H, Hkv, kd.cap, qd.D, wp),
        q);
    int rc = pidx ? ks_qaq_sparse_attention_cuda(q.data_ptr(), kd.dt, qd.B, qd.H, Hkv, kd.cap, qd.D, kst, vst,
                                                 pidx, n_sel, page_size, lens, sc, pmp, ws.data_ptr(),
                                                 out.data_ptr(), cur_stream())
                  : ks_qaq_attention_cuda(q.data_ptr(), kd.dt, qd.B, qd.H, Hkv, kd.cap, qd.D, kst, vst, lens, sc,
                                          pmp, ws.data_ptr(), out.data_ptr(), cur_stream());
    check_cuda_rc(rc, op);
#endif
  }
  return {out, pm};
}

// ---------------------------------------------------------------------------
// entry points (one per op; see checks.h)

QStore mk(const Tensor &a, const Tensor &o, const Tensor &w, const Tensor &z, const Tensor &i,
          const Tensor &v, const char *p) {
  return {a, o, w, z, i, v, std::string(p)};
}

template <bool CUDA>
Tensor qaq_key_bits(const Tensor &rng, const Tensor &q_sq, const Tensor &seq_lens, double sigma_s,
                    c10::ArrayRef<int64_t> allowed, int64_t n_recent) {
  const OnDevice<CUDA> on(rng);
  return qaq_bits_impl(rng, q_sq, seq_lens, sigma_s, allowed, n_recent, true, CUDA);
}

template <bool CUDA>
Tensor qaq_value_bits(const Tensor &rng, const Tensor &s_max, const Tensor &seq_lens,
                      double sigma_x, c10::ArrayRef<int64_t> allowed, int64_t n_recent) {
  const OnDevice<CUDA> on(rng);
  return qaq_bits_impl(rng, s_max, seq_lens, sigma_x, allowed, n_recent, false, CUDA);
}

template <bool CUDA>
void qaq_quantize(const Tensor &x, const Tensor &pos, const Tensor &new_widths,
                  const Tensor &new_offsets, const Tensor &arena, const Tensor &offsets,
                  const Tensor &widths, const Tensor &sz, const Tensor &oidx, const Tensor &oval,
                  int64_t num_kv_heads, int64_t head_dim) {
  const OnDevice<CUDA> on(x);
  qaq_quantize_impl(x, pos, new_widths, new_offsets, mk(arena, offsets, widths, sz, oidx, oval, ""),
                    num_kv_heads, head_dim, CUDA);
}

template <bool CUDA>
Tensor qaq_dequantize(const Tensor &arena, const Tensor &offsets, const Tensor &widths,
                      const Tensor &sz, const Tensor &oidx, const Tensor &oval,
                      const Tensor &seq_lens, int64_t num_kv_heads, int64_t head_dim) {
  const OnDevice<CUDA> on(arena);
  return qaq_dequantize_impl(mk(arena, offsets, widths, sz, oidx, oval, ""), seq_lens,
                             num_kv_heads, head_dim, CUDA);
}

template <bool CUDA>
void qaq_requantize(const Tensor &arena, const Tensor &offsets, const Tensor &widths,
                    const Tensor &sz, const Tensor &oidx, const Tensor &oval,
                    const Tensor &new_widths, const Tensor &seq_lens, int64_t num_kv_heads,
                    int64_t head_dim) {
  const OnDevice<CUDA> on(arena);
  qaq_requantize_impl(mk(arena, offsets, widths, sz, oidx, oval, ""), new_widths, seq_lens,
                      num_kv_heads, head_dim, CUDA);
}

template <bool CUDA>
std::tuple<Tensor, Tensor> qaq_attention(
    const Tensor &q, const Tensor &k_arena, const Tensor &k_offsets, const Tensor &k_widths,
    const Tensor &k_sz, const Tensor &k_oidx, const Tensor &k_oval, const Tensor &v_arena,
    const Tensor &v_offsets, const Tensor &v_widths, const Tensor &v_sz, const Tensor &v_oidx,
    const Tensor &v_oval, const Tensor &seq_lens, int64_t num_kv_heads, int64_t head_dim,
    double scale, bool return_p_max) {
  const OnDevice<CUDA> on(q);
  return attention_impl(q, mk(k_arena, k_offsets, k_widths, k_sz, k_oidx, k_oval, "k_"),
                        mk(v_arena, v_offsets, v_widths, v_sz, v_oidx, v_oval, "v_"), nullptr, seq_lens,
                        num_kv_heads, head_dim, 1, scale, return_p_max, CUDA);
}

template <bool CUDA>
std::tuple<Tensor, Tensor> qaq_sparse_attention(
    const Tensor &q, const Tensor &k_arena, const Tensor &k_offsets, const Tensor &k_widths,
    const Tensor &k_sz, const Tensor &k_oidx, const Tensor &k_oval, const Tensor &v_arena,
    const Tensor &v_offsets, const Tensor &v_widths, const Tensor &v_sz, const Tensor &v_oidx,
    const Tensor &v_oval, const Tensor &page_idx, const Tensor &seq_lens, int64_t num_kv_heads,
    int64_t head_dim, int64_t page_size, double scale, bool return_p_max) {
  const OnDevice<CUDA> on(q);
  return attention_impl(q, mk(k_arena, k_offsets, k_widths, k_sz, k_oidx, k_oval, "k_"),
                        mk(v_arena, v_offsets, v_widths, v_sz, v_oidx, v_oval, "v_"), &page_idx, seq_lens,
                        num_kv_heads, head_dim, page_size, scale, return_p_max, CUDA);
}

template <bool CUDA, class Lib = torch::Library>
void impls(Lib &m) {
  m.impl("qaq_key_bits", &qaq_key_bits<CUDA>);
  m.impl("qaq_value_bits", &qaq_value_bits<CUDA>);
  m.impl("qaq_quantize", &qaq_quantize<CUDA>);
  m.impl("qaq_dequantize", &qaq_dequantize<CUDA>);
  m.impl("qaq_requantize", &qaq_requantize<CUDA>);
  m.impl("qaq_attention", &qaq_attention<CUDA>);
  m.impl("qaq_sparse_attention", &qaq_sparse_attention<CUDA>);
}

}  // namespace
}  // namespace kvsparse

// ---------------------------------------------------------------------------
// registration

TORCH_LIBRARY_FRAGMENT(kvsparse, m) {
  m.def(
      "qaq_key_bits(Tensor rng, Tensor q_sq, Tensor seq_lens, float sigma_s, int[] allowed, "
      "int n_recent) -> Tensor");
  m.def(
      "qaq_value_bits(Tensor rng, Tensor s_max, Tensor seq_lens, float sigma_x, int[] allowed, "
      "int n_recent) -> Tensor");
  m.def(
      "qaq_quantize(Tensor x, Tensor pos, Tensor new_widths, Tensor new_offsets, "
      "Tensor(a!) arena, Tensor(b!) offsets, Tensor(c!) widths, Tensor(d!) sz, "
      "Tensor(e!) oidx, Tensor(f!) oval, int num_kv_heads, int head_dim) -> ()");
  m.def(
      "qaq_dequantize(Tensor arena, Tensor offsets, Tensor widths, Tensor sz, Tensor oidx, "
      "Tensor oval, Tensor seq_lens, int num_kv_heads, int head_dim) -> Tensor");
  m.def(
      "qaq_requantize(Tensor(a!) arena, Tensor offsets, Tensor(b!) widths, Tensor(c!) sz, "
      "Tensor oidx, Tensor oval, Tensor new_widths, Tensor seq_lens, int num_kv_heads, "
      "int head_dim) -> ()");
  m.def(
      "qaq_attention(Tensor q, Tensor k_arena, Tensor k_offsets, Tensor k_widths, Tensor k_sz, "
      "Tensor k_oidx, Tensor k_oval, Tensor v_arena, Tensor v_offsets, Tensor v_widths, "
      "Tensor v_sz, Tensor v_oidx, Tensor v_oval, Tensor seq_lens, int num_kv_heads, "
      "int head_dim, float scale, bool return_p_max) -> (Tensor, Tensor)");
  m.def(
      "qaq_sparse_attention(Tensor q, Tensor k_arena, Tensor k_offsets, Tensor k_widths, "
      "Tensor k_sz, Tensor k_oidx, Tensor k_oval, Tensor v_arena, Tensor v_offsets, "
      "Tensor v_widths, Tensor v_sz, Tensor v_oidx, Tensor v_oval, Tensor page_idx, "
      "Tensor seq_lens, int num_kv_heads, int head_dim, int page_size, float scale, "
      "bool return_p_max) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kvsparse, CPU, m) { kvsparse::impls<false>(m); }

TORCH_LIBRARY_IMPL(kvsparse, Autograd, m) {
  kvsparse::NoBackward nb{m};
  kvsparse::impls<false>(nb);
}

#ifdef KVSPARSE_WITH_CUDA
TORCH_LIBRARY_IMPL(kvsparse, CUDA, m) { kvsparse::impls<true>(m); }
#endif
