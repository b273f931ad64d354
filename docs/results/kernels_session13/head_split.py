"""Session 13 experiment: split a KV head's query heads over programs
(GpuConfig.head_splits) instead of, or besides, splitting its slots. Each of the
head_splits programs of a (sequence, KV head) reads the same K/V; at S = 1024 a
call's K/V (25-50 MB) fits the H200's L2, so the repeat reads may come from L2
while the slot splits' merge (partials, atomic, reload) leaves the critical path.
At T = 9 the programs also have fewer padded rows (G=3: 9 rows in 16, against 27
in 32; G=4: 18 in 32 or 9 in 16, against 36 in 64). Against the default plan,
cuDNN (T = 1) and a copy, by device time (eval/bench_kernels.py's timer). One H200.

    PYTHONPATH=. python3 docs/results/kernels_session13/head_split.py OUT_DIR [DEADLINE_S]

It needs the kernel of commit 28cfb1d, which had the head_splits knob (tested there
in interpret mode against the reference). Every head split was slower than the
default at all 12 points (1.24-2.97x its time; docs/KERNELS.md, "Session 13",
item 4), so the knob was removed in the next commit.

Writes OUT_DIR/head_split.json; prints a table last (K+V TB/s, us).
"""
import json
import sys
import time

from adore_jax.kernels import GpuConfig
from adore_jax.kernels.attention_gpu import padded_rows, plan
from eval.bench_kernels import attn_set, cudnn, kv_bytes, n_sets, ours, same_size_copy, time_ops

T0 = time.time()
OUT = sys.argv[1]
DEADLINE = float(sys.argv[2]) if sys.argv[2:] else 300.0
cases = [((32, 9, 3, 64), 1024, 1), ((64, 9, 3, 64), 1024, 1), ((8, 32, 8, 128), 1024, 1),
         ((32, 9, 3, 64), 4096, 1), ((8, 32, 8, 128), 4096, 1),
         ((32, 9, 3, 64), 4096, 9), ((8, 32, 8, 128), 4096, 9), ((32, 9, 3, 64), 8192, 9),
         ((8, 32, 8, 128), 8192, 9), ((32, 9, 3, 64), 1024, 9), ((8, 32, 8, 128), 1024, 9), ((32, 9, 3, 64), 8192, 1)]
rows = []
for (B, Hq, Hkv, D), S, T in cases:
    if time.time() - T0 > DEADLINE:
        print("deadline: stopped before", (B, Hq, Hkv, D, S, T), flush=True)
        break
    G = Hq // Hkv
    configs = {"default": GpuConfig()}
    for hs in [h for h in range(2, G + 1) if G % h == 0]:
        configs[f"hs{hs}"] = GpuConfig(head_splits=hs)
        configs |= {f"hs{hs}_n{n}": GpuConfig(head_splits=hs, splits=n) for n in (1, 2)}
    nbytes = kv_bytes(B, Hkv, D, S)
    sets = [attn_set(700 + u, B, Hq, Hkv, D, S, T) for u in range(n_sets(nbytes))]
    impls = {"copy": same_size_copy} | ({"cudnn": cudnn} if T == 1 else {})
    impls |= {n: ours(c) for n, c in configs.items()}
    plans = {n: plan(B, Hkv * c.head_splits, S, D, c, padded_rows(G // c.head_splits, T)) for n, c in configs.items()}
    row = {"shape": [B, Hq, Hkv, D, S, T], "plans": plans,
           **time_ops(impls, sets, nbytes, configs=configs, copies=("copy",), timer="device")}
    rows.append(row)
    json.dump(rows, open(f"{OUT}/head_split.json", "w"), indent=1)
    print(f"[{time.time() - T0:5.0f}s]", row["shape"], {n: round(v["us"], 1) if "us" in v else v["error"][-200:]
                                                       for n, v in row.items() if isinstance(v, dict) and n != "plans"},
          flush=True)
    del sets
print("\nus per call (K+V TB/s); plans: (block, splits, split length, stages)")
for row in rows:
    best = sorted((v["us"], n) for n, v in row.items() if isinstance(v, dict) and "us" in v and n != "copy")
    print(row["shape"], " | ".join(f"{n} {u:.1f} ({row[n]['TBps']:.2f})" for u, n in best))
    print("   ", {n: p[1] for n, p in row["plans"].items()})
