"""Session 10 experiment: decode steps at the 7B shape, 16K context, B = 8, ADORE
(m = 1024, R = 0) and full attention, with the attention kernel under each of the
GpuConfig settings given. Rows alternate between the settings, twice.
eval.throughput's timing (16 steps a chunk, median of 5). One H200.

    PYTHONPATH=. python3 docs/results/throughput/session10/attn_ab.py OUT.json '{"NAME": {GpuConfig fields}, ...}'

attn_ab_prefetch.json: '{"prefetch": {}, "no-prefetch": {"pos_prefetch": false}}', run with a
`pos_prefetch` field (the next block's slot positions loaded one loop step ahead)
that was removed after this run showed no difference.
attn_ab_splits.json: '{"default": {}, "splits2": {"splits": 2}}', before the kernel change of session 10.
attn_ab_waves.json: '{"default": {}, "splits3": {"splits": 3}}', after it (one loop body for
every block, splits rounded down to whole waves).
"""
import json
import sys

import jax

from adore_jax.kernels import GpuConfig, get_attention_fn, get_cache_update_fn, get_matmul_fn
from eval.throughput import Row, measure_row, random_params
from models.shapes import SHAPES

cfg = SHAPES["llama2-7b"]
params = random_params(cfg, jax.numpy.bfloat16)
variants = {name: GpuConfig(**kw) for name, kw in json.loads(sys.argv[2]).items()}
out = []
for rep in range(2):
    for policy in ("adore", "full"):
        for name, gcfg in variants.items():
            kernels = (get_attention_fn("pallas_gpu", gpu_config=gcfg), get_cache_update_fn(), get_matmul_fn())
            row = Row("llama2-7b", policy, 8, 16384)
            r = {"name": row.name, "attention": name, "repeat": rep, **measure_row(cfg, params, row, 16, 5, kernels)}
            out.append(r)
            json.dump(out, open(sys.argv[1], "w"), indent=1)
            print(f"{row.name:>20} {name:>12} rep {rep} {r['step_ms']:7.3f} ms/step", flush=True)
