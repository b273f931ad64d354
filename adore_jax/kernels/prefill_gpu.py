"""Attention of a long chunk (prefill) over the slot cache: GPU Pallas (Triton lowering).

Grid (B, Hkv, NT): one program per (sequence, KV head, tile of the chunk's
rows). A tile holds TQ new tokens times the G query heads of its KV head, as
rows r = t * G + g (TQ * G <= `rows`, padded to a power of two). The program
reads the K/V of the used slots once, straight from the stacked cache
[L, B, S, Hkv, D] at `layer` (no slice, no transpose of the cache), then the
chunk's own T new rows, in blocks of `block_s`, with an online softmax in fp32
(in base 2: softmax_gpu.py). What a row sees follows `reference_attention`:
keys whose position is >= 0 and <= the row's position.

Slots after the sequence's last used slot (position >= 0) are skipped: a
prefill fills the cache from the front, so chunk c reads c chunks of slots, not
the whole cache.

Without statistics only: `sparse_attention_gpu` sends with_stats calls with
long chunks to `blockwise_attention`. The XLA path it replaces for prefill
reads the cache once per 1024-slot block of einsums and transposes every block
(docs/THROUGHPUT.md, "Prefill").
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from adore_jax.kernels import softmax_gpu
from adore_jax.kernels.common import cdiv, next_pow2


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Tuning knobs of the prefill kernel (static)."""

    rows: int = 64  # query rows (tokens x heads of one KV head) per program
    block_s: int = 64  # keys per loop step: a power of two >= 16
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.rows < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"PrefillConfig: rows, num_warps and num_stages must be >= 1; got {self}")
        if self.block_s < 16 or self.block_s != next_pow2(self.block_s):
            raise ValueError(f"PrefillConfig: block_s must be a power of two >= 16; got {self.block_s}")


def _kernel(lyr_ref, used_ref, q_ref, qpos_ref, ck_ref, cv_ref, cpos_ref, kn_ref, vn_ref, *refs,
            T, G, D, S, R, TQ, bs, scale, precision, interpret, quant):
    ks_ref, vs_ref, out_ref = refs if quant else (None, None, refs[0])  # 8-bit slots: scales [L, S]
    h = pl.program_id(1)
    i = pl.program_id(2)
    lyr = lyr_ref[0]

    r = jnp.arange(R, dtype=jnp.int32)
    t = i * TQ + r // G
    row_ok = (r < TQ * G) & (t < T)
    hq = h * G + r % G
    d = jnp.arange(D, dtype=jnp.int32)
    row_ok2 = jnp.broadcast_to(row_ok[:, None], (R, D))
    q = plgpu.load(q_ref.at[t[:, None], hq[:, None], d[None, :]], mask=row_ok2, other=0)
    rpos = plgpu.load(qpos_ref.at[t], mask=row_ok, other=-1)

    def update(carry, k, v, kpos, scales=(None, None)):
        return softmax_gpu.step(carry, q, k, v, kpos, rpos, scale=scale, precision=precision, interpret=interpret,
                                k_scale=scales[0], v_scale=scales[1])[0]

    carry = softmax_gpu.init(R, D)

    def cache_block(j, c):  # full blocks of slots: unmasked loads
        start = pl.multiple_of(j * bs, bs)
        scales = (ks_ref[lyr, pl.ds(start, bs)], vs_ref[lyr, pl.ds(start, bs)]) if quant else (None, None)
        return update(c, ck_ref[lyr, pl.ds(start, bs), :], cv_ref[lyr, pl.ds(start, bs), :], cpos_ref[pl.ds(start, bs)],
                      scales)

    if S // bs:  # up to the block of the last used slot
        carry = lax.fori_loop(0, jnp.minimum(cdiv(used_ref[0], bs), S // bs), cache_block, carry)

    def masked_block(c, ref_k, ref_v, ref_pos, start, n, layer_index):
        """Keys [start, start + bs) of a ref holding n rows, rows >= n masked
        (layer_index: the cache's refs, with their scales when 8-bit)."""
        idx = start + jnp.arange(bs, dtype=jnp.int32)
        ok = idx < n
        ok2 = jnp.broadcast_to(ok[:, None], (bs, D))
        at = (lambda ref: ref.at[lyr, idx[:, None], d[None, :]]) if layer_index else (
            lambda ref: ref.at[idx[:, None], d[None, :]])
        dtype = q.dtype if quant and layer_index else None  # 8-bit values: converted as loaded
        k = softmax_gpu.load_zeroed(at(ref_k), ok2, dtype)
        v = softmax_gpu.load_zeroed(at(ref_v), ok2, dtype)
        scales = (None, None)
        if quant and layer_index:
            scales = tuple(plgpu.load(r.at[lyr, idx], mask=ok, other=0) for r in (ks_ref, vs_ref))
        return update(c, k, v, plgpu.load(ref_pos.at[idx], mask=ok, other=-1), scales)

    if S % bs:  # the last partial block of slots
        carry = masked_block(carry, ck_ref, cv_ref, cpos_ref, (S // bs) * bs, S, True)
    carry = lax.fori_loop(0, cdiv(T, bs), lambda j, c: masked_block(c, kn_ref, vn_ref, qpos_ref, j * bs, T, False),
                          carry)

    o, _, l = carry
    lc = jnp.maximum(l, 1e-30)
    plgpu.store(out_ref.at[t[:, None], hq[:, None], d[None, :]], (o / lc[:, None]).astype(out_ref.dtype), mask=row_ok2)


def prefill_attention_gpu(q, k, v, cache_k, cache_v, cache_pos, q_pos, layer, *, scale: float,
                          interpret: bool = False, config: PrefillConfig = PrefillConfig(), scales=()):
    """Attention output [B, T, Hq, D] of a chunk (q's dtype).

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (the chunk's new rows); cache_k,
    cache_v: [L, B, S, Hkv, D]; layer: [1] int32; cache_pos: [B, S] and q_pos:
    [B, T] int32 (-1: empty slot / padding row). D a power of two >= 16.
    scales: () for plain caches; for 8-bit slots cache_k/v hold the int8/fp8
    values and scales = (k scale, v scale), each [L, B, S, Hkv] fp32.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    L, _, S, _, _ = cache_k.shape
    TQ = max(1, config.rows // G)
    R = max(16, next_pow2(TQ * G))
    bs = config.block_s
    used = jnp.max(jnp.where(cache_pos >= 0, jnp.arange(1, S + 1, dtype=jnp.int32), 0), axis=1)  # slots in use
    in_specs = [
        pl.BlockSpec((1,), lambda b, h, i: (0,)),  # layer
        pl.BlockSpec((None, 1), lambda b, h, i: (b, 0)),  # slots in use
        pl.BlockSpec((None, T, Hq, D), lambda b, h, i: (b, 0, 0, 0)),  # q
        pl.BlockSpec((None, T), lambda b, h, i: (b, 0)),  # q_pos
        pl.BlockSpec((L, None, S, None, D), lambda b, h, i: (0, b, 0, h, 0)),  # cache_k (all layers)
        pl.BlockSpec((L, None, S, None, D), lambda b, h, i: (0, b, 0, h, 0)),  # cache_v
        pl.BlockSpec((None, S), lambda b, h, i: (b, 0)),  # cache_pos
        pl.BlockSpec((None, T, None, D), lambda b, h, i: (b, 0, h, 0)),  # k (new rows)
        pl.BlockSpec((None, T, None, D), lambda b, h, i: (b, 0, h, 0)),  # v (new rows)
    ] + [pl.BlockSpec((L, None, S, None), lambda b, h, i: (0, b, 0, h))] * len(scales)  # 8-bit slots: scales
    kernel = functools.partial(
        _kernel, T=T, G=G, D=D, S=S, R=R, TQ=TQ, bs=bs, scale=scale, interpret=bool(interpret),
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,  # fp32: full fp32 dots, not TF32
        quant=bool(scales),
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, T, Hq, D), q.dtype),
        grid=(B, Hkv, cdiv(T, TQ)),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, T, Hq, D), lambda b, h, i: (b, 0, 0, 0)),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="adore_prefill_attention",
    )(layer, used[:, None], q, q_pos.astype(jnp.int32), cache_k, cache_v, cache_pos.astype(jnp.int32), k, v, *scales)
