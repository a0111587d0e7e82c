"""Quest (query-aware page selection): its config, side index, decode step and registry entry.

The ops are :mod:`kvsparse.quest`.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .. import quest as ops
from ..parts import Part
from .base import Method, MethodConfig, check_int, register

__all__ = ["QuestConfig", "QuestPages", "Quest", "select", "fused_rule"]


@dataclass(repr=True, eq=True)
class QuestConfig(MethodConfig):
    """Quest (query-aware page selection) for decode attention.

    Attributes:
        token_budget: tokens attended per head (rounded down to whole pages)
            by each sparse decode step; >= ``page_size``.
        page_size: tokens per page ``P`` (the granularity of the selection).
        dense_layers: the first ``dense_layers`` decoder layers keep dense
            decode attention (Quest's recommendation: the first layers are
            not sparse enough to prune).
        mode: how the query heads of a GQA group choose pages. One page set
            per KV head (every selected page read once): ``"softmax"``
            (default: each head's page bounds normalised into a distribution,
            then summed), ``"group"`` (summed bounds, the fused kernel),
            ``"max"``, ``"union"`` (round-robin by per-head rank); see
            :func:`kvsparse.quest.combine_scores`. ``"head"``: one page set per
            query head (up to G times the pages read). Measured
            (``benchmarks/results/quest_gqa_modes_cpu.md``): ``"softmax"`` had
            the lowest perplexity on SmolLM2 and Gemma 3 at small budgets and
            costs the same on the H200. ``"softmax_max"``: the same per-head
            distributions combined by their maximum.
        sink_pages: the first ``sink_pages`` pages (attention sinks) are
            always attended, inside the budget (default 1; 0: none).
        recent_pages: the last ``recent_pages`` pages (the recent window)
            are always attended, inside the budget (default 1: the last page,
            which always is; ``recent_pages`` >= 1). When the budget has fewer
            pages than ``sink_pages + recent_pages``, the last page, then the
            sink pages, then the rest of the recent window (oldest first) take
            them. The defaults come from the ablation in
            ``benchmarks/results/quest_rules_cpu.md`` (4k tokens, budget 256:
            the sink page does most of the gain on SmolLM2; more recent pages
            add little and take budget from small budgets).
        top_p: ``None`` (default): every step attends ``token_budget``
            tokens. A float in ``(0, 1]``: an adaptive budget; of the pages
            selected within the budget, a step keeps the fewest whose
            estimated attention mass (:func:`kvsparse.quest.group_mass`, the
            softmax of the page bounds) reaches ``top_p``, the always-kept
            pages first (:func:`kvsparse.quest.top_p_pages`). The budget is
            the cap, so shapes never change and no host sync is needed.
        max_cache_len: see :class:`~kvsparse.methods.base.MethodConfig`.
        chunk_size: growth granularity of the dynamic buffers, in tokens
            (a multiple of ``page_size``).
        dense_below: a decode step over at most this many cached tokens runs
            one dense attention call (SDPA) instead of the page selection;
            ``None`` (default): ``token_budget``, where Quest attends to every
            page anyway, so the result is the same and only the overhead of
            scoring and selecting is saved. The length is the capacity of a
            static cache (known without a device read, so a compiled step
            never switches) or the host token count of a dynamic one.
    """

    method = "quest"

    token_budget: int = 1024
    page_size: int = 16
    dense_layers: int = 2
    mode: str = "softmax"
    dense_below: Optional[int] = None
    sink_pages: int = 1
    recent_pages: int = 1
    top_p: Optional[float] = None

    def validate(self):
        super().validate()
        check_int("page_size", self.page_size, 1)
        if self.dense_below is not None:
            check_int("dense_below", self.dense_below, 0)
        check_int("token_budget", self.token_budget)
        if self.token_budget < self.page_size:
            raise ValueError(
                f"kvsparse: token_budget ({self.token_budget}) must be >= page_size ({self.page_size})"
            )
        modes = ("head",) + ops.GROUP_MODES
        if not isinstance(self.mode, str) or self.mode not in modes:
            raise ValueError(f"kvsparse: mode must be one of {modes}, got {self.mode!r}")
        check_int("sink_pages", self.sink_pages, 0)
        check_int("recent_pages", self.recent_pages, 1)
        if self.top_p is not None:
            if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) \
                    or not 0.0 < float(self.top_p) <= 1.0:
                raise ValueError(f"kvsparse: top_p must be None or a float in (0, 1], got {self.top_p!r}")
        if self.chunk_size % self.page_size != 0:
            raise ValueError(
                f"kvsparse: chunk_size ({self.chunk_size}) must be a multiple of page_size ({self.page_size})"
            )

    def dense_length(self):
        """Decode steps over at most this many tokens run dense attention."""
        if self.dense_below is None:  # the budget Quest really reads: whole pages
            return self.token_budget // self.page_size * self.page_size
        return self.dense_below


class QuestPages(Part):
    """Quest's side index beside the dense keys: per page of ``page_size``
    slots, the channel-wise key min / max, ``kmin`` / ``kmax``
    ``[B, Hkv, ceil(capacity / P), D]``; an append updates only the pages it
    touches."""

    names = ("kmin", "kmax")

    def __init__(self, page_size):
        super().__init__()
        self.page_size = int(page_size)

    @property
    def num_pages(self):
        return 0 if self.kmin is None else self.kmin.shape[2]

    def allocate(self, layer, capacity):
        B, H, D = layer.batch_size, layer.num_heads, layer.head_dim
        pages = -(-capacity // self.page_size)
        kmin = torch.zeros((B, H, pages, D), dtype=layer.dtype, device=layer.device)
        kmax = torch.zeros_like(kmin)
        if self.kmin is not None:
            old_pages = self.kmin.shape[2]
            kmin[:, :, :old_pages].copy_(self.kmin)
            kmax[:, :, :old_pages].copy_(self.kmax)
        self.kmin, self.kmax = kmin, kmax

    def append_one(self, layer, key_states, value_states, pos, new_lens):
        ops.update_metadata(layer.keys, self.kmin, self.kmax, layer.seq_lens, new_lens, self.page_size)

    def commit(self, layer, start, new_lens, k, v, counts, seen):
        ops.update_metadata(layer.keys, self.kmin, self.kmax, start, new_lens, self.page_size)


def fused_rule(config):
    """Whether a step's selection is the fused kernel's own (``mode`` "group"
    or "head", the last page the only always-kept one, a fixed budget)."""
    return (config.mode in ("group", "head") and config.sink_pages == 0 and config.recent_pages <= 1
            and config.top_p is None)


def forced_counts(config, n_sel):
    """``(sink, recent)``: the always-kept pages that fit ``n_sel`` selected
    pages. The last page always is; then the sink pages; then the rest of the
    recent window."""
    sink = max(0, min(config.sink_pages, n_sel - 1))
    recent = max(1, min(config.recent_pages, n_sel - sink))
    return sink, recent


def select(q, kmin, kmax, seq_lens, page_size, budget, config, num_kv_heads, scaling):
    """The pages a decode step attends to under ``config``'s selection rule.

    The page bounds score every page (per query head, or summed per KV head
    for ``mode="group"``); the GQA mode combines the heads' scores
    (:func:`kvsparse.quest.combine_scores`); the sink and recent pages are
    forced in (:func:`kvsparse.quest.force_pages`); the best pages within
    ``budget`` are taken (:func:`kvsparse.quest.select_pages`); with
    ``top_p`` the adaptive budget trims them (:func:`kvsparse.quest.top_p_pages`).

    Returns:
        int32 ``[B, Hs, n_sel]`` (``Hs`` = H for ``mode="head"``, else Hkv),
        ``-1`` padded.
    """
    mode = config.mode
    per_head = mode != "group" or config.top_p is not None
    scores = ops.page_scores(q, kmin, kmax, seq_lens, page_size, "head" if per_head else "group")
    head_scores = scores
    if mode == "group" and per_head:
        scores = head_scores.view(scores.shape[0], num_kv_heads, -1, scores.shape[-1]).sum(2)
    elif mode != "head":
        if mode != "group":
            scores = ops.combine_scores(head_scores, num_kv_heads, mode, scaling)
    sink, recent = forced_counts(config, budget // page_size)
    if sink or recent > 1:
        # in place on the step's own scores, unless the adaptive budget still needs them unforced
        scores = ops.force_pages(scores, seq_lens, page_size, sink, recent,
                                 inplace=scores is not head_scores or config.top_p is None)
    idx = ops.select_pages(scores, seq_lens, page_size, budget)
    if config.top_p is not None:
        if mode == "head":
            mass = torch.softmax(head_scores.float() * float(scaling), dim=-1)
        else:
            mass = ops.group_mass(head_scores, num_kv_heads, scaling)
        idx = ops.top_p_pages(idx, mass, seq_lens, page_size, config.top_p, sink, recent)
    return idx


class QuestCacheMethods:
    """What a :class:`~kvsparse.cache.QuestCache` adds to a kvsparse cache."""

    @property
    def page_size(self):
        return self.config.page_size


class Quest(Method):
    """Quest: each decode step scores the pages by their key bounds and
    attends to the best ``token_budget // page_size`` pages."""

    name = "quest"
    title = "Quest"
    config_class = QuestConfig
    sweep_kwarg = "token_budget"
    sweep_values = "budgets"
    sweep_type = int
    eval_defaults = {"page_size": 16}

    @staticmethod
    def nominal_ratio(run, length):
        return max(0.0, 1.0 - run.budget / length)
    cache_kwargs = ("page_size", "chunk_size", "max_cache_len")
    cache_methods = QuestCacheMethods

    def lossless_kwargs(self, head_dim, length):
        page = 8
        return dict(token_budget=-(-int(length) // page) * page, page_size=page, dense_layers=0, dense_below=0)

    def page_size(self, config):
        return config.page_size

    def side_index(self, config):
        return QuestPages(config.page_size)

    def decode(self, q, layer, config, dense, scaling):
        pages, P = layer.side, layer.page_size
        budget = pages.num_pages * P if dense else config.token_budget  # every page: dense
        if not dense and not fused_rule(config):
            idx = select(q, pages.kmin, pages.kmax, layer.seq_lens, P, budget, config, layer.num_heads, scaling)
            return ops.sparse_attention(q, layer.keys, layer.values, idx, layer.seq_lens, P, scaling)
        return ops.attention(
            q, layer.keys, layer.values, pages.kmin, pages.kmax, layer.seq_lens,
            P, budget, "head" if config.mode == "head" else "group", scaling,
        )


register(Quest())
