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
import json
import sys
import time

from adore_jax.kernels import GpuConfig
from eval.bench_kernels import attn_set, cudnn, kv_bytes, n_sets, ours, time_ops

T0 = time.time()
OUT = sys.argv[1]
DEADLINE = float(sys.argv[2]) if sys.argv[2:] else 120.0
rows = []
for B, S in [(32, 1024), (64, 1024), (32, 4096)]:
    if time.time() - T0 > DEADLINE:
        print("deadline: stopped before", (B, S), flush=True)
        break
    configs = {"default": GpuConfig()}
    for bs, stages in [(128, 3), (128, 4), (128, 5), (256, 2), (256, 3), (64, 4), (64, 6)]:
        for ns in (1, 2):
            configs[f"b{bs}_s{stages}_n{ns}"] = GpuConfig(block_s=bs, num_stages=stages, splits=ns)
    nbytes = kv_bytes(B, 3, 64, S)
    sets = [attn_set(970 + u, B, 9, 3, 64, S, 1) for u in range(n_sets(nbytes))]
    impls = {"cudnn": cudnn} | {n: ours(c) for n, c in configs.items()}
    row = {"shape": [B, 9, 3, 64, S, 1], **time_ops(impls, sets, nbytes, configs=configs, timer="device")}
    rows.append(row)
    json.dump(rows, open(f"{OUT}/deep_one_split.json", "w"), indent=1)
    print(f"[{time.time() - T0:5.0f}s]", row["shape"], {n: round(v["us"], 1) if "us" in v else v["error"][-120:]
                                                       for n, v in row.items() if isinstance(v, dict)}, flush=True)
    del sets
print("\nus per call (K+V TB/s), fastest first")
for row in rows:
    best = sorted((v["us"], n) for n, v in row.items() if isinstance(v, dict) and "us" in v)
    print(row["shape"], " | ".join(f"{n} {u:.1f} ({row[n]['TBps']:.2f})" for u, n in best[:8]))
