"""Session 10 experiment: the decode attention kernel at the shapes of ADORE's
7B step (B=8, Hq=Hkv=32, D=128, S=1024 slots, T=1) and at (8,32,8,128), against
a pure read of the same K/V bytes in XLA (a sum over the slots: reads every byte
once, writes almost nothing), cuDNN and XLA's reference, with launch settings
swept. Each op timed as in eval/bench_kernels.py (inputs rotated past L2, back
to back in one jit, median of 5). K+V bytes / time in TB/s. One H200.

    PYTHONPATH=. python3 docs/results/kernels_session10/attn_one_shape.py OUT.json [plan[:S,S...]]

With `plan`, the split count alone (the default plan, 2 splits, and the plan
of the time rounding up 3 programs per SM instead of 4) at every shape of eval/bench_kernels.py
(SHAPES x SLOTS x TS), with cuDNN (attn_plan.json); with `plan:8192,16384`, at
those slot counts and T = 1 (attn_plan_long.json). With `stacked`, the same three
settings at (8,32,32,128), T = 1, over a cache of L layers read at its last layer
(as in the model), L in {1, 4}, S in {16384, 16498}: a cache over 4 GB switches
Pallas's pointer offsets to 64 bits (attn_stacked.json). With `tail`, the default
(3 splits), 2 and 4 splits at (8,32,32,128), T = 1, S in {16384, 16448, 16498}: 16448 is a whole
number of 64-slot blocks that no split count divides, 16498 is not (attn_tail.json).
With `waves` (after the kernel change: one loop body for every block, and the
plan's splits rounded down to whole waves): first a check of the new default
against XLA's reference on the device, then the new default against the same
kernel under the old plan (splits rounded up) and cuDNN (attn_waves.json).

All modes but `waves` ran before that change, so their `default` is the kernel
with a separate tail-block path and the plan rounding up.
"""
import json
import sys

import jax
import jax.numpy as jnp

from adore_jax.kernels import GpuConfig, sparse_attention_gpu
from adore_jax.kernels.common import num_sms
from eval.bench_kernels import SHAPES, SLOTS, TS, attn_set, cudnn, kv_bytes, n_sets, ours, time_ops, xla_ref


def pure_read(q, k, v, ck, cv, cpos, qpos):
    """Every K/V byte read once, by XLA (an fp32 sum over the slots)."""
    return jnp.sum(ck, axis=1, dtype=jnp.float32) + jnp.sum(cv, axis=1, dtype=jnp.float32)


def rounded_up(per_sm):
    """The plan before session 10's change, as explicit splits for one case:
    ceil(per_sm x SMs / (B * Hkv)), at least two blocks a split."""
    def cfg(B, Hkv, S, D):
        bs = 64 if D >= 128 else 128
        bs = max(16, min(bs, (1 << S.bit_length()) // 2))
        return GpuConfig(splits=max(1, min(-(-per_sm * num_sms() // (B * Hkv)), max(1, -(-S // bs) // 2))))

    return cfg


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
if sys.argv[2:] and sys.argv[2].startswith("plan"):
    CONFIGS = {"default": GpuConfig(), "splits2": GpuConfig(splits=2), "target3": rounded_up(3)}
    slots = [int(x) for x in sys.argv[2][5:].split(",")] if ":" in sys.argv[2] else SLOTS
    cases = [(*sh, S, T) for S in slots for sh in SHAPES for T in (TS if slots is SLOTS else [1])]
    refs = {"cudnn": cudnn}
layers = {}  # case -> L, for `stacked`
if sys.argv[2:] == ["stacked"]:
    CONFIGS = {"default": GpuConfig(), "splits2": GpuConfig(splits=2), "target3": rounded_up(3)}
    cases = [(8, 32, 32, 128, S, 1) for S in (16384, 16498)] * 2
    layers = {i: (1 if i < 2 else 4) for i in range(4)}
    refs = {}
if sys.argv[2:] == ["tail"]:  # the default plan gives 3 splits here; each case twice
    CONFIGS = {"default": GpuConfig(), "splits2": GpuConfig(splits=2), "splits4": GpuConfig(splits=4)}
    cases = [(8, 32, 32, 128, S, 1) for S in (16384, 16448, 16498)] * 2
    refs = {}



if sys.argv[2:] == ["waves"]:
    for B, Hq, Hkv, D, S, T, stats in [(8, 32, 32, 128, 16498, 1, False), (8, 32, 8, 128, 1000, 9, True),
                                        (32, 9, 3, 64, 4100, 1, True), (2, 8, 2, 64, 9, 2, True)]:
        a = attn_set(1, B, Hq, Hkv, D, S, T)
        got, ref = jax.jit(ours(GpuConfig(), with_stats=stats))(*a), jax.jit(xla_ref(stats))(*a)
        errs = [float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in
                zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
        print("check", (B, Hq, Hkv, D, S, T), "stats" if stats else "", "max abs err", errs, flush=True)
    cases = [(8, 32, 32, 128, 1024, 1), (8, 32, 32, 128, 16384, 1), (8, 32, 32, 128, 16498, 1),
             (8, 32, 8, 128, 4096, 1), (8, 32, 8, 128, 4096, 9), (8, 32, 8, 128, 16384, 1),
             (32, 9, 3, 64, 1024, 1), (32, 9, 3, 64, 8192, 1), (32, 9, 3, 64, 8192, 9)]
    CONFIGS = {"default": GpuConfig(), "old_plan": rounded_up(4)}
    refs = {"cudnn": cudnn}


def stacked_set(s, L):
    """attn_set's cache repeated over L layers: [L, B, S, Hkv, D]."""
    q, k, v, ck, cv, cpos, qpos = s
    return (q, k, v, jnp.broadcast_to(ck, (L, *ck.shape)) + 0, jnp.broadcast_to(cv, (L, *cv.shape)) + 0, cpos, qpos)


def ours_at_last_layer(cfg, L):
    def f(q, k, v, ck, cv, cpos, qpos):
        return sparse_attention_gpu(q, k, v, ck, cv, cpos, qpos, layer=jnp.int32(L - 1), config=cfg).out

    return f


out = []
for i, (B, Hq, Hkv, D, S, T) in enumerate(cases):
    nbytes = kv_bytes(B, Hkv, D, S)
    sets = [attn_set(700 + u, B, Hq, Hkv, D, S, T) for u in range(n_sets(nbytes))]
    configs = {n: c if isinstance(c, GpuConfig) else c(B, Hkv, S, D) for n, c in CONFIGS.items()}
    impls = {**refs, **{n: ours(c) for n, c in configs.items()}}
    row = {"shape": [B, Hq, Hkv, D, S, T]}
    if i in layers:
        sets = [stacked_set(st, layers[i]) for st in sets]
        impls = {n: ours_at_last_layer(c, layers[i]) for n, c in configs.items()}
        row["layers"] = layers[i]
    row.update(time_ops(impls, sets, nbytes, configs))
    out.append(row)
    json.dump(out, open(sys.argv[1], "w"), indent=1)
    del sets
names = [*refs, *CONFIGS]
print("K+V TB/s (B,Hq,Hkv,D,S,T):", " ".join(names))
for r in out:
    print(r["shape"], r.get("layers", ""), " ".join(f"{r[n]['TBps']:.2f}" if "TBps" in r.get(n, {}) else "err" for n in names))
