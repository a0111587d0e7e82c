"""Runs: which configurations an evaluation compares, and the KV caches they decode with.

A run is a method name plus the kwargs handed to ``kvsparse.patch(model,
method=name, **kwargs)`` (:class:`MethodRun`; ``("dense", {})`` is the unpatched
model). :func:`make_runs` sweeps each method, :func:`method_applied` patches the
model for one run, and :class:`SharedPrefill` prefills a prompt once and hands
every run its own copy of the cache. :class:`RecordLog` appends every finished
record to ``records.jsonl`` (and loads it back to resume); :func:`shard_items`
splits a task's prompts between processes.
"""
import contextlib
import copy
import dataclasses
import json
import os
import time

from .. import methods as _methods
from .decoding import prefill


# ------------------------------------------------------------------ per-method settings
# Everything the harness knows about a particular method is in METHODS, built
# from the method registry (kvsparse.methods); the code below it is generic. A
# method without a sweep keyword runs with the kwargs it is given (no sweep;
# every run prefills under the method).


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """How the harness sweeps one method and shares its caches."""

    sweep_kwarg: str
    """The keyword that the sweep sets (also the run's :attr:`MethodRun.budget`)."""
    sweep_over: str
    """Which list of :func:`make_runs` (and command-line flag) the sweep takes:
    ``"budgets"``, ``"compressions"`` or ``"sigmas"``."""
    sweep_type: type
    """``int`` or ``float``: the type of a swept value."""
    defaults: dict = dataclasses.field(default_factory=dict)
    """Keyword arguments that a run gets unless the command line overrides them
    (left out of the run's label)."""
    fixed_by: tuple = ()
    """Keyword arguments that fix the method's configuration: given any, no sweep."""
    patch_defaults: dict = dataclasses.field(default_factory=dict)
    """Keyword arguments added at patch time unless the run sets them (not part of the run)."""
    cache_kwargs: tuple = None
    """Keyword arguments that change what the method's cache holds after a (dense)
    prefill: runs that agree on them share one prefilled cache, converted from the
    dense one. None: the cache is not built from a dense prefill (every run
    prefills under the method)."""
    nominal_ratio: object = None
    """``f(run, length)``: the fraction of a ``length``-token cache that a decode
    step does not read, from the run's settings. None: measured instead, from
    the cache's memory report (:func:`compression_ratio`)."""


def _spec(method):
    return MethodSpec(method.sweep_kwarg, method.sweep_values, method.sweep_type,
                      defaults=dict(method.eval_defaults), fixed_by=tuple(method.no_sweep_kwargs),
                      patch_defaults=dict(method.eval_patch_defaults), cache_kwargs=method.cache_kwargs,
                      nominal_ratio=method.nominal_ratio)


#: the registered methods' evaluation facts (kvsparse.methods: sweep keyword,
#: defaults, cache sharing, nominal ratio)
METHODS = {m.name: _spec(m) for m in _methods.registered() if m.sweep_kwarg}


def compression_ratio(run, length, mem):
    """The fraction of the cache a decode step does not read (Quest, SparQ) or
    does not hold (QAQ, measured: ``mem`` is :func:`cache_memory`'s report):
    kvpress's ``compression_ratio``."""
    spec = METHODS.get(run.method)
    if spec is not None and spec.nominal_ratio is not None:
        return spec.nominal_ratio(run, length)
    if mem and mem.get("compression"):
        return 1.0 - 1.0 / mem["compression"]
    return 0.0


# ------------------------------------------------------------------ runs


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
        spec = METHODS.get(self.method)
        parts = [self.method]
        if spec and spec.sweep_kwarg in kw:
            parts.append(str(kw.pop(spec.sweep_kwarg)))
        defaults = spec.defaults if spec else {}
        for k in sorted(kw):
            if defaults.get(k) == kw[k]:
                continue
            parts.append(f"{k}={kw[k]}")
        return "-".join(parts)

    @property
    def budget(self):
        spec = METHODS.get(self.method)
        return self.kwargs.get(spec.sweep_kwarg) if spec else None

    def to_dict(self):
        return {"method": self.method, "kwargs": dict(self.kwargs), "label": self.label}


def make_runs(methods, budgets, extra_kwargs=None, include_dense=True, compressions=None, sigmas=None):
    """The runs of an evaluation: ``dense`` then every method at every budget.

    Args:
        methods: method names, e.g. ``["quest", "sparq"]``.
        budgets: token budgets, e.g. ``[64, 128]`` (Quest).
        extra_kwargs: kwargs added to every non-dense run (over the method's
            ``METHODS[name].defaults``).
        compressions: target transfer ratios, e.g. ``[0.5, 0.125]`` (SparQ).
        sigmas: error targets, e.g. ``[0.02, 0.05]`` (QAQ: ``sigma``).

    Each method is swept over the list that ``METHODS[name].sweep_over`` names.
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
        spec = METHODS.get(m)
        base = dict(spec.defaults) if spec else {}
        base.update(extra_kwargs or {})
        if spec is None:  # a method the harness knows nothing about: as given
            runs.append(MethodRun(m, base))
            continue
        sweep = {"budgets": budgets, "compressions": compressions, "sigmas": sigmas}[spec.sweep_over]
        explicit = any(k in base for k in spec.fixed_by)  # e.g. r and k given: no sweep
        if sweep and spec.sweep_kwarg not in base and not explicit:
            for b in sweep:
                runs.append(MethodRun(m, {spec.sweep_kwarg: spec.sweep_type(b), **base}))
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
    spec = METHODS.get(run.method)
    kwargs = dict(run.kwargs)
    for k, v in (spec.patch_defaults if spec else {}).items():
        kwargs.setdefault(k, v)
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


def cache_family(run):
    """Runs with equal families can share a prefilled cache (copied per run):
    a method's ``METHODS[name].cache_kwargs`` agree."""
    if run.method == "dense":
        return ("dense",)
    spec = METHODS.get(run.method)
    keys = spec.cache_kwargs if spec else None
    if keys is None:  # no shared cache: a family per configuration
        return (run.method, tuple(sorted((k, repr(v)) for k, v in run.kwargs.items())))
    return (run.method,) + tuple((k, repr(run.kwargs.get(k))) for k in keys)


def _cache_from_dense(model, run, dense_cache):
    """The cache of ``run`` holding the same tokens as a prefilled ``DynamicCache``,
    without a second prefill (a prefill is dense in every method, so the keys and
    values are the same). Each layer takes the whole prefix as one multi-token
    update, committed as all-valid (Quest, SparQ). None when not supported (a
    method without ``METHODS[name].cache_kwargs``, e.g. QAQ)."""
    spec = METHODS.get(run.method)
    if spec is None or spec.cache_kwargs is None:
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


# ------------------------------------------------------------------ records, resuming and shards
# Every finished record is appended to ``<out>/records.jsonl`` at once, one JSON
# object a line: ``{"kind": "passkey" | "ruler" | "ppl", "settings": {...},
# "record": {...}}``. A record is identified by its key (:func:`record_key`: the
# run's label and kwargs, and where in the task's grid it is) and by the
# settings that shaped its prompt (seed, prompt format, model, ...): a resumed
# evaluation reuses a record only when both agree.

#: the fields of a record, after the run's label and kwargs, that say where it is in its task's grid
KEY_FIELDS = {"passkey": ("length", "depth", "trial"),
              "ruler": ("task", "length", "sample", "question"),
              "ppl": ("length",)}


def _kwargs_key(kwargs):
    return json.dumps(kwargs, sort_keys=True, default=str)


def run_key(run):
    """The part of a record's key that names the run: its label and kwargs (canonical JSON)."""
    return (run.label, _kwargs_key(run.kwargs))


def _norm(field, value):
    return float(value) if field == "depth" else value


def grid_key(kind, run, *where):
    """The key of the record of ``run`` at ``where`` (the values of ``KEY_FIELDS[kind]``)."""
    return (kind,) + run_key(run) + tuple(_norm(f, v) for f, v in zip(KEY_FIELDS[kind], where))


def record_key(kind, rec):
    """The key of a finished record (equal to :func:`grid_key` of the run and place that made it)."""
    return (kind, rec["run"], _kwargs_key(rec["kwargs"])) + tuple(_norm(f, rec[f]) for f in KEY_FIELDS[kind])


def parse_shard(text):
    """``"K/N"`` (1 <= K <= N) as ``(K, N)``; ValueError otherwise."""
    parts = str(text).split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{text!r} is not K/N (two positive integers, e.g. 1/4)")
    k, n = int(parts[0]), int(parts[1])
    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"{text!r}: K must be in 1..N and N >= 1")
    return k, n


def shard_items(items, shard=(1, 1)):
    """Every N-th item of ``items`` starting at the K-th (``shard = (K, N)``, K 1-based)."""
    k, n = shard
    return [x for i, x in enumerate(items) if i % n == k - 1]


class RecordLog:
    """``records.jsonl``: append a task's finished records as they come, load them back to resume.

    ``settings`` maps each kind (``passkey``, ``ruler``, ``ppl``) to the dict of
    settings its records are tagged with (and must match to be reused).
    """

    def __init__(self, path, settings):
        self.path, self.settings = path, settings
        self.ignored = 0  # lines of another setting, not reused
        self.bad_lines = 0  # unreadable lines (e.g. cut off by an interruption)

    def load(self):
        """``{kind: {key: record}}`` of the records whose settings match (the first of duplicates wins)."""
        out = {kind: {} for kind in KEY_FIELDS}
        self.ignored = self.bad_lines = 0
        if not os.path.exists(self.path):
            return out
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    kind, rec = item["kind"], item["record"]
                    key = record_key(kind, rec)
                except (ValueError, KeyError, TypeError):
                    self.bad_lines += 1
                    continue
                if _jsonable(item.get("settings")) != _jsonable(self.settings.get(kind)):
                    self.ignored += 1
                    continue
                out[kind].setdefault(key, rec)
        return out

    def writer(self, kind):
        """A function that appends one finished ``kind`` record to the file (flushed at once)."""
        settings = self.settings.get(kind)

        def write(rec):
            line = json.dumps({"kind": kind, "settings": settings, "record": rec}, default=str)
            with open(self.path, "a+b") as f:
                f.seek(0, os.SEEK_END)
                if f.tell():  # a line cut off by an interruption: start on a fresh line
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                f.write((line + "\n").encode("utf-8"))
                f.flush()
        return write


def _jsonable(x):
    """``x`` as it reads back from JSON (tuples become lists), for comparing settings."""
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def merge_record_files(paths, out_path):
    """Concatenate the ``records.jsonl`` of several folders into ``out_path``, each
    (kind, settings, key) once; returns the number of lines written (0: none found)."""
    lines, seen = [], set()
    for p in paths:
        if not os.path.isfile(p):
            continue
        with open(p, encoding="utf-8") as f:
            for line in f:
                try:
                    item = json.loads(line)
                    ident = (item["kind"], json.dumps(item.get("settings"), sort_keys=True),
                             record_key(item["kind"], item["record"]))
                except (ValueError, KeyError, TypeError):
                    continue
                if ident not in seen:
                    seen.add(ident)
                    lines.append(line if line.endswith("\n") else line + "\n")
    if lines:
        tmp = out_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, out_path)
    return len(lines)
