"""Session 15 experiment, prepared for the next device run: one fused multiply-add a score.

Nsight Compute on the base-2 kernel (docs/KERNELS.md, "Session 15", item 6) counts
272,256 FP32 instructions not fused against 14,592 fused at (32,9,3,64) S=1024 T=1:
softmax_gpu.step scales each score by one multiply, masks it by one select and
shifts it by one subtract. Here the mask is applied to the raw dot product, the row
max is scaled once a row (scale > 0 keeps the max), and each score's exponent is
one multiply-add, raw * c - m. Variants, swapped in for `softmax_gpu.step` while
the decode and prefill kernels are traced (the library unchanged):

* base2: softmax_gpu.step as on main;
* fma: `step_fma` below.

    PYTHONPATH=. python3 docs/results/kernels_session15/fma_ab.py check             # CPU, interpret mode
    PYTHONPATH=. python3 docs/results/kernels_session15/fma_ab.py bench OUT [DEADLINE_S]   # one H200

check: exp_ab.py's check of each variant against `reference_attention` (out, mass,
lse) on fresh random inputs: partly and fully empty caches, rebuilt rows before and
after the cached slots, a padding row, non-multiple S, T = 1, 2, 9, 3 splits, the
prefill kernel over a long chunk. bench: that check on the device (bf16), then
device time of both at exp_ab.py's points with cuDNN and a same-size copy
(OUT/fma_ab.json), and the prefill chunk (OUT/fma_ab_prefill.json); tables printed
last.
"""
import contextlib
import functools
import os
import sys
import time

import jax.numpy as jnp
from jax import lax

from adore_jax.attention import NEG_INF
from adore_jax.kernels import softmax_gpu

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels_session14"))
import exp_ab  # noqa: E402  (its op, check, points and prefill timing, with this file's step)


def step_fma(carry, q, k, v, kpos, rpos, *, scale, precision, interpret):
    """softmax_gpu.step with the mask on the raw dot product and one multiply-add a
    score (scale > 0)."""
    assert scale > 0, "step_fma needs scale > 0"
    c = scale * softmax_gpu.LOG2E
    o, m, l = carry
    x = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)
    kpos = jnp.where(kpos >= 0, kpos, 2**31 - 1)
    x = jnp.where(kpos[None, :] <= rpos[:, None], x, NEG_INF)
    mx = jnp.max(x, axis=1)
    m_new = jnp.maximum(m, jnp.where(mx > 0.5 * NEG_INF, mx * c, NEG_INF))  # per row
    alpha = softmax_gpu.exp2(m - m_new, interpret)
    m_row = jnp.where(m_new > 0.5 * NEG_INF, m_new, 0.0)
    p = softmax_gpu.exp2(x * c - m_row[:, None], interpret)  # masked: 2 ** (NEG_INF * c - m) = 0
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)
    s = jnp.where(x > 0.5 * NEG_INF, x * c, NEG_INF)  # the statistics' scores (dead code without them)
    return (alpha[:, None] * o + pv, m_new, alpha * l + jnp.sum(p, axis=1)), s


VARIANTS = {"base2": softmax_gpu.step, "fma": step_fma}


@contextlib.contextmanager
def step_as(name):
    """Trace the GPU kernels with VARIANTS[name] as softmax_gpu.step."""
    old = softmax_gpu.step
    softmax_gpu.step = VARIANTS[name]
    try:
        yield
    finally:
        softmax_gpu.step = old


op = functools.partial(exp_ab.op, trace_as=step_as)


def bench(out_dir, deadline):
    from eval.bench_kernels import cudnn, row_summary, same_size_copy, sweep, time_point

    t0 = time.time()
    exp_ab.check(list(VARIANTS), interpret=False, dtype=jnp.bfloat16, tol=3e-2, op=op)

    def row_of(shape, S, T):
        impls = {"copy": same_size_copy} | ({"cudnn": cudnn} if T == 1 else {}) | {n: op(n) for n in VARIANTS}
        return time_point(1100, shape, S, T, impls)

    rows = sweep(exp_ab.POINTS, row_of, f"{out_dir}/fma_ab.json", deadline - (time.time() - t0))
    print("\nus per call (K+V TB/s), fastest first")
    for row in rows:
        print(row["shape"], f"copy {row['copy']['us']:.1f} |", row_summary(row, top=3))
    if time.time() - t0 < deadline:
        exp_ab.bench_prefill({n: op(n) for n in VARIANTS}, f"{out_dir}/fma_ab_prefill.json")


if __name__ == "__main__":
    if sys.argv[1:2] == ["check"]:
        exp_ab.check(list(VARIANTS), interpret=True, op=op)
    elif sys.argv[1:2] == ["bench"] and len(sys.argv) in (3, 4):
        bench(sys.argv[2], float(sys.argv[3]) if sys.argv[3:] else 300.0)
    else:
        sys.exit("usage: fma_ab.py check | fma_ab.py bench OUT_DIR [DEADLINE_S]")
