"""Session 14 experiment: one split and a deep pipeline of large blocks at the T = 1
miss. Nsight Compute (ncu_t1.py) showed cuDNN's kernel at (32,9,3,64) S=1024 runs
96 CTAs, one per (sequence, KV head), no split, 128-key tiles, and beats our 384
programs. Here our kernel with splits=1 and 64/128/256-slot blocks in 2-8 stages,
against the default plan and cuDNN, by device time (eval/bench_kernels.py's timer).

    PYTHONPATH=. python3 docs/results/kernels_session14/deep_one_split.py OUT_DIR [DEADLINE_S]

Writes OUT_DIR/deep_one_split.json; prints a table last (us per call, K+V TB/s).

Result (docs/KERNELS.md, "Session 14", item 5): one split with 128-slot blocks in
3 stages came closest (13.4 us at (32,9,3,64) S=1024 against the default's 12.3 and
cuDNN's 11.8; 18.6 against 18.7 and 16.7 at (64,9,3,64)); deeper pipelines were
slower. The plan is unchanged.
"""
import sys

from adore_jax.kernels import GpuConfig
from eval.bench_kernels import cudnn, ours, row_summary, sweep, time_point

OUT = sys.argv[1]
DEADLINE = float(sys.argv[2]) if sys.argv[2:] else 120.0


def row_of(B, S):
    configs = {"default": GpuConfig()}
    for bs, stages in [(128, 3), (128, 4), (128, 5), (256, 2), (256, 3), (64, 4), (64, 6)]:
        for ns in (1, 2):
            configs[f"b{bs}_s{stages}_n{ns}"] = GpuConfig(block_s=bs, num_stages=stages, splits=ns)
    impls = {"cudnn": cudnn} | {n: ours(c) for n, c in configs.items()}
    return time_point(970, (B, 9, 3, 64), S, 1, impls, configs=configs)


rows = sweep([(32, 1024), (64, 1024), (32, 4096)], row_of, f"{OUT}/deep_one_split.json", DEADLINE)
print("\nus per call (K+V TB/s), fastest first")
for row in rows:
    print(row["shape"], row_summary(row, top=8))
