"""QAQ's storage on width-binned pages (``QAQConfig(layout="pages")``): :class:`BinnedQuantKV`.

The ops are :mod:`kvsparse.qaqp` (format: ``csrc/kernels/qaqp.h``). Each
(sequence, KV head) keeps its tokens in 64-slot pages of one (key width, value
width) class; the decode attention reads every page with one width dispatch
per page (no per-token offsets or widths).

Widths are settled once, when a token is stored:

* a prefill chunk's tokens are held exactly until the chunk's attention has
  run (:meth:`BinnedQuantKV.dequantized` gives a later chunk the dequantized
  past plus its own exact tokens), then quantized straight at their final
  widths: keys from the chunk's largest ``|q|^2`` over its last ``window``
  query rows, values from the largest attention weight those rows give each
  token (QAQ's bounds, :func:`kvsparse.qaq.key_bits` / :func:`kvsparse.qaq.value_bits`);
  the newest ``n_recent`` tokens and the ``dense_layers`` keep the largest
  width;
* a decode token is stored at the largest width (``uniform_bits`` when set).

By default nothing is re-quantized during decoding (``requant_every`` and
``compact_every`` have no effect): a decode token stays at the largest width,
and a prompt token at the widths its prefill gave it. With
``QAQConfig(page_requant=True)`` (dynamic caches) every ``requant_every``
decode steps the widths are re-evaluated from QAQ's bounds over the tokens'
stored ranges (keys: the largest ``|q|^2`` since the last re-quantization;
values: each slot's largest attention weight over those steps, from the
attention's ``p_max``), and the tokens whose class falls move to pages of
their new class (:func:`kvsparse.qaqp.requantize`, which leaves holes); every
``compact_every`` re-quantizations :func:`kvsparse.qaqp.compact` rewrites the
layer without holes (host side).

Memory: a static layer's arena is sized for every slot at the largest width
(fixed addresses; its report counts the bytes in use); a dynamic layer's
arena grows with what the pages use.
"""
import math

import torch

from .. import qaq, qaqp
from ..parts import Part

__all__ = ["BinnedQuantKV"]


class BinnedQuantKV(Part):
    """QAQ's storage on width-binned pages (see the module docstring)."""

    keys = values = None

    def __init__(self, config, layer_idx, static):
        super().__init__()
        self.config = config
        self.layer_idx = int(layer_idx)
        self.static = bool(static)
        self.st = None
        #: the last commit's exact tokens ``(start, k, v, counts)``, stored at
        #: their final widths by :meth:`prefill_importance` (or at the largest
        #: width by :meth:`_flush` if something reads the storage first)
        self._fresh = None
        self._room = 0  # dynamic layers: arena bytes known to be free (host bound)
        #: ``key_channel_scale``: the keys' channel scale ``s`` [B, Hkv, D] (zeros: not set yet)
        self.kscale = None
        #: ``page_requant``: each slot's largest attention weight since the last
        #: re-quantization [B, Hkv, maxp, 64], the largest ``|q|^2`` [B, Hkv],
        #: decode steps and re-quantizations since the last re-quantization / compaction
        self.win = self.q_sq = None
        self._steps = self._requants = 0
        self.num_compactions = 0

    def store_dtype(self, model_dtype):
        return self.config.store_dtype(model_dtype)

    # ------------------------------------------------------------ geometry
    @property
    def adaptive(self):
        return self.config.adaptive and self.layer_idx >= self.config.dense_layers

    @property
    def width(self):
        return self.config.max_width

    def _n_out(self, alpha):
        return qaqp.outlier_count(alpha, self.head_dim)

    def _page_max(self, layer, n_out=None):
        """Bytes of the largest page (both widths at the largest): what one new page may take."""
        n_k, n_v = n_out if n_out is not None else (self.st.n_out_k, self.st.n_out_v)
        return qaqp.page_bytes(self.head_dim, self.width, self.width, n_k, n_v, layer.dtype)

    def init(self, layer):
        self.num_heads, self.head_dim = layer.num_heads, layer.head_dim

    @property
    def requant(self):
        return self.config.page_requant and self.adaptive

    def allocate(self, layer, capacity):
        B, Hkv, D = layer.batch_size, self.num_heads, self.head_dim
        if self.config.page_requant and self.static:
            raise ValueError("kvsparse: QAQConfig(page_requant=True) needs a dynamic cache: its compaction runs "
                             "on the host between steps; use the default cache or page_requant=False")
        n_k, n_v = self._n_out(self.config.alpha), self._n_out(self.config.value_alpha)
        maxp = -(-capacity // qaqp.PAGE) + qaqp.NCLASS
        pb = self._page_max(layer, (n_k, n_v))
        if self.static or self.st is None:
            # static: every slot at the largest width; dynamic: start with that for `capacity`
            A = B * Hkv * maxp * pb
        else:
            A = self.st.arena.numel()
        new = qaqp.alloc(B, Hkv, D, capacity, dtype=layer.dtype, device=layer.device, n_out_k=n_k, n_out_v=n_v,
                         arena_bytes=A, max_pages=maxp)
        if self.st is not None:
            old = self.st
            new.arena[: old.arena.numel()].copy_(old.arena)
            for name in ("top", "open", "n_pages", "flags"):
                getattr(new, name).copy_(getattr(old, name))
            new.pages[:, :, : old.pages.shape[2]].copy_(old.pages)
        self.st = new
        self._room = 0
        if self.config.key_channel_scale is not None and (self.kscale is None or self.kscale.shape != (B, Hkv, D)):
            self.kscale = torch.zeros(B, Hkv, D, dtype=layer.dtype, device=layer.device)

    def tensors(self):
        out = list(self.st.state()) if self.st is not None else []
        return out + ([self.kscale] if self.kscale is not None else [])

    # ------------------------------------------------- key channel scale
    def _stored_keys(self, k, counts):
        """``k`` [B, Hkv, L, D] as stored: ``k / s``; ``s`` is set from these
        keys (the valid ones, ``counts[b]``) for sequences that have none yet
        (no host sync)."""
        if self.kscale is None:
            return k
        B, H, L, D = k.shape
        ok = torch.arange(L, device=k.device).view(1, 1, L, 1) < counts.view(B, 1, 1, 1)
        a = torch.where(ok, k.float().abs(), 0.0).amax(dim=2)  # [B, Hkv, D]
        a = torch.maximum(a, 1e-3 * a.amax(dim=-1, keepdim=True))  # no channel scaled up more than 1000x
        if self.config.key_channel_scale == "sqrt":
            a = a.sqrt()
        c = a / a.square().mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-30)
        new = (self.kscale[..., :1] == 0) & (a[..., :1] > 0)
        self.kscale.copy_(torch.where(new, c.to(self.kscale.dtype), self.kscale))
        return (k.float() / self._channel_scale()[:, :, None]).to(k.dtype)

    def _channel_scale(self):
        """``s`` [B, Hkv, D] in float32, 1 for sequences whose scale is not set yet."""
        return torch.where(self.kscale == 0, 1.0, self.kscale.float())

    def _scaled_query(self, q, heads_dim=1):
        """``q`` [B, H, ..., D] times ``s`` (each KV head's scale on its G query heads), float32."""
        q = q.float()
        if self.kscale is None:
            return q
        s = self._channel_scale().repeat_interleave(q.shape[1] // self.kscale.shape[1], dim=1)
        return q * s.view(*s.shape[:2], *([1] * (q.dim() - 3)), s.shape[-1])

    def _ensure_room(self, layer, nbytes):
        """Dynamic layers: at least ``nbytes`` free in the arena (grows it; a host sync when the bound runs out)."""
        if self.static or nbytes <= self._room:
            self._room -= nbytes
            return
        used = int(self.st.top.item()) * 16
        free = self.st.arena.numel() - used
        if free < nbytes:
            A = max(2 * self.st.arena.numel(), used + 2 * nbytes)
            arena = torch.zeros(qaqp._up16(A), dtype=torch.uint8, device=layer.device)
            arena[: self.st.arena.numel()].copy_(self.st.arena)
            self.st = self.st._replace(arena=arena)
            free = arena.numel() - used
        self._room = free - nbytes

    def _append(self, layer, k, v, wk, wv, start, counts, scaled=False):
        """Store ``k``, ``v`` (``scaled``: ``k`` is already :meth:`_stored_keys`)."""
        if not scaled:
            k = self._stored_keys(k, counts)
        B, H, L, D = k.shape
        # at most one new page per token, and per class ceil(n / 64) + 1 pages
        pages = min(L, math.ceil(L / qaqp.PAGE) + qaqp.NCLASS)
        self._ensure_room(layer, B * H * pages * self._page_max(layer))
        qaqp.append(self.st, k.contiguous(), v.contiguous(), wk, wv, start.to(torch.int32),
                    counts.to(torch.int32))

    # ---------------------------------------------------------------- writes
    def append_one(self, layer, key_states, value_states, pos, new_lens):
        self._flush(layer)
        k = key_states.detach().to(layer.dtype)
        v = value_states.detach().to(layer.dtype)
        # one token per sequence; a full static cache stores no more (the dense one overwrites its last slot)
        one = (layer.seq_lens < layer.capacity).to(torch.int32)
        self._append(layer, k, v, self.width, self.width, pos, one)
        return key_states, value_states

    def commit(self, layer, start, new_lens, k, v, counts, seen):
        self._flush(layer)
        self._fresh = (start.clone(), k, v, counts.clone())

    def _flush(self, layer):
        """Store a pending commit at the largest width (nothing gave it widths)."""
        if self._fresh is None:
            return
        start, k, v, counts = self._fresh
        self._fresh = None
        self._append(layer, k, v, self.width, self.width, start, counts)

    def dequantized(self, layer, length=None):
        """``(keys, values)`` ``[B, Hkv, length, D]`` in position order (zeros
        past ``seq_lens``), the pending commit's tokens exact: for a prefill
        chunk that continues the cache."""
        T = layer.capacity if length is None else min(int(length), layer.capacity)
        B, Hkv, D = layer.batch_size, self.num_heads, self.head_dim
        k, v, pos = qaqp.dequantize(self.st)
        if self.kscale is not None:
            k = k * self._channel_scale().to(k.dtype)[:, :, None]
        out = []
        for x in (k, v):
            dst = x.new_zeros(B, Hkv, T + 1, D)
            slot = torch.where((pos >= 0) & (pos < T), pos, T).long()
            dst.scatter_(2, slot[..., None].expand(B, Hkv, slot.shape[2], D), x)
            out.append(dst[:, :, :T])
        del k, v
        if self._fresh is not None:
            start, fk, fv, counts = self._fresh
            out = [_put_tokens(out[0], start, fk, counts), _put_tokens(out[1], start, fv, counts)]
        return tuple(x.to(layer.model_dtype) for x in out)

    # ------------------------------------------------------------ importance
    @torch.no_grad()
    def prefill_importance(self, layer, query, start, valid, seen, scaling):
        """After a prefill chunk's attention: its tokens' widths from the last
        ``window`` query rows, then they are stored."""
        if self._fresh is None:
            return
        fstart, k, v, counts = self._fresh
        self._fresh = None
        B, Hkv, L, D = k.shape
        if not self.adaptive:
            self._append(layer, k, v, self.width, self.width, fstart, counts)
            return
        cfg = self.config
        H = query.shape[1]
        G = H // Hkv
        n = min(cfg.window, query.shape[2])
        # with a key channel scale everything below sees the stored problem: k / s and q * s
        k = self._stored_keys(k, counts)
        qn = self._scaled_query(query[:, :, -n:]) * scaling  # [B, H, n, D]
        # logits of the last n rows over the chunk's own tokens (exact) and over the stored past
        qg = qn.reshape(B, Hkv, G * n, D)
        s_new = torch.matmul(qg, k.float().transpose(-1, -2)).view(B, Hkv, G, n, L)
        Lq = query.shape[2]
        if valid is None:
            upto = torch.arange(1, Lq + 1, device=layer.device, dtype=torch.int32).expand(B, Lq)
        else:
            upto = valid.to(device=layer.device, dtype=torch.int32).cumsum(dim=1, dtype=torch.int32)
        vis = torch.arange(L, device=layer.device).view(1, 1, L) < upto[:, Lq - n:].view(B, n, 1)
        vis = vis & (torch.arange(L, device=layer.device).view(1, 1, L) < counts.view(B, 1, 1))
        s_new = s_new.masked_fill(~vis.view(B, 1, 1, n, L), float("-inf"))
        lse = torch.logsumexp(s_new, dim=-1)
        if seen > 0:
            pk, _, ppos = qaqp.dequantize(self.st)
            s_old = torch.matmul(qg, pk.float().transpose(-1, -2)).view(B, Hkv, G, n, -1)
            s_old = s_old.masked_fill((ppos < 0).view(B, Hkv, 1, 1, -1), float("-inf"))
            lse = torch.logaddexp(lse, torch.logsumexp(s_old, dim=-1))
            del pk, ppos, s_old
        p = torch.exp(s_new - lse[..., None]).nan_to_num(0.0).amax(dim=(2, 3))  # [B, Hkv, L]
        q_sq = qaq.query_sq(self._scaled_query(query[:, :, -1]), Hkv, scaling)  # [B, Hkv]
        # ranges of the inliers, as the quantizer takes them (the n_side lowest and highest left out)
        rk = _inlier_range(k, self.st.n_out_k // 2)
        rv = _inlier_range(v, self.st.n_out_v // 2)
        # the bounds at each token's position (T = the new length), via the ops over a [B, Hkv, T] row
        new_lens = (fstart + counts).to(torch.int32)
        T = int(new_lens.max())
        pos = fstart.view(B, 1, 1).long() + torch.arange(L, device=layer.device).view(1, 1, L)
        ok = torch.arange(L, device=layer.device).view(1, 1, L) < counts.view(B, 1, 1)
        pos = torch.where(ok, pos, T).expand(B, Hkv, L)

        def spread(x):
            row = torch.zeros(B, Hkv, T + 1, dtype=torch.float32, device=layer.device)
            row.scatter_(2, pos, x.float())
            return row[:, :, :T].contiguous()

        kb = qaq.key_bits(spread(rk), q_sq.contiguous(), new_lens, cfg.key_sigma, cfg.allowed, cfg.n_recent)
        vb = qaq.value_bits(spread(rv), spread(p), new_lens, cfg.value_sigma, cfg.allowed, cfg.n_recent)
        gpos = pos.clamp(max=T - 1)
        wk = kb.gather(2, gpos).contiguous()
        wv = vb.gather(2, gpos).contiguous()
        self._append(layer, k, v, wk, wv, fstart, counts, scaled=True)

    def decode_attention(self, layer, q, scaling):
        self._flush(layer)
        qs = self._scaled_query(q) if self.kscale is not None else q
        qd = qs.to(layer.dtype).contiguous()
        if not self.requant:
            return qaqp.attention(qd, self.st, scale=scaling).to(q.dtype)
        out, pm = qaqp.attention(qd, self.st, scale=scaling, return_p_max=True)
        self._after_decode(layer, qs.detach(), pm, scaling)
        return out.to(q.dtype)

    # ------------------------------------------------------- re-quantization
    def _after_decode(self, layer, q, pm, scaling):
        """``page_requant``: the step's attention weights and ``|q|^2`` into
        the window; re-quantizes every ``requant_every`` steps."""
        if self.win is None or self.win.shape != pm.shape:
            win = torch.zeros_like(pm)
            if self.win is not None:  # the page list grew: its entries keep their places
                m = min(self.win.shape[2], pm.shape[2])
                win[:, :, :m] = self.win[:, :, :m]
            self.win = win
        torch.maximum(self.win, pm, out=self.win)
        qs = qaq.query_sq(q.float(), self.num_heads, scaling)
        self.q_sq = qs if self.q_sq is None else torch.maximum(self.q_sq, qs)
        self._steps += 1
        cfg = self.config
        if cfg.requant_every and self._steps >= cfg.requant_every:
            self.requantize(layer)
            if cfg.compact_every and self._requants >= cfg.compact_every:
                self.compact(layer)

    #: at most this many tokens move per (sequence, KV head) and re-quantization
    #: (the staging rows of qaqp.requantize); the others move at the next one
    MAX_MOVES = 1024

    def _slots(self):
        """Per listed page and slot: (wk, wv) [B, Hkv, maxp, 1], live [B, Hkv, maxp, 64],
        position int64, and the stored key / value scales (float32), read from the
        page headers and regions (no dequantization)."""
        st = self.st
        B, Hkv, M = st.pages.shape
        lay = qaqp.layout(self.head_dim, 0, 0, st.n_out_k, st.n_out_v, st.dtype, st.bounds)
        rows = st.arena.view(-1, 16)
        base = st.pages.clamp(min=0).long()  # units of 16 bytes
        listed = (st.pages >= 0)[..., None]

        def region(off, nbytes):
            idx = base[..., None] + off // 16 + torch.arange(nbytes // 16, device=base.device)
            return rows[idx].reshape(B, Hkv, M, nbytes)

        hdr = region(0, 16)
        wk, wv = hdr[..., 8:9], hdr[..., 9:10]
        bits = torch.arange(64, device=base.device)
        live = ((hdr[..., :8].long()[..., bits // 8] >> (bits % 8)) & 1).bool() & listed
        pos = region(lay["pos"], 256).view(torch.int32).long()
        sk = region(lay["ksz"], 256).view(torch.float16).view(B, Hkv, M, 64, 2)[..., 0].float()
        sv = region(lay["vsz"], 256).view(torch.float16).view(B, Hkv, M, 64, 2)[..., 0].float()
        return wk, wv, live, pos, sk, sv

    @torch.no_grad()
    def requantize(self, layer):
        """QAQ's bounds over every stored token, and the moves to lower classes."""
        cfg, st = self.config, self.st
        B, Hkv, M = st.pages.shape
        wk, wv, live, pos, sk, sv = self._slots()
        seq_lens = layer.seq_lens.to(torch.int32)
        T = max(int(seq_lens.max()), 1)
        at = torch.where(live & (pos >= 0) & (pos < T), pos, T).view(B, Hkv, M * 64)

        def row(x):
            r = torch.zeros(B, Hkv, T + 1, dtype=torch.float32, device=x.device)
            r.scatter_(2, at, x.reshape(B, Hkv, M * 64).float())
            return r[:, :, :T].contiguous()

        steps = lambda w: torch.exp2(w.float()).sub_(1.0).clamp_(min=1.0)  # noqa: E731  qaq.stored_range
        kb = qaq.key_bits(row(sk * steps(wk)), self.q_sq.contiguous(), seq_lens, cfg.key_sigma, cfg.allowed,
                          cfg.n_recent)
        vb = qaq.value_bits(row(sv * steps(wv)), row(self.win), seq_lens, cfg.value_sigma, cfg.allowed,
                            cfg.n_recent)
        g = at.clamp(max=T - 1)
        keep = torch.tensor(255, dtype=torch.uint8, device=g.device)
        nk = torch.where(live, kb.gather(2, g).view(B, Hkv, M, 64), keep).contiguous()
        nv = torch.where(live, vb.gather(2, g).view(B, Hkv, M, 64), keep).contiguous()
        # the tokens that will move (qaqp.h section 4; a dynamic layer may sync):
        # their count bounds the staging rows and the new pages
        ok = lambda x: (x == 0) | (x == 1) | (x == 2) | (x == 4) | (x == 8)  # noqa: E731
        moving = live & ok(nk) & ok(nv) & (nk <= wk) & (nv <= wv) & ((nk != wk) | (nv != wv))
        n = min(self.MAX_MOVES, int(moving.sum(dim=(2, 3)).max()))
        if n == 0:
            self._done_requant()
            return
        # room: the moved tokens take new pages (at most one per 64 plus one per class)
        extra = -(-n // qaqp.PAGE) + min(n, qaqp.NCLASS)
        self._ensure_room(layer, B * Hkv * extra * self._page_max(layer))
        if int(st.n_pages.max()) + extra > M:
            grown = torch.full((B, Hkv, M + extra), -1, dtype=torch.int32, device=st.pages.device)
            grown[:, :, :M] = st.pages
            self.st = st = st._replace(pages=grown)
        qaqp.requantize(st, nk, nv, plist=st.pages[:, :, :M].contiguous(), max_moves=n)
        qaqp.check(st)
        self._done_requant()

    def _done_requant(self):
        self.win.zero_()
        self.q_sq.zero_()
        self._steps = 0
        self._requants += 1

    # --------------------------------------------------------------- memory
    def memory_report(self, layer):
        """Bytes in use (pages handed out + the allocation state) against an fp16 cache."""
        if self.st is None:
            return _empty_report()
        self._flush(layer)
        st = self.st
        tokens = int(qaqp.live_tokens(st).sum())
        used = int(st.top.item()) * 16
        meta = sum(t.numel() * t.element_size() for t in st.state()[1:])
        codes = 0
        n = st.n_pages.cpu()
        pages = st.pages.cpu()
        ar = st.arena
        addr = torch.cat([pages[b, h, : int(n[b, h])] for b in range(pages.shape[0]) for h in range(pages.shape[1])])
        if addr.numel():
            hdr = ar.view(-1, 16)[addr.to(ar.device).long()][:, 8:10].cpu()
            for wk_, wv_ in hdr.tolist():
                codes += qaqp.PAGE * (qaqp._stride(self.head_dim, wk_) + qaqp._stride(self.head_dim, wv_))
        # key_channel_scale: D scale values per (sequence, KV head)
        ch = self.kscale.numel() * self.kscale.element_size() if self.kscale is not None and tokens else 0
        meta += ch
        rep = {"codes": codes, "scale_zero": 8 * tokens + ch, "widths": 0, "offsets": 0,
               "outliers": tokens * (st.n_out_k + st.n_out_v) * (2 + torch.empty((), dtype=st.dtype).element_size()),
               "total": used + meta, "fp16": tokens * self.head_dim * 2 * 2, "arena": st.arena.numel(),
               "allocated": st.arena.numel() + meta,
               "window": self.win.numel() * 4 + self.q_sq.numel() * 4 if self.win is not None else 0}
        return _finish_report(rep)

    # ------------------------------------------------------ Cache API bits
    def compact(self, layer):
        """``page_requant``: rewrite the layer's pages without the holes that
        re-quantization left (:func:`kvsparse.qaqp.compact`; host side, a
        dynamic layer only). Otherwise nothing leaves holes: a no-op."""
        if not self.requant or self.st is None or self._requants == 0:
            return
        self._flush(layer)
        used = int(self.st.top.item()) * 16
        B, Hkv = self.st.pages.shape[:2]
        head = B * Hkv * (qaqp.NCLASS + 1) * self._page_max(layer)
        self.st = qaqp.compact(self.st, arena_bytes=used + head)
        self._room = 0
        self._requants = 0
        self.win = None
        self.num_compactions += 1

    def reset(self, layer):
        self._fresh = None
        self.win = self.q_sq = None
        self._steps = self._requants = 0
        if self.st is not None:
            qaqp.reset(self.st)
        if self.kscale is not None:
            self.kscale.zero_()
        self._room = 0

    def map_batch(self, fn, in_place):
        raise NotImplementedError(
            "kvsparse: QAQConfig(layout='pages') keeps every sequence's pages in one arena and cannot reorder or "
            "select batch rows (beam search, batch selection); use layout='offsets'")

    def load_sequence(self, layer, b, other, other_layer):
        raise NotImplementedError(
            "kvsparse: QAQConfig(layout='pages') cannot copy a sequence between caches yet; use layout='offsets'")


def _inlier_range(x, n_side):
    """max - min of each token's values [B, H, L, D] without the n_side lowest and highest (float32)."""
    s = torch.sort(x.float(), dim=-1).values
    D = x.shape[-1]
    return s[..., D - 1 - n_side] - s[..., n_side]


# shared with the offsets layout (methods/qaq.py)
def _put_tokens(x, start, new, counts):
    """``x`` ``[B, H, T, D]`` with the first ``counts[b]`` of ``new``
    ``[B, H, L, D]`` at slots ``start[b] ..`` (those that fit below ``T``); a new tensor."""
    B, H, T, D = x.shape
    L = new.shape[2]
    i = torch.arange(L, device=x.device).view(1, L)
    slot = start.to(torch.int64).view(B, 1) + i
    ok = (i < counts.to(torch.int64).view(B, 1)) & (slot < T)
    slot = torch.where(ok, slot, T)  # the others go to a spare slot, dropped below
    out = torch.cat([x, x.new_zeros(B, H, 1, D)], dim=2)
    out.scatter_(2, slot.view(B, 1, L, 1).expand(B, H, L, D), new.to(x.dtype))
    return out[:, :, :T]


_REPORT_KEYS = ("codes", "scale_zero", "widths", "offsets", "outliers", "total", "fp16", "arena")


def _empty_report():
    return _finish_report({**{k: 0 for k in _REPORT_KEYS}, "allocated": 0, "window": 0})


def _finish_report(rep):
    rep["ratio"] = rep["total"] / rep["fp16"] if rep["fp16"] else 0.0
    rep["compression"] = rep["fp16"] / rep["total"] if rep["total"] else 0.0
    return rep
