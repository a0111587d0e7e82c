"""Helpers shared by the kernel tests (test_quest.py, test_sparq.py, test_qaq.py)."""
import pytest
import torch

import kvsparse

HAS_GPU = torch.cuda.is_available() and kvsparse.has_cuda()
#: marks of a test (or parameter) that needs a CUDA device
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and kvsparse built with CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU_MARKS)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["f32", "f16", "bf16"]

# (atol, rtol) of an attention output against the float64 reference; the
# output is rounded to the input dtype.
ATTN_TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def seed(*parts):
    """A deterministic per-test seed."""
    h = 0
    for p in parts:
        for ch in str(p):
            h = (h * 131 + ord(ch)) % (2**31 - 1)
    return h


def make_qkv(device, B, H, Hkv, cap, D, dtype, lens, seed):
    """Random q, k, v (never zeros) and seq_lens. Tokens past seq_lens are random too."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, cap, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, cap, D, generator=g).to(device=device, dtype=dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k, v, seq_lens


def dirty(device, nbytes=1 << 22):
    """Leave NaN bytes in memory the allocator may hand out next (best effort)."""
    t = torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device)
    del t


def assert_close(actual, expected, dtype, what):
    """An output against its float64 reference within the dtype's ATTN_TOL."""
    atol, rtol = ATTN_TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


#: the head dims beyond 64 and 128 that the kernel sweeps add, each with a few
#: dtypes and shapes (GPU suite time)
NEW_D = (80, 96, 256)
NEW_D_DTYPES = [(torch.float32, "f32"), (torch.bfloat16, "bf16")]


def head_dim_cases(shapes, new_shapes):
    """(dtype, D, *shape) cases: every dtype and shape for D = 64 and 128,
    NEW_D_DTYPES and new_shapes for NEW_D."""
    out = [pytest.param(dt, D, *sh, id=f"{i}-D{D}-" + "-".join(map(str, sh)))
           for dt, i in zip(DTYPES, DT_IDS) for D in (64, 128) for sh in shapes]
    out += [pytest.param(dt, D, *sh, id=f"{i}-D{D}-" + "-".join(map(str, sh)))
            for dt, i in NEW_D_DTYPES for D in NEW_D for sh in new_shapes]
    return out
