"""Loads the compiled ops (``kvsparse._C``) and registers their fake kernels.

Importing ``kvsparse._C`` runs the ``TORCH_LIBRARY(kvsparse, ...)`` static
registrations, which define ``torch.ops.kvsparse.*`` with CPU (and, when
compiled in, CUDA) implementations. The fake (meta) kernels below compute only
output shapes and dtypes, so the ops work under FakeTensor, torch.compile and
torch.export.
"""
import torch

from . import _C  # noqa: F401  (loads the op registrations)

__all__ = ["ops", "with_cuda"]

ops = torch.ops.kvsparse

#: True when the CUDA kernels were compiled into kvsparse._C.
with_cuda = bool(getattr(_C, "WITH_CUDA", 0))


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
