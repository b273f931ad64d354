"""Attention for long chunks (prefill) in XLA, blockwise over the cache slots.

The plain reference materializes the scores [B, Hkv, G, T, S + T] in fp32: for
a 7B model prefilling 8 x 16K tokens in chunks of 512 that is about 9 GB per
array and layer, several arrays live at once, and the prefill runs out of
memory. Here the slots are visited in blocks with an online softmax (running
max, sum, output in fp32), so the scores of one block [B, Hkv, G, T, block]
are all that lives. Statistics (mass per key, lse) take a second pass over the
blocks once the lse is known. Same signature, outputs and conventions as
`reference_attention`; tests compare the two.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from models.attention import NEG_INF, AttentionOut, reference_attention
from models.cache import QuantSlots, dequantize

BLOCK = 1024  # slots per block


def _slots(cache, layer, start, size, flat: bool):
    """Slots [start, start + size) of one layer's cache: [B, size, Hkv, D].

    flat=True slices the cache viewed as [..., S, Hkv * D] and reshapes the block
    back. The einsums below want each block head-major; given a plain slice,
    XLA:GPU gives that layout to the sliced array itself, i.e. transposes the
    whole stacked cache once per prefill chunk (2 x 34 GB at 7B, 8 x 16K). A
    reshape may change the layout, so only the block is transposed
    (docs/THROUGHPUT.md, "Prefill"). Not on TPU: there the [..., S, Hkv * D] view
    has another tiling than the cache, and the view itself would be a copy.
    """
    *lead, S, H, D = cache.shape
    if flat:
        cache = cache.reshape(*lead, S, H * D)
    if layer is None:
        block = jax.lax.dynamic_slice_in_dim(cache, start, size, axis=1)
    else:
        block = jax.lax.dynamic_slice(cache, (layer, 0, start) + (0,) * (cache.ndim - 3),
                                      (1, lead[1], size) + cache.shape[3:])[0]
    return block.reshape(*block.shape[:2], H, D)


def _plain_slots(cache, layer, start, size, flat: bool, dtype):
    """`_slots` of a plain cache, or of 8-bit slots (QuantSlots) dequantized to `dtype`: [B, size, Hkv, D]."""
    if not isinstance(cache, QuantSlots):
        return _slots(cache, layer, start, size, flat)
    scale = cache.scale if layer is None else jax.lax.dynamic_index_in_dim(cache.scale, layer, 0, keepdims=False)
    scale = jax.lax.dynamic_slice_in_dim(scale, start, size, axis=1)
    return dequantize(QuantSlots(_slots(cache.values, layer, start, size, flat), scale), dtype)


def blockwise_attention(
    q, k, v, cache_k, cache_v, cache_pos, q_pos, *, layer=None, with_stats: bool = False,
    scale: Optional[float] = None, block: int = BLOCK, flat_slices: Optional[bool] = None,
) -> AttentionOut:
    """`reference_attention` computed over blocks of `block` cache slots.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; cache_k, cache_v: [B, S, Hkv, D] (or
    [L, B, S, Hkv, D] with `layer`; either may be 8-bit QuantSlots, each block
    dequantized to q's dtype); cache_pos: [B, S]; q_pos: [B, T].
    flat_slices: how blocks are sliced (see `_slots`); None: on any backend but TPU.
    """
    flat = jax.default_backend() != "tpu" if flat_slices is None else flat_slices
    blk = lambda cache, start, size: _plain_slots(cache, layer, start, size, flat, q.dtype)
    S = cache_k.shape[-3]
    if S <= block:
        return reference_attention(q, k, v, cache_k, cache_v, cache_pos, q_pos, layer=layer, with_stats=with_stats,
                                   scale=scale)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    f32 = jnp.float32
    qg = q.reshape(B, T, Hkv, G, D)
    q_pos = q_pos.astype(jnp.int32)
    cache_pos = cache_pos.astype(jnp.int32)

    def scores(keys, kpos):
        """Masked scaled scores [B, Hkv, G, T, n] and the mask [B, 1, 1, T, n]."""
        s = jnp.einsum("bthgd,bshd->bhgts", qg, keys, preferred_element_type=f32) * scale
        allowed = ((kpos[:, None, :] >= 0) & (kpos[:, None, :] <= q_pos[:, :, None]))[:, None, None]
        return jnp.where(allowed, s, NEG_INF), allowed

    def absorb(carry, keys, vals, kpos):
        m, l, o = carry
        s, allowed = scores(keys, kpos)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
        pv = jnp.einsum("bhgts,bshd->bhgtd", p.astype(vals.dtype), vals, preferred_element_type=f32)
        return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * o + pv

    nb, tail = divmod(S, block)

    def body(carry, i):
        start = i * block
        kpos = jax.lax.dynamic_slice_in_dim(cache_pos, start, block, axis=1)
        return absorb(carry, blk(cache_k, start, block), blk(cache_v, start, block), kpos), None

    carry = (jnp.full((B, Hkv, G, T), NEG_INF, f32), jnp.zeros((B, Hkv, G, T), f32), jnp.zeros((B, Hkv, G, T, D), f32))
    carry = jax.lax.scan(body, carry, jnp.arange(nb))[0]
    if tail:
        carry = absorb(carry, blk(cache_k, nb * block, tail), blk(cache_v, nb * block, tail),
                       cache_pos[:, nb * block:])
    m, l, o = absorb(carry, k, v, q_pos)  # the T new rows
    lc = jnp.maximum(l, 1e-30)
    out = (o / lc[..., None]).transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, D).astype(q.dtype)
    lse = m + jnp.log(lc)  # [B, Hkv, G, T]
    if not with_stats:
        return AttentionOut(out)

    def mass(keys, kpos):
        s, allowed = scores(keys, kpos)
        return jnp.sum(jnp.where(allowed, jnp.exp(s - lse[..., None]), 0.0), axis=(1, 2))  # [B, T, n]

    def mass_block(_, i):
        start = i * block
        return None, mass(blk(cache_k, start, block), jax.lax.dynamic_slice_in_dim(cache_pos, start, block, axis=1))

    parts = jax.lax.scan(mass_block, None, jnp.arange(nb))[1]  # [nb, B, T, block]
    parts = [parts.transpose(1, 2, 0, 3).reshape(B, T, nb * block)]
    if tail:
        parts.append(mass(blk(cache_k, nb * block, tail), cache_pos[:, nb * block:]))
    parts.append(mass(k, q_pos))
    lse = lse.transpose(0, 3, 1, 2).reshape(B, T, Hq)
    return AttentionOut(out, jnp.concatenate(parts, axis=-1), lse)
