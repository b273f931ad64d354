# Session 7 (CPU; not project code): the large buffers of the 7B prefill program at batch B, context C, compiled on the
# CPU from abstract weights (nothing allocated). The CPU computes in f32 where the GPU keeps bf16, so sizes differ;
# shapes tell what is held.   PYTHONPATH=. python3 docs/results/throughput/session7/prefill_buffers.py 64 2048 adore
# (Session 8: an optional fourth argument G prefills the batch in groups of G sequences, EngineConfig.prefill_group.)
import collections
import re
import sys

import jax
import jax.numpy as jnp

from adore_jax import engine
from adore_jax.policies import build_policy
from adore_jax.sampling import SamplingParams
from models import place_params
from models.llama import init_params
from models.shapes import SHAPES

cfg = SHAPES["llama2-7b"]
B, ctx, policy = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
group = int(sys.argv[4]) if len(sys.argv) > 4 else None
params = jax.eval_shape(lambda: place_params(cfg, init_params(cfg, jax.random.key(0), jnp.bfloat16)))
pol, pp, _ = build_policy(policy, cfg, None if policy == "full" else 1024)
ec = engine.EngineConfig(max_new_tokens=2, prompt_len=ctx, chunk=512, policy=pol, prefill_group=group)
toks, lens = jax.ShapeDtypeStruct((B, ctx), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32)
run = engine._prefill_jit.lower(params, pp, cfg, ec, toks, lens, jax.random.key(0), SamplingParams().validate()).compile()
m = run.memory_analysis()
print(f"arguments {m.argument_size_in_bytes / 1e9:.1f} GB, outputs {m.output_size_in_bytes / 1e9:.1f} GB, "
      f"temporaries {m.temp_size_in_bytes / 1e9:.1f} GB")
ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "pred": 1}
big = collections.Counter()
for line in run.as_text().splitlines():
    got = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (\w+)\[([\d,]+)\]", line)
    if got and got.group(1) in ITEMSIZE:
        n = ITEMSIZE[got.group(1)]
        for d in got.group(2).split(","):
            n *= int(d)
        if n > 1e9:
            big[f"{got.group(1)}[{got.group(2)}]"] = n
for shape, n in big.most_common(12):
    print(f"{n / 1e9:7.2f} GB {shape}")
