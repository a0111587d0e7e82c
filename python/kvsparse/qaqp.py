"""QAQ over width-binned pages: the packed KV format built for the decode kernel.

Attention over a decode cache does not depend on token order once RoPE has
been applied. So each (sequence, KV head) keeps its tokens in pages of
``PAGE = 64`` slots, and every page holds tokens of one class ``(wk, wv)``:
one key width and one value width from ``{0, 1, 2, 4, 8}``. A page's bytes
sit at offsets fixed by its class, so the attention's inner loop does no
per-token offset lookup and no per-token width dispatch: one dispatch per
page. Per token and KV head the quantization is exactly :mod:`kvsparse.qaq`'s
per-head groups (fp16 scale and zero, ``n_out`` outliers kept exact, same
codes); only where the bytes live differs. ``csrc/kernels/qaqp.h`` gives the
layout byte by byte.

A layer's store (:class:`PagedStore`) is one byte arena for every sequence
and KV head, with a device-side allocator (``top``), the open page of each
class per (sequence, KV head) (``open``), the page list of each (sequence, KV
head) (``pages``, ``n_pages``) and overflow ``flags``. Every op is
graph-capturable: an append never synchronises; a full arena or page list
sets a flag instead, which :func:`check` turns into an error (a host sync:
call it outside captured regions, e.g. after ``generate``).

Typical use::

    st = qaqp.alloc(B, Hkv, D, tokens=4096, dtype=torch.bfloat16, widths=(4, 4))
    qaqp.append(st, k, v, wk, wv, pos0)      # k, v [B, Hkv, n, D]; wk, wv [B, Hkv, n]
    out = qaqp.attention(q, st)              # q [B, H, D]: over every page
    out = qaqp.attention(q, st, plist=sel)   # over listed pages (Quest over QAQ)

What a token costs (D = 128, K and V at 4 bits, 2 outliers each, bf16): about
156 bytes against 512 in bf16 (:func:`page_bytes` / 64 per class).
"""
import math
from typing import NamedTuple

import torch

from . import _ops

PAGE = 64
WIDTHS = (0, 1, 2, 4, 8)
NCLASS = 25
FLAG_ARENA, FLAG_PAGES = 1, 2
_MAX_ARENA = 1 << 35

__all__ = ["PAGE", "WIDTHS", "PagedStore", "page_bytes", "token_bytes", "alloc", "append",
           "dequantize", "attention", "requantize", "compact", "check", "live_tokens", "memory_report"]


def _up16(x):
    return (x + 15) // 16 * 16


def _stride(D, w):
    return (D * w // 8 + 3) // 4 * 4


def layout(head_dim, wk, wv, n_out_k=2, n_out_v=2, dtype=torch.float16, bounds=False):
    """Byte offsets of a page's regions (qaqp.h ``ks_qaqp_layout_of``), and ``bytes``."""
    ds = torch.empty((), dtype=dtype).element_size()
    D, P = head_dim, PAGE
    o, L = 16, {}
    for name, size in (("pos", P * 4), ("ksz", P * 4), ("vsz", P * 4), ("kc", P * _stride(D, wk)),
                       ("vc", P * _stride(D, wv)), ("koi", P * n_out_k * 2), ("kov", P * n_out_k * ds),
                       ("voi", P * n_out_v * 2), ("vov", P * n_out_v * ds),
                       ("kmin", D * ds if bounds else 0), ("kmax", D * ds if bounds else 0)):
        L[name] = o
        o = _up16(o + size)
    L["bytes"] = o
    return L


def page_bytes(head_dim, wk, wv, n_out_k=2, n_out_v=2, dtype=torch.float16, bounds=False):
    """Bytes of one page of class ``(wk, wv)``: 64 tokens of one KV head."""
    for w, name in ((wk, "wk"), (wv, "wv")):
        if w not in WIDTHS:
            raise ValueError(f"kvsparse: {name} must be one of {WIDTHS}, got {w}")
    return layout(head_dim, wk, wv, n_out_k, n_out_v, dtype, bounds)["bytes"]


def token_bytes(head_dim, wk, wv, n_out_k=2, n_out_v=2, dtype=torch.float16, bounds=False):
    """Bytes one token of one KV head holds in a full page of class ``(wk, wv)``."""
    return page_bytes(head_dim, wk, wv, n_out_k, n_out_v, dtype, bounds) / PAGE


class PagedStore(NamedTuple):
    """One layer's paged cache (keys and values), see the module docstring."""
    arena: torch.Tensor    # [A] uint8
    top: torch.Tensor      # [1] int64, next free address (units of 16 bytes)
    open: torch.Tensor     # [B, Hkv, 25] int32
    pages: torch.Tensor    # [B, Hkv, maxp] int32, addresses in allocation order (-1 past n_pages)
    n_pages: torch.Tensor  # [B, Hkv] int32
    flags: torch.Tensor    # [1] int32 (bit 0: arena full, bit 1: a page list full)
    head_dim: int
    n_out_k: int
    n_out_v: int
    bounds: bool
    dtype: torch.dtype

    @property
    def num_kv_heads(self):
        return self.pages.shape[1]

    def state(self):
        return (self.arena, self.top, self.open, self.pages, self.n_pages, self.flags)

    def geom(self):
        return (self.n_out_k, self.n_out_v, self.bounds)


def outlier_count(alpha, head_dim):
    """QAQ's ``n_out`` for one token of one KV head: ``2 * ceil(alpha / 2 * D)``."""
    return 2 * math.ceil(alpha / 2 * head_dim) if alpha > 0 else 0


def alloc(batch_size, num_kv_heads, head_dim, tokens, dtype=torch.float16, device="cpu", widths=(8, 8),
          n_out_k=2, n_out_v=2, bounds=False, arena_bytes=None, max_pages=None):
    """An empty store for ``tokens`` tokens per sequence.

    The arena holds ``tokens`` tokens of every (sequence, KV head) at class
    ``widths`` plus one partly filled page per class, unless ``arena_bytes``
    is given. ``max_pages`` (per sequence and KV head) defaults to
    ``ceil(tokens / 64) + 25`` (every class may hold one partial page).
    """
    B, Hkv, D = (_ops.int_arg(x, n) for x, n in ((batch_size, "batch_size"), (num_kv_heads, "num_kv_heads"),
                                                  (head_dim, "head_dim")))
    tokens = _ops.int_arg(tokens, "tokens")
    if B < 1 or Hkv < 1 or tokens < 0:
        raise ValueError(f"kvsparse: batch_size, num_kv_heads must be >= 1 and tokens >= 0, got {B}, {Hkv}, {tokens}")
    wk, wv = widths
    n_full = -(-tokens // PAGE)
    maxp = n_full + NCLASS if max_pages is None else _ops.int_arg(max_pages, "max_pages")
    if arena_bytes is None:
        per = page_bytes(D, wk, wv, n_out_k, n_out_v, dtype, bounds)
        biggest = page_bytes(D, 8, 8, n_out_k, n_out_v, dtype, bounds)
        arena_bytes = B * Hkv * (n_full * per + (NCLASS - 1) * biggest)
    A = _up16(_ops.int_arg(arena_bytes, "arena_bytes"))
    if A > _MAX_ARENA:
        raise ValueError(f"kvsparse: the arena of {A} bytes exceeds 32 GiB (addresses are int32 units of 16 "
                         "bytes); split the batch")
    return _empty_store(A, B, Hkv, maxp, torch.device(device), D, n_out_k, n_out_v, bounds, dtype)


def _empty_store(arena_bytes, B, Hkv, maxp, dev, D, n_out_k, n_out_v, bounds, dtype):
    """A :class:`PagedStore` with a zeroed arena of ``arena_bytes`` and no pages."""
    return PagedStore(
        arena=torch.zeros(max(arena_bytes, 16), dtype=torch.uint8, device=dev),
        top=torch.zeros(1, dtype=torch.int64, device=dev),
        open=torch.full((B, Hkv, NCLASS), -1, dtype=torch.int32, device=dev),
        pages=torch.full((B, Hkv, maxp), -1, dtype=torch.int32, device=dev),
        n_pages=torch.zeros(B, Hkv, dtype=torch.int32, device=dev),
        flags=torch.zeros(1, dtype=torch.int32, device=dev),
        head_dim=D, n_out_k=int(n_out_k), n_out_v=int(n_out_v), bounds=bool(bounds), dtype=dtype)


def reset(store):
    """Empties the store in place (keeps its buffers; graph-capturable)."""
    store.top.zero_()
    store.open.fill_(-1)
    store.pages.fill_(-1)
    store.n_pages.zero_()
    store.flags.zero_()


def _widths(w, like, name):
    if isinstance(w, int):
        return torch.full(like.shape[:3], w, dtype=torch.uint8, device=like.device)
    if not torch.is_tensor(w):
        raise TypeError(f"kvsparse: {name} must be an int or a uint8 tensor [B, Hkv, n], got {type(w).__name__}")
    return w.contiguous()


def append(store, k, v, wk, wv, pos0, count=None, pos=None):
    """Quantizes ``k``, ``v`` [B, Hkv, n, D] into ``store`` in place.

    ``wk``, ``wv``: widths (ints or uint8 [B, Hkv, n]); ``pos0`` int32 [B]:
    the position of token 0 of each sequence; ``count`` int32 [B] (default
    ``n``): how many of the n tokens of each sequence to take (ragged);
    ``pos`` int32 [B, Hkv, n] (optional): each token's own position instead
    of ``pos0 + i``. A token whose widths are not a class (e.g. 255) is skipped.
    """
    if not torch.is_tensor(k) or not torch.is_tensor(v):
        raise TypeError("kvsparse: k and v must be tensors")
    if k.dtype != store.dtype:
        raise TypeError(f"kvsparse: k has dtype {k.dtype} but the store holds {store.dtype}")
    if k.dim() != 4:
        raise ValueError(f"kvsparse: k must be a 4-D tensor [B, Hkv, n, D], got shape {tuple(k.shape)}")
    if count is None:
        count = torch.full((k.shape[0],), k.shape[2], dtype=torch.int32, device=k.device)
    _ops.ops.qaqp_append(k.contiguous(), v.contiguous(), _widths(wk, k, "wk"), _widths(wv, k, "wv"), pos0, count,
                         *store.state(), *store.geom(), pos)


def _plist(store, plist):
    return store.pages if plist is None else plist


def dequantize(store, plist=None):
    """(keys, values, positions) of the listed pages (default: every page), in list order.

    keys / values [B, Hkv, L * 64, D] (zeros where a slot holds no token),
    positions int32 [B, Hkv, L * 64] (-1 there).
    """
    return _ops.ops.qaqp_dequantize(store.arena, _plist(store, plist), store.head_dim, store.dtype, *store.geom())


def attention(q, store, plist=None, scale=None, return_p_max=False):
    """Decode attention of ``q`` [B, H, D] over the listed pages (default: all).

    ``plist`` int32 [B, Hkv, L]: page addresses (entries of ``store.pages``;
    -1 for padding). Returns ``out`` [B, H, D], and with ``return_p_max`` also
    ``p_max`` float32 [B, Hkv, L, 64]: per slot the largest attention weight
    over the query heads of its KV head (0 where the slot holds no token).
    """
    if not torch.is_tensor(q):
        raise TypeError(f"kvsparse: q must be a tensor, got {type(q).__name__}")
    if q.dtype != store.dtype:
        raise TypeError(f"kvsparse: q has dtype {q.dtype} but the store holds {store.dtype}")
    D = store.head_dim
    s = 1.0 / math.sqrt(D) if scale is None else _ops.float_arg(scale, "scale")
    out, pm = _ops.ops.qaqp_attention(q.contiguous(), store.arena, _plist(store, plist), store.num_kv_heads,
                                      *store.geom(), s, bool(return_p_max))
    return (out, pm) if return_p_max else out


def requantize(store, new_wk, new_wv, plist=None, max_moves=None):
    """QAQ's re-quantization on pages: lowers stored tokens' widths, in place.

    ``new_wk``, ``new_wv`` uint8 [B, Hkv, L, 64]: target widths of slot ``i``
    of listed page ``j`` (``plist`` [B, Hkv, L], default every page, each page
    listed once). A live token whose target is another class with widths no
    larger than its own moves: it is dequantized, taken out of its page (a
    hole, reclaimed by :func:`compact`) and appended again at the new widths
    with its position. Any other target (255, a wider width, the same class)
    leaves the token alone. At most ``max_moves`` tokens move per (sequence,
    KV head) (default ``64 * L``: all; the staging buffers are ``max_moves``
    rows of keys and values, so a smaller bound saves that transient), the
    first in list order. Graph-capturable (no host sync); a full arena or
    page list sets ``store.flags`` as :func:`append` does (the moving tokens
    are then lost: :func:`check` raises). Returns ``moved`` int32 [B, Hkv].
    """
    pl = _plist(store, plist)
    n = pl.shape[2] * PAGE if max_moves is None else _ops.int_arg(max_moves, "max_moves")
    k, v, wk, wv, pos, moved = _ops.ops.qaqp_requant_take(store.arena, pl, new_wk, new_wv, n, store.head_dim,
                                                          store.dtype, *store.geom())
    B = pl.shape[0]
    zeros = torch.zeros(B, dtype=torch.int32, device=pl.device)
    count = torch.full((B,), n, dtype=torch.int32, device=pl.device)
    _ops.ops.qaqp_append(k, v, wk, wv, zeros, count, *store.state(), *store.geom(), pos)
    return moved


def compact(store, arena_bytes=None, in_place=False):
    """The store rewritten without holes (what :func:`requantize` left behind).

    Every (sequence, KV head)'s live tokens are packed, class by class in page
    order, into full pages (the last of each class partly filled; it becomes
    the class's open page), with Quest bounds recomputed over the tokens that
    are left. The new pages sit at consecutive addresses from 0, so ``top`` is
    the bytes in use. Returns a new :class:`PagedStore` whose arena holds
    ``arena_bytes`` (default: the bytes the source uses, read from ``top``: a
    host sync), or with ``in_place`` writes the result back into ``store``'s
    own buffers and returns ``store`` (the transient is a second copy of the
    bytes in use). Runs outside captured graphs (it reads ``top``).
    """
    used = int(store.top.item()) * 16
    A = max(16, _up16(used if arena_bytes is None or in_place else _ops.int_arg(arena_bytes, "arena_bytes")))
    B, Hkv, maxp = store.pages.shape
    out = _empty_store(A, B, Hkv, maxp, store.arena.device, store.head_dim, store.n_out_k, store.n_out_v,
                       store.bounds, store.dtype)
    out.flags.copy_(store.flags)
    _ops.ops.qaqp_compact(store.arena, store.pages, store.n_pages, out.arena, out.top, out.open, out.pages,
                          out.n_pages, out.flags, store.head_dim, store.dtype, *store.geom())
    if not in_place:
        return out
    store.arena[:A].copy_(out.arena)
    for name in ("top", "open", "pages", "n_pages", "flags"):
        getattr(store, name).copy_(getattr(out, name))
    return store


def check(store):
    """Raises RuntimeError if an append found the arena or a page list full (a host sync)."""
    f = int(store.flags.item())
    if f & FLAG_ARENA:
        raise RuntimeError(f"kvsparse: the paged QAQ arena ({store.arena.numel()} bytes) was full: tokens "
                           "were dropped; allocate a larger arena (alloc(arena_bytes=...))")
    if f & FLAG_PAGES:
        raise RuntimeError(f"kvsparse: a page list ({store.pages.shape[2]} pages) was full: tokens were "
                           "dropped; allocate more pages (alloc(max_pages=...))")


def live_tokens(store):
    """Tokens held per (sequence, KV head), int64 [B, Hkv] (dequantizes the positions: a test helper)."""
    _, _, pos = dequantize(store)
    return (pos >= 0).sum(-1)


def memory_report(store):
    """Bytes the store holds: ``used`` (pages handed out), ``allocated`` (every buffer)."""
    used = int(store.top.item()) * 16
    meta = sum(t.numel() * t.element_size() for t in store.state()[1:])
    return {"used": used + meta, "allocated": store.arena.numel() + meta}


# ---------------------------------------------------------------------------
# fake (meta) kernels: the structural checks of csrc/ops/qaqp.cpp

def _geom_fake(D, n_out_k, n_out_v):
    for n, name in ((n_out_k, "n_out_k"), (n_out_v, "n_out_v")):
        torch._check_value(n >= 0 and n % 2 == 0 and n <= 64 and 2 * n <= D,
                           lambda: f"kvsparse: {name} must be even, in [0, min(64, head_dim / 2)], got {n}")


def _arena_fake(arena, ref, ref_name):
    _ops.check_dtype(arena, torch.uint8, "arena")
    _ops.check_dim(arena, 1, "arena", "[A]")
    _ops.check_device(arena, "arena", ref, ref_name)
    torch._check_value(arena.numel() % 16 == 0 and arena.numel() <= _MAX_ARENA,
                       lambda: f"kvsparse: arena must hold a multiple of 16 bytes, at most 32 GiB, got {arena.numel()}")


def _i32_fake(t, name, shape, layout, ref, ref_name):
    _ops.check_dtype(t, torch.int32, name)
    _ops.check_dim(t, len(shape), name, layout)
    _ops.check_device(t, name, ref, ref_name)
    for d, s in enumerate(shape):
        if s is not None:
            _ops.check_size(t, d, s, name, layout)


@torch.library.register_fake("kvsparse::qaqp_append")
def _qaqp_append_fake(k, v, wk, wv, pos0, count, arena, top, open, pages, n_pages, flags, n_out_k, n_out_v, bounds,
                      pos=None):
    _ops.check_float(k, "k")
    _ops.check_dim(k, 4, "k", "[B, Hkv, n, D]")
    _ops.check_same_dtype(v, "v", k, "k")
    _ops.check_same_shape(v, "v", k, "k")
    B, Hkv, n, D = k.shape
    _ops.check_head_dim(D, k.device)
    _geom_fake(D, n_out_k, n_out_v)
    for t, name in ((wk, "wk"), (wv, "wv")):
        _ops.check_dtype(t, torch.uint8, name)
        _ops.check_device(t, name, k, "k")
        torch._check_value(tuple(t.shape) == (B, Hkv, n),
                           lambda: f"kvsparse: {name} must have shape [B, Hkv, n] = {(B, Hkv, n)}, got {tuple(t.shape)}")
    _i32_fake(pos0, "pos0", (B,), "[B]", k, "k")
    _i32_fake(count, "count", (B,), "[B]", k, "k")
    if pos is not None:
        _i32_fake(pos, "pos", (B, Hkv, n), "[B, Hkv, n]", k, "k")
    _arena_fake(arena, k, "k")
    _ops.check_dtype(top, torch.int64, "top")
    _i32_fake(open, "open", (B, Hkv, NCLASS), "[B, Hkv, 25]", k, "k")
    _i32_fake(pages, "pages", (B, Hkv, None), "[B, Hkv, maxp]", k, "k")
    _i32_fake(n_pages, "n_pages", (B, Hkv), "[B, Hkv]", k, "k")
    _i32_fake(flags, "flags", (1,), "[1]", k, "k")


@torch.library.register_fake("kvsparse::qaqp_dequantize")
def _qaqp_dequantize_fake(arena, plist, head_dim, dtype, n_out_k, n_out_v, bounds):
    torch._check_type(dtype in (torch.float32, torch.float16, torch.bfloat16),
                      lambda: f"kvsparse: dtype must be float32, float16 or bfloat16, got {dtype}")
    _ops.check_head_dim(head_dim, arena.device)
    _geom_fake(head_dim, n_out_k, n_out_v)
    _arena_fake(arena, arena, "arena")
    _i32_fake(plist, "plist", (None, None, None), "[B, Hkv, L]", arena, "arena")
    B, Hkv, L = plist.shape
    kv = arena.new_empty((B, Hkv, L * PAGE, head_dim), dtype=dtype)
    return kv, torch.empty_like(kv), arena.new_empty((B, Hkv, L * PAGE), dtype=torch.int32)


@torch.library.register_fake("kvsparse::qaqp_attention")
def _qaqp_attention_fake(q, arena, plist, num_kv_heads, n_out_k, n_out_v, bounds, scale, return_p_max):
    _ops.check_float(q, "q")
    _ops.check_dim(q, 3, "q", "[B, H, D]")
    B, H, D = q.shape
    _ops.check_head_dim(D, q.device)
    torch._check_value(num_kv_heads >= 1 and H % num_kv_heads == 0,
                       lambda: f"kvsparse: num_kv_heads must divide the query heads H = {H}, got {num_kv_heads}")
    _geom_fake(D, n_out_k, n_out_v)
    _arena_fake(arena, q, "q")
    _i32_fake(plist, "plist", (B, num_kv_heads, None), "[B, Hkv, L]", q, "q")
    L = plist.shape[2]
    pm = q.new_empty((B, num_kv_heads, L, PAGE) if return_p_max else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), pm


@torch.library.register_fake("kvsparse::qaqp_requant_take")
def _qaqp_requant_take_fake(arena, plist, new_wk, new_wv, n, head_dim, dtype, n_out_k, n_out_v, bounds):
    torch._check_type(dtype in (torch.float32, torch.float16, torch.bfloat16),
                      lambda: f"kvsparse: dtype must be float32, float16 or bfloat16, got {dtype}")
    _ops.check_head_dim(head_dim, arena.device)
    _geom_fake(head_dim, n_out_k, n_out_v)
    _arena_fake(arena, arena, "arena")
    _i32_fake(plist, "plist", (None, None, None), "[B, Hkv, L]", arena, "arena")
    B, Hkv, L = plist.shape
    torch._check_value(0 <= n <= L * PAGE, lambda: f"kvsparse: n must be in [0, 64 * L = {L * PAGE}], got {n}")
    for t, name in ((new_wk, "new_wk"), (new_wv, "new_wv")):
        _ops.check_dtype(t, torch.uint8, name)
        _ops.check_device(t, name, arena, "arena")
        torch._check_value(tuple(t.shape) == (B, Hkv, L, PAGE),
                           lambda: f"kvsparse: {name} must have shape [B, Hkv, L, 64] = {(B, Hkv, L, PAGE)}, "
                                   f"got {tuple(t.shape)}")
    k = arena.new_empty((B, Hkv, n, head_dim), dtype=dtype)
    w = arena.new_empty((B, Hkv, n), dtype=torch.uint8)
    return (k, torch.empty_like(k), w, torch.empty_like(w), arena.new_empty((B, Hkv, n), dtype=torch.int32),
            arena.new_empty((B, Hkv), dtype=torch.int32))


@torch.library.register_fake("kvsparse::qaqp_compact")
def _qaqp_compact_fake(src, pages_src, n_pages_src, dst, top, open, pages, n_pages, flags, head_dim, dtype, n_out_k,
                       n_out_v, bounds):
    torch._check_type(dtype in (torch.float32, torch.float16, torch.bfloat16),
                      lambda: f"kvsparse: dtype must be float32, float16 or bfloat16, got {dtype}")
    _ops.check_head_dim(head_dim, src.device)
    _geom_fake(head_dim, n_out_k, n_out_v)
    _arena_fake(src, src, "src")
    _arena_fake(dst, src, "src")
    _i32_fake(pages_src, "pages_src", (None, None, None), "[B, Hkv, maxp_src]", src, "src")
    B, Hkv, _ = pages_src.shape
    _i32_fake(n_pages_src, "n_pages_src", (B, Hkv), "[B, Hkv]", src, "src")
    _ops.check_dtype(top, torch.int64, "top")
    _i32_fake(open, "open", (B, Hkv, NCLASS), "[B, Hkv, 25]", src, "src")
    _i32_fake(pages, "pages", (B, Hkv, None), "[B, Hkv, maxp]", src, "src")
    _i32_fake(n_pages, "n_pages", (B, Hkv), "[B, Hkv]", src, "src")
    _i32_fake(flags, "flags", (1,), "[1]", src, "src")
