"""Session 9 experiment: where a 7B decode step's time goes, kernel by kernel (one H200).

    PYTHONPATH=. python3 docs/results/throughput/session9/profile_step.py OUT_DIR [ROW ...]

Each row (eval.throughput's rows at llama2-7b, B=8, 16K; names below) is compiled
as in eval.throughput, warmed, then one chunk of STEPS decode steps runs under
jax.profiler. The GPU plane of the trace is read back with jax's ProfileData:
every kernel on the GPU's streams, summed by name and by kind (matmul, attention,
cache update, other fusions, memset/copy), and the idle time between kernels
(the span minus the union of kernel intervals), in us. On the H200 the trace
held one step's kernels (32 attention calls), not the chunk's eight: the
numbers are that step's (session 9's first runs divided them by 8; their JSON
was multiplied back).
Writes OUT_DIR/profile_step.json; prints a table last.
"""
import collections
import json
import sys

import jax

from adore_jax.kernels import get_attention_fn, get_cache_update_fn, get_matmul_fn
from adore_jax.sampling import SamplingParams
from eval.throughput import Row, _program, random_params
from eval.trace import busy_ns, gpu_events
from models.shapes import SHAPES

STEPS = 8
MAIN = dict(shape="llama2-7b", batch=8, context=16384)
ROWS = {
    "adore": Row(policy="adore", **MAIN),
    "adore-xla-matmul": Row(policy="adore", variant="xla-matmul", **MAIN),
    "full-no-attention": Row(policy="full", variant="no-attention", **MAIN),
    "adore-r8": Row(policy="adore", rebuild=8, **MAIN),
    "full": Row(policy="full", **MAIN),
}
KINDS = (("attention", ("adore_sparse_attention",)), ("update", ("cache_update", "adore_cache")),
         ("matmul", ("adore_few_row_matmul", "qkv_rope", "gemm", "xmma", "cutlass", "cublas", "matmul", "dot")),
         ("memset/copy", ("memset", "memcpy", "copy")))


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other")


def profile(row: Row, params, kernels) -> dict:
    cfg = SHAPES[row.shape]
    run, pp, s = _program(cfg, params, row, STEPS, 1, kernels)
    sp = SamplingParams().validate()
    for _ in range(3):
        s = run(params, pp, s, sp)
    jax.block_until_ready(s)
    events = gpu_events(lambda: run(params, pp, s, sp))
    busy = busy_ns(events)
    span = (max(e[1] for e in events) - events[0][0]) if events else 0.0
    by_name, by_kind = collections.defaultdict(lambda: [0, 0.0]), collections.defaultdict(lambda: [0, 0.0])
    for a, b, n in events:
        for table, key in ((by_name, n), (by_kind, kind(n))):
            table[key][0] += 1
            table[key][1] += b - a
    us = lambda ns: ns / 1e3  # the trace holds one step (see above)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]
    return {"row": row.name, "kernels_per_step": len(events),
            "span_us": us(span), "busy_us": us(busy), "idle_us": us(span - busy),
            "by_kind": {k: {"count": c, "us": us(t)} for k, (c, t) in by_kind.items()},
            "top": [{"name": n[:160], "kind": kind(n), "count": c, "us": us(t)} for n, (c, t) in top]}


def main():
    out, names = sys.argv[1], sys.argv[2:] or ["adore", "adore-xla-matmul", "full-no-attention"]
    params = random_params(SHAPES["llama2-7b"], jax.numpy.bfloat16)
    kernels = (get_attention_fn(), get_cache_update_fn(), get_matmul_fn())
    results = []
    for name in names:
        r = profile(ROWS[name], params, kernels)
        results.append(r)
        json.dump(results, open(f"{out}/profile_step.json", "w"), indent=1)
        print(json.dumps({k: r[k] for k in ("row", "kernels_per_step", "span_us", "busy_us", "idle_us")}), flush=True)
    print("\nus in the trace, one decode step (llama2-7b, B=8, 16K)")
    kinds = ["matmul", "attention", "update", "other", "memset/copy"]
    print(f"{'row':>34} | {'kernels':>7} {'span':>7} {'idle':>6} | " + " ".join(f"{k:>16}" for k in kinds))
    for r in results:
        cells = " ".join(f"{r['by_kind'].get(k, {}).get('us', 0):9.0f} ({r['by_kind'].get(k, {}).get('count', 0):4.0f})"
                         for k in kinds)
        print(f"{r['row']:>34} | {r['kernels_per_step']:7.0f} {r['span_us']:7.0f} {r['idle_us']:6.0f} | {cells}")
    for r in results:
        print(f"\n{r['row']}: top kernels (us per step, count per step)")
        for t in r["top"][:15]:
            print(f"  {t['us']:8.1f} {t['count']:5.0f}  {t['kind']:>11}  {t['name'][:100]}")


if __name__ == "__main__":
    main()
