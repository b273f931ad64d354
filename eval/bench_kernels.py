"""Benchmark of the Pallas kernels on the GPU (one run, everything side by side).

    PYTHONPATH=. python3 eval/bench_kernels.py --out results/bench_kernels.json

1. Device, measured copy bandwidth (large device-to-device copies: an XLA
   elementwise copy and, if torch is there, torch's copy_; bytes read + written).
2. Correctness of the GPU kernels on the GPU against the XLA reference (fp32
   math on upcast inputs), fresh random inputs: tails, GQA ratios, T, stats,
   both merge modes; cache_update against write_rows (exact).
3. Sparse attention at the anchor shapes (B, Hq, Hkv, D) of BENCHMARKS.md, S in
   {1024, 4096, 8192}, T in {1, 9}: this kernel (default config), the XLA
   reference, and for T = 1 jax's Pallas decode_attention (gqa) and cuDNN
   through jax.nn.dot_product_attention; with_stats at S = 4096. Effective
   bandwidth = K+V bytes of the valid slots / time.
4. cache_update vs write_rows (donated cache, in place).
5. Prefill: one chunk of T = 512 rows at the 7B shape over a 16K-slot cache of
   which P slots are filled: the prefill kernel (PREFILL_SWEEP configs), XLA's
   blockwise_attention (what prefill used before), and cuDNN over the same P + T
   keys given contiguous. TFLOP/s = useful FLOPs (4 B Hq T (P + T/2) D) / time.
6. A sweep of kernel variants (SWEEP) at S in SWEEP_SLOTS, as time allows
   (--deadline bounds the whole run). Results and history: docs/KERNELS.md.

Timing (METHOD.md): random bf16 data, compile + warm-up first, U different
input sets inside one jitted call (rotation past the 50 MB L2). --timer device
(the default): the GPU's busy time per op in a jax.profiler trace of three calls
(eval/trace.py; median over the calls), so an op of 15-40 us is not measured by
how fast the host launches it; --timer wall: calls issued back to back, median
over repeats of the host's time / (calls * U). A short table is printed last;
everything goes to the JSON file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax.kernels import GpuConfig, PrefillConfig, blockwise_attention, cache_update_gpu, sparse_attention_gpu
from adore_jax.kernels.attention_gpu import padded_rows, plan
from eval.bandwidth import copy_bandwidth as measured_copy_bandwidth
from eval.trace import busy_ns, gpu_events
from models.attention import reference_attention
from models.cache import KVCache, write_rows

SHAPES = [(8, 32, 8, 128), (32, 9, 3, 64), (8, 32, 32, 128)]  # (B, Hq, Hkv, D)
SLOTS = [1024, 4096, 8192]
SWEEP_SLOTS = [1024, 4096]
TS = [1, 9]
ROTATE_BYTES = 200 << 20  # distinct inputs per jitted call: over 3x the 60 MB L2
CALL_GPU_S = 300e-6  # and enough ops per call that the GPU, not the host, sets the pace


def n_sets(nbytes, est_bw=3.0e12, cap=24):
    return int(max(2, min(cap, math.ceil(max(ROTATE_BYTES, CALL_GPU_S * est_bw) / nbytes))))
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ---------------------------------------------------------------- timing


def bench(op, sets, reps=7, min_call_s=0.02, timer="wall"):
    """Seconds per op (median, per repeat): `op(*s)` for every s in sets inside one jit,
    calls back to back, timed by `timed_calls`."""
    multi = jax.jit(lambda sets: [op(*s) for s in sets])
    jax.block_until_ready(multi(sets))  # compile
    _warm(lambda: multi(sets))
    return timed_calls(lambda: multi(sets), len(sets), reps, min_call_s, timer)


def timed_calls(call, n_ops, reps=7, min_call_s=0.02, timer="wall"):
    """Seconds per op of call() (n_ops ops a call; compiled and warm), (median, per
    repeat). timer="wall": the host's clock over back-to-back calls of at least
    min_call_s together; "device": the GPU's busy time, `device_seconds`."""
    if timer == "device":
        return device_seconds(call, n_ops)
    t = time.perf_counter()
    jax.block_until_ready(call())
    per_call = max(time.perf_counter() - t, 1e-6)
    n = max(1, min(200, math.ceil(min_call_s / per_call)))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = None
        for _ in range(n):
            out = call()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / (n * n_ops))
    return statistics.median(times), times


def device_seconds(call, n_ops, calls=3):
    """GPU-busy seconds per op while call() (n_ops ops) runs `calls` times in one
    profiler trace: (median over calls, per call). The union of the kernels' intervals
    counts, so the gaps where the GPU waits for the host do not (at 12-40 us an op the
    wall clock of back-to-back calls measured the host's launches: docs/KERNELS.md,
    session 12)."""
    events = gpu_events(lambda: [call() for _ in range(calls)][-1])  # the last: earlier ones may be donated
    if not events or len(events) % calls:
        raise RuntimeError(f"{len(events)} GPU events in the trace for {calls} calls (no profiler data: --timer wall)")
    k = len(events) // calls
    per = [busy_ns(events[i * k:(i + 1) * k]) * 1e-9 / n_ops for i in range(calls)]
    return statistics.median(per), per


def time_ops(impls, sets, nbytes, configs=(), copies=(), timer="wall"):
    """{name: {us, TBps, times_us[, cfg]}} for each op in impls, timed by `bench`
    (reps=5, `timer`): nbytes / time, twice that for the names in `copies` (read + written),
    with the GpuConfig of the names in `configs`. An op that fails records its error
    and the rest still run."""
    row = {}
    for name, f in impls.items():
        try:
            t, ts = bench(f, sets, reps=5, timer=timer)
            tb = (2 if name in copies else 1) * nbytes / t / 1e12
            row[name] = {"us": t * 1e6, "TBps": tb, "times_us": [x * 1e6 for x in ts]}
            if name in configs:
                row[name]["cfg"] = dataclasses.asdict(configs[name])
        except Exception:  # a config that does not compile
            row[name] = {"error": traceback.format_exc()[-1500:]}
    return row


def time_point(seed, shape, S, T, impls, configs=(), copies=("copy",), timer="device"):
    """`time_ops` of the attention ops `impls` at one point: shape (B, Hq, Hkv, D), S
    cache slots, T query rows, on fresh input sets (`attn_set` from `seed` on). A row
    {"shape": [B, Hq, Hkv, D, S, T], name: {us, TBps, ...}}."""
    B, Hq, Hkv, D = shape
    nbytes = kv_bytes(B, Hkv, D, S)
    sets = [attn_set(seed + u, B, Hq, Hkv, D, S, T) for u in range(n_sets(nbytes))]
    return {"shape": [B, Hq, Hkv, D, S, T], **time_ops(impls, sets, nbytes, configs, copies, timer)}


def row_times(row):
    """{name: us, rounded, or the end of its error} of a `time_ops` row."""
    return {n: round(v["us"], 1) if "us" in v else v["error"][-300:] for n, v in row.items()
            if isinstance(v, dict) and ("us" in v or "error" in v)}


def row_summary(row, top=6, skip=("copy",)):
    """'name us (TB/s) | ...' of a `time_ops` row: the `top` fastest ops not in `skip`."""
    best = sorted((v["us"], n) for n, v in row.items() if isinstance(v, dict) and "us" in v and n not in skip)
    return " | ".join(f"{n} {u:.1f} ({row[n]['TBps']:.2f})" for u, n in best[:top])


def sweep(cases, row_of, path, deadline):
    """[row_of(*case) for case in cases] while under `deadline` seconds from the start:
    the rows so far go to the JSON file `path` after each one, which is printed short
    (`row_times`) with its "shape"."""
    t0, rows = time.time(), []
    for case in cases:
        if time.time() - t0 > deadline:
            print("deadline: stopped before", case, flush=True)
            break
        rows.append(row_of(*case))
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"[{time.time() - t0:5.0f}s]", rows[-1]["shape"], row_times(rows[-1]), flush=True)
    return rows


def config_sweep(out_path, deadline, cases, configs_of, seed, extra=None, copies=(), timer="device", interpret=False):
    """The GPU kernel (`ours`) under launch configs at each point (shape (B, Hq, Hkv,
    D), S, T) of `cases`: configs_of(bs, ns, stages, shape, S, T) -> {name: GpuConfig},
    given the plan's block, split count and stages there, beside the ops
    extra(the same arguments) -> {name: op}, timed by `time_point` on inputs from
    `seed` (`copies`: names whose bytes count read + written). Rows, each with
    "plan_cfg" [bs, ns, stages], go to the JSON file out_path as `sweep` writes them
    until `deadline` seconds; a line a row (its fastest ops) is printed last."""

    def row_of(shape, S, T):
        B, Hq, Hkv, D = shape
        bs, ns, _, st = plan(B, Hkv, S, D, GpuConfig(), padded_rows(Hq // Hkv, T))
        configs = configs_of(bs, ns, st, shape, S, T)
        impls = (extra(bs, ns, st, shape, S, T) if extra else {}) | {
            n: ours(c, interpret=interpret) for n, c in configs.items()}
        row = time_point(seed, shape, S, T, impls, configs, copies, timer)
        row["plan_cfg"] = [bs, ns, st]
        return row

    rows = sweep(cases, row_of, out_path, deadline)
    print("\nus per call (K+V TB/s), fastest first; plan = (block, splits, stages)")
    for row in rows:
        print(row["shape"], "plan", row["plan_cfg"], "|", row_summary(row), flush=True)
    return rows


def sweep_main(main, name, argv=None, choices=None):
    """Run main(OUT_DIR, DEADLINE_S) from an experiment script's command line
    (`name` OUT_DIR [DEADLINE_S], 300 s by default). With `choices` (names of
    variants) it takes a third, optional argument, NAMES: some of them, comma-separated
    (all by default), and runs main(OUT_DIR, DEADLINE_S, names). A wrong command line
    exits with the usage."""
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: {name} OUT_DIR [DEADLINE_S{' [NAMES]' if choices else ''}]"
    if not 1 <= len(argv) <= (3 if choices else 2):
        sys.exit(usage)
    try:
        deadline = float(argv[1]) if argv[1:] else 300.0
    except ValueError:
        sys.exit(f"{usage}: DEADLINE_S must be a number of seconds, got {argv[1]!r}")
    if not choices:
        return main(argv[0], deadline)
    names = argv[2].split(",") if argv[2:] else list(choices)
    unknown = [n for n in names if n not in choices]
    if unknown:
        sys.exit(f"{usage}: unknown NAMES {unknown}; known: {','.join(choices)}")
    return main(argv[0], deadline, names)


def _warm(call, seconds=0.05):
    """Run for a while first: clocks ramp up from idle."""
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        jax.block_until_ready(call())


def bench_chain(step, state, extra_sets, reps=7, min_call_s=0.02, timer="wall"):
    """Like bench for an op that consumes and returns donated state (the cache):
    (median, per repeat, the last state)."""
    multi = jax.jit(lambda st, sets: _chain(step, st, sets), donate_argnums=0)
    box = [jax.block_until_ready(multi(multi(state, extra_sets), extra_sets))]  # compile, warm

    def call():  # each call consumes the last one's state
        box[0] = multi(box[0], extra_sets)
        return box[0]

    t, ts = timed_calls(call, len(extra_sets), reps, min_call_s, timer)
    return t, ts, box[0]


def _chain(step, st, sets):
    for s in sets:
        st = step(st, *s)
    return st


# ---------------------------------------------------------------- inputs


def rand(key, shape, dtype=jnp.bfloat16):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def attn_set(seed, B, Hq, Hkv, D, S, T, dtype=jnp.bfloat16):
    """A full cache (every slot valid, positions 0..S-1 shuffled) and T new rows after it."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = rand(ks[0], (B, T, Hq, D), dtype)
    k = rand(ks[1], (B, T, Hkv, D), dtype)
    v = rand(ks[2], (B, T, Hkv, D), dtype)
    ck = rand(ks[3], (B, S, Hkv, D), dtype)
    cv = rand(ks[4], (B, S, Hkv, D), dtype)
    cpos = jnp.broadcast_to(jax.random.permutation(ks[5], S).astype(jnp.int32), (B, S))
    qpos = jnp.broadcast_to(S + jnp.arange(T, dtype=jnp.int32), (B, T))
    return (q, k, v, ck, cv, cpos, qpos)


def kv_bytes(B, Hkv, D, S, itemsize=2):
    return 2 * B * S * Hkv * D * itemsize


# ---------------------------------------------------------------- implementations


def ours(cfg=GpuConfig(), with_stats=False, interpret=False):
    def f(q, k, v, ck, cv, cpos, qpos):
        r = sparse_attention_gpu(q, k, v, ck, cv, cpos, qpos, with_stats=with_stats, config=cfg, interpret=interpret)
        return (r.out, r.mass, r.lse) if with_stats else r.out

    return f


def xla_ref(with_stats=False):
    def f(q, k, v, ck, cv, cpos, qpos):
        r = reference_attention(q, k, v, ck, cv, cpos, qpos, with_stats=with_stats)
        return (r.out, r.mass, r.lse) if with_stats else r.out

    return f


def jax_pallas_decode(q, k, v, ck, cv, cpos, qpos):
    from jax.experimental.pallas.ops.gpu import decode_attention

    return decode_attention.gqa(q[:, 0], ck, cv)


def cudnn(q, k, v, ck, cv, cpos, qpos):
    return jax.nn.dot_product_attention(q, ck, cv, implementation="cudnn")


def same_size_copy(q, k, v, ck, cv, cpos, qpos):
    """A copy of the cache's K and V (read + written): the bandwidth reference at an attention call's size."""
    return -ck, -cv


def cache_only_reference(q, ck, cv):
    """fp32 attention of q [B, 1, Hq, D] over the whole cache, no mask (for the T=1 baselines)."""
    return jax.nn.dot_product_attention(
        q.astype(jnp.float32), ck.astype(jnp.float32), cv.astype(jnp.float32), implementation="xla"
    )


# ---------------------------------------------------------------- sections


def copy_bandwidth(results, smoke):
    bw = measured_copy_bandwidth((2 << 20) if smoke else (2 << 30))
    results["copy"] = {f"{k}_copy_TBps": v / 1e12 for k, v in bw.items()}
    log("copy bandwidth", results["copy"])
    return bw["best"] / 1e12


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def correctness(results, smoke, interpret, n_cases=7):
    checks = []
    cases = [
        # B, T, Hq, Hkv, D, S, dtype, config
        (2, 1, 8, 8, 64, 1000, jnp.float32, GpuConfig()),
        (1, 16, 8, 1, 64, 2049, jnp.float32, GpuConfig(block_s=32, splits=7)),
        (3, 9, 24, 3, 128, 777, jnp.bfloat16, GpuConfig()),
        (2, 3, 32, 8, 128, 333, jnp.bfloat16, GpuConfig(splits=5)),
        (8, 1, 32, 8, 128, 4096, jnp.bfloat16, GpuConfig()),
        (4, 9, 9, 3, 64, 4096, jnp.bfloat16, GpuConfig()),
        (2, 9, 32, 32, 128, 1030, jnp.bfloat16, GpuConfig(merge="xla")),
    ][:n_cases]
    if smoke:
        cases = [(2, 2, 6, 2, 32, 70, jnp.float32, GpuConfig(block_s=16, splits=3))]
    for i, (B, T, Hq, Hkv, D, S, dtype, cfg) in enumerate(cases):
        name = f"attn B{B} T{T} Hq{Hq} Hkv{Hkv} D{D} S{S} {jnp.dtype(dtype).name} {cfg}"
        try:
            args = list(attn_set(7000 + i, B, Hq, Hkv, D, S, T, dtype))
            key = jax.random.PRNGKey(i)
            cpos = jax.random.randint(key, (B, S), 0, 2 * S)
            args[5] = jnp.where(jax.random.uniform(jax.random.fold_in(key, 1), (B, S)) < 0.3, -1, cpos)
            args[6] = jax.random.randint(jax.random.fold_in(key, 2), (B, T), -1, 2 * S + 4)
            with jax.default_matmul_precision("highest"):  # else XLA may run the fp32 reference in TF32
                ref = reference_attention(*[a.astype(jnp.float32) if a.dtype != jnp.int32 else a for a in args], with_stats=True)
            f = jax.jit(lambda *a: sparse_attention_gpu(*a, with_stats=True, config=cfg, interpret=interpret))
            got = f(*args)
            again = f(*args)  # same inputs again: a race would show as a different result
            noms = jax.jit(lambda *a: sparse_attention_gpu(*a, config=cfg, interpret=interpret))(*args)
            same = all(bool(jnp.array_equal(x, y)) for x, y in zip((got.out, got.lse, got.mass), (again.out, again.lse, again.mass)))
            valid = np.asarray(ref.lse) > -1e29
            e = {
                "case": name,
                "out_rel": rel_err(got.out, ref.out),
                "out_nostats_rel": rel_err(noms.out, ref.out),
                "lse_max_abs": float(np.max(np.abs(np.asarray(got.lse) - np.asarray(ref.lse))[valid], initial=0.0)),
                "mass_max_abs": float(np.max(np.abs(np.asarray(got.mass) - np.asarray(ref.mass)))),
                "deterministic": same,
            }
            tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
            e["ok"] = bool(same and e["out_rel"] < tol and e["out_nostats_rel"] < tol and e["lse_max_abs"] < 5e-2 and e["mass_max_abs"] < 5e-2)
        except Exception as ex:
            e = {"case": name, "ok": False, "error": traceback.format_exc()[-2000:]}
        checks.append(e)
        log("check", "OK  " if e["ok"] else "FAIL", {k: v for k, v in e.items() if k not in ("ok",)})
    # cache update: exact equality with write_rows
    for i, (L, B, S, Hkv, D, T) in enumerate([(3, 4, 100, 3, 64, 9), (2, 2, 1024, 8, 128, 1)] if not smoke else [(2, 2, 10, 2, 16, 3)]):
        name = f"cache_update L{L} B{B} S{S} Hkv{Hkv} D{D} T{T}"
        try:
            cache, sets = update_inputs(L, B, S, Hkv, D, T, 1, seed=90 + i)
            nk, nv, slots, pos = sets[0]
            want = write_rows(cache, nk, nv, slots, pos)
            got = jax.jit(lambda c, *a: cache_update_gpu(c, *a, interpret=interpret))(cache, nk, nv, slots, pos)
            ok = all(bool(jnp.array_equal(a, b)) for a, b in zip((got.k, got.v, got.pos), (want.k, want.v, want.pos)))
            e = {"case": name, "ok": ok}
        except Exception:
            e = {"case": name, "ok": False, "error": traceback.format_exc()[-2000:]}
        checks.append(e)
        log("check", "OK  " if e["ok"] else "FAIL", e["case"], e.get("error", ""))
    results["correctness"] = checks
    return all(c["ok"] for c in checks)


def baseline_check(args):
    """Errors of the T=1 baselines against an fp32 cache-only reference (they see no new row)."""
    q, k, v, ck, cv, cpos, qpos = args
    with jax.default_matmul_precision("highest"):
        ref = cache_only_reference(q, ck, cv)
    out = {}
    for name, fn in (("jax_pallas_decode", jax_pallas_decode), ("cudnn", cudnn)):
        try:
            out[name] = rel_err(jax.jit(fn)(*args).reshape(ref.shape), ref)
        except Exception as e:
            out[name] = repr(e)[:300]
    return out


def attention_section(results, copy_bw, smoke, interpret, deadline, timer):
    rows = []
    shapes = [(2, 4, 2, 32)] if smoke else SHAPES
    slots = [64] if smoke else SLOTS
    for (B, Hq, Hkv, D), S, T in [(sh, s, t) for sh in shapes for s in slots for t in TS]:
        if time.time() - T0 > deadline:
            log("deadline reached: skipping", (B, Hq, Hkv, D, S, T))
            continue
        nbytes = kv_bytes(B, Hkv, D, S)
        U = n_sets(nbytes)
        sets = [attn_set(100 * S + 10 * T + u, B, Hq, Hkv, D, S, T) for u in range(U)]
        row = {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "S": S, "T": T, "kv_bytes": nbytes, "sets": U}
        # a copy of the same K+V bytes, timed the same way: the fixed costs a call of this size pays anyway
        impls = {"ours": ours(interpret=interpret), "xla_ref": xla_ref(), "copy_same_size": same_size_copy}
        if T == 1 and not interpret:
            impls["jax_pallas_decode"] = jax_pallas_decode
            impls["cudnn"] = cudnn
            row["baseline_rel_err"] = baseline_check(sets[0])
        if S == 4096 or smoke:
            impls["ours_stats"] = ours(with_stats=True, interpret=interpret)
            impls["xla_ref_stats"] = xla_ref(with_stats=True)
        row.update(time_ops(impls, sets, nbytes, timer=timer))
        row["ours_frac_copy"] = row["ours"].get("TBps", 0) / copy_bw
        if "us" in row["copy_same_size"]:  # read + written, like copy_bw
            row["copy_same_size_TBps"] = 2 * nbytes / (row["copy_same_size"]["us"] * 1e-6) / 1e12
            row["ours_frac_copy_same_size"] = row["ours"].get("TBps", 0) / row["copy_same_size_TBps"]
        rows.append(row)
        brief = {k: round(v["TBps"], 2) for k, v in row.items() if isinstance(v, dict) and "TBps" in v}
        log("attn", (B, Hq, Hkv, D, S, T), "TB/s", brief, {k: v["error"][-300:] for k, v in row.items() if isinstance(v, dict) and "error" in v})
        del sets
    results["attention"] = rows


SWEEP = {  # name -> (config, its block as a multiple of the default plan's); earlier sweeps: docs/KERNELS.md
    "default": (GpuConfig(), 1),
    "st3": (GpuConfig(num_stages=3), 1),
    "wave2": (GpuConfig(ctas_per_sm=2), 1),
    "w8": (GpuConfig(num_warps=8), 1),
    "w8_double": (GpuConfig(num_warps=8), 2),
    "half": (GpuConfig(), 0.5),
    "one_split": (GpuConfig(splits=1), 1),  # no merge, no counter memset: the per-call fixed cost without them
}


def sweep_section(results, copy_bw, smoke, interpret, deadline, timer):
    rows = []
    shapes = [(2, 4, 2, 32)] if smoke else SHAPES
    slots = [64] if smoke else SWEEP_SLOTS
    for (B, Hq, Hkv, D), S, T in [(sh, s, t) for s in slots for sh in shapes for t in TS]:
        if time.time() - T0 > deadline:
            log("deadline reached: skipping sweep", (B, Hq, Hkv, D, S, T))
            continue
        nbytes = kv_bytes(B, Hkv, D, S)
        U = n_sets(nbytes)
        sets = [attn_set(500 + u, B, Hq, Hkv, D, S, T) for u in range(U)]
        row = {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "S": S, "T": T}
        base_bs = plan(B, Hkv, S, D, GpuConfig(), padded_rows(Hq // Hkv, T))[0]
        configs = {name: dataclasses.replace(cfg, block_s=max(16, int(base_bs * scale))) if scale != 1 else cfg
                   for name, (cfg, scale) in SWEEP.items()}
        row.update(time_ops({n: ours(c, interpret=interpret) for n, c in configs.items()}, sets, nbytes, configs,
                            timer=timer))
        rows.append(row)
        log("sweep", (B, Hq, Hkv, D, S, T), {k: round(v["TBps"], 2) for k, v in row.items() if isinstance(v, dict) and "TBps" in v})
        del sets
    results["sweep"] = rows


PREFILL_SWEEP = {  # name -> prefill kernel config
    "default": PrefillConfig(),
    "r128_w8": PrefillConfig(rows=128, num_warps=8),
    "b32": PrefillConfig(block_s=32),
    "st3": PrefillConfig(num_stages=3),
}


def prefill_set(B, Hq, Hkv, D, S, T, P, seed=0):
    """A chunk of T rows at positions P.. over S slots whose first P hold positions 0..P-1."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    cpos = jnp.broadcast_to(jnp.where(jnp.arange(S) < P, jnp.arange(S), -1).astype(jnp.int32), (B, S))
    qpos = jnp.broadcast_to(P + jnp.arange(T, dtype=jnp.int32), (B, T))
    return (rand(ks[0], (B, T, Hq, D)), rand(ks[1], (B, T, Hkv, D)), rand(ks[2], (B, T, Hkv, D)),
            rand(ks[3], (B, S, Hkv, D)), rand(ks[4], (B, S, Hkv, D)), cpos, qpos)


def cudnn_prefill(P):
    """cuDNN flash attention over the P filled slots and the T new rows, given as one contiguous array."""
    def f(q, k, v, ck, cv, cpos, qpos):
        keys, vals = jnp.concatenate([ck[:, :P], k], 1), jnp.concatenate([cv[:, :P], v], 1)
        mask = (jnp.arange(P + q.shape[1])[None, :] <= qpos[0][:, None])[None, None]  # [1, 1, T, P + T]
        return jax.nn.dot_product_attention(q, keys, vals, mask=mask, implementation="cudnn")
    return f


def prefill_section(results, smoke, interpret, deadline, timer):
    rows = []
    (B, Hq, Hkv, D, S, T), fills = ((1, 4, 2, 16, 80, 20), [40]) if smoke else ((8, 32, 32, 128, 16386, 512), [4096, 12288])
    for P in fills:
        if time.time() - T0 > deadline:
            log("deadline reached: skipping prefill", P)
            continue
        args = prefill_set(B, Hq, Hkv, D, S, T, P)
        flops = 4 * B * Hq * T * (P + (T + 1) / 2) * D
        row = {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "S": S, "T": T, "P": P, "flops": flops}
        impls = {f"ours_{n}": ours(GpuConfig(prefill=c), interpret=interpret) for n, c in PREFILL_SWEEP.items()}
        impls["blockwise"] = lambda *a: blockwise_attention(*a).out
        if not interpret:
            impls["cudnn"] = cudnn_prefill(P)
        ref = jax.jit(impls["blockwise"])(*args)
        for name, fn in impls.items():
            try:
                err = rel_err(jax.jit(fn)(*args), ref)
                t, ts = bench(fn, [args], reps=5, timer=timer)
                row[name] = {"us": t * 1e6, "TFLOPs": flops / t / 1e12, "rel_err_vs_blockwise": err}
            except Exception:
                row[name] = {"error": traceback.format_exc()[-1500:]}
        rows.append(row)
        log("prefill", (B, Hq, Hkv, D, S, T, P), {k: round(v["us"], 1) for k, v in row.items() if isinstance(v, dict) and "us" in v},
            {k: v["error"][-300:] for k, v in row.items() if isinstance(v, dict) and "error" in v})
        del args
    results["prefill"] = rows


def update_inputs(L, B, S, Hkv, D, T, n_sets, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3 + 4 * n_sets)
    cache = KVCache(rand(ks[0], (L, B, S, Hkv, D)), rand(ks[1], (L, B, S, Hkv, D)),
                    jax.random.randint(ks[2], (B, S), -1, S).astype(jnp.int32))
    sets = []
    for u in range(n_sets):
        k0, k1, k2, k3 = ks[3 + 4 * u : 7 + 4 * u]
        slots = jnp.stack([jax.random.permutation(k, S)[:T] for k in jax.random.split(k2, B)]).astype(jnp.int32)
        slots = slots.at[0, 0].set(-1)  # one dropped row
        pos = jax.random.randint(k3, (B, T), 0, 4 * S).astype(jnp.int32)
        sets.append((rand(k0, (L, B, T, Hkv, D)), rand(k1, (L, B, T, Hkv, D)), slots, pos))
    return cache, sets


def update_section(results, smoke, interpret, deadline, timer):
    rows = []
    cases = [(32, 8, 1024, 8, 128), (30, 32, 1024, 3, 64), (32, 8, 1024, 32, 128), (32, 8, 8192, 8, 128)]
    if smoke:
        cases = [(2, 2, 32, 2, 16)]
    for (L, B, S, Hkv, D), T in [(c, t) for c in cases for t in TS]:
        if time.time() - T0 > deadline:
            log("deadline reached: skipping update", (L, B, S, Hkv, D, T))
            continue
        row = {"L": L, "B": B, "S": S, "Hkv": Hkv, "D": D, "T": T}
        row["bytes"] = 2 * 2 * L * B * T * Hkv * D * 2  # K and V rows: read new + write slot
        for name, fn in (("ours", lambda c, *a: cache_update_gpu(c, *a, interpret=interpret)), ("write_rows", write_rows)):
            try:
                cache, sets = update_inputs(L, B, S, Hkv, D, T, 8, seed=S + T)
                t, ts, cache = bench_chain(fn, cache, sets, timer=timer)
                row[name] = {"us": t * 1e6, "TBps": row["bytes"] / t / 1e12, "times_us": [x * 1e6 for x in ts]}
                del cache
            except Exception:
                row[name] = {"error": traceback.format_exc()[-1500:]}
        rows.append(row)
        log("update", (L, B, S, Hkv, D, T), {k: round(v["us"], 2) for k, v in row.items() if isinstance(v, dict) and "us" in v},
            {k: v["error"][-300:] for k, v in row.items() if isinstance(v, dict) and "error" in v})
    results["cache_update"] = rows


def table(results, copy_bw):
    lines = []
    lines.append(f"copy bandwidth {copy_bw:.2f} TB/s (read+write); attention: K+V TB/s (us); "
                 f"timer: {results.get('timer', 'wall')}")
    lines.append("%copy@S: against a copy of the same K+V bytes timed the same way (its TB/s in parentheses)")
    hdr = (f"{'B,Hq,Hkv,D':>13} {'S':>5} {'T':>2} | {'ours':>12} {'xla-ref':>12} {'pl-decode':>12} {'cudnn':>12} | "
           f"{'%copy':>5} {'%copy@S':>12} {'cudnn/ours':>10}")
    lines.append(hdr)
    for r in results.get("attention", []):
        def cell(name):
            v = r.get(name)
            if not isinstance(v, dict):
                return "-"
            if "TBps" not in v:
                return "err"
            return f"{v['TBps']:.2f}({v['us']:.0f})"
        ratio = "-"
        if isinstance(r.get("cudnn"), dict) and "us" in r["cudnn"] and "us" in r["ours"]:
            ratio = f"{r['cudnn']['us'] / r['ours']['us']:.2f}"
        pct = f"{100 * r['ours_frac_copy']:.0f}" if "TBps" in r["ours"] else "-"
        pct_s = f"{100 * r['ours_frac_copy_same_size']:.0f}({r['copy_same_size_TBps']:.2f})" if "ours_frac_copy_same_size" in r else "-"
        lines.append(
            f"{'%d,%d,%d,%d' % (r['B'], r['Hq'], r['Hkv'], r['D']):>13} {r['S']:>5} {r['T']:>2} | {cell('ours'):>12} "
            f"{cell('xla_ref'):>12} {cell('jax_pallas_decode'):>12} {cell('cudnn'):>12} | {pct:>5} {pct_s:>12} {ratio:>10}"
        )
    st = [r for r in results.get("attention", []) if "ours_stats" in r]
    if st:
        lines.append("with_stats (S=4096): ours vs xla-ref, us")
        for r in st:
            a, b = r.get("ours_stats", {}), r.get("xla_ref_stats", {})
            lines.append(f"{'%d,%d,%d,%d' % (r['B'], r['Hq'], r['Hkv'], r['D']):>13} {r['S']:>5} {r['T']:>2} | "
                         f"ours {a.get('us', float('nan')):8.1f}  xla-ref {b.get('us', float('nan')):8.1f}")
    if results.get("cache_update"):
        lines.append("cache_update (donated, in place): us per call")
        for r in results["cache_update"]:
            a, b = r.get("ours", {}), r.get("write_rows", {})
            lines.append(f"L{r['L']} B{r['B']} S{r['S']} Hkv{r['Hkv']} D{r['D']} T{r['T']}: ours {a.get('us', float('nan')):7.1f}"
                         f"  write_rows {b.get('us', float('nan')):7.1f}")
    if results.get("prefill"):
        names = [k for k in results["prefill"][0] if isinstance(results["prefill"][0][k], dict)]
        lines.append("prefill chunk (T rows over P filled slots), TFLOP/s (us): " + " ".join(names))
        for r in results["prefill"]:
            vals = " ".join(f"{r[n]['TFLOPs']:.0f}({r[n]['us']:.0f})" if "us" in r[n] else "err" for n in names)
            lines.append(f"T{r['T']} P{r['P']} | {vals}")
    sw = results.get("sweep", [])
    if sw:
        names = list(SWEEP)
        lines.append("sweep (TB/s): " + " ".join(names))
        for r in sw:
            vals = " ".join(f"{r[n]['TBps']:.2f}" if isinstance(r.get(n), dict) and "TBps" in r[n] else "-" for n in names)
            lines.append(f"{'%d,%d,%d,%d' % (r['B'], r['Hq'], r['Hkv'], r['D']):>13} {r['S']:>5} {r['T']:>2} | {vals}")
    ok = results.get("correctness_ok")
    lines.append(f"correctness on device: {'not checked' if ok is None else 'PASS' if ok else 'FAIL'}")
    return "\n".join(lines)


def main(argv=None):
    global T0
    T0 = time.time()  # --deadline counts from here, not from the import (a test suite imports it early)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench_kernels.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; interpret mode on CPU (checks the script only)")
    ap.add_argument("--deadline", type=float, default=330.0, help="seconds after which remaining cases are skipped")
    ap.add_argument("--sections", default="copy,check,sweep,attn,update,prefill")
    ap.add_argument("--check-cases", type=int, default=7)
    ap.add_argument("--timer", choices=("device", "wall"), default="device",
                    help="device: GPU-busy time from a profiler trace; wall: the host's clock (on CPU: wall)")
    args = ap.parse_args(argv)
    interpret = jax.default_backend() == "cpu"
    if interpret and not args.smoke:
        sys.exit("no GPU: run with --smoke on CPU (interpret mode), or on the GPU machine")
    timer = "wall" if interpret else args.timer
    dev = jax.devices()[0]
    results = {"device": str(dev), "device_kind": getattr(dev, "device_kind", "?"), "jax": jax.__version__,
               "cores": getattr(dev, "core_count", None), "args": vars(args), "timer": timer}
    log("device", results["device_kind"], "jax", jax.__version__, "SMs", results["cores"])
    secs = args.sections.split(",")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)

    copy_bw_tb = copy_bandwidth(results, args.smoke) if "copy" in secs else 3.84  # TB/s
    save()
    if "check" in secs:
        results["correctness_ok"] = correctness(results, args.smoke, interpret, args.check_cases)
        save()
    if "attn" in secs:
        attention_section(results, copy_bw_tb, args.smoke, interpret, args.deadline * 0.75, timer)
        save()
    if "update" in secs:
        update_section(results, args.smoke, interpret, args.deadline * 0.82, timer)
        save()
    if "prefill" in secs:
        prefill_section(results, args.smoke, interpret, args.deadline * 0.9, timer)
        save()
    if "sweep" in secs:
        sweep_section(results, copy_bw_tb, args.smoke, interpret, args.deadline, timer)
        save()
    results["wall_s"] = time.time() - T0
    save()
    print("\n" + table(results, copy_bw_tb), flush=True)


if __name__ == "__main__":
    main()
