"""Session 14 probe: which GPU kernels one attention call runs, and for how long, at
the remaining T = 1 miss, ours against cuDNN (and a copy of the same bytes), from a
jax.profiler trace (eval/trace.py). One H200.

    PYTHONPATH=. python3 docs/results/kernels_session14/trace_t1.py OUT_DIR

Writes OUT_DIR/trace_t1.json; prints, per op and shape, each kernel name with its
count per op and median duration (us), and the busy time per op.
"""
import collections
import json
import statistics
import sys

import jax

from eval.bench_kernels import _warm, attn_set, cudnn, ours, same_size_copy
from eval.trace import busy_ns, gpu_events

OUT = sys.argv[1]
N = 8  # ops a jitted call
rows = []
for B, Hq, Hkv, D, S in [(32, 9, 3, 64, 1024), (64, 9, 3, 64, 1024), (32, 9, 3, 64, 4096)]:
    sets = [attn_set(990 + u, B, Hq, Hkv, D, S, 1) for u in range(N)]
    for name, op in [("ours", ours()), ("cudnn", cudnn), ("copy", same_size_copy)]:
        multi = jax.jit(lambda sets, op=op: [op(*s) for s in sets])
        jax.block_until_ready(multi(sets))
        _warm(lambda: multi(sets))
        ev = gpu_events(lambda: multi(sets))
        kinds = collections.defaultdict(list)
        for a, b, n in ev:
            kinds[n[:120]].append((b - a) / 1e3)
        row = {"shape": [B, Hq, Hkv, D, S], "op": name, "busy_us_per_op": busy_ns(ev) / 1e3 / N,
               "span_us_per_op": (ev[-1][1] - ev[0][0]) / 1e3 / N,
               "kernels": {n: {"per_op": len(v) / N, "median_us": statistics.median(v)} for n, v in kinds.items()}}
        rows.append(row)
        print(row["shape"], name, f"busy {row['busy_us_per_op']:.2f} us/op, span {row['span_us_per_op']:.2f}", flush=True)
        for n, k in row["kernels"].items():
            print(f"    {k['per_op']:5.2f}/op  {k['median_us']:8.2f} us  {n}", flush=True)
    json.dump(rows, open(f"{OUT}/trace_t1.json", "w"), indent=1)
