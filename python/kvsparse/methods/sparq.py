"""SparQ (sparse-query attention): its config, side index, decode step and registry entry.

The ops are :mod:`kvsparse.sparq`.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .. import sparq as ops
from ..parts import Part, is_compiling, slot_rows
from .base import Method, MethodConfig, check_int, register

__all__ = ["SparQConfig", "SparQKeys", "SparQ"]


@dataclass(repr=True, eq=True)
class SparQConfig(MethodConfig):
    """SparQ (sparse-query attention) for decode attention.

    Either a target ``compression`` (the fraction of dense attention's K/V
    bytes a step may read) or explicit ``r`` and ``k``:

    * ``compression=c``: ``r = round(c * D)`` query channels and, at a step
      over ``S`` cached tokens, ``k = round(c * S / 2)`` positions
      (:func:`kvsparse.sparq.choose_r_k`: half of the byte budget for the
      approximate scores, half for the exact attention). ``S`` is the current
      length of the dynamic cache (the longest sequence of the batch), or
      ``max_cache_len`` for a static cache (whose length is on the device).
    * ``r`` and ``k`` given: used as they are (``k`` clamped to the cache).

    Attributes:
        compression: target transfer ratio in ``(0, 1]`` (default 1/8 when
            neither it nor ``r`` / ``k`` is given).
        r: query channels used for the approximate scores (``1 <= r <= D``).
        k: positions attended exactly per KV group (>= 1).
        local_window: the last ``local_window`` positions are always kept
            (they count towards ``k``; the paper used ``k / 4``; default 0).
        mode: ``"group"``: one channel set and position set per KV head
            (GQA: the group's ``|q|`` and ``s_hat`` summed); ``"head"``: per
            query head.
        reallocate: mean-value reallocation (``alpha * y + (1 - alpha) *
            mean(V)``); the paper found it better off for some GQA models.
        dense_layers: the first ``dense_layers`` layers keep dense decode
            attention (default 0: SparQ is applied to every layer, as in the paper).
        max_cache_len, chunk_size: see :class:`~kvsparse.methods.base.MethodConfig`.
        dense_below: a decode step over at most this many cached tokens runs
            dense attention (one SDPA call; see :class:`~kvsparse.config.QuestConfig`).
            Default 2048: below it, SparQ's extra launches cost more than the
            bytes it saves (H200, 1k tokens: 0.85x of dense without it). Unlike
            Quest below its budget, SparQ's result differs from dense there:
            pass ``dense_below=0`` to measure the method at short lengths (the
            evaluation does).
    """

    method = "sparq"

    compression: Optional[float] = None
    r: Optional[int] = None
    k: Optional[int] = None
    local_window: int = 0
    mode: str = "group"
    reallocate: bool = True
    dense_below: int = 2048

    def validate(self):
        super().validate()
        check_int("dense_below", self.dense_below, 0)
        explicit = self.r is not None or self.k is not None
        if explicit:
            if self.r is None or self.k is None:
                raise ValueError("kvsparse: give both r and k (or neither, and a compression)")
            check_int("r", self.r, 1)
            check_int("k", self.k, 1)
            if self.compression is not None:
                raise ValueError("kvsparse: give either compression or r and k, not both")
        else:
            c = 0.125 if self.compression is None else self.compression
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not (0.0 < float(c) <= 1.0):
                raise ValueError(f"kvsparse: compression must be a number in (0, 1], got {c!r}")
            self.compression = float(c)
        check_int("local_window", self.local_window, 0)
        if not isinstance(self.mode, str) or self.mode not in ("group", "head"):
            raise ValueError(f"kvsparse: mode must be 'group' or 'head', got {self.mode!r}")
        if not isinstance(self.reallocate, bool):
            raise ValueError(f"kvsparse: reallocate must be a bool, got {self.reallocate!r}")

    def dense_length(self):
        """Decode steps over at most this many tokens run dense attention."""
        return self.dense_below

    def r_k(self, head_dim, seq_len):
        """``(r, k)`` for a step over ``seq_len`` cached tokens of head dim ``head_dim``."""
        if self.compression is None:
            r, k = self.r, self.k
        else:
            r, k = ops.choose_r_k(head_dim, max(int(seq_len), 1), self.compression)
        if r > head_dim:
            raise ValueError(f"kvsparse: r ({r}) must be <= the head dim ({head_dim})")
        return r, max(1, min(k, max(int(seq_len), 1)))


class SparQKeys(Part):
    """SparQ's side index beside the dense keys and values: ``kt``
    ``[B, Hkv, D, capacity]``, a channel-major copy of the keys (the new
    tokens' columns written in place), and ``v_mean`` float32 ``[B, Hkv, D]``,
    the running mean of the valid values (updated from the new tokens only,
    never recomputed from the cache)."""

    names = ("kt", "v_mean")

    def allocate(self, layer, capacity):
        B, H, D = layer.batch_size, layer.num_heads, layer.head_dim
        kt = torch.zeros((B, H, D, capacity), dtype=layer.dtype, device=layer.device)
        if self.kt is not None:
            kt[..., : self.kt.shape[-1]].copy_(self.kt)
        self.kt = kt
        if self.v_mean is None:
            self.v_mean = torch.zeros((B, H, D), dtype=torch.float32, device=layer.device)

    def append_one(self, layer, key_states, value_states, pos, new_lens):
        B, H, _, D = key_states.shape
        col = key_states.detach().to(layer.dtype)
        if is_compiling():
            # column pos[b] of every [D, capacity] slab, as an index_put_ that
            # the compiled step keeps in place (see DenseKV.append_one)
            b, h, p = slot_rows(layer, pos)
            d = torch.arange(D, device=layer.device).view(1, 1, D)
            self.kt.index_put_((b.view(B, 1, 1), h.view(1, H, 1), d, p.view(B, 1, 1)), col[:, :, 0])
        else:  # eager: a scatter_ is in place and one light kernel
            self.kt.scatter_(3, pos.view(B, 1, 1, 1).expand(B, H, D, 1), col.transpose(2, 3))
        # running mean over the valid tokens: m += (v - m) / n; a sequence whose
        # length did not grow (a full static cache) keeps its mean
        grown = (new_lens > layer.seq_lens).view(B, 1, 1)
        n = new_lens.clamp(min=1).to(torch.float32).view(B, 1, 1)
        upd = (value_states.detach()[:, :, 0].float() - self.v_mean) / n
        self.v_mean.add_(torch.where(grown, upd, torch.zeros_like(upd)))

    def commit(self, layer, start, new_lens, k, v, counts, seen):
        B, H, L, D = k.shape
        pos = (start.to(torch.int64).view(B, 1) + torch.arange(L, device=layer.device)).clamp(max=layer.capacity - 1)
        valid = torch.arange(L, device=layer.device).view(1, L) < counts.view(B, 1)  # [B, L]
        # columns past counts[b] would land on slots beyond seq_lens (or be
        # clamped onto the last slot): write only the valid ones
        cur = self.kt.gather(3, pos.view(B, 1, 1, L).expand(B, H, D, L))
        newc = torch.where(valid.view(B, 1, 1, L), k.transpose(2, 3), cur)
        self.kt.scatter_(3, pos.view(B, 1, 1, L).expand(B, H, D, L), newc)
        vsum = (v.float() * valid.view(B, 1, L, 1)).sum(dim=2)  # [B, H, D]
        n = new_lens.clamp(min=1).to(torch.float32).view(B, 1, 1)
        self.v_mean.mul_(start.to(torch.float32).view(B, 1, 1)).add_(vsum).div_(n)
        self.v_mean.mul_((new_lens > 0).view(B, 1, 1))


class SparQ(Method):
    """SparQ: each decode step scores the positions with the ``r`` largest
    query channels and attends exactly to the best ``k``."""

    name = "sparq"
    title = "SparQ"
    config_class = SparQConfig
    sweep_kwarg = "compression"
    sweep_values = "compressions"
    no_sweep_kwargs = ("r", "k")
    cache_kwargs = ("chunk_size", "max_cache_len")
    # the evaluation measures the method at every length (the default
    # dense_below runs short contexts densely)
    eval_patch_defaults = {"dense_below": 0}

    @staticmethod
    def nominal_ratio(run, length):
        return 1.0 - float(run.kwargs.get("compression", 1.0))

    def check_model(self, config, head_dim):
        if config.r is not None and config.r > head_dim:
            raise ValueError(f"kvsparse: r ({config.r}) must be <= the model's head dim ({head_dim})")

    def lossless_kwargs(self, head_dim, length):
        return dict(r=int(head_dim), k=int(length), reallocate=False, dense_below=0)

    def side_index(self, config):
        return SparQKeys()

    def decode(self, q, layer, config, dense, scaling):
        D = q.shape[-1]
        if dense:  # every position, no reallocation: exact attention
            r, k_top, realloc = D, layer.capacity, False
        else:
            # the step's length: the host token count of a dynamic cache (no sync),
            # the capacity of a static one
            S = layer.capacity if layer.is_compileable else min(layer.tokens_seen(), layer.capacity)
            r, k_top = config.r_k(D, S)
            realloc = config.reallocate
        return ops.attention(
            q, layer.keys, layer.values, layer.side.kt, layer.side.v_mean, layer.seq_lens, r,
            min(k_top, layer.capacity), config.local_window, config.mode, realloc, scaling,
        )


register(SparQ())
