"""Runs: which configurations an evaluation compares, and the KV caches they decode with.

A run is a method name plus the kwargs handed to ``kvsparse.patch(model,
method=name, **kwargs)`` (:class:`MethodRun`; ``("dense", {})`` is the unpatched
model). :func:`make_runs` sweeps each method, :func:`method_applied` patches the
model for one run, and :class:`SharedPrefill` prefills a prompt once and hands
every run its own copy of the cache.
"""
import contextlib
import copy
import dataclasses
import time

from .decoding import prefill


# Keyword arguments that a method gets unless the command line overrides them.
METHOD_DEFAULTS = {"quest": {"page_size": 16}}
# The keyword that the sweep sets, per method: --budgets (token budgets) for Quest,
# --compressions (target transfer ratios) for SparQ.
BUDGET_KWARG = {"quest": "token_budget", "sparq": "compression", "qaq": "sigma"}
# Methods swept over --compressions rather than --budgets.
COMPRESSION_METHODS = ("sparq",)
# Methods swept over --sigmas (QAQ: the error target of the bit-width bounds).
SIGMA_METHODS = ("qaq",)
# Keyword arguments that fix a method's configuration, so that it is not swept.
NO_SWEEP_KWARGS = {"sparq": ("r", "k"), "qaq": ("sigma_k", "sigma_v", "uniform_bits")}


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """One evaluated configuration: ``kvsparse.patch(model, method=method, **kwargs)``."""

    method: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    label: str = ""

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", self._default_label())

    def _default_label(self):
        if self.method == "dense":
            return "dense"
        kw = dict(self.kwargs)
        budget_key = BUDGET_KWARG.get(self.method)
        parts = [self.method]
        if budget_key and budget_key in kw:
            parts.append(str(kw.pop(budget_key)))
        for k in sorted(kw):
            if METHOD_DEFAULTS.get(self.method, {}).get(k) == kw[k]:
                continue
            parts.append(f"{k}={kw[k]}")
        return "-".join(parts)

    @property
    def budget(self):
        key = BUDGET_KWARG.get(self.method)
        return self.kwargs.get(key) if key else None

    def to_dict(self):
        return {"method": self.method, "kwargs": dict(self.kwargs), "label": self.label}


def make_runs(methods, budgets, extra_kwargs=None, include_dense=True, compressions=None, sigmas=None):
    """The runs of an evaluation: ``dense`` then every method at every budget.

    Args:
        methods: method names, e.g. ``["quest", "sparq"]``.
        budgets: token budgets, e.g. ``[64, 128]`` (Quest).
        extra_kwargs: kwargs added to every non-dense run (over ``METHOD_DEFAULTS``).
        compressions: target transfer ratios, e.g. ``[0.5, 0.125]`` (SparQ).
        sigmas: error targets, e.g. ``[0.02, 0.05]`` (QAQ: ``sigma``).

    ``extra_kwargs`` may also be a list of dicts: every method is then swept
    once per dict (e.g. QAQ with and without outliers).
    """
    runs = [MethodRun("dense", {})] if include_dense else []
    if isinstance(extra_kwargs, (list, tuple)):
        for kw in extra_kwargs:
            for r in make_runs(methods, budgets, kw, include_dense=False, compressions=compressions,
                               sigmas=sigmas):
                if r.label not in [x.label for x in runs]:
                    runs.append(r)
        return runs
    for m in methods:
        if m == "dense":
            continue
        base = dict(METHOD_DEFAULTS.get(m, {}))
        base.update(extra_kwargs or {})
        key = BUDGET_KWARG.get(m)
        sweep = compressions if m in COMPRESSION_METHODS else sigmas if m in SIGMA_METHODS else budgets
        conv = float if m in COMPRESSION_METHODS or m in SIGMA_METHODS else int
        explicit = any(k in base for k in NO_SWEEP_KWARGS.get(m, ()))  # e.g. r and k given: no sweep
        if key and sweep and key not in base and not explicit:
            for b in sweep:
                runs.append(MethodRun(m, {key: conv(b), **base}))
        else:
            runs.append(MethodRun(m, base))
    return runs


@contextlib.contextmanager
def method_applied(model, run):
    """Apply ``run`` to ``model`` for the duration of the block.

    Yields the patch's configuration as a dict (``model.kvsparse_config.to_dict()``).
    This is the only place the harness calls ``kvsparse.patch`` / ``kvsparse.unpatch``.
    """
    from .. import hf

    if run.method == "dense":
        yield {"method": "dense"}
        return
    kwargs = dict(run.kwargs)
    if run.method == "sparq":
        # the evaluation measures the method at every length (SparQ's default
        # dense_below runs short contexts densely)
        kwargs.setdefault("dense_below", 0)
    hf.patch(model, method=run.method, **kwargs)
    try:
        yield model.kvsparse_config.to_dict()
    finally:
        hf.unpatch(model)


def new_cache(model, run):
    """An empty KV cache for ``run`` (call with ``run`` applied to ``model``).

    Dense: transformers' ``DynamicCache``. A sparse method: the cache of the patched
    model from ``kvsparse.make_cache(model)`` (a patched model given a plain
    DynamicCache would silently fall back to dense attention).
    """
    from transformers import DynamicCache

    from .. import hf

    if run.method == "dense":
        return DynamicCache(config=model.config)
    return hf.make_cache(model)


# Keyword arguments that change what a method's cache holds after a (dense) prefill.
# Runs of one method that agree on them can share one prefilled cache.
CACHE_KWARGS = {"quest": ("page_size", "chunk_size", "max_cache_len"),
                "sparq": ("chunk_size", "max_cache_len")}


def cache_family(run):
    """Runs with equal families can share a prefilled cache (copied per run)."""
    if run.method == "dense":
        return ("dense",)
    keys = CACHE_KWARGS.get(run.method)
    if keys is None:  # unknown method: no sharing
        return (run.method, tuple(sorted((k, repr(v)) for k, v in run.kwargs.items())))
    return (run.method,) + tuple((k, repr(run.kwargs.get(k))) for k in keys)


def _cache_from_dense(model, run, dense_cache):
    """The cache of ``run`` holding the same tokens as a prefilled ``DynamicCache``,
    without a second prefill (a prefill is dense in every method, so the keys and
    values are the same). Quest, SparQ: each layer takes the whole prefix as one
    multi-token update, committed as all-valid. None when not supported."""
    if run.method not in ("quest", "sparq"):
        return None
    cache = new_cache(model, run)
    dense_layers = getattr(dense_cache, "layers", None)
    if dense_layers is None or len(dense_layers) != len(cache.layers):
        return None
    if getattr(cache, "native_layers", None):  # layers left to transformers (Gemma 3): prefill anew
        return None
    for src, dst in zip(dense_layers, cache.layers):
        dst.update(src.keys, src.values)
        dst.commit(None)
        dst.awaiting_attention = False  # a one-token prefix is an append, already in place
    return cache


def cache_memory(cache):
    """The cache's ``memory_report()`` (QAQ: true bytes in use vs fp16) as a
    dict, or None for a cache without one (dense, Quest, SparQ)."""
    fn = getattr(cache, "memory_report", None)
    if fn is None:
        return None
    try:
        rep = fn()
    except Exception:  # pragma: no cover - a report must never break an evaluation
        return None
    return {k: (float(v) if isinstance(v, float) else int(v)) for k, v in rep.items()}


class SharedPrefill:
    """Prefill a context once and hand every run its own copy of the KV cache.

    A prefill is dense attention in every method, so the dense model's cache is
    computed once (with the model unpatched, at construction) and then, per cache
    family (:func:`cache_family`), converted into the method's cache type
    (:func:`_cache_from_dense`) or, when that is not supported, prefilled again
    under the method. :meth:`get` (called with the run applied) deep-copies it.
    With ``enabled=False`` every :meth:`get` prefills afresh under the run.
    """

    def __init__(self, model, ids, enabled=True):
        self.model, self.ids, self.enabled = model, list(ids), enabled
        self._caches = {}
        if enabled:
            dense = MethodRun("dense")
            t0 = time.perf_counter()
            logits, cache = prefill(model, self.ids, new_cache(model, dense))
            self._caches[cache_family(dense)] = (logits, cache, time.perf_counter() - t0)

    def get(self, run):
        """``(last_logits, cache, prefill_seconds)`` for ``run`` (applied to the model)."""
        if not self.enabled:
            t0 = time.perf_counter()
            logits, cache = prefill(self.model, self.ids, new_cache(self.model, run))
            return logits, cache, time.perf_counter() - t0
        fam = cache_family(run)
        if fam not in self._caches:
            d_logits, d_cache, d_secs = self._caches[("dense",)]
            t0 = time.perf_counter()
            c = _cache_from_dense(self.model, run, d_cache)
            if c is None:
                logits, c = prefill(self.model, self.ids, new_cache(self.model, run))
                self._caches[fam] = (logits, c, time.perf_counter() - t0)
            else:
                self._caches[fam] = (d_logits, c, d_secs + time.perf_counter() - t0)
        logits, c, secs = self._caches[fam]
        return logits, copy.deepcopy(c), secs
