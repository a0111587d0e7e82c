"""kvsparse: sparse KV-cache attention for LLM decoding (C/CUDA kernels as torch ops).

Submodules:
  kvsparse.quest      Quest (query-aware page selection) decode attention.
  kvsparse.reference  float64 plain-PyTorch reference implementations.

The raw ops are ``torch.ops.kvsparse.*``.
"""
from . import _ops  # noqa: F401  (loads kvsparse._C and registers fake kernels)
from . import quest  # noqa: F401

__version__ = "0.1.0"

__all__ = ["quest", "has_cuda", "__version__"]


def has_cuda() -> bool:
    """True when the CUDA kernels were compiled into ``kvsparse._C``.

    (Whether a GPU is present at run time is ``torch.cuda.is_available()``.)
    """
    return _ops.with_cuda
