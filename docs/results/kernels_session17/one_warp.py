"""Session 17 experiment: one warp a program.

Up to 16 query rows the plan runs 2 warps a program (session 15); 1 was never
timed. With 16 rows (one m16n8k16 row tile) 2 warps split the slots of each block,
so each step's row max and row sum, and the move of P into the second dot's operand
layout, cross warps through shared memory with a barrier. With 1 warp none of that
crosses warps, and twice as many programs fit an SM, at twice the math a warp.
Prediction: a gain where a step's latency, not the bytes, bounds the kernel (SmolLM2's
(64,9,3,64) S=1024 step, 0.91-0.94x cuDNN; the S=1024 points), none at large S.
This checks the kernel with 1 warp against the reference on the device (exp_ab.py's
cases), then times, at T = 1 points and the T = 9 points of 16 and 32 rows, the plan
and 1 warp at the plan's block, stages and splits, at half and twice its splits, and
with other blocks and stages, beside cuDNN (T = 1).

    PYTHONPATH=. python3 docs/results/kernels_session17/one_warp.py OUT [DEADLINE_S]   # one H200

OUT/one_warp.json; a table printed last.
"""
import dataclasses
import os
import sys

import jax.numpy as jnp

from adore_jax.kernels import GpuConfig
from eval.bench_kernels import config_sweep, cudnn, ours, sweep_main

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels_session14"))
import exp_ab  # noqa: E402  (its check)


def variants(bs, ns, st, shape, S, T):
    """{name: GpuConfig}: the plan, then 1 warp around it."""
    out = {"plan": GpuConfig()}
    blocks = [(bs, st), (32, 4), (64, 3), (64, 4), (128, 2)]
    for b, s in dict.fromkeys(blocks):
        for n in sorted({ns, max(1, ns // 2), 2 * ns}):
            out[f"w1b{b}n{n}s{s}"] = GpuConfig(num_warps=1, block_s=b, splits=n, num_stages=s)
    return out


def one_warp_op(name, cfg=GpuConfig(), with_stats=False, interpret=False):
    """exp_ab.check's op: the kernel with cfg but 1 warp."""
    return ours(dataclasses.replace(cfg, num_warps=1), with_stats, interpret)


def main(out_dir, deadline):
    exp_ab.check(["w1"], interpret=False, dtype=jnp.bfloat16, tol=3e-2, op=one_warp_op)
    cases = [((64, 9, 3, 64), 1024, 1), ((32, 9, 3, 64), 1024, 1), ((8, 32, 8, 128), 1024, 1),
             ((8, 32, 32, 128), 1024, 1), ((32, 9, 3, 64), 4096, 1), ((8, 32, 8, 128), 4096, 1),
             ((8, 32, 32, 128), 1024, 9), ((32, 9, 3, 64), 1024, 9), ((32, 9, 3, 64), 4096, 9),
             ((32, 9, 3, 64), 8192, 1)]
    config_sweep(f"{out_dir}/one_warp.json", deadline, cases, variants, 1800,
                 extra=lambda bs, ns, st, shape, S, T: {"cudnn": cudnn} if T == 1 else {})


if __name__ == "__main__":
    sweep_main(main, "one_warp.py")
