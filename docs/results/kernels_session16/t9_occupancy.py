"""Session 16, prepared for the next device run (not measured): do T = 9 GQA calls
fall off a cliff when their programs stop fitting one wave?

Under Nsight Compute (docs/KERNELS.md, "Session 16", item 6) the T = 9 program at
(32,9,3,64) S=4096 holds 212 registers a thread over 2 warps, so 4 programs fit an
SM (528 on 132 SMs); the plan's 5 splits give 480 programs, and 6 splits (576) were
25-30% slower than 5 at S=4096 and 8192 (items 3 and 4), where 8 were only 13%
slower. The schedulers found no eligible warp 62-64% of the time: the kernel waits on
latency with few warps. Prediction: 32-slot blocks or 2 stages take fewer registers
and less shared memory, so more programs fit an SM, and with them more splits (8-10)
hide more latency; if that is the bound, one of them beats the plan by 10% or more.
This times (block, stages) in {64 x 3, 64 x 2, 32 x 3, 32 x 4} by splits {plan, 6,
8, 10}, with the plan's warps (2 at (32,9,3,64), 4 at (8,32,8,128)'s 64 rows), at
the GQA T = 9 points at S = 4096 and 8192.

    PYTHONPATH=. python3 docs/results/kernels_session16/t9_occupancy.py OUT [DEADLINE_S]   # one H200

OUT/t9_occupancy.json; a table printed last.
"""
from adore_jax.kernels import GpuConfig
from eval.bench_kernels import config_sweep, sweep_main


def variants(bs, ns, st, shape, S, T):
    """{name: GpuConfig}: the plan, then (block, stages) by split counts."""
    out = {"plan": GpuConfig()}
    for b, s in [(64, 3), (64, 2), (32, 3), (32, 4)]:
        for n in sorted({ns, 6, 8, 10}):
            out[f"b{b}n{n}s{s}"] = GpuConfig(block_s=b, splits=n, num_stages=s)
    return out


def main(out_dir, deadline):
    cases = [((32, 9, 3, 64), S, 9) for S in (4096, 8192)] + [((8, 32, 8, 128), S, 9) for S in (4096, 8192)]
    config_sweep(f"{out_dir}/t9_occupancy.json", deadline, cases, variants, 2100)


if __name__ == "__main__":
    sweep_main(main, "t9_occupancy.py")
