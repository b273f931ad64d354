"""Baseline eviction policies on the shared top-m selection.

window    : the most recent m tokens.
streaming : `sinks` first tokens + the most recent (StreamingLLM).
h2o       : heavy hitters by accumulated attention + a recent window (H2O).
tova      : keep what the current query attends to most (TOVA).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from adore_jax.policies.base import Evicting, last_position


def _key_positions(cache, positions):
    return jnp.concatenate([cache.pos, positions], axis=1)  # [B, S+T]


@dataclasses.dataclass(frozen=True)
class RecencyPolicy(Evicting):
    """window (sinks=0) and streaming (sinks>0): score = position."""

    def scores(self, pp, state, cache, positions, mass):
        return cache.pos.astype(jnp.float32), positions.astype(jnp.float32), state

    def release_schedule(self, pp, x):
        B, n = x.shape[:2]
        return self.release(lambda t: jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32), (B, n)), x)


@dataclasses.dataclass(frozen=True)
class H2OPolicy(Evicting):
    """Score = attention received so far, summed over queries and heads (layer mean)."""

    needs_stats = True

    def init(self, pp, batch, max_total):
        return jnp.zeros((batch, max_total), jnp.float32)  # accumulated attention by position

    def scores(self, pp, acc, cache, positions, mass):
        B, N = acc.shape
        kp = _key_positions(cache, positions)
        received = jnp.sum(jnp.where(positions[:, :, None] >= 0, mass, 0.0), axis=1)  # [B, S+T]
        acc = acc.at[jnp.arange(B)[:, None], jnp.where(kp >= 0, kp, N)].add(received, mode="drop")
        s = jnp.take_along_axis(acc, jnp.maximum(kp, 0), axis=1)
        S = cache.pos.shape[1]
        return s[:, :S], s[:, S:], acc


@dataclasses.dataclass(frozen=True)
class TOVAPolicy(Evicting):
    """Score = attention from the latest query (last valid row), summed over heads."""

    needs_stats = True

    def scores(self, pp, state, cache, positions, mass):
        last = jnp.argmax(positions, axis=1)  # row holding the largest position
        s = jnp.take_along_axis(mass, last[:, None, None], axis=1)[:, 0]  # [B, S+T]
        S = cache.pos.shape[1]
        return s[:, :S], s[:, S:], state


@dataclasses.dataclass(frozen=True)
class OraclePolicy(Evicting):
    """Keeps every token's KV; each decode query attends only to the cache_size keys
    of highest full attention (layer-averaged, head-summed; its own key always
    counts). An upper bound for evaluation. Prefill chunks attend fully."""

    needs_stats = True
    two_pass = True

    def num_slots(self, max_total):
        return max_total

    def restrict(self, state, cache, positions, mass):
        """Cache view whose non-selected slots read as empty (decode rows only)."""
        if positions.shape[1] != 1:
            return cache
        S = cache.pos.shape[1]
        m = self.cache_size - 1  # the query's own key is always in
        if m >= S:
            return cache
        s = jnp.where(cache.pos >= 0, mass[:, 0, :S], -1.0)
        t = last_position(positions)
        s = jnp.where(self.protected(cache.pos, t), 2.0 * s.max() + 2.0, s)
        if m <= 0:
            return dataclasses.replace(cache, pos=jnp.full_like(cache.pos, -1))
        thresh = jax.lax.top_k(s, m)[0][:, -1:]
        keep = (s >= thresh) & (jnp.cumsum(s >= thresh, axis=1) <= m)
        return dataclasses.replace(cache, pos=jnp.where(keep, cache.pos, -1))

    def assign_slots(self, pp, state, cache, positions, mass, feature=None):
        return jnp.where(positions >= 0, positions, -1), state
