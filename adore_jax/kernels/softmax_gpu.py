"""The online-softmax step of the GPU attention kernels (decode and prefill; Triton lowering).

Scores are kept in base 2: s = q.k * scale * log2(e), so each score's
exponential is one `ex2.approx.ftz.f32` instruction, where `jnp.exp` lowers to
libdevice's accurate `__nv_expf`, a range reduction around that same
instruction. Small decode calls are bound by the rate the loop issues
instructions, and this made them 1-16% faster (docs/KERNELS.md, "Design
notes"). The running max m is in the same base-2 units; `natural` turns it back for
the log-sum-exp and the split merge.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

from models.attention import NEG_INF

LOG2E = math.log2(math.e)
_INT32_MAX = 2**31 - 1


def exp2(x, interpret: bool):
    """2 ** x of fp32 x, elementwise: `ex2.approx.ftz.f32` on the GPU (relative
    error about 2**-22, subnormal results flushed to 0), `jnp.exp2` in interpret mode."""
    if interpret:
        return jnp.exp2(x)
    [y] = plgpu.elementwise_inline_asm("ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
    return y


def init(R: int, D: int):
    """The empty carry: o [R, D] = 0, m [R] = NEG_INF, l [R] = 0 (fp32)."""
    f32 = jnp.float32
    return jnp.zeros((R, D), f32), jnp.full((R,), NEG_INF, f32), jnp.zeros((R,), f32)


def step(carry, q, k, v, kpos, rpos, *, scale: float, precision, interpret: bool, k_scale=None, v_scale=None):
    """One block of keys into the carry (o [R, D], m [R] base 2, l [R]; fp32).

    q [R, D]; k, v [bs, D]; kpos [bs] key positions (-1: empty); rpos [R] row
    positions. Key c counts for row r when 0 <= kpos[c] <= rpos[r]. Returns the
    new carry and the masked scores [R, bs] in base 2 (NEG_INF where masked).
    8-bit slots: k, v hold the int8/fp8 values and k_scale, v_scale [bs] fp32
    their scales; the values go into the dots in q's dtype (exact for int8 and
    e4m3) and the scales multiply the scores' columns and the probabilities.
    """
    o, m, l = carry
    if k_scale is not None:
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)
    if k_scale is not None:
        s = s * k_scale[None, :]
    kpos = jnp.where(kpos >= 0, kpos, _INT32_MAX)  # empty slots: after every row, one compare a score
    s = jnp.where(kpos[None, :] <= rpos[:, None], s * (scale * LOG2E), NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = exp2(m - m_new, interpret)
    m_row = jnp.where(m_new > 0.5 * NEG_INF, m_new, 0.0)  # a row with no key yet: p = 2 ** NEG_INF = 0
    p = exp2(s - m_row[:, None], interpret)
    pw = p if v_scale is None else p * v_scale[None, :]
    pv = lax.dot_general(pw.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)
    return (alpha[:, None] * o + pv, m_new, alpha * l + jnp.sum(p, axis=1)), s


def load_zeroed(ref, mask, dtype=None):
    """plgpu.load of `ref` with the masked elements 0. dtype (8-bit slots: q's dtype):
    convert the loaded values first, then zero; the Triton lowering cannot make an
    `other` fill value of float8 from a constant."""
    if dtype is None:
        return plgpu.load(ref, mask=mask, other=0)
    return jnp.where(mask, plgpu.load(ref, mask=mask).astype(dtype), 0)


def natural(x):
    """Base-2 scores or maxima in natural units (NEG_INF stays below 0.5 * NEG_INF)."""
    return x * (1 / LOG2E)
