"""What users run: quality evaluations (ppl, recall, passkey, agreement, the runner) and benchmarks (throughput, bench_kernels)."""
