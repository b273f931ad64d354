"""Session 16 experiment: two plan rules suggested by splits_t1.py and splits_more.py,
at points that would show whether they hold beyond where they were seen.

* 2 warps at 32 rows: at (32,9,3,64) T = 9 (27 rows, padded to 32) 2 warps beat the
  plan's 4 by 2-4.5% at S = 1024, 4096 and 8192. Timed here at other 32-row points:
  D = 128 with GQA ratio 4 (T = 8) and 8 (T = 4), D = 64 with ratio 8 (T = 4), each
  also with a split fewer and a split more than the plan.
* Fewer splits for short splits: at (32,9,3,64) S=1024 T=1, 3 splits (6 blocks a
  split) beat the plan's 4 (4 blocks) by 5%. Timed here at B = 16 and 48 of that
  shape too, split counts 2-8, with cuDNN.

    PYTHONPATH=. python3 docs/results/kernels_session16/rules.py OUT [DEADLINE_S]   # one H200

OUT/rules.json; a table printed last.

Measured at commit 703f71f, before session 16 changed the plan: run at a later commit, the
configs named around the plan follow the plan there (rules.json is 703f71f's).
"""
from adore_jax.kernels import GpuConfig
from eval.bench_kernels import config_sweep, cudnn, sweep_main


def variants(bs, ns, st, shape, S, T):
    """{name: GpuConfig}: at T > 1 the plan, 2 warps, and 2 warps with a split fewer
    and more; at T = 1 the plan and split counts 2-8."""
    if T > 1:
        return {"plan": GpuConfig(), "w2": GpuConfig(num_warps=2)} | \
            {f"w2n{n}": GpuConfig(num_warps=2, splits=n) for n in (ns - 1, ns + 1)}
    return {"plan": GpuConfig()} | {f"n{n}": GpuConfig(splits=n) for n in sorted({2, 3, 4, 5, 6, 8} - {ns})}


def main(out_dir, deadline):
    cases = [((32, 9, 3, 64), S, 9) for S in (1024, 4096, 8192)]
    cases += [((8, 32, 8, 128), S, 8) for S in (1024, 4096)] + [((8, 32, 4, 128), 4096, 4), ((32, 16, 2, 64), 4096, 4)]
    cases += [((B, 9, 3, 64), 1024, 1) for B in (16, 32, 48)]
    config_sweep(f"{out_dir}/rules.json", deadline, cases, variants, 1900,
                 extra=lambda bs, ns, st, shape, S, T: {"cudnn": cudnn} if T == 1 else {})


if __name__ == "__main__":
    sweep_main(main, "rules.py")
