// What the torch op bindings of every method (quest.cpp, sparq.cpp, qaq.cpp)
// share: argument validation, dtype mapping, workspaces, kernel return codes,
// and the one CPU / CUDA dispatch idiom.
//
// The bindings only validate arguments, allocate outputs and workspaces and
// call the kernels of csrc/kernels. Every op is registered in the `kvsparse`
// namespace with a CPU implementation and, when built with
// -DKVSPARSE_WITH_CUDA=1, a CUDA one. Fake (meta) kernels live next to each
// method's Python wrappers (python/kvsparse/{quest,sparq,qaq}.py) and repeat
// the structural checks below (never stricter than these).
//
// Error types: dtype problems raise TypeError (TORCH_CHECK_TYPE), shape and
// value problems ValueError (TORCH_CHECK_VALUE), device mismatches and kernel
// failures RuntimeError (TORCH_CHECK).
//
// Values of index and length tensors (seq_lens, start_lens, page_idx, i1, i2,
// widths, offsets, ...) are checked on CPU only. On CUDA reading them would
// need a device->host sync (and would break CUDA-graph capture), so they are
// trusted there: the CUDA kernels clamp lengths to [0, cap] and skip indices
// outside the valid range.
//
// Dispatch: every op has ONE entry point, a template on the device,
//
//   template <bool CUDA>
//   Tensor quest_attention(const Tensor &q, ...) {
//     const OnDevice<CUDA> on(q);
//     return attention_impl(q, ..., CUDA);
//   }
//
// and each ops file lists its entry points once, in a `template <bool CUDA>
// void impls(torch::Library &m)`, registered by TORCH_LIBRARY_IMPL(kvsparse,
// CPU, m) as impls<false> and, only when built with KVSPARSE_WITH_CUDA, by
// TORCH_LIBRARY_IMPL(kvsparse, CUDA, m) as impls<true>. The *_impl functions
// take the device as `bool cuda`; their CUDA branches are compiled only under
// KVSPARSE_WITH_CUDA.
#ifndef KVSPARSE_OPS_CHECKS_H
#define KVSPARSE_OPS_CHECKS_H

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/DeviceGuard.h>

#ifdef KVSPARSE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "ks_dtype.h"

namespace kvsparse {

using at::Tensor;

// ---------------------------------------------------------------------------
// dispatch

// Makes the device of t current for the lifetime of the guard when CUDA (so
// that outputs, workspaces and cur_stream() belong to it); does nothing on CPU.
template <bool CUDA>
class OnDevice {
 public:
  explicit OnDevice(const Tensor &t) {
    if constexpr (CUDA) guard_.reset_device(t.device());
  }

 private:
  c10::OptionalDeviceGuard guard_;
};

// ---------------------------------------------------------------------------
// dtype, shape, device

inline ks_dtype to_ks_dtype(const Tensor &t, const char *name) {
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

inline void check_same_dtype(const Tensor &t, const char *name, const Tensor &ref,
                             const char *ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "kvsparse: ", name, " has dtype ",
                   t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
                   "; they must match");
}

inline void check_int32(const Tensor &t, const char *name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "kvsparse: ", name, " must be int32, got ",
                   t.scalar_type());
}

inline void check_dim(const Tensor &t, int64_t dim, const char *name, const char *layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, "kvsparse: ", name, " must be a ", dim, "-D tensor ", layout,
                    ", got shape ", t.sizes());
}

inline void check_contig(const Tensor &t, const char *name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "kvsparse: ", name,
                    " must be contiguous (call .contiguous() first)");
}

inline void check_device(const Tensor &t, const char *name, const Tensor &ref,
                         const char *ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "kvsparse: ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; all tensors must be on the same device");
}

inline void check_size(const Tensor &t, int64_t d, int64_t expected, const char *name,
                       const char *what) {
  TORCH_CHECK_VALUE(t.size(d) == expected, "kvsparse: ", name, ".shape[", d, "] (", what,
                    ") must be ", expected, ", got shape ", t.sizes());
}

// head_dim: on CUDA one of the head dims the kernels are instantiated for
// (64, 80, 96, 128, 256; QAQ's attention takes fewer: check_qaq_attention_head_dim
// in qaq.cpp), a multiple of 8 in [8, 256] on CPU.
inline bool cuda_head_dim_ok(int64_t D) {
  return D == 64 || D == 80 || D == 96 || D == 128 || D == 256;
}
inline void check_head_dim(int64_t D, bool cuda) {
  if (cuda) {
    TORCH_CHECK_VALUE(cuda_head_dim_ok(D),
                      "kvsparse: head_dim D (last dim of q/k) must be 64, 80, 96, 128 or 256 on CUDA, got ",
                      D);
  } else {
    TORCH_CHECK_VALUE(D >= 8 && D % 8 == 0 && D <= 256,
                      "kvsparse: head_dim D (last dim of q/k) must be a multiple of 8 in [8, 256], got ",
                      D);
  }
}

// ---------------------------------------------------------------------------
// arithmetic on sizes

// ceil(a / b) for a >= 0, b >= 1, without forming a + b - 1 (b may be huge)
inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// a * b for a, b >= 0, saturated at INT64_MAX (only compared against lengths)
inline int64_t sat_mul(int64_t a, int64_t b) {
  if (a == 0 || b == 0) return 0;
  return a > INT64_MAX / b ? INT64_MAX : a * b;
}

// ---------------------------------------------------------------------------
// kernel return codes, workspaces, streams

// CPU kernels return 0 or KS_ERR_NOMEM (a scratch allocation failed).
inline void check_cpu_rc(int rc, const char *op) {
  TORCH_CHECK_WITH(OutOfMemoryError, rc == 0, "kvsparse: ", op,
                   ": out of host memory for the kernel's scratch buffers");
}

// Uninitialised byte workspace of a CUDA kernel on like's device (at least one
// byte, so that the pointer is valid).
inline Tensor byte_workspace(size_t bytes, const Tensor &like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                   like.options().dtype(at::kByte));
}

#ifdef KVSPARSE_WITH_CUDA
inline void check_cuda_rc(int rc, const char *op) {
  TORCH_CHECK(rc == 0, "kvsparse: CUDA kernel for ", op, " failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(rc)));
}
inline void *cur_stream() {
  return static_cast<void *>(c10::cuda::getCurrentCUDAStream().stream());
}
#endif

// ---------------------------------------------------------------------------
// aliasing

// Tensors an op writes must not share memory with any other argument: the
// kernels read and write in parallel, so an overlap gives silent garbage.
// Every argument is contiguous here, so the overlap test is exact.
struct Arg {
  const Tensor *t;
  std::string name;
};
inline void check_no_overlap(std::initializer_list<Arg> written, std::initializer_list<Arg> read) {
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

// ---------------------------------------------------------------------------
// lengths

// seq_lens: int32 [B], contiguous, same device as ref.
inline void check_lens_tensor(const Tensor &lens, const char *name, int64_t B, const Tensor &ref,
                              const char *ref_name) {
  check_int32(lens, name);
  check_dim(lens, 1, name, "[B]");
  check_size(lens, 0, B, name, "B");
  check_contig(lens, name);
  check_device(lens, name, ref, ref_name);
}

// CPU only: every value in [0, hi].
inline void check_lens_values(const Tensor &lens, const char *name, int64_t hi,
                              const char *hi_what) {
  const int32_t *p = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < lens.numel(); ++b) {
    TORCH_CHECK_VALUE(p[b] >= 0 && p[b] <= hi, "kvsparse: ", name, "[", b, "] = ", p[b],
                      " is out of range [0, ", hi, "] (", hi_what, ")");
  }
}

// ---------------------------------------------------------------------------
// q, k, v

// q [B,H,D] (float, contiguous)
struct QDims {
  int64_t B, H, D;
};
inline QDims check_q(const Tensor &q) {
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
inline KDims check_cache(const Tensor &k, const char *name) {
  to_ks_dtype(k, name);
  check_dim(k, 4, name, "[B, Hkv, cap, D]");
  check_contig(k, name);
  TORCH_CHECK_VALUE(k.size(1) >= 1, "kvsparse: ", name,
                    " must have at least one KV head, got shape ", k.sizes());
  TORCH_CHECK_VALUE(k.size(2) <= INT32_MAX, "kvsparse: ", name,
                    ".shape[2] (cap) must be <= 2^31 - 1 (positions are int32), got ", k.size(2));
  return {k.size(0), k.size(1), k.size(2), k.size(3)};
}

// Page lists (Quest's selection, read by quest.cpp and qaq.cpp): 1 <= page_size
// <= INT32_MAX (quest.h's KS_MAX_PAGE_SIZE: positions are int32); cap <=
// INT32_MAX is each cache's own check; max_pages = ceil_div(cap, P).
inline void check_page_size(int64_t page_size) {
  TORCH_CHECK_VALUE(page_size >= 1 && page_size <= INT32_MAX,
                    "kvsparse: page_size must be in [1, ", int64_t(INT32_MAX), "], got ", page_size);
}

// CPU only: every page_idx value is -1 or in [0, max_pages).
inline void check_page_idx_values(const Tensor &page_idx, int64_t max_pages) {
  const int32_t *p = page_idx.data_ptr<int32_t>();
  const int64_t n = page_idx.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] == -1 || (p[i] >= 0 && p[i] < max_pages), "kvsparse: page_idx value ",
                      p[i], " at flat index ", i, " must be -1 or in [0, ", max_pages,
                      ") (max_pages = ceil(cap / page_size))");
  }
}

inline void check_gqa(int64_t H, int64_t Hkv) {
  TORCH_CHECK_VALUE(H % Hkv == 0, "kvsparse: the number of query heads H of q (", H,
                    ") must be a multiple of the number of KV heads Hkv (", Hkv, ")");
}

// Decode attention operands: q [B,H,D]; k, v [B,Hkv,cap,D] of q's dtype and
// device; H % Hkv == 0; head_dim allowed on the device.
struct AttnDims {
  int64_t B, H, Hkv, cap, D;
  ks_dtype dt;
};
inline AttnDims check_qkv(const Tensor &q, const Tensor &k, const Tensor &v, bool cuda) {
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
  return {qd.B, qd.H, kd.Hkv, kd.cap, qd.D, to_ks_dtype(q, "q")};
}

// seq_lens of check_qkv's operands: int32 [B] on q's device; on CPU every
// value in [0, cap].
inline void check_qkv_lens(const Tensor &seq_lens, const Tensor &q, const AttnDims &a, bool cuda) {
  check_lens_tensor(seq_lens, "seq_lens", a.B, q, "q");
  if (!cuda) check_lens_values(seq_lens, "seq_lens", a.cap, "cap = k.shape[2]");
}

// ---------------------------------------------------------------------------
// No backward: the ops are for inference. Their Autograd kernel (registered for
// every op by each ops file, see NoBackward) raises a ValueError naming the
// first tensor argument that requires grad while grad mode is on, instead of
// returning a result silently cut from the graph; otherwise it calls the op
// below autograd. (Under torch.no_grad() / torch.inference_mode(), or with
// detached inputs, nothing changes.)
inline void no_backward_kernel(const c10::OperatorHandle &op, c10::DispatchKeySet ks,
                               torch::jit::Stack *stack) {
  if (at::GradMode::is_enabled()) {
    const auto &args = op.schema().arguments();
    const size_t n = args.size(), base = stack->size() - n;
    for (size_t i = 0; i < n; ++i) {
      const c10::IValue &v = (*stack)[base + i];
      TORCH_CHECK_VALUE(!(v.isTensor() && v.toTensor().requires_grad()), "kvsparse: ",
                        args[i].name(), " requires grad, but ", op.schema().name(),
                        " has no backward (kvsparse's ops are for inference): call it under "
                        "torch.no_grad() or torch.inference_mode(), or pass ", args[i].name(),
                        ".detach()");
    }
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

// Stands in for the torch::Library of an ops file's impls<CUDA>(m): registers
// no_backward_kernel as the Autograd kernel of each op the list names.
struct NoBackward {
  torch::Library &m;
  template <class F>
  void impl(const char *name, F &&) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&no_backward_kernel>());
  }
};

}  // namespace kvsparse

#endif  // KVSPARSE_OPS_CHECKS_H
