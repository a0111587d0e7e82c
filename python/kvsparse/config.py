"""Configuration objects of the sparse-attention methods.

One validated dataclass per method. Build one directly (``QuestConfig(...)``)
or by name with :func:`make_config` (``make_config("quest", token_budget=512)``).
Every config prints its fields (``repr``) and converts to a plain dict
(:meth:`to_dict`); invalid values raise ``ValueError`` naming the field.
"""
from dataclasses import asdict, dataclass, fields
from typing import Optional

__all__ = ["MethodConfig", "QuestConfig", "SparQConfig", "QAQConfig", "make_config", "supported_methods"]


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
        mode: how the query heads of a GQA group choose pages. One page set
            per KV head (every selected page read once): ``"softmax"``
            (default: each head's page bounds normalised into a distribution,
            then summed), ``"group"`` (summed bounds, the fused kernel),
            ``"max"``, ``"union"`` (round-robin by per-head rank); see
            :func:`kvsparse.quest.combine_scores`. ``"head"``: one page set per
            query head (up to G times the pages read). Measured
            (``benchmarks/results/quest_gqa_modes_cpu.md``): ``"softmax"`` had
            the lowest perplexity on SmolLM2 and Gemma 3 at small budgets and
            costs the same on the H200.
        max_cache_len: ``None``: the KV buffers grow in chunks as needed.
            An int: every buffer is allocated once at this length (static
            shapes and addresses, usable by ``torch.compile`` / CUDA graphs).
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
    max_cache_len: Optional[int] = None
    chunk_size: int = 256
    dense_below: Optional[int] = None

    def validate(self):
        _check_int("page_size", self.page_size, 1)
        if self.dense_below is not None:
            _check_int("dense_below", self.dense_below, 0)
        _check_int("token_budget", self.token_budget)
        if self.token_budget < self.page_size:
            raise ValueError(
                f"kvsparse: token_budget ({self.token_budget}) must be >= page_size ({self.page_size})"
            )
        _check_int("dense_layers", self.dense_layers, 0)
        modes = ("group", "head", "max", "softmax", "union")
        if not isinstance(self.mode, str) or self.mode not in modes:
            raise ValueError(f"kvsparse: mode must be one of {modes}, got {self.mode!r}")
        if self.max_cache_len is not None:
            _check_int("max_cache_len", self.max_cache_len, 1)
        _check_int("chunk_size", self.chunk_size, 1)
        if self.chunk_size % self.page_size != 0:
            raise ValueError(
                f"kvsparse: chunk_size ({self.chunk_size}) must be a multiple of page_size ({self.page_size})"
            )

    def dense_length(self):
        """Decode steps over at most this many tokens run dense attention."""
        if self.dense_below is None:  # the budget Quest really reads: whole pages
            return self.token_budget // self.page_size * self.page_size
        return self.dense_below


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
        dense_below: a decode step over at most this many cached tokens runs
            dense attention (one SDPA call; see :class:`QuestConfig`).
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
    dense_layers: int = 0
    max_cache_len: Optional[int] = None
    chunk_size: int = 256
    dense_below: int = 2048

    def validate(self):
        _check_int("dense_below", self.dense_below, 0)
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

    def dense_length(self):
        """Decode steps over at most this many tokens run dense attention."""
        return self.dense_below

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


@dataclass(repr=True, eq=True)
class QAQConfig(MethodConfig):
    """QAQ (quality-adaptive quantization): a KV cache stored with per-token
    bit-widths (:mod:`kvsparse.qaq`), decode attention reading the packed codes.

    Every cached token is stored in :class:`kvsparse.qaq.QuantStore` objects (no fp16
    K/V buffers). Prefill: the model's dense attention, then the prompt's tokens
    are quantized, their widths chosen from the prefill's last ``window`` query
    rows. Decode: the new token is appended at the largest allowed width; every
    ``requant_every`` steps the widths are re-evaluated from the paper's bounds
    (:func:`kvsparse.qaq.key_bits` / :func:`kvsparse.qaq.value_bits`) and
    lowered in place (they never rise again).

    Attributes:
        sigma: single knob: ``sigma_v = sigma`` and
            ``sigma_k = KEY_SIGMA_RATIO * sigma`` (0.03) when those are not
            given (default ``DEFAULT_SIGMA = 0.007``, see below).
        sigma_k: allowed std of the attention scores (the paper's sigma_max_S),
            drives the key widths.
        sigma_v: allowed std of the attention output (the paper's
            sigma_max_X), drives the value widths.
        allowed: the widths a token may get (subset of {0, 1, 2, 4, 8}); the
            largest is the width of new tokens.
        alpha: outlier fraction per group (``0`` disables outliers); outliers
            are stored exactly in the cache dtype.
        alpha_v: the values' outlier fraction (default ``alpha``).
        window: ``n``, the decode steps (and prefill query rows) whose attention
            weights give a token's importance ``S_t``.
        n_recent: the newest tokens kept at the largest width.
        shared: ``True``: one width/scale/zero per token shared across the
            layer's KV heads (9 metadata bytes per token instead of 9 per KV
            head); ``False``: per token per KV head.
        dense_layers: the first layers keep every token at the largest
            allowed width (never re-quantized).
        requant_every: widths are re-evaluated every this many decode steps
            (``0``: only after the prefill).
        compact_every: the dynamic cache is re-packed (host side) after this
            many re-quantizations (``0``: never), and whenever its arena is full.
        uniform_bits: ``None``, or a fixed width for every token (the uniform
            2-/4-bit baselines: no re-quantization, ``allowed`` ignored).
        tile_widths: ``1`` (default): per-token widths, as in the paper; ``n``:
            re-quantization gives each aligned tile of ``n`` positions one
            width (the largest of its tokens' bounds,
            :func:`kvsparse.qaq.uniform_tiles`: more bytes, never less
            accurate). Measured on the H200 (``bench_qaq.py``), 16-token tiles
            of one K and one V width did not make the CUDA attention faster
            than per-token widths (0.105 vs 0.101 ms at B = 1, H_kv = 8, 32k):
            its cost is per-tile bookkeeping, not the width switch; and on
            SmolLM2 the tiles raise the mean widths from 5.88 / 2.44 bits
            (keys / values) to 7.24 / 4.28
            (``benchmarks/results/qaq_widths_smollm2_tiles16_cpu.md``).
        cache_dtype: ``None``: the model's dtype, but float16 for a float32
            model (outliers and scales are 16-bit on every device); or
            ``"float16"``, ``"bfloat16"``, ``"float32"``.
        max_cache_len, chunk_size: as in :class:`QuestConfig` (a static QAQ
            cache keeps fixed 8-bit slots: its arena does not shrink, its
            memory report still counts the bytes in use).

    Defaults (measured in ``benchmarks/results/quality_qaq_cpu.md``: SmolLM2-135M,
    CPU, decode-mode perplexity of the last 512 of 2048 tokens, dense 33.71):

    * ``allowed=(2, 4, 8)``: widths 0 and 1 cannot be undone once a token
      becomes important again (widths only fall); with them, ``sigma=0.01``
      gives 38.2 (+13%) at 4.0x, without them 34.4 (+2.1%) at 3.3x.
    * ``sigma=0.007`` (``DEFAULT_SIGMA``; ``sigma_k = 0.03 * sigma``, since
      the key bound needs a ~30x smaller target than the value bound for the
      same quality: keys at 2 bits were the worst error) with ``alpha=0.02``:
      33.95 (+0.7%) at 2.99x measured compression, the best compression
      found within 1% of dense (uniform 4-bit: +1.7% at 2.80x; ``sigma=0.01``,
      ``alpha=0.04``: +2.1% at 3.3x).
    * ``alpha=0.02`` (4 outliers per shared group of 192): this model's keys
      and values have outlier channels; without outliers uniform 4-bit gives
      40.2 (+19%) instead of 34.3 (``alpha=0.04``), which costs 16 more bytes per
      token and store than 0.02 for no measured gain; ``alpha=0.01`` is slightly worse
      (34.11 at 2.82x with ``sigma=0.007``).
    * ``shared=True``: per-KV-head groups cost 9 metadata bytes (plus
      outliers) per head instead of per token.
    * ``window=5``, ``requant_every=5`` (the paper's ``n``): ``window=1``
      was clearly worse (45.1 vs 38.2 at ``sigma=0.01``, 39.3 vs 35.7 at
      ``sigma=0.003`` with ``allowed`` {0..8}).

    The goal of >= 8x within 1% of dense is not reached on this model: per
    token and store (keys or values, 3 KV heads x 64 = 384 fp16 bytes), the
    metadata alone is 25 bytes (offset 4, width 1, scale/zero 4, 4 outliers
    x (2 + 2)), and keys need 4-8 bits (96-192 code bytes): at 8x the whole
    token would have 48 bytes.
    """

    method = "qaq"

    sigma: Optional[float] = None
    sigma_k: Optional[float] = None
    sigma_v: Optional[float] = None
    allowed: tuple = (2, 4, 8)
    alpha: float = 0.02
    alpha_v: Optional[float] = None
    window: int = 5
    n_recent: int = 5
    shared: bool = True
    dense_layers: int = 0
    requant_every: int = 5
    compact_every: int = 8
    uniform_bits: Optional[int] = None
    tile_widths: int = 1
    cache_dtype: Optional[str] = None
    max_cache_len: Optional[int] = None
    chunk_size: int = 256

    def validate(self):
        def _pos(name, v):
            if v is None:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (float(v) > 0) or v != v:
                raise ValueError(f"kvsparse: {name} must be a positive number, got {v!r}")

        _pos("sigma", self.sigma)
        _pos("sigma_k", self.sigma_k)
        _pos("sigma_v", self.sigma_v)
        for name in ("sigma", "sigma_k", "sigma_v"):
            if getattr(self, name) is not None:
                setattr(self, name, float(getattr(self, name)))
        try:
            allowed = tuple(sorted({int(w) for w in self.allowed}))
        except (TypeError, ValueError):
            raise ValueError(f"kvsparse: allowed must be a subset of (0, 1, 2, 4, 8), got {self.allowed!r}")
        if not allowed or any(w not in (0, 1, 2, 4, 8) for w in allowed) or max(allowed) == 0 or any(
                isinstance(w, bool) or float(w) != int(w) for w in self.allowed):
            raise ValueError(
                f"kvsparse: allowed must be a subset of (0, 1, 2, 4, 8) with a nonzero width, got {self.allowed!r}")
        self.allowed = allowed
        for name in ("alpha", "alpha_v"):
            a = getattr(self, name)
            if a is None and name == "alpha_v":
                continue
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0.0 <= float(a) < 0.5):
                raise ValueError(f"kvsparse: {name} must be a number in [0, 0.5), got {a!r}")
            setattr(self, name, float(a))
        _check_int("window", self.window, 1)
        _check_int("n_recent", self.n_recent, 0)
        if not isinstance(self.shared, bool):
            raise ValueError(f"kvsparse: shared must be a bool, got {self.shared!r}")
        _check_int("dense_layers", self.dense_layers, 0)
        _check_int("requant_every", self.requant_every, 0)
        _check_int("compact_every", self.compact_every, 0)
        _check_int("tile_widths", self.tile_widths, 1)
        if self.uniform_bits is not None:
            if isinstance(self.uniform_bits, bool) or self.uniform_bits not in (1, 2, 4, 8):
                raise ValueError(f"kvsparse: uniform_bits must be None or one of 1, 2, 4, 8, got {self.uniform_bits!r}")
        if self.cache_dtype is not None and self.cache_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(
                f"kvsparse: cache_dtype must be None, 'float16', 'bfloat16' or 'float32', got {self.cache_dtype!r}")
        if self.max_cache_len is not None:
            _check_int("max_cache_len", self.max_cache_len, 1)
        _check_int("chunk_size", self.chunk_size, 1)

    #: the single knob's default
    DEFAULT_SIGMA = 0.007
    #: sigma_k = KEY_SIGMA_RATIO * sigma when only ``sigma`` is given
    KEY_SIGMA_RATIO = 0.03

    @property
    def key_sigma(self):
        """sigma_k in use: ``sigma_k``, else ``KEY_SIGMA_RATIO * sigma``."""
        if self.sigma_k is not None:
            return self.sigma_k
        return self.KEY_SIGMA_RATIO * (self.sigma if self.sigma is not None else self.DEFAULT_SIGMA)

    @property
    def value_sigma(self):
        """sigma_v in use: ``sigma_v``, else ``sigma``."""
        if self.sigma_v is not None:
            return self.sigma_v
        return self.sigma if self.sigma is not None else self.DEFAULT_SIGMA

    @property
    def value_alpha(self):
        """Outlier fraction of the values: ``alpha_v``, else ``alpha``."""
        return self.alpha if self.alpha_v is None else self.alpha_v

    @property
    def max_width(self):
        """Width of newly stored tokens."""
        return self.uniform_bits if self.uniform_bits is not None else max(self.allowed)

    @property
    def adaptive(self):
        """Whether widths are ever lowered (not a uniform baseline)."""
        return self.uniform_bits is None and len(self.allowed) > 1

    def store_dtype(self, model_dtype):
        """The dtype of the quantized stores for a model of ``model_dtype``."""
        import torch

        if self.cache_dtype is not None:
            return getattr(torch, self.cache_dtype)
        return torch.float16 if model_dtype == torch.float32 else model_dtype


_METHODS = {"quest": QuestConfig, "sparq": SparQConfig, "qaq": QAQConfig}
# Methods planned but not implemented yet; named in error messages.
_PLANNED = ()


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
