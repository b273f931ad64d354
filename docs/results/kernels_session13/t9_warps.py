"""Session 13 experiment: warps a program at T = 9 with GQA, where a program holds
32 (G=3) or 64 (G=4, 36 real) query rows, and session 12's grid of splits x
stages x blocks (4 warps) found nothing faster than the plan. Explicit GpuConfigs
(the plan's split count kept) against the default, by device time
(eval/bench_kernels.py's timer). One H200.

    PYTHONPATH=. python3 docs/results/kernels_session13/t9_warps.py OUT_DIR [DEADLINE_S]

Writes OUT_DIR/t9_warps.json; prints a table last (us per call, K+V TB/s).
"""
import dataclasses
import json
import sys
import time

from adore_jax.kernels import GpuConfig
from adore_jax.kernels.attention_gpu import padded_rows, plan
from eval.bench_kernels import attn_set, kv_bytes, n_sets, ours, time_ops

T0 = time.time()
OUT = sys.argv[1]
DEADLINE = float(sys.argv[2]) if sys.argv[2:] else 150.0
rows = []
for (B, Hq, Hkv, D), S in [(sh, S) for sh in [(8, 32, 8, 128), (32, 9, 3, 64)] for S in (4096, 8192, 1024)]:
    if time.time() - T0 > DEADLINE:
        print("deadline: stopped before", (B, Hq, Hkv, D, S), flush=True)
        break
    T = 9
    bs, ns, _, st = plan(B, Hkv, S, D, GpuConfig(), padded_rows(Hq // Hkv, T))
    base = GpuConfig(block_s=bs, splits=ns, num_stages=st)
    configs = {"default": GpuConfig(), "w8": dataclasses.replace(base, num_warps=8),
               "w8_bs128": dataclasses.replace(base, num_warps=8, block_s=128),
               "w8_st4": dataclasses.replace(base, num_warps=8, num_stages=4),
               "w2": dataclasses.replace(base, num_warps=2)}
    nbytes = kv_bytes(B, Hkv, D, S)
    sets = [attn_set(900 + u, B, Hq, Hkv, D, S, T) for u in range(n_sets(nbytes))]
    row = {"shape": [B, Hq, Hkv, D, S, T], "plan": [bs, ns, st],
           **time_ops({n: ours(c) for n, c in configs.items()}, sets, nbytes, configs=configs, timer="device")}
    rows.append(row)
    json.dump(rows, open(f"{OUT}/t9_warps.json", "w"), indent=1)
    print(f"[{time.time() - T0:5.0f}s]", row["shape"], {n: round(v["us"], 1) if "us" in v else v["error"][-200:]
                                                       for n, v in row.items() if isinstance(v, dict)}, flush=True)
    del sets
print("\nus per call (K+V TB/s); plan (block, splits, stages)")
for row in rows:
    best = sorted((v["us"], n) for n, v in row.items() if isinstance(v, dict) and "us" in v)
    print(row["shape"], row["plan"], " | ".join(f"{n} {u:.1f} ({row[n]['TBps']:.2f})" for u, n in best))
