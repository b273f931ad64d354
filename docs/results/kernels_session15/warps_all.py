"""Session 15 experiment: the plan with 2 warps a program up to 16 query rows (attention_gpu.warps).

warps_t1.py timed num_warps=2 faster than the plan's 4 at all five T = 1 GQA points
it tried. The plan now takes 2 warps up to 16 (padded) query rows: every T = 1 point,
and MHA up to T = 16. This times the plan ("plan", 2 warps) against it with 4 warps
("w4") at every bench point with 16 rows, with cuDNN at T = 1, and at the T = 1
points that still trail cuDNN, 2 warps with other blocks, stages and splits.

    PYTHONPATH=.:docs/results/kernels_session15 python3 docs/results/kernels_session15/warps_all.py OUT [DEADLINE_S]

OUT/warps_all.json; a table printed last.
"""
import sys

from adore_jax.kernels import GpuConfig
from adore_jax.kernels.attention_gpu import padded_rows, plan

from replan import ours  # noqa: E402  (same directory)


def main(out_dir, deadline):
    from eval.bench_kernels import cudnn, row_summary, same_size_copy, sweep, time_point

    shapes = [(32, 9, 3, 64), (8, 32, 8, 128), (8, 32, 32, 128)]
    cases = [((64, 9, 3, 64), 1024, 1)] + [(sh, S, 1) for S in (1024, 4096, 8192) for sh in shapes]
    cases += [(shapes[2], S, 9) for S in (1024, 4096, 8192)]

    def row_of(shape, S, T):
        B, Hq, Hkv, D = shape
        bs, ns, _, st = plan(B, Hkv, S, D, GpuConfig(), padded_rows(Hq // Hkv, T))
        configs = {"plan": GpuConfig(), "w4": GpuConfig(num_warps=4)}
        if T == 1 and S == 1024 and Hq > Hkv:
            for b, n, s in [(32, ns, 4), (64, ns, 4), (64, ns, 2), (64, 2 * ns, 3), (64, max(1, ns // 2), 3), (128, ns, 2)]:
                if (b, n, s) != (bs, ns, st):
                    configs[f"w2b{b}n{n}s{s}"] = GpuConfig(block_s=b, splits=n, num_stages=s)
        impls = {"copy": same_size_copy} | ({"cudnn": cudnn} if T == 1 else {}) | {n: ours(c) for n, c in configs.items()}
        return time_point(1000, shape, S, T, impls, configs)

    rows = sweep(cases, row_of, f"{out_dir}/warps_all.json", deadline)
    print("\nus per call (K+V TB/s), fastest first; plan: 2 warps")
    for row in rows:
        print(row["shape"], f"copy {row['copy']['us']:.1f} |", row_summary(row, top=5))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: warps_all.py OUT_DIR [DEADLINE_S]")
    main(sys.argv[1], float(sys.argv[2]) if sys.argv[2:] else 300.0)
