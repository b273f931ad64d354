"""The policy interface and the top-m selection every evicting policy shares.

A policy is a static (hashable) dataclass; all its methods run inside jit.
Shapes: B batch, T rows this step, S cache slots, N history capacity (= the
maximum total length; history is indexed by token position).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp


class Policy:
    """Default behaviour: run the given rows, one pass, no statistics."""

    needs_stats: bool = False  # forward must return attention mass per key
    two_pass: bool = False  # run a full-attention pass first, then `restrict`
    feature_layer = None  # forward must return the residual entering this layer (`feature` of assign_slots)

    def num_slots(self, max_total: int) -> int:
        """Cache slots for sequences of at most max_total tokens."""
        raise NotImplementedError

    def init(self, pp, batch: int, max_total: int) -> Any:
        """Initial policy state pytree (pp: the policy's params, or None)."""
        return ()

    def select_rows(self, pp, state, cache, tokens, positions, embed, decode: bool, extra: bool = True):
        """Rows to run this step: new tokens/positions [B, T0] -> rows [B, T], state.

        extra: whether a decode step may add rows (ADORE's rebuild set)."""
        return tokens, positions, state

    @property
    def period(self) -> int:
        """Decode steps per period: the engine runs the first step of every period
        with extra=True and the others with extra=False (1: every step the same)."""
        return 1

    def assign_slots(self, pp, state, cache, positions, mass, feature=None):
        """Slots [B, T] (-1: drop) for the rows just run, and the new state.

        mass: [B, T, S+T] when needs_stats; feature: [B, T, E] when feature_layer is set."""
        raise NotImplementedError


def last_position(positions: jax.Array) -> jax.Array:
    """[B]: the largest valid position among the rows (-1 when none)."""
    return jnp.max(positions, axis=1)


def keep_top_m(cache_pos, cache_score, row_pos, row_score, protected, m: int) -> jax.Array:
    """Keep the top m candidates (cache slots + new rows); place kept rows in freed slots.

    cache_pos, cache_score: [B, S]; row_pos, row_score: [B, T]; protected: [B, S+T]
    bool (always kept: sinks, recent positions). Order: protected first, then score,
    then recency (larger position wins ties). Invalid (position -1) candidates are
    never kept. Returns slots [B, T] int32 (-1: row not kept).
    """
    B, S = cache_pos.shape
    pos = jnp.concatenate([cache_pos, row_pos], axis=1)
    score = jnp.concatenate([cache_score, row_score], axis=1).astype(jnp.float32)
    valid = pos >= 0
    tier = jnp.where(valid, protected.astype(jnp.int32), -1)
    score = jnp.where(valid, score, -jnp.inf)
    idx = jnp.broadcast_to(jnp.arange(pos.shape[1], dtype=jnp.int32), pos.shape)
    *_, order = jax.lax.sort((tier, score, pos, idx), dimension=1, num_keys=3)  # ascending
    rank = jnp.zeros_like(idx).at[jnp.arange(B)[:, None], order].set(idx)  # 0 = least wanted
    kept = valid & (rank >= pos.shape[1] - m)
    free = ~kept[:, :S]
    free_slots = jnp.argsort(~free, axis=1, stable=True).astype(jnp.int32)  # free slots first
    new_kept = kept[:, S:]
    j = jnp.cumsum(new_kept, axis=1) - 1
    return jnp.where(new_kept, jnp.take_along_axis(free_slots, jnp.maximum(j, 0), axis=1), -1)


@dataclasses.dataclass(frozen=True)
class Evicting(Policy):
    """A fixed budget of `cache_size` slots; subclasses give each candidate a score."""

    cache_size: int
    sinks: int = 0  # positions < sinks are always kept
    recent: int = 0  # the `recent` most recent positions are always kept

    def num_slots(self, max_total: int) -> int:
        return min(self.cache_size, max_total)

    def protected(self, pos: jax.Array, t: jax.Array) -> jax.Array:
        """[B, K] bool: sink or recent positions for current position t [B]."""
        return (pos >= 0) & ((pos < self.sinks) | (pos > t[:, None] - self.recent))

    def scores(self, pp, state, cache, positions, mass):
        """Scores of the cache slots [B, S] and new rows [B, T]; and the new state."""
        raise NotImplementedError

    def release_schedule(self, pp, x: jax.Array) -> jax.Array:
        """leave [B, n] (release_times) of a sequence fed one token a step; x [B, n, E]:
        the controller's inputs (ignored by policies that read none). Defined for
        policies that decide before the forward pass; those that read attention raise."""
        raise NotImplementedError(f"{type(self).__name__} decides from attention: its schedule needs the decode loop")

    def release(self, score_row, x: jax.Array) -> jax.Array:
        """release_times for this policy's budget and protected positions."""
        return release_times(score_row, x.shape[0], x.shape[1], self.cache_size, self.sinks, self.recent)

    def assign_slots(self, pp, state, cache, positions, mass, feature=None):
        c_score, r_score, state = self.scores(pp, state, cache, positions, mass)
        t = last_position(positions)
        prot = self.protected(jnp.concatenate([cache.pos, positions], axis=1), t)
        return keep_top_m(cache.pos, c_score, positions, r_score, prot, cache.pos.shape[1]), state


def release_times(score_row: Callable[[jax.Array], jax.Array], batch: int, n: int, m: int, sinks: int = 0,
                  recent: int = 0) -> jax.Array:
    """When each position leaves a cache of m slots fed one token a step (the decode
    loop of an evicting policy, with keep_top_m's order: protected, score, position).

    score_row(t) -> [B, n] fp32: every position's score for the query at step t
    (positions > t are ignored). Returns leave [B, n] int32: position j is held
    after steps j .. leave[j] - 1 and released by step leave[j] (n: never), so
    the query at step t sees key j iff j <= t <= leave[j]."""
    pos = jnp.arange(n, dtype=jnp.int32)[None]

    def step(carry, t):
        held, leave = carry
        cand = held | (pos == t)
        prot = (pos < sinks) | (pos > t - recent)
        s = score_row(t).astype(jnp.float32)
        tier = jnp.where(cand, prot.astype(jnp.int32), 2)
        lowest = cand & (tier == jnp.min(tier, axis=1, keepdims=True))
        lowest &= s == jnp.min(jnp.where(lowest, s, jnp.inf), axis=1, keepdims=True)
        victim = jnp.argmax(lowest, axis=1)[:, None]  # the oldest of the least wanted
        out = (pos == victim) & (jnp.sum(cand, axis=1, keepdims=True) > m)
        return (cand & ~out, jnp.where(out, t, leave)), None

    init = (jnp.zeros((batch, n), bool), jnp.full((batch, n), n, jnp.int32))
    (_, leave), _ = jax.lax.scan(step, init, jnp.arange(n, dtype=jnp.int32))
    return leave
