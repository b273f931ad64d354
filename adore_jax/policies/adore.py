"""ADORE: controller scores, top-m cache, release, and rebuild of up to R tokens.

Each decode step (DESIGN.md):
1. the controller reads the current token, scores every token in the history;
2. rebuild set: the top-R released tokens whose score beats the lowest score in
   the cache (every `rebuild_every` steps; unused rows are padding);
3. the current token and the rebuild set run together (R + 1 rows, each at its
   original position, under the shared mask rule);
4. keep the top m of cache + rebuilt + current (sinks / recent positions
   protected, ties toward recency), writing kept rows into freed slots.
Prefill chunks run the controller over the chunk and cut back to m by the
scores of the chunk's last token.

A controller reading a hidden layer (feature_layer l) gets its input from the
forward pass, so step 1 runs after step 3: the rebuild set of step t is chosen
with the scores of step t - 1 (the lag), and the top-m cut uses step t's scores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from adore_jax.policies.base import Evicting, last_position

_NEG = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AdoreState:
    """ADORE's per-sequence state: the history (token, controller key, latest scores) and the GRU state."""

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
    """Controller scores decide which m tokens stay; up to R released tokens are rebuilt (module docstring)."""

    rebuild: int = 0  # R: rebuilt rows per step
    rebuild_every: int = 1  # k: rebuild on every k-th decode step
    graphdef: Any = None  # nnx GraphDef of the controller; its state is `pp`
    feature_layer: Optional[int] = None  # the controller's input: None embeddings, l the hidden state entering layer l
    prefill_queries: int = 1  # Q: a prefill chunk is cut by each token's best score over the chunk's last Q queries

    def _ctrl(self, pp):
        ctrl = nnx.merge(self.graphdef, pp)
        if ctrl.feature_layer != self.feature_layer:
            raise ValueError(f"the controller reads feature_layer={ctrl.feature_layer}, the policy was built for "
                             f"{self.feature_layer}: pass the controller's feature_layer to make_policy")
        return ctrl

    def init(self, pp, batch, max_total):
        ctrl = self._ctrl(pp)
        return AdoreState(
            tok=jnp.zeros((batch, max_total), jnp.int32),
            key=jnp.zeros((batch, max_total, ctrl.d_c), jnp.float32),
            h=ctrl.init_state(batch),
            score=jnp.full((batch, max_total), _NEG, jnp.float32),
            step=jnp.int32(0),
        )

    @property
    def period(self) -> int:
        return self.rebuild_every if self.rebuild else 1

    def _observe(self, pp, st: AdoreState, x, positions, new) -> AdoreState:
        """Feed the rows marked `new` [B, T] (features x [B, T, E]) to the controller:
        their keys join the history, and the latest prefill_queries rows score it (each
        position its best score over them; a decode step has one row)."""
        ctrl = self._ctrl(pp)
        B, N = st.tok.shape
        h, q, k = ctrl.scan(st.h, x, new)
        at = jnp.where(new, positions, N)
        key = st.key.at[jnp.arange(B)[:, None], at].set(k, mode="drop")
        pos = jnp.where(new, positions, -1)
        t = last_position(pos)
        pos_q, rows = jax.lax.top_k(pos, min(self.prefill_queries, pos.shape[1]))  # the latest Q rows [B, Q]
        q_q = jnp.take_along_axis(q, rows[..., None], axis=1)  # [B, Q, d_c]
        hist = jnp.arange(N, dtype=jnp.int32)[None]
        score = ctrl.logits(q_q, pos_q, key, jnp.broadcast_to(hist, (B, N)))  # [B, Q, N]
        score = jnp.max(jnp.where(hist[:, None] <= pos_q[..., None], score, _NEG), axis=1)  # padding rows see nothing
        score = jnp.where(t[:, None] >= 0, score, st.score)  # a sequence with no new row keeps its scores
        return dataclasses.replace(st, key=key, h=h, score=score)

    def select_rows(self, pp, st: AdoreState, cache, tokens, positions, embed, decode, extra=True):
        B, N = st.tok.shape
        valid = positions >= 0
        tok = st.tok.at[jnp.arange(B)[:, None], jnp.where(valid, positions, N)].set(tokens, mode="drop")
        st = dataclasses.replace(st, tok=tok, step=st.step + (1 if decode else 0))
        if self.feature_layer is None:  # embeddings: score before the forward pass
            st = self._observe(pp, st, jnp.take(embed, tokens, axis=0), positions, valid)
        if not decode or self.rebuild == 0 or not extra:
            return tokens, positions, st
        # the rebuild set, by st.score: this step's (embeddings) or the previous step's (hidden features)
        t = last_position(positions)
        hist = jnp.arange(N, dtype=jnp.int32)[None]
        score = st.score
        held = in_cache(cache, N)
        cache_min = jnp.min(jnp.where(held, score, jnp.inf), axis=1, keepdims=True)
        eligible = (hist < t[:, None]) & ~held & (score > cache_min)
        val, idx = jax.lax.top_k(jnp.where(eligible, score, _NEG), self.rebuild)
        ok = val > _NEG
        rows_tok = jnp.where(ok, jnp.take_along_axis(tok, idx, axis=1), 0)
        rows_pos = jnp.where(ok, idx, -1).astype(jnp.int32)
        return jnp.concatenate([tokens, rows_tok], 1), jnp.concatenate([positions, rows_pos], 1), st

    def assign_slots(self, pp, st: AdoreState, cache, positions, mass, feature=None):
        if self.feature_layer is not None:  # hidden features: score now that the forward pass made them
            hist = jnp.arange(st.score.shape[1], dtype=jnp.int32)[None]
            seen = jnp.max(jnp.where(st.score > _NEG, hist, -1), axis=1)  # last position fed to the controller
            new = (positions >= 0) & (positions > seen[:, None])  # not the rebuilt rows
            st = self._observe(pp, st, feature, positions, new)
        return super().assign_slots(pp, st, cache, positions, mass)

    def release_schedule(self, pp, x):
        """The controller's schedule without rebuild; x [B, n, E] its inputs. Exactly the
        decode loop's for a controller reading embeddings; for one reading a hidden
        layer, x from a full-attention forward gives an approximation."""
        if self.rebuild:
            raise NotImplementedError("a schedule ahead of the decode loop has no rebuild (R = 0 only)")
        ctrl = self._ctrl(pp)
        B, n, _ = x.shape
        _, q, k = ctrl.scan(ctrl.init_state(B), x, jnp.ones((B, n), bool))
        hist = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))
        row = lambda t: ctrl.logits(jax.lax.dynamic_slice_in_dim(q, t, 1, axis=1), jnp.full((B, 1), t), k, hist)[:, 0]
        return self.release(row, x)

    def scores(self, pp, st: AdoreState, cache, positions, mass):
        c = jnp.take_along_axis(st.score, jnp.maximum(cache.pos, 0), axis=1)
        r = jnp.take_along_axis(st.score, jnp.maximum(positions, 0), axis=1)
        return c, r, st
