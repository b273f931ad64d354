"""Session 10 experiment: the decode attention kernel at the shapes of ADORE's
7B step (B=8, Hq=Hkv=32, D=128, S=1024 slots, T=1) and at (8,32,8,128), against
a pure read of the same K/V bytes in XLA (a sum over the slots: reads every byte
once, writes almost nothing), cuDNN and XLA's reference, with launch settings
swept. Each op timed as in eval/bench_kernels.py (inputs rotated past L2, back
to back in one jit, median of 5). K+V bytes / time in TB/s. One H200.

    PYTHONPATH=. python3 docs/results/kernels_session10/attn_one_shape.py OUT.json [plan]

With `plan`, the split count alone (the default plan, 2 splits, and the plan's
target of 3 programs per SM instead of 4) at every shape of eval/bench_kernels.py
(SHAPES x SLOTS x TS), with cuDNN (attn_plan.json).
"""
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp

from adore_jax.kernels import GpuConfig
from adore_jax.kernels.common import num_sms
from eval.bench_kernels import SHAPES, SLOTS, TS, attn_set, bench, cudnn, kv_bytes, n_sets, ours, xla_ref


def pure_read(q, k, v, ck, cv, cpos, qpos):
    """Every K/V byte read once (fp32 sum over the slots): the read-only floor for this op size."""
    return jnp.sum(ck, axis=1, dtype=jnp.float32) + jnp.sum(cv, axis=1, dtype=jnp.float32)


CONFIGS = {
    "default": GpuConfig(),
    "st3": GpuConfig(num_stages=3),
    "st4": GpuConfig(num_stages=4),
    "bs32_st4": GpuConfig(block_s=32, num_stages=4),
    "bs128": GpuConfig(block_s=128),
    "w2": GpuConfig(num_warps=2),
    "w8": GpuConfig(num_warps=8),
    "splits1": GpuConfig(splits=1),
    "splits2": GpuConfig(splits=2),
    "splits4": GpuConfig(splits=4),
    "splits8": GpuConfig(splits=8),
    "xla_merge": GpuConfig(merge="xla"),
}
cases = [(8, 32, 32, 128, 1024, 1), (8, 32, 8, 128, 1024, 1), (8, 32, 32, 128, 4096, 1)]
refs = {"pure_read": pure_read, "cudnn": cudnn, "xla_ref": xla_ref()}
if sys.argv[2:] == ["plan"]:
    CONFIGS = {"default": GpuConfig(), "splits2": GpuConfig(splits=2), "target3": GpuConfig(target_programs=3 * num_sms())}
    cases = [(*sh, S, T) for S in SLOTS for sh in SHAPES for T in TS]
    refs = {"cudnn": cudnn}
out = []
for B, Hq, Hkv, D, S, T in cases:
    nbytes = kv_bytes(B, Hkv, D, S)
    sets = [attn_set(700 + u, B, Hq, Hkv, D, S, T) for u in range(n_sets(nbytes))]
    impls = {**refs, **{n: ours(c) for n, c in CONFIGS.items()}}
    row = {"shape": [B, Hq, Hkv, D, S, T]}
    for name, f in impls.items():
        try:
            t, ts = bench(f, sets, reps=5)
            row[name] = {"us": t * 1e6, "TBps": nbytes / t / 1e12, "times_us": [x * 1e6 for x in ts]}
            if name in CONFIGS:
                row[name]["cfg"] = dataclasses.asdict(CONFIGS[name])
        except Exception as e:  # a config that does not compile: recorded, the rest still run
            row[name] = {"error": repr(e)[-600:]}
    out.append(row)
    json.dump(out, open(sys.argv[1], "w"), indent=1)
    del sets
names = [*refs, *CONFIGS]
print("K+V TB/s (B,Hq,Hkv,D,S,T):", " ".join(names))
for r in out:
    print(r["shape"], " ".join(f"{r[n]['TBps']:.2f}" if "TBps" in r.get(n, {}) else "err" for n in names))
