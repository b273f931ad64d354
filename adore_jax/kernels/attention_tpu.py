"""Sparse decode attention over the slot cache: TPU Pallas (Mosaic).

The cache, stacked [L, B, S, Hkv, D] (a per-layer cache gets L = 1), is viewed
(for free) as [L, B, S, Hkv * D]; the layer index is a scalar-prefetch operand
of the block index maps, so a layer scan never slices (copies) the cache. A block
(bs slots, hb * D lanes) holds hb KV heads of bs slots: a plain 2-D tile for
Mosaic, and one strided DMA per block from the native layout (each K/V row is
read once). hb is the smallest divisor of Hkv with hb * D a multiple of 128
lanes (hb = 1 for D = 128), else all Hkv heads.

Grid (B, Hkv / hb, NS, nb): sequence, head group, split of the slots
("parallel"), block within the split ("arbitrary", innermost). The online
softmax state lives in the split's output blocks (resident across the inner
axis). The G * T query rows of each KV head are stacked (rows r = t*G + g,
padded to a multiple of 8). The T new rows and the merge of the splits are done
in XLA (small), as is the mass from the scores when with_stats.

Not run on TPU hardware here: checked in interpret mode on CPU and lowered to
Mosaic on CPU (jit(...).lower(lowering_platforms=("tpu",))).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from adore_jax.kernels.blockwise import blockwise_attention
from adore_jax.kernels.common import (
    MAX_ROWS,
    MAX_T,
    cdiv,
    check_quant,
    check_shapes,
    default_interpret_params,
    finish,
    mass_from_scores,
    merge_partials,
    new_rows_partial,
    round_up,
    stacked,
)
from models.attention import NEG_INF, AttentionOut


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Tuning knobs of the TPU kernel (static)."""
    block_s: int = 512  # slots per block (multiple of 128, or all of S when S is smaller)
    splits: int = 1  # splits of S (more parallel programs for megacore / small batch)


def head_group(Hkv: int, D: int) -> int:
    """KV heads a block holds: the fewest hb dividing Hkv with hb * D a multiple of 128 lanes, else Hkv."""
    for c in range(1, Hkv + 1):
        if Hkv % c == 0 and (c * D) % 128 == 0:
            return c
    return Hkv


def supported(q, k) -> bool:
    """Whether the TPU decode kernel takes q [B, T, Hq, D] against new keys k [B, T, Hkv, D]."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    return T <= MAX_T and (Hq // Hkv) * T <= MAX_ROWS


def _kernel(lyr_ref, q_ref, rpos_ref, cpos_ref, ck_ref, cv_ref, o_ref, m_ref, l_ref, *sc, S, bs, nb, hb, D, scale, sanitize):
    j = pl.program_id(2)
    i = pl.program_id(3)
    blk = j * nb + i  # unclamped: blocks past the end are fully masked

    @pl.when(i == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, m_ref.dtype)
        l_ref[...] = jnp.zeros(l_ref.shape, l_ref.dtype)

    lane_slot = blk * bs + lax.broadcasted_iota(jnp.int32, (1, bs), 1)
    kpos = jnp.where(lane_slot < S, cpos_ref[...], -1)  # [1, bs]
    rpos = rpos_ref[...]  # [Rt, 1]
    allowed = (kpos >= 0) & (kpos <= rpos)  # [Rt, bs]
    if sanitize:  # rows past S in a partial block hold garbage: zero V there
        sub_ok = (blk * bs + lax.broadcasted_iota(jnp.int32, (bs, 1), 0)) < S
    for c in range(hb):
        k = ck_ref[:, c * D : (c + 1) * D]  # [bs, D]
        v = cv_ref[:, c * D : (c + 1) * D]
        if sanitize:
            v = jnp.where(sub_ok, v, jnp.zeros_like(v))
        q = q_ref[c]  # [Rt, D]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        s = jnp.where(allowed, s, NEG_INF)
        if sc:
            sc[0][c] = s
        m_prev = m_ref[c]  # [Rt, 1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)
        l_ref[c] = alpha * l_ref[c] + jnp.sum(p, axis=1, keepdims=True)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        o_ref[c] = alpha * o_ref[c] + pv
        m_ref[c] = m_new


def sparse_attention_tpu(
    q,
    k,
    v,
    cache_k,
    cache_v,
    cache_pos,
    q_pos,
    *,
    layer=None,
    with_stats: bool = False,
    scale: Optional[float] = None,
    interpret=False,
    config: TpuConfig = TpuConfig(),
) -> AttentionOut:
    """Same signature and outputs as `reference_attention` (TPU Pallas/Mosaic).

    interpret=True runs the TPU interpreter on CPU (out-of-bounds block reads
    give NaN, as garbage would on hardware).
    """
    B, T, Hq, Hkv, G, D, S = check_shapes(q, k, v, cache_k, cache_v, cache_pos, q_pos, layer)
    if check_quant(cache_k, cache_v):
        raise ValueError("the TPU attention kernel does not take 8-bit slots (kv dtype int8/float8_e4m3); "
                         "use the 'reference' kernel backend or a bfloat16 cache")
    scale = D**-0.5 if scale is None else float(scale)
    if not supported(q, k) or S == 0:
        return blockwise_attention(q, k, v, cache_k, cache_v, cache_pos, q_pos, layer=layer, with_stats=with_stats,
                                   scale=scale)
    cache_k, cache_v, layer = stacked(cache_k, cache_v, layer)
    L = cache_k.shape[0]
    if interpret is True:
        interpret = default_interpret_params()
    f32 = jnp.float32
    Rr = G * T
    Rt = round_up(Rr, 8)
    hb = head_group(Hkv, D)
    if S <= config.block_s:
        bs = S  # one block: equal to the full dim, legal for any S
    else:
        bs = round_up(config.block_s, 128)
    NB = cdiv(S, bs)
    NS = max(1, min(config.splits, NB))
    nb = cdiv(NB, NS)
    NS = cdiv(NB, nb)
    Spad = NS * nb * bs
    sanitize = S % bs != 0 or NS * nb != NB

    # Query rows per KV head: [B, Hkv, Rt, D]; row positions [B, Rt, 1].
    qr = q.reshape(B, T, Hkv, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, Rr, D)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, Rt - Rr), (0, 0)))
    q_pos = q_pos.astype(jnp.int32)
    rpos = jnp.pad(jnp.repeat(q_pos, G, axis=1), ((0, 0), (0, Rt - Rr)), constant_values=-1)[..., None]
    ck = cache_k.reshape(L, B, S, Hkv * D)
    cv = cache_v.reshape(L, B, S, Hkv * D)
    cpos = cache_pos.astype(jnp.int32).reshape(B, 1, S)

    def kv_block(b, g, j, i, lyr):
        return (lyr[0], b, jnp.minimum(j * nb + i, NB - 1), g)

    in_specs = [
        pl.BlockSpec((None, hb, Rt, D), lambda b, g, j, i, lyr: (b, g, 0, 0)),
        pl.BlockSpec((None, Rt, 1), lambda b, g, j, i, lyr: (b, 0, 0)),
        pl.BlockSpec((None, 1, bs), lambda b, g, j, i, lyr: (b, 0, jnp.minimum(j * nb + i, NB - 1))),
        pl.BlockSpec((None, None, bs, hb * D), kv_block),
        pl.BlockSpec((None, None, bs, hb * D), kv_block),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((B, Hkv, NS, Rt, D), f32),
        jax.ShapeDtypeStruct((B, Hkv, NS, Rt, 1), f32),
        jax.ShapeDtypeStruct((B, Hkv, NS, Rt, 1), f32),
    ]
    out_specs = [
        pl.BlockSpec((None, hb, None, Rt, D), lambda b, g, j, i, lyr: (b, g, j, 0, 0)),
        pl.BlockSpec((None, hb, None, Rt, 1), lambda b, g, j, i, lyr: (b, g, j, 0, 0)),
        pl.BlockSpec((None, hb, None, Rt, 1), lambda b, g, j, i, lyr: (b, g, j, 0, 0)),
    ]
    if with_stats:
        out_shape.append(jax.ShapeDtypeStruct((B, Hkv, Rt, Spad), f32))
        out_specs.append(pl.BlockSpec((None, hb, Rt, bs), lambda b, g, j, i, lyr: (b, g, 0, j * nb + i)))

    kernel = functools.partial(_kernel, S=S, bs=bs, nb=nb, hb=hb, D=D, scale=scale, sanitize=sanitize)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, Hkv // hb, NS, nb), in_specs=in_specs, out_specs=out_specs
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="adore_sparse_attention_tpu",
    )(layer, qr, rpos, cpos, ck, cv)
    o_p, m_p, l_p = outs[:3]
    o_n, m_n, l_n, s_n = new_rows_partial(q, k, v, q_pos, scale)
    o_all = jnp.concatenate([o_p[:, :, :, :Rr], o_n], axis=2)
    m_all = jnp.concatenate([m_p[:, :, :, :Rr, 0], m_n], axis=2)
    l_all = jnp.concatenate([l_p[:, :, :, :Rr, 0], l_n], axis=2)
    out, lse = merge_partials(o_all, m_all, l_all, T, G, q.dtype)
    mass = None
    if with_stats:
        sc = jnp.concatenate([outs[3][:, :, :Rr, :S], s_n], axis=-1)
        mass = mass_from_scores(sc, lse, T, G)
    return finish(out, lse, mass, with_stats)
