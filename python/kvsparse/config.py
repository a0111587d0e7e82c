"""Configuration objects of the sparse-attention methods.

One validated dataclass per method. Build one directly (``QuestConfig(...)``)
or by name with :func:`make_config` (``make_config("quest", token_budget=512)``).
Every config prints its fields (``repr``) and converts to a plain dict
(:meth:`to_dict`); invalid values raise ``ValueError`` naming the field.
"""
from dataclasses import asdict, dataclass, fields
from typing import Optional

__all__ = ["MethodConfig", "QuestConfig", "SparQConfig", "make_config", "supported_methods"]


def _check_int(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"kvsparse: {name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"kvsparse: {name} must be >= {minimum}, got {value}")


class MethodConfig:
    """Common behaviour of the method configs (subclasses are dataclasses)."""

    #: method name used by :func:`make_config` and ``kvsparse.patch(method=...)``
    method = None

    def to_dict(self):
        """The fields as a plain dict, plus ``"method"``."""
        return {"method": self.method, **asdict(self)}

    def replace(self, **changes):
        """A validated copy with some fields changed."""
        return type(self)(**{**asdict(self), **changes})

    def validate(self):  # pragma: no cover - overridden
        pass

    def __post_init__(self):
        self.validate()


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
        mode: ``"group"``: one page set per KV head (shared by the query
            heads of a GQA group); ``"head"``: one page set per query head.
        max_cache_len: ``None``: the KV buffers grow in chunks as needed.
            An int: every buffer is allocated once at this length (static
            shapes and addresses, usable by ``torch.compile`` / CUDA graphs).
        chunk_size: growth granularity of the dynamic buffers, in tokens
            (a multiple of ``page_size``).
    """

    method = "quest"

    token_budget: int = 1024
    page_size: int = 16
    dense_layers: int = 2
    mode: str = "group"
    max_cache_len: Optional[int] = None
    chunk_size: int = 256

    def validate(self):
        _check_int("page_size", self.page_size, 1)
        _check_int("token_budget", self.token_budget)
        if self.token_budget < self.page_size:
            raise ValueError(
                f"kvsparse: token_budget ({self.token_budget}) must be >= page_size ({self.page_size})"
            )
        _check_int("dense_layers", self.dense_layers, 0)
        if not isinstance(self.mode, str) or self.mode not in ("group", "head"):
            raise ValueError(f"kvsparse: mode must be 'group' or 'head', got {self.mode!r}")
        if self.max_cache_len is not None:
            _check_int("max_cache_len", self.max_cache_len, 1)
        _check_int("chunk_size", self.chunk_size, 1)
        if self.chunk_size % self.page_size != 0:
            raise ValueError(
                f"kvsparse: chunk_size ({self.chunk_size}) must be a multiple of page_size ({self.page_size})"
            )


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
        max_cache_len, chunk_size: as in :class:`QuestConfig`.
    """

    method = "sparq"

    compression: Optional[float] = None
    r: Optional[int] = None
    k: Optional[int] = None
    local_window: int = 0
    mode: str = "group"
    reallocate: bool = True
    dense_layers: int = 0
    max_cache_len: Optional[int] = None
    chunk_size: int = 256

    def validate(self):
        explicit = self.r is not None or self.k is not None
        if explicit:
            if self.r is None or self.k is None:
                raise ValueError("kvsparse: give both r and k (or neither, and a compression)")
            _check_int("r", self.r, 1)
            _check_int("k", self.k, 1)
            if self.compression is not None:
                raise ValueError("kvsparse: give either compression or r and k, not both")
        else:
            c = 0.125 if self.compression is None else self.compression
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not (0.0 < float(c) <= 1.0):
                raise ValueError(f"kvsparse: compression must be a number in (0, 1], got {c!r}")
            self.compression = float(c)
        _check_int("local_window", self.local_window, 0)
        if not isinstance(self.mode, str) or self.mode not in ("group", "head"):
            raise ValueError(f"kvsparse: mode must be 'group' or 'head', got {self.mode!r}")
        if not isinstance(self.reallocate, bool):
            raise ValueError(f"kvsparse: reallocate must be a bool, got {self.reallocate!r}")
        _check_int("dense_layers", self.dense_layers, 0)
        if self.max_cache_len is not None:
            _check_int("max_cache_len", self.max_cache_len, 1)
        _check_int("chunk_size", self.chunk_size, 1)

    def r_k(self, head_dim, seq_len):
        """``(r, k)`` for a step over ``seq_len`` cached tokens of head dim ``head_dim``."""
        if self.compression is None:
            r, k = self.r, self.k
        else:
            from .sparq import choose_r_k

            r, k = choose_r_k(head_dim, max(int(seq_len), 1), self.compression)
        if r > head_dim:
            raise ValueError(f"kvsparse: r ({r}) must be <= the head dim ({head_dim})")
        return r, max(1, min(k, max(int(seq_len), 1)))


_METHODS = {"quest": QuestConfig, "sparq": SparQConfig}
# Methods planned but not implemented yet; named in error messages.
_PLANNED = ("qaq",)


def supported_methods():
    """Names accepted by :func:`make_config`."""
    return tuple(_METHODS)


def make_config(method="quest", **kwargs):
    """Build the config of ``method`` from keyword arguments.

    ``method`` may also be a config object already (returned as is, or a
    validated copy with ``kwargs`` applied).

    Raises:
        ValueError: unknown method, unknown field or invalid value.
    """
    if isinstance(method, MethodConfig):
        return method.replace(**kwargs) if kwargs else method
    if not isinstance(method, str) or method.lower() not in _METHODS:
        planned = [m for m in _PLANNED if m not in _METHODS]
        hint = f" ({', '.join(planned)} are planned but not implemented yet)" if planned else ""
        raise ValueError(
            f"kvsparse: unknown method {method!r}; supported: {', '.join(sorted(_METHODS))}{hint}"
        )
    cls = _METHODS[method.lower()]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ValueError(
            f"kvsparse: unknown option(s) {', '.join(unknown)} for method {cls.method!r}; "
            f"valid: {', '.join(sorted(names))}"
        )
    return cls(**kwargs)
