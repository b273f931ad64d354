"""One-off experiment (session 5): decode matmuls at the 7B shape, bandwidth by rows.

Each timed call runs L weight matrices in turn (distinct arrays, as the unstacked
model holds them, 32 x the matrix > L2), x [B, K] @ W [K, N] in bf16 with fp32
accumulation like models/llama.py _dense. Reports weight bytes / time in TB/s.
Run once per XLA_FLAGS set (argv[1] names the set); prints JSON lines; the
driver (matmul_driver.py) runs the sets and prints the table.
"""
import json, math, os, sys, time
import jax, jax.numpy as jnp

name = sys.argv[1]
L = int(os.environ.get("LAYERS", 32))
SHAPES = {"qkv_sep": [(4096, 4096)] * 3, "qkv_fused": [(4096, 12288)],
          "gate_up_sep": [(4096, 11008)] * 2, "gate_up_fused": [(4096, 22016)], "gate_up_e2f": [(4096, 2, 11008)],
          "down": [(11008, 4096)]}
SHAPES = {k: v for k, v in SHAPES.items() if k in os.environ.get("KINDS", ",".join(SHAPES)).split(",")}
PAD = int(os.environ.get("PAD", 0))  # pad x to this many rows (zeros), drop them after
SPLITK = int(os.environ.get("SPLITK", 1))  # (session 7) s > 1: s partial products over K / s each, summed in fp32
if os.environ.get("TINY"):
    SHAPES = {k: [tuple(max(2, d // 64) for d in s) for s in v] for k, v in SHAPES.items()}
BATCHES = [int(b) for b in os.environ.get("BATCHES", "1,8,16,64").split(",")]


def run(kind, B):
    mats = SHAPES[kind]
    key = jax.random.key(0)
    ws = [[jax.random.normal(jax.random.fold_in(key, i * 8 + j), s, jnp.bfloat16) * 0.02 for j, s in enumerate(mats)]
          for i in range(L)]
    x = jax.random.normal(key, (B, mats[0][0]), jnp.bfloat16)

    @jax.jit
    def f(x, ws):
        acc = jnp.zeros((B,), jnp.float32)
        for layer in ws:
            for w in layer:
                xp = jnp.pad(x, ((0, max(PAD - B, 0)), (0, 0))) if PAD else x
                if SPLITK > 1:  # [B, s, K/s] x [s, K/s, N] -> [s, B, N]: s times the output tiles, then a sum
                    ws_ = w.reshape(SPLITK, w.shape[0] // SPLITK, -1)
                    xs = xp.reshape(xp.shape[0], SPLITK, -1)
                    y = jnp.einsum("bsk,skn->sbn", xs, ws_, preferred_element_type=jnp.float32).sum(0)[:B]
                else:
                    y = jnp.einsum("be,e...->b...", xp, w, preferred_element_type=jnp.float32)[:B]
                acc = acc + y.reshape(B, -1)[:, 0]
            x = x + acc[:, None].astype(x.dtype) * 1e-6  # a dependence chain, like the layers
        return acc

    jax.block_until_ready(f(x, ws))
    ts = []
    for _ in range(5):  # 10 calls back to back (dispatch hidden), median of 5
        t = time.perf_counter()
        for _ in range(10):
            out = f(x, ws)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / 10)
    t = sorted(ts)[2]
    nbytes = L * sum(math.prod(s) for s in mats) * 2
    return {"set": name, "kind": kind, "B": B, "splitk": SPLITK, "us_per_layer": t / L * 1e6, "tb_s": nbytes / t / 1e12}


for kind in SHAPES:
    for B in BATCHES:
        print(json.dumps(run(kind, B)), flush=True)
