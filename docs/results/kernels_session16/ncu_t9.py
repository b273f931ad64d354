"""Session 16 probe, run under Nsight Compute: the decode kernel at (32,9,3,64) S=4096
with T = 1 and T = 9 (27 rows, the bench table's furthest large-S point from 85% of
copy), once each after a warm-up.

    /usr/local/cuda/bin/ncu --kernel-name regex:'adore' --launch-skip 1 --launch-count 5 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
        --section Occupancy --section LaunchStats -o OUT/t9 \
        python3 docs/results/kernels_session16/ncu_t9.py
"""
import jax

from eval.bench_kernels import attn_set, ours

for T in (1, 9):
    s = attn_set(5, 32, 9, 3, 64, 4096, T)
    f = jax.jit(ours())
    for _ in range(3):
        jax.block_until_ready(f(*s))
