"""Session 15 experiment: warps a program at T = 1 with the base-2 loop (softmax_gpu.py).

replan.py found the plan's block, stages and splits still best (or level) at T = 1.
This times num_warps 2 and 8 against the plan's 4 at the T = 1 GQA points, with cuDNN.

    PYTHONPATH=. python3 docs/results/kernels_session15/warps_t1.py OUT [DEADLINE_S]   # one H200

OUT/warps_t1.json; a table printed last.
"""
import sys

from adore_jax.kernels import GpuConfig

from replan import ours  # noqa: E402  (same directory)


def main(out_dir, deadline):
    from eval.bench_kernels import cudnn, row_summary, same_size_copy, sweep, time_point

    cases = [((32, 9, 3, 64), 1024, 1), ((64, 9, 3, 64), 1024, 1), ((8, 32, 8, 128), 1024, 1),
             ((32, 9, 3, 64), 4096, 1), ((8, 32, 8, 128), 4096, 1)]
    configs = {f"w{w}": GpuConfig(num_warps=w) for w in (2, 4, 8)}

    def row_of(shape, S, T):
        impls = {"copy": same_size_copy, "cudnn": cudnn} | {n: ours(c) for n, c in configs.items()}
        return time_point(900, shape, S, T, impls, configs)

    rows = sweep(cases, row_of, f"{out_dir}/warps_t1.json", deadline)
    print("\nus per call (K+V TB/s), fastest first; w4 is the plan")
    for row in rows:
        print(row["shape"], f"copy {row['copy']['us']:.1f} |", row_summary(row, top=4))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: warps_t1.py OUT_DIR [DEADLINE_S]")
    main(sys.argv[1], float(sys.argv[2]) if sys.argv[2:] else 300.0)
