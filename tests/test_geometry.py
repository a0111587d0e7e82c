"""kvsparse.geometry: a model is read in one place (read_model), once per
patch() and once per cache, and the result is what the cache is built from.
And the modules of the package import one another one way: no import circle."""
import ast
import pathlib

import pytest
import torch

pytest.importorskip("transformers")

import kvsparse  # noqa: E402
from kvsparse import geometry, hf  # noqa: E402
from kvsparse.cache import cache_geometry, sliding_layers  # noqa: E402
from kvsparse.geometry import ModelGeometry, read_model  # noqa: E402

from test_hf_families import family_model  # noqa: E402
from test_hf_patch import tiny_model  # noqa: E402

PKG = pathlib.Path(kvsparse.__file__).parent


def test_read_model_llama():
    model = tiny_model(layers=3, head_dim=32)
    g = read_model(model)
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim) == (3, 4, 2, 32)
    assert g.sliding_layers == () and g.model_config is model.config
    assert g.layer_devices == (torch.device("cpu"),) * 3 and g.device == torch.device("cpu")
    assert g.dtype == torch.float32
    assert [m.layer_idx for m in g.attention_modules] == [0, 1, 2]
    assert "attention_modules" not in repr(g) and "head_dim=32" in repr(g)
    # the old functions of kvsparse.cache agree with it
    assert cache_geometry(model.config) == (3, 2, 32) and sliding_layers(model.config) == ()


def test_read_model_hybrid_and_from_config():
    model = family_model("gemma3")
    g = read_model(model)
    assert g.head_dim == 256 and g.sliding_layers == (0, 2)
    c = ModelGeometry.from_config(model.config)
    assert (c.num_layers, c.num_kv_heads, c.head_dim, c.sliding_layers) == (3, 2, 256, (0, 2))
    assert c.attention_modules == () and c.layer_devices == (None,) * 3 and c.dtype is None
    assert g.on_device("meta").layer_devices == (torch.device("meta"),) * 3


def test_read_model_rejects_unsupported():
    with pytest.raises(TypeError, match="is not supported; supported models: LlamaForCausalLM"):
        read_model(torch.nn.Linear(2, 2))


def test_patch_and_make_cache_read_the_model_once(monkeypatch):
    model = tiny_model(layers=2)
    calls = []

    def counted(m):
        calls.append(m)
        return read_model(m)

    monkeypatch.setattr(hf, "read_model", counted)
    hf.patch(model, method="quest")  # the self-check's cache is built from the patch's reading
    try:
        assert calls == [model]
        cache = hf.make_cache(model, batch_size=2)
        assert calls == [model, model]
        assert cache.geometry.num_layers == 2 and cache.geometry.attention_modules
        assert [layer.device for layer in cache.layers] == [torch.device("cpu")] * 2
        assert [layer.batch_size for layer in cache.layers] == [2, 2]
    finally:
        hf.unpatch(model)


def test_allocate_needs_a_model_geometry():
    cache = kvsparse.cache.QuestCache(num_layers=2)
    assert cache.geometry is None
    with pytest.raises(ValueError, match="geometry read from a model"):
        cache.allocate(1)


def _imports(path, module):
    """The kvsparse modules ``module`` (at ``path``) imports, anywhere in it."""
    pkg_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg_parts[: len(pkg_parts) - node.level + 1] if node.level else []
            b = ".".join(base + ([node.module] if node.module else []))
            out.add(b)
            out.update(f"{b}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("kvsparse")}


def test_methods_import_neither_the_cache_nor_the_configs():
    """The dependency runs one way: kvsparse.cache and kvsparse.config are
    built from the methods, which never import them (not even in a function)."""
    for path in sorted((PKG / "methods").glob("*.py")):
        name = "kvsparse.methods" + ("" if path.stem == "__init__" else f".{path.stem}")
        bad = {m for m in _imports(path, name)
               if m.split(".")[:2] in (["kvsparse", "cache"], ["kvsparse", "config"], ["kvsparse", "hf"])}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_geometry_imports_no_cache():
    assert not {m for m in _imports(PKG / "geometry.py", "kvsparse.geometry")
                if m.split(".")[:2] in (["kvsparse", "cache"], ["kvsparse", "hf"])}
    assert geometry.supported_models() == hf.supported_models()
