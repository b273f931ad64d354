"""Benchmark of the Pallas GPU kernels against XLA, cuDNN and a copy: one run, JSON + table + plot.

    python -m eval.bench_kernels --out results/kernels/bench_kernels.json   # on the GPU
    python -m eval.bench_kernels --smoke --out /tmp/k/bench_kernels.json    # tiny, interpret mode, any CPU
    python -m eval.bench_kernels --from-json docs/results/kernels/bench_kernels.json  # table + plot again

Sections (--sections, all but attn8 by default):
1. copy: the device's copy bandwidth (large device-to-device copies: an XLA
   elementwise copy and, if torch is there, torch's copy_; bytes read + written).
2. check: every GPU kernel on the device against its XLA reference (fp32 math
   on upcast inputs), fresh random inputs: attention with tails, GQA ratios, T,
   stats, both merge modes; cache_update against write_rows (exact); the few-row
   matmul and q/k/v + RoPE kernels.
3. attn: sparse decode attention at the anchor shapes (B, Hq, Hkv, D) of
   BENCHMARKS.md, S in {1024, 4096, 8192}, T in {1, 9}: the kernel (its plan),
   the XLA reference, a copy of the same K+V bytes, and for T = 1 jax's Pallas
   decode_attention (gqa) and cuDNN through jax.nn.dot_product_attention;
   with_stats at S = 4096. Effective bandwidth = K+V bytes of the valid slots / time.
4. update: cache_update against write_rows (donated cache, in place).
5. prefill: one chunk of T = 512 rows at the 7B shape over a 16K-slot cache of
   which P slots are filled: the prefill kernel (PREFILL_CONFIGS), XLA's
   blockwise_attention, and cuDNN over the same P + T keys given contiguous.
   TFLOP/s = useful FLOPs (4 B Hq T (P + T/2) D) / time.
6. matmul: the decode step's weight matmuls at the 7B shape (x [M, K] @ w [K, N],
   bf16, fp32 accumulation; M in --matmul-rows): XLA's matmul (one dot a weight,
   one row padded to two, as models/llama.py) against the few-row kernel's plan
   (q, k and v as three weights in one launch). Rate = weight bytes / time.
7. attn8 (when asked for): the decode kernel (T = 1) with int8 and float8_e4m3
   slots (values + a float32 scale per slot and head, dequantized in the kernel)
   at KV8_SHAPES, S in {1024, 4096, 8192}: the bytes it reads / time, against the
   copy bandwidth, and its speedup over the same call on bfloat16 slots.

Timing: random bf16 data, compile + warm-up first, U different input sets inside
one jitted call (rotation past the 50 MB L2). --timer device (the default): the
GPU's busy time per op in a jax.profiler trace of three calls (eval/trace.py;
median over the calls), so an op of 15-40 us is not measured by how fast the host
launches it; --timer wall: calls issued back to back, median over repeats of the
host's time / (calls * U). --deadline bounds the whole run. Writes OUT (JSON),
and beside it OUT's name with .txt (the table, also printed) and .png (the plot).
Results and design notes: docs/KERNELS.md.
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
from adore_jax.kernels.matmul_gpu import MatmulConfig, matmul_gpu, reference_matmul
from adore_jax.kernels.qkv_gpu import qkv_rope_gpu, reference_qkv_rope
from eval.bandwidth import copy_bandwidth as measured_copy_bandwidth
from eval.trace import busy_ns, gpu_events
from models.attention import reference_attention
from models.cache import KVCache, quantize, write_rows
from models.llama import rope_tables

SHAPES = [(8, 32, 8, 128), (32, 9, 3, 64), (8, 32, 32, 128)]  # (B, Hq, Hkv, D)
SLOTS = [1024, 4096, 8192]
TS = [1, 9]
ROTATE_BYTES = 200 << 20  # distinct inputs per jitted call: over 3x the 60 MB L2
CALL_GPU_S = 300e-6  # and enough ops per call that the GPU, not the host, sets the pace


def n_sets(nbytes, est_bw=3.0e12, cap=24):
    """Input sets a jitted call rotates through for ops of nbytes: past the L2 and CALL_GPU_S of work, 2 to cap."""
    return int(max(2, min(cap, math.ceil(max(ROTATE_BYTES, CALL_GPU_S * est_bw) / nbytes))))
T0 = time.time()


def log(*a):
    """Print a line with the seconds since the run started."""
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
    "Design notes")."""
    events = gpu_events(lambda: [call() for _ in range(calls)][-1])  # the last: earlier ones may be donated
    if not events or len(events) % calls:
        raise RuntimeError(f"{len(events)} GPU events in the trace for {calls} calls (no profiler data: --timer wall)")
    k = len(events) // calls
    per = [busy_ns(events[i * k:(i + 1) * k]) * 1e-9 / n_ops for i in range(calls)]
    return statistics.median(per), per


def time_ops(impls, sets, nbytes, timer="wall"):
    """{name: {us, TBps, times_us}} for each op in impls, timed by `bench` (reps=5,
    `timer`) on the same input sets, TBps = nbytes / time. An op that fails records
    its error and the rest still run."""
    row = {}
    for name, f in impls.items():
        try:
            t, ts = bench(f, sets, reps=5, timer=timer)
            row[name] = {"us": t * 1e6, "TBps": nbytes / t / 1e12, "times_us": [x * 1e6 for x in ts]}
        except Exception:  # a kernel that does not compile here
            row[name] = {"error": traceback.format_exc()[-1500:]}
    return row


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
    """Standard normal values of `shape` in `dtype`."""
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
    """Bytes of K and V in S slots: 2 B S Hkv D itemsize."""
    return 2 * B * S * Hkv * D * itemsize


# ---------------------------------------------------------------- implementations


def ours(cfg=GpuConfig(), with_stats=False, interpret=False):
    """The GPU decode kernel under `cfg` as an op on attn_set's inputs: out [B, T, Hq, D] (and mass, lse with stats)."""
    def f(q, k, v, ck, cv, cpos, qpos):
        r = sparse_attention_gpu(q, k, v, ck, cv, cpos, qpos, with_stats=with_stats, config=cfg, interpret=interpret)
        return (r.out, r.mass, r.lse) if with_stats else r.out

    return f


def xla_ref(with_stats=False):
    """The XLA reference attention as an op on attn_set's inputs: out [B, T, Hq, D] (and mass, lse with stats)."""
    def f(q, k, v, ck, cv, cpos, qpos):
        r = reference_attention(q, k, v, ck, cv, cpos, qpos, with_stats=with_stats)
        return (r.out, r.mass, r.lse) if with_stats else r.out

    return f


def jax_pallas_decode(q, k, v, ck, cv, cpos, qpos):
    """jax's own Pallas decode attention (gqa) of q's first row over the whole cache: [B, Hq, D]."""
    from jax.experimental.pallas.ops.gpu import decode_attention

    return decode_attention.gqa(q[:, 0], ck, cv)


def cudnn(q, k, v, ck, cv, cpos, qpos):
    """cuDNN attention of q [B, T, Hq, D] over the whole cache, no mask (jax.nn.dot_product_attention)."""
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
    """Measure the device's copy bandwidth into results["copy"]; returns the best, TB/s (read + written)."""
    bw = measured_copy_bandwidth((2 << 20) if smoke else (2 << 30))
    results["copy"] = {f"{k}_copy_TBps": v / 1e12 for k, v in bw.items()}
    log("copy bandwidth", results["copy"])
    return bw["best"] / 1e12


def rel_err(a, b):
    """||a - b|| / ||b|| in float64; inf when a has a non-finite value."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def correctness(results, smoke, interpret, n_cases=7):
    """The attention kernel (n_cases shapes and configs, stats, twice for determinism) and cache_update against their references on the device; results["correctness"], True when all pass."""
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
    """results["attention"]: the kernel, XLA, a copy of the same bytes and (T = 1) jax's decode and cuDNN at SHAPES x SLOTS x TS."""
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


KV8_DTYPES = {"int8": jnp.int8, "float8_e4m3": jnp.float8_e4m3fn}
KV8_SHAPES = [(8, 32, 8, 128), (8, 32, 32, 128)]  # (B, Hq, Hkv, D)


def quantized_set(bf16_set, dtype):
    """attn_set's inputs with the cache K and V as 8-bit slots (models.cache.quantize)."""
    q, k, v, ck, cv, cpos, qpos = bf16_set
    return (q, k, v, quantize(ck, dtype), quantize(cv, dtype), cpos, qpos)


def same_size_copy_8bit(q, k, v, ck, cv, cpos, qpos):
    """A copy of 8-bit K and V, values and scales (read + written)."""
    return jax.tree.map(lambda a: -a if a.dtype == jnp.float32 else jax.lax.bitcast_convert_type(a, jnp.int8) ^ 1, (ck, cv))


def attention_8bit_section(results, copy_bw, smoke, interpret, deadline, timer):
    """results["attention_8bit"]: the decode kernel (T = 1) with int8 and float8_e4m3
    slots against the same call on bfloat16 slots, at KV8_SHAPES x SLOTS. Bytes are
    the ones read: 8-bit values and a float32 scale per slot and head."""
    rows = []
    shapes = [(2, 4, 2, 32)] if smoke else KV8_SHAPES
    slots = [64] if smoke else SLOTS
    for (B, Hq, Hkv, D), S in [(sh, s) for sh in shapes for s in slots]:
        if time.time() - T0 > deadline:
            log("deadline reached: skipping", (B, Hq, Hkv, D, S))
            continue
        plain_bytes = kv_bytes(B, Hkv, D, S)
        U = n_sets(plain_bytes)
        sets = [attn_set(100 * S + u, B, Hq, Hkv, D, S, 1) for u in range(U)]
        row = {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "S": S, "T": 1, "sets": U}
        row["bfloat16"] = time_ops({"ours": ours(interpret=interpret)}, sets, plain_bytes, timer=timer)["ours"]
        for name, dtype in KV8_DTYPES.items():
            nbytes = 2 * B * S * Hkv * (D + 4)
            q_sets = [quantized_set(x, dtype) for x in sets]
            got = time_ops({"ours": ours(interpret=interpret), "copy": same_size_copy_8bit}, q_sets, nbytes, timer=timer)
            row[name] = dict(got["ours"], kv_bytes=nbytes, frac_copy=got["ours"].get("TBps", 0) / copy_bw,
                             copy_same_size=got["copy"])
            if "us" in got["ours"] and "us" in row["bfloat16"]:
                row[name]["speedup_vs_bfloat16"] = row["bfloat16"]["us"] / got["ours"]["us"]
            del q_sets
        rows.append(row)
        log("attn 8-bit", (B, Hq, Hkv, D, S), {k: round(v.get("TBps", 0), 2) for k, v in row.items() if isinstance(v, dict)})
        del sets
    results["attention_8bit"] = rows


PREFILL_CONFIGS = {  # name -> prefill kernel config
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
    """results["prefill"]: one 512-row chunk at the 7B shape over P filled slots, the kernel's configs against blockwise and cuDNN."""
    rows = []
    (B, Hq, Hkv, D, S, T), fills = ((1, 4, 2, 16, 80, 20), [40]) if smoke else ((8, 32, 32, 128, 16386, 512), [4096, 12288])
    for P in fills:
        if time.time() - T0 > deadline:
            log("deadline reached: skipping prefill", P)
            continue
        args = prefill_set(B, Hq, Hkv, D, S, T, P)
        flops = 4 * B * Hq * T * (P + (T + 1) / 2) * D
        row = {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "S": S, "T": T, "P": P, "flops": flops}
        impls = {f"ours_{n}": ours(GpuConfig(prefill=c), interpret=interpret) for n, c in PREFILL_CONFIGS.items()}
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
    """A random cache [L, B, S, Hkv, D] and n_sets sets of T new rows (new K, V [L, B, T, Hkv, D], slots and positions [B, T])."""
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
    """results["cache_update"]: the cache-update kernel against write_rows, donated cache, µs a call."""
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


MATMUL_SHAPES = {"qkv": [(4096, 4096)] * 3, "o": [(4096, 4096)], "gate_up": [(4096, 22016)], "down": [(11008, 4096)],
                 "lm_head": [(4096, 32000)]}  # the 7B decode step's weights [K, N] of one call
MATMUL_SMOKE_SHAPES = {"qkv": [(64, 64), (64, 32), (64, 32)], "down": [(176, 64)]}
MATMUL_ROTATE_BYTES = 600 << 20  # distinct weights per jitted call: over 10x the 50 MB L2


def xla_matmul(x, ws):
    """models/llama.py's decode matmuls: one XLA dot per weight, one row padded to two."""
    if x.shape[0] < 2:
        return [reference_matmul(jnp.pad(x, ((0, 1), (0, 0))), w)[:1] for w in ws]
    return [reference_matmul(x, w) for w in ws]


def matmul_kernel(cfg: MatmulConfig, interpret: bool):
    """The few-row matmul kernel under `cfg`, as an op (x [M, K], [w [K, N_i] ...]) -> [[M, N_i] ...]."""
    return lambda x, ws: matmul_gpu(x, ws, interpret=interpret, config=cfg)


def weight_sets(mats, M, n, seed=0):
    """n sets (x [M, K], [w [K, N_i] ...]): the same x, distinct weights (shapes `mats`)."""
    key = jax.random.key(seed)
    x = rand(jax.random.fold_in(key, 0), (M, mats[0][0]))
    return [(x, [rand(jax.random.fold_in(key, 8 * i + j + 1), s) * 0.02 for j, s in enumerate(mats)]) for i in range(n)]


def matmul_correctness(results, smoke, interpret):
    """The few-row matmul (its plan and two other configs) against the fp32 reference on
    fresh inputs (aligned and ragged shapes, 1..64 rows, one or several weights), and
    q/k/v + RoPE against its XLA reference; appended to results["correctness"]."""
    configs = [MatmulConfig(), MatmulConfig(block_n=32, block_k=128, splits=3), MatmulConfig(block_n=128, splits=1)]
    cases = [(1, 64, (48,)), (5, 200, (130, 30)), (16, 576, (192,)), (64, 96, (40, 40, 24))] if smoke else \
        [(1, 4096, (4096,)), (8, 4096, (4096, 4096, 4096)), (9, 11008, (4096,)), (16, 576, (576, 192, 192)),
         (3, 1000, (777,)), (64, 4096, (22016,))]
    checks = []
    for i, (M, K, Ns) in enumerate(cases):
        for cfg in configs:
            name = f"matmul M{M} K{K} N{list(Ns)} {cfg}"
            try:
                x = rand(jax.random.key(100 + i), (M, K))
                ws = [rand(jax.random.key(200 + 8 * i + j), (K, N)) for j, N in enumerate(Ns)]
                got = jax.jit(matmul_kernel(cfg, interpret))(x, ws)
                refs = [reference_matmul(x.astype(jnp.float32), w.astype(jnp.float32)) for w in ws]
                err = max(max_rel_err(g, r) for g, r in zip(got, refs))
                e = {"case": name, "rel_err": err, "ok": all(bool(jnp.isfinite(g).all()) for g in got) and err < 1e-2}
            except Exception:
                e = {"case": name, "ok": False, "error": traceback.format_exc()[-2000:]}
            checks.append(e)
    for i, (M, E, D, heads, bias) in enumerate([(4, 64, 32, (4, 2, 2), True)] if smoke else
                                               [(8, 4096, 128, (32, 32, 32), False), (3, 576, 64, (9, 3, 3), True)]):
        name = f"qkv_rope M{M} E{E} D{D} heads{heads} bias={bias}"
        try:
            ks = jax.random.split(jax.random.key(300 + i), 8)
            x = rand(ks[0], (M, E))
            ws = [rand(ks[2 + j], (E, h * D)) * 0.02 for j, h in enumerate(heads)]
            bs = [rand(ks[5 + j], (h * D,)) if bias else None for j, h in enumerate(heads)]
            cos, sin = rope_tables(jnp.arange(M) * 97, 1.0 / (10000 ** (jnp.arange(0, D, 2) / D)))
            got = jax.jit(lambda *a: qkv_rope_gpu(*a, head_dim=D, interpret=interpret))(x, ws, bs, cos, sin)
            want = reference_qkv_rope(x, ws, bs, cos, sin, head_dim=D)
            err = max(max_rel_err(g.astype(jnp.float32), w.astype(jnp.float32)) for g, w in zip(got, want))
            e = {"case": name, "rel_err": err, "ok": err < 2e-2}
        except Exception:
            e = {"case": name, "ok": False, "error": traceback.format_exc()[-2000:]}
        checks.append(e)
    for e in checks:
        log("check", "OK  " if e["ok"] else "FAIL", e["case"], e.get("rel_err", e.get("error", "")))
    results.setdefault("correctness", []).extend(checks)
    return all(e["ok"] for e in checks)


def max_rel_err(got, ref):
    """Largest absolute error over the reference's largest magnitude."""
    return float(jnp.max(jnp.abs(got - ref)) / (jnp.max(jnp.abs(ref)) + 1e-30))


def matmul_section(results, rows, smoke, interpret, deadline, timer):
    """XLA's decode matmuls against the few-row kernel's plan at each shape of
    MATMUL_SHAPES and each M in rows: results["matmul"], a row {shape, K, N, M, plan,
    xla: {us, TBps}, kernel: {us, TBps}} each (weight bytes / time)."""
    from adore_jax.kernels.matmul_gpu import plan as matmul_plan

    out = []
    for name, mats in (MATMUL_SMOKE_SHAPES if smoke else MATMUL_SHAPES).items():
        for M in rows:
            if time.time() - T0 > deadline:
                log("deadline reached: skipping matmul", name, M)
                continue
            K, N = mats[0][0], sum(n for _, n in mats)
            n = 2 if smoke else max(2, min(32, math.ceil(MATMUL_ROTATE_BYTES / sum(2 * k * n for k, n in mats))))
            sets = weight_sets(mats, M, n)
            row = {"shape": name, "K": K, "N": N, "M": M, "plan": matmul_plan(M, K, N)}
            nbytes = sum(w.size * w.dtype.itemsize for w in sets[0][1])
            row.update({k: v for k, v in time_ops({"xla": xla_matmul, "kernel": matmul_kernel(MatmulConfig(), interpret)},
                                                  sets, nbytes, timer).items()})
            out.append(row)
            log("matmul", name, M, {k: round(row[k]["TBps"], 2) for k in ("xla", "kernel") if "TBps" in row[k]},
                {k: row[k]["error"][-300:] for k in ("xla", "kernel") if "error" in row[k]})
            del sets
    results["matmul"] = out


def table(results, copy_bw):
    """The run's short table (text): attention, stats, cache update, prefill, matmul, the device check."""
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
    if results.get("attention_8bit"):
        lines.append("8-bit slots, T = 1: TB/s of the bytes read (values + scales), %copy, speedup over bfloat16 slots")
        for r in results["attention_8bit"]:
            cells = []
            for name in KV8_DTYPES:
                v = r.get(name, {})
                cells.append(f"{name} {v['TBps']:.2f} {100 * v['frac_copy']:.0f}% x{v.get('speedup_vs_bfloat16', float('nan')):.2f}"
                             if "TBps" in v else f"{name} err")
            lines.append(f"{'%d,%d,%d,%d' % (r['B'], r['Hq'], r['Hkv'], r['D']):>13} {r['S']:>5} | " + " | ".join(cells))
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
    if results.get("matmul"):
        lines.append("decode matmuls, weight TB/s (us): XLA's matmul against the few-row kernel")
        lines.append(f"{'shape':>8} {'K':>6} {'N':>6} {'M':>3} | {'xla':>13} {'kernel':>13} {'xla/kernel time':>15}")
        for r in results["matmul"]:
            a, b = r["xla"], r["kernel"]
            if "us" not in a or "us" not in b:
                lines.append(f"{r['shape']:>8} {r['K']:>6} {r['N']:>6} {r['M']:>3} | err")
                continue
            lines.append(f"{r['shape']:>8} {r['K']:>6} {r['N']:>6} {r['M']:>3} | {a['TBps']:6.2f}({a['us']:5.1f}) "
                         f"{b['TBps']:6.2f}({b['us']:5.1f}) {a['us'] / b['us']:15.2f}")
    ok = results.get("correctness_ok")
    lines.append(f"correctness on device: {'not checked' if ok is None else 'PASS' if ok else 'FAIL'}")
    return "\n".join(lines)


def plot(results, path, copy_bw):
    """K+V TB/s against slots S, one panel per attention shape (ours at T = 1 and 9,
    cuDNN, XLA's reference, a copy of the same bytes; the large copy dashed), and a
    panel of the decode matmuls' weight TB/s when the run has them. Nothing is
    written when the run has neither."""
    from matplotlib.ticker import NullLocator

    from eval.common import new_figure

    shapes = sorted({(r["B"], r["Hq"], r["Hkv"], r["D"]) for r in results.get("attention", [])})
    matmul = [r for r in results.get("matmul", []) if "TBps" in r["xla"] and "TBps" in r["kernel"]]
    panels = len(shapes) + (1 if matmul else 0)
    if not panels:
        return
    fig, axes = new_figure(4.0 * panels, 3.4, ncols=panels)
    axes = axes if panels > 1 else [axes]
    lines = (("ours", 1, "ours T=1", "C0", "-"), ("ours", 9, "ours T=9", "C0", "--"), ("cudnn", 1, "cuDNN T=1", "C1", "-"),
             ("xla_ref", 1, "XLA ref T=1", "C2", ":"), ("copy_same_size", 1, "copy, same bytes", "grey", "-"))
    for ax, shape in zip(axes, shapes):
        rows = [r for r in results["attention"] if (r["B"], r["Hq"], r["Hkv"], r["D"]) == shape]
        for name, T, label, color, style in lines:
            pts = sorted((r["S"], r[name]["TBps"] * (2 if name == "copy_same_size" else 1)) for r in rows
                         if r["T"] == T and isinstance(r.get(name), dict) and "TBps" in r[name])
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, linestyle=style, label=label)
        ax.axhline(copy_bw, color="grey", linestyle="--", linewidth=0.8, label=f"copy {copy_bw:.2f} TB/s")
        ax.set(xscale="log", xlabel="cache slots S", ylabel="K+V TB/s", ylim=(0, None),
               title="B,Hq,Hkv,D = %d,%d,%d,%d" % shape)
        ax.set_xticks(sorted({r["S"] for r in rows}), [str(r) for r in sorted({r["S"] for r in rows})])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    if matmul:
        ax = axes[-1]
        labels = [f"{r['shape']} M={r['M']}" for r in matmul]
        x = np.arange(len(matmul))
        ax.bar(x - 0.2, [r["xla"]["TBps"] for r in matmul], 0.4, label="XLA", color="C2")
        ax.bar(x + 0.2, [r["kernel"]["TBps"] for r in matmul], 0.4, label="few-row kernel", color="C0")
        ax.axhline(copy_bw, color="grey", linestyle="--", linewidth=0.8, label=f"copy {copy_bw:.2f} TB/s")
        ax.set_xticks(x, labels, rotation=60, fontsize=6)
        ax.set(ylabel="weight TB/s", title="decode matmuls")
        ax.legend(fontsize=6)
    fig.savefig(path)


def write_report(results, out, copy_bw):
    """The table (printed, and OUT's name with .txt) and the plot (.png) beside the JSON file `out`."""
    text = table(results, copy_bw)
    stem = os.path.splitext(out)[0]
    with open(stem + ".txt", "w") as f:
        f.write(text + "\n")
    plot(results, stem + ".png", copy_bw)
    print("\n" + text, flush=True)


SECTIONS = ("copy", "check", "attn", "update", "prefill", "matmul", "attn8")
DEFAULT_SECTIONS = SECTIONS[:-1]  # attn8 (8-bit slots) when asked for


def main(argv=None):
    """`python -m eval.bench_kernels`: run the sections and write the JSON, the table and the plot (see the module's docstring)."""
    global T0
    T0 = time.time()  # --deadline counts from here, not from the import (a test suite imports it early)
    ap = argparse.ArgumentParser(prog="python -m eval.bench_kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/kernels/bench_kernels.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; interpret mode on CPU (checks the script only)")
    ap.add_argument("--deadline", type=float, default=480.0, help="seconds after which remaining cases are skipped")
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                    help=f"comma-separated, of {','.join(SECTIONS)} (default {','.join(DEFAULT_SECTIONS)})")
    ap.add_argument("--check-cases", type=int, default=7, help="attention cases of the device check")
    ap.add_argument("--matmul-rows", default="1,8,64", help="rows M of the matmul section (comma-separated)")
    ap.add_argument("--timer", choices=("device", "wall"), default="device",
                    help="device: GPU-busy time from a profiler trace; wall: the host's clock (on CPU: wall)")
    ap.add_argument("--from-json", metavar="JSON", help="write the table and plot of an earlier run's JSON; run nothing")
    args = ap.parse_args(argv)
    secs = args.sections.split(",")
    unknown = [s for s in secs if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown --sections {unknown}; known: {','.join(SECTIONS)}")
    try:
        matmul_rows = [int(m) for m in args.matmul_rows.split(",")]
    except ValueError:
        ap.error(f"--matmul-rows must be comma-separated integers, got {args.matmul_rows!r}")
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        copy_bw = results.get("copy", {}).get("best_copy_TBps", 3.84)
        write_report(results, args.from_json, copy_bw)
        return
    interpret = jax.default_backend() == "cpu"
    if interpret and not args.smoke:
        sys.exit("no GPU: run with --smoke on CPU (interpret mode), or on the GPU machine")
    timer = "wall" if interpret else args.timer
    dev = jax.devices()[0]
    results = {"device": str(dev), "device_kind": getattr(dev, "device_kind", "?"), "jax": jax.__version__,
               "cores": getattr(dev, "core_count", None), "args": vars(args), "timer": timer,
               "command": " ".join(["python -m eval.bench_kernels", *(sys.argv[1:] if argv is None else argv)])}
    log("device", results["device_kind"], "jax", jax.__version__, "SMs", results["cores"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)

    copy_bw_tb = copy_bandwidth(results, args.smoke) if "copy" in secs else 3.84  # TB/s
    save()
    if "check" in secs:
        ok = correctness(results, args.smoke, interpret, args.check_cases)
        results["correctness_ok"] = matmul_correctness(results, args.smoke, interpret) and ok
        save()
    if "attn" in secs:
        attention_section(results, copy_bw_tb, args.smoke, interpret, args.deadline * 0.7, timer)
        save()
    if "update" in secs:
        update_section(results, args.smoke, interpret, args.deadline * 0.77, timer)
        save()
    if "prefill" in secs:
        prefill_section(results, args.smoke, interpret, args.deadline * 0.85, timer)
        save()
    if "matmul" in secs:
        matmul_section(results, matmul_rows, args.smoke, interpret, args.deadline, timer)
        save()
    if "attn8" in secs:
        attention_8bit_section(results, copy_bw_tb, args.smoke, interpret, args.deadline, timer)
        save()
    results["wall_s"] = time.time() - T0
    save()
    write_report(results, args.out, copy_bw_tb)


if __name__ == "__main__":
    main()
