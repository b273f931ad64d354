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

Measured at commit 703f71f, before session 16 changed the plan: run at a later commit, the
configs named around the plan follow the plan there (splits_t1.json is 703f71f's).
"""
from adore_jax.kernels import GpuConfig
from eval.bench_kernels import config_sweep, cudnn, same_size_copy, sweep_main


def variants(bs, ns, st, shape, S, T):
    """{name: GpuConfig}: the plan, then splits x (block, stages) with 2 warps, and 4
    warps at 64-slot blocks, 3 stages."""
    counts = sorted({ns, max(1, ns - 1), ns + 1, ns + 2, 2 * ns, 6, 8} - {0})
    shapes = [(64, 3), (64, 4), (32, 4), (128, 2)] if shape[3] < 128 else [(32, 4), (64, 3), (32, 3)]
    out = {"plan": GpuConfig()}
    for n in counts:
        for b, s in shapes:
            out[f"b{b}n{n}s{s}"] = GpuConfig(block_s=b, splits=n, num_stages=s)
        out[f"b64n{n}s3w4"] = GpuConfig(block_s=64, splits=n, num_stages=3, num_warps=4)
    return out


def main(out_dir, deadline):
    cases = [((64, 9, 3, 64), 1024, 1), ((32, 9, 3, 64), 1024, 1), ((8, 32, 32, 128), 1024, 1),
             ((64, 9, 3, 64), 2048, 1), ((64, 9, 3, 64), 4096, 1)]
    config_sweep(f"{out_dir}/splits_t1.json", deadline, cases, variants, 1600,
                 extra=lambda *_: {"copy": same_size_copy, "cudnn": cudnn}, copies=("copy",))


if __name__ == "__main__":
    sweep_main(main, "splits_t1.py")
