"""Session 17: time = fixed + K/V bytes / rate, fitted through each shape's three cache
sizes in a bench_kernels.py JSON, for our kernel and cuDNN; and the fixed cost that
85% of the run's copy bandwidth would allow at each size (docs/KERNELS.md, "Session
17", item 5). CPU only.

    python3 docs/results/kernels_session17/fixed_cost.py [BENCH_JSON]   # default: this folder's bench_kernels.json
"""
import json
import os
import sys

import numpy as np


def fits(results, target=0.85):
    """[(shape, T, op, rate TB/s, fixed us, [allowed fixed us at each S])] of each
    (B, Hq, Hkv, D) and T with 3 or more sizes, for `ours` and `cudnn` where timed."""
    copy = results["copy"]["best_copy_TBps"] * 1e12
    groups = {}
    for row in results["attention"]:
        groups.setdefault(((row["B"], row["Hq"], row["Hkv"], row["D"]), row["T"]), []).append(row)
    out = []
    for (shape, T), rows in groups.items():
        rows = sorted(rows, key=lambda r: r["S"])
        nbytes = np.array([r["kv_bytes"] for r in rows], float)
        for op in ("ours", "cudnn"):
            if len(rows) < 3 or not all("us" in r.get(op, {}) for r in rows):
                continue
            per_byte, fixed = np.polyfit(nbytes, [r[op]["us"] * 1e-6 for r in rows], 1)
            allowed = nbytes * (1 / (target * copy) - per_byte)
            out.append((shape, T, op, 1e-12 / per_byte, fixed * 1e6, [a * 1e6 for a in allowed]))
    return out


def main(argv):
    if len(argv) > 1:
        sys.exit("usage: fixed_cost.py [BENCH_JSON]")
    path = argv[0] if argv else os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_kernels.json")
    try:
        with open(path) as f:
            results = json.load(f)
        rows = fits(results)
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"fixed_cost.py: {path}: not a bench_kernels.py JSON ({type(e).__name__}: {e})")
    print(f"copy {results['copy']['best_copy_TBps']:.2f} TB/s; fixed that 85% of it allows, per cache size")
    for shape, T, op, rate, fixed, allowed in rows:
        print(f"{str(shape):>16} T={T} {op:>5} | rate {rate:.2f} TB/s, fixed {fixed:4.1f} us | allowed",
              " / ".join(f"{a:.1f}" for a in allowed))


if __name__ == "__main__":
    main(sys.argv[1:])
