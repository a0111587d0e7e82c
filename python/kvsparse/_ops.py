"""Loads the compiled ops (``kvsparse._C``) and registers their fake kernels.

Importing ``kvsparse._C`` runs the ``TORCH_LIBRARY(kvsparse, ...)`` static
registrations, which define ``torch.ops.kvsparse.*`` with CPU (and, when
compiled in, CUDA) implementations. The fake (meta) kernels below compute only
output shapes and dtypes, so the ops work under FakeTensor, torch.compile and
torch.export.
"""
import torch

from . import _C  # noqa: F401  (loads the op registrations)

__all__ = ["ops", "with_cuda", "int_arg", "float_arg"]

ops = torch.ops.kvsparse

#: True when the CUDA kernels were compiled into kvsparse._C.
with_cuda = bool(getattr(_C, "WITH_CUDA", 0))


_I64 = (-(1 << 63), (1 << 63) - 1)


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


def _ceil_div(a, b):
    return (a + b - 1) // b


@torch.library.register_fake("kvsparse::quest_page_metadata")
def _page_metadata_fake(k, seq_lens, page_size):
    B, Hkv, cap, D = k.shape
    max_pages = _ceil_div(cap, page_size)
    kmin = k.new_empty((B, Hkv, max_pages, D))
    kmax = k.new_empty((B, Hkv, max_pages, D))
    return kmin, kmax


@torch.library.register_fake("kvsparse::quest_update_metadata")
def _update_metadata_fake(k, kmin, kmax, start_lens, seq_lens, page_size):
    return None


@torch.library.register_fake("kvsparse::quest_page_scores")
def _page_scores_fake(q, kmin, kmax, seq_lens, page_size, group):
    B, H, _ = q.shape
    Hkv, max_pages = kmin.shape[1], kmin.shape[2]
    Hs = Hkv if group else H
    return q.new_empty((B, Hs, max_pages), dtype=torch.float32)


@torch.library.register_fake("kvsparse::quest_select_pages")
def _select_pages_fake(scores, seq_lens, page_size, token_budget):
    B, Hs, max_pages = scores.shape
    n_sel = torch.sym_min(token_budget // page_size, max_pages)
    return scores.new_empty((B, Hs, n_sel), dtype=torch.int32)


@torch.library.register_fake("kvsparse::quest_sparse_attention")
def _sparse_attention_fake(q, k, v, page_idx, seq_lens, page_size, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("kvsparse::quest_attention")
def _attention_fake(q, k, v, kmin, kmax, seq_lens, page_size, token_budget, group, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ---- SparQ -------------------------------------------------------------------


@torch.library.register_fake("kvsparse::sparq_build")
def _sparq_build_fake(k, v, seq_lens):
    B, Hkv, cap, D = k.shape
    return k.new_empty((B, Hkv, D, cap)), k.new_empty((B, Hkv, D), dtype=torch.float32)


@torch.library.register_fake("kvsparse::sparq_append")
def _sparq_append_fake(k_new, v_new, k, v, kt, v_mean, seq_lens):
    return None


@torch.library.register_fake("kvsparse::sparq_top_channels")
def _sparq_top_channels_fake(q, r, group_size):
    B, H, _ = q.shape
    return q.new_empty((B, H // group_size, r), dtype=torch.int32)


@torch.library.register_fake("kvsparse::sparq_approx_scores")
def _sparq_approx_scores_fake(q, kt, i1, seq_lens):
    B, H, _ = q.shape
    return q.new_empty((B, H, kt.shape[3]), dtype=torch.float32)


@torch.library.register_fake("kvsparse::sparq_top_positions")
def _sparq_top_positions_fake(s_hat, seq_lens, k, local_window, group_size):
    B, H, _ = s_hat.shape
    return s_hat.new_empty((B, H // group_size, k), dtype=torch.int32)


@torch.library.register_fake("kvsparse::sparq_sparse_attention")
def _sparq_sparse_attention_fake(q, k, v, i2, s_hat, v_mean, seq_lens, scale, reallocate):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("kvsparse::sparq_attention")
def _sparq_attention_fake(q, k, v, kt, v_mean, seq_lens, r, k_top, local_window, group, reallocate, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ---- QAQ ----------------------------------------------------------------------


@torch.library.register_fake("kvsparse::qaq_key_bits")
def _qaq_key_bits_fake(rng, q_sq, seq_lens, sigma_s, allowed, n_recent):
    return rng.new_empty(rng.shape, dtype=torch.uint8)


@torch.library.register_fake("kvsparse::qaq_value_bits")
def _qaq_value_bits_fake(rng, s_max, seq_lens, sigma_x, allowed, n_recent):
    return rng.new_empty(rng.shape, dtype=torch.uint8)


@torch.library.register_fake("kvsparse::qaq_quantize")
def _qaq_quantize_fake(x, pos, new_widths, new_offsets, arena, offsets, widths, sz, oidx, oval):
    return None


@torch.library.register_fake("kvsparse::qaq_dequantize")
def _qaq_dequantize_fake(arena, offsets, widths, sz, oidx, oval, seq_lens, num_kv_heads, head_dim):
    B, _, cap = offsets.shape
    return oval.new_empty((B, num_kv_heads, cap, head_dim))


@torch.library.register_fake("kvsparse::qaq_requantize")
def _qaq_requantize_fake(arena, offsets, widths, sz, oidx, oval, new_widths, seq_lens, num_kv_heads, head_dim):
    return None


@torch.library.register_fake("kvsparse::qaq_attention")
def _qaq_attention_fake(q, k_arena, k_offsets, k_widths, k_sz, k_oidx, k_oval, v_arena, v_offsets, v_widths,
                        v_sz, v_oidx, v_oval, seq_lens, num_kv_heads, scale, return_p_max):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if return_p_max:
        pm = q.new_empty((q.shape[0], num_kv_heads, k_offsets.shape[2]), dtype=torch.float32)
    else:
        pm = q.new_empty((0,), dtype=torch.float32)
    return out, pm
