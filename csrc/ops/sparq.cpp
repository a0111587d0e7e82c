// SparQ torch ops (torch.ops.kvsparse.sparq_*) over the kernels of
// csrc/kernels/sparq.h. Conventions and the dispatch idiom: checks.h.
// Values of seq_lens / i1 / i2 are checked on CPU only (trusted and clamped on
// CUDA).

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "checks.h"
#include "sparq.h"

namespace kvsparse {
namespace {

// ---------------------------------------------------------------------------
// validation

// q, k, v and seq_lens of the attention ops.
AttnDims validate_qkv(const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &seq_lens,
                      bool cuda) {
  AttnDims a = check_qkv(q, k, v, cuda);
  check_qkv_lens(seq_lens, q, a, cuda);
  return a;
}

// kt [B,Hkv,D,cap] matching (B, Hkv, D, cap), same dtype/device as ref.
void check_kt(const Tensor &kt, const Tensor &ref, const char *ref_name, int64_t B, int64_t Hkv,
              int64_t D, int64_t cap) {
  check_same_dtype(kt, "kt", ref, ref_name);
  check_dim(kt, 4, "kt", "[B, Hkv, D, cap]");
  check_size(kt, 0, B, "kt", "B");
  check_size(kt, 1, Hkv, "kt", "Hkv");
  check_size(kt, 2, D, "kt", "D");
  check_size(kt, 3, cap, "kt", "cap");
  check_contig(kt, "kt");
  check_device(kt, "kt", ref, ref_name);
}

// A float32 [B, n1, n2] argument (v_mean [B, Hkv, D], s_hat [B, H, cap]).
void check_f32_3d(const Tensor &t, const char *name, const char *layout, const Tensor &ref,
                  const char *ref_name, int64_t B, int64_t n1, const char *name1, int64_t n2,
                  const char *name2) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "kvsparse: ", name, " must be float32, got ",
                   t.scalar_type());
  check_dim(t, 3, name, layout);
  check_size(t, 0, B, name, "B");
  check_size(t, 1, n1, name, name1);
  check_size(t, 2, n2, name, name2);
  check_contig(t, name);
  check_device(t, name, ref, ref_name);
}

// v_mean float32 [B,Hkv,D].
void check_v_mean(const Tensor &vm, const Tensor &ref, const char *ref_name, int64_t B,
                  int64_t Hkv, int64_t D) {
  check_f32_3d(vm, "v_mean", "[B, Hkv, D]", ref, ref_name, B, Hkv, "Hkv", D, "D");
}

// index tensor int32 [B, Hs, n] with Hs in {H, Hkv}; returns Hs.
int64_t check_index_rows(const Tensor &idx, const char *name, const char *layout, const Tensor &ref,
                         const char *ref_name, int64_t B, int64_t H, int64_t Hkv) {
  check_int32(idx, name);
  check_dim(idx, 3, name, layout);
  check_contig(idx, name);
  check_device(idx, name, ref, ref_name);
  check_size(idx, 0, B, name, "B");
  const int64_t Hs = idx.size(1);
  TORCH_CHECK_VALUE(Hs == H || Hs == Hkv, "kvsparse: ", name, ".shape[1] (Hs) must be H = ", H,
                    " (head mode) or Hkv = ", Hkv, " (group mode), got shape ", idx.sizes());
  return Hs;
}

// CPU only: every value of idx in [lo, hi).
void check_index_values(const Tensor &idx, const char *name, int64_t lo, int64_t hi,
                        const char *what) {
  const int32_t *p = idx.data_ptr<int32_t>();
  const int64_t n = idx.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= lo && p[i] < hi, "kvsparse: ", name, " value ", p[i],
                      " at flat index ", i, " must be in [", lo, ", ", hi, ") (", what, ")");
  }
}

void check_r(int64_t r, int64_t D) {
  TORCH_CHECK_VALUE(r >= 1 && r <= D, "kvsparse: r (the number of query channels) must be in [1, D = ",
                    D, "], got ", r);
}

void check_k_top(int64_t k, int64_t cap, const char *name) {
  TORCH_CHECK_VALUE(k >= 1, "kvsparse: ", name, " (the number of kept positions) must be >= 1, got ",
                    k);
  TORCH_CHECK_VALUE(k <= cap, "kvsparse: ", name, " = ", k,
                    " is larger than the cache (k larger than the cache: cap = ", cap, ")");
}

void check_local_window(int64_t w) {
  TORCH_CHECK_VALUE(w >= 0, "kvsparse: local_window must be >= 0, got ", w);
}

void check_group_size(int64_t gs, int64_t H) {
  TORCH_CHECK_VALUE(gs >= 1 && H % gs == 0, "kvsparse: group_size (", gs,
                    ") must be >= 1 and divide the number of query heads H (", H, ")");
}

// `t` (4-d, `layout`) has the dtype and device of `ref` and the shape of
// `shape_ref`: a cache's values beside its keys, new values beside new keys
void check_twin(const Tensor &t, const char *name, const char *layout, const Tensor &ref,
                const char *ref_name, const Tensor &shape_ref, const char *shape_ref_name) {
  check_same_dtype(t, name, ref, ref_name);
  check_dim(t, 4, name, layout);
  check_contig(t, name);
  check_device(t, name, ref, ref_name);
  TORCH_CHECK_VALUE(t.sizes() == shape_ref.sizes(), "kvsparse: ", name, " must have the same shape as ",
                    shape_ref_name, " ", shape_ref.sizes(), ", got ", t.sizes());
}

// CUDA: a row of i1 / i2 serves at most 8 query heads.
void check_cuda_rows(int64_t H, int64_t Hkv, int64_t Hs, bool cuda) {
  if (!cuda || Hs == H) return;
  TORCH_CHECK_VALUE(H / Hkv <= 8, "kvsparse: group mode on CUDA supports at most 8 query heads per KV head (H / Hkv), got ",
                    H / Hkv);
}

// ---------------------------------------------------------------------------
// 1. cache maintenance

std::tuple<Tensor, Tensor> sparq_build_impl(const Tensor &k, const Tensor &v,
                                            const Tensor &seq_lens, bool cuda) {
  KDims kd = check_cache(k, "k");
  check_head_dim(kd.D, cuda);
  check_twin(v, "v", "[B, Hkv, cap, D]", k, "k", k, "k");
  check_lens_tensor(seq_lens, "seq_lens", kd.B, k, "k");
  if (!cuda) check_lens_values(seq_lens, "seq_lens", kd.cap, "cap = k.shape[2]");
  Tensor kt = at::empty({kd.B, kd.Hkv, kd.D, kd.cap}, k.options());
  Tensor v_mean = at::empty({kd.B, kd.Hkv, kd.D}, k.options().dtype(at::kFloat));
  if (v_mean.numel() == 0) return {kt, v_mean};
  const ks_dtype dt = to_ks_dtype(k, "k");
  if (!cuda) {
    ks_sparq_build_cpu(k.data_ptr(), v.data_ptr(), dt, kd.B, kd.Hkv, kd.cap, kd.D,
                       seq_lens.data_ptr<int32_t>(), kt.data_ptr(), v_mean.data_ptr<float>());
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_sparq_build_cuda(k.data_ptr(), v.data_ptr(), dt, kd.B, kd.Hkv, kd.cap, kd.D,
                                 seq_lens.data_ptr<int32_t>(), kt.data_ptr(),
                                 v_mean.data_ptr<float>(), cur_stream());
    check_cuda_rc(rc, "sparq_build");
#endif
  }
  return {kt, v_mean};
}

void sparq_append_impl(const Tensor &k_new, const Tensor &v_new, const Tensor &k, const Tensor &v,
                       const Tensor &kt, const Tensor &v_mean, const Tensor &seq_lens, bool cuda) {
  KDims kd = check_cache(k, "k");
  check_head_dim(kd.D, cuda);
  check_twin(v, "v", "[B, Hkv, cap, D]", k, "k", k, "k");
  check_same_dtype(k_new, "k_new", k, "k");
  check_dim(k_new, 4, "k_new", "[B, Hkv, n_new, D]");
  check_contig(k_new, "k_new");
  check_device(k_new, "k_new", k, "k");
  check_size(k_new, 0, kd.B, "k_new", "B");
  check_size(k_new, 1, kd.Hkv, "k_new", "Hkv");
  check_size(k_new, 3, kd.D, "k_new", "D");
  check_twin(v_new, "v_new", "[B, Hkv, n_new, D]", k, "k", k_new, "k_new");
  check_kt(kt, k, "k", kd.B, kd.Hkv, kd.D, kd.cap);
  check_v_mean(v_mean, k, "k", kd.B, kd.Hkv, kd.D);
  check_lens_tensor(seq_lens, "seq_lens", kd.B, k, "k");
  check_no_overlap({{&k, "k"}, {&v, "v"}, {&kt, "kt"}, {&v_mean, "v_mean"}},
                   {{&k_new, "k_new"}, {&v_new, "v_new"}, {&seq_lens, "seq_lens"}});
  const int64_t n_new = k_new.size(2);
  if (!cuda) {
    const int32_t *p = seq_lens.data_ptr<int32_t>();
    for (int64_t b = 0; b < kd.B; ++b) {
      TORCH_CHECK_VALUE(p[b] >= 0 && p[b] + n_new <= kd.cap, "kvsparse: seq_lens[", b, "] = ", p[b],
                        " plus n_new = ", n_new, " new tokens must fit in [0, cap = ", kd.cap, "]");
    }
  }
  if (n_new == 0 || v_mean.numel() == 0) return;
  const ks_dtype dt = to_ks_dtype(k, "k");
  if (!cuda) {
    ks_sparq_append_cpu(k_new.data_ptr(), v_new.data_ptr(), dt, kd.B, kd.Hkv, kd.cap, kd.D, n_new,
                        seq_lens.data_ptr<int32_t>(), k.data_ptr(), v.data_ptr(), kt.data_ptr(),
                        v_mean.data_ptr<float>());
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_sparq_append_cuda(k_new.data_ptr(), v_new.data_ptr(), dt, kd.B, kd.Hkv, kd.cap,
                                  kd.D, n_new, seq_lens.data_ptr<int32_t>(), k.data_ptr(),
                                  v.data_ptr(), kt.data_ptr(), v_mean.data_ptr<float>(),
                                  cur_stream());
    check_cuda_rc(rc, "sparq_append");
#endif
  }
}

// ---------------------------------------------------------------------------
// 2. top channels

Tensor sparq_top_channels_impl(const Tensor &q, int64_t r, int64_t group_size, bool cuda) {
  QDims qd = check_q(q);
  check_head_dim(qd.D, cuda);
  check_r(r, qd.D);
  check_group_size(group_size, qd.H);
  Tensor i1 = at::empty({qd.B, qd.H / group_size, r}, q.options().dtype(at::kInt));
  if (i1.numel() == 0) return i1;
  const ks_dtype dt = to_ks_dtype(q, "q");
  if (!cuda) {
    check_cpu_rc(ks_sparq_top_channels_cpu(q.data_ptr(), dt, qd.B, qd.H, qd.D, r, group_size,
                                i1.data_ptr<int32_t>()),
                 "sparq_top_channels");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_sparq_top_channels_cuda(q.data_ptr(), dt, qd.B, qd.H, qd.D, r, group_size,
                                        i1.data_ptr<int32_t>(), cur_stream());
    check_cuda_rc(rc, "sparq_top_channels");
#endif
  }
  return i1;
}

// ---------------------------------------------------------------------------
// 3. approximate scores

Tensor sparq_approx_scores_impl(const Tensor &q, const Tensor &kt, const Tensor &i1,
                                const Tensor &seq_lens, bool cuda) {
  QDims qd = check_q(q);
  check_head_dim(qd.D, cuda);
  check_same_dtype(kt, "kt", q, "q");
  check_dim(kt, 4, "kt", "[B, Hkv, D, cap]");
  TORCH_CHECK_VALUE(kt.size(1) >= 1, "kvsparse: kt must have at least one KV head, got shape ",
                    kt.sizes());
  const int64_t Hkv = kt.size(1), cap = kt.size(3);
  check_kt(kt, q, "q", qd.B, Hkv, qd.D, cap);
  check_gqa(qd.H, Hkv);
  const int64_t Hs1 = check_index_rows(i1, "i1", "[B, Hs, r]", q, "q", qd.B, qd.H, Hkv);
  const int64_t r = i1.size(2);
  check_r(r, qd.D);
  check_cuda_rows(qd.H, Hkv, Hs1, cuda);
  check_lens_tensor(seq_lens, "seq_lens", qd.B, q, "q");
  if (!cuda) {
    check_lens_values(seq_lens, "seq_lens", cap, "cap = kt.shape[3]");
    check_index_values(i1, "i1", 0, qd.D, "channel indices");
  }
  Tensor s_hat = at::empty({qd.B, qd.H, cap}, q.options().dtype(at::kFloat));
  if (s_hat.numel() == 0) return s_hat;
  const ks_dtype dt = to_ks_dtype(q, "q");
  if (!cuda) {
    check_cpu_rc(ks_sparq_approx_scores_cpu(q.data_ptr(), kt.data_ptr(), dt, qd.B, qd.H, Hkv, cap, qd.D,
                                 i1.data_ptr<int32_t>(), Hs1, r, seq_lens.data_ptr<int32_t>(),
                                 s_hat.data_ptr<float>()),
                 "sparq_approx_scores");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    Tensor ws = byte_workspace(ks_sparq_approx_scores_cuda_workspace(qd.B, qd.H, cap), q);
    int rc = ks_sparq_approx_scores_cuda(q.data_ptr(), kt.data_ptr(), dt, qd.B, qd.H, Hkv, cap,
                                         qd.D, i1.data_ptr<int32_t>(), Hs1, r,
                                         seq_lens.data_ptr<int32_t>(), s_hat.data_ptr<float>(),
                                         ws.data_ptr(), cur_stream());
    check_cuda_rc(rc, "sparq_approx_scores");
#endif
  }
  return s_hat;
}

// ---------------------------------------------------------------------------
// 4. top positions

Tensor sparq_top_positions_impl(const Tensor &s_hat, const Tensor &seq_lens, int64_t k,
                                int64_t local_window, int64_t group_size, bool cuda) {
  TORCH_CHECK_TYPE(s_hat.scalar_type() == at::kFloat, "kvsparse: s_hat must be float32, got ",
                   s_hat.scalar_type());
  check_dim(s_hat, 3, "s_hat", "[B, H, cap]");
  check_contig(s_hat, "s_hat");
  const int64_t B = s_hat.size(0), H = s_hat.size(1), cap = s_hat.size(2);
  check_k_top(k, cap, "k");
  check_local_window(local_window);
  check_group_size(group_size, std::max<int64_t>(H, 1));
  check_lens_tensor(seq_lens, "seq_lens", B, s_hat, "s_hat");
  if (!cuda) check_lens_values(seq_lens, "seq_lens", cap, "cap = s_hat.shape[2]");
  Tensor i2 = at::empty({B, H / group_size, k}, s_hat.options().dtype(at::kInt));
  if (i2.numel() == 0) return i2;
  if (!cuda) {
    check_cpu_rc(ks_sparq_top_positions_cpu(s_hat.data_ptr<float>(), B, H, cap, seq_lens.data_ptr<int32_t>(),
                                 k, local_window, group_size, i2.data_ptr<int32_t>()),
                 "sparq_top_positions");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    Tensor ws = byte_workspace(ks_sparq_top_positions_cuda_workspace(B, H, cap, group_size), s_hat);
    int rc = ks_sparq_top_positions_cuda(s_hat.data_ptr<float>(), B, H, cap,
                                         seq_lens.data_ptr<int32_t>(), k, local_window,
                                         group_size, i2.data_ptr<int32_t>(), ws.data_ptr(),
                                         cur_stream());
    check_cuda_rc(rc, "sparq_top_positions");
#endif
  }
  return i2;
}

// ---------------------------------------------------------------------------
// 5. sparse attention

Tensor sparq_sparse_attention_impl(const Tensor &q, const Tensor &k, const Tensor &v,
                                   const Tensor &i2, const Tensor &s_hat, const Tensor &v_mean,
                                   const Tensor &seq_lens, double scale, bool reallocate,
                                   bool cuda) {
  AttnDims a = validate_qkv(q, k, v, seq_lens, cuda);
  const int64_t Hs2 = check_index_rows(i2, "i2", "[B, Hs, n_sel]", q, "q", a.B, a.H, a.Hkv);
  const int64_t n_sel = i2.size(2);
  check_cuda_rows(a.H, a.Hkv, Hs2, cuda);
  check_f32_3d(s_hat, "s_hat", "[B, H, cap]", q, "q", a.B, a.H, "H", a.cap, "cap");
  check_v_mean(v_mean, q, "q", a.B, a.Hkv, a.D);
  if (!cuda) check_index_values(i2, "i2", -1, a.cap, "-1 or a position in [0, cap)");
  Tensor out = at::empty({a.B, a.H, a.D}, q.options());
  if (out.numel() == 0) return out;
  if (!cuda) {
    check_cpu_rc(ks_sparq_sparse_attention_cpu(q.data_ptr(), k.data_ptr(), v.data_ptr(), a.dt, a.B,
                                               a.H, a.Hkv, a.cap, a.D, i2.data_ptr<int32_t>(), Hs2,
                                               n_sel, s_hat.data_ptr<float>(),
                                               v_mean.data_ptr<float>(),
                                               seq_lens.data_ptr<int32_t>(),
                                               static_cast<float>(scale), reallocate ? 1 : 0,
                                               out.data_ptr()),
                 "sparq_sparse_attention");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    Tensor ws =
        byte_workspace(ks_sparq_sparse_attention_cuda_workspace(a.B, a.H, Hs2, a.D, n_sel), q);
    int rc = ks_sparq_sparse_attention_cuda(q.data_ptr(), k.data_ptr(), v.data_ptr(), a.dt, a.B,
                                            a.H, a.Hkv, a.cap, a.D, i2.data_ptr<int32_t>(), Hs2,
                                            n_sel, s_hat.data_ptr<float>(),
                                            v_mean.data_ptr<float>(), seq_lens.data_ptr<int32_t>(),
                                            static_cast<float>(scale), reallocate ? 1 : 0,
                                            ws.data_ptr(), out.data_ptr(), cur_stream());
    check_cuda_rc(rc, "sparq_sparse_attention");
#endif
  }
  return out;
}

// ---------------------------------------------------------------------------
// 6. fused decode

Tensor sparq_attention_impl(const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &kt,
                            const Tensor &v_mean, const Tensor &seq_lens, int64_t r, int64_t k_top,
                            int64_t local_window, bool group, bool reallocate, double scale,
                            bool cuda) {
  AttnDims a = validate_qkv(q, k, v, seq_lens, cuda);
  check_kt(kt, q, "q", a.B, a.Hkv, a.D, a.cap);
  check_v_mean(v_mean, q, "q", a.B, a.Hkv, a.D);
  check_r(r, a.D);
  check_k_top(k_top, a.cap, "k_top");
  check_local_window(local_window);
  const int64_t Hs = group ? a.Hkv : a.H;
  check_cuda_rows(a.H, a.Hkv, Hs, cuda);
  Tensor out = at::empty({a.B, a.H, a.D}, q.options());
  if (out.numel() == 0) return out;
  if (!cuda) {
    Tensor i1_ws = at::empty({a.B, Hs, r}, q.options().dtype(at::kInt));
    Tensor s_ws = at::empty({a.B, a.H, a.cap}, q.options().dtype(at::kFloat));
    Tensor i2_ws = at::empty({a.B, Hs, k_top}, q.options().dtype(at::kInt));
    check_cpu_rc(ks_sparq_attention_cpu(q.data_ptr(), k.data_ptr(), v.data_ptr(), kt.data_ptr(),
                          v_mean.data_ptr<float>(), a.dt, a.B, a.H, a.Hkv, a.cap, a.D,
                          seq_lens.data_ptr<int32_t>(), r, k_top, local_window, group ? 1 : 0,
                          reallocate ? 1 : 0, static_cast<float>(scale), i1_ws.data_ptr<int32_t>(),
                          s_ws.data_ptr<float>(), i2_ws.data_ptr<int32_t>(), out.data_ptr()),
                 "sparq_attention");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    Tensor ws = byte_workspace(
        ks_sparq_attention_cuda_workspace(a.B, a.H, a.Hkv, a.cap, a.D, r, k_top, group ? 1 : 0), q);
    int rc = ks_sparq_attention_cuda(q.data_ptr(), k.data_ptr(), v.data_ptr(), kt.data_ptr(),
                                     v_mean.data_ptr<float>(), a.dt, a.B, a.H, a.Hkv, a.cap, a.D,
                                     seq_lens.data_ptr<int32_t>(), r, k_top, local_window,
                                     group ? 1 : 0, reallocate ? 1 : 0, static_cast<float>(scale),
                                     ws.data_ptr(), out.data_ptr(), cur_stream());
    check_cuda_rc(rc, "sparq_attention");
#endif
  }
  return out;
}


// ---------------------------------------------------------------------------
// entry points (one per op; see checks.h)

template <bool CUDA>
std::tuple<Tensor, Tensor> sparq_build(const Tensor &k, const Tensor &v, const Tensor &seq_lens) {
  const OnDevice<CUDA> on(k);
  return sparq_build_impl(k, v, seq_lens, CUDA);
}

template <bool CUDA>
void sparq_append(const Tensor &k_new, const Tensor &v_new, const Tensor &k, const Tensor &v,
                  const Tensor &kt, const Tensor &v_mean, const Tensor &seq_lens) {
  const OnDevice<CUDA> on(k);
  sparq_append_impl(k_new, v_new, k, v, kt, v_mean, seq_lens, CUDA);
}

template <bool CUDA>
Tensor sparq_top_channels(const Tensor &q, int64_t r, int64_t group_size) {
  const OnDevice<CUDA> on(q);
  return sparq_top_channels_impl(q, r, group_size, CUDA);
}

template <bool CUDA>
Tensor sparq_approx_scores(const Tensor &q, const Tensor &kt, const Tensor &i1,
                           const Tensor &seq_lens) {
  const OnDevice<CUDA> on(q);
  return sparq_approx_scores_impl(q, kt, i1, seq_lens, CUDA);
}

template <bool CUDA>
Tensor sparq_top_positions(const Tensor &s_hat, const Tensor &seq_lens, int64_t k,
                           int64_t local_window, int64_t group_size) {
  const OnDevice<CUDA> on(s_hat);
  return sparq_top_positions_impl(s_hat, seq_lens, k, local_window, group_size, CUDA);
}

template <bool CUDA>
Tensor sparq_sparse_attention(const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &i2,
                              const Tensor &s_hat, const Tensor &v_mean, const Tensor &seq_lens,
                              double scale, bool reallocate) {
  const OnDevice<CUDA> on(q);
  return sparq_sparse_attention_impl(q, k, v, i2, s_hat, v_mean, seq_lens, scale, reallocate,
                                     CUDA);
}

template <bool CUDA>
Tensor sparq_attention(const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &kt,
                       const Tensor &v_mean, const Tensor &seq_lens, int64_t r, int64_t k_top,
                       int64_t local_window, bool group, bool reallocate, double scale) {
  const OnDevice<CUDA> on(q);
  return sparq_attention_impl(q, k, v, kt, v_mean, seq_lens, r, k_top, local_window, group,
                              reallocate, scale, CUDA);
}

template <bool CUDA, class Lib = torch::Library>
void impls(Lib &m) {
  m.impl("sparq_build", &sparq_build<CUDA>);
  m.impl("sparq_append", &sparq_append<CUDA>);
  m.impl("sparq_top_channels", &sparq_top_channels<CUDA>);
  m.impl("sparq_approx_scores", &sparq_approx_scores<CUDA>);
  m.impl("sparq_top_positions", &sparq_top_positions<CUDA>);
  m.impl("sparq_sparse_attention", &sparq_sparse_attention<CUDA>);
  m.impl("sparq_attention", &sparq_attention<CUDA>);
}

}  // namespace
}  // namespace kvsparse

// ---------------------------------------------------------------------------
// registration

TORCH_LIBRARY_FRAGMENT(kvsparse, m) {
  m.def("sparq_build(Tensor k, Tensor v, Tensor seq_lens) -> (Tensor, Tensor)");
  m.def(
      "sparq_append(Tensor k_new, Tensor v_new, Tensor(a!) k, Tensor(b!) v, Tensor(c!) kt, "
      "Tensor(d!) v_mean, Tensor seq_lens) -> ()");
  m.def("sparq_top_channels(Tensor q, int r, int group_size) -> Tensor");
  m.def("sparq_approx_scores(Tensor q, Tensor kt, Tensor i1, Tensor seq_lens) -> Tensor");
  m.def(
      "sparq_top_positions(Tensor s_hat, Tensor seq_lens, int k, int local_window, "
      "int group_size) -> Tensor");
  m.def(
      "sparq_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor i2, Tensor s_hat, "
      "Tensor v_mean, Tensor seq_lens, float scale, bool reallocate) -> Tensor");
  m.def(
      "sparq_attention(Tensor q, Tensor k, Tensor v, Tensor kt, Tensor v_mean, Tensor seq_lens, "
      "int r, int k_top, int local_window, bool group, bool reallocate, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvsparse, CPU, m) { kvsparse::impls<false>(m); }

TORCH_LIBRARY_IMPL(kvsparse, Autograd, m) {
  kvsparse::NoBackward nb{m};
  kvsparse::impls<false>(nb);
}

#ifdef KVSPARSE_WITH_CUDA
TORCH_LIBRARY_IMPL(kvsparse, CUDA, m) { kvsparse::impls<true>(m); }
#endif
