"""Quest over QAQ: Quest's query-aware page selection over a QAQ-packed cache.

QAQ's storage holds the tokens (per-token or uniform bit-widths, no fp16 K/V
buffers); Quest's page bounds are kept beside it, computed from the keys as
they arrive (before quantization, so the selection is not blurred by it). A
decode step scores the pages, selects them within the token budget and runs
the packed attention over the selected pages only
(:func:`kvsparse.qaq.sparse_attention`: the QAQ attention kernel reading each
KV head's tokens through its page list). The ops are :mod:`kvsparse.quest`
and :mod:`kvsparse.qaq`.
"""
from dataclasses import dataclass

import torch

from .. import qaq
from ..parts import is_compiling, slot_rows
from .base import Method, register
from .qaq import QAQ, QAQCacheMethods, QAQConfig, QuantKV
from .quest import Quest, QuestCacheMethods, QuestConfig, QuestPages
from .quest import select as quest_select

__all__ = ["QuestQAQConfig", "QuestBounds", "PageWindow", "PagedQuantKV", "QuestQAQ"]


@dataclass(repr=True, eq=True)
class QuestQAQConfig(QAQConfig, QuestConfig):
    """Quest selection over a QAQ-quantized cache (``method="quest_qaq"``).

    The fields are Quest's (:class:`~kvsparse.methods.quest.QuestConfig`:
    ``token_budget``, ``page_size``, ``mode``) and QAQ's
    (:class:`~kvsparse.methods.qaq.QAQConfig`: ``sigma``, ``allowed``,
    ``alpha``, ``uniform_bits``, ``shared``, ...). Differences:

    * ``mode``: one page set per KV head (``"softmax"``, ``"group"``,
      ``"max"``, ``"union"``); ``"head"`` is not supported (a page set per
      query head would read the packed pages up to G times).
    * ``dense_layers`` (default 2, Quest's): those layers attend every token
      (the packed QAQ attention) and keep every token at the largest width.
    * ``dense_below`` is ignored: every step selects (a budget larger than the
      cache selects every page, which is the same result).
    * Widths follow QAQ's rules: key widths from the query scale (every
      token); value widths from the attention weights of the tokens a step
      selected (a token no step of the window selected keeps its width).
      With ``uniform_bits`` nothing is re-quantized.

    The page bounds are stored in the cache dtype (16 bits for fp16 / bf16
    models): ``2 * D * 2`` bytes per page and KV head, on top of QAQ's bytes
    (:meth:`~kvsparse.cache.QAQCache.memory_report` counts them as ``pages``).
    """

    method = "quest_qaq"

    dense_layers: int = 2

    def validate(self):
        super().validate()
        if self.mode == "head":
            raise ValueError("kvsparse: mode='head' is not supported by quest_qaq (one page set per KV head: "
                             "use 'softmax', 'group', 'max' or 'union')")

    def dense_length(self):
        return 0  # no dense K/V buffers: every step runs the packed kernels


def _n_sel(config, capacity):
    """Pages a step selects: the budget's, at most every page of the capacity."""
    P = config.page_size
    return max(1, min(config.token_budget // P, -(-int(capacity) // P)))


class QuestBounds(QuestPages):
    """Quest's page bounds kept beside a storage without dense keys: per page
    of ``page_size`` slots the channel-wise min / max of the keys as they
    arrived (before quantization), ``kmin`` / ``kmax``
    ``[B, Hkv, ceil(capacity / P), D]`` in the cache dtype (allocated as
    :class:`~kvsparse.methods.quest.QuestPages`). A decode token updates its
    page (in place, O(1)); a prefill resets the pages it starts and folds its
    tokens into the pages it touches."""

    def nbytes(self, seq_lens):
        """Bytes of the valid pages' bounds (both tensors)."""
        pages = int(((seq_lens.to(torch.int64) + self.page_size - 1) // self.page_size).sum())
        per = self.kmin.shape[1] * self.kmin.shape[3] * self.kmin.element_size()
        return 2 * pages * per

    def append_one(self, layer, key_states, value_states, pos, new_lens):
        k = key_states.detach()[:, :, 0].to(layer.dtype)  # [B, H, D]
        rows = slot_rows(layer, torch.div(pos, self.page_size, rounding_mode="floor"))
        first = (pos % self.page_size == 0).view(-1, 1, 1)  # the token starts its page
        self.kmin.index_put_(rows, torch.where(first, k, torch.minimum(self.kmin[rows], k)))
        self.kmax.index_put_(rows, torch.where(first, k, torch.maximum(self.kmax[rows], k)))

    def commit(self, layer, start, new_lens, k, v, counts, seen):
        B, H, L, D = k.shape
        P, pages = self.page_size, self.kmin.shape[2]
        start64, new64 = start.to(torch.int64).view(B, 1), new_lens.to(torch.int64).view(B, 1)
        # the pages this prefill starts (first slot in [start, new_len)) begin empty
        first = torch.arange(pages, device=layer.device).view(1, pages) * P
        fresh = ((first >= start64) & (first < new64)).view(B, 1, pages, 1)
        big = torch.finfo(k.dtype).max
        self.kmin.masked_fill_(fresh, big)
        self.kmax.masked_fill_(fresh, -big)
        i = torch.arange(L, device=layer.device).view(1, L)
        ok = (i < counts.to(torch.int64).view(B, 1)).view(B, 1, L, 1)
        pg = torch.div(start64 + i, P, rounding_mode="floor").clamp(max=pages - 1)
        # only the pages this commit touches: scatter_reduce_ may copy its whole
        # target (it does on the CPU), a transient that would grow with the cache
        lo, hi = 0, pages
        if not is_compiling():
            lo = int(start.min()) // P
            hi = min(pages, -(-int(new_lens.max()) // P))
        idx = (pg - lo).clamp(0, max(hi - lo - 1, 0)).view(B, 1, L, 1).expand(B, H, L, D)
        if hi > lo:
            self.kmin[:, :, lo:hi].scatter_reduce_(2, idx, torch.where(ok, k, big), "amin")
            self.kmax[:, :, lo:hi].scatter_reduce_(2, idx, torch.where(ok, k, -big), "amax")


class PageWindow:
    """QAQ's importance window for a sparse step: the last ``n`` decode
    steps' ``p_max`` over their selected slots, with the slots' tokens.

    ``push_pages(page_idx, P, p_max)`` stores a step (from
    :func:`kvsparse.qaq.sparse_attention`); ``push(row)`` folds a full
    ``[B, Hkv, cap]`` row (the prefill's) into the next :meth:`s_max` only.
    ``s_max(groups, cap)``: float32 ``[B, Hg, cap]``, each token's largest
    weight over the stored steps (0 for a token none of them selected).
    """

    def __init__(self, B, num_kv_heads, n_slot, n, device):
        self.p = torch.zeros(n, B, num_kv_heads, n_slot, dtype=torch.float32, device=device)
        self.tok = torch.full((n, B, num_kv_heads, n_slot), -1, dtype=torch.int64, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.full = None

    def tensors(self):
        return [self.p, self.tok, self.step]

    def reset(self):
        self.p.zero_()
        self.tok.fill_(-1)
        self.step.zero_()
        self.full = None

    def nbytes(self):
        return self.p.numel() * 4 + self.tok.numel() * 8

    def resized(self, n_slot):
        n, B, Hkv, old = self.p.shape
        if old == n_slot:
            return self
        win = PageWindow(B, Hkv, n_slot, n, self.p.device)
        m = min(old, n_slot)
        win.p[..., :m].copy_(self.p[..., :m])
        win.tok[..., :m].copy_(self.tok[..., :m])
        win.step.copy_(self.step)
        return win

    def load_sequence(self, b, other):
        """As :meth:`kvsparse.qaq.AttentionWindow.load_sequence`, both histories."""
        from ..parts import copy_row

        shift = 0 if other is None else int(self.step) - int(other.step)
        for name, fill in (("p", 0), ("tok", -1)):
            src = None if other is None else torch.roll(getattr(other, name), shifts=shift, dims=0)
            copy_row(getattr(self, name), b, src, dim=1, fill=fill)

    def map_batch(self, fn, in_place):
        for name in ("p", "tok"):
            t = fn(getattr(self, name).transpose(0, 1)).transpose(0, 1)
            if in_place:
                getattr(self, name).copy_(t)
            else:
                setattr(self, name, t.contiguous())

    def push_pages(self, page_idx, page_size, p_max):
        B, Hkv, n_sel = page_idx.shape
        P = int(page_size)
        pidx = page_idx.to(torch.int64).unsqueeze(-1)
        tok = torch.where(pidx >= 0, pidx * P + torch.arange(P, device=pidx.device), -1).view(B, Hkv, n_sel * P)
        slot = torch.remainder(self.step, self.p.shape[0]).view(1)
        self.p.index_copy_(0, slot, p_max.unsqueeze(0))
        self.tok.index_copy_(0, slot, tok.unsqueeze(0))
        self.step.add_(1)

    def push(self, row):
        self.full = row.clone() if self.full is None else torch.maximum(self.full, row)

    def s_max(self, groups, cap):
        n, B, Hkv, S = self.p.shape
        tok = self.tok.permute(1, 2, 0, 3).reshape(B, Hkv, n * S)
        tok = torch.where((tok >= 0) & (tok < cap), tok, cap)
        out = torch.zeros(B, Hkv, cap + 1, dtype=torch.float32, device=self.p.device)
        out.scatter_reduce_(2, tok, self.p.permute(1, 2, 0, 3).reshape(B, Hkv, n * S), "amax")
        out = out[..., :cap]
        if self.full is not None:  # the prefill's rows: once
            out = torch.maximum(out, self.full[..., :cap])
            self.full = None
        return out.view(B, groups, Hkv // groups, cap).amax(dim=2)


class PagedQuantKV(QuantKV):
    """QAQ's packed storage read a page selection at a time: the decode
    attention reads only the selected pages' codes; the importance window
    keeps the selected slots' weights (:class:`PageWindow`); value widths are
    re-evaluated only for the tokens the window's steps selected."""

    def _new_window(self, layer, capacity):
        if not self.adaptive:
            return None  # never re-quantized: no window
        n_slot = _n_sel(self.config, capacity) * self.config.page_size
        if self.window is not None:
            return self.window.resized(n_slot)
        return PageWindow(layer.batch_size, self.num_heads, n_slot, self.config.window, layer.device)

    def _value_bits(self, layer):
        cfg = self.config
        smax = self.window.s_max(self.vs.groups, layer.capacity)
        vb = qaq.value_bits(qaq.stored_range(self.vs), smax, layer.seq_lens, cfg.value_sigma, cfg.allowed,
                            cfg.n_recent)
        return torch.where(smax > 0, vb, self.vs.widths)  # unselected tokens keep their widths

    def sparse_attention(self, layer, q, page_idx, scaling):
        """One decode step over the pages ``page_idx`` ``[B, Hkv, n_sel]``:
        ``q`` ``[B, H, D]`` -> ``[B, H, D]``; feeds the window and re-quantizes
        on QAQ's schedule."""
        qd = q.to(layer.dtype).contiguous()
        P = self.config.page_size
        if not self.adaptive:
            return qaq.sparse_attention(qd, self.ks, self.vs, page_idx, layer.seq_lens, P, scaling).to(q.dtype)
        out, pm = qaq.sparse_attention(qd, self.ks, self.vs, page_idx, layer.seq_lens, P, scaling,
                                       return_p_max=True)
        self.window.push_pages(page_idx, P, pm)
        self._after_decode(layer, q, scaling)
        return out.to(q.dtype)

    def memory_report(self, layer):
        """QAQ's report plus ``pages``: the page bounds (in ``total``)."""
        rep = super().memory_report(layer)
        if layer.side is not None and layer.side.kmin is not None:
            rep["pages"] = layer.side.nbytes(layer.seq_lens)
            rep["total"] += rep["pages"]
            rep["allocated"] += sum(t.numel() * t.element_size() for t in layer.side.tensors())
            rep["ratio"] = rep["total"] / rep["fp16"] if rep["fp16"] else 0.0
            rep["compression"] = rep["fp16"] / rep["total"] if rep["total"] else 0.0
        return rep


class QuestQAQCacheMethods(QAQCacheMethods, QuestCacheMethods):
    """What a :class:`~kvsparse.cache.QuestQAQCache` adds to a kvsparse cache
    (QAQ's ``memory_report`` / ``compact``, Quest's ``page_size``)."""


class QuestQAQ(Method):
    """Quest over QAQ: page selection from the unquantized keys' bounds,
    attention over the selected pages' packed codes."""

    name = "quest_qaq"
    title = "QuestQAQ"
    config_class = QuestQAQConfig
    sweep_kwarg = "token_budget"
    sweep_values = "budgets"
    sweep_type = int
    eval_defaults = {"page_size": 16}
    lossless_tolerance = QAQ.lossless_tolerance
    cache_methods = QuestQAQCacheMethods
    cuda_head_dims = QAQ.cuda_head_dims  # Quest's kernels take them all; QAQ's attention fewer

    def lossless_kwargs(self, head_dim, length):
        kw = Quest().lossless_kwargs(head_dim, length)
        kw.pop("dense_below")
        return {**kw, **QAQ().lossless_kwargs(head_dim, length)}

    def page_size(self, config):
        return config.page_size

    def storage(self, config, layer_idx, static):
        return PagedQuantKV(config, layer_idx, packed=not static)

    def side_index(self, config):
        return QuestBounds(config.page_size)

    def select(self, q, layer, config, scaling):
        """The pages of this step: int32 ``[B, Hkv, n_sel]`` (Quest's selection
        rule, :func:`kvsparse.methods.quest.select`, over the bounds)."""
        side, P = layer.side, layer.page_size
        budget = _n_sel(config, layer.capacity) * P
        qs = q.to(side.kmin.dtype).contiguous()
        return quest_select(qs, side.kmin, side.kmax, layer.seq_lens, P, budget, config, layer.num_heads, scaling)

    def decode(self, q, layer, config, dense, scaling):
        if dense:  # a dense layer: every token, the packed QAQ attention
            return layer.storage.decode_attention(layer, q, scaling)
        return layer.storage.sparse_attention(layer, q, self.select(q, layer, config, scaling), scaling)

    def continuation_kv(self, layer, length):
        return layer.storage.dequantized(layer, length)

    def after_prefill(self, layer, query, start, valid, seen, scaling):
        layer.storage.prefill_importance(layer, query, start, valid, seen, scaling)


register(QuestQAQ())
