// kvsparse._C: the torch custom-op binding layer over the C/CUDA kernels of
// csrc/kernels/quest.h.
//
// This file only validates arguments, allocates outputs and workspaces and
// calls the kernels. Every op is registered in the `kvsparse` namespace with a
// CPU implementation and, when built with -DKVSPARSE_WITH_CUDA=1, a CUDA one.
// Fake (meta) kernels live in python/kvsparse/_ops.py.
//
// Error types: dtype problems raise TypeError (TORCH_CHECK_TYPE), shape and
// value problems ValueError (TORCH_CHECK_VALUE), device mismatches and kernel
// failures RuntimeError (TORCH_CHECK).
//
// Values of seq_lens / start_lens / page_idx are checked on CPU only. On CUDA
// reading them would need a device->host sync (and would break CUDA-graph
// capture), so they are trusted there: the CUDA kernels clamp lengths to
// [0, cap] and skip page indices outside the valid range.

#include <Python.h>

#include <torch/library.h>
#include <ATen/ATen.h>

#ifdef KVSPARSE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "quest.h"

// ---------------------------------------------------------------------------
// Python module: importing kvsparse._C loads the registrations below.
extern "C" {
PyObject *PyInit__C(void) {
  static struct PyModuleDef def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                   // name
      "kvsparse torch custom ops (registered as torch.ops.kvsparse.*)",  // doc
      -1,                                                     // size
      nullptr,                                                // methods
  };
  PyObject *m = PyModule_Create(&def);
  if (m == nullptr) return nullptr;
#ifdef KVSPARSE_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}

namespace kvsparse {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------
// validation helpers

ks_dtype to_ks_dtype(const Tensor &t, const char *name) {
  switch (t.scalar_type()) {
    case at::kFloat: return KS_F32;
    case at::kHalf: return KS_F16;
    case at::kBFloat16: return KS_BF16;
    default:
      TORCH_CHECK_TYPE(false, "kvsparse: ", name, " must be float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
  return KS_F32;  // unreachable
}

void check_same_dtype(const Tensor &t, const char *name, const Tensor &ref, const char *ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "kvsparse: ", name, " has dtype ",
                   t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
                   "; they must match");
}

void check_int32(const Tensor &t, const char *name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "kvsparse: ", name, " must be int32, got ",
                   t.scalar_type());
}

void check_dim(const Tensor &t, int64_t dim, const char *name, const char *layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, "kvsparse: ", name, " must be a ", dim, "-D tensor ", layout,
                    ", got shape ", t.sizes());
}

void check_contig(const Tensor &t, const char *name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "kvsparse: ", name,
                    " must be contiguous (call .contiguous() first)");
}

void check_device(const Tensor &t, const char *name, const Tensor &ref, const char *ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "kvsparse: ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; all tensors must be on the same device");
}

void check_size(const Tensor &t, int64_t d, int64_t expected, const char *name, const char *what) {
  TORCH_CHECK_VALUE(t.size(d) == expected, "kvsparse: ", name, ".shape[", d, "] (", what,
                    ") must be ", expected, ", got shape ", t.sizes());
}

void check_page_size(int64_t page_size) {
  TORCH_CHECK_VALUE(page_size >= 1, "kvsparse: page_size must be >= 1, got ", page_size);
}

void check_token_budget(int64_t token_budget, int64_t page_size) {
  TORCH_CHECK_VALUE(token_budget >= page_size, "kvsparse: token_budget (", token_budget,
                    ") must be >= page_size (", page_size, ")");
}

void check_head_dim(int64_t D, bool cuda) {
  if (cuda) {
    TORCH_CHECK_VALUE(D == 64 || D == 128,
                      "kvsparse: head_dim D (last dim of q/k) must be 64 or 128 on CUDA, got ", D);
  } else {
    TORCH_CHECK_VALUE(D >= 8 && D % 8 == 0 && D <= 256,
                      "kvsparse: head_dim D (last dim of q/k) must be a multiple of 8 in [8, 256], got ",
                      D);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// seq_lens: int32 [B], contiguous, same device as ref.
void check_lens_tensor(const Tensor &lens, const char *name, int64_t B, const Tensor &ref,
                       const char *ref_name) {
  check_int32(lens, name);
  check_dim(lens, 1, name, "[B]");
  check_size(lens, 0, B, name, "B");
  check_contig(lens, name);
  check_device(lens, name, ref, ref_name);
}

// CPU only: every value in [0, hi].
void check_lens_values(const Tensor &lens, const char *name, int64_t hi, const char *hi_what) {
  const int32_t *p = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < lens.numel(); ++b) {
    TORCH_CHECK_VALUE(p[b] >= 0 && p[b] <= hi, "kvsparse: ", name, "[", b, "] = ", p[b],
                      " is out of range [0, ", hi, "] (", hi_what, ")");
  }
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

// CPU only: every page_idx value is -1 or in [0, max_pages).
void check_page_idx_values(const Tensor &page_idx, int64_t max_pages) {
  const int32_t *p = page_idx.data_ptr<int32_t>();
  const int64_t n = page_idx.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] == -1 || (p[i] >= 0 && p[i] < max_pages), "kvsparse: page_idx value ",
                      p[i], " at flat index ", i, " must be -1 or in [0, ", max_pages,
                      ") (max_pages = ceil(cap / page_size))");
  }
}

// q [B,H,D] (float, contiguous)
struct QDims {
  int64_t B, H, D;
};
QDims check_q(const Tensor &q) {
  to_ks_dtype(q, "q");
  check_dim(q, 3, "q", "[B, H, D]");
  check_contig(q, "q");
  TORCH_CHECK_VALUE(q.size(1) >= 1, "kvsparse: q must have at least one head, got shape ",
                    q.sizes());
  return {q.size(0), q.size(1), q.size(2)};
}

// k-like cache [B,Hkv,cap,D] (float, contiguous)
struct KDims {
  int64_t B, Hkv, cap, D;
};
KDims check_cache(const Tensor &k, const char *name) {
  to_ks_dtype(k, name);
  check_dim(k, 4, name, "[B, Hkv, cap, D]");
  check_contig(k, name);
  TORCH_CHECK_VALUE(k.size(1) >= 1, "kvsparse: ", name,
                    " must have at least one KV head, got shape ", k.sizes());
  return {k.size(0), k.size(1), k.size(2), k.size(3)};
}

// kmin/kmax [B,Hkv,max_pages,D] matching (B, Hkv, D); returns max_pages.
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

void check_gqa(int64_t H, int64_t Hkv) {
  TORCH_CHECK_VALUE(H % Hkv == 0, "kvsparse: the number of query heads H of q (", H,
                    ") must be a multiple of the number of KV heads Hkv (", Hkv, ")");
}

#ifdef KVSPARSE_WITH_CUDA
void check_cuda_rc(int rc, const char *op) {
  TORCH_CHECK(rc == 0, "kvsparse: CUDA kernel for ", op, " failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(rc)));
}
void *cur_stream() { return static_cast<void *>(at::cuda::getCurrentCUDAStream().stream()); }
#endif

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
    ks_quest_metadata_cpu(k.data_ptr(), a.dt, a.k.B, a.k.Hkv, a.k.cap, a.k.D, nullptr,
                          seq_lens.data_ptr<int32_t>(), page_size, a.max_pages, kmin.data_ptr(),
                          kmax.data_ptr());
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_quest_metadata_cuda(k.data_ptr(), a.dt, a.k.B, a.k.Hkv, a.k.cap, a.k.D, nullptr,
                                    seq_lens.data_ptr<int32_t>(), page_size, a.max_pages,
                                    kmin.data_ptr(), kmax.data_ptr(), cur_stream());
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
  if (!cuda) check_start_values(start_lens, seq_lens);
  if (kmin.numel() == 0) return;
  if (!cuda) {
    ks_quest_metadata_cpu(k.data_ptr(), a.dt, a.k.B, a.k.Hkv, a.k.cap, a.k.D,
                          start_lens.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
                          page_size, a.max_pages, kmin.data_ptr(), kmax.data_ptr());
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_quest_metadata_cuda(k.data_ptr(), a.dt, a.k.B, a.k.Hkv, a.k.cap, a.k.D,
                                    start_lens.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
                                    page_size, a.max_pages, kmin.data_ptr(), kmax.data_ptr(),
                                    cur_stream());
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
  TORCH_CHECK_VALUE(kmin.dim() == 4, "kvsparse: kmin must be a 4-D tensor [B, Hkv, max_pages, D], got shape ",
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
  if (!cuda) check_lens_values(seq_lens, "seq_lens", max_pages * page_size, "max_pages * page_size");
  const int64_t Hs = group ? Hkv : qd.H;
  Tensor scores = at::empty({qd.B, Hs, max_pages}, q.options().dtype(at::kFloat));
  if (scores.numel() == 0) return scores;
  const ks_dtype dt = to_ks_dtype(q, "q");
  if (!cuda) {
    ks_quest_scores_cpu(q.data_ptr(), kmin.data_ptr(), kmax.data_ptr(), dt, qd.B, qd.H, Hkv,
                        max_pages, qd.D, seq_lens.data_ptr<int32_t>(), page_size, group ? 1 : 0,
                        scores.data_ptr<float>());
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_quest_scores_cuda(q.data_ptr(), kmin.data_ptr(), kmax.data_ptr(), dt, qd.B, qd.H,
                                  Hkv, max_pages, qd.D, seq_lens.data_ptr<int32_t>(), page_size,
                                  group ? 1 : 0, scores.data_ptr<float>(), cur_stream());
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
  if (!cuda) check_lens_values(seq_lens, "seq_lens", max_pages * page_size, "max_pages * page_size");
  const int64_t n_sel = std::min(token_budget / page_size, max_pages);
  Tensor page_idx = at::empty({B, Hs, n_sel}, scores.options().dtype(at::kInt));
  if (page_idx.numel() == 0) return page_idx;
  if (!cuda) {
    ks_quest_select_cpu(scores.data_ptr<float>(), B, Hs, max_pages, seq_lens.data_ptr<int32_t>(),
                        page_size, n_sel, page_idx.data_ptr<int32_t>());
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_quest_select_cuda(scores.data_ptr<float>(), B, Hs, max_pages,
                                  seq_lens.data_ptr<int32_t>(), page_size, n_sel,
                                  page_idx.data_ptr<int32_t>(), cur_stream());
    check_cuda_rc(rc, "quest_select_pages");
#endif
  }
  return page_idx;
}

// ---------------------------------------------------------------------------
// 4. sparse attention

struct AttnDims {
  int64_t B, H, Hkv, cap, D;
  ks_dtype dt;
};

AttnDims validate_qkv(const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &seq_lens,
                      int64_t page_size, bool cuda) {
  QDims qd = check_q(q);
  KDims kd = check_cache(k, "k");
  check_same_dtype(k, "k", q, "q");
  check_device(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  check_dim(v, 4, "v", "[B, Hkv, cap, D]");
  check_contig(v, "v");
  check_device(v, "v", q, "q");
  check_size(k, 0, qd.B, "k", "B, as q.shape[0]");
  check_size(k, 3, qd.D, "k", "D, as q.shape[2]");
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "kvsparse: v must have the same shape as k ",
                    k.sizes(), ", got ", v.sizes());
  check_gqa(qd.H, kd.Hkv);
  check_head_dim(qd.D, cuda);
  check_page_size(page_size);
  check_lens_tensor(seq_lens, "seq_lens", qd.B, q, "q");
  if (!cuda) check_lens_values(seq_lens, "seq_lens", kd.cap, "cap = k.shape[2]");
  return {qd.B, qd.H, kd.Hkv, kd.cap, qd.D, to_ks_dtype(q, "q")};
}

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
    ks_quest_sparse_attn_cpu(q.data_ptr(), k.data_ptr(), v.data_ptr(), a.dt, a.B, a.H, a.Hkv,
                             a.cap, a.D, page_idx.data_ptr<int32_t>(), Hs, n_sel,
                             seq_lens.data_ptr<int32_t>(), page_size, static_cast<float>(scale),
                             out.data_ptr());
  } else {
#ifdef KVSPARSE_WITH_CUDA
    size_t ws_bytes = ks_quest_sparse_attn_cuda_workspace(a.B, a.H, a.D, n_sel, page_size);
    Tensor ws = at::empty({static_cast<int64_t>(std::max<size_t>(ws_bytes, 1))},
                          q.options().dtype(at::kByte));
    int rc = ks_quest_sparse_attn_cuda(q.data_ptr(), k.data_ptr(), v.data_ptr(), a.dt, a.B, a.H,
                                       a.Hkv, a.cap, a.D, page_idx.data_ptr<int32_t>(), Hs, n_sel,
                                       seq_lens.data_ptr<int32_t>(), page_size,
                                       static_cast<float>(scale), ws.data_ptr(), out.data_ptr(),
                                       cur_stream());
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
    ks_quest_decode_cpu(q.data_ptr(), k.data_ptr(), v.data_ptr(), kmin.data_ptr(),
                        kmax.data_ptr(), a.dt, a.B, a.H, a.Hkv, a.cap, a.D, max_pages,
                        seq_lens.data_ptr<int32_t>(), page_size, n_sel, group ? 1 : 0,
                        static_cast<float>(scale), scores_ws.data_ptr<float>(),
                        idx_ws.data_ptr<int32_t>(), out.data_ptr());
  } else {
#ifdef KVSPARSE_WITH_CUDA
    size_t ws_bytes = ks_quest_decode_cuda_workspace(a.B, a.H, a.Hkv, a.D, max_pages, n_sel,
                                                     page_size, group ? 1 : 0);
    Tensor ws = at::empty({static_cast<int64_t>(std::max<size_t>(ws_bytes, 1))},
                          q.options().dtype(at::kByte));
    int rc = ks_quest_decode_cuda(q.data_ptr(), k.data_ptr(), v.data_ptr(), kmin.data_ptr(),
                                  kmax.data_ptr(), a.dt, a.B, a.H, a.Hkv, a.cap, a.D, max_pages,
                                  seq_lens.data_ptr<int32_t>(), page_size, n_sel, group ? 1 : 0,
                                  static_cast<float>(scale), ws.data_ptr(), out.data_ptr(),
                                  cur_stream());
    check_cuda_rc(rc, "quest_attention");
#endif
  }
  return out;
}

// ---------------------------------------------------------------------------
// CPU entry points

std::tuple<Tensor, Tensor> page_metadata_cpu(const Tensor &k, const Tensor &seq_lens,
                                             int64_t page_size) {
  return page_metadata_impl(k, seq_lens, page_size, false);
}
void update_metadata_cpu(const Tensor &k, const Tensor &kmin, const Tensor &kmax,
                         const Tensor &start_lens, const Tensor &seq_lens, int64_t page_size) {
  update_metadata_impl(k, kmin, kmax, start_lens, seq_lens, page_size, false);
}
Tensor page_scores_cpu(const Tensor &q, const Tensor &kmin, const Tensor &kmax,
                       const Tensor &seq_lens, int64_t page_size, bool group) {
  return page_scores_impl(q, kmin, kmax, seq_lens, page_size, group, false);
}
Tensor select_pages_cpu(const Tensor &scores, const Tensor &seq_lens, int64_t page_size,
                        int64_t token_budget) {
  return select_pages_impl(scores, seq_lens, page_size, token_budget, false);
}
Tensor sparse_attention_cpu(const Tensor &q, const Tensor &k, const Tensor &v,
                            const Tensor &page_idx, const Tensor &seq_lens, int64_t page_size,
                            double scale) {
  return sparse_attention_impl(q, k, v, page_idx, seq_lens, page_size, scale, false);
}
Tensor attention_cpu(const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &kmin,
                     const Tensor &kmax, const Tensor &seq_lens, int64_t page_size,
                     int64_t token_budget, bool group, double scale) {
  return attention_impl(q, k, v, kmin, kmax, seq_lens, page_size, token_budget, group, scale,
                        false);
}

// ---------------------------------------------------------------------------
// CUDA entry points

#ifdef KVSPARSE_WITH_CUDA
std::tuple<Tensor, Tensor> page_metadata_cuda(const Tensor &k, const Tensor &seq_lens,
                                              int64_t page_size) {
  const c10::cuda::CUDAGuard guard(k.device());
  return page_metadata_impl(k, seq_lens, page_size, true);
}
void update_metadata_cuda(const Tensor &k, const Tensor &kmin, const Tensor &kmax,
                          const Tensor &start_lens, const Tensor &seq_lens, int64_t page_size) {
  const c10::cuda::CUDAGuard guard(k.device());
  update_metadata_impl(k, kmin, kmax, start_lens, seq_lens, page_size, true);
}
Tensor page_scores_cuda(const Tensor &q, const Tensor &kmin, const Tensor &kmax,
                        const Tensor &seq_lens, int64_t page_size, bool group) {
  const c10::cuda::CUDAGuard guard(q.device());
  return page_scores_impl(q, kmin, kmax, seq_lens, page_size, group, true);
}
Tensor select_pages_cuda(const Tensor &scores, const Tensor &seq_lens, int64_t page_size,
                         int64_t token_budget) {
  const c10::cuda::CUDAGuard guard(scores.device());
  return select_pages_impl(scores, seq_lens, page_size, token_budget, true);
}
Tensor sparse_attention_cuda(const Tensor &q, const Tensor &k, const Tensor &v,
                             const Tensor &page_idx, const Tensor &seq_lens, int64_t page_size,
                             double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  return sparse_attention_impl(q, k, v, page_idx, seq_lens, page_size, scale, true);
}
Tensor attention_cuda(const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &kmin,
                      const Tensor &kmax, const Tensor &seq_lens, int64_t page_size,
                      int64_t token_budget, bool group, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_impl(q, k, v, kmin, kmax, seq_lens, page_size, token_budget, group, scale,
                        true);
}
#endif

}  // namespace

// ---------------------------------------------------------------------------
// registration

TORCH_LIBRARY(kvsparse, m) {
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

TORCH_LIBRARY_IMPL(kvsparse, CPU, m) {
  m.impl("quest_page_metadata", &page_metadata_cpu);
  m.impl("quest_update_metadata", &update_metadata_cpu);
  m.impl("quest_page_scores", &page_scores_cpu);
  m.impl("quest_select_pages", &select_pages_cpu);
  m.impl("quest_sparse_attention", &sparse_attention_cpu);
  m.impl("quest_attention", &attention_cpu);
}

#ifdef KVSPARSE_WITH_CUDA
TORCH_LIBRARY_IMPL(kvsparse, CUDA, m) {
  m.impl("quest_page_metadata", &page_metadata_cuda);
  m.impl("quest_update_metadata", &update_metadata_cuda);
  m.impl("quest_page_scores", &page_scores_cuda);
  m.impl("quest_select_pages", &select_pages_cuda);
  m.impl("quest_sparse_attention", &sparse_attention_cuda);
  m.impl("quest_attention", &attention_cuda);
}
#endif

}  // namespace kvsparse
