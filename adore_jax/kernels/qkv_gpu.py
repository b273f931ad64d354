"""A decode layer's attention input in one launch: GPU Pallas (Triton lowering).

    q, k, v = rope(rms_norm(x) @ [wq, wk, wv] + [bq, bk, bv])   (RoPE on q and k)

for x [M <= FEW_ROWS, E], the residual stream of a decode step. XLA runs this as
a norm, three or fewer matmuls, the RoPE fusions and casts: about six kernels a
layer, each with its launch gap (docs/THROUGHPUT.md "Where the step goes").
Grid: one program per head of q, k and v (D columns). Each program sums its
rows' squares over E (x is small and stays in L2), then streams its D weight
columns as two halves of D/2, which are RoPE's pairs (rotate-half), and
finishes bias, rounding to x's dtype, and the rotation in registers.

`reference_norm_qkv_rope` is the same computation in XLA, in models/llama.py's
order of roundings (norm in fp32, normed rows in x's dtype, products in fp32,
bias, x's dtype, RoPE in fp32, x's dtype).
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
from adore_jax.kernels.matmul_gpu import FEW_ROWS, MatmulConfig


def rope_tables(positions: jax.Array, inv_freq: jax.Array):
    """(cos, sin), each [..., D/2] fp32, for positions [...] and inverse frequencies [D/2]."""
    ang = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(ang), jnp.sin(ang)


def reference_norm_qkv_rope(x, norm_w, ws: Sequence, bs: Sequence, cos, sin, *, eps: float, head_dim: int,
                            rope: Sequence[bool] = (True, True, False)):
    """XLA reference. x [M, E]; norm_w [E]; ws[i] [E, H_i * D]; bs[i] [H_i * D] or None;
    cos, sin [M, D/2] fp32. Returns [M, H_i * D] in x's dtype; rope[i]: rotate output i."""
    xf = x.astype(jnp.float32)
    h = (xf * lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps) * norm_w.astype(jnp.float32)).astype(x.dtype)
    outs = []
    for w, b, r in zip(ws, bs, rope):
        y = jnp.einsum("me,en->mn", h, w, preferred_element_type=jnp.float32)
        y = (y if b is None else y + b.astype(jnp.float32)).astype(x.dtype)
        if r:
            yf = y.astype(jnp.float32).reshape(x.shape[0], -1, 2, head_dim // 2)
            y1, y2 = yf[:, :, 0], yf[:, :, 1]
            c, s = cos[:, None], sin[:, None]
            y = jnp.stack([y1 * c - y2 * s, y2 * c + y1 * s], 2).reshape(y.shape).astype(x.dtype)
        outs.append(y)
    return outs


def supported(x, ws, head_dim: int) -> bool:
    """x [M <= FEW_ROWS, E] and weights [E, H_i * D] of x's float dtype, D a power of two >= 32."""
    return (
        x.ndim == 2 and 0 < x.shape[0] <= FEW_ROWS and jnp.issubdtype(x.dtype, jnp.floating)
        and head_dim >= 32 and head_dim == next_pow2(head_dim)
        and all(w.ndim == 2 and w.shape[0] == x.shape[1] and w.shape[1] % head_dim == 0 and w.dtype == x.dtype
                for w in ws)
    )


def _kernel(*refs, M, Mp, E, D, heads, has_bias, rope, bk, eps, precision):
    n_w = len(heads)
    x_ref, nw_ref, cos_ref, sin_ref = refs[:4]
    w_refs = refs[4:4 + n_w]
    b_refs = refs[4 + n_w:4 + n_w + sum(has_bias)]
    o_refs = refs[4 + n_w + sum(has_bias):]
    f32 = jnp.float32
    p = pl.program_id(0)
    half = D // 2
    rows = jnp.arange(Mp, dtype=jnp.int32)
    row_ok = rows < M
    hd = jnp.arange(half, dtype=jnp.int32)
    ok2 = row_ok[:, None] & (hd[None, :] < half)
    nk = cdiv(E, bk)

    def x_block(i):
        kk = i * bk + jnp.arange(bk, dtype=jnp.int32)
        k_ok = kk < E
        xb = plgpu.load(x_ref.at[rows[:, None], kk[None, :]], mask=row_ok[:, None] & k_ok[None, :], other=0)
        return kk, k_ok, xb.astype(f32)

    ss = lax.fori_loop(0, nk, lambda i, acc: acc + jnp.sum(x_block(i)[2] ** 2, axis=1), jnp.zeros((Mp,), f32))
    rstd = lax.rsqrt(ss / E + eps)
    cos = plgpu.load(cos_ref.at[rows[:, None], hd[None, :]], mask=ok2, other=0)
    sin = plgpu.load(sin_ref.at[rows[:, None], hd[None, :]], mask=ok2, other=0)

    first, bi = 0, 0
    for i in range(n_w):
        b_ref = b_refs[bi] if has_bias[i] else None
        bi += has_bias[i]

        @pl.when((p >= first) & (p < first + heads[i]))
        def _(w_ref=w_refs[i], b_ref=b_ref, o_ref=o_refs[i], first=first, rot=rope[i]):
            c0 = (p - first) * D  # this head's first column

            def body(j, acc):
                a1, a2 = acc
                kk, k_ok, xb = x_block(j)
                nw = plgpu.load(nw_ref.at[kk], mask=k_ok, other=0).astype(f32)
                h = (xb * rstd[:, None] * nw[None, :]).astype(x_ref.dtype)
                m = k_ok[:, None] & (hd[None, :] < half)
                w1 = plgpu.load(w_ref.at[kk[:, None], (c0 + hd)[None, :]], mask=m, other=0)
                w2 = plgpu.load(w_ref.at[kk[:, None], (c0 + half + hd)[None, :]], mask=m, other=0)
                dot = lambda w: lax.dot_general(h, w, (((1,), (0,)), ((), ())), precision=precision,
                                                preferred_element_type=f32)
                return a1 + dot(w1), a2 + dot(w2)

            zero = jnp.zeros((Mp, half), f32)
            y1, y2 = lax.fori_loop(0, nk, body, (zero, zero))
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


def norm_qkv_rope_gpu(x, norm_w, ws: Sequence, bs: Sequence, cos, sin, *, eps: float, head_dim: int,
                      rope: Sequence[bool] = (True, True, False), interpret: bool = False,
                      config: Optional[MatmulConfig] = None):
    """Same arguments and outputs as `reference_norm_qkv_rope`; one launch."""
    if not supported(x, ws, head_dim) or len(bs) != len(ws) or len(rope) != len(ws):
        raise ValueError(f"norm_qkv_rope_gpu takes x [M <= {FEW_ROWS}, E] and weights [E, H * {head_dim}] of x's "
                         f"float dtype (head dim a power of two >= 32), a bias or None and a rope flag per weight; "
                         f"got x {x.shape} {x.dtype}, weights {[(w.shape, str(w.dtype)) for w in ws]}")
    config = config or MatmulConfig()
    M, E = x.shape
    D = head_dim
    Mp = max(16, next_pow2(M))
    bk = max(16, min(config.block_k, next_pow2(E)))
    while bk > 16 and config.num_stages * (Mp + D) * bk * x.dtype.itemsize > (160 << 10):
        bk //= 2
    heads = tuple(w.shape[1] // D for w in ws)
    has_bias = tuple(b is not None for b in bs)
    kernel = functools.partial(
        _kernel, M=M, Mp=Mp, E=E, D=D, heads=heads, has_bias=has_bias, rope=tuple(bool(r) for r in rope), bk=bk,
        eps=float(eps), precision=lax.Precision.HIGHEST if x.dtype == jnp.float32 else None)
    whole = lambda a: pl.BlockSpec(a.shape, lambda p: (0,) * a.ndim)
    args = [x, norm_w, cos.astype(jnp.float32), sin.astype(jnp.float32), *ws, *(b for b in bs if b is not None)]
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((M, w.shape[1]), x.dtype) for w in ws],
        grid=(sum(heads),),
        in_specs=[whole(a) for a in args],
        out_specs=[pl.BlockSpec((M, w.shape[1]), lambda p: (0, 0)) for w in ws],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="adore_norm_qkv_rope",
    )(*args)
