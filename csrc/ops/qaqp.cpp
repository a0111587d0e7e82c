// QAQ over width-binned pages: torch ops (torch.ops.kvsparse.qaqp_*) over the
// kernels of csrc/kernels/qaqp.h. Conventions and the dispatch idiom: checks.h.
//
// A paged store (one layer, keys and values together) is six tensors:
// arena [A] uint8 (A a multiple of 16, at most 32 GiB), top [1] int64,
// open [B, Hkv, 25] int32, pages [B, Hkv, maxp] int32, n_pages [B, Hkv] int32,
// flags [1] int32; plus its geometry (head_dim, n_out_k, n_out_v, bounds and
// the cache dtype), which the caller passes to every op. Values of the index
// tensors are checked on CPU only.

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "qaqp.h"

namespace kvsparse {
namespace {

constexpr int64_t kMaxArena = int64_t(1) << 35;  // 32 GiB: addresses are int32 units of 16 B

ks_qaqp_geom make_geom(int64_t D, int64_t n_out_k, int64_t n_out_v, bool bounds,
                       at::ScalarType dtype) {
  for (auto [n, name] : {std::pair<int64_t, const char *>{n_out_k, "n_out_k"}, {n_out_v, "n_out_v"}}) {
    TORCH_CHECK_VALUE(n >= 0 && n % 2 == 0 && n <= 64 && 2 * n <= D, "kvsparse: ", name,
                      " must be even, in [0, min(64, head_dim / 2)], got ", n, " (head_dim ", D,
                      ")");
  }
  ks_qaqp_geom g;
  g.D = D;
  g.n_out_k = n_out_k;
  g.n_out_v = n_out_v;
  g.ds = dtype == at::kFloat ? 4 : 2;
  g.nb = bounds ? 1 : 0;
  return g;
}

void check_arena(const Tensor &arena, const Tensor &ref, const char *ref_name) {
  TORCH_CHECK_TYPE(arena.scalar_type() == at::kByte, "kvsparse: arena must be uint8, got ",
                   arena.scalar_type());
  check_dim(arena, 1, "arena", "[A]");
  check_contig(arena, "arena");
  check_device(arena, "arena", ref, ref_name);
  TORCH_CHECK_VALUE(arena.numel() % 16 == 0 && arena.numel() <= kMaxArena,
                    "kvsparse: arena must hold a multiple of 16 bytes, at most 32 GiB, got ",
                    arena.numel());
}

void check_i32(const Tensor &t, const char *name, std::initializer_list<int64_t> shape,
               const char *layout, const Tensor &ref, const char *ref_name) {
  check_int32(t, name);
  check_dim(t, static_cast<int64_t>(shape.size()), name, layout);
  check_contig(t, name);
  check_device(t, name, ref, ref_name);
  int64_t d = 0;
  for (int64_t s : shape) {
    if (s >= 0) check_size(t, d, s, name, layout);
    d++;
  }
}

// the checks of an op that reads a store as `dtype` (dequantize, re-quantization, compaction):
// the dtype, head_dim and geometry; sets *dt
ks_qaqp_geom store_geom(at::ScalarType dtype, int64_t D, int64_t n_out_k, int64_t n_out_v, bool bounds,
                        bool cuda, ks_dtype *dt) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "kvsparse: dtype must be float32, float16 or bfloat16, got ", dtype);
  check_head_dim(D, cuda);
  *dt = dtype == at::kFloat ? KS_F32 : dtype == at::kHalf ? KS_F16 : KS_BF16;
  return make_geom(D, n_out_k, n_out_v, bounds, dtype);
}

// plist [B, Hkv, L]: addresses (CPU: each -1 or naming a page is not required;
// a non-page reads as empty, by the kernels' contract)
void check_plist(const Tensor &plist, int64_t B, int64_t Hkv, const Tensor &ref,
                 const char *ref_name) {
  check_i32(plist, "plist", {B, Hkv, -1}, "[B, Hkv, L]", ref, ref_name);
}

// ---------------------------------------------------------------------------
// append

void append_impl(const Tensor &k, const Tensor &v, const Tensor &wk, const Tensor &wv,
                 const Tensor &pos0, const Tensor &count, const Tensor &arena, const Tensor &top,
                 const Tensor &open, const Tensor &pages, const Tensor &n_pages,
                 const Tensor &flags, int64_t n_out_k, int64_t n_out_v, bool bounds,
                 const std::optional<Tensor> &pos_opt, bool cuda) {
  const char *op = "qaqp_append";
  const ks_dtype dt = to_ks_dtype(k, "k");
  check_dim(k, 4, "k", "[B, Hkv, n, D]");
  check_contig(k, "k");
  check_same_dtype(v, "v", k, "k");
  check_contig(v, "v");
  check_device(v, "v", k, "k");
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "kvsparse: v must have the shape of k ", k.sizes(),
                    ", got ", v.sizes());
  const int64_t B = k.size(0), Hkv = k.size(1), n = k.size(2), D = k.size(3);
  check_head_dim(D, cuda);
  const ks_qaqp_geom g = make_geom(D, n_out_k, n_out_v, bounds, k.scalar_type());
  for (auto [t, name] : {std::pair<const Tensor *, const char *>{&wk, "wk"}, {&wv, "wv"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kByte, "kvsparse: ", name, " must be uint8, got ",
                     t->scalar_type());
    check_dim(*t, 3, name, "[B, Hkv, n]");
    check_contig(*t, name);
    check_device(*t, name, k, "k");
    TORCH_CHECK_VALUE(t->size(0) == B && t->size(1) == Hkv && t->size(2) == n, "kvsparse: ", name,
                      " must have shape [B, Hkv, n] = [", B, ", ", Hkv, ", ", n, "], got ",
                      t->sizes());
  }
  check_i32(pos0, "pos0", {B}, "[B]", k, "k");
  check_i32(count, "count", {B}, "[B]", k, "k");
  const Tensor pos = pos_opt.has_value() ? *pos_opt : Tensor();
  if (pos.defined()) check_i32(pos, "pos", {B, Hkv, n}, "[B, Hkv, n]", k, "k");
  check_arena(arena, k, "k");
  TORCH_CHECK_TYPE(top.scalar_type() == at::kLong, "kvsparse: top must be int64, got ",
                   top.scalar_type());
  check_dim(top, 1, "top", "[1]");
  check_size(top, 0, 1, "top", "1");
  check_device(top, "top", k, "k");
  check_i32(open, "open", {B, Hkv, KS_QAQP_NCLASS}, "[B, Hkv, 25]", k, "k");
  check_i32(pages, "pages", {B, Hkv, -1}, "[B, Hkv, maxp]", k, "k");
  check_i32(n_pages, "n_pages", {B, Hkv}, "[B, Hkv]", k, "k");
  check_i32(flags, "flags", {1}, "[1]", k, "k");
  check_no_overlap({{&arena, "arena"}, {&top, "top"}, {&open, "open"}, {&pages, "pages"},
                    {&n_pages, "n_pages"}, {&flags, "flags"}},
                   {{&k, "k"}, {&v, "v"}, {&wk, "wk"}, {&wv, "wv"}, {&pos0, "pos0"},
                    {&count, "count"}, {&pos, "pos"}});
  const int64_t maxp = pages.size(2);
  if (!cuda) {
    const uint8_t *pk = wk.data_ptr<uint8_t>(), *pv = wv.data_ptr<uint8_t>();
    const int32_t *p0 = pos0.data_ptr<int32_t>(), *cn = count.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; b++) {
      TORCH_CHECK_VALUE(cn[b] >= 0 && cn[b] <= n, "kvsparse: count[", b, "] must be in [0, n = ", n,
                        "], got ", cn[b]);
      TORCH_CHECK_VALUE(pos.defined() || (p0[b] >= 0 && int64_t(p0[b]) + cn[b] <= INT32_MAX),
                        "kvsparse: pos0[", b, "] must be >= 0 with pos0 + count <= 2^31 - 1, got ", p0[b]);
      for (int64_t h = 0; h < Hkv; h++)
        for (int64_t i = 0; i < cn[b]; i++) {
          const int64_t t = (b * Hkv + h) * n + i;
          // 255 in both: a padding row (skipped), as requantize stages them
          TORCH_CHECK_VALUE(ks_qaqp_class(pk[t], pv[t]) >= 0 || (pk[t] == 255 && pv[t] == 255),
                            "kvsparse: wk / wv must be in {0, 1, 2, 4, 8} (or both 255: skip), got (",
                            int(pk[t]), ", ", int(pv[t]), ") at [", b, ", ", h, ", ", i, "]");
        }
    }
    const int32_t *np = n_pages.data_ptr<int32_t>();
    for (int64_t i = 0; i < B * Hkv; i++)
      TORCH_CHECK_VALUE(np[i] >= 0 && np[i] <= maxp, "kvsparse: n_pages values must be in [0, maxp = ", maxp,
                        "], got ", np[i]);
    const int64_t t0 = top.data_ptr<int64_t>()[0];
    TORCH_CHECK_VALUE(t0 >= 0 && t0 * 16 <= arena.numel(), "kvsparse: top must be in [0, arena bytes / 16], got ", t0);
  }
  if (k.numel() == 0) return;
  if (!cuda) {
    const int rc = ks_qaqp_append_cpu(
        k.data_ptr(), v.data_ptr(), dt, B, Hkv, n, g, wk.data_ptr<uint8_t>(), wv.data_ptr<uint8_t>(),
        pos0.data_ptr<int32_t>(), pos.defined() ? pos.data_ptr<int32_t>() : nullptr,
        count.data_ptr<int32_t>(), arena.data_ptr<uint8_t>(), arena.numel(),
        top.data_ptr<int64_t>(), open.data_ptr<int32_t>(), pages.data_ptr<int32_t>(), maxp,
        n_pages.data_ptr<int32_t>(), flags.data_ptr<int32_t>());
    TORCH_CHECK_VALUE(rc != KS_ERR_RANGE, "kvsparse: k or v holds a token whose finite values span a range "
                      "that fp16 scales cannot hold (|min|, |max| or max - min above 65000); it was "
                      "stored as NaN");
    check_cpu_rc(rc, op);
  } else {
#ifdef KVSPARSE_WITH_CUDA
    Tensor ws = byte_workspace(ks_qaqp_append_cuda_workspace(B, Hkv, n, g), k);
    check_cuda_rc(ks_qaqp_append_cuda(k.data_ptr(), v.data_ptr(), dt, B, Hkv, n, g, wk.data_ptr<uint8_t>(),
                                      wv.data_ptr<uint8_t>(), pos0.data_ptr<int32_t>(),
                                      pos.defined() ? pos.data_ptr<int32_t>() : nullptr,
                                      count.data_ptr<int32_t>(), arena.data_ptr<uint8_t>(), arena.numel(),
                                      top.data_ptr<int64_t>(), open.data_ptr<int32_t>(),
                                      pages.data_ptr<int32_t>(), maxp, n_pages.data_ptr<int32_t>(),
                                      flags.data_ptr<int32_t>(), ws.data_ptr(), cur_stream()),
                  op);
#endif
  }
}

// ---------------------------------------------------------------------------
// dequantize

std::tuple<Tensor, Tensor, Tensor> dequantize_impl(const Tensor &arena, const Tensor &plist,
                                                   int64_t D, at::ScalarType dtype, int64_t n_out_k,
                                                   int64_t n_out_v, bool bounds, bool cuda) {
  const char *op = "qaqp_dequantize";
  ks_dtype dt;
  const ks_qaqp_geom g = store_geom(dtype, D, n_out_k, n_out_v, bounds, cuda, &dt);
  check_arena(arena, arena, "arena");
  check_i32(plist, "plist", {-1, -1, -1}, "[B, Hkv, L]", arena, "arena");
  const int64_t B = plist.size(0), Hkv = plist.size(1), L = plist.size(2);
  Tensor kout = at::empty({B, Hkv, L * KS_QAQP_P, D}, arena.options().dtype(dtype));
  Tensor vout = at::empty_like(kout);
  Tensor pos = at::empty({B, Hkv, L * KS_QAQP_P}, arena.options().dtype(at::kInt));
  if (pos.numel() == 0) return {kout, vout, pos};
  if (!cuda) {
    check_cpu_rc(ks_qaqp_dequantize_cpu(arena.data_ptr<uint8_t>(), arena.numel(), g, dt, B, Hkv,
                                        plist.data_ptr<int32_t>(), L, kout.data_ptr(), vout.data_ptr(),
                                        pos.data_ptr<int32_t>()),
                 op);
  } else {
#ifdef KVSPARSE_WITH_CUDA
    check_cuda_rc(ks_qaqp_dequantize_cuda(arena.data_ptr<uint8_t>(), arena.numel(), g, dt, B, Hkv,
                                          plist.data_ptr<int32_t>(), L, kout.data_ptr(), vout.data_ptr(),
                                          pos.data_ptr<int32_t>(), cur_stream()),
                  op);
#endif
  }
  return {kout, vout, pos};
}

// ---------------------------------------------------------------------------
// attention

std::tuple<Tensor, Tensor> attention_impl(const Tensor &q, const Tensor &arena, const Tensor &plist,
                                          int64_t num_kv_heads, int64_t n_out_k, int64_t n_out_v,
                                          bool bounds, double scale, bool return_p_max, bool cuda) {
  const char *op = "qaqp_attention";
  const ks_dtype dt = to_ks_dtype(q, "q");
  check_dim(q, 3, "q", "[B, H, D]");
  check_contig(q, "q");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = num_kv_heads;
  check_head_dim(D, cuda);
  TORCH_CHECK_VALUE(Hkv >= 1 && H % Hkv == 0, "kvsparse: num_kv_heads must divide the query heads H = ",
                    H, ", got ", Hkv);
  if (cuda)
    TORCH_CHECK_VALUE(H / Hkv <= 8, "kvsparse: on CUDA at most 8 query heads per KV head, got ",
                      H / Hkv);
  const ks_qaqp_geom g = make_geom(D, n_out_k, n_out_v, bounds, q.scalar_type());
  check_arena(arena, q, "q");
  check_plist(plist, B, Hkv, q, "q");
  const int64_t L = plist.size(2);
  Tensor out = at::empty({B, H, D}, q.options());
  Tensor pm = return_p_max ? at::empty({B, Hkv, L, KS_QAQP_P}, q.options().dtype(at::kFloat))
                           : at::empty({0}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    if (pm.numel()) pm.zero_();
    return {out, pm};
  }
  float *pmp = return_p_max && pm.numel() ? pm.data_ptr<float>() : nullptr;
  const float sc = static_cast<float>(scale);
  if (!cuda) {
    check_cpu_rc(ks_qaqp_attention_cpu(q.data_ptr(), dt, B, H, Hkv, arena.data_ptr<uint8_t>(), arena.numel(), g,
                                       plist.data_ptr<int32_t>(), L, sc, pmp, out.data_ptr()),
                 op);
  } else {
#ifdef KVSPARSE_WITH_CUDA
    Tensor ws = byte_workspace(ks_qaqp_attention_cuda_workspace(B, H, Hkv, L, g), q);
    check_cuda_rc(ks_qaqp_attention_cuda(q.data_ptr(), dt, B, H, Hkv, arena.data_ptr<uint8_t>(), arena.numel(),
                                         g, plist.data_ptr<int32_t>(), L, sc, pmp, ws.data_ptr(),
                                         out.data_ptr(), cur_stream()),
                  op);
#endif
  }
  return {out, pm};
}

// ---------------------------------------------------------------------------
// re-quantization (take out the tokens that move) and compaction

using Six = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

Six requant_take_impl(const Tensor &arena, const Tensor &plist, const Tensor &new_wk,
                      const Tensor &new_wv, int64_t n, int64_t D, at::ScalarType dtype,
                      int64_t n_out_k, int64_t n_out_v, bool bounds, bool cuda) {
  const char *op = "qaqp_requant_take";
  ks_dtype dt;
  const ks_qaqp_geom g = store_geom(dtype, D, n_out_k, n_out_v, bounds, cuda, &dt);
  check_arena(arena, arena, "arena");
  check_i32(plist, "plist", {-1, -1, -1}, "[B, Hkv, L]", arena, "arena");
  const int64_t B = plist.size(0), Hkv = plist.size(1), L = plist.size(2);
  TORCH_CHECK_VALUE(n >= 0 && n <= L * KS_QAQP_P, "kvsparse: n must be in [0, 64 * L = ", L * KS_QAQP_P,
                    "] (at most every listed slot moves), got ", n);
  for (auto [t, name] : {std::pair<const Tensor *, const char *>{&new_wk, "new_wk"}, {&new_wv, "new_wv"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kByte, "kvsparse: ", name, " must be uint8, got ",
                     t->scalar_type());
    check_dim(*t, 4, name, "[B, Hkv, L, 64]");
    check_contig(*t, name);
    check_device(*t, name, arena, "arena");
    TORCH_CHECK_VALUE(t->size(0) == B && t->size(1) == Hkv && t->size(2) == L && t->size(3) == KS_QAQP_P,
                      "kvsparse: ", name, " must have shape [B, Hkv, L, 64] = [", B, ", ", Hkv, ", ", L,
                      ", 64], got ", t->sizes());
  }
  check_no_overlap({{&arena, "arena"}}, {{&plist, "plist"}, {&new_wk, "new_wk"}, {&new_wv, "new_wv"}});
  const auto opt = arena.options();
  Tensor kout = at::empty({B, Hkv, n, D}, opt.dtype(dtype)), vout = at::empty_like(kout);
  Tensor wko = at::empty({B, Hkv, n}, opt.dtype(at::kByte)), wvo = at::empty_like(wko);
  Tensor pos = at::empty({B, Hkv, n}, opt.dtype(at::kInt));
  Tensor moved = at::zeros({B, Hkv}, opt.dtype(at::kInt));
  if (B * Hkv == 0) return {kout, vout, wko, wvo, pos, moved};
  if (!cuda) {
    check_cpu_rc(ks_qaqp_requant_take_cpu(arena.data_ptr<uint8_t>(), arena.numel(), g, dt, B, Hkv,
                                          plist.data_ptr<int32_t>(), L, new_wk.data_ptr<uint8_t>(),
                                          new_wv.data_ptr<uint8_t>(), n, kout.data_ptr(), vout.data_ptr(),
                                          wko.data_ptr<uint8_t>(), wvo.data_ptr<uint8_t>(),
                                          pos.data_ptr<int32_t>(), moved.data_ptr<int32_t>()),
                 op);
  } else {
#ifdef KVSPARSE_WITH_CUDA
    check_cuda_rc(ks_qaqp_requant_take_cuda(arena.data_ptr<uint8_t>(), arena.numel(), g, dt, B, Hkv,
                                            plist.data_ptr<int32_t>(), L, new_wk.data_ptr<uint8_t>(),
                                            new_wv.data_ptr<uint8_t>(), n, kout.data_ptr(), vout.data_ptr(),
                                            wko.data_ptr<uint8_t>(), wvo.data_ptr<uint8_t>(),
                                            pos.data_ptr<int32_t>(), moved.data_ptr<int32_t>(), cur_stream()),
                  op);
#endif
  }
  return {kout, vout, wko, wvo, pos, moved};
}

void compact_impl(const Tensor &src, const Tensor &pages_src, const Tensor &n_pages_src, const Tensor &dst,
                  const Tensor &top, const Tensor &open, const Tensor &pages, const Tensor &n_pages,
                  const Tensor &flags, int64_t D, at::ScalarType dtype, int64_t n_out_k, int64_t n_out_v,
                  bool bounds, bool cuda) {
  const char *op = "qaqp_compact";
  ks_dtype dt;
  const ks_qaqp_geom g = store_geom(dtype, D, n_out_k, n_out_v, bounds, cuda, &dt);
  check_arena(src, src, "src");
  check_arena(dst, src, "src");
  check_i32(pages_src, "pages_src", {-1, -1, -1}, "[B, Hkv, maxp_src]", src, "src");
  const int64_t B = pages_src.size(0), Hkv = pages_src.size(1), maxp_src = pages_src.size(2);
  check_i32(n_pages_src, "n_pages_src", {B, Hkv}, "[B, Hkv]", src, "src");
  TORCH_CHECK_TYPE(top.scalar_type() == at::kLong, "kvsparse: top must be int64, got ", top.scalar_type());
  check_dim(top, 1, "top", "[1]");
  check_size(top, 0, 1, "top", "1");
  check_device(top, "top", src, "src");
  check_i32(open, "open", {B, Hkv, KS_QAQP_NCLASS}, "[B, Hkv, 25]", src, "src");
  check_i32(pages, "pages", {B, Hkv, -1}, "[B, Hkv, maxp]", src, "src");
  check_i32(n_pages, "n_pages", {B, Hkv}, "[B, Hkv]", src, "src");
  check_i32(flags, "flags", {1}, "[1]", src, "src");
  check_no_overlap({{&dst, "dst"}, {&top, "top"}, {&open, "open"}, {&pages, "pages"}, {&n_pages, "n_pages"},
                    {&flags, "flags"}},
                   {{&src, "src"}, {&pages_src, "pages_src"}, {&n_pages_src, "n_pages_src"}});
  const int64_t maxp = pages.size(2);
  if (!cuda) {
    check_cpu_rc(ks_qaqp_compact_cpu(src.data_ptr<uint8_t>(), src.numel(), g, dt, B, Hkv,
                                     pages_src.data_ptr<int32_t>(), maxp_src, n_pages_src.data_ptr<int32_t>(),
                                     dst.data_ptr<uint8_t>(), dst.numel(), top.data_ptr<int64_t>(),
                                     open.data_ptr<int32_t>(), pages.data_ptr<int32_t>(), maxp,
                                     n_pages.data_ptr<int32_t>(), flags.data_ptr<int32_t>()),
                 op);
  } else {
#ifdef KVSPARSE_WITH_CUDA
    Tensor ws = byte_workspace(ks_qaqp_compact_cuda_workspace(B, Hkv, maxp_src), src);
    check_cuda_rc(ks_qaqp_compact_cuda(src.data_ptr<uint8_t>(), src.numel(), g, dt, B, Hkv,
                                       pages_src.data_ptr<int32_t>(), maxp_src, n_pages_src.data_ptr<int32_t>(),
                                       dst.data_ptr<uint8_t>(), dst.numel(), top.data_ptr<int64_t>(),
                                       open.data_ptr<int32_t>(), pages.data_ptr<int32_t>(), maxp,
                                       n_pages.data_ptr<int32_t>(), flags.data_ptr<int32_t>(), ws.data_ptr(),
                                       cur_stream()),
                  op);
#endif
  }
}

// ---------------------------------------------------------------------------
// entry points (one per op; see checks.h)

template <bool CUDA>
void qaqp_append(const Tensor &k, const Tensor &v, const Tensor &wk, const Tensor &wv,
                 const Tensor &pos0, const Tensor &count, const Tensor &arena, const Tensor &top,
                 const Tensor &open, const Tensor &pages, const Tensor &n_pages, const Tensor &flags,
                 int64_t n_out_k, int64_t n_out_v, bool bounds, const std::optional<Tensor> &pos) {
  const OnDevice<CUDA> on(k);
  append_impl(k, v, wk, wv, pos0, count, arena, top, open, pages, n_pages, flags, n_out_k, n_out_v,
              bounds, pos, CUDA);
}

template <bool CUDA>
std::tuple<Tensor, Tensor, Tensor> qaqp_dequantize(const Tensor &arena, const Tensor &plist,
                                                   int64_t head_dim, at::ScalarType dtype,
                                                   int64_t n_out_k, int64_t n_out_v, bool bounds) {
  const OnDevice<CUDA> on(arena);
  return dequantize_impl(arena, plist, head_dim, dtype, n_out_k, n_out_v, bounds, CUDA);
}

template <bool CUDA>
std::tuple<Tensor, Tensor> qaqp_attention(const Tensor &q, const Tensor &arena, const Tensor &plist,
                                          int64_t num_kv_heads, int64_t n_out_k, int64_t n_out_v,
                                          bool bounds, double scale, bool return_p_max) {
  const OnDevice<CUDA> on(q);
  return attention_impl(q, arena, plist, num_kv_heads, n_out_k, n_out_v, bounds, scale, return_p_max,
                        CUDA);
}

template <bool CUDA>
Six qaqp_requant_take(const Tensor &arena, const Tensor &plist, const Tensor &new_wk, const Tensor &new_wv,
                      int64_t n, int64_t head_dim, at::ScalarType dtype, int64_t n_out_k, int64_t n_out_v,
                      bool bounds) {
  const OnDevice<CUDA> on(arena);
  return requant_take_impl(arena, plist, new_wk, new_wv, n, head_dim, dtype, n_out_k, n_out_v, bounds, CUDA);
}

template <bool CUDA>
void qaqp_compact(const Tensor &src, const Tensor &pages_src, const Tensor &n_pages_src, const Tensor &dst,
                  const Tensor &top, const Tensor &open, const Tensor &pages, const Tensor &n_pages,
                  const Tensor &flags, int64_t head_dim, at::ScalarType dtype, int64_t n_out_k,
                  int64_t n_out_v, bool bounds) {
  const OnDevice<CUDA> on(src);
  compact_impl(src, pages_src, n_pages_src, dst, top, open, pages, n_pages, flags, head_dim, dtype, n_out_k,
               n_out_v, bounds, CUDA);
}

template <bool CUDA, class Lib = torch::Library>
void impls(Lib &m) {
  m.impl("qaqp_append", &qaqp_append<CUDA>);
  m.impl("qaqp_dequantize", &qaqp_dequantize<CUDA>);
  m.impl("qaqp_attention", &qaqp_attention<CUDA>);
  m.impl("qaqp_requant_take", &qaqp_requant_take<CUDA>);
  m.impl("qaqp_compact", &qaqp_compact<CUDA>);
}

}  // namespace
}  // namespace kvsparse

// ---------------------------------------------------------------------------
// registration

TORCH_LIBRARY_FRAGMENT(kvsparse, m) {
  m.def(
      "qaqp_append(Tensor k, Tensor v, Tensor wk, Tensor wv, Tensor pos0, Tensor count, "
      "Tensor(a!) arena, Tensor(b!) top, Tensor(c!) open, Tensor(d!) pages, Tensor(e!) n_pages, "
      "Tensor(f!) flags, int n_out_k, int n_out_v, bool bounds, Tensor? pos=None) -> ()");
  m.def(
      "qaqp_dequantize(Tensor arena, Tensor plist, int head_dim, ScalarType dtype, int n_out_k, "
      "int n_out_v, bool bounds) -> (Tensor, Tensor, Tensor)");
  m.def(
      "qaqp_attention(Tensor q, Tensor arena, Tensor plist, int num_kv_heads, int n_out_k, "
      "int n_out_v, bool bounds, float scale, bool return_p_max) -> (Tensor, Tensor)");
  m.def(
      "qaqp_requant_take(Tensor(a!) arena, Tensor plist, Tensor new_wk, Tensor new_wv, int n, int head_dim, "
      "ScalarType dtype, int n_out_k, int n_out_v, bool bounds) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "qaqp_compact(Tensor src, Tensor pages_src, Tensor n_pages_src, Tensor(a!) dst, Tensor(b!) top, "
      "Tensor(c!) open, Tensor(d!) pages, Tensor(e!) n_pages, Tensor(f!) flags, int head_dim, "
      "ScalarType dtype, int n_out_k, int n_out_v, bool bounds) -> ()");
}

TORCH_LIBRARY_IMPL(kvsparse, CPU, m) { kvsparse::impls<false>(m); }

TORCH_LIBRARY_IMPL(kvsparse, Autograd, m) {
  kvsparse::NoBackward nb{m};
  kvsparse::impls<false>(nb);
}

#ifdef KVSPARSE_WITH_CUDA
TORCH_LIBRARY_IMPL(kvsparse, CUDA, m) { kvsparse::impls<true>(m); }
#endif
