"""Pieces shared by the Pallas attention kernels: shape checks, the split-merge
(log-sum-exp) in XLA, the new-rows partial in XLA, and the mass epilogue.

Row convention inside the kernels: the G = Hq / Hkv query heads of one KV head
and the T new rows are stacked as rows r = t * G + g (Rr = T * G real rows),
so one program reads its K/V slots once for all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.attention import NEG_INF, AttentionOut
from models.cache import QuantSlots

MAX_T = 16  # decode kernels handle T <= MAX_T new rows; longer chunks (prefill): prefill_gpu or blockwise
MAX_ROWS = 128  # and at most this many G * T rows per KV head


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def num_sms() -> int:
    """Streaming multiprocessors of the default GPU (132, an H200's, when not known)."""
    try:
        d = jax.devices()[0]
        n = getattr(d, "core_count", None)
        if d.platform == "gpu" and n:
            return int(n)
    except Exception:  # pragma: no cover
        pass
    return 132


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers."""
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    """a rounded up to a multiple of b."""
    return cdiv(a, b) * b


def check_shapes(q, k, v, cache_k, cache_v, cache_pos, q_pos, layer=None):
    """Validate shapes (cache_k/v stacked [L, B, S, Hkv, D] when layer is given;
    arrays or QuantSlots); returns (B, T, Hq, Hkv, G, D, S)."""
    ck, cv = tuple(cache_k.shape), tuple(cache_v.shape)
    if layer is not None:
        if len(ck) != 5 or cv != ck:
            raise ValueError(f"with layer=, cache_k/v must be [L, B, S, Hkv, D]; got {ck}, {cv}")
        ck, cv = ck[1:], cv[1:]
    B, T, Hq, D = q.shape
    if k.ndim != 4 or k.shape[:2] != (B, T) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"k/v must be [B, T, Hkv, D] = [{B}, {T}, Hkv, {D}]; got {k.shape}, {v.shape}")
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if len(ck) != 4 or ck[0] != B or ck[2:] != (Hkv, D) or cv != ck:
        raise ValueError(f"cache_k/v must be [B, S, {Hkv}, {D}]; got {ck}, {cv}")
    S = ck[1]
    if cache_pos.shape != (B, S) or q_pos.shape != (B, T):
        raise ValueError(f"cache_pos must be [{B}, {S}] and q_pos [{B}, {T}]; got {cache_pos.shape}, {q_pos.shape}")
    return B, T, Hq, Hkv, Hq // Hkv, D, S


def check_quant(cache_k, cache_v) -> bool:
    """Whether the caches are 8-bit slots (QuantSlots); ValueError when only one is,
    or their value dtypes differ."""
    qk, qv = isinstance(cache_k, QuantSlots), isinstance(cache_v, QuantSlots)
    if qk != qv or (qk and cache_k.values.dtype != cache_v.values.dtype):
        raise ValueError("cache_k and cache_v must both be plain arrays or both 8-bit slots of one dtype")
    return qk


def merge_partials(o, m, l, T: int, G: int, out_dtype):
    """Merge split partials with their log-sum-exp.

    o: [B, Hkv, N, Rr, D] fp32 unnormalised; m, l: [B, Hkv, N, Rr] fp32 (running
    max and sum of exp(s - m)); rows r = t * G + g. Returns out [B, T, Hq, D] and
    lse [B, T, Hq] with the reference's conventions for fully masked rows
    (output 0, lse about NEG_INF).
    """
    B, Hkv, _, Rr, D = o.shape
    M = jnp.max(m, axis=2)
    w = jnp.exp(m - M[:, :, None])
    L = jnp.sum(w * l, axis=2)
    O = jnp.sum(w[..., None] * o, axis=2)
    Lc = jnp.maximum(L, 1e-30)
    out = (O / Lc[..., None]).reshape(B, Hkv, T, G, D).transpose(0, 2, 1, 3, 4).reshape(B, T, Hkv * G, D)
    lse = (M + jnp.log(Lc)).reshape(B, Hkv, T, G).transpose(0, 2, 1, 3).reshape(B, T, Hkv * G)
    return out.astype(out_dtype), lse


def new_rows_partial(q, k, v, q_pos, scale: float):
    """Attention of the T query rows over the T new key rows, as one split partial.

    Returns o [B, Hkv, 1, Rr, D], m, l [B, Hkv, 1, Rr] and the masked scaled
    scores [B, Hkv, Rr, T] (fp32), rows r = t * G + g.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    qg = q.reshape(B, T, Hkv, G, D)
    s = jnp.einsum("bthgd,buhd->bhtgu", qg, k, preferred_element_type=jnp.float32) * scale
    allowed = (q_pos[:, None, :] >= 0) & (q_pos[:, None, :] <= q_pos[:, :, None])  # [B, T, U]
    allowed = allowed[:, None, :, None, :]
    s = jnp.where(allowed, s, NEG_INF)
    m = jnp.max(s, axis=-1)
    p = jnp.where(allowed, jnp.exp(s - m[..., None]), 0.0)
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bhtgu,buhd->bhtgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    Rr = T * G
    return (
        o.reshape(B, Hkv, 1, Rr, D),
        m.reshape(B, Hkv, 1, Rr),
        l.reshape(B, Hkv, 1, Rr),
        s.reshape(B, Hkv, Rr, T),
    )


def mass_from_scores(scores, lse, T: int, G: int):
    """Attention mass per key summed over query heads.

    scores: [B, Hkv, Rr, S + T] masked scaled scores (NEG_INF where not allowed),
    rows r = t * G + g; lse: [B, T, Hq]. Returns mass [B, T, S + T] fp32.
    """
    B, Hkv, Rr, K = scores.shape
    lse_r = lse.reshape(B, T, Hkv, G).transpose(0, 2, 1, 3).reshape(B, Hkv, Rr)
    p = jnp.where(scores > 0.5 * NEG_INF, jnp.exp(scores - lse_r[..., None]), 0.0)
    return jnp.sum(p.reshape(B, Hkv, T, G, K), axis=(1, 3))


def stacked(cache_k, cache_v, layer):
    """(cache_k, cache_v, layer [1] int32) with the caches as [L, B, S, Hkv, D] (arrays
    or QuantSlots): a per-layer cache gets a leading axis of 1 (free) and layer 0."""
    if layer is None:
        lead = lambda c: jax.tree.map(lambda a: a[None], c)
        return lead(cache_k), lead(cache_v), jnp.zeros((1,), jnp.int32)
    return cache_k, cache_v, jnp.asarray(layer, jnp.int32).reshape(1)


def finish(out, lse, mass, with_stats: bool) -> AttentionOut:
    """AttentionOut(out [B, T, Hq, D]), with mass [B, T, S+T] and lse [B, T, Hq] when with_stats."""
    if not with_stats:
        return AttentionOut(out)
    return AttentionOut(out, mass, lse)


def default_interpret_params():
    """interpret= value for TPU kernels run on CPU: out-of-bounds block reads
    return uninitialised (NaN) memory, as padding on a real TPU holds garbage."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams(out_of_bounds_reads="uninitialized", uninitialized_memory="nan")
