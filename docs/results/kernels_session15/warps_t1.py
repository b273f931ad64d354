"""Session 15 experiment: warps a program at T = 1 with the base-2 loop (softmax_gpu.py).

replan.py found the plan's block, stages and splits still best (or level) at T = 1.
This times num_warps 2 and 8 against the plan's 4 at the T = 1 GQA points, with cuDNN.

    PYTHONPATH=. python3 docs/results/kernels_session15/warps_t1.py OUT [DEADLINE_S]   # one H200

OUT/warps_t1.json; a table printed last.
"""
from adore_jax.kernels import GpuConfig
from eval.bench_kernels import config_sweep, cudnn, same_size_copy, sweep_main


def main(out_dir, deadline):
    cases = [((32, 9, 3, 64), 1024, 1), ((64, 9, 3, 64), 1024, 1), ((8, 32, 8, 128), 1024, 1),
             ((32, 9, 3, 64), 4096, 1), ((8, 32, 8, 128), 4096, 1)]
    config_sweep(f"{out_dir}/warps_t1.json", deadline, cases,
                 lambda *_: {f"w{w}": GpuConfig(num_warps=w) for w in (2, 4, 8)}, 900, copies=("copy",),
                 extra=lambda *_: {"copy": same_size_copy, "cudnn": cudnn})


if __name__ == "__main__":
    sweep_main(main, "warps_t1.py")
