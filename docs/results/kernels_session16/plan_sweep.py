"""What session 16's plan experiments (splits_t1.py, splits_more.py, rules.py) share:
time the decode kernel under launch configs around the plan at a list of points, a
row a point in a JSON file, and a table printed last."""
import sys

from adore_jax.kernels import GpuConfig, sparse_attention_gpu
from adore_jax.kernels.attention_gpu import padded_rows, plan


def ours(cfg):
    return lambda q, k, v, ck, cv, cpos, qpos: sparse_attention_gpu(q, k, v, ck, cv, cpos, qpos, config=cfg).out


def run(out_path, deadline, cases, configs_of, seed, extra=lambda T: {}, copies=()):
    """For each (shape (B, Hq, Hkv, D), S, T) in cases, time ours under
    configs_of(block, splits, stages, shape, S, T) -> {name: GpuConfig} (the plan's
    block, splits and stages given), with the ops extra(T) -> {name: op}, on fresh inputs
    from `seed`: rows {shape, name: {us, TBps, ...}, plan_cfg} to the JSON file
    out_path until `deadline` seconds; then a line a row, fastest first."""
    from eval.bench_kernels import row_summary, sweep, time_point

    def row_of(shape, S, T):
        B, Hq, Hkv, D = shape
        bs, ns, _, st = plan(B, Hkv, S, D, GpuConfig(), padded_rows(Hq // Hkv, T))
        configs = configs_of(bs, ns, st, shape, S, T)
        impls = extra(T) | {n: ours(c) for n, c in configs.items()}
        row = time_point(seed, shape, S, T, impls, configs, copies)
        row["plan_cfg"] = [bs, ns, st]
        return row

    rows = sweep(cases, row_of, out_path, deadline)
    print("\nus per call (K+V TB/s), fastest first; plan = (block, splits, stages)")
    for row in rows:
        print(row["shape"], "plan", row["plan_cfg"], f"plan {row['plan']['us']:.1f} |", row_summary(row, top=6))


def cli(main, name):
    """Run main(OUT_DIR, DEADLINE_S) from the command line of the script `name`."""
    if len(sys.argv) not in (2, 3):
        sys.exit(f"usage: {name} OUT_DIR [DEADLINE_S]")
    main(sys.argv[1], float(sys.argv[2]) if sys.argv[2:] else 300.0)
