"""kvsparse: sparse KV-cache attention for LLM decoding (C/CUDA kernels as torch ops).

Submodules:
  kvsparse.quest      Quest (query-aware page selection) decode attention.
  kvsparse.sparq      SparQ (sparse-query attention) decode attention.
  kvsparse.qaq        QAQ (per-token bit-width quantized KV cache) and its decode attention.
  kvsparse.reference  float64 plain-PyTorch reference implementations.
  kvsparse.methods    the registry of the methods (config, cache contents, decode step of each).

The raw ops are ``torch.ops.kvsparse.*``.
"""
from . import _ops  # noqa: F401  (loads kvsparse._C)
# each method module registers its ops' fake kernels on import, so these
# three must be imported whenever the ops are used through the package
# (any `import kvsparse._ops` / `import kvsparse.<sub>` runs this file first)
from . import quest  # noqa: F401
from . import sparq  # noqa: F401
from . import qaq  # noqa: F401
from . import qaqp  # noqa: F401

__version__ = "0.1.0"

__all__ = ["quest", "sparq", "qaq", "has_cuda", "__version__"]



def has_cuda() -> bool:
    """True when the CUDA kernels were compiled into ``kvsparse._C``.

    (Whether a GPU is present at run time is ``torch.cuda.is_available()``.)
    """
    return _ops.with_cuda


from . import methods  # noqa: E402
from .config import make_config  # noqa: E402  (also makes kvsparse.config)
from ._compat import IntegrationError  # noqa: E402

# every registered method's config class, as kvsparse.<Title>Config (QuestConfig, ...)
for _method in methods.registered():
    globals()[_method.config_class.__name__] = _method.config_class
del _method

# Hugging Face integration (needs transformers): imported on first use, so
# that `import kvsparse` works without transformers installed. Each method's
# cache class is kvsparse.<Title>Cache (QuestCache, ...: kvsparse.cache.cache_class).
_LAZY = {
    "patch": "hf", "unpatch": "hf", "patched": "hf", "make_cache": "hf", "cache_kwargs": "hf",
    "output_cache": "hf", "report": "hf", "hf": None, "cache": None,
    "models": None, "geometry": None,
    "ruler": "eval",  # the RULER-style suite, kvsparse.eval.tasks.ruler
}
_CACHES = {f"{m.title}Cache": m for m in methods.registered()}


def __getattr__(name):
    if name in _CACHES:
        from .cache import cache_class

        value = cache_class(_CACHES[name])
    elif name in _LAZY:
        import importlib

        sub = _LAZY[name]
        mod = importlib.import_module(f".{sub or name}", __name__)
        value = mod if sub is None else getattr(mod, name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ += [m.config_class.__name__ for m in methods.registered()]
__all__ += ["make_config", "patch", "unpatch", "patched", "make_cache", "methods", "models", "IntegrationError"]
__all__ += list(_CACHES)
