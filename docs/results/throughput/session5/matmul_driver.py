"""Runs matmul_rows.py under each XLA_FLAGS set, prints a table (TB/s by kind and B),
writes the flag set with the smallest B=1 + B=8 time of the separate matmuls to argv[2]."""
import json, os, subprocess, sys

here = os.path.dirname(os.path.abspath(__file__))
SETS = {"default": "", "cublas": "--xla_gpu_enable_triton_gemm=false", "cublaslt": "--xla_gpu_enable_cublaslt=true"}
out_dir = sys.argv[1]
rows = []
for name, flags in SETS.items():
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()}
    p = subprocess.run([sys.executable, os.path.join(here, "matmul_rows.py"), name], env=env, capture_output=True, text=True,
                       timeout=150)
    got = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode:
        print(name, "failed:", p.stderr.strip().splitlines()[-1:] if p.stderr else p.returncode, flush=True)
    rows += got
    print(name, len(got), "rows", flush=True)
open(os.path.join(out_dir, "matmul_rows.jsonl"), "w").write("".join(json.dumps(r) + "\n" for r in rows))
kinds = sorted({r["kind"] for r in rows}, key=[r["kind"] for r in rows].index)
Bs = sorted({r["B"] for r in rows})
print("TB/s of weight bytes (us per layer)")
print("| set | kind | " + " | ".join(f"B={b}" for b in Bs) + " |")
for name in SETS:
    for k in kinds:
        cells = {r["B"]: f"{r['tb_s']:.2f} ({r['us_per_layer']:.1f})" for r in rows if r["set"] == name and r["kind"] == k}
        if cells:
            print(f"| {name} | {k} | " + " | ".join(cells.get(b, "") for b in Bs) + " |")
score = {n: sum(r["us_per_layer"] for r in rows if r["set"] == n and r["kind"] in ("qkv_sep", "gate_up_sep", "down")
                and r["B"] in (1, 8)) for n in SETS}
score = {n: v for n, v in score.items() if v > 0 and len([r for r in rows if r["set"] == n]) == len(kinds) * len(Bs)}
best = min(score, key=score.get)
print("B=1 + B=8 time of a layer's matmuls (us):", {n: round(v, 1) for n, v in score.items()}, "best:", best)
open(sys.argv[2], "w").write(SETS[best])
