"""Token sampling: greedy, temperature, top-k, top-p; all traced (no recompiles)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation."""

    temperature: jax.Array | float = 0.0
    top_k: jax.Array | int = 0
    top_p: jax.Array | float = 1.0

    def validate(self) -> "SamplingParams":
        """Check ranges on host values; raises ValueError with a one-line message."""
        t, k, p = float(self.temperature), int(self.top_k), float(self.top_p)
        if not t >= 0:
            raise ValueError(f"temperature must be >= 0, got {t}")
        if k < 0:
            raise ValueError(f"top-k must be >= 0, got {k}")
        if not 0 < p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {p}")
        return SamplingParams(jnp.float32(t), jnp.int32(k), jnp.float32(p))


def row_keys(key: jax.Array, step: jax.Array, batch: int) -> jax.Array:
    """One key per row [B] that depends on (seed, step, row) only, not on the batch size."""
    k = jax.random.fold_in(key, step)
    return jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(batch))


def _truncated_sample(logits: jax.Array, keys: jax.Array, sp: SamplingParams) -> jax.Array:
    V = logits.shape[-1]
    l = logits / jnp.maximum(sp.temperature, 1e-6)
    srt = -jnp.sort(-l, axis=-1)  # [B, V] descending
    kth = jnp.where(sp.top_k > 0, srt[:, jnp.clip(sp.top_k - 1, 0, V - 1)], -jnp.inf)
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
    keep_p = before < sp.top_p
    p_thresh = jnp.min(jnp.where(keep_p, srt, jnp.inf), axis=-1)
    thresh = jnp.maximum(kth, p_thresh)[:, None]
    l = jnp.where(l >= thresh, l, -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys, l)


def sample(logits: jax.Array, keys: jax.Array, sp: SamplingParams) -> jax.Array:
    """Next tokens [B] int32 from logits [B, V] fp32 with per-row keys [B]."""
    tok = jax.lax.cond(
        sp.temperature > 0,
        lambda: _truncated_sample(logits, keys, sp),
        lambda: jnp.argmax(logits, axis=-1),
    )
    return tok.astype(jnp.int32)
