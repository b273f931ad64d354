"""Session 15 experiment: does the base-2 loop (softmax_gpu.py) move the best launch plan?

The plan (attention_gpu.plan) was tuned with the libdevice exp loop (sessions 10 to
13). base2.py saw one hint that it moved: (8,32,8,128) S=1024 T=1 took 13.4 us with
64-slot blocks, 3 stages and half the splits against the plan's 13.9 (32 x 4). This
times the plan against launch configs around it at each T = 1 point of the bench
table and at its GQA T = 9 points, with cuDNN (T = 1) and a same-size copy.

    PYTHONPATH=. python3 docs/results/kernels_session15/replan.py OUT [DEADLINE_S]   # one H200

OUT/replan.json; a table printed last (the plan is "plan").
"""
from adore_jax.kernels import GpuConfig
from eval.bench_kernels import config_sweep, cudnn, same_size_copy, sweep_main


def variants(bs, ns, st, shape, S, T):
    """{name: GpuConfig} around the plan (bs-slot blocks, ns splits, st stages)."""
    half = max(1, ns // 2)
    few = [(64, ns, 3), (64, half, 3), (64, ns, 4), (32, half, 4), (128, ns, 2), (32, ns, 3)] if T == 1 else \
        [(32, ns, 3), (32, ns, 4), (64, ns, 4), (64, ns, 2), (128, ns, 2), (64, ns * 2, 3), (64, half, 3)]
    out = {"plan": GpuConfig()}
    for b, n, s in few:
        if (b, n, s) != (bs, ns, st):
            out[f"b{b}n{n}s{s}"] = GpuConfig(block_s=b, splits=n, num_stages=s)
    return out


def main(out_dir, deadline):
    shapes = [(32, 9, 3, 64), (8, 32, 8, 128), (8, 32, 32, 128)]
    cases = [(sh, S, 1) for S in (1024, 4096, 8192) for sh in shapes]
    cases += [(sh, S, 9) for S in (1024, 4096, 8192) for sh in shapes[:2]]
    cases.insert(1, ((64, 9, 3, 64), 1024, 1))  # SmolLM2's decode step
    config_sweep(f"{out_dir}/replan.json", deadline, cases, variants, 800, copies=("copy",),
                 extra=lambda bs, ns, st, shape, S, T: {"copy": same_size_copy} | ({"cudnn": cudnn} if T == 1 else {}))


if __name__ == "__main__":
    sweep_main(main, "replan.py")
