"""Quality evaluation of sparse KV-cache decoding: passkey retrieval and decode-mode perplexity.

Run ``python -m kvsparse.eval --help``. Example (SmolLM2 on the CPU, Quest at five budgets)::

    python -m kvsparse.eval --task all --method quest --budgets 64,128,256,512,1024 \\
        --lengths 2048,4096 --text ../shared/data/tinyshakespeare.txt --out out/eval

Tasks
-----
passkey
    A random 5-digit key is hidden at a given depth (0 = start, 1 = end) of filler
    text ("The grass is green. The sky is blue. ..."), the whole prompt being
    ``length`` tokens. The context (instruction + filler with the key) is prefilled
    densely; the question ("What is the pass key? The pass key is") is then fed one
    token at a time as decode steps, and the answer is generated greedily, so that
    every token that sees the key is computed by the method under test (a prefill is
    always dense). The score is exact match of the first number in the answer.
ppl
    Perplexity of a real text scored token by token in decode mode (as the Quest
    paper scores PG-19): a short dense prefill (``--prefix`` tokens), then one decode
    step (q_len = 1, with the KV cache) per following token, accumulating the NLL of
    every next token. One pass to the longest length gives the perplexity of every
    shorter length too (it is the same computation cut earlier). With
    ``--ppl-window W`` each length ``L`` gets its own pass instead: ``L - W`` tokens
    prefilled densely, the last ``W`` decoded and scored (quality at long context, at
    a fraction of the cost: a CPU decodes ~10 tokens/s).

Every prompt is prefilled once by the dense model and the KV cache copied into each
run (converted into the method's cache type); a prefill is dense attention in every
method, so this only saves time (``--no-share-prefill`` prefills under each method).
Runs are independent, so tasks can run as parallel processes and be combined with
``--merge DIR DIR --out DIR``.

Methods are generic: a run is a method name plus a kwargs dict handed to
``kvsparse.patch(model, method=name, **kwargs)``; ``("dense", {})`` is the unpatched
model. Quest is swept over ``--budgets``, SparQ over ``--compressions``, QAQ over
``--sigmas``; ``--method-kwargs`` may be a list of dicts (one sweep per dict).

QAQ runs also report the *measured* compression: fp16 bytes / bytes in use of the
cache (``QAQCache.memory_report()``: codes, scales/zeros, widths, offsets,
outliers) at the end of each perplexity pass / passkey answer. A QAQ prefill
chooses the prompt's bit-widths from its own attention, so QAQ runs prefill under
the method (no shared dense prefill).

Modules
-------
``runs``       the runs (method + kwargs), the per-method sweep and cache settings, patching a
               model for a run, the caches and the shared dense prefill
``decoding``   tokenizer helpers, prefill and greedy decoding with a KV cache
``tasks``      ``passkey``, ``ppl`` and ``ruler`` (the RULER-style suite)
``reporting``  markdown tables, figures, ``results.json`` / ``ruler.json``, merging result folders
``models``     the models ``--model`` names (SmolLM2, Gemma 3, a tiny random LLaMA)
``cli``        the command line (``python -m kvsparse.eval``)
"""
from . import decoding
from .cli import build_parser, main
from .decoding import chat_split, greedy_answer, prefill
from .models import ByteTokenizer, load_smollm2, smollm2_installed, tiny_model
from .reporting import make_plot, merge_results, passkey_tables, ppl_table, save_figure, write_report
from .runs import MethodRun, SharedPrefill, cache_family, cache_memory, make_runs, method_applied, new_cache
from .tasks import ruler
from .tasks.passkey import PasskeyPrompt, extract_number, make_passkey_prompt, run_passkey, score_passkey
from .tasks.ppl import decode_nll, full_forward_nll, run_ppl

_encode = decoding._encode  # the tests tokenize with it

__all__ = [
    "MethodRun",
    "make_runs",
    "method_applied",
    "load_smollm2",
    "tiny_model",
    "ByteTokenizer",
    "PasskeyPrompt",
    "make_passkey_prompt",
    "score_passkey",
    "extract_number",
    "chat_split",
    "prefill",
    "greedy_answer",
    "run_passkey",
    "decode_nll",
    "full_forward_nll",
    "run_ppl",
    "new_cache",
    "cache_family",
    "cache_memory",
    "SharedPrefill",
    "smollm2_installed",
    "passkey_tables",
    "ppl_table",
    "make_plot",
    "save_figure",
    "write_report",
    "merge_results",
    "build_parser",
    "main",
    "ruler",
]
