"""Session 12 experiment: a plan for programs of <= 16 query rows (T = 1, and MHA
at T <= 16) from call 1's grid (t1_probe.py): deeper pipelines of smaller blocks,
and splits only to give every SM about two programs. Candidates, given to the
kernel as explicit GpuConfigs, against the default plan, cuDNN and a copy of the
same K/V bytes, at every bench shape with <= 16 rows a program, ADORE's 7B step
(S = 16498) and the SmolLM2 step (B = 64, S = 1024). Timed as eval/bench_kernels.py
(inputs rotated past L2; TIMER wall: the host's clock, median of 5; device: the
GPU's busy time in a profiler trace); ROUNDS rounds. One H200.

    PYTHONPATH=. python3 docs/results/kernels_session12/t1_rule.py OUT_DIR [DEADLINE_S] [ROUNDS] [TIMER] [grid|grid9]

Call 2 ran it with the wall timer (t1_rule_wall.json), call 3 with the device timer
(t1_rule_device.json; the file is written as t1_rule.json). With `grid` (and the
device timer): splits x stages x block size at the GQA cases with <= 16 rows at
S = 1024 and 4096 and the SmolLM2 step (t1_grid.json). With `grid9`: the same,
with deeper pipelines, at T = 9 with GQA (32 and 64 rows; t9_grid.json).

Split rule (`rule_splits`): among split counts giving at least 1.9 programs an SM,
the fewest within 12% of the least ceil(programs * ns / SMs) / ns (the time of
the busiest SM, one program after another). Calls 2 and 3 ran it as its own code;
it is now `auto_splits` with a floor, which the library adopted (the same counts).
Writes OUT_DIR/t1_rule.json; prints a table last.
"""
import json
import sys
import time

import jax

from adore_jax.kernels import GpuConfig
from adore_jax.kernels.attention_gpu import auto_splits
from adore_jax.kernels.common import cdiv, num_sms
from eval.bench_kernels import attn_set, cudnn, kv_bytes, n_sets, ours, same_size_copy, time_ops

T0 = time.time()
OUT = sys.argv[1]
DEADLINE = float(sys.argv[2]) if sys.argv[2:] else 400.0
ROUNDS = int(sys.argv[3]) if sys.argv[3:] else 1
TIMER = sys.argv[4] if sys.argv[4:] else "wall"
GRID = sys.argv[5] if sys.argv[5:] else ""


def rule_splits(programs, nblocks, sms, min_per_sm=1.9):
    return auto_splits(programs, sms, max(1, nblocks // 2), min_per_sm * sms)  # what session 12's plan adopted


def candidates(B, Hkv, D, S):
    sms = num_sms()
    out = {"default": GpuConfig()}
    if GRID == "grid":
        blocks = (32, 64) if D >= 128 else (64, 128)
        return out | {f"n{n}_st{st}_bs{bs}": GpuConfig(splits=n, num_stages=st, block_s=bs)
                      for n in (2, 4, 6, 8) for st in (3, 4) for bs in blocks}
    if GRID == "grid9":
        return out | {f"n{n}_st{st}_bs{bs}": GpuConfig(splits=n, num_stages=st, block_s=bs)
                      for n in (2, 3, 4, 6, 8) for st in (3, 4, 5) for bs in (32, 64)}
    for st, bs in [(4, 32), (3, 64), (3, 32), (4, 64)]:
        if TIMER == "device" and (st, bs) in [(3, 32), (4, 64)]:  # call 2 (wall): never the best
            continue
        if bs == 32 and D < 128:
            continue
        out[f"rule_st{st}_bs{bs}"] = GpuConfig(splits=rule_splits(B * Hkv, cdiv(S, bs), sms), num_stages=st, block_s=bs)
    bs = 32 if D >= 128 else 64  # three programs an SM instead of two
    out["rule3_st3"] = GpuConfig(splits=rule_splits(B * Hkv, cdiv(S, bs), sms, 2.9), num_stages=3, block_s=bs)
    return out


CASES = [((B, Hq, Hkv, D), S, 1) for B, Hq, Hkv, D in [(8, 32, 32, 128), (8, 32, 8, 128), (32, 9, 3, 64)]
         for S in (1024, 4096, 8192)]
CASES += [((8, 32, 32, 128), S, 9) for S in (1024, 4096, 8192)]
CASES += [((8, 32, 32, 128), 16498, 1), ((64, 9, 3, 64), 1024, 1)]
if GRID == "grid":
    CASES = [((8, 32, 8, 128), 1024, 1), ((8, 32, 8, 128), 4096, 1), ((32, 9, 3, 64), 1024, 1),
             ((64, 9, 3, 64), 1024, 1)]
if GRID == "grid9":
    CASES = [((8, 32, 8, 128), 4096, 9), ((32, 9, 3, 64), 4096, 9), ((8, 32, 8, 128), 1024, 9),
             ((32, 9, 3, 64), 8192, 9)]


def main():
    res = []
    for rnd in range(ROUNDS):
        for (B, Hq, Hkv, D), S, T in CASES:
            if time.time() - T0 > DEADLINE:
                print("deadline: skipped", (B, Hq, Hkv, D, S, T), "round", rnd, flush=True)
                continue
            nbytes = kv_bytes(B, Hkv, D, S)
            sets = [attn_set(500 + u, B, Hq, Hkv, D, S, T) for u in range(n_sets(nbytes))]
            configs = candidates(B, Hkv, D, S)
            impls = {"copy": same_size_copy, **({"cudnn": cudnn} if T == 1 else {}),
                     **{n: ours(c) for n, c in configs.items()}}
            row = {"round": rnd, "shape": [B, Hq, Hkv, D, S, T],
                   **time_ops(impls, sets, nbytes, configs, copies=("copy",), timer=TIMER)}
            res.append(row)
            json.dump(res, open(f"{OUT}/{({'grid': 't1_grid', 'grid9': 't9_grid'}).get(GRID, 't1_rule')}.json", "w"), indent=1)
            print(f"[{time.time() - T0:5.0f}s]", row["shape"], {n: round(v["TBps"], 2) for n, v in row.items()
                                                             if isinstance(v, dict) and "TBps" in v}, flush=True)
            del sets
    if GRID:  # the eight fastest settings of each case
        for r in res:
            best = sorted(((v["TBps"], n) for n, v in r.items() if isinstance(v, dict) and "TBps" in v
                           and n not in ("copy", "cudnn")), reverse=True)[:8]
            print(r["shape"], "copy", round(r["copy"]["TBps"], 2), "cudnn", round(r.get("cudnn", {}).get("TBps", 0), 2),
                  "default", round(r["default"]["TBps"], 2), "best", [(n, round(t, 2)) for t, n in best])
        return
    names = ["copy", "cudnn", "default", "rule_st4_bs32", "rule_st3_bs64", "rule_st3_bs32", "rule_st4_bs64", "rule3_st3"]
    print("\nK+V TB/s (copy: read + written); splits of the rule's configs in brackets")
    print("round  B,Hq,Hkv,D,S,T |", " ".join(f"{n:>14}" for n in names))
    for r in res:
        cells = []
        for n in names:
            v = r.get(n, {})
            sp = f"[{v['cfg']['splits']}]" if "cfg" in v and v["cfg"]["splits"] else ""
            cells.append(f"{v['TBps']:.2f}{sp}".rjust(14) if "TBps" in v else "-".rjust(14))
        print(r["round"], r["shape"], "|", " ".join(cells))


if __name__ == "__main__":
    main()
