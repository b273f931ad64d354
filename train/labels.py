"""Controller labels from the backbone's full attention, computed blockwise.

The target of the shared (one decision for all layers and heads) sparse
attention: A[t, i] = attention weight of query t on key i, averaged over layers
and heads. y(t, i) = 1 iff i is among the top K keys of row t (i <= t).

Labels from the future (horizon H): a released token is gone, so the label of
key i at step t looks at the next H queries: F[t, i] = max (or sum) of
A[q, i] over q in [t, t + H), and y(t, i) = 1 iff i is among the top K of
F[t, :] (i <= t). H = 1 is the current row.

Blockwise: one causal forward fills a full cache; then each block of Bq query
rows runs again against that cache (slots at the block's positions and later
read as empty) with statistics on. Memory is O(B x Bq x n), never n x n for
the whole batch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from models.cache import KVCache, write_rows
from models.llama import LlamaConfig, Params, forward


def full_cache(params: Params, cfg: LlamaConfig, tokens: jax.Array) -> KVCache:
    """KV of a causal forward over tokens [B, n]; slot i holds position i."""
    B, n = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))
    empty = KVCache.empty(cfg.num_layers, B, n, cfg.num_kv_heads, cfg.head_dim, params.embed.dtype)
    _, k, v, *_ = forward(params, cfg, tokens, pos, empty, logits_rows=jnp.zeros((B, 1), jnp.int32))
    return write_rows(empty, k, v, pos, pos)


def attention_block(params: Params, cfg: LlamaConfig, tokens, cache: KVCache, start, block: int) -> jax.Array:
    """Layer- and head-averaged attention [B, block, n] of query rows
    [start, start + block) over all n keys (zero where key > query)."""
    B, n = tokens.shape
    rows = jnp.arange(block, dtype=jnp.int32) + start
    pos = jnp.broadcast_to(rows, (B, block))
    toks = jax.lax.dynamic_slice_in_dim(tokens, start, block, axis=1)
    view = dataclasses.replace(cache, pos=jnp.where(cache.pos < start, cache.pos, -1))
    mass = forward(params, cfg, toks, pos, view, with_stats=True, logits_rows=jnp.zeros((B, 1), jnp.int32)).mass
    mass = mass / cfg.num_heads  # [B, block, n + block]: summed over heads -> mean
    dense = jnp.where(jnp.arange(n) < start, mass[:, :, :n], 0.0)
    own = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((B, block, n), mass.dtype), mass[:, :, n:], start, axis=2)
    return dense + own


def topk_mask(attn: jax.Array, q_pos: jax.Array, k: int) -> jax.Array:
    """y [B, T, n] bool: the top-k causal keys of each row of attn [B, T, n] (rows at q_pos [T]).

    Rows with fewer than k causal keys mark all of them."""
    n = attn.shape[-1]
    causal = jnp.arange(n)[None, :] <= q_pos[:, None]  # [T, n]
    a = jnp.where(causal[None], attn, -1.0)
    kth = jax.lax.top_k(a, min(k, n))[0][..., -1:]
    return causal[None] & (a >= kth)


AGGREGATES = ("max", "sum")


def future_rows(a: jax.Array, after: jax.Array, horizon: int, agg: str = "max") -> jax.Array:
    """F [B, T, n]: row t aggregates rows t .. t + horizon - 1 of a [B, T, n]
    followed by after [B, T', n] (the next rows; zeros past the sequence end).
    agg: "max" or "sum"; horizon in [1, T' + 1]."""
    if agg not in AGGREGATES:
        raise ValueError(f"label aggregate must be one of {AGGREGATES}, got {agg!r}")
    if not 1 <= horizon <= after.shape[1] + 1:
        raise ValueError(f"horizon must be in [1, {after.shape[1] + 1}], got {horizon}")
    rows = jnp.concatenate([a, after], axis=1)
    op, init = (jax.lax.max, -jnp.inf) if agg == "max" else (jax.lax.add, 0.0)
    out = jax.lax.reduce_window(rows, jnp.array(init, rows.dtype), op, (1, horizon, 1), (1, 1, 1), "VALID")
    return out[:, : a.shape[1]]


def topk_labels(params: Params, cfg: LlamaConfig, tokens: jax.Array, k: int, block: int, horizon: int = 1,
                agg: str = "max"):
    """(indices [B, n, K] int32, weights [B, n, K] fp32) of each row's top-K keys
    under layer/head-averaged full attention, aggregated over the next `horizon`
    queries (module docstring; horizon <= block + 1); rows t < K-1 fill their
    missing keys with weight 0. Blocks of `block` query rows run last to first,
    each carrying its attention to the one before: memory O(B x block x n)."""
    B, n = tokens.shape
    cache = full_cache(params, cfg, tokens)
    starts = jnp.arange(0, n, block)

    def one(after, start):
        a = attention_block(params, cfg, tokens, cache, start, block)  # [B, block, n]
        f = future_rows(a, after, horizon, agg)
        causal = jnp.arange(n)[None, :] <= (start + jnp.arange(block))[:, None]
        w, idx = jax.lax.top_k(jnp.where(causal, f, -1.0), k)
        return a, (idx, jnp.maximum(w, 0.0))

    _, (idx, w) = jax.lax.scan(one, jnp.zeros((B, block, n), jnp.float32), starts, reverse=True)
    flat = lambda x: jnp.swapaxes(x, 0, 1).reshape(B, n, k)
    return flat(idx).astype(jnp.int32), flat(w)


@functools.partial(jax.jit, static_argnums=(1, 3, 4))
def attention_labels(params: Params, cfg: LlamaConfig, tokens: jax.Array, k: int, block: int = 256):
    """(attention [B, n, n] averaged over layers and heads, top-k labels [B, n, n] bool)
    for tokens [B, n]; computed in blocks of `block` query rows. For evaluation
    sizes; training uses attention_block per block to stay O(n x block)."""
    B, n = tokens.shape
    cache = full_cache(params, cfg, tokens)

    def one(start):
        a = attention_block(params, cfg, tokens, cache, start, block)
        return a, topk_mask(a, start + jnp.arange(block), k)

    a, y = jax.lax.map(one, jnp.arange(0, n, block))
    flat = lambda x: jnp.swapaxes(x, 0, 1).reshape(B, n, n)
    return flat(a), flat(y)
