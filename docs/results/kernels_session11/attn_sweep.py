"""Session 11 experiment: launch settings of the decode attention kernel where
issue 4's targets are missed (T = 9 with GQA, where G*T query rows pad to 32 or 64;
the T = 1 points of session 10's table not re-measured after its kernel change),
against cuDNN and a copy of the same K/V bytes (-ck, -cv: read + write, as in
eval/bench_kernels.py). Each op timed as there (inputs rotated past L2, back to
back in one jit, median of 5). K+V bytes / time in TB/s. One H200.

    PYTHONPATH=. python3 docs/results/kernels_session11/attn_sweep.py OUT.json [DEADLINE_S] [grid]

With `grid` (after the plan change: residency 4 programs an SM up to 16 rows,
2 from 32), explicit split counts x stages x block sizes at the GQA cases still
short of 85% of copy, to map where the plan's choice stands (attn_grid.json).
With `confirm` (after the block size for >= 32 rows at D = 64 became 64 slots):
a check against XLA's reference on the device, then the new default against
block_s=128 at (32,9,3,64), T = 9 (attn_confirm.json).
"""
import json
import sys
import time

import jax

from adore_jax.kernels import GpuConfig
from eval.bench_kernels import attn_set, cudnn, kv_bytes, n_sets, ours, same_size_copy, time_ops

T0 = time.time()
DEADLINE = float(sys.argv[2]) if sys.argv[2:] else 500.0
GRID = sys.argv[3:] == ["grid"]
WIDE = {  # for the cases with 32 or 64 query rows
    "default": GpuConfig(),
    "cta2": GpuConfig(ctas_per_sm=2),
    "cta3": GpuConfig(ctas_per_sm=3),
    "st2": GpuConfig(num_stages=2),
    "st2_cta3": GpuConfig(num_stages=2, ctas_per_sm=3),
    "st2_cta2": GpuConfig(num_stages=2, ctas_per_sm=2),
    "bs32": GpuConfig(block_s=32),
    "bs32_cta2": GpuConfig(block_s=32, ctas_per_sm=2),
    "bs32_st4": GpuConfig(block_s=32, num_stages=4),
    "w8": GpuConfig(num_warps=8),
    "w8_st2": GpuConfig(num_warps=8, num_stages=2),
}
NARROW = {n: WIDE[n] for n in ("default", "cta2", "cta3", "st2", "bs32")} | {"st3": GpuConfig(num_stages=3)}
cases = [(sh, S, 9, WIDE) for sh in [(8, 32, 8, 128), (32, 9, 3, 64)] for S in (1024, 4096, 8192)]
cases += [((8, 32, 8, 128), S, 1, NARROW) for S in (4096, 8192)]
cases += [((8, 32, 32, 128), S, 1, NARROW) for S in (1024, 4096, 8192)]
cases += [((32, 9, 3, 64), 8192, 1, NARROW), ((8, 32, 32, 128), 4096, 9, NARROW)]
if GRID:
    def grid(splits, stages, blocks):
        return {"default": GpuConfig(), **{f"n{n}_st{st}_bs{bs}": GpuConfig(splits=n, num_stages=st, block_s=bs)
                                           for n in splits for st in stages for bs in blocks}}

    cases = [((32, 9, 3, 64), S, 9, grid([2, 3, 4, 5, 6, 8, 11, 16], [2, 3], [64, 128])) for S in (4096, 8192)]
    cases += [((8, 32, 8, 128), 4096, 9, grid([2, 3, 4, 6, 8, 12], [2, 3], [32, 64]))]
    cases += [((32, 9, 3, 64), 4096, 1, grid([3, 4, 5, 6, 8, 11], [2, 3], [64, 128]))]
    WIDE = {}

if sys.argv[3:] == ["confirm"]:
    from eval.bench_kernels import xla_ref

    for B, Hq, Hkv, D, S, T, stats in [(32, 9, 3, 64, 4100, 9, True), (32, 9, 3, 64, 1000, 9, False),
                                        (8, 32, 8, 128, 4100, 9, True)]:
        a = attn_set(1, B, Hq, Hkv, D, S, T)
        got, ref = jax.jit(ours(GpuConfig(), with_stats=stats))(*a), jax.jit(xla_ref(stats))(*a)
        errs = [float(abs(x.astype("float32") - y.astype("float32")).max()) for x, y in
                zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
        print("check", (B, Hq, Hkv, D, S, T), "stats" if stats else "", "max abs err", errs, flush=True)
    WIDE = {"default": GpuConfig(), "bs128": GpuConfig(block_s=128)}
    NARROW = WIDE
    cases = [((32, 9, 3, 64), S, 9, WIDE) for S in (1024, 4096, 8192)] * 2

out = []
for (B, Hq, Hkv, D), S, T, configs in cases:
    if time.time() - T0 > DEADLINE:
        print("deadline: skipped", (B, Hq, Hkv, D, S, T), flush=True)
        continue
    nbytes = kv_bytes(B, Hkv, D, S)
    sets = [attn_set(900 + u, B, Hq, Hkv, D, S, T) for u in range(n_sets(nbytes))]
    impls = {"copy": same_size_copy, "cudnn": cudnn, **{n: ours(c) for n, c in configs.items()}}
    row = {"shape": [B, Hq, Hkv, D, S, T], **time_ops(impls, sets, nbytes, configs, copies=("copy",))}
    out.append(row)
    json.dump(out, open(sys.argv[1], "w"), indent=1)
    print(f"[{time.time() - T0:5.0f}s]", row["shape"], {n: round(v["TBps"], 2) for n, v in row.items() if "TBps" in v}, flush=True)
    del sets
names = ["copy", "cudnn", *WIDE, "st3"]
if GRID:  # the five fastest settings of each case
    for r in out:
        best = sorted((v["TBps"], n) for n, v in r.items() if "TBps" in v and n not in ("copy", "cudnn"))[::-1][:5]
        print(r["shape"], "copy", round(r["copy"]["TBps"], 2), "cudnn", round(r["cudnn"]["TBps"], 2),
              "default", round(r["default"]["TBps"], 2), "best", [(n, round(t, 2)) for t, n in best])
    sys.exit()
print("K+V TB/s (copy: read + written); B,Hq,Hkv,D,S,T |", " ".join(names))
for r in out:
    print(r["shape"], "|", " ".join(f"{r[n]['TBps']:.2f}" if "TBps" in r.get(n, {}) else "-" for n in names))
