"""The fixed-size KV cache: m slots per sequence, shared by all layers and heads.

Keys are stored after RoPE, so any slot can hold any token; `pos` says which
token position each slot holds (-1 = empty). Attention never depends on slot
order, only on the positions.

K and V are either plain arrays (the weights' dtype) or, for 8-bit slots,
`QuantSlots`: int8 or float8_e4m3fn values with one float32 scale per slot and
KV head (symmetric absmax: value * scale is the stored row).
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp

# The cache dtypes a user names (engine's kv_dtype, --kv-dtype); "auto": the weights' dtype.
KV_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "int8": jnp.int8, "float8_e4m3": jnp.float8_e4m3fn}
QUANT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
_QMAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}


def kv_dtype(name: str, default) -> jnp.dtype:
    """The cache dtype a name stands for ("auto": `default`, the weights' dtype)."""
    if name == "auto":
        return jnp.dtype(default)
    if name not in KV_DTYPES:
        raise ValueError(f"unknown kv dtype {name!r}; choose one of {('auto', *KV_DTYPES)}")
    return jnp.dtype(KV_DTYPES[name])


def is_quantized(dtype) -> bool:
    """Whether slots of this dtype are stored as QuantSlots (8 bits and a scale)."""
    return jnp.dtype(dtype) in QUANT_DTYPES


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantSlots:
    """8-bit K or V rows and their scales: row = values * scale[..., None]."""
    values: jax.Array  # [..., S, Hkv, D] int8 or float8_e4m3fn
    scale: jax.Array  # [..., S, Hkv] float32

    @property
    def shape(self):
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim


Slots = Union[jax.Array, QuantSlots]


def quantize(x: jax.Array, dtype) -> QuantSlots:
    """Rows x [..., Hkv, D] as QuantSlots of `dtype` (int8 or float8_e4m3fn):
    one scale per row and head, absmax / qmax (an all-zero row gets scale 1)."""
    dtype = jnp.dtype(dtype)
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    scale = jnp.where(amax > 0, amax / _QMAX[dtype], 1.0)
    y = xf / scale[..., None]
    y = jnp.clip(jnp.round(y), -127, 127) if dtype == jnp.int8 else jnp.clip(y, -448.0, 448.0)
    return QuantSlots(y.astype(dtype), scale)


def dequantize(c: Slots, dtype=jnp.float32) -> jax.Array:
    """Plain rows [..., Hkv, D] of `dtype`: values * scale (a plain array is only cast)."""
    if not isinstance(c, QuantSlots):
        return c.astype(dtype)
    return (c.values.astype(jnp.float32) * c.scale[..., None]).astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """K and V of m slots per sequence for every layer, and the token position each slot holds."""
    k: Slots  # [L, B, S, Hkv, D], or QuantSlots of that shape
    v: Slots  # [L, B, S, Hkv, D]
    pos: jax.Array  # [B, S] int32, -1 = empty slot

    @property
    def num_slots(self) -> int:
        return self.pos.shape[1]

    @property
    def valid(self) -> jax.Array:
        """[B, S] bool: slot holds a token."""
        return self.pos >= 0

    @property
    def quantized(self) -> bool:
        return isinstance(self.k, QuantSlots)

    @classmethod
    def empty(cls, num_layers: int, batch: int, slots: int, kv_heads: int, head_dim: int, dtype=jnp.float32):
        """An empty cache; dtype int8 or float8_e4m3fn gives QuantSlots (scales float32)."""
        shape = (num_layers, batch, slots, kv_heads, head_dim)
        if is_quantized(dtype):
            make = lambda: QuantSlots(jnp.zeros(shape, dtype), jnp.ones(shape[:-1], jnp.float32))
        else:
            make = lambda: jnp.zeros(shape, dtype)
        return cls(make(), make(), jnp.full((batch, slots), -1, jnp.int32))

    def nbytes(self) -> int:
        """Bytes held by K, V (values and scales) and slot positions."""
        return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(self))


def slot_bytes(num_layers: int, kv_heads: int, head_dim: int, dtype) -> int:
    """Bytes of K and V one slot holds over all layers: the rows, and their float32
    scales when 8-bit (its int32 position not counted)."""
    dtype = jnp.dtype(dtype)
    per_head = head_dim * dtype.itemsize + (4 if is_quantized(dtype) else 0)
    return 2 * num_layers * kv_heads * per_head


def write_rows(cache: KVCache, new_k: jax.Array, new_v: jax.Array, slots: jax.Array, positions: jax.Array) -> KVCache:
    """Write new rows into chosen slots of every layer (XLA scatter; in place when donated).

    new_k, new_v: [L, B, T, Hkv, D]; slots: [B, T] int32, -1 = do not write;
    positions: [B, T] the token position each written row holds.
    Rows whose slot is -1 are dropped; two rows must not target one slot.
    An 8-bit cache stores the rows quantized (`quantize`).
    """
    S = cache.num_slots
    b = jnp.arange(slots.shape[0])[:, None]
    idx = jnp.where(slots >= 0, slots, S)  # out of range: dropped

    def put(c, new):
        if isinstance(c, QuantSlots):
            qn = quantize(new, c.values.dtype)
            return QuantSlots(put(c.values, qn.values), c.scale.at[:, b, idx].set(qn.scale, mode="drop"))
        return c.at[:, b, idx].set(new.astype(c.dtype), mode="drop")

    pos = cache.pos.at[b, idx].set(positions.astype(jnp.int32), mode="drop")
    return KVCache(put(cache.k, new_k), put(cache.v, new_v), pos)
