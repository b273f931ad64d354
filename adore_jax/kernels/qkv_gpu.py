"""A decode layer's q, k and v in one launch, RoPE included: GPU Pallas (Triton lowering).

    q, k, v = rope(h @ [wq, wk, wv] + [bq, bk, bv])   (RoPE on q and k)

for h [M <= FEW_ROWS, E], a decode step's normed rows. XLA runs this as the
matmuls, then RoPE's fusions and casts: more kernels a layer, each with its
launch gap (docs/THROUGHPUT.md "Where the step goes").
Grid: one program per head of q, k and v (D columns). Each program streams
its D weight columns as two halves of D/2, which are RoPE's pairs
(rotate-half), and finishes bias, rounding to h's dtype and the rotation in
registers.

`reference_qkv_rope` is the same computation in XLA, in models/llama.py's order
of roundings (products in fp32, bias, h's dtype, RoPE in fp32, h's dtype);
cos and sin come from models.llama.rope_tables.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from adore_jax.kernels.common import cdiv, next_pow2
from adore_jax.kernels.matmul_gpu import FEW_ROWS, MatmulConfig, tiles
from adore_jax.kernels.matmul_gpu import supported as matmul_supported


def reference_qkv_rope(h, ws: Sequence, bs: Sequence, cos, sin, *, head_dim: int,
                       rope: Sequence[bool] = (True, True, False)):
    """XLA reference. h [M, E] (the normed rows); ws[i] [E, H_i * D]; bs[i] [H_i * D]
    or None; cos, sin [M, D/2] fp32. Returns [M, H_i * D] in h's dtype; rope[i]:
    rotate output i."""
    outs = []
    for w, b, r in zip(ws, bs, rope):
        y = jnp.einsum("me,en->mn", h, w, preferred_element_type=jnp.float32)
        y = (y if b is None else y + b.astype(jnp.float32)).astype(h.dtype)
        if r:
            yf = y.astype(jnp.float32).reshape(h.shape[0], -1, 2, head_dim // 2)
            y1, y2 = yf[:, :, 0], yf[:, :, 1]
            c, s = cos[:, None], sin[:, None]
            y = jnp.stack([y1 * c - y2 * s, y2 * c + y1 * s], 2).reshape(y.shape).astype(h.dtype)
        outs.append(y)
    return outs


def supported(x, ws, head_dim: int) -> bool:
    """`matmul_gpu`'s operands (x [M <= FEW_ROWS, E], weights [E, N_i] of x's float
    dtype) whose N_i are whole heads of D, a power of two >= 32."""
    return (matmul_supported(x, ws) and head_dim >= 32 and head_dim == next_pow2(head_dim)
            and all(w.shape[1] % head_dim == 0 for w in ws))


def _kernel(*refs, M, Mp, E, D, heads, has_bias, rope, bk, precision):
    n_w = len(heads)
    h_ref, cos_ref, sin_ref = refs[:3]
    w_refs = refs[3:3 + n_w]
    b_refs = refs[3 + n_w:3 + n_w + sum(has_bias)]
    o_refs = refs[3 + n_w + sum(has_bias):]
    f32 = jnp.float32
    p = pl.program_id(0)
    half = D // 2
    rows = jnp.arange(Mp, dtype=jnp.int32)
    row_ok = rows < M
    hd = jnp.arange(half, dtype=jnp.int32)
    ok2 = row_ok[:, None] & (hd[None, :] < half)
    cos = plgpu.load(cos_ref.at[rows[:, None], hd[None, :]], mask=ok2, other=0)
    sin = plgpu.load(sin_ref.at[rows[:, None], hd[None, :]], mask=ok2, other=0)

    first, bi = 0, 0
    for i in range(n_w):
        b_ref = b_refs[bi] if has_bias[i] else None
        bi += has_bias[i]

        @pl.when((p >= first) & (p < first + heads[i]))
        def _(w_ref=w_refs[i], b_ref=b_ref, o_ref=o_refs[i], first=first, rot=rope[i]):
            c0 = pl.multiple_of((p - first) * D, D)  # this head's first column

            def body(j, acc):
                a1, a2 = acc
                k0 = pl.multiple_of(j * bk, bk)
                kk = k0 + jnp.arange(bk, dtype=jnp.int32)
                k_ok = kk < E
                hb = plgpu.load(h_ref.at[rows[:, None], kk[None, :]], mask=row_ok[:, None] & k_ok[None, :], other=0)
                if E % bk == 0:  # whole blocks: unmasked weight tiles
                    w1 = w_ref[pl.ds(k0, bk), pl.ds(c0, half)]
                    w2 = w_ref[pl.ds(k0, bk), pl.ds(c0 + half, half)]
                else:
                    m = k_ok[:, None] & (hd[None, :] < half)
                    w1 = plgpu.load(w_ref.at[pl.ds(k0, bk), pl.ds(c0, half)], mask=m, other=0)
                    w2 = plgpu.load(w_ref.at[pl.ds(k0, bk), pl.ds(c0 + half, half)], mask=m, other=0)
                dot = lambda w: lax.dot_general(hb, w, (((1,), (0,)), ((), ())), precision=precision,
                                                preferred_element_type=f32)
                return a1 + dot(w1), a2 + dot(w2)

            zero = jnp.zeros((Mp, half), f32)
            y1, y2 = lax.fori_loop(0, cdiv(E, bk), body, (zero, zero))
            if b_ref is not None:
                y1 = y1 + b_ref[pl.ds(c0, half)].astype(f32)[None, :]
                y2 = y2 + b_ref[pl.ds(c0 + half, half)].astype(f32)[None, :]
            dt = o_ref.dtype
            y1, y2 = y1.astype(dt).astype(f32), y2.astype(dt).astype(f32)
            if rot:
                y1, y2 = y1 * cos - y2 * sin, y2 * cos + y1 * sin
            plgpu.store(o_ref.at[rows[:, None], (c0 + hd)[None, :]], y1.astype(dt), mask=ok2)
            plgpu.store(o_ref.at[rows[:, None], (c0 + half + hd)[None, :]], y2.astype(dt), mask=ok2)

        first += heads[i]


def qkv_rope_gpu(h, ws: Sequence, bs: Sequence, cos, sin, *, head_dim: int,
                 rope: Sequence[bool] = (True, True, False), interpret: bool = False,
                 config: Optional[MatmulConfig] = None):
    """Same arguments and outputs as `reference_qkv_rope`; one launch."""
    if not supported(h, ws, head_dim) or len(bs) != len(ws) or len(rope) != len(ws):
        raise ValueError(f"qkv_rope_gpu takes h [M <= {FEW_ROWS}, E] and weights [E, H * {head_dim}] of h's "
                         f"float dtype (head dim a power of two >= 32), a bias or None and a rope flag per weight; "
                         f"got h {h.shape} {h.dtype}, weights {[(w.shape, str(w.dtype)) for w in ws]}")
    config = config or MatmulConfig()
    M, E = h.shape
    D = head_dim
    Mp, bk = tiles(M, E, D, config, h.dtype.itemsize)
    heads = tuple(w.shape[1] // D for w in ws)
    has_bias = tuple(b is not None for b in bs)
    kernel = functools.partial(
        _kernel, M=M, Mp=Mp, E=E, D=D, heads=heads, has_bias=has_bias, rope=tuple(bool(r) for r in rope), bk=bk,
        precision=lax.Precision.HIGHEST if h.dtype == jnp.float32 else None)
    whole = lambda a: pl.BlockSpec(a.shape, lambda p: (0,) * a.ndim)
    args = [h, cos.astype(jnp.float32), sin.astype(jnp.float32), *ws, *(b for b in bs if b is not None)]
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((M, w.shape[1]), h.dtype) for w in ws],
        grid=(sum(heads),),
        in_specs=[whole(a) for a in args],
        out_specs=[pl.BlockSpec((M, w.shape[1]), lambda p: (0, 0)) for w in ws],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="adore_qkv_rope",
    )(*args)
