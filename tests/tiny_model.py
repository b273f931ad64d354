"""A tiny random Llama and a random controller, shared by engine and policy tests."""

import functools

import jax
import numpy as np
from flax import nnx

from adore_jax.controller import new_controller
from models.llama import LlamaConfig, init_params

CFG = LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, max_position_embeddings=256, eos_token_ids=(127,),
)

# Drawing the random weights compiles a few small programs (about 4 s on a 2-core CPU), and
# conftest drops every test module's compiled programs after it: the values are drawn once
# per process and kept on the host; each call hands out fresh device arrays of them.


@functools.cache
def _host_params(seed: int):
    return jax.device_get(init_params(CFG, jax.random.key(seed), scale=0.3))


@functools.cache
def _host_controller(seed: int, d_c: int, feature_layer):
    gd, state = nnx.split(new_controller(CFG.hidden_size, d_c, seed=seed, feature_layer=feature_layer))
    return gd, jax.device_get(state)


def tiny_params(seed: int = 0):
    return jax.device_put(_host_params(seed))


def tiny_controller(seed: int = 0, d_c: int = 16, feature_layer=None):
    """(graphdef, state) of a random controller for CFG (embeddings, or the hidden
    state entering layer feature_layer)."""
    gd, state = _host_controller(seed, d_c, feature_layer)
    return gd, jax.device_put(state)


def prompts(seed, lens, vocab=120):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lens]
