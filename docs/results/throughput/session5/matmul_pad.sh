# Session 5, second matmul experiment: one row against padded rows, the strength-reduction flag, [E, 2, F].
H=docs/results/throughput/session5
K=qkv_sep,gate_up_sep,gate_up_fused,gate_up_e2f,down
BATCHES=1,8 KINDS=$K python3 $H/matmul_rows.py default
BATCHES=1 KINDS=$K PAD=8 python3 $H/matmul_rows.py pad8
BATCHES=1 KINDS=$K PAD=2 python3 $H/matmul_rows.py pad2
BATCHES=1 KINDS=$K XLA_FLAGS=--xla_gpu_enable_dot_strength_reduction=false python3 $H/matmul_rows.py no_strength_reduction
