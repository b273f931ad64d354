"""Session 17 experiment: what the end of a decode program costs.

The decode kernel's time fits a fixed cost a call plus the K/V bytes at about 4.2
TB/s: in session 16's table, (32,9,3,64) at T = 1 took 11.2, 29.8 and 53.2 us at
S = 1024, 4096 and 8192, and at T = 9 14, 33 and 57 us (fits of 5-9 us fixed:
docs/KERNELS.md, "Session 17", item 5). The program's end is serial: after its loop
the last split takes the T new rows (their loads not prefetched), stores its
partial, bumps the counter, and the last program to arrive loads every split's
partial and merges them. Variants of attention_gpu._kernel, made by editing its
source while the op is traced (the library unchanged):

* main: as on main;
* new_first: the new rows before the loop (their loads overlap the loop's first);
* merge2: the last program loads every split's m, l and o before it merges;
* new_pre: the new rows' loads issued before the loop (masked off but in the last
  split), their step after it as on main;
* no_new, no_merge, no_end: without the new rows, without the merge, without both
  (wrong outputs: bounds on what each costs).

    PYTHONPATH=. python3 docs/results/kernels_session17/tail.py check              # CPU, interpret mode
    PYTHONPATH=. python3 docs/results/kernels_session17/tail.py bench OUT [DEADLINE_S [NAMES]]   # one H200

NAMES: comma-separated variants to time (all by default; session 17's first call
timed all but new_pre). check: exp_ab.py's check of the correct variants against
`reference_attention` (empty slots, rebuilt rows before and after the cached ones, non-multiple S, T = 1,
2, 9, 3 splits). bench: that check on the device (bf16), then device time of each
variant beside cuDNN (T = 1) at the GQA points (OUT/tail.json); a table printed last.
"""
import contextlib
import functools
import inspect
import os
import sys
import textwrap

import jax.numpy as jnp

from adore_jax.kernels import attention_gpu
from eval.bench_kernels import config_sweep, cudnn, sweep_main

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels_session14"))
import exp_ab  # noqa: E402  (its op and check)

LOOP = "    carry = lax.fori_loop(0, n_blocks, body, carry)\n"
NEW = "    carry = lax.cond(j == NS - 1, do_new, lambda c: c, carry)\n"
MERGE_FROM = "        M = jnp.full((R,), NEG_INF, f32)\n"
MERGE_TO = "        store_final(O, M, L)\n"
MERGE2 = textwrap.indent(textwrap.dedent("""\
    ms = [_load_shared(mp_ref.at[jj, r], row_ok, NEG_INF, interpret, volatile) for jj in range(NS)]
    ls = [_load_shared(lp_ref.at[jj, r], row_ok, 0.0, interpret, volatile) for jj in range(NS)]
    os_ = [_load_shared(op_ref.at[jj, r[:, None], d[None, :]], row_ok2, 0.0, interpret, volatile) for jj in range(NS)]
    M = functools.reduce(jnp.maximum, ms)
    ws = [jnp.exp(mj - M) for mj in ms]
    L = functools.reduce(jnp.add, [w * lj for w, lj in zip(ws, ls)])
    O = functools.reduce(jnp.add, [w[:, None] * oj for w, oj in zip(ws, os_)])
    store_final(O, M, L)
"""), " " * 8)
NEW_DEF_FROM = "    # The T new rows, in the last split.\n"
NEW_LOADS = textwrap.indent(textwrap.dedent("""\
    tn = jnp.arange(Tp, dtype=jnp.int32)
    new_ok = (tn < T) & (j == NS - 1)
    new_ok2 = jnp.broadcast_to(new_ok[:, None], (Tp, D))
    kn = plgpu.load(kn_ref.at[tn[:, None], d[None, :]], mask=new_ok2, other=0)
    vn = plgpu.load(vn_ref.at[tn[:, None], d[None, :]], mask=new_ok2, other=0)
    knpos = plgpu.load(qpos_ref.at[tn], mask=new_ok, other=-1)
"""), " " * 4)
NEW_PRE = "    carry = lax.cond(j == NS - 1, lambda c: update(c, kn, vn, knpos, NS * Sp), lambda c: c, carry)\n"


def _edit(src, old, new):
    assert src.count(old) == 1, f"not found once in _kernel: {old!r}"
    return src.replace(old, new)


def _variant_source(name):
    src = inspect.getsource(attention_gpu._kernel)
    if name == "new_first":
        src = _edit(_edit(src, LOOP, ""), NEW, NEW + LOOP)
    if name in ("no_new", "no_end"):
        src = _edit(src, NEW, "")
    if name in ("no_merge", "no_end"):
        src = _edit(src, "    @pl.when(prev == NS - 1)\n", "    @pl.when(prev == NS + 1000)\n")
    if name == "new_pre":
        i, k = src.index(NEW_DEF_FROM), src.index(NEW) + len(NEW)
        src = _edit(src[:i] + NEW_PRE + src[k:], LOOP, NEW_LOADS + LOOP)
    if name == "merge2":
        i, k = src.index(MERGE_FROM), src.index(MERGE_TO) + len(MERGE_TO)
        src = src[:i] + MERGE2 + src[k:]
    return src


def kernel_of(name):
    """attention_gpu._kernel as variant `name` (a function in the module's namespace)."""
    ns = dict(vars(attention_gpu))
    exec(compile(_variant_source(name), f"<_kernel {name}>", "exec"), ns)
    return ns["_kernel"]


VARIANTS = ["main", "new_first", "merge2", "new_pre", "no_new", "no_merge", "no_end"]
CORRECT = ["main", "new_first", "merge2", "new_pre"]


@contextlib.contextmanager
def kernel_as(name):
    """Trace the decode kernel as variant `name`."""
    old = attention_gpu._kernel
    attention_gpu._kernel = kernel_of(name)
    try:
        yield
    finally:
        attention_gpu._kernel = old


op = functools.partial(exp_ab.op, trace_as=kernel_as)
CASES = [((32, 9, 3, 64), S, T) for T in (1, 9) for S in (1024, 4096, 8192)] + [
    ((8, 32, 8, 128), 1024, 1), ((8, 32, 8, 128), 1024, 9), ((8, 32, 8, 128), 4096, 9), ((64, 9, 3, 64), 1024, 1)]


def bench(out_dir, deadline, names=VARIANTS):
    exp_ab.check([n for n in CORRECT if n in names], interpret=False, dtype=jnp.bfloat16, tol=3e-2, op=op)

    def extra(bs, ns, st, shape, S, T):
        return ({"cudnn": cudnn} if T == 1 else {}) | {n: op(n) for n in names}

    config_sweep(f"{out_dir}/tail.json", deadline, CASES, lambda *a: {}, 1700, extra=extra)


if __name__ == "__main__":
    if sys.argv[1:] == ["check"]:
        exp_ab.check(CORRECT, interpret=True, op=op)
    elif sys.argv[1:2] == ["bench"]:
        sweep_main(bench, "tail.py bench", sys.argv[2:], choices=VARIANTS)
    else:
        sys.exit("usage: tail.py check | tail.py bench OUT_DIR [DEADLINE_S [NAMES]]")
