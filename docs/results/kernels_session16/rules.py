"""Session 16 experiment: two plan rules suggested by splits_t1.py and splits_more.py,
at points that would show whether they hold beyond where they were seen.

* 2 warps at 32 rows: at (32,9,3,64) T = 9 (27 rows, padded to 32) 2 warps beat the
  plan's 4 by 2-4.5% at S = 1024, 4096 and 8192. Timed here at other 32-row points:
  D = 128 with GQA ratio 4 (T = 8) and 8 (T = 4), D = 64 with ratio 8 (T = 4), and
  with 4 splits at (32,9,3,64) T = 9.
* Fewer splits for short splits: at (32,9,3,64) S=1024 T=1, 3 splits (6 blocks a
  split) beat the plan's 4 (4 blocks) by 5%. Timed here at B = 16 and 64 of that
  shape too, split counts 2-8.

    PYTHONPATH=. python3 docs/results/kernels_session16/rules.py OUT [DEADLINE_S]   # one H200

OUT/rules.json; a table printed last.
"""
import sys

from adore_jax.kernels import GpuConfig, sparse_attention_gpu
from adore_jax.kernels.attention_gpu import padded_rows, plan


def ours(cfg):
    return lambda q, k, v, ck, cv, cpos, qpos: sparse_attention_gpu(q, k, v, ck, cv, cpos, qpos, config=cfg).out


def main(out_dir, deadline):
    from eval.bench_kernels import cudnn, row_summary, sweep, time_point

    warp_cases = [((32, 9, 3, 64), S, 9) for S in (1024, 4096, 8192)]
    warp_cases += [((8, 32, 8, 128), S, 8) for S in (1024, 4096)] + [((8, 32, 4, 128), 4096, 4), ((32, 16, 2, 64), 4096, 4)]
    split_cases = [((B, 9, 3, 64), 1024, 1) for B in (16, 32, 48)]

    def row_of(shape, S, T):
        B, Hq, Hkv, D = shape
        bs, ns, _, st = plan(B, Hkv, S, D, GpuConfig(), padded_rows(Hq // Hkv, T))
        if T > 1:
            configs = {"plan": GpuConfig(), "w2": GpuConfig(num_warps=2)}
            configs |= {f"w2n{n}": GpuConfig(num_warps=2, splits=n) for n in (ns - 1, ns + 1)}
        else:
            configs = {"plan": GpuConfig()} | {f"n{n}": GpuConfig(splits=n) for n in sorted({2, 3, 4, 5, 6, 8} - {ns})}
        impls = {n: ours(c) for n, c in configs.items()} | ({"cudnn": cudnn} if T == 1 else {})
        row = time_point(1900, shape, S, T, impls, configs, copies=())
        row["plan_cfg"] = [bs, ns, st]
        return row

    rows = sweep(warp_cases + split_cases, row_of, f"{out_dir}/rules.json", deadline)
    print("\nus per call (K+V TB/s), fastest first; plan = (block, splits, stages)")
    for row in rows:
        print(row["shape"], "plan", row["plan_cfg"], f"plan {row['plan']['us']:.1f} |", row_summary(row, top=4))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: rules.py OUT_DIR [DEADLINE_S]")
    main(sys.argv[1], float(sys.argv[2]) if sys.argv[2:] else 300.0)
