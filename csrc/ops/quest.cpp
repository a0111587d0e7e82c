// Quest torch ops (torch.ops.kvsparse.quest_*) over the kernels of
// csrc/kernels/quest.h. Conventions and the dispatch idiom: checks.h.
// Values of seq_lens / start_lens / page_idx are checked on CPU only.

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "checks.h"
#include "quest.h"

namespace kvsparse {
namespace {

// ---------------------------------------------------------------------------
// validation

void check_token_budget(int64_t token_budget, int64_t page_size) {
  TORCH_CHECK_VALUE(token_budget >= page_size, "kvsparse: token_budget (", token_budget,
                    ") must be >= page_size (", page_size, ")");
}

// CPU only: start_lens[b] <= seq_lens[b].
void check_start_values(const Tensor &start_lens, const Tensor &seq_lens) {
  const int32_t *s = start_lens.data_ptr<int32_t>();
  const int32_t *l = seq_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < start_lens.numel(); ++b) {
    TORCH_CHECK_VALUE(s[b] >= 0 && s[b] <= l[b], "kvsparse: start_lens[", b, "] = ", s[b],
                      " must be in [0, seq_lens[", b, "] = ", l[b], "]");
  }
}

// kmin/kmax [B,Hkv,max_pages,D] matching (B, Hkv, D).
void check_meta(const Tensor &m, const char *name, const Tensor &ref, const char *ref_name,
                int64_t B, int64_t Hkv, int64_t D) {
  check_same_dtype(m, name, ref, ref_name);
  check_dim(m, 4, name, "[B, Hkv, max_pages, D]");
  check_size(m, 0, B, name, "B");
  check_size(m, 1, Hkv, name, "Hkv");
  check_size(m, 3, D, name, "D");
  check_contig(m, name);
  check_device(m, name, ref, ref_name);
}

// q, k, v and seq_lens of the attention ops, and page_size.
AttnDims validate_qkv(const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &seq_lens,
                      int64_t page_size, bool cuda) {
  AttnDims a = check_qkv(q, k, v, cuda);
  check_page_size(page_size);
  check_qkv_lens(seq_lens, q, a, cuda);
  return a;
}

// ---------------------------------------------------------------------------
// 1. page metadata

struct MetaArgs {
  KDims k;
  int64_t max_pages;
  ks_dtype dt;
};

MetaArgs validate_page_metadata(const Tensor &k, const Tensor &seq_lens, int64_t page_size,
                                bool cuda) {
  KDims kd = check_cache(k, "k");
  check_head_dim(kd.D, cuda);
  check_page_size(page_size);
  check_lens_tensor(seq_lens, "seq_lens", kd.B, k, "k");
  if (!cuda) check_lens_values(seq_lens, "seq_lens", kd.cap, "cap = k.shape[2]");
  return {kd, ceil_div(kd.cap, page_size), to_ks_dtype(k, "k")};
}

std::tuple<Tensor, Tensor> page_metadata_impl(const Tensor &k, const Tensor &seq_lens,
                                              int64_t page_size, bool cuda) {
  MetaArgs a = validate_page_metadata(k, seq_lens, page_size, cuda);
  Tensor kmin = at::empty({a.k.B, a.k.Hkv, a.max_pages, a.k.D}, k.options());
  Tensor kmax = at::empty_like(kmin);
  if (kmin.numel() == 0) return {kmin, kmax};
  if (!cuda) {
    ks_quest_page_metadata_cpu(k.data_ptr(), a.dt, a.k.B, a.k.Hkv, a.k.cap, a.k.D, nullptr,
                               seq_lens.data_ptr<int32_t>(), page_size, a.max_pages,
                               kmin.data_ptr(), kmax.data_ptr());
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_quest_page_metadata_cuda(k.data_ptr(), a.dt, a.k.B, a.k.Hkv, a.k.cap, a.k.D,
                                         nullptr, seq_lens.data_ptr<int32_t>(), page_size,
                                         a.max_pages, kmin.data_ptr(), kmax.data_ptr(),
                                         cur_stream());
    check_cuda_rc(rc, "quest_page_metadata");
#endif
  }
  return {kmin, kmax};
}

void update_metadata_impl(const Tensor &k, const Tensor &kmin, const Tensor &kmax,
                          const Tensor &start_lens, const Tensor &seq_lens, int64_t page_size,
                          bool cuda) {
  MetaArgs a = validate_page_metadata(k, seq_lens, page_size, cuda);
  check_meta(kmin, "kmin", k, "k", a.k.B, a.k.Hkv, a.k.D);
  check_meta(kmax, "kmax", k, "k", a.k.B, a.k.Hkv, a.k.D);
  check_size(kmin, 2, a.max_pages, "kmin", "max_pages = ceil(cap / page_size)");
  check_size(kmax, 2, a.max_pages, "kmax", "max_pages = ceil(cap / page_size)");
  check_lens_tensor(start_lens, "start_lens", a.k.B, k, "k");
  check_no_overlap({{&kmin, "kmin"}, {&kmax, "kmax"}},
                   {{&k, "k"}, {&start_lens, "start_lens"}, {&seq_lens, "seq_lens"}});
  if (!cuda) check_start_values(start_lens, seq_lens);
  if (kmin.numel() == 0) return;
  if (!cuda) {
    ks_quest_page_metadata_cpu(k.data_ptr(), a.dt, a.k.B, a.k.Hkv, a.k.cap, a.k.D,
                               start_lens.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
                               page_size, a.max_pages, kmin.data_ptr(), kmax.data_ptr());
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_quest_page_metadata_cuda(k.data_ptr(), a.dt, a.k.B, a.k.Hkv, a.k.cap, a.k.D,
                                         start_lens.data_ptr<int32_t>(),
                                         seq_lens.data_ptr<int32_t>(), page_size, a.max_pages,
                                         kmin.data_ptr(), kmax.data_ptr(), cur_stream());
    check_cuda_rc(rc, "quest_update_metadata");
#endif
  }
}

// ---------------------------------------------------------------------------
// 2. page scores

Tensor page_scores_impl(const Tensor &q, const Tensor &kmin, const Tensor &kmax,
                        const Tensor &seq_lens, int64_t page_size, bool group, bool cuda) {
  QDims qd = check_q(q);
  check_head_dim(qd.D, cuda);
  check_page_size(page_size);
  TORCH_CHECK_VALUE(kmin.dim() == 4,
                    "kvsparse: kmin must be a 4-D tensor [B, Hkv, max_pages, D], got shape ",
                    kmin.sizes());
  const int64_t Hkv = kmin.size(1);
  TORCH_CHECK_VALUE(Hkv >= 1, "kvsparse: kmin must have at least one KV head, got shape ",
                    kmin.sizes());
  check_meta(kmin, "kmin", q, "q", qd.B, Hkv, qd.D);
  check_meta(kmax, "kmax", q, "q", qd.B, Hkv, qd.D);
  const int64_t max_pages = kmin.size(2);
  check_size(kmax, 2, max_pages, "kmax", "max_pages, as kmin");
  check_gqa(qd.H, Hkv);
  check_lens_tensor(seq_lens, "seq_lens", qd.B, q, "q");
  if (!cuda)
    check_lens_values(seq_lens, "seq_lens", sat_mul(max_pages, page_size),
                      "max_pages * page_size");
  const int64_t Hs = group ? Hkv : qd.H;
  Tensor scores = at::empty({qd.B, Hs, max_pages}, q.options().dtype(at::kFloat));
  if (scores.numel() == 0) return scores;
  const ks_dtype dt = to_ks_dtype(q, "q");
  if (!cuda) {
    check_cpu_rc(ks_quest_page_scores_cpu(q.data_ptr(), kmin.data_ptr(), kmax.data_ptr(), dt,
                                          qd.B, qd.H, Hkv, max_pages, qd.D,
                                          seq_lens.data_ptr<int32_t>(), page_size, group ? 1 : 0,
                                          scores.data_ptr<float>()),
                 "quest_page_scores");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_quest_page_scores_cuda(q.data_ptr(), kmin.data_ptr(), kmax.data_ptr(), dt, qd.B,
                                       qd.H, Hkv, max_pages, qd.D, seq_lens.data_ptr<int32_t>(),
                                       page_size, group ? 1 : 0, scores.data_ptr<float>(),
                                       cur_stream());
    check_cuda_rc(rc, "quest_page_scores");
#endif
  }
  return scores;
}

// ---------------------------------------------------------------------------
// 3. page selection

Tensor select_pages_impl(const Tensor &scores, const Tensor &seq_lens, int64_t page_size,
                         int64_t token_budget, bool cuda) {
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat, "kvsparse: scores must be float32, got ",
                   scores.scalar_type());
  check_dim(scores, 3, "scores", "[B, Hs, max_pages]");
  check_contig(scores, "scores");
  check_page_size(page_size);
  check_token_budget(token_budget, page_size);
  const int64_t B = scores.size(0), Hs = scores.size(1), max_pages = scores.size(2);
  check_lens_tensor(seq_lens, "seq_lens", B, scores, "scores");
  if (!cuda)
    check_lens_values(seq_lens, "seq_lens", sat_mul(max_pages, page_size),
                      "max_pages * page_size");
  const int64_t n_sel = std::min(token_budget / page_size, max_pages);
  Tensor page_idx = at::empty({B, Hs, n_sel}, scores.options().dtype(at::kInt));
  if (page_idx.numel() == 0) return page_idx;
  if (!cuda) {
    check_cpu_rc(ks_quest_select_pages_cpu(scores.data_ptr<float>(), B, Hs, max_pages,
                                           seq_lens.data_ptr<int32_t>(), page_size, n_sel,
                                           page_idx.data_ptr<int32_t>()),
                 "quest_select_pages");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_quest_select_pages_cuda(scores.data_ptr<float>(), B, Hs, max_pages,
                                        seq_lens.data_ptr<int32_t>(), page_size, n_sel,
                                        page_idx.data_ptr<int32_t>(), cur_stream());
    check_cuda_rc(rc, "quest_select_pages");
#endif
  }
  return page_idx;
}

// ---------------------------------------------------------------------------
// 4. sparse attention

Tensor sparse_attention_impl(const Tensor &q, const Tensor &k, const Tensor &v,
                             const Tensor &page_idx, const Tensor &seq_lens, int64_t page_size,
                             double scale, bool cuda) {
  AttnDims a = validate_qkv(q, k, v, seq_lens, page_size, cuda);
  check_int32(page_idx, "page_idx");
  check_dim(page_idx, 3, "page_idx", "[B, Hs, n_sel]");
  check_contig(page_idx, "page_idx");
  check_device(page_idx, "page_idx", q, "q");
  check_size(page_idx, 0, a.B, "page_idx", "B");
  const int64_t Hs = page_idx.size(1), n_sel = page_idx.size(2);
  TORCH_CHECK_VALUE(Hs == a.H || Hs == a.Hkv, "kvsparse: page_idx.shape[1] (Hs) must be H = ", a.H,
                    " (head mode) or Hkv = ", a.Hkv, " (group mode), got shape ", page_idx.sizes());
  const int64_t max_pages = ceil_div(a.cap, page_size);
  if (!cuda) check_page_idx_values(page_idx, max_pages);
  Tensor out = at::empty({a.B, a.H, a.D}, q.options());
  if (out.numel() == 0) return out;
  if (n_sel == 0 || a.cap == 0) {  // no page can be selected: every row is empty
    out.zero_();
    return out;
  }
  if (!cuda) {
    check_cpu_rc(ks_quest_sparse_attention_cpu(q.data_ptr(), k.data_ptr(), v.data_ptr(), a.dt,
                                               a.B, a.H, a.Hkv, a.cap, a.D,
                                               page_idx.data_ptr<int32_t>(), Hs, n_sel,
                                               seq_lens.data_ptr<int32_t>(), page_size,
                                               static_cast<float>(scale), out.data_ptr()),
                 "quest_sparse_attention");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    Tensor ws = byte_workspace(
        ks_quest_sparse_attention_cuda_workspace(a.B, a.H, a.D, n_sel, page_size), q);
    int rc = ks_quest_sparse_attention_cuda(q.data_ptr(), k.data_ptr(), v.data_ptr(), a.dt, a.B,
                                            a.H, a.Hkv, a.cap, a.D, page_idx.data_ptr<int32_t>(),
                                            Hs, n_sel, seq_lens.data_ptr<int32_t>(), page_size,
                                            static_cast<float>(scale), ws.data_ptr(),
                                            out.data_ptr(), cur_stream());
    check_cuda_rc(rc, "quest_sparse_attention");
#endif
  }
  return out;
}

// ---------------------------------------------------------------------------
// 5. fused decode

Tensor attention_impl(const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &kmin,
                      const Tensor &kmax, const Tensor &seq_lens, int64_t page_size,
                      int64_t token_budget, bool group, double scale, bool cuda) {
  AttnDims a = validate_qkv(q, k, v, seq_lens, page_size, cuda);
  check_token_budget(token_budget, page_size);
  const int64_t max_pages = ceil_div(a.cap, page_size);
  check_meta(kmin, "kmin", q, "q", a.B, a.Hkv, a.D);
  check_meta(kmax, "kmax", q, "q", a.B, a.Hkv, a.D);
  check_size(kmin, 2, max_pages, "kmin", "max_pages = ceil(cap / page_size)");
  check_size(kmax, 2, max_pages, "kmax", "max_pages = ceil(cap / page_size)");
  const int64_t Hs = group ? a.Hkv : a.H;
  const int64_t n_sel = std::min(token_budget / page_size, max_pages);
  Tensor out = at::empty({a.B, a.H, a.D}, q.options());
  if (out.numel() == 0) return out;
  if (n_sel == 0) {  // cap == 0: nothing to attend to
    out.zero_();
    return out;
  }
  if (!cuda) {
    Tensor scores_ws = at::empty({a.B, Hs, max_pages}, q.options().dtype(at::kFloat));
    Tensor idx_ws = at::empty({a.B, Hs, n_sel}, q.options().dtype(at::kInt));
    check_cpu_rc(ks_quest_attention_cpu(q.data_ptr(), k.data_ptr(), v.data_ptr(), kmin.data_ptr(),
                                        kmax.data_ptr(), a.dt, a.B, a.H, a.Hkv, a.cap, a.D,
                                        max_pages, seq_lens.data_ptr<int32_t>(), page_size, n_sel,
                                        group ? 1 : 0, static_cast<float>(scale),
                                        scores_ws.data_ptr<float>(), idx_ws.data_ptr<int32_t>(),
                                        out.data_ptr()),
                 "quest_attention");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    Tensor ws = byte_workspace(ks_quest_attention_cuda_workspace(a.B, a.H, a.Hkv, a.D, max_pages,
                                                                 n_sel, page_size, group ? 1 : 0),
                               q);
    int rc = ks_quest_attention_cuda(q.data_ptr(), k.data_ptr(), v.data_ptr(), kmin.data_ptr(),
                                     kmax.data_ptr(), a.dt, a.B, a.H, a.Hkv, a.cap, a.D, max_pages,
                                     seq_lens.data_ptr<int32_t>(), page_size, n_sel,
                                     group ? 1 : 0, static_cast<float>(scale), ws.data_ptr(),
                                     out.data_ptr(), cur_stream());
    check_cuda_rc(rc, "quest_attention");
#endif
  }
  return out;
}

// ---------------------------------------------------------------------------
// entry points (one per op; see checks.h)

template <bool CUDA>
std::tuple<Tensor, Tensor> quest_page_metadata(const Tensor &k, const Tensor &seq_lens,
                                               int64_t page_size) {
  const OnDevice<CUDA> on(k);
  return page_metadata_impl(k, seq_lens, page_size, CUDA);
}

template <bool CUDA>
void quest_update_metadata(const Tensor &k, const Tensor &kmin, const Tensor &kmax,
                           const Tensor &start_lens, const Tensor &seq_lens, int64_t page_size) {
  const OnDevice<CUDA> on(k);
  update_metadata_impl(k, kmin, kmax, start_lens, seq_lens, page_size, CUDA);
}

template <bool CUDA>
Tensor quest_page_scores(const Tensor &q, const Tensor &kmin, const Tensor &kmax,
                         const Tensor &seq_lens, int64_t page_size, bool group) {
  const OnDevice<CUDA> on(q);
  return page_scores_impl(q, kmin, kmax, seq_lens, page_size, group, CUDA);
}

template <bool CUDA>
Tensor quest_select_pages(const Tensor &scores, const Tensor &seq_lens, int64_t page_size,
                          int64_t token_budget) {
  const OnDevice<CUDA> on(scores);
  return select_pages_impl(scores, seq_lens, page_size, token_budget, CUDA);
}

template <bool CUDA>
Tensor quest_sparse_attention(const Tensor &q, const Tensor &k, const Tensor &v,
                              const Tensor &page_idx, const Tensor &seq_lens, int64_t page_size,
                              double scale) {
  const OnDevice<CUDA> on(q);
  return sparse_attention_impl(q, k, v, page_idx, seq_lens, page_size, scale, CUDA);
}

template <bool CUDA>
Tensor quest_attention(const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &kmin,
                       const Tensor &kmax, const Tensor &seq_lens, int64_t page_size,
                       int64_t token_budget, bool group, double scale) {
  const OnDevice<CUDA> on(q);
  return attention_impl(q, k, v, kmin, kmax, seq_lens, page_size, token_budget, group, scale,
                        CUDA);
}

template <bool CUDA, class Lib = torch::Library>
void impls(Lib &m) {
  m.impl("quest_page_metadata", &quest_page_metadata<CUDA>);
  m.impl("quest_update_metadata", &quest_update_metadata<CUDA>);
  m.impl("quest_page_scores", &quest_page_scores<CUDA>);
  m.impl("quest_select_pages", &quest_select_pages<CUDA>);
  m.impl("quest_sparse_attention", &quest_sparse_attention<CUDA>);
  m.impl("quest_attention", &quest_attention<CUDA>);
}

}  // namespace
}  // namespace kvsparse

// ---------------------------------------------------------------------------
// registration

TORCH_LIBRARY_FRAGMENT(kvsparse, m) {
  m.def("quest_page_metadata(Tensor k, Tensor seq_lens, int page_size) -> (Tensor, Tensor)");
  m.def(
      "quest_update_metadata(Tensor k, Tensor(a!) kmin, Tensor(b!) kmax, Tensor start_lens, "
      "Tensor seq_lens, int page_size) -> ()");
  m.def(
      "quest_page_scores(Tensor q, Tensor kmin, Tensor kmax, Tensor seq_lens, int page_size, "
      "bool group) -> Tensor");
  m.def(
      "quest_select_pages(Tensor scores, Tensor seq_lens, int page_size, int token_budget) -> "
      "Tensor");
  m.def(
      "quest_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor page_idx, Tensor seq_lens, "
      "int page_size, float scale) -> Tensor");
  m.def(
      "quest_attention(Tensor q, Tensor k, Tensor v, Tensor kmin, Tensor kmax, Tensor seq_lens, "
      "int page_size, int token_budget, bool group, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvsparse, CPU, m) { kvsparse::impls<false>(m); }

TORCH_LIBRARY_IMPL(kvsparse, Autograd, m) {
  kvsparse::NoBackward nb{m};
  kvsparse::impls<false>(nb);
}

#ifdef KVSPARSE_WITH_CUDA
TORCH_LIBRARY_IMPL(kvsparse, CUDA, m) { kvsparse::impls<true>(m); }
#endif
