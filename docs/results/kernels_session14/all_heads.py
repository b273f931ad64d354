"""Session 14 experiment: one program for several KV heads of a sequence.

The kernel (adore_jax/kernels/attention_gpu.py) runs one program per (sequence,
KV head, split). At D=64 with 3 KV heads (SmolLM2, the (32,9,3,64) bench shape)
each program reads 128-byte pieces of the cache's 384-byte rows, and at T = 1 it
holds 3 real query rows in 16. Here a program takes `hpp` KV heads of a sequence
(the cache viewed as [L, B, S, Hkv * D], free): per block it reads the hpp heads'
slices of the same rows, back to back. Its heads are handled in groups of `hpg`:
a group shares one softmax over its heads' rows (its rows padded together, each
head's queries zero outside its own rows, so S = sum_h Q_h K_h^T) and keeps one
accumulator per head. hpg = 1: a separate online softmax per head (more
independent work per loop step); hpg = hpp = 3 at T = 1: 9 real rows in 16, one
softmax instead of three. hpp = hpg = 1 is the kernel's own scheme (a control).
Merge: as the kernel's default (last-arriving split merges, one launch).
`lean=True` (for exp_ab.py, not yet timed) writes the loop's mask and exponential in
fewer instructions: one compare and one select a score, exp2 of one multiply-add.

    PYTHONPATH=. python3 docs/results/kernels_session14/all_heads.py check        # CPU, interpret mode
    PYTHONPATH=. python3 docs/results/kernels_session14/all_heads.py bench OUT [DEADLINE_S]   # one H200

check: against reference_attention on fresh random inputs (partly empty caches,
rebuilt rows before and after cached slots, S not a multiple of the block, T in
{1, 2, 9}, outputs poisoned). bench: a device check, then device time
(eval/bench_kernels.py's timer) against the default kernel, cuDNN (T = 1) and a
copy of the same bytes; OUT/all_heads.json, a table printed last.

Result (docs/KERNELS.md, "Session 14", item 1): no variant beat the default at
any of the 5 points timed. One softmax for 3 heads (hpg = 3) came within 1-7% at
T = 1 (13.0 against 12.2 us at (32,9,3,64) S=1024; cuDNN 11.7); a softmax per
head in one program (hpg = 1) was at best 1.2-1.4x slower at T = 1 and 1.4-1.6x
at T = 9. The control (hpp = hpg = 1) timed within 1-2% of the kernel.
"""
import functools
import itertools
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from adore_jax.attention import NEG_INF, reference_attention
from adore_jax.kernels.attention_gpu import merge_step
from adore_jax.kernels.common import cdiv, next_pow2, round_up

LOG2E = math.log2(math.e)


def _kernel(lyr_ref, q_ref, qpos_ref, ck_ref, cv_ref, cpos_ref, kn_ref, vn_ref, *rest,
            T, G, D, S, hpp, hpg, bs, Sp, NS, scale, interpret, lean=False):
    if NS > 1:
        _, out_ref, lse_ref, op_ref, mp_ref, lp_ref, cnt_ref = rest
    else:
        out_ref, lse_ref = rest
    c = pl.program_id(1)
    j = pl.program_id(2)
    f32 = jnp.float32
    lyr = lyr_ref[0]
    TG = T * G
    Rg = max(16, next_pow2(hpg * TG))  # padded rows of a group
    r = jnp.arange(Rg, dtype=jnp.int32)
    lh = r // TG  # head of row r within its group (>= hpg: padding)
    ok_r = lh < hpg
    t_r = jnp.where(ok_r, (r % TG) // G, T + r)  # padding rows: distinct rows past T (masked, and dropped)
    g_r = r % G
    d = jnp.arange(D, dtype=jnp.int32)
    ok2 = jnp.broadcast_to(ok_r[:, None], (Rg, D))
    rpos = plgpu.load(qpos_ref.at[t_r], mask=ok_r, other=-1)
    Tp = max(16, next_pow2(T))
    tn = jnp.arange(Tp, dtype=jnp.int32)
    tn_ok = tn < T
    tn_ok2 = jnp.broadcast_to(tn_ok[:, None], (Tp, D))
    groups = []
    for gi in range(hpp // hpg):
        heads = [gi * hpg + u for u in range(hpg)]  # heads within the program
        hq_r = (c * hpp + gi * hpg + jnp.minimum(lh, hpg - 1)) * G + g_r
        q = plgpu.load(q_ref.at[t_r[:, None], hq_r[:, None], d[None, :]], mask=ok2, other=0)
        qs = [jnp.where((lh == u)[:, None], q, jnp.zeros_like(q)) for u in range(hpg)] if hpg > 1 else [q]
        groups.append((heads, hq_r, qs))

    def update(carry, kb, vb, kpos):
        """kb, vb: per head of the program, [n, D]; carry: per group (o per head, m, l)."""
        new = []
        for (heads, _, qs), (os, m, l) in zip(groups, carry):
            s = sum(lax.dot_general(qs[u], kb[h], (((1,), (1,)), ((), ())), preferred_element_type=f32)
                    for u, h in enumerate(heads)) * scale
            if lean:  # one compare and one select a score; exp2 of one fused multiply-add (see exp_ab.py)
                allowed = jnp.where(kpos >= 0, kpos, jnp.iinfo(jnp.int32).max)[None, :] <= rpos[:, None]
                s = jnp.where(allowed, s, NEG_INF)
                m_new = jnp.maximum(m, jnp.max(s, axis=1))
                alpha = jnp.exp2((m - m_new) * LOG2E)
                m_l2 = jnp.where(m_new > 0.5 * NEG_INF, m_new, 0.0) * LOG2E  # rows with nothing allowed yet: p = 0
                p = jnp.exp2(s * LOG2E - m_l2[:, None])
            else:
                allowed = (kpos[None, :] >= 0) & (kpos[None, :] <= rpos[:, None])
                s = jnp.where(allowed, s, NEG_INF)
                m_new = jnp.maximum(m, jnp.max(s, axis=1))
                alpha = jnp.exp(m - m_new)
                p = jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)
            l = alpha * l + jnp.sum(p, axis=1)
            pb = p.astype(vb[heads[0]].dtype)
            os = [alpha[:, None] * o + lax.dot_general(pb, vb[h], (((1,), (0,)), ((), ())), preferred_element_type=f32)
                  for o, h in zip(os, heads)]
            new.append((os, m_new, l))
        return new

    carry = [([jnp.zeros((Rg, D), f32) for _ in range(hpg)], jnp.full((Rg,), NEG_INF, f32), jnp.zeros((Rg,), f32))
             for _ in groups]
    split_start = j * Sp
    n_blocks = Sp // bs if S % Sp == 0 else jnp.clip(cdiv(S, bs) - split_start // bs, 0, Sp // bs)
    cols = jnp.arange(bs, dtype=jnp.int32)

    def body(i, cr):
        lo = split_start + i * bs
        start = pl.multiple_of(lo, bs) if S % bs == 0 else jnp.minimum(lo, S - bs)
        kb = [ck_ref[lyr, pl.ds(start, bs), pl.ds(h * D, D)] for h in range(hpp)]
        vb = [cv_ref[lyr, pl.ds(start, bs), pl.ds(h * D, D)] for h in range(hpp)]
        kpos = cpos_ref[pl.ds(start, bs)]
        if S % bs:
            kpos = jnp.where(start + cols >= lo, kpos, -1)
        return update(cr, kb, vb, kpos)

    carry = lax.fori_loop(0, n_blocks, body, carry)

    def do_new(cr):
        kb = [plgpu.load(kn_ref.at[tn[:, None], h * D + d[None, :]], mask=tn_ok2, other=0) for h in range(hpp)]
        vb = [plgpu.load(vn_ref.at[tn[:, None], h * D + d[None, :]], mask=tn_ok2, other=0) for h in range(hpp)]
        return update(cr, kb, vb, plgpu.load(qpos_ref.at[tn], mask=tn_ok, other=-1))

    carry = lax.cond(j == NS - 1, do_new, lambda cr: cr, carry)

    def pick(os):  # each row's own head's accumulator
        o = os[-1]
        for u in range(len(os) - 1):
            o = jnp.where((lh == u)[:, None], os[u], o)
        return o

    def store_final(gi, o, m, l):
        hq_r = groups[gi][1]
        lc = jnp.maximum(l, 1e-30)
        plgpu.store(out_ref.at[t_r[:, None], hq_r[:, None], d[None, :]], (o / lc[:, None]).astype(out_ref.dtype),
                    mask=ok2)
        plgpu.store(lse_ref.at[t_r, hq_r], m + jnp.log(lc), mask=ok_r)

    if NS == 1:
        for gi, (os, m, l) in enumerate(carry):
            store_final(gi, pick(os), m, l)
        return
    for gi, (os, m, l) in enumerate(carry):
        rows = gi * Rg + r
        plgpu.store(op_ref.at[j, rows[:, None], d[None, :]], pick(os), mask=ok2)
        plgpu.store(mp_ref.at[j, rows], m, mask=ok_r)
        plgpu.store(lp_ref.at[j, rows], l, mask=ok_r)
    if not interpret:
        plgpu.debug_barrier()
    prev = plgpu.atomic_add(cnt_ref, (jnp.int32(0) + 0 * j,), jnp.int32(1))

    @pl.when(prev == NS - 1)
    def _():
        for gi in range(len(groups)):
            rows = gi * Rg + r
            M = jnp.full((Rg,), NEG_INF, f32)
            L = jnp.zeros((Rg,), f32)
            O = jnp.zeros((Rg, D), f32)
            for jj in range(NS):
                mj = plgpu.load(mp_ref.at[jj, rows], mask=ok_r, other=NEG_INF)
                lj = plgpu.load(lp_ref.at[jj, rows], mask=ok_r, other=0.0)
                oj = plgpu.load(op_ref.at[jj, rows[:, None], d[None, :]], mask=ok2, other=0.0)
                M, L, O = merge_step(M, L, O, mj, lj, oj)
            store_final(gi, O, M, L)


def all_heads_attention(q, k, v, ck, cv, cpos, qpos, *, hpp, hpg, bs, splits, stages=3, warps=4, interpret=False,
                        lean=False):
    """out [B, T, Hq, D] of the decode attention, hpp KV heads a program in groups of hpg
    (lean: the loop's mask and exponential in fewer instructions, session 14 item 6).
    q [B, T, Hq, D]; k, v [B, T, Hkv, D]; ck, cv [B, S, Hkv, D]; cpos [B, S]; qpos [B, T]."""
    B, T, Hq, D = q.shape
    S, Hkv = ck.shape[1], ck.shape[2]
    G = Hq // Hkv
    assert Hkv % hpp == 0 and hpp % hpg == 0
    bs = max(16, min(bs, next_pow2(S + 1) // 2))
    Sp = round_up(cdiv(S, splits), bs)
    NS = cdiv(S, Sp)
    HD = hpp * D
    Rg = max(16, next_pow2(hpg * T * G))
    RR = (hpp // hpg) * Rg
    C = Hkv // hpp
    ck = ck.reshape(1, B, S, Hkv * D)
    cv = cv.reshape(1, B, S, Hkv * D)
    kn = k.reshape(B, T, Hkv * D)
    vn = v.reshape(B, T, Hkv * D)
    in_specs = [
        pl.BlockSpec((1,), lambda b, c, j: (0,)),
        pl.BlockSpec((None, T, Hq, D), lambda b, c, j: (b, 0, 0, 0)),
        pl.BlockSpec((None, T), lambda b, c, j: (b, 0)),
        pl.BlockSpec((1, None, S, HD), lambda b, c, j: (0, b, 0, c)),
        pl.BlockSpec((1, None, S, HD), lambda b, c, j: (0, b, 0, c)),
        pl.BlockSpec((None, S), lambda b, c, j: (b, 0)),
        pl.BlockSpec((None, T, HD), lambda b, c, j: (b, 0, c)),
        pl.BlockSpec((None, T, HD), lambda b, c, j: (b, 0, c)),
    ]
    args = [jnp.zeros((1,), jnp.int32), q, qpos.astype(jnp.int32), ck, cv, cpos.astype(jnp.int32), kn, vn]
    out_shape = [jax.ShapeDtypeStruct((B, T, Hq, D), q.dtype), jax.ShapeDtypeStruct((B, T, Hq), jnp.float32)]
    out_specs = [pl.BlockSpec((None, T, Hq, D), lambda b, c, j: (b, 0, 0, 0)),
                 pl.BlockSpec((None, T, Hq), lambda b, c, j: (b, 0, 0))]
    aliases = {}
    if NS > 1:
        in_specs.append(pl.BlockSpec((None, None, 1), lambda b, c, j: (b, c, 0)))
        args.append(jnp.zeros((B, C, 1), jnp.int32))
        out_shape += [jax.ShapeDtypeStruct((B, C, NS, RR, D), jnp.float32),
                      jax.ShapeDtypeStruct((B, C, NS, RR), jnp.float32),
                      jax.ShapeDtypeStruct((B, C, NS, RR), jnp.float32),
                      jax.ShapeDtypeStruct((B, C, 1), jnp.int32)]
        out_specs += [pl.BlockSpec((None, None, NS, RR, D), lambda b, c, j: (b, c, 0, 0, 0)),
                      pl.BlockSpec((None, None, NS, RR), lambda b, c, j: (b, c, 0, 0)),
                      pl.BlockSpec((None, None, NS, RR), lambda b, c, j: (b, c, 0, 0)),
                      pl.BlockSpec((None, None, 1), lambda b, c, j: (b, c, 0))]
        aliases[8] = 5
    kernel = functools.partial(_kernel, T=T, G=G, D=D, S=S, hpp=hpp, hpg=hpg, bs=bs, Sp=Sp, NS=NS,
                               scale=D**-0.5, interpret=interpret, lean=lean)
    outs = pl.pallas_call(kernel, out_shape=out_shape, grid=(B, C, NS), in_specs=in_specs, out_specs=out_specs,
                          input_output_aliases=aliases, interpret=interpret, name="all_heads_attention",
                          compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages))(*args)
    return outs[0]


def case(seed, B, T, Hq, Hkv, D, S, empty=0.3, dtype=jnp.float32):
    """Random decode inputs (q, k, v, ck, cv, cpos, qpos): a share `empty` of slots empty, the
    last sequence's cache all empty, rebuilt rows before some cached slots and the current
    token after all of them; with T > 1 one padding row (position -1)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(ks[0], (B, T, Hq, D)).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, Hkv, D)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, Hkv, D)).astype(dtype)
    ck = jax.random.normal(ks[3], (B, S, Hkv, D)).astype(dtype)
    cv = jax.random.normal(ks[4], (B, S, Hkv, D)).astype(dtype)
    cpos = jax.random.permutation(ks[5], jnp.tile(jnp.arange(S, dtype=jnp.int32), (B, 1)), axis=1, independent=True)
    cpos = jnp.where(jax.random.uniform(ks[6], (B, S)) < empty, -1, cpos)
    if B > 1:
        cpos = cpos.at[B - 1].set(-1)  # one all-empty cache
    # rebuilt rows: positions before some cached slots; the last row is the current token after all of them
    qpos = jnp.concatenate([jnp.sort(jax.random.randint(ks[6], (B, T - 1), 0, S)), jnp.full((B, 1), S)], 1)
    if T > 1:
        qpos = qpos.at[0, 0].set(-1)  # a padding row: nothing to attend, output 0
    return q, k, v, ck, cv, cpos, qpos.astype(jnp.int32)


def check(interpret=True, dtype=jnp.float32, tol=2e-5, split_counts=(1, 3), leans=(False,), one_head=False):
    """Max abs error against reference_attention over shapes and variants (one_head: hpp = 1
    only); raises on a failure."""
    worst = 0.0
    cases = [(2, 1, 9, 3, 64, 200), (3, 2, 9, 3, 64, 130), (2, 9, 9, 3, 64, 77), (2, 1, 8, 4, 32, 100),
             (2, 1, 6, 2, 16, 37)]
    for n, (B, T, Hq, Hkv, D, S) in enumerate(cases):
        args = case(100 + n, B, T, Hq, Hkv, D, S, dtype=dtype)
        ref = np.asarray(reference_attention(*args).out, np.float32)
        for hpp in [1] if one_head else [h for h in range(1, Hkv + 1) if Hkv % h == 0]:
            for hpg in [h for h in range(1, hpp + 1) if hpp % h == 0]:
                for splits, lean in itertools.product(split_counts, leans):
                    out = np.asarray(all_heads_attention(*args, hpp=hpp, hpg=hpg, bs=32, splits=splits,
                                                         interpret=interpret, lean=lean), np.float32)
                    err = float(np.max(np.abs(out - ref))) if np.isfinite(out).all() else float("inf")
                    worst = max(worst, err)
                    if not err <= tol:
                        raise AssertionError(f"case {(B, T, Hq, Hkv, D, S)} hpp={hpp} hpg={hpg} splits={splits} "
                                             f"lean={lean}: {err}")
    print(f"check PASS: max abs error {worst:.2e} ({'interpret' if interpret else 'device'}, {np.dtype(dtype).name})")
    return worst


def bench(out_dir, deadline):
    from adore_jax.kernels import GpuConfig
    from adore_jax.kernels.attention_gpu import padded_rows, plan
    from eval.bench_kernels import attn_set, cudnn, kv_bytes, n_sets, ours, same_size_copy, time_ops

    t0 = time.time()
    results = {"check": check(interpret=False, dtype=jnp.bfloat16, tol=3e-2, split_counts=(3,)), "rows": []}
    cases = [((32, 9, 3, 64), 1024, 1), ((64, 9, 3, 64), 1024, 1), ((32, 9, 3, 64), 4096, 1),
             ((32, 9, 3, 64), 4096, 9), ((32, 9, 3, 64), 8192, 9), ((32, 9, 3, 64), 1024, 9),
             ((8, 32, 8, 128), 1024, 1), ((32, 9, 3, 64), 8192, 1)]
    for (B, Hq, Hkv, D), S, T in cases:
        if time.time() - t0 > deadline:
            print("deadline: stopped before", (B, Hq, Hkv, D, S, T), flush=True)
            break
        G = Hq // Hkv
        bs0, ns0, _, st0 = plan(B, Hkv, S, D, GpuConfig(), padded_rows(G, T))
        impls = {"copy": same_size_copy, "default": ours()} | ({"cudnn": cudnn} if T == 1 else {})
        variants = {"h1g1": (1, 1, bs0, ns0, st0)}  # the kernel's scheme in this code: a control
        for hpp in [h for h in range(2, Hkv + 1) if Hkv % h == 0]:
            for hpg in sorted({1, hpp}):
                if hpp * max(16, next_pow2(hpg * T * G)) * D > 8192:  # fp32 accumulators past the registers
                    continue
                for bs in [b for b in (32, 64) if 3 * 2 * b * hpp * D * 2 <= 200 << 10]:  # K, V stages in smem
                    for ns in sorted({ns0 * hpp // 2, ns0 * hpp, 2 * ns0 * hpp} - {0}):
                        if ns * bs <= S:
                            variants[f"h{hpp}g{hpg}_b{bs}_n{ns}"] = (hpp, hpg, bs, ns, 3)
        impls |= {n: functools.partial(lambda *a, p: all_heads_attention(*a, hpp=p[0], hpg=p[1], bs=p[2], splits=p[3],
                                                                         stages=p[4]), p=p)
                  for n, p in variants.items()}
        nbytes = kv_bytes(B, Hkv, D, S)
        sets = [attn_set(800 + u, B, Hq, Hkv, D, S, T) for u in range(n_sets(nbytes))]
        row = {"shape": [B, Hq, Hkv, D, S, T], "plan": [bs0, ns0, st0], "variants": variants,
               **time_ops(impls, sets, nbytes, copies=("copy",), timer="device")}
        results["rows"].append(row)
        json.dump(results, open(f"{out_dir}/all_heads.json", "w"), indent=1)
        print(f"[{time.time() - t0:5.0f}s]", row["shape"], {n: round(v["us"], 1) if "us" in v else v["error"][-300:]
                                                           for n, v in row.items() if isinstance(v, dict)
                                                           and n != "variants"}, flush=True)
        del sets
    print("\nus per call (K+V TB/s), fastest first; plan (block, splits, stages)")
    for row in results["rows"]:
        best = sorted((v["us"], n) for n, v in row.items() if isinstance(v, dict) and "us" in v and n != "copy")
        print(row["shape"], row["plan"], f"copy {row['copy']['us']:.1f} |",
              " | ".join(f"{n} {u:.1f} ({row[n]['TBps']:.2f})" for u, n in best[:6]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["check"]:
        check(leans=(False, True))
    elif sys.argv[1:2] == ["bench"] and len(sys.argv) in (3, 4):
        bench(sys.argv[2], float(sys.argv[3]) if sys.argv[3:] else 300.0)
    else:
        sys.exit("usage: all_heads.py check | all_heads.py bench OUT_DIR [DEADLINE_S]")
