"""Session 11 experiment: decode steps at the SmolLM2-135M shape (9 query heads,
3 KV heads, D = 64), 8K context, B = 64, ADORE m = 1024 with R = 8 (T = 9: 27
query rows a program, the case session 11's attention plan changed) and R = 0
(T = 1: a plan it left alone, the control), with the attention kernel under
session 11's plan and under the plan before it, given as explicit settings
(128-slot blocks, 2 splits). Rows alternate, twice. eval.throughput's timing
(16 steps a chunk, median of 5). One H200.

    PYTHONPATH=. python3 docs/results/throughput/session11/attn_ab_smollm2.py OUT.json
"""
import json
import sys

import jax

from adore_jax.kernels import GpuConfig, get_attention_fn, get_cache_update_fn, get_matmul_fn
from adore_jax.kernels.attention_gpu import plan
from eval.throughput import Row, measure_row, random_params
from models.shapes import SHAPES

cfg = SHAPES["smollm2-135m"]
params = random_params(cfg, jax.numpy.bfloat16)
variants = {"session11": GpuConfig(), "before": GpuConfig(block_s=128, splits=2)}
print("plans at S=1024, 32 rows:", {n: plan(64, 3, 1024, 64, c, 32) for n, c in variants.items()})
out = []
for rep in range(2):
    for rebuild in (8, 0):
        for name, gcfg in variants.items():
            kernels = (get_attention_fn("pallas_gpu", gpu_config=gcfg), get_cache_update_fn(), get_matmul_fn())
            row = Row("smollm2-135m", "adore", 64, 8192, rebuild=rebuild)
            r = {"name": row.name, "attention": name, "repeat": rep, **measure_row(cfg, params, row, 16, 5, kernels)}
            out.append(r)
            json.dump(out, open(sys.argv[1], "w"), indent=1)
            print(f"{row.name:>20} {name:>10} rep {rep} {r['step_ms']:7.3f} ms/step", flush=True)
