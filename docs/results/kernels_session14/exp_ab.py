"""Session 14 experiment, prepared for the next device run: the exponential in the
GPU kernels' online softmax.

In the Triton lowering of Pallas, `jnp.exp` on fp32 becomes a call to libdevice's
`__nv_expf`, CUDA's accurate expf (range reduction around one ex2.approx), where
Triton's own `tl.exp` is a multiply and one `ex2.approx`. Nsight Compute put the
remaining T = 1 miss in the decode kernel's issue rate (docs/KERNELS.md,
"Session 14", item 4), and each loop step takes the exponential of every score.
Variants, swapped in for `jnp.exp` inside the decode and prefill kernels while
they are traced (adore_jax/kernels/attention_gpu.py and prefill_gpu.py unchanged):

* exp: as on main (`__nv_expf`);
* exp2: `jnp.exp2(x * log2(e))` (libdevice's `__nv_exp2f`);
* ex2: `ex2.approx.ftz.f32` of `x * log2(e)` by inline PTX (GPU only);

and all_heads.py's kernel with one KV head a program (its control, within 1-2% of
the kernel) as it is and with `lean=True`: also one compare and one select a score
for the mask, and exp2 of one multiply-add.

    PYTHONPATH=. python3 docs/results/kernels_session14/exp_ab.py check              # CPU, interpret mode (exp2)
    PYTHONPATH=. python3 docs/results/kernels_session14/exp_ab.py bench OUT [DEADLINE_S]   # one H200

check: each variant the platform can run against `reference_attention` on fresh
random inputs (partly and fully empty caches, rebuilt rows before and after the
cached slots, non-multiple S, T = 1, 2, 9, stats, the prefill kernel over a long
chunk). bench: that check on the device, then device time of each variant at the
bench's T = 1 and T = 9 points that miss the targets, SmolLM2's step shape, an
MHA point (OUT/exp_ab.json), and the prefill chunk of eval/bench_kernels.py
(OUT/exp_ab_prefill.json); tables printed last.

Measured at 1eccdab (docs/KERNELS.md, "Session 15", item 1). From a1adb79 on, the
kernels' loop is softmax_gpu.step, which does not call `jnp.exp`, so there the
variants differ only in the split merge. CHECK_CASES, POINTS, `check` and
`bench_prefill` also serve session 15's base2.py and fma_ab.py.
"""
import contextlib
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax.attention import reference_attention
from adore_jax.kernels import GpuConfig, sparse_attention_gpu
from adore_jax.kernels import attention_gpu, prefill_gpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import all_heads  # noqa: E402  (the lean loop's kernel, and the check's inputs)

LOG2E = math.log2(math.e)


def _exp2(x):
    return jnp.exp2(x * LOG2E)


def _ex2(x):
    from jax.experimental.pallas import triton as plgpu

    [r] = plgpu.elementwise_inline_asm("ex2.approx.ftz.f32 $0, $1;", args=[x * LOG2E], constraints="=f,f", pack=1,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
    return r


VARIANTS = {"exp": jnp.exp, "exp2": _exp2, "ex2": _ex2}


class _Numpy:
    """jax.numpy with another exp."""

    def __init__(self, exp):
        self.exp = exp

    def __getattr__(self, name):
        return getattr(jnp, name)


@contextlib.contextmanager
def exp_as(name):
    """Trace the GPU kernels with VARIANTS[name] as their exp."""
    mods = (attention_gpu, prefill_gpu)
    old = [m.jnp for m in mods]
    for m in mods:
        m.jnp = _Numpy(VARIANTS[name])
    try:
        yield
    finally:
        for m, o in zip(mods, old):
            m.jnp = o


def op(name, cfg=GpuConfig(), with_stats=False, interpret=False, trace_as=exp_as):
    """The attention op (out, or (out, mass, lse) with stats) of variant `name`,
    traced inside the context manager `trace_as(name)`."""
    def f(q, k, v, ck, cv, cpos, qpos):
        with trace_as(name):
            r = sparse_attention_gpu(q, k, v, ck, cv, cpos, qpos, with_stats=with_stats, config=cfg,
                                     interpret=interpret)
        return (r.out, r.mass, r.lse) if with_stats else r.out

    return f


# (B, T, Hq, Hkv, D, S, config, with_stats) of `check`
CHECK_CASES = [(3, 1, 9, 3, 64, 200, GpuConfig(), True), (2, 2, 8, 2, 32, 130, GpuConfig(splits=3), True),
               (2, 9, 9, 3, 64, 77, GpuConfig(merge="xla"), False), (2, 1, 32, 8, 128, 1000, GpuConfig(), False),
               (2, 40, 4, 2, 64, 100, GpuConfig(), False)]  # T = 40: the prefill kernel
# ((B, Hq, Hkv, D), S, T) timed by `bench`: the bench points that miss the targets, SmolLM2's step, an MHA point
POINTS = [((32, 9, 3, 64), 1024, 1), ((64, 9, 3, 64), 1024, 1), ((32, 9, 3, 64), 4096, 1),
          ((32, 9, 3, 64), 4096, 9), ((8, 32, 8, 128), 4096, 9), ((8, 32, 8, 128), 1024, 1),
          ((32, 9, 3, 64), 8192, 9), ((8, 32, 32, 128), 4096, 1), ((32, 9, 3, 64), 1024, 9)]


def check(names, interpret, dtype=jnp.float32, tol=2e-5, op=op):
    """Max abs error of each variant's out, mass and lse against the reference, the
    variants' ops made by `op(name, config, with_stats, interpret)`; raises on a failure."""
    worst = {}
    for n, (B, T, Hq, Hkv, D, S, cfg, stats) in enumerate(CHECK_CASES):
        args = all_heads.case(200 + n, B, T, Hq, Hkv, D, S, dtype=dtype)
        ref = reference_attention(*[a.astype(jnp.float32) if a.dtype == dtype else a for a in args], with_stats=stats)
        ref = (ref.out, ref.mass, ref.lse) if stats else (ref.out,)
        for name in names:
            got = op(name, cfg, stats, interpret)(*args)
            got = got if stats else (got,)
            for label, g, r in zip(("out", "mass", "lse"), got, ref):
                g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
                if label == "lse":  # rows with nothing to attend keep about NEG_INF
                    g, r = np.maximum(g, -1e4), np.maximum(r, -1e4)
                err = float(np.max(np.abs(g - r))) if np.isfinite(g).all() else float("inf")
                worst[name] = max(worst.get(name, 0.0), err)
                if not err <= tol * (1 if label != "lse" else 10):
                    raise AssertionError(f"{name}: case {(B, T, Hq, Hkv, D, S)} {label}: max abs error {err}")
    print("check PASS:", {n: f"{e:.1e}" for n, e in worst.items()}, "interpret" if interpret else "device", flush=True)
    return worst


def bench(out_dir, deadline):
    from adore_jax.kernels.attention_gpu import padded_rows, plan
    from eval.bench_kernels import cudnn, row_summary, same_size_copy, sweep, time_point

    t0 = time.time()
    check(list(VARIANTS), interpret=False, dtype=jnp.bfloat16, tol=3e-2)
    all_heads.check(interpret=False, dtype=jnp.bfloat16, tol=3e-2, split_counts=(3,), leans=(True,), one_head=True)

    def row_of(shape, S, T):
        B, Hq, Hkv, D = shape
        bs, ns, _, st = plan(B, Hkv, S, D, GpuConfig(), padded_rows(Hq // Hkv, T))
        impls = {"copy": same_size_copy} | ({"cudnn": cudnn} if T == 1 else {}) | {n: op(n) for n in VARIANTS}
        impls |= {f"h1g1{'_lean' * lean}": functools.partial(all_heads.all_heads_attention, hpp=1, hpg=1, bs=bs, splits=ns,
                                                             stages=st, lean=lean) for lean in (False, True)}
        return time_point(600, shape, S, T, impls)

    rows = sweep(POINTS, row_of, f"{out_dir}/exp_ab.json", deadline - (time.time() - t0))
    print("\nus per call (K+V TB/s), fastest first")
    for row in rows:
        print(row["shape"], f"copy {row['copy']['us']:.1f} |", row_summary(row, top=8))
    if time.time() - t0 < deadline:
        bench_prefill({n: op(n) for n in VARIANTS}, f"{out_dir}/exp_ab_prefill.json")


def bench_prefill(ops, path):
    """Device time of the attention ops `ops` on the prefill chunk of eval/bench_kernels.py
    (the 7B shape, T = 512 rows over P = 4096 filled slots); the row goes to the JSON file
    `path` and is printed short."""
    from eval.bench_kernels import prefill_set, row_summary, time_ops

    B, Hq, Hkv, D, S, T, P = 8, 32, 32, 128, 16386, 512, 4096
    flops = 4 * B * Hq * T * (P + (T + 1) / 2) * D
    row = {"shape": [B, Hq, Hkv, D, S, T, P],
           **time_ops(ops, [prefill_set(B, Hq, Hkv, D, S, T, P)], flops, timer="device")}
    with open(path, "w") as f:
        json.dump(row, f, indent=1)
    print("prefill, us (useful TFLOP/s):", row["shape"], row_summary(row, top=len(ops)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["check"]:
        check(["exp", "exp2"], interpret=True)
    elif sys.argv[1:2] == ["bench"] and len(sys.argv) in (3, 4):
        bench(sys.argv[2], float(sys.argv[3]) if sys.argv[3:] else 300.0)
    else:
        sys.exit("usage: exp_ab.py check | exp_ab.py bench OUT_DIR [DEADLINE_S]")
