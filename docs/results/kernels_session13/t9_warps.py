"""Session 13 experiment: warps a program at T = 9 with GQA, where a program holds
32 (G=3) or 64 (G=4, 36 real) query rows, and session 12's grid of splits x
stages x blocks (4 warps) found nothing faster than the plan. Explicit GpuConfigs
(the plan's split count kept) against the default, by device time
(eval/bench_kernels.py's timer). One H200.

    PYTHONPATH=. python3 docs/results/kernels_session13/t9_warps.py OUT_DIR [DEADLINE_S]

Writes OUT_DIR/t9_warps.json; prints a table last (us per call, K+V TB/s).
"""
import dataclasses
import sys

from adore_jax.kernels import GpuConfig
from adore_jax.kernels.attention_gpu import padded_rows, plan
from eval.bench_kernels import ours, row_summary, sweep, time_point

OUT = sys.argv[1]
DEADLINE = float(sys.argv[2]) if sys.argv[2:] else 150.0


def row_of(shape, S, T=9):
    B, Hq, Hkv, D = shape
    bs, ns, _, st = plan(B, Hkv, S, D, GpuConfig(), padded_rows(Hq // Hkv, T))
    base = GpuConfig(block_s=bs, splits=ns, num_stages=st)
    configs = {"default": GpuConfig(), "w8": dataclasses.replace(base, num_warps=8),
               "w8_bs128": dataclasses.replace(base, num_warps=8, block_s=128),
               "w8_st4": dataclasses.replace(base, num_warps=8, num_stages=4),
               "w2": dataclasses.replace(base, num_warps=2)}
    return {"plan": [bs, ns, st], **time_point(900, shape, S, T, {n: ours(c) for n, c in configs.items()}, configs)}


rows = sweep([(sh, S) for sh in [(8, 32, 8, 128), (32, 9, 3, 64)] for S in (4096, 8192, 1024)], row_of,
             f"{OUT}/t9_warps.json", DEADLINE)
print("\nus per call (K+V TB/s); plan (block, splits, stages)")
for row in rows:
    print(row["shape"], row["plan"], row_summary(row, top=len(row)))
