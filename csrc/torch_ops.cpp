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
#include <ATen/MemoryOverlap.h>

#ifdef KVSPARSE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "quest.h"
#include "sparq.h"
#include "qaq.h"

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

// Quest size limits, in one place: 1 <= page_size <= KS_MAX_PAGE_SIZE (int32
// positions), cap <= INT32_MAX (check_cache); max_pages = ceil_div(cap, P).
void check_page_size(int64_t page_size) {
  TORCH_CHECK_VALUE(page_size >= 1 && page_size <= KS_MAX_PAGE_SIZE,
                    "kvsparse: page_size must be in [1, ", KS_MAX_PAGE_SIZE, "], got ", page_size);
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

// ceil(a / b) for a >= 0, b >= 1, without forming a + b - 1 (b may be huge)
int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// a * b for a, b >= 0, saturated at INT64_MAX (only compared against lengths)
int64_t sat_mul(int64_t a, int64_t b) {
  if (a == 0 || b == 0) return 0;
  return a > INT64_MAX / b ? INT64_MAX : a * b;
}

// CPU kernels return 0 or KS_ERR_NOMEM (a scratch allocation failed).
void check_cpu_rc(int rc, const char *op) {
  TORCH_CHECK_WITH(OutOfMemoryError, rc == 0, "kvsparse: ", op,
                   ": out of host memory for the kernel's scratch buffers");
}

// Tensors an op writes must not share memory with any other argument: the
// kernels read and write in parallel, so an overlap gives silent garbage.
// Every argument is contiguous here, so the overlap test is exact.
struct Arg {
  const Tensor *t;
  std::string name;
};
void check_no_overlap(std::initializer_list<Arg> written, std::initializer_list<Arg> read) {
  for (auto w = written.begin(); w != written.end(); ++w) {
    auto test = [&](const Arg &o) {
      if (!w->t->defined() || !o.t->defined()) return;
      const auto st = at::get_overlap_status(*w->t, *o.t);
      TORCH_CHECK_VALUE(st == at::MemOverlapStatus::No, "kvsparse: ", w->name,
                        " (written by the op) shares memory with ", o.name,
                        "; pass separate tensors (e.g. .clone())");
    };
    for (auto o = w + 1; o != written.end(); ++o) test(*o);
    for (const Arg &o : read) test(o);
  }
}

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
  TORCH_CHECK_VALUE(k.size(2) <= INT32_MAX, "kvsparse: ", name,
                    ".shape[2] (cap) must be <= 2^31 - 1 (positions are int32), got ", k.size(2));
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
    ks_quest_page_metadata_cpu(k.data_ptr(), a.dt, a.k.B, a.k.Hkv, a.k.cap, a.k.D, nullptr,
                               seq_lens.data_ptr<int32_t>(), page_size, a.max_pages, kmin.data_ptr(),
                               kmax.data_ptr());
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_quest_page_metadata_cuda(k.data_ptr(), a.dt, a.k.B, a.k.Hkv, a.k.cap, a.k.D, nullptr,
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
  if (!cuda) check_lens_values(seq_lens, "seq_lens", sat_mul(max_pages, page_size), "max_pages * page_size");
  const int64_t Hs = group ? Hkv : qd.H;
  Tensor scores = at::empty({qd.B, Hs, max_pages}, q.options().dtype(at::kFloat));
  if (scores.numel() == 0) return scores;
  const ks_dtype dt = to_ks_dtype(q, "q");
  if (!cuda) {
    check_cpu_rc(ks_quest_page_scores_cpu(q.data_ptr(), kmin.data_ptr(), kmax.data_ptr(), dt, qd.B, qd.H, Hkv,
                          max_pages, qd.D, seq_lens.data_ptr<int32_t>(), page_size, group ? 1 : 0,
                          scores.data_ptr<float>()),
                 "quest_page_scores");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    int rc = ks_quest_page_scores_cuda(q.data_ptr(), kmin.data_ptr(), kmax.data_ptr(), dt, qd.B, qd.H,
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
  if (!cuda) check_lens_values(seq_lens, "seq_lens", sat_mul(max_pages, page_size), "max_pages * page_size");
  const int64_t n_sel = std::min(token_budget / page_size, max_pages);
  Tensor page_idx = at::empty({B, Hs, n_sel}, scores.options().dtype(at::kInt));
  if (page_idx.numel() == 0) return page_idx;
  if (!cuda) {
    check_cpu_rc(ks_quest_select_pages_cpu(scores.data_ptr<float>(), B, Hs, max_pages, seq_lens.data_ptr<int32_t>(),
                          page_size, n_sel, page_idx.data_ptr<int32_t>()),
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
    check_cpu_rc(ks_quest_sparse_attention_cpu(q.data_ptr(), k.data_ptr(), v.data_ptr(), a.dt, a.B, a.H, a.Hkv,
                               a.cap, a.D, page_idx.data_ptr<int32_t>(), Hs, n_sel,
                               seq_lens.data_ptr<int32_t>(), page_size, static_cast<float>(scale),
                               out.data_ptr()),
                 "quest_sparse_attention");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    size_t ws_bytes = ks_quest_sparse_attention_cuda_workspace(a.B, a.H, a.D, n_sel, page_size);
    Tensor ws = at::empty({static_cast<int64_t>(std::max<size_t>(ws_bytes, 1))},
                          q.options().dtype(at::kByte));
    int rc = ks_quest_sparse_attention_cuda(q.data_ptr(), k.data_ptr(), v.data_ptr(), a.dt, a.B, a.H,
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
    check_cpu_rc(ks_quest_attention_cpu(q.data_ptr(), k.data_ptr(), v.data_ptr(), kmin.data_ptr(),
                          kmax.data_ptr(), a.dt, a.B, a.H, a.Hkv, a.cap, a.D, max_pages,
                          seq_lens.data_ptr<int32_t>(), page_size, n_sel, group ? 1 : 0,
                          static_cast<float>(scale), scores_ws.data_ptr<float>(),
                          idx_ws.data_ptr<int32_t>(), out.data_ptr()),
                 "quest_attention");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    size_t ws_bytes = ks_quest_attention_cuda_workspace(a.B, a.H, a.Hkv, a.D, max_pages, n_sel,
                                                        page_size, group ? 1 : 0);
    Tensor ws = at::empty({static_cast<int64_t>(std::max<size_t>(ws_bytes, 1))},
                          q.options().dtype(at::kByte));
    int rc = ks_quest_attention_cuda(q.data_ptr(), k.data_ptr(), v.data_ptr(), kmin.data_ptr(),
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

// ===========================================================================
// SparQ (csrc/kernels/sparq.h). Same conventions as the Quest ops above.
// seq_lens / i1 / i2 values are checked on CPU only (trusted and clamped on
// CUDA). SparQ ops are registered as a fragment of the kvsparse library.

namespace {

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

// v_mean float32 [B,Hkv,D].
void check_v_mean(const Tensor &vm, const Tensor &ref, const char *ref_name, int64_t B,
                  int64_t Hkv, int64_t D) {
  TORCH_CHECK_TYPE(vm.scalar_type() == at::kFloat, "kvsparse: v_mean must be float32, got ",
                   vm.scalar_type());
  check_dim(vm, 3, "v_mean", "[B, Hkv, D]");
  check_size(vm, 0, B, "v_mean", "B");
  check_size(vm, 1, Hkv, "v_mean", "Hkv");
  check_size(vm, 2, D, "v_mean", "D");
  check_contig(vm, "v_mean");
  check_device(vm, "v_mean", ref, ref_name);
}

// s_hat float32 [B,H,cap].
void check_s_hat(const Tensor &s, const Tensor &ref, const char *ref_name, int64_t B, int64_t H,
                 int64_t cap) {
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, "kvsparse: s_hat must be float32, got ",
                   s.scalar_type());
  check_dim(s, 3, "s_hat", "[B, H, cap]");
  check_size(s, 0, B, "s_hat", "B");
  check_size(s, 1, H, "s_hat", "H");
  check_size(s, 2, cap, "s_hat", "cap");
  check_contig(s, "s_hat");
  check_device(s, "s_hat", ref, ref_name);
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

// CUDA: a row of i1 / i2 serves at most 8 query heads.
void check_cuda_rows(int64_t H, int64_t Hkv, int64_t Hs, bool cuda) {
  if (!cuda || Hs == H) return;
  TORCH_CHECK_VALUE(H / Hkv <= 8, "kvsparse: group mode on CUDA supports at most 8 query heads per KV head (H / Hkv), got ",
                    H / Hkv);
}

Tensor byte_workspace(size_t bytes, const Tensor &like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                   like.options().dtype(at::kByte));
}

// ---------------------------------------------------------------------------
// 1. cache maintenance

std::tuple<Tensor, Tensor> sparq_build_impl(const Tensor &k, const Tensor &v,
                                            const Tensor &seq_lens, bool cuda) {
  KDims kd = check_cache(k, "k");
  check_head_dim(kd.D, cuda);
  check_same_dtype(v, "v", k, "k");
  check_dim(v, 4, "v", "[B, Hkv, cap, D]");
  check_contig(v, "v");
  check_device(v, "v", k, "k");
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "kvsparse: v must have the same shape as k ",
                    k.sizes(), ", got ", v.sizes());
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
  check_same_dtype(v, "v", k, "k");
  check_dim(v, 4, "v", "[B, Hkv, cap, D]");
  check_contig(v, "v");
  check_device(v, "v", k, "k");
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "kvsparse: v must have the same shape as k ",
                    k.sizes(), ", got ", v.sizes());
  check_same_dtype(k_new, "k_new", k, "k");
  check_dim(k_new, 4, "k_new", "[B, Hkv, n_new, D]");
  check_contig(k_new, "k_new");
  check_device(k_new, "k_new", k, "k");
  check_size(k_new, 0, kd.B, "k_new", "B");
  check_size(k_new, 1, kd.Hkv, "k_new", "Hkv");
  check_size(k_new, 3, kd.D, "k_new", "D");
  check_same_dtype(v_new, "v_new", k, "k");
  check_dim(v_new, 4, "v_new", "[B, Hkv, n_new, D]");
  check_contig(v_new, "v_new");
  check_device(v_new, "v_new", k, "k");
  TORCH_CHECK_VALUE(v_new.sizes() == k_new.sizes(), "kvsparse: v_new must have the same shape as k_new ",
                    k_new.sizes(), ", got ", v_new.sizes());
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
  AttnDims a = validate_qkv(q, k, v, seq_lens, 1, cuda);
  const int64_t Hs2 = check_index_rows(i2, "i2", "[B, Hs, n_sel]", q, "q", a.B, a.H, a.Hkv);
  const int64_t n_sel = i2.size(2);
  check_cuda_rows(a.H, a.Hkv, Hs2, cuda);
  check_s_hat(s_hat, q, "q", a.B, a.H, a.cap);
  check_v_mean(v_mean, q, "q", a.B, a.Hkv, a.D);
  if (!cuda) check_index_values(i2, "i2", -1, a.cap, "-1 or a position in [0, cap)");
  Tensor out = at::empty({a.B, a.H, a.D}, q.options());
  if (out.numel() == 0) return out;
  if (!cuda) {
    check_cpu_rc(ks_sparq_sparse_attention_cpu(q.data_ptr(), k.data_ptr(), v.data_ptr(), a.dt, a.B, a.H, a.Hkv,
                               a.cap, a.D, i2.data_ptr<int32_t>(), Hs2, n_sel,
                               s_hat.data_ptr<float>(), v_mean.data_ptr<float>(),
                               seq_lens.data_ptr<int32_t>(), static_cast<float>(scale),
                               reallocate ? 1 : 0, out.data_ptr()),
                 "sparq_sparse_attention");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    Tensor ws = byte_workspace(ks_sparq_sparse_attention_cuda_workspace(a.B, a.H, Hs2, a.D, n_sel), q);
    int rc = ks_sparq_sparse_attention_cuda(q.data_ptr(), k.data_ptr(), v.data_ptr(), a.dt, a.B, a.H,
                                            a.Hkv, a.cap, a.D, i2.data_ptr<int32_t>(), Hs2, n_sel,
                                            s_hat.data_ptr<float>(), v_mean.data_ptr<float>(),
                                            seq_lens.data_ptr<int32_t>(), static_cast<float>(scale),
                                            reallocate ? 1 : 0, ws.data_ptr(), out.data_ptr(),
                                            cur_stream());
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
  AttnDims a = validate_qkv(q, k, v, seq_lens, 1, cuda);
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
// entry points (CPU / CUDA)

#ifdef KVSPARSE_WITH_CUDA
#define KS_SPARQ_GUARD(t) const c10::cuda::CUDAGuard guard((t).device())
#endif

std::tuple<Tensor, Tensor> sparq_build_cpu(const Tensor &k, const Tensor &v, const Tensor &seq_lens) {
  return sparq_build_impl(k, v, seq_lens, false);
}
void sparq_append_cpu(const Tensor &k_new, const Tensor &v_new, const Tensor &k, const Tensor &v,
                      const Tensor &kt, const Tensor &v_mean, const Tensor &seq_lens) {
  sparq_append_impl(k_new, v_new, k, v, kt, v_mean, seq_lens, false);
}
Tensor sparq_top_channels_cpu(const Tensor &q, int64_t r, int64_t group_size) {
  return sparq_top_channels_impl(q, r, group_size, false);
}
Tensor sparq_approx_scores_cpu(const Tensor &q, const Tensor &kt, const Tensor &i1,
                               const Tensor &seq_lens) {
  return sparq_approx_scores_impl(q, kt, i1, seq_lens, false);
}
Tensor sparq_top_positions_cpu(const Tensor &s_hat, const Tensor &seq_lens, int64_t k,
                               int64_t local_window, int64_t group_size) {
  return sparq_top_positions_impl(s_hat, seq_lens, k, local_window, group_size, false);
}
Tensor sparq_sparse_attention_cpu(const Tensor &q, const Tensor &k, const Tensor &v,
                                  const Tensor &i2, const Tensor &s_hat, const Tensor &v_mean,
                                  const Tensor &seq_lens, double scale, bool reallocate) {
  return sparq_sparse_attention_impl(q, k, v, i2, s_hat, v_mean, seq_lens, scale, reallocate, false);
}
Tensor sparq_attention_cpu(const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &kt,
                           const Tensor &v_mean, const Tensor &seq_lens, int64_t r, int64_t k_top,
                           int64_t local_window, bool group, bool reallocate, double scale) {
  return sparq_attention_impl(q, k, v, kt, v_mean, seq_lens, r, k_top, local_window, group,
                              reallocate, scale, false);
}

#ifdef KVSPARSE_WITH_CUDA
std::tuple<Tensor, Tensor> sparq_build_cuda(const Tensor &k, const Tensor &v, const Tensor &seq_lens) {
  KS_SPARQ_GUARD(k);
  return sparq_build_impl(k, v, seq_lens, true);
}
void sparq_append_cuda(const Tensor &k_new, const Tensor &v_new, const Tensor &k, const Tensor &v,
                       const Tensor &kt, const Tensor &v_mean, const Tensor &seq_lens) {
  KS_SPARQ_GUARD(k);
  sparq_append_impl(k_new, v_new, k, v, kt, v_mean, seq_lens, true);
}
Tensor sparq_top_channels_cuda(const Tensor &q, int64_t r, int64_t group_size) {
  KS_SPARQ_GUARD(q);
  return sparq_top_channels_impl(q, r, group_size, true);
}
Tensor sparq_approx_scores_cuda(const Tensor &q, const Tensor &kt, const Tensor &i1,
                                const Tensor &seq_lens) {
  KS_SPARQ_GUARD(q);
  return sparq_approx_scores_impl(q, kt, i1, seq_lens, true);
}
Tensor sparq_top_positions_cuda(const Tensor &s_hat, const Tensor &seq_lens, int64_t k,
                                int64_t local_window, int64_t group_size) {
  KS_SPARQ_GUARD(s_hat);
  return sparq_top_positions_impl(s_hat, seq_lens, k, local_window, group_size, true);
}
Tensor sparq_sparse_attention_cuda(const Tensor &q, const Tensor &k, const Tensor &v,
                                   const Tensor &i2, const Tensor &s_hat, const Tensor &v_mean,
                                   const Tensor &seq_lens, double scale, bool reallocate) {
  KS_SPARQ_GUARD(q);
  return sparq_sparse_attention_impl(q, k, v, i2, s_hat, v_mean, seq_lens, scale, reallocate, true);
}
Tensor sparq_attention_cuda(const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &kt,
                            const Tensor &v_mean, const Tensor &seq_lens, int64_t r, int64_t k_top,
                            int64_t local_window, bool group, bool reallocate, double scale) {
  KS_SPARQ_GUARD(q);
  return sparq_attention_impl(q, k, v, kt, v_mean, seq_lens, r, k_top, local_window, group,
                              reallocate, scale, true);
}
#undef KS_SPARQ_GUARD
#endif

}  // namespace

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

TORCH_LIBRARY_IMPL(kvsparse, CPU, m) {
  m.impl("sparq_build", &sparq_build_cpu);
  m.impl("sparq_append", &sparq_append_cpu);
  m.impl("sparq_top_channels", &sparq_top_channels_cpu);
  m.impl("sparq_approx_scores", &sparq_approx_scores_cpu);
  m.impl("sparq_top_positions", &sparq_top_positions_cpu);
  m.impl("sparq_sparse_attention", &sparq_sparse_attention_cpu);
  m.impl("sparq_attention", &sparq_attention_cpu);
}

#ifdef KVSPARSE_WITH_CUDA
TORCH_LIBRARY_IMPL(kvsparse, CUDA, m) {
  m.impl("sparq_build", &sparq_build_cuda);
  m.impl("sparq_append", &sparq_append_cuda);
  m.impl("sparq_top_channels", &sparq_top_channels_cuda);
  m.impl("sparq_approx_scores", &sparq_approx_scores_cuda);
  m.impl("sparq_top_positions", &sparq_top_positions_cuda);
  m.impl("sparq_sparse_attention", &sparq_sparse_attention_cuda);
  m.impl("sparq_attention", &sparq_attention_cuda);
}
#endif


// ===========================================================================
// QAQ (csrc/kernels/qaq.h): quantized KV cache with per-token bit-widths.
// A quantized cache ("store") is six tensors: arena [B, A] uint8, offsets
// [B, Hg, cap] int32, widths [B, Hg, cap] uint8, sz [B, Hg, cap, 2] float16,
// oidx [B, Hg, cap, n_out] int16, oval [B, Hg, cap, n_out] (cache dtype), with
// Hg = Hkv (per-head groups) or 1 (groups shared across the KV heads). Values
// of widths / offsets / oidx / pos / seq_lens are checked on CPU only.

namespace {

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
                       const Tensor &new_offsets, const QStore &s, bool cuda) {
  KDims xd = check_cache(x, "x");
  check_head_dim(xd.D, cuda);
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
    check_cpu_rc(ks_qaq_quantize_cpu(x.data_ptr(), d.dt, d.B, xd.Hkv, n, xd.D, d.cap, pos.data_ptr<int32_t>(),
                          new_widths.data_ptr<uint8_t>(), new_offsets.data_ptr<int32_t>(),
                          s.offsets.data_ptr<int32_t>(), st),
                 "qaq_quantize");
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
// 5. attention

std::tuple<Tensor, Tensor> qaq_attention_impl(const Tensor &q, const QStore &ks, const QStore &vs,
                                              const Tensor &seq_lens, int64_t Hkv, double scale,
                                              bool return_p_max, bool cuda) {
  QDims qd = check_q(q);
  check_qaq_heads(Hkv, qd.D, cuda);
  check_gqa(qd.H, Hkv);
  TORCH_CHECK_VALUE(!cuda || qd.H / Hkv <= 8, "kvsparse: qaq_attention on CUDA supports at most 8 query heads per KV head (H / Hkv), got ",
                    qd.H / Hkv);
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
  Tensor out = at::empty({qd.B, qd.H, qd.D}, q.options());
  Tensor pm = return_p_max ? at::empty({qd.B, Hkv, kd.cap}, q.options().dtype(at::kFloat))
                           : at::empty({0}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    if (pm.numel()) pm.zero_();
    return {out, pm};
  }
  ks_qaq_store kst = to_store(ks, kd), vst = to_store(vs, vd);
  float *pmp = return_p_max && pm.numel() ? pm.data_ptr<float>() : nullptr;
  if (!cuda) {
    check_cpu_rc(ks_qaq_attention_cpu(q.data_ptr(), kd.dt, qd.B, qd.H, Hkv, kd.cap, qd.D, kst, vst,
                           seq_lens.data_ptr<int32_t>(), static_cast<float>(scale), pmp,
                           out.data_ptr()),
                 "qaq_attention");
  } else {
#ifdef KVSPARSE_WITH_CUDA
    Tensor ws = byte_workspace(ks_qaq_attention_cuda_workspace(qd.B, qd.H, Hkv, kd.cap, qd.D, pmp ? 1 : 0), q);
    int rc = ks_qaq_attention_cuda(q.data_ptr(), kd.dt, qd.B, qd.H, Hkv, kd.cap, qd.D, kst, vst,
                                   seq_lens.data_ptr<int32_t>(), static_cast<float>(scale), pmp,
                                   ws.data_ptr(), out.data_ptr(), cur_stream());
    check_cuda_rc(rc, "qaq_attention");
#endif
  }
  return {out, pm};
}

// ---------------------------------------------------------------------------
// entry points (CPU / CUDA)

QStore mk(const Tensor &a, const Tensor &o, const Tensor &w, const Tensor &z, const Tensor &i,
          const Tensor &v, const char *p) {
  return {a, o, w, z, i, v, std::string(p)};
}

template <bool CUDA>
Tensor qaq_key_bits_k(const Tensor &rng, const Tensor &q_sq, const Tensor &seq_lens,
                      double sigma_s, c10::ArrayRef<int64_t> allowed, int64_t n_recent) {
#ifdef KVSPARSE_WITH_CUDA
  c10::OptionalDeviceGuard guard;
  if (CUDA) guard.reset_device(rng.device());
#endif
  return qaq_bits_impl(rng, q_sq, seq_lens, sigma_s, allowed, n_recent, true, CUDA);
}

template <bool CUDA>
Tensor qaq_value_bits_k(const Tensor &rng, const Tensor &s_max, const Tensor &seq_lens,
                        double sigma_x, c10::ArrayRef<int64_t> allowed, int64_t n_recent) {
#ifdef KVSPARSE_WITH_CUDA
  c10::OptionalDeviceGuard guard;
  if (CUDA) guard.reset_device(rng.device());
#endif
  return qaq_bits_impl(rng, s_max, seq_lens, sigma_x, allowed, n_recent, false, CUDA);
}

template <bool CUDA>
void qaq_quantize_k(const Tensor &x, const Tensor &pos, const Tensor &new_widths,
                    const Tensor &new_offsets, const Tensor &arena, const Tensor &offsets,
                    const Tensor &widths, const Tensor &sz, const Tensor &oidx,
                    const Tensor &oval) {
#ifdef KVSPARSE_WITH_CUDA
  c10::OptionalDeviceGuard guard;
  if (CUDA) guard.reset_device(x.device());
#endif
  qaq_quantize_impl(x, pos, new_widths, new_offsets, mk(arena, offsets, widths, sz, oidx, oval, ""),
                    CUDA);
}

template <bool CUDA>
Tensor qaq_dequantize_k(const Tensor &arena, const Tensor &offsets, const Tensor &widths,
                        const Tensor &sz, const Tensor &oidx, const Tensor &oval,
                        const Tensor &seq_lens, int64_t num_kv_heads, int64_t head_dim) {
#ifdef KVSPARSE_WITH_CUDA
  c10::OptionalDeviceGuard guard;
  if (CUDA) guard.reset_device(arena.device());
#endif
  return qaq_dequantize_impl(mk(arena, offsets, widths, sz, oidx, oval, ""), seq_lens,
                             num_kv_heads, head_dim, CUDA);
}

template <bool CUDA>
void qaq_requantize_k(const Tensor &arena, const Tensor &offsets, const Tensor &widths,
                      const Tensor &sz, const Tensor &oidx, const Tensor &oval,
                      const Tensor &new_widths, const Tensor &seq_lens, int64_t num_kv_heads,
                      int64_t head_dim) {
#ifdef KVSPARSE_WITH_CUDA
  c10::OptionalDeviceGuard guard;
  if (CUDA) guard.reset_device(arena.device());
#endif
  qaq_requantize_impl(mk(arena, offsets, widths, sz, oidx, oval, ""), new_widths, seq_lens,
                      num_kv_heads, head_dim, CUDA);
}

template <bool CUDA>
std::tuple<Tensor, Tensor> qaq_attention_k(
    const Tensor &q, const Tensor &k_arena, const Tensor &k_offsets, const Tensor &k_widths,
    const Tensor &k_sz, const Tensor &k_oidx, const Tensor &k_oval, const Tensor &v_arena,
    const Tensor &v_offsets, const Tensor &v_widths, const Tensor &v_sz, const Tensor &v_oidx,
    const Tensor &v_oval, const Tensor &seq_lens, int64_t num_kv_heads, double scale,
    bool return_p_max) {
#ifdef KVSPARSE_WITH_CUDA
  c10::OptionalDeviceGuard guard;
  if (CUDA) guard.reset_device(q.device());
#endif
  return qaq_attention_impl(q, mk(k_arena, k_offsets, k_widths, k_sz, k_oidx, k_oval, "k_"),
                            mk(v_arena, v_offsets, v_widths, v_sz, v_oidx, v_oval, "v_"),
                            seq_lens, num_kv_heads, scale, return_p_max, CUDA);
}

}  // namespace

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
      "Tensor(e!) oidx, Tensor(f!) oval) -> ()");
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
      "float scale, bool return_p_max) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kvsparse, CPU, m) {
  m.impl("qaq_key_bits", &qaq_key_bits_k<false>);
  m.impl("qaq_value_bits", &qaq_value_bits_k<false>);
  m.impl("qaq_quantize", &qaq_quantize_k<false>);
  m.impl("qaq_dequantize", &qaq_dequantize_k<false>);
  m.impl("qaq_requantize", &qaq_requantize_k<false>);
  m.impl("qaq_attention", &qaq_attention_k<false>);
}

#ifdef KVSPARSE_WITH_CUDA
TORCH_LIBRARY_IMPL(kvsparse, CUDA, m) {
  m.impl("qaq_key_bits", &qaq_key_bits_k<true>);
  m.impl("qaq_value_bits", &qaq_value_bits_k<true>);
  m.impl("qaq_quantize", &qaq_quantize_k<true>);
  m.impl("qaq_dequantize", &qaq_dequantize_k<true>);
  m.impl("qaq_requantize", &qaq_requantize_k<true>);
  m.impl("qaq_attention", &qaq_attention_k<true>);
}
#endif

}  // namespace kvsparse
