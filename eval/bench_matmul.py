"""Benchmark of the few-row matmul kernel against XLA's matmul (GPU; one run).

    PYTHONPATH=. python3 eval/bench_matmul.py --out results/bench_matmul.json

The decode step's weight matmuls at the 7B shape (x [M, K] @ w [K, N], bf16,
fp32 accumulation): q, k, v (three [4096, 4096]: XLA does three matmuls, the
kernel one launch), o [4096, 4096], gate+up [4096, 22016], down [11008, 4096],
lm_head [4096, 32000]; M rows in --rows.
1. Correctness on the device: the kernel (default plan and two other configs)
   against the fp32 reference on fresh random inputs, non-multiple sizes too;
   the q/k/v + RoPE kernel against its XLA reference.
2. XLA's matmul (models/llama.py's, two rows at least) against the kernel's
   default plan, per shape and M.
3. A sweep of kernel configs (block_n x block_k x splits, then stages and warps
   around the best) at --sweep-rows, as long as --deadline allows.
Rate = weight bytes / time (TB/s); timing as eval/bench_kernels.py (distinct
weights rotated past the L2 inside one jit, median of repeats). A short table is
printed last; everything goes to the JSON file.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

from adore_jax.kernels.matmul_gpu import MatmulConfig, matmul_gpu, plan, reference_matmul
from adore_jax.kernels.qkv_gpu import qkv_rope_gpu, reference_qkv_rope
from eval.bench_kernels import bench, rand
from models.llama import rope_tables

SHAPES = {"qkv": [(4096, 4096)] * 3, "o": [(4096, 4096)], "gate_up": [(4096, 22016)], "down": [(11008, 4096)],
          "lm_head": [(4096, 32000)]}  # name: the weights [K, N] of one call
SMOKE_SHAPES = {"qkv": [(64, 64), (64, 32), (64, 32)], "down": [(176, 64)]}
ROTATE_BYTES = 600 << 20  # distinct weights per jitted call: over 10x the 50 MB L2
SWEEP_N, SWEEP_K, SWEEP_SPLITS = (32, 64, 128), (128, 256, 512), (None, 1, 2, 4, 8)
SWEEP_STAGES_WARPS = ((3, 4), (5, 4), (6, 4), (4, 8), (5, 8))
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def xla_matmul(x, ws):
    """models/llama.py's decode matmuls: one XLA dot per weight, one row padded to two."""
    if x.shape[0] < 2:
        return [reference_matmul(jnp.pad(x, ((0, 1), (0, 0))), w)[:1] for w in ws]
    return [reference_matmul(x, w) for w in ws]


def kernel(cfg: MatmulConfig, interpret: bool):
    return lambda x, ws: matmul_gpu(x, ws, interpret=interpret, config=cfg)


def weight_sets(mats, M, n, seed=0):
    """n sets (x [M, K], [w [K, N_i] ...]): the same x, distinct weights."""
    key = jax.random.key(seed)
    x = rand(jax.random.fold_in(key, 0), (M, mats[0][0]))
    return [(x, [rand(jax.random.fold_in(key, 8 * i + j + 1), s) * 0.02 for j, s in enumerate(mats)]) for i in range(n)]


def rotation(mats):
    return max(2, min(32, math.ceil(ROTATE_BYTES / sum(2 * k * n for k, n in mats))))


def time_op(op, sets, smoke):
    if smoke:
        jax.block_until_ready(jax.jit(lambda s: [op(*a) for a in s])(sets))
        return {"us": float("nan"), "TBps": float("nan")}
    t, _ = bench(op, sets)
    nbytes = sum(w.size * w.dtype.itemsize for w in sets[0][1])
    return {"us": t * 1e6, "TBps": nbytes / t / 1e12}


def rel_err(got, ref):
    return float(jnp.max(jnp.abs(got - ref)) / (jnp.max(jnp.abs(ref)) + 1e-30))


def correctness(results, smoke, interpret, configs):
    """Kernel vs fp32 reference on fresh inputs: aligned and ragged shapes, 1..64 rows, one or several weights."""
    cases = [(1, 64, (48,)), (5, 200, (130, 30)), (16, 576, (192,)), (64, 96, (40, 40, 24))] if smoke else \
        [(1, 4096, (4096,)), (8, 4096, (4096, 4096, 4096)), (9, 11008, (4096,)), (16, 576, (576, 192, 192)),
         (3, 1000, (777,)), (64, 4096, (22016,))]
    ok = True
    for i, (M, K, Ns) in enumerate(cases):
        for cfg in configs:
            x = rand(jax.random.key(100 + i), (M, K))
            ws = [rand(jax.random.key(200 + 8 * i + j), (K, N)) for j, N in enumerate(Ns)]
            row = {"M": M, "K": K, "N": Ns, "config": dataclasses.asdict(cfg)}
            try:
                got = jax.jit(kernel(cfg, interpret))(x, ws)
            except Exception as e:  # recorded as a failure; the run goes on
                results["correctness"].append({**row, "error": f"{type(e).__name__}: {str(e)[:200]}", "ok": False})
                ok = False
                continue
            refs = [reference_matmul(x.astype(jnp.float32), w.astype(jnp.float32)) for w in ws]
            err = max(rel_err(g, r) for g, r in zip(got, refs))
            good = all(bool(jnp.isfinite(g).all()) for g in got) and err < 1e-2
            ok &= good
            results["correctness"].append({**row, "rel_err": err, "ok": good})
    for i, (M, E, D, heads, bias) in enumerate([(4, 64, 32, (4, 2, 2), True)] if smoke else
                                               [(8, 4096, 128, (32, 32, 32), False), (3, 576, 64, (9, 3, 3), True)]):
        ks = jax.random.split(jax.random.key(300 + i), 8)
        x = rand(ks[0], (M, E))
        ws = [rand(ks[2 + j], (E, h * D)) * 0.02 for j, h in enumerate(heads)]
        bs = [rand(ks[5 + j], (h * D,)) if bias else None for j, h in enumerate(heads)]
        cos, sin = rope_tables(jnp.arange(M) * 97, 1.0 / (10000 ** (jnp.arange(0, D, 2) / D)))
        got = jax.jit(lambda *a: qkv_rope_gpu(*a, head_dim=D, interpret=interpret))(x, ws, bs, cos, sin)
        want = reference_qkv_rope(x, ws, bs, cos, sin, head_dim=D)
        err = max(rel_err(g.astype(jnp.float32), w.astype(jnp.float32)) for g, w in zip(got, want))
        good = err < 2e-2
        ok &= good
        results["correctness"].append({"qkv_rope": [M, E, D, heads, bias], "rel_err": err, "ok": good})
    log("correctness", "PASS" if ok else "FAIL", len(results["correctness"]), "checks")
    return ok


def compare(results, shapes, rows, smoke, interpret, deadline):
    for (name, mats), M in itertools.product(shapes.items(), rows):
        if time.time() - T0 > deadline:
            log("deadline: compare stops")
            return
        K, N = mats[0][0], sum(n for _, n in mats)
        sets = weight_sets(mats, M, 2 if smoke else rotation(mats))
        r = {"shape": name, "K": K, "N": N, "M": M, "plan": plan(M, K, N), "xla": time_op(xla_matmul, sets, smoke),
             "kernel": time_op(kernel(MatmulConfig(), interpret), sets, smoke)}
        results["compare"].append(r)
        log(name, M, f"xla {r['xla']['TBps']:.2f} kernel {r['kernel']['TBps']:.2f} TB/s")


def sweep(results, shapes, M, smoke, interpret, deadline):
    """block_n x block_k x splits at 4 stages, 4 warps; then stages and warps around the best of each shape."""
    for name, mats in shapes.items():
        K, N = mats[0][0], sum(n for _, n in mats)
        sets = weight_sets(mats, M, 2 if smoke else rotation(mats))
        rows = []
        grid = [MatmulConfig(block_n=bn, block_k=bk, splits=s) for bn, bk, s in itertools.product(SWEEP_N, SWEEP_K,
                                                                                                SWEEP_SPLITS)]
        for stage in (0, 1):
            for cfg in grid:
                if time.time() - T0 > deadline:
                    log("deadline: sweep stops")
                    results["sweep"].extend(rows)
                    return
                if any(r["config"] == dataclasses.asdict(cfg) for r in rows):
                    continue
                try:
                    t = time_op(kernel(cfg, interpret), sets, smoke)
                except Exception as e:  # a config Triton cannot compile (shared memory): recorded, skipped
                    t = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                rows.append({"shape": name, "K": K, "N": N, "M": M, "config": dataclasses.asdict(cfg),
                             "plan": plan(M, K, N, cfg), **t})
            ranked = sorted((r for r in rows if "TBps" in r and r["TBps"] == r["TBps"]), key=lambda r: -r["TBps"])
            if stage == 0 and ranked:
                best = MatmulConfig(**ranked[0]["config"])
                grid = [dataclasses.replace(best, num_stages=s, num_warps=w) for s, w in SWEEP_STAGES_WARPS]
        results["sweep"].extend(rows)
        if ranked:
            log(name, M, "best", ranked[0]["config"], f"{ranked[0]['TBps']:.2f} TB/s")


def table(results):
    lines = ["weight TB/s (us): XLA's matmul against the kernel's default plan; best swept config at --sweep-rows"]
    lines.append(f"{'shape':>8} {'K':>6} {'N':>6} {'M':>3} | {'xla':>13} {'kernel':>13} {'ratio':>6}")
    for r in results["compare"]:
        a, b = r["xla"], r["kernel"]
        lines.append(f"{r['shape']:>8} {r['K']:>6} {r['N']:>6} {r['M']:>3} | {a['TBps']:6.2f}({a['us']:5.1f}) "
                     f"{b['TBps']:6.2f}({b['us']:5.1f}) {a['us'] / b['us']:6.2f}")
    by_shape = {}
    for r in results["sweep"]:
        if "TBps" in r and r["TBps"] == r["TBps"] and r["TBps"] > by_shape.get(r["shape"], {}).get("TBps", -1):
            by_shape[r["shape"]] = r
    for name, r in by_shape.items():
        c = r["config"]
        lines.append(f"best {name:>8} M={r['M']}: {r['TBps']:.2f} TB/s ({r['us']:.1f} us) block_n={c['block_n']} "
                     f"block_k={c['block_k']} splits={c['splits']} stages={c['num_stages']} warps={c['num_warps']}")
    ok = results.get("correctness_ok")
    lines.append(f"correctness on device: {'not checked' if ok is None else 'PASS' if ok else 'FAIL'}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench_matmul.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode on CPU (checks the script only)")
    ap.add_argument("--rows", default="2,8,16,64", help="rows M compared (comma-separated)")
    ap.add_argument("--sweep-rows", type=int, default=8)
    ap.add_argument("--sections", default="check,compare,sweep")
    ap.add_argument("--deadline", type=float, default=500.0, help="seconds after which remaining cases are skipped")
    args = ap.parse_args(argv)
    interpret = jax.default_backend() == "cpu"
    if interpret and not args.smoke:
        sys.exit("no GPU: run with --smoke on CPU (interpret mode), or on the GPU machine")
    try:
        rows = [int(m) for m in args.rows.split(",")]
    except ValueError:
        ap.error(f"--rows must be comma-separated integers, got {args.rows!r}")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    dev = jax.devices()[0]
    results = {"device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__, "args": vars(args),
               "correctness": [], "compare": [], "sweep": []}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)

    secs = args.sections.split(",")
    if "check" in secs:
        cfgs = [MatmulConfig(), MatmulConfig(block_n=32, block_k=128, splits=3), MatmulConfig(block_n=128, splits=1)]
        results["correctness_ok"] = correctness(results, args.smoke, interpret, cfgs)
        save()
    if "compare" in secs:
        compare(results, shapes, rows, args.smoke, interpret, args.deadline * 0.4)
        save()
    if "sweep" in secs:
        sweep(results, shapes, args.sweep_rows, args.smoke, interpret, args.deadline)
        save()
    results["wall_s"] = time.time() - T0
    save()
    print("\n" + table(results), flush=True)


if __name__ == "__main__":
    main()
