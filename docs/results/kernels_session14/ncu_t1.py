"""Session 14 probe, run under Nsight Compute: our kernel and cuDNN's at the
remaining T = 1 miss ((32,9,3,64) S=1024, and SmolLM2's (64,9,3,64)), once each
after a warm-up, for `ncu` to profile (memory throughput, warp stalls, occupancy).

    ncu --kernel-name regex:'adore|cudnn' --launch-skip 0 --launch-count 8 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section LaunchStats --section Occupancy -o OUT/t1 \
        python3 docs/results/kernels_session14/ncu_t1.py
"""
import jax

from eval.bench_kernels import attn_set, cudnn, ours

for B in (32, 64):
    s = attn_set(5, B, 9, 3, 64, 1024, 1)
    for op in (ours(), cudnn):
        f = jax.jit(op)
        jax.block_until_ready(f(*s))
        jax.block_until_ready(f(*s))
