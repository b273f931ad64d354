"""Session 16 experiment: split counts the plan skips, at the GQA bench points.

splits_t1.py found (32,9,3,64) S=1024 T=1 at 11.0 us with 3 splits against the plan's
4 (11.7; cuDNN 11.8). Session 15's replan.py tried only the plan's split count, half
and (T = 9) twice it; at T = 9 the plan's 5 splits at (32,9,3,64) beat every other
block and stage tried there by 12-30%. This times split counts around the plan (and
2 or 8 warps at T = 9) at the GQA points of the bench table, with the plan timed
twice ("plan", "plan2") for the spread within a row.

    PYTHONPATH=. python3 docs/results/kernels_session16/splits_more.py OUT [DEADLINE_S]   # one H200

OUT/splits_more.json; a table printed last.

Measured at commit 703f71f, before session 16 changed the plan: run at a later commit, the
configs named around the plan follow the plan there (splits_more.json is 703f71f's).
"""
from adore_jax.kernels import GpuConfig
from eval.bench_kernels import config_sweep, sweep_main


def variants(bs, ns, st, shape, S, T):
    """{name: GpuConfig}: the plan twice, its block and stages at other split counts,
    and at T = 9 the plan with 2 and 8 warps."""
    out = {"plan": GpuConfig(), "plan2": GpuConfig()}
    for n in sorted({2, 3, 4, 5, 6, 8} - {ns}):
        out[f"b{bs}n{n}s{st}"] = GpuConfig(block_s=bs, splits=n, num_stages=st)
    if T > 1:
        for w in (2, 8):
            out[f"w{w}"] = GpuConfig(num_warps=w)
    return out


def main(out_dir, deadline):
    cases = [((32, 9, 3, 64), S, T) for T in (1, 9) for S in (1024, 4096, 8192)]
    cases += [((8, 32, 8, 128), S, T) for T in (9, 1) for S in (1024, 4096)]
    config_sweep(f"{out_dir}/splits_more.json", deadline, cases, variants, 1700)


if __name__ == "__main__":
    sweep_main(main, "splits_more.py")
