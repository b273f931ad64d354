# Sessions 6-7 experiment (not project code): how the decode loop's control flow costs time on the GPU.
# Each row is timed in four loop forms in one process. Three of them step with a lax.cond choosing ADORE R=8/8's
# rebuild step or its 1-row step (how the engine stepped until session 7):
#   cond   -- a scan whose steps also sit under a lax.cond (a row still live, steps left): the engine's decode chunk until session 6;
#   plain  -- the same scan with the steps unconditional;
#   while  -- a lax.while_loop over the steps: the engine's decode chunk early in session 7, and its generate;
# and the engine's decode chunk as it is (engine._decode_chunk_jit: periods of one rebuild step and k - 1 1-row steps,
# no conditional). Each set runs again in child processes with other XLA command-buffer settings (--flag-sets):
# off, or with conditionals and while loops captured too (XLA's defaults leave CONDITIONAL and WHILE out).
#   python3 docs/results/throughput/session6/cond_experiment.py --out cond.json [--shapes smollm2-135m,llama2-7b]
#       [--flag-sets default] [--hlo DIR]   (DIR: every form's optimized HLO, for python -m eval.hlo_copies)
# Session 7 ran the first three forms (its results: docs/results/throughput/session7/cond_smollm2.json).
import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

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


def active(s, n):
    return (s.step < n) & ~jnp.all(s.done)


def old_step(params, pp, cfg, ec, s, sp):
    """A decode step with the rebuild chosen by a lax.cond (due every k-th step of the policy)."""
    k = ec.policy.period
    if k == 1:
        return engine._decode_step(params, pp, cfg, ec, s, sp)
    return jax.lax.cond(s.policy_state.step % k == 0, lambda s: engine._decode_step(params, pp, cfg, ec, s, sp, True),
                        lambda s: engine._decode_step(params, pp, cfg, ec, s, sp, False), s)


@functools.partial(jax.jit, static_argnums=(2, 3, 6), donate_argnums=(4,))
def chunk_cond(params, pp, cfg, ec, s, sp, n):
    def body(s, _):
        step = lambda s: old_step(params, pp, cfg, ec, s, sp)
        return jax.lax.cond(active(s, ec.max_new_tokens), step, lambda s: s, s), None

    return jax.lax.scan(body, s, None, length=n)[0]


@functools.partial(jax.jit, static_argnums=(2, 3, 6), donate_argnums=(4,))
def chunk_plain(params, pp, cfg, ec, s, sp, n):
    body = lambda s, _: (old_step(params, pp, cfg, ec, s, sp), None)
    return jax.lax.scan(body, s, None, length=n)[0]


@functools.partial(jax.jit, static_argnums=(2, 3, 6), donate_argnums=(4,))
def chunk_while(params, pp, cfg, ec, s, sp, n):
    end = s.step + n
    return jax.lax.while_loop(lambda s: (s.step < end) & active(s, ec.max_new_tokens),
                              lambda s: old_step(params, pp, cfg, ec, s, sp), s)


def time_form(fn, params, pp, cfg, ec, s, sp, n, repeats, hlo_path=None):
    """(ms per step, the compiled program's temp bytes in GB)."""
    run = fn.lower(params, pp, cfg, ec, s, sp, n).compile()
    if hlo_path is not None:
        hlo_path.parent.mkdir(parents=True, exist_ok=True)
        hlo_path.write_text(run.as_text())
    temp = run.memory_analysis().temp_size_in_bytes / 1e9
    return time_decode_chunks(run, params, pp, s, sp, n, repeats)[0] * 1e3, temp


def measure(shapes, steps, repeats, hlo_dir=None):
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
            for name, fn in FORM_FNS.items():
                s = synthetic_state(params, pp, cfg, ec, B, ctx, jax.random.key(0))
                hlo = hlo_dir and Path(hlo_dir) / f"{shape}_{policy}_r{R}_k{k}_{name}.hlo.txt"
                row[f"{name}_ms"], row[f"{name}_temp_gb"] = time_form(fn, params, pp, cfg, ec, s, sp, steps, repeats, hlo)
            print(json.dumps(row), flush=True)
            out.append(row)
        del params
    return out


FLAG_SETS = {  # name: --xla_gpu_enable_command_buffer value (None: XLA's default)
    "default": None,
    "no_command_buffers": "",
    "cond_while_captured": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,CONDITIONAL,WHILE",
}
FORM_FNS = {"cond": chunk_cond, "plain": chunk_plain, "while": chunk_while, "engine": engine._decode_chunk_jit}
FORMS = tuple(FORM_FNS)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="smollm2-135m,llama2-7b")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--flag-sets", default=",".join(FLAG_SETS), help="comma-separated names of FLAG_SETS")
    p.add_argument("--hlo", help="write each form's optimized HLO under HLO/<flag set>/")
    p.add_argument("--child", action="store_true", help="(internal) print rows as JSON and stop")
    a = p.parse_args()
    if a.child:
        print("ROWS " + json.dumps(measure(a.shapes.split(","), a.steps, a.repeats, a.hlo)))
        return
    rows = None
    sets = {n: FLAG_SETS[n] for n in a.flag_sets.split(",")}
    for name, value in sets.items():  # each in its own process: XLA reads its flags once
        env = dict(os.environ)
        if value is not None:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_gpu_enable_command_buffer={value}").strip()
        child = subprocess.run([sys.executable, __file__, "--out", a.out, "--shapes", a.shapes, "--steps", str(a.steps),
                                "--repeats", str(a.repeats), "--child", *(["--hlo", f"{a.hlo}/{name}"] if a.hlo else [])],
                               env=env, capture_output=True, text=True)
        got = next((json.loads(l[5:]) for l in child.stdout.splitlines() if l.startswith("ROWS ")), None)
        if got is None:
            print(f"{name}: failed\n" + child.stderr[-3000:], file=sys.stderr)
            continue
        rows = rows or [{k: v for k, v in r.items() if not k.endswith(("_ms", "_gb"))} for r in got]
        for r, g in zip(rows, got):
            r.update({f"{f}_{name}_{u}": g[f"{f}_{u}"] for f in FORMS for u in ("ms", "temp_gb")})
    rows = rows or []
    json.dump({"device": str(jax.devices()[0]), "flag_sets": FLAG_SETS, "rows": rows}, open(a.out, "w"), indent=2)
    cols = [f"{f}_{n}_ms" for n in sets for f in FORMS]
    print("ms per step | " + " | ".join(c[:-3] for c in cols))
    for r in rows:
        name = r["policy"] + (f" R={r['rebuild']}/{r['rebuild_every']}" if r["rebuild"] else "")
        print(f"{r['shape']} B={r['batch']} {r['context']} {name} | " + " | ".join(f"{r.get(c, float('nan')):.3f}" for c in cols))


if __name__ == "__main__":
    main()
