"""Few-row matmul for decode: GPU Pallas (Triton lowering).

x [M, K] @ w [K, N] -> [M, N] fp32, for M <= FEW_ROWS (a decode step's rows).
Such a matmul only streams w; the kernel's job is to read it at copy speed.
Grid (N / block_n, splits): each program owns block_n columns and one of
`splits` equal ranges of K, loads its x rows (padded to a power of two >= 16 by
masked loads) and walks its K range in block_k steps with fp32 accumulation.
Programs write fp32 partials [splits, M, N]; their sum happens in XLA, where it
fuses into whatever reads the result (the cast, RoPE, the residual add).

`reference_matmul` is the plain XLA matmul it replaces (what models/llama.py
computes elsewhere). Measurements: docs/KERNELS.md, "Measured on the H200".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from adore_jax.kernels.common import cdiv, next_pow2, num_sms, round_up

FEW_ROWS = 64  # more rows than this: the matmul is no longer a pure weight stream; XLA's matmul takes it
SMEM_BYTES = 160 << 10  # pipeline buffers (x and w tiles times stages) kept under this (an H200 SM has 227 KiB)


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Tuning knobs (static). None: chosen by `plan` from the shape."""

    block_n: int = 128  # output columns per program (a power of two; 256-byte rows of bf16 w)
    block_k: int = 256  # K per loop step (a power of two; halved until the pipeline fits SMEM_BYTES)
    splits: Optional[int] = None  # ranges of K per column block; None: enough for one program per SM
    num_warps: int = 4
    num_stages: int = 4


def reference_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] fp32 (XLA)."""
    return jnp.einsum("mk,kn->mn", x, w, preferred_element_type=jnp.float32)


def tiles(M: int, K: int, cols: int, cfg: MatmulConfig, itemsize: int) -> tuple[int, int]:
    """(rows padded to a power of two >= 16, block_k): block_k is cfg's (at most K's
    power of two), halved until the x and w tiles of all stages fit SMEM_BYTES."""
    Mp = max(16, next_pow2(M))
    bk = max(16, min(cfg.block_k, next_pow2(K)))
    while bk > 16 and cfg.num_stages * (Mp + cols) * bk * itemsize > SMEM_BYTES:
        bk //= 2
    return Mp, bk


def plan(M: int, K: int, N: int, cfg: MatmulConfig = MatmulConfig(), itemsize: int = 2):
    """Static launch plan: (rows padded, block_n, block_k, splits, K per split).
    N is the weights' columns together. block_k is halved until the pipeline's
    tiles fit SMEM_BYTES. At 8 rows on an H200 the best configs ran about one
    program per SM (docs/KERNELS.md)."""
    bn = max(16, min(cfg.block_n, next_pow2(N)))
    Mp, bk = tiles(M, K, bn, cfg, itemsize)
    nblocks_k = cdiv(K, bk)
    ns = cfg.splits or max(1, num_sms() // cdiv(N, bn))
    ns = max(1, min(ns, nblocks_k))
    ks = round_up(cdiv(K, ns), bk)
    ns = cdiv(K, ks)
    return Mp, bn, bk, ns, ks


def supported(x: jax.Array, ws) -> bool:
    """Whether the kernel takes these operands: x [M <= FEW_ROWS, K] and weights [K, N_i], one float dtype."""
    ws = ws if isinstance(ws, (list, tuple)) else (ws,)
    return (
        x.ndim == 2 and 0 < x.shape[0] <= FEW_ROWS and jnp.issubdtype(x.dtype, jnp.floating) and len(ws) > 0
        and all(w.ndim == 2 and w.shape[0] == x.shape[1] and w.shape[1] > 0 and w.dtype == x.dtype for w in ws)
    )


def _kernel(x_ref, *refs, M, Mp, K, Ns, bn, bk, ks, precision):
    w_refs, o_refs = refs[: len(Ns)], refs[len(Ns):]
    n = pl.program_id(0)
    s = pl.program_id(1)
    f32 = jnp.float32
    rows = jnp.arange(Mp, dtype=jnp.int32)
    row_ok = rows < M
    k_start = s * ks
    n_steps = ks // bk if K % ks == 0 else jnp.clip(cdiv(K, bk) - k_start // bk, 0, ks // bk)
    first = 0  # the weight's first column block in the grid

    for w_ref, o_ref, N in zip(w_refs, o_refs, Ns):
        blocks = cdiv(N, bn)

        @pl.when((n >= first) & (n < first + blocks))
        def _(w_ref=w_ref, o_ref=o_ref, N=N, first=first):
            n0 = pl.multiple_of((n - first) * bn, bn)
            cols = n0 + jnp.arange(bn, dtype=jnp.int32)
            col_ok = cols < N
            whole = K % bk == 0 and N % bn == 0  # no masks on w

            def body(i, acc):
                k0 = pl.multiple_of(k_start + i * bk, bk)
                kk = k0 + jnp.arange(bk, dtype=jnp.int32)
                k_ok = kk < K
                xb = plgpu.load(x_ref.at[rows[:, None], kk[None, :]], mask=row_ok[:, None] & k_ok[None, :], other=0)
                if whole:
                    wb = w_ref[pl.ds(k0, bk), pl.ds(n0, bn)]
                else:
                    wb = plgpu.load(w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)], mask=k_ok[:, None] & col_ok[None, :],
                                    other=0)
                return acc + lax.dot_general(xb, wb, (((1,), (0,)), ((), ())), precision=precision,
                                             preferred_element_type=f32)

            acc = lax.fori_loop(0, n_steps, body, jnp.zeros((Mp, bn), f32))
            plgpu.store(o_ref.at[s, rows[:, None], cols[None, :]], acc, mask=row_ok[:, None] & col_ok[None, :])

        first += blocks


def matmul_gpu(x: jax.Array, ws, *, interpret: bool = False, config: MatmulConfig = MatmulConfig()):
    """x [M, K] @ w [K, N] -> [M, N] fp32 (fp32 accumulation), M <= FEW_ROWS.

    ws may be a list of weights [K, N_i] (q, k and v): one launch reads them all
    and returns the list of products [M, N_i]."""
    if not supported(x, ws):
        shapes = [(w.shape, str(w.dtype)) for w in (ws if isinstance(ws, (list, tuple)) else [ws])]
        raise ValueError(f"matmul_gpu takes x [M <= {FEW_ROWS}, K] and weights [K, N] of x's float dtype; "
                         f"got x {x.shape} {x.dtype} and {shapes}")
    many = isinstance(ws, (list, tuple))
    ws = list(ws) if many else [ws]
    M, K = x.shape
    Ns = tuple(w.shape[1] for w in ws)
    Mp, bn, bk, ns, ks = plan(M, K, sum(Ns), config, x.dtype.itemsize)
    kernel = functools.partial(
        _kernel, M=M, Mp=Mp, K=K, Ns=Ns, bn=bn, bk=bk, ks=ks,
        # fp32 inputs: full fp32 dots (Triton's default for fp32 is TF32)
        precision=lax.Precision.HIGHEST if x.dtype == jnp.float32 else None,
    )
    whole = lambda shape: pl.BlockSpec(shape, lambda n, s: (0,) * len(shape))
    partials = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((ns, M, N), jnp.float32) for N in Ns],
        grid=(sum(cdiv(N, bn) for N in Ns), ns),
        in_specs=[whole((M, K))] + [whole((K, N)) for N in Ns],
        out_specs=[whole((ns, M, N)) for N in Ns],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="adore_few_row_matmul",
    )(x, *ws)
    outs = [p[0] if ns == 1 else p.sum(0) for p in partials]
    return outs if many else outs[0]

