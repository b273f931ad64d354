# Session 6 experiment (for the next GPU call; not project code): do the conditionals in the decode loop cost time?
# The decode chunk (engine._decode_chunk_jit, what eval.throughput times) puts every step under a lax.cond (_active),
# and ADORE R=8/8 adds a second one (rebuild due or not). Each row is timed three ways in one process:
#   cond  -- the engine's chunk as it is;
#   plain -- the same scan with the steps unconditional;
#   while -- a lax.while_loop over the steps (how engine._generate_jit runs them);
# and the whole set again in child processes with XLA's command buffers off (--xla_gpu_enable_command_buffer=), and
# with conditionals and while loops captured too (XLA's defaults leave CONDITIONAL and WHILE out of command buffers,
# so a cond's predicate is read on the host every step).
#   python3 docs/results/throughput/session6/cond_experiment.py --out cond.json [--shapes smollm2-135m,llama2-7b]
import argparse
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from adore_jax import engine
from adore_jax.kernels import get_attention_fn, get_cache_update_fn
from adore_jax.policies import build_policy
from adore_jax.sampling import SamplingParams
from eval.throughput import random_params, synthetic_state, time_decode_chunks
from models.shapes import SHAPES

ROWS = {"smollm2-135m": (8, 8192), "llama2-7b": (8, 16384), "tiny": (2, 256)}
POLICIES = (("full", 0, 1), ("adore", 0, 1), ("adore", 8, 8))


@functools.partial(jax.jit, static_argnums=(2, 3, 6), donate_argnums=(4,))
def chunk_plain(params, pp, cfg, ec, s, sp, n):
    body = lambda s, _: (engine._decode_step(params, pp, cfg, ec, s, sp), None)
    return jax.lax.scan(body, s, None, length=n)[0]


@functools.partial(jax.jit, static_argnums=(2, 3, 6), donate_argnums=(4,))
def chunk_while(params, pp, cfg, ec, s, sp, n):
    end = s.step + n
    return jax.lax.while_loop(lambda s: (s.step < end) & engine._active(s, ec.max_new_tokens),
                              lambda s: engine._decode_step(params, pp, cfg, ec, s, sp), s)


def time_form(fn, params, pp, cfg, ec, s, sp, n, repeats):
    run = fn.lower(params, pp, cfg, ec, s, sp, n).compile()
    return time_decode_chunks(run, params, pp, s, sp, n, repeats)[0] * 1e3


def measure(shapes, steps, repeats):
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    kernels = (get_attention_fn(), get_cache_update_fn())
    sp = SamplingParams().validate()
    out = []
    for shape in shapes:
        cfg, (B, ctx) = SHAPES[shape], ROWS[shape]
        params = random_params(cfg, dtype)
        for policy, R, k in POLICIES:
            pol, pp, _ = build_policy(policy, cfg, None if policy == "full" else 1024, rebuild=R, rebuild_every=k)
            ec = engine.EngineConfig(max_new_tokens=steps * (repeats + 2) + 2, prompt_len=ctx, chunk=512, policy=pol,
                                     attn_fn=kernels[0], cache_update=kernels[1])
            row = {"shape": shape, "batch": B, "context": ctx, "policy": policy, "rebuild": R, "rebuild_every": k}
            for name, fn in (("cond", engine._decode_chunk_jit), ("plain", chunk_plain), ("while", chunk_while)):
                s = synthetic_state(params, pp, cfg, ec, B, ctx, jax.random.key(0))
                row[f"{name}_ms"] = time_form(fn, params, pp, cfg, ec, s, sp, steps, repeats)
            print(json.dumps(row), flush=True)
            out.append(row)
        del params
    return out


FLAG_SETS = {  # name: --xla_gpu_enable_command_buffer value (None: XLA's default)
    "default": None,
    "no_command_buffers": "",
    "cond_while_captured": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,CONDITIONAL,WHILE",
}
FORMS = ("cond", "plain", "while")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="smollm2-135m,llama2-7b")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", action="store_true", help="(internal) print rows as JSON and stop")
    a = p.parse_args()
    if a.child:
        print("ROWS " + json.dumps(measure(a.shapes.split(","), a.steps, a.repeats)))
        return
    rows = None
    for name, value in FLAG_SETS.items():  # each in its own process: XLA reads its flags once
        env = dict(os.environ)
        if value is not None:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_gpu_enable_command_buffer={value}").strip()
        child = subprocess.run([sys.executable, __file__, "--out", a.out, "--shapes", a.shapes, "--steps", str(a.steps),
                                "--repeats", str(a.repeats), "--child"], env=env, capture_output=True, text=True)
        got = next((json.loads(l[5:]) for l in child.stdout.splitlines() if l.startswith("ROWS ")), None)
        if got is None:
            print(f"{name}: failed\n" + child.stderr[-3000:], file=sys.stderr)
            continue
        rows = rows or [{k: v for k, v in r.items() if not k.endswith("_ms")} for r in got]
        for r, g in zip(rows, got):
            r.update({f"{f}_{name}_ms": g[f"{f}_ms"] for f in FORMS})
    rows = rows or []
    json.dump({"device": str(jax.devices()[0]), "flag_sets": FLAG_SETS, "rows": rows}, open(a.out, "w"), indent=2)
    cols = [f"{f}_{n}_ms" for n in FLAG_SETS for f in FORMS]
    print("ms per step | " + " | ".join(c[:-3] for c in cols))
    for r in rows:
        name = r["policy"] + (f" R={r['rebuild']}/{r['rebuild_every']}" if r["rebuild"] else "")
        print(f"{r['shape']} B={r['batch']} {r['context']} {name} | " + " | ".join(f"{r.get(c, float('nan')):.3f}" for c in cols))


if __name__ == "__main__":
    main()
