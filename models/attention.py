"""Attention over the cache plus the new rows: the function the model takes.

Every implementation (this XLA reference, the Pallas kernels) has the signature
of `reference_attention` and returns an `AttentionOut`.

Mask rule: a query at position p attends to every key (cache slot or new row)
whose position is in [0, p]. Empty slots and padding rows have position -1.
That one rule covers causal prefill chunks, decode and ADORE's rebuilt rows.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Protocol

import jax
import jax.numpy as jnp

from models.cache import QuantSlots, dequantize

NEG_INF = -1e30


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionOut:
    """What an attention function returns: the output, and with_stats the mass per key and the lse."""
    out: jax.Array  # [B, T, Hq, D], dtype of q
    mass: Optional[jax.Array] = None  # [B, T, S+T] fp32: probability summed over query heads
    lse: Optional[jax.Array] = None  # [B, T, Hq] fp32: log-sum-exp of the scaled scores


class AttentionFn(Protocol):
    """The signature every attention implementation has (reference_attention's)."""
    def __call__(
        self, q, k, v, cache_k, cache_v, cache_pos, q_pos, *, layer=None, with_stats: bool = False
    ) -> AttentionOut: ...


def layer_cache(cache_k, cache_v, layer, dtype=None):
    """The [B, S, Hkv, D] cache of one layer: cache_k/v as given when layer is None,
    else layer `layer` (int, may be traced) of stacked [L, B, S, Hkv, D] arrays.
    8-bit slots (models.cache.QuantSlots) come back dequantized to `dtype`
    (float32 when None); plain arrays as they are."""
    if layer is not None:
        pick = lambda c: jax.lax.dynamic_index_in_dim(c, layer, axis=0, keepdims=False)
        cache_k, cache_v = jax.tree.map(pick, cache_k), jax.tree.map(pick, cache_v)
    plain = lambda c: dequantize(c, dtype or jnp.float32) if isinstance(c, QuantSlots) else c
    return plain(cache_k), plain(cache_v)


def reference_attention(q, k, v, cache_k, cache_v, cache_pos, q_pos, *, layer=None, with_stats=False, scale=None,
                        key_until=None):
    """Plain XLA attention.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (new rows, after RoPE);
    cache_k, cache_v: [B, S, Hkv, D], or [L, B, S, Hkv, D] with `layer` choosing one;
    either may be models.cache.QuantSlots (dequantized to q's dtype, then as plain);
    cache_pos: [B, S]; q_pos: [B, T] (int32, -1 = none).
    key_until: optional [B, S+T] int32; key j (cache slots, then new rows) is
    seen only by queries at positions <= key_until[:, j] (a release schedule).
    """
    cache_k, cache_v = layer_cache(cache_k, cache_v, layer, q.dtype)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    qg = q.reshape(B, T, Hkv, G, D)
    s_c = jnp.einsum("bthgd,bshd->bhgts", qg, cache_k, preferred_element_type=jnp.float32)
    s_n = jnp.einsum("bthgd,bshd->bhgts", qg, k, preferred_element_type=jnp.float32)
    key_pos = jnp.concatenate([cache_pos, q_pos], axis=1)  # [B, S+T]
    allowed = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= q_pos[:, :, None])  # [B, T, S+T]
    if key_until is not None:
        allowed &= q_pos[:, :, None] <= key_until[:, None, :]
    s = jnp.concatenate([s_c, s_n], axis=-1) * scale
    s = jnp.where(allowed[:, None, None], s, NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    p = jnp.where(allowed[:, None, None], p, 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.maximum(denom, 1e-30)
    S = cache_k.shape[1]
    pv = p.astype(v.dtype)
    out = jnp.einsum("bhgts,bshd->bthgd", pv[..., :S], cache_v, preferred_element_type=jnp.float32)
    out = out + jnp.einsum("bhgts,bshd->bthgd", pv[..., S:], v, preferred_element_type=jnp.float32)
    out = out.reshape(B, T, Hq, D).astype(q.dtype)
    if not with_stats:
        return AttentionOut(out)
    mass = jnp.sum(p, axis=(1, 2))  # [B, T, S+T]
    lse = (m[..., 0] + jnp.log(jnp.maximum(denom[..., 0], 1e-30))).transpose(0, 3, 1, 2).reshape(B, T, Hq)
    return AttentionOut(out, mass, lse)
