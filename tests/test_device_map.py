"""Models dispatched with accelerate's ``device_map``: each layer's cache and
ops on that layer's device (tiny random Llama)."""
import pytest
import torch

pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

import kvsparse  # noqa: E402

from test_hf_patch import greedy, prompt, tiny_model  # noqa: E402

LAYERS = 3


def _dispatch(model, devices):
    """``devices[i]``: the device of decoder layer ``i``; embeddings on the
    first, norm and head on the last."""
    dm = {f"model.layers.{i}": d for i, d in enumerate(devices)}
    dm.update({"model.embed_tokens": devices[0], "model.rotary_emb": devices[0],
               "model.norm": devices[-1], "lm_head": devices[-1]})
    return accelerate.dispatch_model(model, device_map=dm)


def _check(devices, runs_on=None):
    """``runs_on``: where each layer executes (accelerate runs CPU-mapped
    layers of a GPU model on the GPU, their weights offloaded); default ``devices``."""
    runs_on = runs_on or devices
    model = tiny_model(layers=LAYERS, head_dim=64)  # a head dim the CUDA kernels take
    ids = prompt(40)
    ref = greedy(model, ids, n=8)
    model = _dispatch(model, devices)
    # full budget: the unpatched tokens; a small one: different tokens (not dense)
    kvsparse.patch(model, method="quest", token_budget=1024, page_size=16)
    out = greedy(model, ids.to(devices[0]), n=8, return_dict_in_generate=True)
    assert torch.equal(out.sequences.cpu(), ref)
    for i, layer in enumerate(out.past_key_values.layers):
        assert layer.keys.device == torch.device(runs_on[i])
    cache = kvsparse.make_cache(model, 1)
    assert [layer.device for layer in cache.layers] == [torch.device(d) for d in runs_on]
    kvsparse.patch(model, method="quest", token_budget=16, page_size=8, dense_layers=0)
    assert not torch.equal(greedy(model, ids.to(devices[0]), n=8).cpu(), ref)


def test_cpu_device_map():
    _check(["cpu"] * LAYERS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_and_cpu_device_map():
    _check(["cuda:0", "cpu", "cuda:0"], runs_on=["cuda:0"] * LAYERS)
