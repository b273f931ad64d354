"""Sessions 12 and 13 experiment: decode attention as a Pallas Mosaic GPU kernel
(TMA copies, wgmma). Session 12 wrote it for T = 1 and checked it on the CPU only;
session 13 took it to T query rows (T * G <= 64, each row with its own position)
and ran it on the GPU, for the T = 1 miss against cuDNN and the T = 9 GQA points,
where the Triton kernel's mma.sync tiles of 32 or 64 rows do most of the work.

One program per (sequence, KV head, split): its T * G query rows (r = t * G + g)
are padded to the 64 rows a wgmma tile has (in XLA, before the call); K, V and the
slots' positions stream through shared memory in a pipeline of `steps` blocks of
`bs` slots (plgpu.emit_pipeline: TMA copies of [bs, D] tiles, rows Hkv * D apart);
each block is S = Q K^T (wgmma, K transposed in shared memory), the position rule
(0 <= slot position <= the row's), an online softmax in fp32, P (through shared
memory) times V (wgmma). Each split writes its partial (o, m, l); XLA adds the new
rows' partial and merges them (`merge_partials`, as the Triton kernel's
merge="xla"). Limits: T * G <= 64, D a multiple of 64, bf16, S a multiple of
bs * splits.

    PYTHONPATH=. python3 docs/results/kernels_session12/mgpu_decode.py check      # CPU: GPU interpret mode
    PYTHONPATH=. python3 docs/results/kernels_session12/mgpu_decode.py bench OUT [DEADLINE_S]  # GPU, device timer

`check` runs the kernel in jax's GPU interpreter against reference_attention on
random partly empty caches (T in 1, 2, 9; rebuilt rows before and after cached
slots). The interpreter has no wgmma with a transposed operand,
so there (only) S = Q K^T is a plain dot of the tiles in shared memory; the rest of
the kernel, PV's wgmma included, is what the GPU runs. Its lowering for the GPU is
checked too (`lower(lowering_platforms=("cuda",))`). `bench`: a check against the
reference on the device, then K+V TB/s by device time at the bench shapes (T = 1;
T = 9 with GQA) and SmolLM2's step shape: the Triton kernel's default (and, at
D = 64 and T = 1, 2 warps or 32-slot blocks), this kernel at 2 or 4 pipeline steps
and the Triton plan's split count or one split, cuDNN (T = 1), and a copy.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from adore_jax.attention import NEG_INF, reference_attention
from adore_jax.kernels.common import merge_partials, new_rows_partial

ROWS = 64  # a wgmma tile's rows


def _partials(q, rpos, ck, cv, cpos, *, bs, ns, steps, interpret):
    """q [B, Hkv, 64, D]; rpos [B, 64] (each row's position, -1 on padding rows);
    ck, cv [B, S, Hkv, D]; cpos [B, S] (-1: empty) -> o [B, Hkv, ns, 64, D] fp32
    unnormalised, m, l [B, Hkv, ns, 64]."""
    B, Hkv, M, D = q.shape
    S = ck.shape[1]
    sp = S // ns
    scale = D**-0.5

    def body(q_g, rpos_g, k_g, v_g, pos_g, o_g, m_g, l_g):
        b, h, j = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("j")

        def scoped(q_smem, rpos_smem, p_smem, o_smem, ml_smem, bar):
            plgpu.copy_gmem_to_smem(q_g.at[b, h], q_smem, bar.at[0])
            plgpu.copy_gmem_to_smem(rpos_g.at[b], rpos_smem, bar.at[1])
            plgpu.barrier_wait(bar.at[0])
            plgpu.barrier_wait(bar.at[1])
            rpos = lax.broadcast_in_dim(rpos_smem[...], (M, bs), [0])

            def step(_, k_smem, v_smem, pos_smem, carry):
                acc, m, l = carry
                if interpret is None:
                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
                        return acc_ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((M, bs), jnp.float32))
                else:  # the interpreter has no wgmma with a transposed operand
                    s = lax.dot_general(q_smem[...], k_smem[...], (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
                kpos = lax.broadcast_in_dim(pos_smem[...], (M, bs), [1])
                ok = (kpos >= 0) & (kpos <= rpos)
                s = jnp.where(ok, s * scale, NEG_INF)
                m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp(m - m_new)
                p = jnp.where(ok, jnp.exp(s - lax.broadcast_in_dim(m_new, (M, bs), [0])), 0.0)
                p_smem[...] = p.astype(p_smem.dtype)
                plgpu.commit_smem()

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p_smem, v_smem)
                    return acc_ref[...]

                acc = acc * lax.broadcast_in_dim(alpha, (M, D), [0]) + pl.run_scoped(pv, plgpu.ACC((M, D), jnp.float32))
                return acc, m_new, l * alpha + p.sum(axis=1)

            init = (jnp.zeros((M, D), jnp.float32), jnp.full((M,), NEG_INF, jnp.float32), jnp.zeros((M,), jnp.float32))
            acc, m, l = plgpu.emit_pipeline(
                step, grid=(sp // bs,),
                in_specs=[plgpu.BlockSpec((bs, D), lambda i: (i, 0)), plgpu.BlockSpec((bs, D), lambda i: (i, 0)),
                          plgpu.BlockSpec((bs,), lambda i: (i,))],
                max_concurrent_steps=steps, init_carry=init,
            )(k_g.at[b, pl.ds(j * sp, sp), h], v_g.at[b, pl.ds(j * sp, sp), h], pos_g.at[b, pl.ds(j * sp, sp)])
            o_smem[...] = acc
            ml_smem[0] = m
            ml_smem[1] = l
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_g.at[b, h, j])
            plgpu.copy_smem_to_gmem(ml_smem.at[0], m_g.at[b, h, j])
            plgpu.copy_smem_to_gmem(ml_smem.at[1], l_g.at[b, h, j])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, plgpu.SMEM((M, D), q.dtype), plgpu.SMEM((M,), jnp.int32), plgpu.SMEM((M, bs), q.dtype),
                      plgpu.SMEM((M, D), jnp.float32), plgpu.SMEM((2, M), jnp.float32),
                      plgpu.Barrier(num_arrivals=1, num_barriers=2))

    f32 = jnp.float32
    out_type = (jax.ShapeDtypeStruct((B, Hkv, ns, M, D), f32), jax.ShapeDtypeStruct((B, Hkv, ns, M), f32),
                jax.ShapeDtypeStruct((B, Hkv, ns, M), f32))
    kw = {} if interpret is None else {"interpret": interpret}
    call = plgpu.kernel(body, out_type=out_type, grid=(B, Hkv, ns), grid_names=("b", "h", "j"),
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup), **kw)
    return call(q, rpos, ck, cv, cpos)


def mgpu_attention(q, k, v, ck, cv, cpos, qpos, *, bs=64, ns=1, steps=3, interpret=None):
    """reference_attention's output (q [B, T, Hq, D], cache [B, S, Hkv, D]); T * G <= 64."""
    B, T, Hq, D = q.shape
    S, Hkv = ck.shape[1], ck.shape[2]
    G = Hq // Hkv
    Rr = T * G
    if Rr > ROWS or D % 64 or S % (bs * ns) or q.dtype != jnp.bfloat16:
        raise ValueError(f"mgpu_attention: T*G<=64, D%64==0, S%(bs*ns)==0, bf16; got {q.shape} S={S}")
    qr = q.reshape(B, T, Hkv, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, Rr, D)  # rows r = t * G + g
    qp = jnp.zeros((B, Hkv, ROWS, D), q.dtype).at[:, :, :Rr].set(qr)
    rpos = jnp.full((B, ROWS), -1, jnp.int32).at[:, :Rr].set(jnp.repeat(qpos.astype(jnp.int32), G, axis=1))
    o, m, l = _partials(qp, rpos, ck, cv, cpos.astype(jnp.int32), bs=bs, ns=ns, steps=steps, interpret=interpret)
    on, mn, ln, _ = new_rows_partial(q, k, v, qpos, D**-0.5)
    o = jnp.concatenate([o[..., :Rr, :], on], axis=2)
    m = jnp.concatenate([m[..., :Rr], mn], axis=2)
    l = jnp.concatenate([l[..., :Rr], ln], axis=2)
    return merge_partials(o, m, l, T, G, q.dtype)[0]


def _inputs(seed, B, Hq, Hkv, D, S, T=1, empty=0.3):
    ks = jax.random.split(jax.random.key(seed), 7)
    r = lambda k, s: jax.random.normal(k, s, jnp.float32).astype(jnp.bfloat16)
    q, k, v = r(ks[0], (B, T, Hq, D)), r(ks[1], (B, T, Hkv, D)), r(ks[2], (B, T, Hkv, D))
    ck, cv = r(ks[3], (B, S, Hkv, D)), r(ks[4], (B, S, Hkv, D))
    pos = jnp.broadcast_to(jax.random.permutation(ks[5], S).astype(jnp.int32), (B, S))
    cpos = jnp.where(jax.random.uniform(ks[5], (B, S)) < empty, -1, pos)
    # the current token after every cached slot (or, in odd sequences, at S // 3), rebuilt rows anywhere
    cur = jnp.array([[S], [S // 3]] * (B // 2) + [[S]] * (B % 2), jnp.int32)
    qpos = jnp.concatenate([jax.random.randint(ks[6], (B, T - 1), 0, S + 1), cur], axis=1)
    return q, k, v, ck, cv, cpos, qpos


def _err(args, **kw):
    got = jax.jit(lambda *a: mgpu_attention(*a, **kw))(*args)
    ref = reference_attention(*args).out
    return float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32))))


def check():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    for B, Hq, Hkv, D, S, T, ns, steps in [(2, 8, 2, 64, 256, 1, 2, 2), (2, 3, 3, 128, 192, 1, 1, 3),
                                           (1, 9, 3, 64, 128, 1, 2, 2), (2, 9, 3, 64, 256, 9, 2, 2),
                                           (2, 32, 8, 128, 128, 9, 1, 3), (1, 4, 1, 64, 128, 2, 2, 2)]:
        args = _inputs(B + S + T, B, Hq, Hkv, D, S, T)
        err = _err(args, ns=ns, steps=steps, interpret=InterpretGPUParams())
        low = jax.jit(lambda *a: mgpu_attention(*a, ns=ns, steps=steps)).trace(*args).lower(lowering_platforms=("cuda",))
        ok = err < 2e-2 and "mosaic_gpu" in low.as_text()[:100000]
        print(f"(B,Hq,Hkv,D,S,T)={(B, Hq, Hkv, D, S, T)} splits={ns} steps={steps}: max abs err {err:.2e} against the "
              f"reference; lowers for cuda: {'mosaic_gpu' in low.as_text()[:100000]} -> {'OK' if ok else 'FAIL'}",
              flush=True)
        if not ok:
            sys.exit(1)


def bench(out, deadline=330.0):
    import time

    from adore_jax.kernels import GpuConfig
    from adore_jax.kernels.attention_gpu import padded_rows, plan
    from eval.bench_kernels import attn_set, cudnn, kv_bytes, n_sets, ours, same_size_copy, time_ops

    t0 = time.time()
    for B, Hq, Hkv, D, S, T in [(8, 32, 8, 128, 896, 1), (4, 9, 3, 64, 512, 1), (4, 9, 3, 64, 512, 9),
                                (2, 32, 8, 128, 768, 9)]:  # a device check first (partly empty caches)
        err = _err(_inputs(1, B, Hq, Hkv, D, S, T), ns=2, steps=3)
        print("device check", (B, Hq, Hkv, D, S, T), "max abs err", err, "OK" if err < 2e-2 else "FAIL", flush=True)
    rows = []
    gqa = [(8, 32, 8, 128), (32, 9, 3, 64)]
    cases = [(sh, S, 1) for sh in [(8, 32, 32, 128)] + gqa for S in (1024, 4096, 8192)]
    cases += [((64, 9, 3, 64), 1024, 1)] + [(sh, S, 9) for sh in gqa for S in (1024, 4096, 8192)]
    for (B, Hq, Hkv, D), S, T in cases:
        if time.time() - t0 > deadline:
            print("deadline: stopped before", (B, Hq, Hkv, D, S, T), flush=True)
            break
        nbytes = kv_bytes(B, Hkv, D, S)
        sets = [attn_set(300 + u, B, Hq, Hkv, D, S, T) for u in range(n_sets(nbytes))]
        ns0 = plan(B, Hkv, S, D, GpuConfig(), padded_rows(Hq // Hkv, T))[1]
        impls = {"copy": same_size_copy, "triton": ours(GpuConfig())}
        if T == 1:
            impls["cudnn"] = cudnn
        if T == 1 and D == 64:  # the last T = 1 miss: fewer warps, smaller blocks
            impls["triton_w2"] = ours(GpuConfig(num_warps=2))
            impls["triton_bs32"] = ours(GpuConfig(block_s=32, num_stages=4))
        for ns in sorted({ns0, 1}):
            for steps in (2, 4):
                impls[f"mgpu_n{ns}_s{steps}"] = lambda *a, ns=ns, steps=steps: mgpu_attention(*a, ns=ns, steps=steps)
        row = {"shape": [B, Hq, Hkv, D, S, T], **time_ops(impls, sets, nbytes, copies=("copy",), timer="device")}
        rows.append(row)
        json.dump(rows, open(f"{out}/mgpu_decode.json", "w"), indent=1)
        print(row["shape"], {n: round(v["TBps"], 2) if "TBps" in v else v["error"][-300:] for n, v in row.items()
                             if isinstance(v, dict)}, flush=True)
        del sets
    print("\nK+V TB/s by device time (copy: read + write)")
    for row in rows:
        print(row["shape"], " ".join(f"{n} {v['TBps']:.2f}" for n, v in row.items() if isinstance(v, dict) and "TBps" in v))


if __name__ == "__main__":
    check() if sys.argv[1] == "check" else bench(sys.argv[2], *map(float, sys.argv[3:4]))
