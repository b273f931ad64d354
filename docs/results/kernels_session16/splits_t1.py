"""Session 16 experiment: split counts, blocks and stages at the T = 1 points level with
or behind cuDNN.

Session 15 left SmolLM2's decode step (64,9,3,64) S=1024 T=1 at 0.93x cuDNN; its
replan.py tried 1 and 2 splits there (the plan's 2 the fastest), never more, and at
(32,9,3,64) S=1024 4 splits (the plan) beat 2 by 7%. This times a grid of split counts
(2-8) by block x stages (and 4 warps at the plan's block) at SmolLM2's step, at the
two bench points level with cuDNN ((32,9,3,64) and (8,32,32,128) at S=1024), and at
SmolLM2's shape with S = 2048 and 4096, with cuDNN and a same-size copy.

    PYTHONPATH=. python3 docs/results/kernels_session16/splits_t1.py OUT [DEADLINE_S]   # one H200

OUT/splits_t1.json; a table printed last (the plan is "plan").
"""
import sys

from adore_jax.kernels import GpuConfig, sparse_attention_gpu
from adore_jax.kernels.attention_gpu import padded_rows, plan


def ours(cfg):
    return lambda q, k, v, ck, cv, cpos, qpos: sparse_attention_gpu(q, k, v, ck, cv, cpos, qpos, config=cfg).out


def variants(B, Hkv, S, D, ns):
    """{name: GpuConfig}: the plan, then splits x (block, stages) with 2 warps, and 4
    warps at 64-slot blocks, 3 stages."""
    counts = sorted({ns, max(1, ns - 1), ns + 1, ns + 2, 2 * ns, 6, 8} - {0})
    shapes = [(64, 3), (64, 4), (32, 4), (128, 2)] if D < 128 else [(32, 4), (64, 3), (32, 3)]
    out = {"plan": GpuConfig()}
    for n in counts:
        for b, s in shapes:
            out[f"b{b}n{n}s{s}"] = GpuConfig(block_s=b, splits=n, num_stages=s)
        out[f"b64n{n}s3w4"] = GpuConfig(block_s=64, splits=n, num_stages=3, num_warps=4)
    return out


def main(out_dir, deadline):
    from eval.bench_kernels import cudnn, row_summary, same_size_copy, sweep, time_point

    cases = [((64, 9, 3, 64), 1024), ((32, 9, 3, 64), 1024), ((8, 32, 32, 128), 1024),
             ((64, 9, 3, 64), 2048), ((64, 9, 3, 64), 4096)]

    def row_of(shape, S):
        B, Hq, Hkv, D = shape
        bs, ns, _, st = plan(B, Hkv, S, D, GpuConfig(), padded_rows(Hq // Hkv, 1))
        configs = variants(B, Hkv, S, D, ns)
        impls = {"copy": same_size_copy, "cudnn": cudnn} | {n: ours(c) for n, c in configs.items()}
        row = time_point(1600, shape, S, 1, impls, configs)
        row["plan_cfg"] = [bs, ns, st]
        return row

    rows = sweep(cases, row_of, f"{out_dir}/splits_t1.json", deadline)
    print("\nus per call (K+V TB/s), fastest first; plan = (block, splits, stages)")
    for row in rows:
        print(row["shape"], "plan", row["plan_cfg"], f"copy {row['copy']['us']:.1f} |",
              f"plan {row['plan']['us']:.1f} | cudnn {row['cudnn']['us']:.1f} |", row_summary(row, top=6))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: splits_t1.py OUT_DIR [DEADLINE_S]")
    main(sys.argv[1], float(sys.argv[2]) if sys.argv[2:] else 300.0)
