"""Configuration objects of the sparse-attention methods.

One validated dataclass per method, defined with its method in
:mod:`kvsparse.methods` (the fields they share in
:class:`~kvsparse.methods.base.MethodConfig`). Build one directly
(``QuestConfig(...)``) or by name with :func:`make_config`
(``make_config("quest", token_budget=512)``). Every config prints its fields
(``repr``) and converts to a plain dict (:meth:`~MethodConfig.to_dict`);
invalid values raise ``ValueError`` naming the field.
"""
from . import methods
from .methods.base import MethodConfig
from .methods.qaq import QAQConfig
from .methods.quest import QuestConfig
from .methods.sparq import SparQConfig

__all__ = ["MethodConfig", "QuestConfig", "SparQConfig", "QAQConfig", "make_config", "supported_methods"]


def supported_methods():
    """Names accepted by :func:`make_config`."""
    return methods.names()


def make_config(method="quest", **kwargs):
    """Build the config of ``method`` from keyword arguments.

    ``method`` may also be a config object already (returned as is, or a
    validated copy with ``kwargs`` applied).

    Raises:
        ValueError: unknown method, unknown field or invalid value.
    """
    if isinstance(method, MethodConfig):
        return method.replace(**kwargs) if kwargs else method
    return methods.get(method).make_config(**kwargs)
