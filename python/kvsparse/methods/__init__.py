"""The sparse / quantized KV-cache methods, one module each, and their registry.

``kvsparse.methods.get("quest")`` is Quest's :class:`Method` object;
``kvsparse.methods.names()`` lists the registered methods. A new method is a
module here that defines its config and :class:`Method` and calls
:func:`register` (see :mod:`kvsparse.methods.base`), imported below.
"""
from .base import Method, MethodConfig, get, names, register, registered

# each module registers its method (in this order: names() lists them so)
from . import quest, sparq, qaq, quest_qaq  # noqa: E402

__all__ = ["Method", "MethodConfig", "get", "names", "register", "registered", "quest", "sparq", "qaq", "quest_qaq"]
