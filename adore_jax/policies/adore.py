"""ADORE: controller scores, top-m cache, release, and rebuild of up to R tokens.

Each decode step (DESIGN.md):
1. the controller reads the current token, scores every token in the history;
2. rebuild set: the top-R released tokens whose score beats the lowest score in
   the cache (every `rebuild_every` steps; unused rows are padding);
3. the current token and the rebuild set run together (R + 1 rows, each at its
   original position, under the shared mask rule);
4. keep the top m of cache + rebuilt + current (sinks / recent window
   protected, ties toward recency), writing kept rows into freed slots.
Prefill chunks run the controller over the chunk and cut back to m by the
scores of the chunk's last token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from adore_jax.policies.base import Evicting, last_position

_NEG = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AdoreState:
    tok: jax.Array  # [B, N] int32 token id at each position
    key: jax.Array  # [B, N, d_c] controller key W_k c_i at each position
    h: jax.Array  # [B, d_c] GRU state
    score: jax.Array  # [B, N] controller logits of the latest query
    step: jax.Array  # [] int32 decode steps taken


def in_cache(cache, n: int) -> jax.Array:
    """[B, N] bool: position i is held by some slot (derived from cache.pos)."""
    B = cache.pos.shape[0]
    idx = jnp.where(cache.pos >= 0, cache.pos, n)
    return jnp.zeros((B, n), bool).at[jnp.arange(B)[:, None], idx].set(True, mode="drop")


@dataclasses.dataclass(frozen=True)
class AdorePolicy(Evicting):
    rebuild: int = 0  # R: rebuilt rows per step
    rebuild_every: int = 1  # k: rebuild on every k-th decode step
    graphdef: Any = None  # nnx GraphDef of the controller; its state is `pp`

    def _ctrl(self, pp):
        return nnx.merge(self.graphdef, pp)

    def init(self, pp, batch, max_total):
        ctrl = self._ctrl(pp)
        return AdoreState(
            tok=jnp.zeros((batch, max_total), jnp.int32),
            key=jnp.zeros((batch, max_total, ctrl.d_c), jnp.float32),
            h=ctrl.init_state(batch),
            score=jnp.full((batch, max_total), _NEG, jnp.float32),
            step=jnp.int32(0),
        )

    def extra_rows_due(self, st: AdoreState):
        if self.rebuild == 0 or self.rebuild_every == 1:
            return None
        return st.step % self.rebuild_every == 0

    def select_rows(self, pp, st: AdoreState, cache, tokens, positions, embed, decode, extra=True):
        ctrl = self._ctrl(pp)
        B, N = st.tok.shape
        valid = positions >= 0
        h, q, k = ctrl.scan(st.h, jnp.take(embed, tokens, axis=0), valid)
        b = jnp.arange(B)[:, None]
        at = jnp.where(valid, positions, N)
        tok = st.tok.at[b, at].set(tokens, mode="drop")
        key = st.key.at[b, at].set(k, mode="drop")
        t = last_position(positions)
        q_t = jnp.take_along_axis(q, jnp.argmax(positions, axis=1)[:, None, None], axis=1)  # [B, 1, d_c]
        hist = jnp.arange(N, dtype=jnp.int32)[None]
        score = ctrl.logits(q_t, t[:, None], key, jnp.broadcast_to(hist, (B, N)))[:, 0]
        score = jnp.where(hist <= t[:, None], score, _NEG)
        st = AdoreState(tok, key, h, score, st.step + (1 if decode else 0))
        if not decode or self.rebuild == 0 or not extra:
            return tokens, positions, st
        held = in_cache(cache, N)
        cache_min = jnp.min(jnp.where(held, score, jnp.inf), axis=1, keepdims=True)
        eligible = (hist < t[:, None]) & ~held & (score > cache_min)
        val, idx = jax.lax.top_k(jnp.where(eligible, score, _NEG), self.rebuild)
        ok = val > _NEG
        rows_tok = jnp.where(ok, jnp.take_along_axis(tok, idx, axis=1), 0)
        rows_pos = jnp.where(ok, idx, -1).astype(jnp.int32)
        return jnp.concatenate([tokens, rows_tok], 1), jnp.concatenate([positions, rows_pos], 1), st

    def scores(self, pp, st: AdoreState, cache, positions, mass):
        c = jnp.take_along_axis(st.score, jnp.maximum(cache.pos, 0), axis=1)
        r = jnp.take_along_axis(st.score, jnp.maximum(positions, 0), axis=1)
        return c, r, st
