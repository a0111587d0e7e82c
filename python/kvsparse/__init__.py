"""kvsparse: sparse KV-cache attention for LLM decoding (C/CUDA kernels as torch ops).

Submodules:
  kvsparse.quest      Quest (query-aware page selection) decode attention.
  kvsparse.sparq      SparQ (sparse-query attention) decode attention.
  kvsparse.qaq        QAQ (per-token bit-width quantized KV cache) and its decode attention.
  kvsparse.reference  float64 plain-PyTorch reference implementations.

The raw ops are ``torch.ops.kvsparse.*``.
"""
from . import _ops  # noqa: F401  (loads kvsparse._C and registers fake kernels)
from . import quest  # noqa: F401
from . import sparq  # noqa: F401
from . import qaq  # noqa: F401

__version__ = "0.1.0"

__all__ = ["quest", "sparq", "qaq", "has_cuda", "__version__"]



def has_cuda() -> bool:
    """True when the CUDA kernels were compiled into ``kvsparse._C``.

    (Whether a GPU is present at run time is ``torch.cuda.is_available()``.)
    """
    return _ops.with_cuda


from . import config  # noqa: F401,E402
from .config import QAQConfig, QuestConfig, SparQConfig, make_config  # noqa: E402
from ._compat import IntegrationError  # noqa: E402

# Hugging Face integration (needs transformers): imported on first use, so
# that `import kvsparse` works without transformers installed.
_LAZY = {
    "patch": "hf", "unpatch": "hf", "patched": "hf", "make_cache": "hf",
    "QuestCache": "cache", "SparQCache": "cache", "QAQCache": "cache", "hf": None, "cache": None,
    "models": None,
    "ruler": "eval",  # the RULER-style suite, kvsparse.eval.tasks.ruler
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        sub = _LAZY[name]
        mod = importlib.import_module(f".{sub or name}", __name__)
        value = mod if sub is None else getattr(mod, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ += ["QuestConfig", "SparQConfig", "QAQConfig", "make_config", "patch", "unpatch", "patched",
            "make_cache", "QuestCache", "SparQCache", "QAQCache", "models", "IntegrationError"]
