# Session 7 experiment, for the next GPU call: do the 7B decode matmuls with N = 4096 (q, k, v, o, down) read their
# weights faster as s partial products over K / s (more output tiles for the 132 SMs at few rows), summed after?
# Same timing as session 5's matmul_rows.py (TB/s of weight bytes, us per layer); B=2 is the padded one-row step.
H=docs/results/throughput/session5
K=qkv_sep,qkv_fused,gate_up_e2f,down
for s in 1 2 4; do BATCHES=2,8,16,64 KINDS=$K SPLITK=$s python3 $H/matmul_rows.py splitk$s; done
