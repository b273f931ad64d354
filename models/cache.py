"""The fixed-size KV cache: m slots per sequence, shared by all layers and heads.

Keys are stored after RoPE, so any slot can hold any token; `pos` says which
token position each slot holds (-1 = empty). Attention never depends on slot
order, only on the positions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """K and V of m slots per sequence for every layer, and the token position each slot holds."""
    k: jax.Array  # [L, B, S, Hkv, D]
    v: jax.Array  # [L, B, S, Hkv, D]
    pos: jax.Array  # [B, S] int32, -1 = empty slot

    @property
    def num_slots(self) -> int:
        return self.pos.shape[1]

    @property
    def valid(self) -> jax.Array:
        """[B, S] bool: slot holds a token."""
        return self.pos >= 0

    @classmethod
    def empty(cls, num_layers: int, batch: int, slots: int, kv_heads: int, head_dim: int, dtype=jnp.float32):
        shape = (num_layers, batch, slots, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, slots), -1, jnp.int32))

    def nbytes(self) -> int:
        """Bytes held by K, V and slot positions."""
        return sum(int(a.size) * a.dtype.itemsize for a in (self.k, self.v, self.pos))


def write_rows(cache: KVCache, new_k: jax.Array, new_v: jax.Array, slots: jax.Array, positions: jax.Array) -> KVCache:
    """Write new rows into chosen slots of every layer (XLA scatter; in place when donated).

    new_k, new_v: [L, B, T, Hkv, D]; slots: [B, T] int32, -1 = do not write;
    positions: [B, T] the token position each written row holds.
    Rows whose slot is -1 are dropped; two rows must not target one slot.
    """
    S = cache.num_slots
    b = jnp.arange(slots.shape[0])[:, None]
    idx = jnp.where(slots >= 0, slots, S)  # out of range: dropped
    k = cache.k.at[:, b, idx].set(new_k.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, b, idx].set(new_v.astype(cache.v.dtype), mode="drop")
    pos = cache.pos.at[b, idx].set(positions.astype(jnp.int32), mode="drop")
    return KVCache(k, v, pos)
