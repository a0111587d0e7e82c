"""QAQ (quality-adaptive quantization): its config, quantized storage, decode step, prefill hooks and registry entry.

The ops are :mod:`kvsparse.qaq`.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .. import qaq
from ..parts import Part, copy_row
from .base import Method, MethodConfig, check_int, register
from .qaq_pages import BinnedQuantKV, _REPORT_KEYS, _empty_report, _finish_report, _put_tokens

__all__ = ["QAQConfig", "QuantKV", "QAQ"]


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
        layout: ``"offsets"`` (default): per-token code offsets and widths,
            re-quantized in place during decoding (the storage below,
            :class:`QuantKV`); ``"pages"``: width-binned 64-token pages of one
            (key width, value width) class each (:mod:`kvsparse.qaqp`,
            :class:`~kvsparse.methods.qaq_pages.BinnedQuantKV`): widths settled
            once when a token is stored (a prompt token at its bounds' widths
            after its prefill chunk, a decode token at the largest width; no
            re-quantization), per-head groups (``shared`` ignored), and a
            decode kernel with no per-token offset or width.
        key_channel_scale: ``None`` (default), or ``"absmax"`` / ``"sqrt"``
            (``layout="pages"`` only): a per-(sequence, KV head, channel)
            key scale ``s`` taken from the first stored chunk's keys (the
            channel's largest ``|k|``, or its square root), normalized to
            RMS 1 over the channels; keys are stored as ``k / s``
            (quantized per token as without it) and the query is multiplied
            by ``s`` (QAQ's key bound sees that query and those keys).
            Costs ``D`` scale values per (sequence, layer, KV head). Use it in
            place of the key outliers (``"sqrt"``, ``alpha=0``,
            ``alpha_v=0.02``): SmolLM2 at 2k, sigma 0.01, 38.79 (+0.7%) at
            2.64x against 39.55 at 2.46x by default; beside the outliers it
            did not help (``benchmarks/NOTES_qaq_format.md``).
        page_requant: ``False`` (default), or ``True`` (``layout="pages"``,
            dynamic caches only): re-quantize during decoding as the offsets
            layout does. Every ``requant_every`` decode steps the widths of
            the stored tokens are re-evaluated (keys from the largest
            ``|q|^2`` since the last re-quantization, values from each
            token's largest attention weight over those steps) and a token
            whose class falls moves to a page of its new class
            (:func:`kvsparse.qaqp.requantize`: dequantized and quantized
            again, at most 1024 tokens per sequence, KV head and call); the
            holes are reclaimed by a compaction (:func:`kvsparse.qaqp.compact`,
            host side) every ``compact_every`` re-quantizations. Off by
            default until it is measured on the GPU.
        cache_dtype: ``None``: the model's dtype, but float16 for a float32
            model (outliers and scales are 16-bit on every device); or
            ``"float16"``, ``"bfloat16"``, ``"float32"``.
        max_cache_len, chunk_size: see :class:`~kvsparse.methods.base.MethodConfig` (a static QAQ
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
    requant_every: int = 5
    compact_every: int = 8
    uniform_bits: Optional[int] = None
    tile_widths: int = 1
    cache_dtype: Optional[str] = None
    layout: str = "offsets"
    key_channel_scale: Optional[str] = None
    page_requant: bool = False

    def validate(self):
        super().validate()

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
        check_int("window", self.window, 1)
        check_int("n_recent", self.n_recent, 0)
        if not isinstance(self.shared, bool):
            raise ValueError(f"kvsparse: shared must be a bool, got {self.shared!r}")
        check_int("requant_every", self.requant_every, 0)
        check_int("compact_every", self.compact_every, 0)
        check_int("tile_widths", self.tile_widths, 1)
        if self.uniform_bits is not None:
            if isinstance(self.uniform_bits, bool) or self.uniform_bits not in (1, 2, 4, 8):
                raise ValueError(f"kvsparse: uniform_bits must be None or one of 1, 2, 4, 8, got {self.uniform_bits!r}")
        if self.layout not in ("offsets", "pages"):
            raise ValueError(f"kvsparse: layout must be 'offsets' or 'pages', got {self.layout!r}")
        if self.key_channel_scale not in (None, "absmax", "sqrt"):
            raise ValueError(
                f"kvsparse: key_channel_scale must be None, 'absmax' or 'sqrt', got {self.key_channel_scale!r}")
        if not isinstance(self.page_requant, bool):
            raise TypeError(f"kvsparse: page_requant must be a bool, got {type(self.page_requant).__name__}")
        if self.page_requant and self.layout != "pages":
            raise ValueError("kvsparse: page_requant needs layout='pages' (the offsets layout re-quantizes in "
                             f"place already), got layout={self.layout!r}")
        if self.key_channel_scale is not None and self.layout != "pages":
            raise ValueError("kvsparse: key_channel_scale needs layout='pages' (the offsets layout has no channel "
                             f"scale), got layout={self.layout!r}")
        if self.cache_dtype is not None and self.cache_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(
                f"kvsparse: cache_dtype must be None, 'float16', 'bfloat16' or 'float32', got {self.cache_dtype!r}")

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
        if self.cache_dtype is not None:
            return getattr(torch, self.cache_dtype)
        return torch.float16 if model_dtype == torch.float32 else model_dtype


class QuantKV(Part):
    r"""QAQ's storage: keys and values live in two :class:`kvsparse.qaq.QuantStore`\ s
    (``ks`` / ``vs``), per-token bit-widths; there are no ``keys`` / ``values``
    buffers.

    * Prefill (:meth:`commit`): the new tokens (compacted as in the other
      methods) are quantized at the largest width; :meth:`prefill_importance`
      then feeds the last ``window`` query rows' attention weights to the
      window and re-quantizes. A prefill continuing the cache (a later chunk)
      attends to the dequantized past and to its own tokens exactly
      (:meth:`dequantized`).
    * Decode: :meth:`append_one` quantizes the new token at the largest width
      at slot ``seq_lens[b]``; :meth:`decode_attention` runs
      :func:`kvsparse.qaq.attention` on the packed codes (no host
      synchronisation) and keeps ``p_max`` in a :class:`kvsparse.qaq.AttentionWindow`;
      every ``requant_every`` steps the widths are recomputed
      (:func:`kvsparse.qaq.key_bits` with the largest ``|q|^2`` since the last
      re-quantization, :func:`kvsparse.qaq.value_bits` with the window's
      ``S_t``) and lowered in place (:func:`kvsparse.qaq.requantize`): a host
      counter in a dynamic layer; in a static one (compileable, no host
      state) a device counter, the widths evaluated every step and applied
      every ``requant_every``.
    * Layout: a dynamic layer (``packed``) packs the groups' codes back to
      back (new tokens at the end of the sequence's used bytes, ``used_k`` /
      ``used_v``); lowering a width leaves a hole that :meth:`compact` removes
      (host side, synchronises: after the prefill's re-quantization, every
      ``compact_every`` re-quantizations and when the arena is full). A static
      layer keeps fixed slots of the largest width (never moves, never
      synchronises): lowered widths cut the bytes attention reads, the memory
      held is that of an 8-bit cache plus metadata.

    :meth:`memory_report` counts the bytes in use (codes of the valid tokens,
    scales/zeros, widths, offsets, outliers) against an fp16 cache.
    """

    #: no dense buffers
    keys = values = None

    def __init__(self, config, layer_idx, packed):
        super().__init__()
        self.config = config
        self.layer_idx = int(layer_idx)
        self.packed = bool(packed)
        self.ks = self.vs = None
        self.window = None
        self.q_sq = None
        self.used_k = self.used_v = None
        self._bound = {"ks": 0, "vs": 0}
        self._steps = 0
        self._dsteps = None  # the static layer's step counter (a device tensor)
        self._requants = 0
        #: the last commit's exact (compacted) tokens, ``(start, k, v, counts)``,
        #: until its attention read them (:meth:`dequantized`) or
        #: :meth:`prefill_importance` ran: a prefill chunk attends to itself exactly
        self._fresh = None
        #: number of compactions, for tests and diagnostics
        self.num_compactions = 0

    def store_dtype(self, model_dtype):
        return self.config.store_dtype(model_dtype)

    # ------------------------------------------------------------ geometry
    @property
    def adaptive(self):
        """Whether this layer's widths are ever lowered."""
        return self.config.adaptive and self.layer_idx >= self.config.dense_layers

    @property
    def width(self):
        """Width of newly stored tokens."""
        return self.config.max_width

    @property
    def groups(self):
        return 1 if self.config.shared else self.num_heads

    @property
    def group_elems(self):
        return self.head_dim * self.num_heads // self.groups

    def _token_bytes(self):
        """Code bytes of one token (all its groups) at the largest width."""
        return self.groups * self.group_elems * self.width // 8

    def init(self, layer):
        self.num_heads, self.head_dim = layer.num_heads, layer.head_dim
        B = layer.batch_size
        self.used_k = torch.zeros(B, dtype=torch.int64, device=layer.device)
        self.used_v = torch.zeros(B, dtype=torch.int64, device=layer.device)
        self.q_sq = torch.zeros(B, self.groups, dtype=torch.float32, device=layer.device)
        self._dsteps = torch.zeros((), dtype=torch.int64, device=layer.device)

    def _new_store(self, layer, name, capacity, arena_bytes):
        alpha = self.config.alpha if name == "ks" else self.config.value_alpha
        return qaq.alloc(layer.batch_size, self.num_heads, capacity, self.head_dim, layer.dtype, layer.device,
                         alpha=alpha, shared=self.config.shared, arena_bytes=max(int(arena_bytes), 1))

    def allocate(self, layer, capacity):
        """(Re)allocate the per-token tensors at ``capacity`` tokens, keeping the content."""
        old = layer.capacity
        names = ("offsets", "widths", "sz", "oidx", "oval")
        for name in ("ks", "vs"):
            st = getattr(self, name)
            if self.packed:
                arena_bytes = capacity * self._token_bytes() if st is None else st.arena.shape[1]
            else:  # fixed slots of the largest width
                arena_bytes = capacity * self._token_bytes()
            new = self._new_store(layer, name, capacity, arena_bytes)
            if not self.packed:
                new.offsets.copy_(qaq.slot_offsets(new, self.width))
            if st is not None:
                for n in names:
                    getattr(new, n)[:, :, :old].copy_(getattr(st, n))
                new = new._replace(arena=st.arena) if self.packed else new
                if not self.packed:
                    new.arena[:, : st.arena.shape[1]].copy_(st.arena)
            setattr(self, name, new)
        self.window = self._new_window(layer, capacity)

    def _new_window(self, layer, capacity):
        """The importance window at ``capacity`` tokens, keeping the steps it holds."""
        if self.window is not None:
            return self.window.resized(capacity)
        return qaq.AttentionWindow(layer.batch_size, self.num_heads, capacity, n=self.config.window,
                                   device=layer.device)

    def tensors(self):
        """Every tensor a decode step reads or writes in place (static addresses)."""
        out = [self.q_sq, self._dsteps, self.used_k, self.used_v]
        for st in (self.ks, self.vs):
            if st is not None:
                out.extend(st.tensors())
        if self.window is not None:
            out.extend(self.window.tensors())
        return out

    # ---------------------------------------------------------- packed arena
    def _ensure_arena(self, layer, extra):
        """Room for ``extra`` more code bytes per sequence in both arenas (host
        bound, no synchronisation unless a compaction is needed)."""
        if not self.packed:
            return
        for name in ("ks", "vs"):
            st = getattr(self, name)
            if self._bound[name] + extra <= st.arena.shape[1]:
                continue
            if self._requants > 0:
                self.compact(layer)
                st = getattr(self, name)
                if self._bound[name] + extra <= st.arena.shape[1]:
                    continue
            need = self._bound[name] + extra
            A = max(2 * st.arena.shape[1], need + layer.chunk_size * self._token_bytes())
            arena = torch.zeros(layer.batch_size, A, dtype=torch.uint8, device=layer.device)
            arena[:, : st.arena.shape[1]].copy_(st.arena)
            setattr(self, name, st._replace(arena=arena))

    def _packed_offsets(self, layer, used, n, counts=None):
        """int32 ``[B, Hg, n]`` offsets for ``n`` new tokens per sequence placed
        after ``used`` bytes (token-major, then group); advances ``used`` by the
        bytes of the ``counts`` valid ones (default all ``n``)."""
        B, Hg = layer.batch_size, self.groups
        per = self.group_elems * self.width // 8
        i = torch.arange(n, device=layer.device).view(1, 1, n)
        g = torch.arange(Hg, device=layer.device).view(1, Hg, 1)
        offs = used.view(B, 1, 1) + (i * Hg + g) * per
        used.add_((n if counts is None else counts.to(torch.int64)) * Hg * per)
        return offs.to(torch.int32)

    def compact(self, layer):
        """Re-pack both stores back to back (:func:`kvsparse.qaq.compact`),
        leaving ``chunk_size`` tokens of headroom; host side (synchronises).
        No-op on a static layer."""
        if not self.packed or self.ks is None:
            return
        for name, used in (("ks", self.used_k), ("vs", self.used_v)):
            c = qaq.compact(getattr(self, name), layer.seq_lens)
            _, nbytes = qaq.packed_offsets(c.widths, c.group_elems)
            bound = int(nbytes.max()) if nbytes.numel() else 0
            arena = torch.zeros(layer.batch_size, bound + layer.chunk_size * self._token_bytes(),
                                dtype=torch.uint8, device=layer.device)
            n = min(bound, c.arena.shape[1])
            arena[:, :n].copy_(c.arena[:, :n])
            setattr(self, name, c._replace(arena=arena))
            used.copy_(nbytes)
            self._bound[name] = bound
        self._requants = 0
        self.num_compactions += 1

    # ---------------------------------------------------------------- writes
    def _quantize(self, layer, k, v, pos, widths, counts=None):
        n = k.shape[2]
        if self.packed:
            self._ensure_arena(layer, n * self._token_bytes())
            ok = self._packed_offsets(layer, self.used_k, n, counts)
            ov = self._packed_offsets(layer, self.used_v, n, counts)
            for name in ("ks", "vs"):
                self._bound[name] += n * self._token_bytes()
        else:
            ok = ov = None
        qaq.quantize(self.ks, k.contiguous(), pos.to(torch.int32), widths, ok)
        qaq.quantize(self.vs, v.contiguous(), pos.to(torch.int32), widths, ov)

    def append_one(self, layer, key_states, value_states, pos, new_lens):
        """Decode: quantize one token per sequence at slot ``pos``."""
        k = key_states.detach().to(layer.dtype)
        v = value_states.detach().to(layer.dtype)
        self._quantize(layer, k, v, pos, self.width)
        return key_states, value_states

    def commit(self, layer, start, new_lens, k, v, counts, seen):
        """Quantize at the largest width (padding slots get width 0 and no code bytes)."""
        B, H, L, D = k.shape
        ok = torch.arange(L, device=layer.device).view(1, L) < counts.view(B, 1)
        widths = torch.where(ok, self.width, 0).to(torch.uint8).view(B, 1, L).expand(B, self.groups, L)
        self._quantize(layer, k, v, start, widths.contiguous(), counts)
        self._fresh = (start, k, v, counts)

    def dequantized(self, layer, length=None):
        """``(keys, values)`` ``[B, Hkv, length, D]`` in the model's dtype,
        dequantized (zeros past ``seq_lens``); for a prefill continuing the
        cache: the tokens of the commit just made are its exact keys and values
        (in the cache dtype), not their codes, so that a chunk attends to the
        quantized earlier chunks and to itself exactly. One layer's past at a
        time (the caller's attention drops it)."""
        T = layer.capacity if length is None else min(int(length), layer.capacity)
        fresh, self._fresh = self._fresh, None
        out = []
        for i, st in enumerate((self.ks, self.vs)):
            x = qaq.dequantize(st, layer.seq_lens)[:, :, :T]
            if fresh is not None:
                x = _put_tokens(x, fresh[0], fresh[1 + i], fresh[3])
            out.append(x.to(layer.model_dtype))
        return tuple(out)

    # ------------------------------------------------------------ importance
    @torch.no_grad()
    def prefill_importance(self, layer, query, start, valid, seen, scaling):
        """After a committed prefill: the attention weights of the last
        ``window`` query rows (over the stored tokens, causal, padding
        excluded) go to the window, ``|q|^2`` of the last row to the key bound,
        and the widths are re-evaluated (then the dynamic cache is compacted)."""
        self._fresh = None  # the prefill's attention is done: drop its exact tokens
        if not self.adaptive:
            return
        B, H, L, D = query.shape
        Hkv, Hg = self.num_heads, self.groups
        n = min(self.config.window, L)
        T = min(seen + L, layer.capacity)
        keys = qaq.dequantize(self.ks, layer.seq_lens)[:, :, :T].float()  # [B, Hkv, T, D]
        qn = query[:, :, L - n:].detach().float()  # [B, H, n, D]
        G = H // Hkv
        s = torch.matmul(qn.reshape(B, Hkv, G * n, D), keys.transpose(-1, -2)).view(B, Hkv, G, n, T) * scaling
        if valid is None:
            upto = torch.arange(1, L + 1, device=layer.device, dtype=torch.int32).expand(B, L)
        else:
            upto = valid.to(device=layer.device, dtype=torch.int32).cumsum(dim=1, dtype=torch.int32)
        limit = (start.view(B, 1) + upto[:, L - n:]).clamp(min=1)  # [B, n]
        vis = torch.arange(T, device=layer.device).view(1, 1, T) < limit.view(B, n, 1)
        s = s.masked_fill(~vis.view(B, 1, 1, n, T), float("-inf"))
        p = torch.softmax(s, dim=-1).amax(dim=2)  # [B, Hkv, n, T]
        row = torch.zeros(B, Hkv, layer.capacity, dtype=torch.float32, device=layer.device)
        for j in range(n):
            row[..., :T].copy_(p[:, :, j])
            self.window.push(row)
        qs = qaq.query_sq(query[:, :, L - 1].detach(), Hg, scaling)
        self.q_sq.copy_(torch.maximum(self.q_sq, qs))  # in place: a static address under CUDA graphs
        self.requantize(layer)
        self.compact(layer)

    def decode_attention(self, layer, q, scaling):
        """One decode step: ``q`` ``[B, H, D]`` -> ``[B, H, D]`` (q's dtype),
        attending the packed cache; feeds the window and re-quantizes every
        ``requant_every`` steps."""
        qd = q.to(layer.dtype).contiguous()
        if not self.adaptive:
            return qaq.attention(qd, self.ks, self.vs, layer.seq_lens, scaling).to(q.dtype)
        out, pm = qaq.attention(qd, self.ks, self.vs, layer.seq_lens, scaling, return_p_max=True)
        self.window.push(pm)
        self._after_decode(layer, q, scaling)
        return out.to(q.dtype)

    def _after_decode(self, layer, q, scaling):
        """After an adaptive decode step fed the window: the key bound's
        ``|q|^2`` and the re-quantization schedule."""
        self.q_sq.copy_(torch.maximum(self.q_sq, qaq.query_sq(q.detach(), self.groups, scaling)))
        if not self.packed:
            # no host counter (a compiled step is replayed as a CUDA graph): the
            # widths are computed every step and applied where the device
            # counter says a re-quantization is due (elsewhere a no-op)
            if self.config.requant_every:
                self._dsteps.add_(1)
                due = self._dsteps >= self.config.requant_every
                self.requantize(layer, due)
                self._dsteps.masked_fill_(due, 0)
            return
        self._steps += 1
        if self.config.requant_every and self._steps >= self.config.requant_every:
            self.requantize(layer)
            if self.config.compact_every and self._requants >= self.config.compact_every:
                self.compact(layer)

    def requantize(self, layer, due=None):
        """Recompute the widths from the bounds and lower them in place (no sync).

        ``due``: ``None``, or a 0-dim bool device tensor: the new widths apply
        (and the ``|q|^2`` bound restarts) only where it is true (the static
        layer's schedule, with no host branch)."""
        cfg, seq_lens = self.config, layer.seq_lens
        kb = qaq.key_bits(qaq.stored_range(self.ks), self.q_sq, seq_lens, cfg.key_sigma, cfg.allowed, cfg.n_recent)
        vb = self._value_bits(layer)
        if cfg.tile_widths > 1:
            kb = qaq.uniform_tiles(kb, seq_lens, cfg.tile_widths)
            vb = qaq.uniform_tiles(vb, seq_lens, cfg.tile_widths)
        if due is not None:
            kb = torch.where(due, kb, self.ks.widths)
            vb = torch.where(due, vb, self.vs.widths)
        qaq.requantize(self.ks, kb, seq_lens)
        qaq.requantize(self.vs, vb, seq_lens)
        if due is not None:
            self.q_sq.masked_fill_(due, 0.0)
            return
        self.q_sq.zero_()
        self._steps = 0
        self._requants += 1

    def _value_bits(self, layer):
        """The values' widths from the bound, ``S_t`` from the window."""
        cfg = self.config
        return qaq.value_bits(qaq.stored_range(self.vs), self.window.s_max(self.vs.groups), layer.seq_lens,
                              cfg.value_sigma, cfg.allowed, cfg.n_recent)

    # --------------------------------------------------------------- memory
    def memory_report(self, layer):
        """Bytes in use (keys + values) vs an fp16 cache; see :func:`kvsparse.qaq.memory_report`.

        Adds ``allocated`` (every buffer this layer holds: arenas, per-token
        tensors at capacity) and ``window`` (the importance window, float32
        working state; not in ``total``)."""
        if self.ks is None:
            return _empty_report()
        rk = qaq.memory_report(self.ks, layer.seq_lens)
        rv = qaq.memory_report(self.vs, layer.seq_lens)
        rep = {key: rk[key] + rv[key] for key in _REPORT_KEYS}
        rep["allocated"] = sum(t.numel() * t.element_size() for st in (self.ks, self.vs) for t in st.tensors())
        rep["window"] = self.window.nbytes() if self.adaptive and self.window is not None else 0
        return _finish_report(rep)

    # ------------------------------------------------------ Cache API bits
    def reset(self, layer):
        if self.ks is not None:
            for name in ("ks", "vs"):
                st = getattr(self, name)
                st.widths.zero_()
                st.oidx.fill_(-1)
                if not self.packed:
                    st.offsets.copy_(qaq.slot_offsets(st, self.width))
            if self.window is not None:
                self.window.reset()
        self.used_k.zero_()
        self.used_v.zero_()
        self.q_sq.zero_()
        self._dsteps.zero_()
        self._bound = {"ks": 0, "vs": 0}
        self._steps = 0
        self._requants = 0
        self._fresh = None

    def map_batch(self, fn, in_place):
        def apply(t):
            new = fn(t)
            if in_place:
                t.copy_(new)
                return t
            return new.contiguous()

        self._fresh = None
        self.used_k, self.used_v, self.q_sq = apply(self.used_k), apply(self.used_v), apply(self.q_sq)
        if self.ks is not None:
            for name in ("ks", "vs"):
                st = getattr(self, name)
                setattr(self, name, st._replace(**{f: apply(getattr(st, f)) for f in st._fields[:6]}))
            if self.window is not None:
                self.window.map_batch(fn, in_place)

    def load_sequence(self, layer, b, other, other_layer):
        """Sequence ``b`` becomes sequence 0 of ``other`` (the same config's
        :class:`QuantKV`): both stores' first six fields (per-token tensors
        and the arena row), ``q_sq``, ``used_k`` / ``used_v``, and the
        window's history (the batch on dim 1), rotated so that the sequence's
        oldest step is the one overwritten next at this layer's ring position
        (``window.step`` is shared by the batch). A packed (dynamic) arena
        first grows to ``other``'s width (a new tensor: dynamic layers have no
        fixed addresses) and the host byte bounds become the larger. The
        re-quantization counters (``_dsteps`` / ``_steps``, shared by the
        batch) stay this layer's."""
        if self.ks is None:  # a dynamic layer with nothing allocated: so is other (capacity 0)
            return
        for name in ("ks", "vs"):
            st, so = getattr(self, name), getattr(other, name)
            if self.packed and so is not None and so.arena.shape[1] > st.arena.shape[1]:
                arena = torch.zeros(layer.batch_size, so.arena.shape[1], dtype=torch.uint8, device=layer.device)
                arena[:, : st.arena.shape[1]].copy_(st.arena)
                st = st._replace(arena=arena)
                setattr(self, name, st)
            for field in st._fields[:6]:
                copy_row(getattr(st, field), b, None if so is None else getattr(so, field),
                         fill=-1 if field == "oidx" else 0)
            self._bound[name] = max(self._bound[name], other._bound[name])
        for name in ("q_sq", "used_k", "used_v"):
            copy_row(getattr(self, name), b, getattr(other, name))
        if self.window is not None:
            self.window.load_sequence(b, other.window)
        self._requants = max(self._requants, other._requants)


class QAQCacheMethods:
    """What a :class:`~kvsparse.cache.QAQCache` adds to a kvsparse cache."""

    def memory_report(self):
        """Sum of the layers' :meth:`QuantKV.memory_report`: true bytes in use
        (``total``: codes, scales/zeros, widths, offsets, outliers) vs an fp16
        cache of the same tokens (``fp16``); ``compression = fp16 / total``."""
        reps = [layer.storage.memory_report(layer) for _, layer in self.kvsparse_layers()]
        keys = [k for k in reps[0] if k not in ("ratio", "compression")] if reps else list(_REPORT_KEYS)
        return _finish_report({k: sum(r.get(k, 0) for r in reps) for k in keys})

    def compact(self):
        """Compact every dynamic layer (host side)."""
        for _, layer in self.kvsparse_layers():
            layer.storage.compact(layer)


class QAQ(Method):
    """QAQ: keys and values stored with per-token bit-widths, lowered from
    the attention a token gets; decode attention reads the packed codes."""

    name = "qaq"
    title = "QAQ"
    config_class = QAQConfig
    sweep_kwarg = "sigma"
    sweep_values = "sigmas"
    no_sweep_kwargs = ("sigma_k", "sigma_v", "uniform_bits")
    # every token at 8 bits, exactly scaled: close to dense, not equal
    lossless_tolerance = (3e-2, 3e-2)
    cache_methods = QAQCacheMethods
    #: the QAQ attention on CUDA reads whole code words per head: no 80 (csrc/kernels/qaq_cuda.cu)
    cuda_head_dims = (64, 96, 128, 256)

    def lossless_kwargs(self, head_dim, length):
        return dict(allowed=(8,), requant_every=0, alpha=0.0)

    def storage(self, config, layer_idx, static):
        if config.layout == "pages":
            return BinnedQuantKV(config, layer_idx, static)
        return QuantKV(config, layer_idx, packed=not static)

    def decode(self, q, layer, config, dense, scaling):
        # dense_layers are handled by the storage (kept at the largest width)
        return layer.storage.decode_attention(layer, q, scaling)

    def continuation_kv(self, layer, length):
        return layer.storage.dequantized(layer, length)

    def after_prefill(self, layer, query, start, valid, seen, scaling):
        layer.storage.prefill_importance(layer, query, start, valid, seen, scaling)  # widths from the last query rows


register(QAQ())
