"""Loads the compiled ops (``kvsparse._C``) and holds what the method modules share.

Importing ``kvsparse._C`` runs the ``TORCH_LIBRARY(kvsparse, ...)`` static
registrations, which define ``torch.ops.kvsparse.*`` with CPU (and, when
compiled in, CUDA) implementations.

The fake (meta) kernels, which give the ops' output shapes and dtypes under
FakeTensor, torch.compile and torch.export, live next to each method's
wrappers: ``kvsparse.quest``, ``kvsparse.sparq`` and ``kvsparse.qaq`` register
theirs when imported. ``import kvsparse`` (which any ``import kvsparse.<sub>``
runs first) imports all three, so the fakes are registered whenever the ops
are loaded through the package. The ``check_*`` helpers below are the checks
those fakes share: each mirrors a check of csrc/ops/checks.h (same error type:
TypeError for dtypes, ValueError for shapes, RuntimeError for devices) and is
never stricter than the real op. Contiguity and the values of index/length
tensors are left to the real op.
"""
import torch

from . import _C  # noqa: F401  (loads the op registrations)

__all__ = ["ops", "with_cuda", "int_arg", "float_arg"]  # and the check_* helpers of the fakes

ops = torch.ops.kvsparse

#: True when the CUDA kernels were compiled into kvsparse._C.
with_cuda = bool(getattr(_C, "WITH_CUDA", 0))


_I64 = (-(1 << 63), (1 << 63) - 1)
_INT32_MAX = (1 << 31) - 1  # INT32_MAX


def int_arg(x, name):
    """``x`` as a Python int that fits the ops' int64 arguments.

    Raises TypeError (not an integer) or ValueError (outside int64), naming ``name``.
    """
    if isinstance(x, bool) or not hasattr(x, "__index__"):
        raise TypeError(f"kvsparse: {name} must be an integer, got {type(x).__name__}")
    v = x.__index__()
    if not (_I64[0] <= v <= _I64[1]):
        raise ValueError(f"kvsparse: {name} = {v} does not fit in a 64-bit integer")
    return v


def float_arg(x, name):
    """``float(x)``; TypeError naming ``name`` when x is not a real number."""
    if isinstance(x, (str, bytes)) or (torch.is_tensor(x) and x.numel() != 1):
        raise TypeError(f"kvsparse: {name} must be a real number, got {type(x).__name__}")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"kvsparse: {name} must be a real number, got {type(x).__name__}") from None


_SEQUENCE_ARGS = {"allowed"}  # arguments that are Python sequences by design


def tensor_errors(fn):
    """Wrap a public op wrapper: when the call fails with the dispatcher's
    ``RuntimeError`` because an argument that must be a tensor is something
    else (a Python list, a NumPy array), raise ``TypeError`` naming that
    argument instead (the dispatcher's message dumps the whole value). The
    success path is the plain call."""
    import functools
    import inspect

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError:
            for name, x in sig.bind(*args, **kwargs).arguments.items():
                numpy = type(x).__module__ == "numpy"
                if name not in _SEQUENCE_ARGS and (numpy or type(x) in (list, tuple)):  # not a store (a named tuple)
                    kind = f"numpy.{type(x).__name__}" if numpy else type(x).__name__
                    raise TypeError(f"kvsparse: {fn.__name__}: {name} must be a torch.Tensor, got {kind}") from None
            raise

    return wrapper


def wrap_public(namespace, names):
    """:func:`tensor_errors` over the functions ``names`` of a module's ``namespace``."""
    for n in names:
        f = namespace.get(n)
        if callable(f) and not isinstance(f, type) and getattr(f, "__module__", "") == namespace["__name__"]:
            namespace[n] = tensor_errors(f)


def ceil_div(a, b):
    """ceil(a / b) for a >= 0, b >= 1 (works on SymInts)."""
    return (a + b - 1) // b


# ---- checks shared by the fake kernels (mirror csrc/ops/checks.h) -------------

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_float(t, name):
    """t is float32, float16 or bfloat16 (to_ks_dtype)."""
    torch._check_type(t.dtype in FLOATS, lambda: f"kvsparse: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_dtype(t, dtype, name):
    """t has exactly ``dtype``."""
    torch._check_type(t.dtype == dtype, lambda: f"kvsparse: {name} must be {dtype}, got {t.dtype}")


def check_same_dtype(t, name, ref, ref_name):
    torch._check_type(t.dtype == ref.dtype,
                      lambda: f"kvsparse: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")


def check_dim(t, dim, name, layout):
    torch._check_value(t.dim() == dim, lambda: f"kvsparse: {name} must be a {dim}-D tensor {layout}, got shape {tuple(t.shape)}")


def check_size(t, d, expected, name, what):
    torch._check_value(t.shape[d] == expected,
                       lambda: f"kvsparse: {name}.shape[{d}] ({what}) must be {expected}, got shape {tuple(t.shape)}")


def check_same_shape(t, name, ref, ref_name):
    torch._check_value(t.dim() == ref.dim() and all(a == b for a, b in zip(t.shape, ref.shape)),
                       lambda: f"kvsparse: {name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


def check_device(t, name, ref, ref_name):
    torch._check(t.device == ref.device,
                 lambda: f"kvsparse: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                 "all tensors must be on the same device")


#: head dims the CUDA kernels are instantiated for (check_head_dim in
#: csrc/ops/checks.h; re-exported as kvsparse.methods.base.CUDA_HEAD_DIMS); QAQ's attention
#: takes fewer, which its real op checks (check_qaq_attention_head_dim)
CUDA_HEAD_DIMS = (64, 80, 96, 128, 256)


def check_head_dim(D, device):
    """One of CUDA_HEAD_DIMS on CUDA, a multiple of 8 in [8, 256] elsewhere (check_head_dim)."""
    if device.type == "cuda":
        torch._check_value(D in CUDA_HEAD_DIMS, lambda: "kvsparse: head_dim D must be "
                           f"{', '.join(map(str, CUDA_HEAD_DIMS[:-1]))} or {CUDA_HEAD_DIMS[-1]} on CUDA, got {D}")
    else:
        torch._check_value(D >= 8 and D % 8 == 0 and D <= 256,
                           lambda: f"kvsparse: head_dim D must be a multiple of 8 in [8, 256], got {D}")


def check_lens(lens, name, B, ref, ref_name):
    """int32 [B] on ref's device (check_lens_tensor; values are not checked)."""
    check_dtype(lens, torch.int32, name)
    check_dim(lens, 1, name, "[B]")
    check_size(lens, 0, B, name, "B")
    check_device(lens, name, ref, ref_name)


def check_q(q):
    """q float [B, H, D] with H >= 1; returns (B, H, D)."""
    check_float(q, "q")
    check_dim(q, 3, "q", "[B, H, D]")
    torch._check_value(q.shape[1] >= 1, lambda: f"kvsparse: q must have at least one head, got shape {tuple(q.shape)}")
    return tuple(q.shape)


def check_cache(k, name):
    """k-like cache float [B, Hkv, cap, D] with Hkv >= 1; returns (B, Hkv, cap, D)."""
    check_float(k, name)
    check_dim(k, 4, name, "[B, Hkv, cap, D]")
    torch._check_value(k.shape[1] >= 1, lambda: f"kvsparse: {name} must have at least one KV head, got shape {tuple(k.shape)}")
    torch._check_value(k.shape[2] <= _INT32_MAX, lambda: f"kvsparse: {name}.shape[2] (cap) must be <= 2^31 - 1")
    return tuple(k.shape)


def check_gqa(H, Hkv):
    torch._check_value(H % Hkv == 0, lambda: f"kvsparse: the number of query heads H of q ({H}) must be a multiple "
                       f"of the number of KV heads Hkv ({Hkv})")


def check_qkv(q, k, v):
    """Decode attention operands (check_qkv); returns (B, H, Hkv, cap, D)."""
    B, H, D = check_q(q)
    _, Hkv, cap, _ = check_cache(k, "k")
    check_same_dtype(k, "k", q, "q")
    check_device(k, "k", q, "q")
    check_same_dtype(v, "v", q, "q")
    check_dim(v, 4, "v", "[B, Hkv, cap, D]")
    check_device(v, "v", q, "q")
    check_size(k, 0, B, "k", "B, as q.shape[0]")
    check_size(k, 3, D, "k", "D, as q.shape[2]")
    check_same_shape(v, "v", k, "k")
    check_gqa(H, Hkv)
    check_head_dim(D, q.device)
    return B, H, Hkv, cap, D

