"""Capacity: B long sequences decoded together from a kvsparse cache, against the largest dense batch that fits.

A random-weight bf16 model of Llama-3-8B shape (nothing is downloaded), ``--batch`` sequences of
``--len`` random tokens, greedy decoding of ``--new`` tokens with ``generate()``:

* **method** (``--method NAME --kwargs JSON``): a static kvsparse cache for the whole batch
  (``kvsparse.make_cache(model, batch_size=B, max_cache_len=S + new)``), prefilled sequence by
  sequence: one batch-1 static cache of the same method, reused (``reset()``), gets the model's
  forward over the first ``S - 1`` tokens of a prompt (``logits_to_keep=1``, no grad), then
  ``batch_cache.load_sequence(b, single)`` copies it into row ``b``. ``generate()`` then gets the
  ``B x S`` ids whose first ``S - 1`` columns the cache holds: it runs only the last column as its
  first step (checked after the run from the cache's lengths) and decodes; the static cache is
  compileable, so transformers compiles the decode step (on CUDA).
* **dense**: transformers' ``StaticCache(config, max_cache_len=S + new)`` at the largest batch
  that fits, from ``--batch`` down to 1 (allocation or the decode raising
  ``torch.OutOfMemoryError`` tries the next smaller one). Its first ``S - 1`` slots are filled with
  random values instead of a real prefill (decode speed does not depend on the content; the
  table says so), then ``generate()`` continues from it the same way.

Per row: total prefill seconds (each sequence's forward timed with a device sync; method only),
decode ms per token (median of the per-step times inside one ``generate()``, read by a logits
processor after a device sync, the first ``--skip`` steps left out: they hold the compile and the
CUDA-graph recording, which are not timed separately), aggregate tokens/s (``B * 1000 / ms``),
peak memory (``torch.cuda.max_memory_allocated`` over the whole part, reset before it: weights,
caches, prefill activations), the cache's bytes (kvsparse's ``memory_report()["total"]`` where the
method has one, else the sum of the layers' ``state_tensors()``; ``held``: the state tensors
always), and the byte floor: (weights + the bytes one decode step must read, estimated from the
method's config: see :func:`step_read_bytes`) / measured copy bandwidth, with the row's share
(floor / measured).

Long single sequences (``--batch 1 --fill chunked|synthetic``, e.g. ``--len 1048576``): the one
sequence is prefilled in chunks of ``--prefill-chunk`` tokens straight into its cache. ``chunked``
is a real prefill; ``synthetic`` stores the model's own keys and values of the random prompt
(realistic codes, widths and page bounds) but skips each chunk's attention over the past, for
lengths whose real prefill would outlast a run (a 1M-token prefill is about 2.6e17 attention FLOPs);
the table's note column says which. The row also gives the prefill's own peak memory
(``prefill_peak_gib``), and a dense row that cannot allocate says what its cache alone needs.

Usage (GPU; estimated 4-6 minutes on an H200: 8 prefills of 128k tokens at ~12 s each, two compiles)::

    python benchmarks/bench_capacity.py --out benchmarks/results       # quest_qaq, 8 x 128k, 32 new
    python benchmarks/bench_capacity.py --method qaq --kwargs '{"uniform_bits": 4}' --out benchmarks/results
    python benchmarks/bench_capacity.py --batch 1 --len 1048576 --fill synthetic --new 16 --out benchmarks/results
    python benchmarks/bench_capacity.py --smoke --method quest --kwargs '{"token_budget": 64}'   # CPU, tiny

Each call appends its rows to ``<out>/capacity_<device>.jsonl`` (each row as soon as it is
measured) and rewrites ``<out>/capacity_<device>.md`` from every row of that file.
``--smoke``: a tiny random Llama (2 layers, hidden 128, 4 heads, 2 KV heads, head dim 32), CPU,
float32, B=2, S=200, 4 new tokens, eager (no compile); it checks the whole path end to end
(``--out`` defaults to a temporary directory then).
"""
import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt, read_jsonl  # noqa: E402

DEFAULT_METHOD = "quest_qaq"
DEFAULT_KWARGS = {"token_budget": 2048, "page_size": 16, "uniform_bits": 4}
SMOKE = dict(batch=2, len=200, new=4, skip=1)


def build_smoke_model():
    """A tiny random Llama on the CPU (float32) for ``--smoke``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device):
    """Copy bandwidth (bytes read + written per second): ``_common.hbm_bandwidth`` on CUDA, a
    64 MiB copy on the CPU (``--smoke``: only so that the floor columns are exercised)."""
    if device.type == "cuda":
        from _common import hbm_bandwidth

        return hbm_bandwidth()
    a = torch.empty(32 << 20, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        ts.append(time.perf_counter() - t0)
    return 2 * a.numel() / statistics.median(ts)


class StepClock:
    """A logits processor that records the time of every decode step (after a device sync)."""

    def __init__(self, device):
        self.device, self.t = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.t.append(time.perf_counter())
        return scores


def timed_generate(model, ids, cache, new, skip, compile_ok):
    """``generate()`` continuing ``cache`` (which holds all but the last column of ``ids``);
    returns ``(median ms per step without the first skip steps, seconds of the whole call)``."""
    from transformers import LogitsProcessorList

    from kvsparse import _compat

    clock = StepClock(ids.device)
    kw = _compat.model_cache_kwargs(model, cache)  # `cache` from transformers 5.24, `past_key_values` before
    if not compile_ok:
        kw["disable_compile"] = True
    sync(ids.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, logits_processor=LogitsProcessorList([clock]), **kw)
    sync(ids.device)
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(clock.t, clock.t[1:])]
    steps = steps[min(skip, max(len(steps) - 1, 0)):]
    return statistics.median(steps) * 1e3, total


def tensor_bytes(tensors):
    """Bytes of distinct tensors (by storage address)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def held_bytes(cache):
    """Bytes every layer of a kvsparse cache holds (its ``state_tensors()``), or a dense
    cache's keys and values."""
    tensors = []
    for layer in cache.layers:
        if hasattr(layer, "state_tensors"):
            tensors.extend(layer.state_tensors())
        else:
            tensors.extend((getattr(layer, "keys", None), getattr(layer, "values", None)))
    return tensor_bytes(tensors)


def _qaq_token_bytes(cfg, Hkv, D, itemsize):
    """Bytes of one token (keys + values) of one layer in a QAQ-style store at the config's
    largest width: codes, offset, width, scale/zero and outlier slots per group."""
    width = getattr(cfg, "uniform_bits", None) or max(getattr(cfg, "allowed", (8,)))
    groups = 1 if getattr(cfg, "shared", True) else Hkv
    E = Hkv * D // groups
    total = 0
    for alpha in (getattr(cfg, "alpha", 0.02), getattr(cfg, "alpha_v", None)):
        alpha = getattr(cfg, "alpha", 0.02) if alpha is None else alpha
        n_out = 2 * math.ceil(alpha / 2 * E)
        total += groups * (E * width / 8 + 4 + 1 + 4 + n_out * (2 + itemsize))
    return total


def step_read_bytes(method, cfg, model_cfg, B, S, itemsize, report_total=None):
    """``(bytes, basis)``: the KV bytes one decode step must read over all layers, estimated
    from the method's config. ``method`` ``None``: dense (every token's K and V). A config with a
    ``token_budget`` selects pages: the first ``dense_layers`` read every token, the others the
    page metadata (key min / max per page, the cache dtype) and the ``token_budget`` tokens
    selected, each at its stored size (QAQ-style codes + per-token metadata when the config has
    widths, else dense K + V). QAQ reads every token: its memory report's bytes in use. Other
    methods: SparQ's ``compression`` of dense, else the cache's bytes (an upper bound)."""
    L, Hkv = model_cfg.num_hidden_layers, model_cfg.num_key_value_heads
    D = getattr(model_cfg, "head_dim", None) or model_cfg.hidden_size // model_cfg.num_attention_heads
    dense_row = 2 * Hkv * D * itemsize  # K + V of one token
    if method is None:
        return L * B * S * dense_row, "dense K+V"
    quantized = hasattr(cfg, "uniform_bits") or hasattr(cfg, "allowed")
    row = _qaq_token_bytes(cfg, Hkv, D, itemsize) if quantized else dense_row
    budget = getattr(cfg, "token_budget", None)
    if budget is not None:
        P = getattr(cfg, "page_size", 16)
        dense_layers = min(getattr(cfg, "dense_layers", 0), L)
        sel = min(budget // P * P, S)
        meta = 2 * Hkv * D * itemsize * math.ceil(S / P)
        per_sparse = meta + sel * row
        return int(B * (dense_layers * S * row + (L - dense_layers) * per_sparse)), "estimate: pages + selected tokens"
    if report_total is not None:
        return int(report_total), "memory report (every token)"
    if hasattr(cfg, "compression") and getattr(cfg, "compression", None):
        return int(L * B * S * dense_row * cfg.compression), "estimate: compression x dense"
    return None, "unknown"


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device):
    if device.type == "cuda":
        free(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


@contextlib.contextmanager
def attention_skipped():
    """A synthetic fill: every kvsparse prefill chunk after the first stores its
    keys and values (the method's commit and side data: codes, widths, page
    bounds, all from the model's own projections of the prompt) but computes no
    attention over the past: the continuation attention returns zeros and reads
    no dequantized past. The first chunk attends to itself as usual."""
    from kvsparse import hf

    orig = hf._continuation_attention
    methods = {}

    def zeros(module, query, layer, start, valid, seen, scaling, kv, **kwargs):
        B, H, L, D = query.shape
        return query.new_zeros(B, L, H, D), None

    from kvsparse import methods as registry

    for name in registry.names():
        m = registry.get(name)
        methods[name] = m.__dict__.get("continuation_kv")
        m.continuation_kv = lambda layer, length: None  # no dequantized past
    hf._continuation_attention = zeros
    try:
        yield
    finally:
        hf._continuation_attention = orig
        for name, fn in methods.items():
            m = registry.get(name)
            if fn is None:
                del m.continuation_kv
            else:
                m.continuation_kv = fn


def fill_chunked(model, ids, cache, chunk, device, synthetic, transients=None):
    """Prefill ``ids[:, :-1]`` (batch 1) into ``cache`` in chunks of ``chunk`` tokens
    (``synthetic``: under :func:`attention_skipped`); returns the seconds per chunk.

    On CUDA, ``transients`` (a list) gets each chunk's peak memory above what was allocated
    when the chunk began (its activations and temporaries: the memory profile of the prefill;
    the cache itself is allocated before). The peak statistics are reset per chunk, so the
    fill's overall peak is appended last (the caller pops it)."""
    from kvsparse import _compat

    S = ids.shape[1]
    times = []
    overall = peak_bytes(device)
    ctx = attention_skipped() if synthetic else contextlib.nullcontext()
    with ctx, torch.no_grad():
        for a in range(0, S - 1, chunk):
            b = min(a + chunk, S - 1)
            sync(device)
            if transients is not None and device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            pos = torch.arange(a, b, device=device).unsqueeze(0)
            out = model(ids[:, a:b], position_ids=pos, use_cache=True, logits_to_keep=1,
                        **_compat.model_cache_kwargs(model, cache))
            del out
            sync(device)
            times.append(time.perf_counter() - t0)
            extra = ""
            if transients is not None and device.type == "cuda":
                overall = max(overall, peak_bytes(device))
                transients.append(peak_bytes(device) - base)
                extra = f", transient {transients[-1] / 2**30:.2f} GiB"
            print(f"  {'fill' if synthetic else 'prefill'} {b}/{S - 1}: {times[-1]:.2f} s{extra}", flush=True)
    if transients is not None and device.type == "cuda":
        transients.append(overall)  # the last entry: the fill's overall peak (popped by the caller)
    return times


def run_method(model, ids, args, device, compile_ok):
    """The kvsparse part: sequence-by-sequence prefill into one reused batch-1 cache, loaded
    into the batch cache (``--fill batch``), or a chunked prefill of the one sequence straight
    into its cache (``--fill chunked`` / ``synthetic``); then the timed ``generate()``."""
    import kvsparse
    from kvsparse import _compat

    B, S, new = ids.shape[0], ids.shape[1], args.new
    N = S + new
    reset_peak(device)
    batch = kvsparse.make_cache(model, batch_size=B, max_cache_len=N)
    prefill, load, transients = [], 0.0, []
    if args.fill != "batch":
        prefill = fill_chunked(model, ids, batch, args.prefill_chunk, device, args.fill == "synthetic",
                               transients)
        load = None
    else:
        single = kvsparse.make_cache(model, batch_size=1, max_cache_len=N)
        for b in range(B):
            if b:
                single.reset()
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model(ids[b:b + 1, : S - 1], use_cache=True, logits_to_keep=1,
                            **_compat.model_cache_kwargs(model, single))
            del out
            sync(device)
            t1 = time.perf_counter()
            batch.load_sequence(b, single)
            sync(device)
            prefill.append(t1 - t0)
            load += time.perf_counter() - t1
            print(f"  prefill {b + 1}/{B}: {prefill[-1]:.2f} s", flush=True)
        del single
    prefill_peak = transients.pop() if transients else peak_bytes(device)
    free(device)
    ms, gen_s = timed_generate(model, ids, batch, new, args.skip, compile_ok)
    peak = peak_bytes(device)
    if peak is not None:
        peak = max(peak, prefill_peak)
    for _, layer in batch.kvsparse_layers():  # generate() ran the last prompt column only, then decoded
        if layer.seq_lens.tolist() != [S - 1 + new] * B:
            raise RuntimeError(f"kvsparse cache lengths {layer.seq_lens.tolist()} after generate(), "
                               f"expected {S - 1 + new} (S - 1 prefilled + {new} steps)")
    report = getattr(batch, "memory_report", None)
    rep_total = report()["total"] if report is not None else None
    held = held_bytes(batch)
    del batch
    free(device)
    return dict(B=B, prefill_s=sum(prefill), prefill_each_s=prefill, load_s=load, decode_ms=ms, generate_s=gen_s,
                peak=peak, prefill_peak=prefill_peak, chunk_transients=transients,
                kv=rep_total if rep_total is not None else held, held=held,
                kv_basis="memory_report" if rep_total is not None else "state_tensors", report_total=rep_total)


def dense_bytes_needed(model_cfg, B, N, itemsize):
    """Bytes of a dense bf16 KV cache of ``B`` sequences of ``N`` tokens (every layer)."""
    from kvsparse.cache import cache_geometry

    L, Hkv, D = cache_geometry(model_cfg)
    return L * B * N * 2 * Hkv * D * itemsize


def fill_dense_cache(model, B, S, N, device, dtype):
    """A transformers ``StaticCache`` of batch ``B`` whose first ``S - 1`` slots hold random
    values (instead of a prefill) and that counts ``S - 1`` tokens."""
    from transformers import StaticCache

    from kvsparse import _compat
    from kvsparse.cache import cache_geometry

    _, Hkv, D = cache_geometry(model.config)
    cache = StaticCache(config=model.config, max_cache_len=N)
    fake = torch.zeros(B, Hkv, 0, D, dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(B)
    for layer in cache.layers:
        _compat.lazy_initialization(layer, fake, fake)
        for t in (layer.keys, layer.values):
            t[:, :, : S - 1].normal_(generator=g)
        if torch.is_tensor(getattr(layer, "cumulative_length", None)):  # transformers >= 5 counts on the device
            layer.cumulative_length.fill_(S - 1)
    # (transformers 4.57 counts the non-zero slots of sequence 0: S - 1 as well)
    if int(cache.get_seq_length()) != S - 1:
        raise RuntimeError(f"the filled StaticCache counts {int(cache.get_seq_length())} tokens, expected {S - 1}")
    return cache


def run_dense(model, ids, args, device, dtype, compile_ok):
    """The dense part: the largest batch (from ``--dense-batch``, default ``--batch``, down to 1)
    whose random-filled StaticCache and decode fit; ``None`` when not even B=1 does."""
    S, new = ids.shape[1], args.new
    N = S + new
    for B in range(args.dense_batch or ids.shape[0], 0, -1):
        cache, oom = None, None
        reset_peak(device)
        try:
            cache = fill_dense_cache(model, B, S, N, device, dtype)
            sub = ids[:B] if B <= ids.shape[0] else ids[torch.arange(B, device=ids.device) % ids.shape[0]]
            ms, gen_s = timed_generate(model, sub, cache, new, args.skip, compile_ok)
        except torch.OutOfMemoryError as e:
            oom = str(e).splitlines()[0]
        if oom is not None:  # (out of the except block: its traceback no longer holds the tensors)
            print(f"  dense B={B}: {oom}", flush=True)
            cache = None
            free(device)
            continue
        peak = peak_bytes(device)
        if int(cache.get_seq_length()) != S - 1 + new:
            raise RuntimeError(f"dense cache counts {int(cache.get_seq_length())} tokens after generate(), "
                               f"expected {S - 1 + new}")
        held = held_bytes(cache)
        del cache
        free(device)
        return dict(B=B, prefill_s=None, prefill_each_s=None, load_s=None, decode_ms=ms, generate_s=gen_s,
                    peak=peak, kv=held, held=held, kv_basis="keys+values", report_total=None)
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default=DEFAULT_METHOD, help=f"a registered kvsparse method (default {DEFAULT_METHOD})")
    ap.add_argument("--kwargs", default=None,
                    help=f"JSON of the method's config fields (default for {DEFAULT_METHOD}: "
                         f"{json.dumps(DEFAULT_KWARGS)}; other methods: their defaults)")
    ap.add_argument("--shape", default="llama3-8b", help="a bench_e2e.py shape (GPU)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (a quick look; not for the table)")
    ap.add_argument("--batch", type=int, default=None, help="sequences (default 8; --smoke 2)")
    ap.add_argument("--len", type=int, default=None,
                    help="prompt tokens per sequence S, S - 1 of them prefilled (default 131072; --smoke 200)")
    ap.add_argument("--new", type=int, default=None, help="decoded tokens (default 32; --smoke 4)")
    ap.add_argument("--skip", type=int, default=None, help="decode steps left out of the median (default 5; --smoke 1)")
    ap.add_argument("--dense-batch", type=int, default=None, help="largest dense batch to try (default --batch)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense comparison")
    ap.add_argument("--fill", choices=("batch", "chunked", "synthetic"), default="batch",
                    help="how the method's cache is filled: batch (default: each sequence prefilled whole, "
                         "then load_sequence); chunked (one sequence, --batch 1: a real prefill in chunks of "
                         "--prefill-chunk tokens); synthetic (the same chunks, storing the model's own keys and "
                         "values but skipping the prefill's attention over the past: for lengths whose real "
                         "prefill takes longer than a run may; decode speed does not depend on the content)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="tokens per prefill chunk (default 8192; --smoke 64)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, float32, eager: a check of the path")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results; --smoke: a temp dir)")
    args = ap.parse_args(argv)
    defaults = SMOKE if args.smoke else dict(batch=8, len=131072, new=32, skip=5)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.len < 2 or args.batch < 1 or args.new < 2:
        ap.error("--len must be >= 2, --batch >= 1, --new >= 2")
    if args.prefill_chunk is None:
        args.prefill_chunk = 64 if args.smoke else 8192
    if args.prefill_chunk < 1:
        ap.error("--prefill-chunk must be >= 1")
    if args.fill != "batch" and args.batch != 1:
        ap.error(f"--fill {args.fill} prefills one sequence: pass --batch 1")
    kwargs = json.loads(args.kwargs) if args.kwargs else (DEFAULT_KWARGS if args.method == DEFAULT_METHOD else {})
    if args.out is None:
        args.out = (tempfile.mkdtemp(prefix="bench_capacity_") if args.smoke
                    else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))

    import kvsparse
    import transformers

    method_cfg = kvsparse.make_config(args.method, **kwargs)  # an unknown method or field fails here, early
    if args.smoke:
        device, dtype, compile_ok = torch.device("cpu"), torch.float32, False
        dev_name, tag = "cpu", "cpu"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_capacity.py needs a CUDA device (or --smoke)")
        if not kvsparse.has_cuda():
            sys.exit("kvsparse was built without CUDA kernels")
        device, dtype, compile_ok = torch.device("cuda"), torch.bfloat16, True
        dev_name = torch.cuda.get_device_name()
        tag = dev_name.replace(" ", "_").lower()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"capacity_{tag}.jsonl")
    bw = copy_bandwidth(device)
    if args.smoke:
        model, shape = build_smoke_model(), "tiny-llama"
    else:
        from bench_e2e import build_model

        model, shape = build_model(args.shape, args.layers), args.shape + (f"-{args.layers}L" if args.layers else "")
    cfg = model.config
    itemsize = torch.finfo(dtype).bits // 8
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    B, S = args.batch, args.len
    g = torch.Generator(device=device).manual_seed(S)
    ids = torch.randint(3, cfg.vocab_size, (B, S), device=device, generator=g)
    run_id = datetime.datetime.now().isoformat(timespec="seconds")
    base = dict(date=datetime.date.today().isoformat(), run=run_id, device=dev_name, torch=torch.__version__,
                transformers=transformers.__version__, shape=shape, S=S, new=args.new, bw_tbs=bw / 1e12,
                weights_gib=wbytes / 2**30)

    def emit(label, res, method, cfg_obj, note, error=None):
        row = dict(base, method=label, B=res["B"] if res else None, note=note, error=error)
        if res:
            nbytes, basis = step_read_bytes(method, cfg_obj, cfg, res["B"], S, itemsize, res["report_total"])
            floor_ms = (wbytes + nbytes) / bw * 1e3 if nbytes is not None else None
            row.update(
                prefill_s=res["prefill_s"], prefill_each_s=res["prefill_each_s"], load_s=res["load_s"],
                decode_ms=res["decode_ms"], tok_s=res["B"] * 1000 / res["decode_ms"], generate_s=res["generate_s"],
                peak_gib=res["peak"] / 2**30 if res["peak"] is not None else None,
                prefill_peak_gib=res["prefill_peak"] / 2**30 if res.get("prefill_peak") is not None else None,
                chunk_transient_gib=[t / 2**30 for t in res.get("chunk_transients") or []] or None,
                kv_gib=res["kv"] / 2**30, kv_basis=res["kv_basis"], held_gib=res["held"] / 2**30,
                step_read_gib=nbytes / 2**30 if nbytes is not None else None, floor_basis=basis,
                floor_ms=floor_ms, floor_share=floor_ms / res["decode_ms"] if floor_ms else None)
        print(json.dumps(row), flush=True)
        with open(path, "a") as f:  # each row as soon as it is measured
            f.write(json.dumps(row) + "\n")
        write_table(path)

    label = f"{args.method} {json.dumps(kwargs, sort_keys=True)}"
    print(f"{label}: B={B}, S={S}, new={args.new}, {shape} on {dev_name}", flush=True)
    kvsparse.patch(model, method=args.method, **kwargs)
    res, err = None, None
    try:
        res = run_method(model, ids, args, device, compile_ok)
    except torch.OutOfMemoryError as e:
        err = "OOM"
        print(f"  {args.method}: {str(e).splitlines()[0]}", flush=True)
    free(device)
    kvsparse.unpatch(model)
    notes = {"batch": "prefilled sequence by sequence (load_sequence)",
             "chunked": f"chunked prefill ({args.prefill_chunk} tokens a chunk)",
             "synthetic": f"synthetic fill: the model's K/V of random tokens in {args.prefill_chunk}-token chunks, "
                          "the prefill's attention over the past skipped"}
    emit(label, res, (args.method, kwargs), method_cfg, notes[args.fill], err)
    if not args.no_dense:
        if device.type == "cuda":
            # drop the compiled step and its CUDA graphs, so that nothing of the method's run stays
            # allocated (the dense decode compiles anew in any case: the attention changed)
            torch._dynamo.reset()
            free(device)
            print(f"allocated before dense: {torch.cuda.memory_allocated() / 2**30:.1f} GiB "
                  f"(weights {wbytes / 2**30:.1f})", flush=True)
        print(f"dense: the largest batch <= {args.dense_batch or B} that fits", flush=True)
        res = run_dense(model, ids, args, device, dtype, compile_ok)
        need = dense_bytes_needed(cfg, 1, S + args.new, itemsize)
        emit("dense", res, None, None, "random-filled cache, no prefill: largest batch that fits",
             None if res else f"OOM at B=1 (its KV cache alone needs {need / 2**30:.1f} GiB, "
                              f"the weights {wbytes / 2**30:.1f} GiB)")
    print(f"wrote {path} and {path[:-len('.jsonl')]}.md")


def write_table(jsonl):
    rows = read_jsonl(jsonl)
    if not rows:
        return
    r0 = rows[-1]
    dense_tok = {r["run"]: r.get("tok_s") for r in rows if r["method"] == "dense"}
    lines = [
        f"# Capacity: B long sequences decoded from one kvsparse cache vs the largest dense batch ({r0['date']})", "",
        f"Device: {r0['device']}, torch {r0['torch']}, transformers {r0['transformers']}; copy bandwidth "
        f"{r0['bw_tbs']:.2f} TB/s. Random-weight models, greedy `generate()` of `new` tokens after S - 1 cached "
        "tokens; `python benchmarks/bench_capacity.py` (see its docstring). Chunked rows give the prefill's memory "
        "profile: each chunk's peak above the memory allocated when it began (the cache is allocated before).", "",
        "Method rows: a static kvsparse cache prefilled sequence by sequence (one batch-1 cache, `load_sequence`), "
        "prefill = the sum of the sequences' forwards. Dense rows: transformers' StaticCache at the largest batch "
        "that fits, filled with random values instead of a prefill (decode speed does not depend on the content). "
        "decode = median ms per step inside one `generate()` (first steps, with the compile, left out); "
        "tok/s = B x 1000 / decode; x dense = tok/s against the dense row of the same run; peak = "
        "max_memory_allocated over the part (weights included); KV = the cache's bytes (memory report where the "
        "method has one, else its tensors); held = every tensor the cache holds; floor = (weights + the bytes a "
        "step must read, estimated from the config) / bandwidth; share = floor / decode.", "",
        "| shape | S | new | method | B | prefill s | decode ms | tok/s | x dense | peak GiB | KV GiB | held GiB "
        "| floor ms | share | note |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        tok, dt = r.get("tok_s"), dense_tok.get(r["run"])
        x = tok / dt if (tok and dt and r["method"] != "dense") else None
        dec = r["error"] if r.get("error") else fmt(r.get("decode_ms"), ".2f")
        note = r.get("note", "")
        tr = r.get("chunk_transient_gib")
        if tr:  # the prefill's memory profile: each chunk's peak above what was allocated before it
            note += (f"; chunk transient {tr[0]:.2f} GiB (first chunk), {tr[-1]:.2f} (last), max {max(tr):.2f}; "
                     f"prefill peak {r['prefill_peak_gib']:.1f} GiB")
        lines.append(
            f"| {r['shape']} | {r['S']} | {r['new']} | {r['method']} | {fmt(r.get('B'), 'd')} | "
            f"{fmt(r.get('prefill_s'), '.1f')} | {dec} | {fmt(tok, '.1f')} | {fmt(x, '.2f')} | "
            f"{fmt(r.get('peak_gib'), '.1f')} | {fmt(r.get('kv_gib'), '.2f')} | {fmt(r.get('held_gib'), '.2f')} | "
            f"{fmt(r.get('floor_ms'), '.2f')} | {fmt(r.get('floor_share'), '.2f')} | {note} |")
    text = "\n".join(lines) + "\n"
    with open(jsonl[: -len(".jsonl")] + ".md", "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
