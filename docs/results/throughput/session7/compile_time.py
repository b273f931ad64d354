# Session 7 (CPU; not project code): seconds to lower and compile `generate` at the SmolLM2 shape with ADORE, for
# rebuild every 8 steps (8 and 11 decode steps: without and with a shorter last period) and every step.
#   PYTHONPATH=. python3 docs/results/throughput/session7/compile_time.py   (before/after: run it in each checkout)
import time

import jax
import jax.numpy as jnp

from adore_jax import engine
from adore_jax.policies import build_policy
from adore_jax.sampling import SamplingParams
from eval.throughput import random_params
from models.shapes import SHAPES

cfg = SHAPES["smollm2-135m"]
params = random_params(cfg, jnp.float32)
toks, lens = jnp.zeros((2, 128), jnp.int32), jnp.full((2,), 100, jnp.int32)
for R, k, n in ((8, 8, 9), (8, 8, 12), (8, 1, 12), (0, 1, 12)):
    pol, pp, _ = build_policy("adore", cfg, 64, rebuild=R, rebuild_every=k)
    ec = engine.EngineConfig(max_new_tokens=n, prompt_len=128, chunk=128, policy=pol)
    t = time.perf_counter()
    engine._generate_jit.lower(params, pp, cfg, ec, toks, lens, jax.random.key(0), SamplingParams().validate()).compile()
    print(f"R={R}/{k} max_new_tokens={n}: compile {time.perf_counter() - t:.1f} s", flush=True)
