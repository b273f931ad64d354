"""Logit parity of models.llama.forward with transformers (fp32, CPU).

Tiny random checkpoints (tests/conftest.py: TINY_CONFIGS) go through load_hf_dir;
the real SmolLM2-135M GGUF goes through load_gguf and is compared with
transformers' own GGUF loader.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

from models.cache import KVCache, write_rows
from models.llama import forward
from models.loading import load_hf_dir

B, T, SPLIT = 2, 11, 5
TINY_TOL = 1e-4  # measured max |diff| <= 2.4e-6 over all configs (logits of scale ~1-4)
GGUF_TOL = 1e-3  # measured max |diff| 1.3e-4 on logits up to ~28 in magnitude

_forward = jax.jit(forward, static_argnums=1)


def _hf_logits(path, tokens: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


@functools.cache
def _tokens(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (B, T)).astype(np.int32)


def _run(cfg, params, tokens, positions, cache):
    logits, new_k, new_v, *_ = _forward(params, cfg, jnp.asarray(tokens), jnp.asarray(positions), cache)
    return np.asarray(logits), new_k, new_v


def test_tiny_checkpoint_logits_match_transformers(tiny_name, tiny_hf_checkpoints):
    """Whole sequence, then in two chunks through the cache: max |logit diff| < 1e-4 (fp32)."""
    name = tiny_name
    path = tiny_hf_checkpoints[name]
    cfg, params = load_hf_dir(path, dtype=jnp.float32)
    tokens = _tokens(cfg.vocab_size)
    ref = _hf_logits(path, tokens)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    empty = KVCache.empty(cfg.num_layers, B, T, cfg.num_kv_heads, cfg.head_dim, jnp.float32)

    full, _, _ = _run(cfg, params, tokens, positions, empty)
    assert np.abs(full - ref).max() < TINY_TOL, f"{name}: full-sequence max diff {np.abs(full - ref).max():.3g}"

    p1, p2 = jnp.asarray(positions[:, :SPLIT]), positions[:, SPLIT:]
    first, new_k, new_v = _run(cfg, params, tokens[:, :SPLIT], p1, empty)
    cache = write_rows(empty, new_k, new_v, slots=p1, positions=p1)
    second, _, _ = _run(cfg, params, tokens[:, SPLIT:], p2, cache)
    chunked = np.concatenate([first, second], axis=1)
    assert np.abs(chunked - ref).max() < TINY_TOL, f"{name}: chunked max diff {np.abs(chunked - ref).max():.3g}"


PROMPT = "The capital of France is Paris. The capital of Germany is Berlin, and the capital of Italy is"


def test_smollm2_gguf_matches_transformers(smollm2_model, hf_smollm2):
    """Our GGUF load (Q/K un-permuted) vs transformers' GGUF load, fp32, one ~20-token forward:
    max |logit diff| < 1e-3 (logits reach ~28; measured 1.3e-4) and the same argmax everywhere."""
    m = smollm2_model
    ids = np.asarray(m.tokenizer(PROMPT).input_ids, np.int32)[None]
    n = ids.shape[1]
    assert 12 <= n <= 32
    cache = KVCache.empty(m.cfg.num_layers, 1, n, m.cfg.num_kv_heads, m.cfg.head_dim, jnp.float32)
    ours, _, _ = _run(m.cfg, m.params, ids, np.arange(n, dtype=np.int32)[None], cache)
    with torch.no_grad():
        ref = hf_smollm2(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    diff = np.abs(ours - ref).max()
    assert diff < GGUF_TOL, f"max diff {diff:.3g} (logit scale {np.abs(ref).max():.1f})"
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_smollm2_config_and_eos(smollm2_model):
    """The GGUF metadata gives SmolLM2-135M's shape; <|im_end|> is an eos id."""
    cfg, tok = smollm2_model.cfg, smollm2_model.tokenizer
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert cfg.tie_word_embeddings and smollm2_model.params.lm_head is None
    assert cfg.vocab_size == 49152 and cfg.rope_theta == 100000.0
    assert tok.convert_tokens_to_ids("<|im_end|>") in cfg.eos_token_ids


def test_unpermute_qk_inverts_llama_cpp_order():
    """llama.cpp writes row (h, i, j) of [H, 2, D/2] to (h, j, i) of [H, D/2, 2]; we undo it."""
    from models.loading import unpermute_qk

    H, D, E = 3, 8, 5
    hf = np.arange(H * D * E, dtype=np.float32).reshape(H * D, E)
    gguf_rows = hf.reshape(H, 2, D // 2, E).swapaxes(1, 2).reshape(H * D, E)
    np.testing.assert_array_equal(unpermute_qk(gguf_rows, H), hf)
    np.testing.assert_array_equal(unpermute_qk(gguf_rows[:, 0], H), hf[:, 0])  # biases too


def test_sharded_load_on_fake_devices(tiny_hf_checkpoints):
    """Loading with a 4-device "model" mesh shards the weights and gives the same logits."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh
        from models.cache import KVCache
        from models.llama import forward
        from models.loading import load_hf_dir
        path = {str(tiny_hf_checkpoints["mha_untied"])!r}
        cfg, plain = load_hf_dir(path)
        mesh = Mesh(np.asarray(jax.devices()[:4]), ("model",))
        _, sharded = load_hf_dir(path, mesh=mesh)
        assert len(sharded.layers.wq.sharding.device_set) == 4
        assert sharded.layers.wq.addressable_shards[0].data.shape[-1] == plain.layers.wq.shape[-1] // 4
        toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
        pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
        cache = KVCache.empty(cfg.num_layers, 2, 0, cfg.num_kv_heads, cfg.head_dim)
        a = forward(plain, cfg, toks, pos, cache)[0]
        b = jax.jit(forward, static_argnums=1)(sharded, cfg, toks, pos, cache)[0]
        print(float(jnp.abs(a - b).max()))
    """)
    env = {**__import__("os").environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-5


def test_gpu_row_padding_leaves_decode_unchanged(monkeypatch, tiny_hf_checkpoints):
    """On GPU a matmul of fewer than GEMM_MIN_ROWS rows is padded with zero rows:
    one decode row (B=1, T=1) gives the logits and new K/V of the unpadded matmul."""
    from models import llama

    cfg, params = load_hf_dir(tiny_hf_checkpoints["gqa_tied"], dtype=jnp.float32)
    cache = KVCache.empty(cfg.num_layers, 1, 8, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    tokens, positions = jnp.array([[5]], jnp.int32), jnp.array([[0]], jnp.int32)
    plain = forward(params, cfg, tokens, positions, cache)
    seen = []
    real_pad = jnp.pad
    monkeypatch.setattr(llama.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(llama.jnp, "pad", lambda x, w, *a, **k: seen.append(x.shape) or real_pad(x, w, *a, **k))
    padded = forward(params, cfg, tokens, positions, cache)
    assert seen and all(s[0] == 1 for s in seen)  # the padded path ran, on one-row inputs
    for a, b in zip(plain[:3], padded[:3]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
