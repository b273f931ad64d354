"""Session 16 experiment: split counts the plan skips, at the GQA bench points.

splits_t1.py found (32,9,3,64) S=1024 T=1 at 11.0 us with 3 splits against the plan's
4 (11.7; cuDNN 11.8). Session 15's replan.py tried only the plan's split count, half
and (T = 9) twice it; at T = 9 the plan's 5 splits at (32,9,3,64) beat every other
block and stage tried there by 12-30%. This times split counts around the plan (and
2 or 8 warps at T = 9) at the GQA points of the bench table, with the plan timed
twice ("plan", "plan2") for the spread within a row.

    PYTHONPATH=. python3 docs/results/kernels_session16/splits_more.py OUT [DEADLINE_S]   # one H200

OUT/splits_more.json; a table printed last.
"""
import sys

from adore_jax.kernels import GpuConfig, sparse_attention_gpu
from adore_jax.kernels.attention_gpu import padded_rows, plan


def ours(cfg):
    return lambda q, k, v, ck, cv, cpos, qpos: sparse_attention_gpu(q, k, v, ck, cv, cpos, qpos, config=cfg).out


def variants(bs, ns, st, T):
    """{name: GpuConfig}: the plan twice, its block and stages at other split counts,
    and at T = 9 the plan with 2 and 8 warps."""
    out = {"plan": GpuConfig(), "plan2": GpuConfig()}
    for n in sorted({2, 3, 4, 5, 6, 8} - {ns}):
        out[f"b{bs}n{n}s{st}"] = GpuConfig(block_s=bs, splits=n, num_stages=st)
    if T > 1:
        for w in (2, 8):
            out[f"w{w}"] = GpuConfig(num_warps=w)
    return out


def main(out_dir, deadline):
    from eval.bench_kernels import row_summary, sweep, time_point

    cases = [((32, 9, 3, 64), S, T) for T in (1, 9) for S in (1024, 4096, 8192)]
    cases += [((8, 32, 8, 128), S, T) for T in (9, 1) for S in (1024, 4096)]

    def row_of(shape, S, T):
        B, Hq, Hkv, D = shape
        bs, ns, _, st = plan(B, Hkv, S, D, GpuConfig(), padded_rows(Hq // Hkv, T))
        configs = variants(bs, ns, st, T)
        row = time_point(1700, shape, S, T, {n: ours(c) for n, c in configs.items()}, configs, copies=())
        row["plan_cfg"] = [bs, ns, st]
        return row

    rows = sweep(cases, row_of, f"{out_dir}/splits_more.json", deadline)
    print("\nus per call (K+V TB/s), fastest first; plan = (block, splits, stages)")
    for row in rows:
        print(row["shape"], "plan", row["plan_cfg"], f"plan {row['plan']['us']:.1f}/{row['plan2']['us']:.1f} |",
              row_summary(row, top=4))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: splits_more.py OUT_DIR [DEADLINE_S]")
    main(sys.argv[1], float(sys.argv[2]) if sys.argv[2:] else 300.0)
