"""Session 9 experiment: decode steps with the few-row kernels (the default on
GPU) against XLA's matmul (the xla-matmul variant), at the 7B shape, 16K
context, the batches given (full attention only up to B = 8: 64 does not fit).
eval.throughput's timing (16 steps a chunk, median of 5). One H200.

    PYTHONPATH=. python3 docs/results/throughput/session9/matmul_ab.py OUT.json [BATCHES, default 1,64]
"""
import json
import sys

import jax

from adore_jax.kernels import get_attention_fn, get_cache_update_fn, get_matmul_fn
from eval.throughput import Row, measure_row, random_params
from models.shapes import SHAPES

cfg = SHAPES["llama2-7b"]
params = random_params(cfg, jax.numpy.bfloat16)
kernels = (get_attention_fn(), get_cache_update_fn(), get_matmul_fn())
batches = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "1,64").split(",")]
rows = [Row("llama2-7b", p, b, 16384, variant=v) for b in batches for p in ("adore", "full") if p == "adore" or b <= 8
        for v in ("", "xla-matmul")]
out = []
for row in rows:
    r = {"name": row.name, "batch": row.batch, **measure_row(cfg, params, row, 16, 5, kernels)}
    out.append(r)
    json.dump(out, open(sys.argv[1], "w"), indent=1)
    print(f"{row.name:>40} B={row.batch:<3} {r['step_ms']:7.3f} ms/step {r['tokens_per_s']:8.0f} tokens/s", flush=True)
