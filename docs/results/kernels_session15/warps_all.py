"""Session 15 experiment: the plan with 2 warps a program up to 16 query rows (attention_gpu.warps).

warps_t1.py timed num_warps=2 faster than the plan's 4 at all five T = 1 GQA points
it tried. The plan now takes 2 warps up to 16 (padded) query rows: every T = 1 point,
and MHA up to T = 16. This times the plan ("plan", 2 warps) against it with 4 warps
("w4") at every bench point with 16 rows, with cuDNN at T = 1, and at the T = 1
points that still trail cuDNN, 2 warps with other blocks, stages and splits.

    PYTHONPATH=. python3 docs/results/kernels_session15/warps_all.py OUT [DEADLINE_S]   # one H200

OUT/warps_all.json; a table printed last.
"""
from adore_jax.kernels import GpuConfig
from eval.bench_kernels import config_sweep, cudnn, same_size_copy, sweep_main


def variants(bs, ns, st, shape, S, T):
    """{name: GpuConfig}: the plan (2 warps), 4 warps, and at the T = 1 GQA points at
    S = 1024 2 warps with other blocks, stages and splits."""
    configs = {"plan": GpuConfig(), "w4": GpuConfig(num_warps=4)}
    if T == 1 and S == 1024 and shape[1] > shape[2]:
        for b, n, s in [(32, ns, 4), (64, ns, 4), (64, ns, 2), (64, 2 * ns, 3), (64, max(1, ns // 2), 3), (128, ns, 2)]:
            if (b, n, s) != (bs, ns, st):
                configs[f"w2b{b}n{n}s{s}"] = GpuConfig(block_s=b, splits=n, num_stages=s)
    return configs


def main(out_dir, deadline):
    shapes = [(32, 9, 3, 64), (8, 32, 8, 128), (8, 32, 32, 128)]
    cases = [((64, 9, 3, 64), 1024, 1)] + [(sh, S, 1) for S in (1024, 4096, 8192) for sh in shapes]
    cases += [(shapes[2], S, 9) for S in (1024, 4096, 8192)]
    config_sweep(f"{out_dir}/warps_all.json", deadline, cases, variants, 1000, copies=("copy",),
                 extra=lambda bs, ns, st, shape, S, T: {"copy": same_size_copy} | ({"cudnn": cudnn} if T == 1 else {}))


if __name__ == "__main__":
    sweep_main(main, "warps_all.py")
