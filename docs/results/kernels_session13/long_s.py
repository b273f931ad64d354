"""Session 13 experiment: the decode attention plan at the full-cache step shapes
of the main throughput run (S = 16498 slots, T = 1), where session 13's main run
had full attention at B = 10 11% slower than session 11's (27.32 against 24.58 ms).
Explicit GpuConfigs (splits x block x stages, session 11's plan as `old`, session
12's blocks with 2 programs an SM as `cps2`) against the default plan, cuDNN and a
copy of the same bytes, by device time (eval/bench_kernels.py's timer). One H200.

    PYTHONPATH=. python3 docs/results/kernels_session13/long_s.py OUT_DIR

Writes OUT_DIR/long_s.json; prints a table last (K+V TB/s, us).
"""
import math
import sys

from adore_jax.kernels import GpuConfig
from adore_jax.kernels.attention_gpu import plan
from eval.bench_kernels import cudnn, ours, row_summary, same_size_copy, sweep, time_point

OUT = sys.argv[1]
configs = {"default": GpuConfig(), "old": GpuConfig(block_s=64, num_stages=2, ctas_per_sm=2),
           "cps2": GpuConfig(ctas_per_sm=2)}
configs |= {f"n{n}_bs{bs}_st{st}": GpuConfig(splits=n, block_s=bs, num_stages=st)
            for n in (1, 2, 3, 4) for bs, st in ((32, 4), (64, 3), (64, 2))}


def row_of(B, Hq, Hkv, D, S):
    impls = {"copy": same_size_copy, "cudnn": cudnn} | {n: ours(c) for n, c in configs.items()}
    return {"plans": {n: plan(B, Hkv, S, D, c, 16) for n, c in configs.items()},
            **time_point(500, (B, Hq, Hkv, D), S, 1, impls, configs)}


rows = sweep([(10, 32, 32, 128, 16498), (8, 32, 32, 128, 16498), (64, 9, 3, 64, 8306)], row_of,
             f"{OUT}/long_s.json", math.inf)
for row in rows:
    print(row["shape"], "plans (bs, splits, split_len, stages):", row["plans"]["default"], row["plans"]["old"])
    print("  ", row_summary(row, top=len(row)))
    print("   copy", f"{row['copy']['TBps']:.2f}")
