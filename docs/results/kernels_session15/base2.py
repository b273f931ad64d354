"""Session 15 experiment: the GPU kernels' online softmax in base 2 (adore_jax/kernels/softmax_gpu.py).

Session 14's exp_ab.py (docs/results/kernels_session15/exp_ab.json) timed the
exponential swapped for one `ex2.approx` instruction, and a leaner mask; both won
at T = 9 and for prefill. The library now has both. This times, in one run, at the
same points: the kernel as it is now ("ours"), session 14's loop (all_heads.py with
one KV head a program, "h1g1", which timed within 1-2% of the session 14 kernel),
cuDNN at T = 1, a copy of the same bytes, and at the T = 1 GQA points a few launch
configs around the plan's, in case the cheaper loop moved the best one.

    PYTHONPATH=. python3 docs/results/kernels_session15/base2.py OUT [DEADLINE_S]   # one H200

OUT/base2.json; a table printed last.
"""
import functools
import os
import sys
import time

import jax.numpy as jnp

from adore_jax.kernels import GpuConfig
from eval.bench_kernels import config_sweep, cudnn, same_size_copy, sweep_main

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels_session14"))
import all_heads  # noqa: E402  (session 14's loop, as the control)
import exp_ab  # noqa: E402  (its POINTS)


def variants(bs, ns, st, shape, S, T):
    """{name: GpuConfig}: the kernel as it is ("ours"), and at the T = 1 GQA points at
    S = 1024 launch configs around the plan's."""
    configs = {"ours": GpuConfig()}
    if T == 1 and shape[1] // shape[2] > 1 and S == 1024:
        for b, s, n in [(32, 4, ns), (64, 2, ns), (64, 4, ns), (128, 2, ns), (64, 3, ns * 2), (64, 3, max(1, ns // 2))]:
            configs[f"b{b}s{s}n{n}"] = GpuConfig(block_s=b, num_stages=s, splits=n)
    return configs


def controls(bs, ns, st, shape, S, T):
    """A same-size copy, cuDNN at T = 1, and session 14's loop with the plan's launch ("h1g1")."""
    return {"copy": same_size_copy} | ({"cudnn": cudnn} if T == 1 else {}) | {
        "h1g1": functools.partial(all_heads.all_heads_attention, hpp=1, hpg=1, bs=bs, splits=ns, stages=st)}


def main(out_dir, deadline):
    t0 = time.time()
    all_heads.check(interpret=False, dtype=jnp.bfloat16, tol=3e-2, split_counts=(3,), one_head=True)  # the control
    config_sweep(f"{out_dir}/base2.json", deadline - (time.time() - t0), exp_ab.POINTS, variants, 700,
                 extra=controls, copies=("copy",))


if __name__ == "__main__":
    sweep_main(main, "base2.py")
