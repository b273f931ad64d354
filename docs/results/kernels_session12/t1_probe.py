"""Session 12 experiment: the T = 1 points short of cuDNN or of 85% of copy, kernel
by kernel. One H200.

    PYTHONPATH=. python3 docs/results/kernels_session12/t1_probe.py OUT_DIR [DEADLINE_S]

1. Profile: for each case, each op (an XLA copy of the K/V bytes, an XLA read of
   them (a sum over slots), cuDNN, ours) runs on its rotated input sets back to back
   in one jit under jax.profiler (eval/trace.py): the GPU kernels per op with their
   mean device time, and the op's share of the span (kernels plus the gaps between
   them). K+V bytes over each (copy: read + written).
2. Grid: splits x stages x block size x warps at (8,32,32,128) S=1024 and
   (8,32,8,128) S=4096, timed as eval/bench_kernels.py times (wall clock,
   median of 5), with cuDNN and the copy in the same run.
Writes OUT_DIR/t1_probe.json; prints tables last.
"""
import collections
import json
import sys
import time

import jax
import jax.numpy as jnp

from adore_jax.kernels import GpuConfig
from eval.bench_kernels import _warm, attn_set, cudnn, kv_bytes, n_sets, ours, same_size_copy, time_ops
from eval.trace import busy_ns, gpu_events

T0 = time.time()
OUT = sys.argv[1]
DEADLINE = float(sys.argv[2]) if sys.argv[2:] else 400.0
PROFILE = [(8, 32, 32, 128, 1024), (8, 32, 8, 128, 4096), (8, 32, 8, 128, 1024), (32, 9, 3, 64, 1024),
           (32, 9, 3, 64, 4096), (8, 32, 32, 128, 8192)]


def read(q, k, v, ck, cv, *_):
    return jnp.sum(ck, axis=1, dtype=jnp.float32), jnp.sum(cv, axis=1, dtype=jnp.float32)


def profile_case(B, Hq, Hkv, D, S, impls):
    nbytes = kv_bytes(B, Hkv, D, S)
    sets = [attn_set(700 + u, B, Hq, Hkv, D, S, 1) for u in range(n_sets(nbytes))]
    row = {"shape": [B, Hq, Hkv, D, S, 1], "n_ops": len(sets)}
    for name, op in impls.items():
        multi = jax.jit(lambda sets: [op(*s) for s in sets])
        jax.block_until_ready(multi(sets))
        _warm(lambda: multi(sets))
        ev = gpu_events(lambda: multi(sets))
        n = len(sets)
        kernels = collections.defaultdict(list)
        for a, b, k in ev:
            kernels[k].append(b - a)
        span = (ev[-1][1] - ev[0][0]) if ev else 0
        busy = busy_ns(ev)
        factor = 2 if name == "copy" else 1
        row[name] = {
            "kernels": {k: {"count": len(v), "mean_us": sum(v) / len(v) / 1e3} for k, v in kernels.items()},
            "busy_us_per_op": busy / n / 1e3, "span_us_per_op": span / n / 1e3,
            "TBps_busy": factor * nbytes / (busy / n) / 1e3 if busy else None,
            "TBps_span": factor * nbytes / (span / n) / 1e3 if span else None,
        }
    del sets
    return row


def grid(splits, stages, blocks, warps=(4,)):
    return {"default": GpuConfig(), **{f"n{n}_st{st}_bs{bs}_w{w}": GpuConfig(splits=n, num_stages=st, block_s=bs,
                                                                             num_warps=w)
                                       for n in splits for st in stages for bs in blocks for w in warps}}


def main():
    res = {"profile": [], "grid": []}
    save = lambda: json.dump(res, open(f"{OUT}/t1_probe.json", "w"), indent=1)
    for B, Hq, Hkv, D, S in PROFILE:
        impls = {"copy": same_size_copy, "read": read, "cudnn": cudnn, "ours": ours(GpuConfig()),
                 "ours_n1": ours(GpuConfig(splits=1))}
        try:
            res["profile"].append(profile_case(B, Hq, Hkv, D, S, impls))
        except Exception as e:  # the profiler or an op failing: the grid still runs
            res["profile"].append({"shape": [B, Hq, Hkv, D, S, 1], "error": repr(e)[-800:]})
        save()
        print(f"[{time.time() - T0:5.0f}s] profiled", (B, Hq, Hkv, D, S), flush=True)
    cases = [((8, 32, 32, 128), 1024, grid([1, 2, 4], [2, 3, 4], [32, 64, 128]) | grid([1, 2], [2, 3], [64], [2, 8])),
             ((8, 32, 8, 128), 4096, grid([4, 6, 8, 12], [2, 3], [32, 64, 128]))]
    for (B, Hq, Hkv, D), S, configs in cases:
        if time.time() - T0 > DEADLINE:
            print("deadline: skipped", (B, Hq, Hkv, D, S), flush=True)
            continue
        nbytes = kv_bytes(B, Hkv, D, S)
        sets = [attn_set(900 + u, B, Hq, Hkv, D, S, 1) for u in range(n_sets(nbytes))]
        impls = {"copy": same_size_copy, "read": read, "cudnn": cudnn, **{n: ours(c) for n, c in configs.items()}}
        row = {"shape": [B, Hq, Hkv, D, S, 1], **time_ops(impls, sets, nbytes, configs, copies=("copy",))}
        res["grid"].append(row)
        save()
        print(f"[{time.time() - T0:5.0f}s] grid", row["shape"], flush=True)
        del sets

    print("\nprofile: per op, us of GPU kernels (busy) and of the span; K+V TB/s on each")
    for r in res["profile"]:
        if "error" in r:
            print(r["shape"], "error", r["error"][-200:])
            continue
        print(r["shape"], "ops", r["n_ops"])
        for n in ("copy", "read", "cudnn", "ours", "ours_n1"):
            x = r[n]
            ks = "; ".join(f"{k[:40]} x{v['count']} {v['mean_us']:.1f}us" for k, v in x["kernels"].items())
            print(f"  {n:>8} busy {x['busy_us_per_op']:7.1f} ({x['TBps_busy'] or 0:.2f})  span {x['span_us_per_op']:7.1f}"
                  f" ({x['TBps_span'] or 0:.2f}) | {ks}")
    print("\ngrid: K+V TB/s (us), the eight fastest settings")
    for r in res["grid"]:
        best = sorted(((v["TBps"], v["us"], n) for n, v in r.items() if isinstance(v, dict) and "TBps" in v
                       and n not in ("copy", "read", "cudnn")), reverse=True)[:8]
        print(r["shape"], " ".join(f"{n} {r[n]['TBps']:.2f}({r[n]['us']:.1f})" for n in ("copy", "read", "cudnn", "default")
                                   if "TBps" in r.get(n, {})))
        print("   ", "; ".join(f"{n} {t:.2f}({u:.1f})" for t, u, n in best))


if __name__ == "__main__":
    main()
