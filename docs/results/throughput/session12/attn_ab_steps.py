"""Session 12 experiment: decode steps with session 12's attention plan (programs
of <= 16 query rows: 32-slot blocks x 4 stages at D = 128, 64 x 3 at D = 64,
splits only to about two programs an SM) against the plan before it, given as
explicit settings: llama2-7b, B = 8, 16K context, ADORE (m = 1024) with R = 0
and R = 8 (T = 9, MHA: 9 rows, padded to 16) and full attention (before: 64-slot
blocks, 2 stages, 2 splits); SmolLM2-135M, B = 64, 8K, ADORE R = 0 (before:
128-slot blocks, 2 stages, 2 splits) and R = 8 (27 rows: the same plan under both,
the control). Rows alternate between the plans, twice. eval.throughput's timing
(16 steps a chunk, median of 5). One H200.

    PYTHONPATH=. python3 docs/results/throughput/session12/attn_ab_steps.py OUT.json
"""
import json
import sys

import jax

from adore_jax.kernels import GpuConfig, get_attention_fn, get_cache_update_fn, get_matmul_fn
from eval.throughput import Row, measure_row, random_params
from models.shapes import SHAPES

ROWS = [  # (row, the plan before session 12 at its attention shape)
    (Row("llama2-7b", "adore", 8, 16384), GpuConfig(block_s=64, num_stages=2, splits=2)),
    (Row("llama2-7b", "adore", 8, 16384, rebuild=8), GpuConfig(block_s=64, num_stages=2, splits=2)),
    (Row("llama2-7b", "full", 8, 16384), GpuConfig(block_s=64, num_stages=2, splits=2)),
    (Row("smollm2-135m", "adore", 64, 8192), GpuConfig(block_s=128, num_stages=2, splits=2)),
    (Row("smollm2-135m", "adore", 64, 8192, rebuild=8), GpuConfig()),
]
out = []
for shape in ("llama2-7b", "smollm2-135m"):
    cfg = SHAPES[shape]
    params = random_params(cfg, jax.numpy.bfloat16)
    for rep in range(2):
        for row, before in [r for r in ROWS if r[0].shape == shape]:
            for name, gcfg in (("session12", GpuConfig()), ("before", before)):
                kernels = (get_attention_fn("pallas_gpu", gpu_config=gcfg), get_cache_update_fn(), get_matmul_fn())
                r = {"shape": shape, "name": row.name, "attention": name, "repeat": rep, **measure_row(cfg, params, row, 16, 5, kernels)}
                out.append(r)
                json.dump(out, open(sys.argv[1], "w"), indent=1)
                print(f"{shape:>13} {row.name:>20} {name:>10} rep {rep} {r['step_ms']:7.3f} ms/step", flush=True)
    del params
print("\nms per step (two alternating rounds)")
for row, _ in ROWS:
    cells = {n: [r["step_ms"] for r in out if (r["shape"], r["name"]) == (row.shape, row.name) and r["attention"] == n]
             for n in ("session12", "before")}
    print(f"{row.shape:>13} {row.name:>20} | session12 {', '.join(f'{x:.3f}' for x in cells['session12'])} | "
          f"before {', '.join(f'{x:.3f}' for x in cells['before'])}")
