"""SparQ (sparse-query attention): its config, decode step and registry entry.

The ops are :mod:`kvsparse.sparq`.
"""
from dataclasses import dataclass
from typing import Optional

from .. import sparq as ops
from .base import Method, MethodConfig, check_int, register

__all__ = ["SparQConfig", "SparQ"]


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

    def check_model(self, config, head_dim):
        if config.r is not None and config.r > head_dim:
            raise ValueError(f"kvsparse: r ({config.r}) must be <= the model's head dim ({head_dim})")

    def lossless_kwargs(self, head_dim, length):
        return dict(r=int(head_dim), k=int(length), reallocate=False, dense_below=0)

    def cache_class(self):
        from ..cache import SparQCache

        return SparQCache

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
            q, layer.keys, layer.values, layer.kt, layer.v_mean, layer.seq_lens, r,
            min(k_top, layer.capacity), config.local_window, config.mode, realloc, scaling,
        )


register(SparQ())
