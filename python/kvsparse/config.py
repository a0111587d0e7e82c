"""Configuration objects of the sparse-attention methods.

One validated dataclass per method. Build one directly (``QuestConfig(...)``)
or by name with :func:`make_config` (``make_config("quest", token_budget=512)``).
Every config prints its fields (``repr``) and converts to a plain dict
(:meth:`to_dict`); invalid values raise ``ValueError`` naming the field.
"""
from dataclasses import asdict, dataclass, fields
from typing import Optional

__all__ = ["MethodConfig", "QuestConfig", "make_config", "supported_methods"]


def _check_int(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"kvsparse: {name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"kvsparse: {name} must be >= {minimum}, got {value}")


class MethodConfig:
    """Common behaviour of the method configs (subclasses are dataclasses)."""

    #: method name used by :func:`make_config` and ``kvsparse.patch(method=...)``
    method = None

    def to_dict(self):
        """The fields as a plain dict, plus ``"method"``."""
        return {"method": self.method, **asdict(self)}

    def replace(self, **changes):
        """A validated copy with some fields changed."""
        return type(self)(**{**asdict(self), **changes})

    def validate(self):  # pragma: no cover - overridden
        pass

    def __post_init__(self):
        self.validate()


@dataclass(repr=True, eq=True)
class QuestConfig(MethodConfig):
    """Quest (query-aware page selection) for decode attention.

    Attributes:
        token_budget: tokens attended per head (rounded down to whole pages)
            by each sparse decode step; >= ``page_size``.
        page_size: tokens per page ``P`` (the granularity of the selection).
        dense_layers: the first ``dense_layers`` decoder layers keep dense
            decode attention (Quest's recommendation: the first layers are
            not sparse enough to prune).
        mode: ``"group"``: one page set per KV head (shared by the query
            heads of a GQA group); ``"head"``: one page set per query head.
        max_cache_len: ``None``: the KV buffers grow in chunks as needed.
            An int: every buffer is allocated once at this length (static
            shapes and addresses, usable by ``torch.compile`` / CUDA graphs).
        chunk_size: growth granularity of the dynamic buffers, in tokens
            (a multiple of ``page_size``).
    """

    method = "quest"

    token_budget: int = 1024
    page_size: int = 16
    dense_layers: int = 2
    mode: str = "group"
    max_cache_len: Optional[int] = None
    chunk_size: int = 256

    def validate(self):
        _check_int("page_size", self.page_size, 1)
        _check_int("token_budget", self.token_budget)
        if self.token_budget < self.page_size:
            raise ValueError(
                f"kvsparse: token_budget ({self.token_budget}) must be >= page_size ({self.page_size})"
            )
        _check_int("dense_layers", self.dense_layers, 0)
        if not isinstance(self.mode, str) or self.mode not in ("group", "head"):
            raise ValueError(f"kvsparse: mode must be 'group' or 'head', got {self.mode!r}")
        if self.max_cache_len is not None:
            _check_int("max_cache_len", self.max_cache_len, 1)
        _check_int("chunk_size", self.chunk_size, 1)
        if self.chunk_size % self.page_size != 0:
            raise ValueError(
                f"kvsparse: chunk_size ({self.chunk_size}) must be a multiple of page_size ({self.page_size})"
            )


_METHODS = {"quest": QuestConfig}
# Methods planned but not implemented yet; named in error messages.
_PLANNED = ("sparq", "qaq")


def supported_methods():
    """Names accepted by :func:`make_config`."""
    return tuple(_METHODS)


def make_config(method="quest", **kwargs):
    """Build the config of ``method`` from keyword arguments.

    ``method`` may also be a config object already (returned as is, or a
    validated copy with ``kwargs`` applied).

    Raises:
        ValueError: unknown method, unknown field or invalid value.
    """
    if isinstance(method, MethodConfig):
        return method.replace(**kwargs) if kwargs else method
    if not isinstance(method, str) or method.lower() not in _METHODS:
        planned = [m for m in _PLANNED if m not in _METHODS]
        hint = f" ({', '.join(planned)} are planned but not implemented yet)" if planned else ""
        raise ValueError(
            f"kvsparse: unknown method {method!r}; supported: {', '.join(sorted(_METHODS))}{hint}"
        )
    cls = _METHODS[method.lower()]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ValueError(
            f"kvsparse: unknown option(s) {', '.join(unknown)} for method {cls.method!r}; "
            f"valid: {', '.join(sorted(names))}"
        )
    return cls(**kwargs)
