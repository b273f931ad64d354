"""Session 14 experiment: 128- and 256-slot blocks at D=64 (and at T = 9 with D=128).

Session 12's grid (docs/results/kernels_session12/t9_grid.json) had (32,9,3,64)
T = 9 20% faster with 64-slot blocks than with 32 at every split count and
depth, and stopped at 64; session 13 tried 128 only with 8 warps. Here larger
blocks with 4 (and 8) warps, explicit splits and stages, against the default
plan, cuDNN (T = 1) and a copy of the same bytes, by device time
(eval/bench_kernels.py's timer). One H200.

    PYTHONPATH=. python3 docs/results/kernels_session14/blocks128.py OUT_DIR [DEADLINE_S]

Writes OUT_DIR/blocks128.json; prints a table last (us per call, K+V TB/s).

Result (docs/KERNELS.md, "Session 14", item 2): no larger block was faster than
the plan's by more than 0.5% at any of the 7 points; the best of them was 6-16%
slower at (32,9,3,64) T = 9, 6% at T = 1 S=1024, level at T = 1 S=4096 and at
SmolLM2's step shape, and 46% slower at (8,32,8,128) T = 9. The plan is unchanged.
"""
import sys

from adore_jax.kernels import GpuConfig
from adore_jax.kernels.attention_gpu import padded_rows, plan
from eval.bench_kernels import cudnn, ours, row_summary, same_size_copy, sweep, time_point

OUT = sys.argv[1]
DEADLINE = float(sys.argv[2]) if sys.argv[2:] else 300.0
cases = [((32, 9, 3, 64), 4096, 9), ((32, 9, 3, 64), 8192, 9), ((32, 9, 3, 64), 4096, 1),
         ((32, 9, 3, 64), 1024, 1), ((32, 9, 3, 64), 1024, 9), ((8, 32, 8, 128), 4096, 9), ((64, 9, 3, 64), 1024, 1)]


def row_of(shape, S, T):
    B, Hq, Hkv, D = shape
    bs0, ns0, _, st0 = plan(B, Hkv, S, D, GpuConfig(), padded_rows(Hq // Hkv, T))
    configs = {"default": GpuConfig()}
    split_counts = sorted({ns0, max(1, ns0 - 1), ns0 + 1, 2 * ns0} if S >= 4096 else {ns0, max(1, ns0 // 2), ns0 + 1})
    for ns in split_counts:
        if S // ns < 256:
            continue
        for st in (2, 3):
            configs[f"b128_n{ns}_s{st}"] = GpuConfig(block_s=128, splits=ns, num_stages=st)
    configs[f"b256_n{ns0}_s2"] = GpuConfig(block_s=256, splits=ns0, num_stages=2)
    configs[f"b128_n{ns0}_s2_w8"] = GpuConfig(block_s=128, splits=ns0, num_stages=2, num_warps=8)
    impls = {"copy": same_size_copy} | ({"cudnn": cudnn} if T == 1 else {}) | {n: ours(c) for n, c in configs.items()}
    return {"plan": [bs0, ns0, st0], **time_point(950, shape, S, T, impls, configs=configs)}


rows = sweep(cases, row_of, f"{OUT}/blocks128.json", DEADLINE)
print("\nus per call (K+V TB/s), fastest first; plan (block, splits, stages)")
for row in rows:
    print(row["shape"], row["plan"], f"copy {row['copy']['us']:.1f} |", row_summary(row))
