"""Scoring a sequence under a release schedule in one parallel pass.

For a policy that decides before the forward pass (window, streaming, ADORE
reading token embeddings, without rebuild), the decode loop's log-probabilities
equal those of one causal forward in which the query at step t sees key j iff
j <= t <= leave[j] (`policy.release_schedule`): every token's hidden states,
and so its keys and values, come from exactly the keys the decode loop shows
it. One pass of O(n^2) attention instead of n sequential steps: for training
and tuning. The reported tables come from the decode loop (engine.score).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from models.attention import reference_attention
from models.cache import KVCache
from models.llama import LlamaConfig, Params, forward, head_logits


@functools.partial(jax.jit, static_argnums=(1, 4))
def schedule_logprobs(params: Params, cfg: LlamaConfig, tokens: jax.Array, leave: jax.Array, rows: int = 512):
    """Log-probabilities [B, n - 1] fp32 of tokens[:, 1:] for tokens [B, n], the
    query at step t seeing key j iff j <= t <= leave[b, j] (leave [B, n] int32).
    Equals engine.score(..., prefill=1) of the policy that made `leave`.
    rows: query rows per output-projection block (bounds the [B, rows, V] logits)."""
    B, n = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))
    empty = KVCache.empty(cfg.num_layers, B, 0, cfg.num_kv_heads, cfg.head_dim, params.embed.dtype)
    attn = functools.partial(reference_attention, key_until=leave)
    # an identity head returns the final-normalized hidden states; the real head runs in blocks below
    bare = dataclasses.replace(params, lm_head=jnp.eye(cfg.hidden_size, dtype=params.embed.dtype))
    h = forward(bare, cfg, tokens, pos, empty, attn)[0].astype(params.embed.dtype)  # [B, n, E]
    pad = -(n - 1) % rows
    h = jnp.pad(h[:, : n - 1], ((0, 0), (0, pad), (0, 0)))
    target = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad)))

    def block(i):
        x = jax.lax.dynamic_slice_in_dim(h, i * rows, rows, axis=1)
        y = jax.lax.dynamic_slice_in_dim(target, i * rows, rows, axis=1)
        logp = jax.nn.log_softmax(head_logits(params, x), axis=-1)
        return jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]

    lp = jax.lax.map(block, jnp.arange((n - 1 + pad) // rows))  # [blocks, B, rows]
    return jnp.swapaxes(lp, 0, 1).reshape(B, -1)[:, : n - 1]
