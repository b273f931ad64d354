"""Stage 1: top-K sparse attention, LoRA, frozen base, the adapter and its merge (tiny random model, random data)."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import reference_attention
from models.cache import KVCache
from models.llama import forward, init_params
from models.lora import TARGETS, apply_lora, init_lora, load_adapter, merge_adapter, save_adapter
from train.finetune import (FinetuneConfig, Job, make_optimizer, nll_sum, parse_config, report_table, run, topk_attention, train,
                            train_step)
from tiny_model import CFG, tiny_params

SEQ = 32


def _attn_inputs(seed=0, B=2, T=6, S=10):
    """Random q/k/v with a partly empty cache and one padding row."""
    ks = jax.random.split(jax.random.key(seed), 5)
    Hq, Hkv, D = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
    q = jax.random.normal(ks[0], (B, T, Hq, D)) * 2
    k, v = (jax.random.normal(kk, (B, T, Hkv, D)) for kk in ks[1:3])
    ck, cv = (jax.random.normal(kk, (B, S, Hkv, D)) for kk in ks[3:5])
    cpos = jnp.array([[*range(S - 3), -1, -1, -1], [-1, *range(S - 1)]], jnp.int32)  # 7 and 9 valid slots
    qpos = jnp.array([[7, 8, 9, 10, 11, -1], [9, 10, 11, 12, 13, 14]], jnp.int32)  # rows see <= 15 keys
    return q, k, v, ck, cv, cpos, qpos


def test_topk_attention_equals_reference_for_large_k_and_differs_for_small_k():
    args = _attn_inputs()
    ref = reference_attention(*args, with_stats=True)
    N = args[3].shape[1] + args[0].shape[1]
    for k in (N, N + 5):  # delegated: exact
        np.testing.assert_array_equal(topk_attention(k)(*args).out, ref.out)
    out = topk_attention(N - 1)(*args, with_stats=True)  # every row has <= 15 valid keys: same math
    np.testing.assert_allclose(out.out, ref.out, atol=1e-5)
    np.testing.assert_allclose(out.mass, ref.mass, atol=1e-5)
    np.testing.assert_allclose(out.lse, ref.lse, atol=1e-5)
    small = topk_attention(3)(*args).out
    assert float(jnp.max(jnp.abs(small - ref.out))) > 1e-2


def test_topk_keeps_exactly_min_k_valid_keys_shared_by_heads():
    q, k, v, ck, cv, cpos, qpos = _attn_inputs(seed=1)
    ref = reference_attention(q, k, v, ck, cv, cpos, qpos, with_stats=True)
    key_pos = jnp.concatenate([cpos, qpos], 1)
    n_valid = np.asarray(((key_pos[:, None] >= 0) & (key_pos[:, None] <= qpos[:, :, None])).sum(-1))
    for K in (1, 4, 9, 12):
        out = topk_attention(K)(q, k, v, ck, cv, cpos, qpos, with_stats=True)
        mass = np.asarray(out.mass)  # [B, T, S+T] summed over heads
        kept = (mass > 0).sum(-1)
        np.testing.assert_array_equal(kept, np.minimum(K, n_valid))
        np.testing.assert_allclose(mass.sum(-1), np.where(n_valid > 0, CFG.num_heads, 0), rtol=1e-5)
        # the kept keys are the top-K of the head-averaged full-attention row
        for b, t in [(0, 0), (1, 3), (1, 5)]:
            top = np.argsort(-np.asarray(ref.mass[b, t]), kind="stable")[: min(K, n_valid[b, t])]
            assert set(np.nonzero(mass[b, t])[0]) == set(top.tolist())


def test_training_step_keeps_no_attention_scores_per_layer():
    """The top-K scores are rematerialized in the backward pass: each further layer
    adds less than half a [B, H, T, T] fp32 score tensor to a step's compiled
    temporaries (without the remat, each layer keeps about six)."""
    import functools

    B, n = 2, 512
    fc = FinetuneConfig(seq_len=n, batch_size=B, top_k=16)
    opt = make_optimizer(fc)

    def temp_bytes(layers):
        cfg = dataclasses.replace(CFG, num_layers=layers)
        params = init_params(cfg, jax.random.key(0), scale=0.3)
        tree = {"base": params, "lora": init_lora(params, 4, jax.random.key(0))}
        args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (tree, jax.eval_shape(opt.init, tree)))
        step = jax.jit(functools.partial(train_step, cfg, fc, opt)).lower(*args, jax.ShapeDtypeStruct((B, n), jnp.int32))
        return step.compile().memory_analysis().temp_size_in_bytes

    per_layer = (temp_bytes(5) - temp_bytes(2)) / 3
    assert per_layer < 0.5 * B * CFG.num_heads * n * n * 4, per_layer


def test_apply_lora_with_zero_b_is_exact_and_merge_matches_on_the_fly():
    params = tiny_params()
    lora = init_lora(params, 4, jax.random.key(1))
    same = apply_lora(params, lora, 8.0)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(same)):
        np.testing.assert_array_equal(a, b)
    assert lora.a["wq"].shape == (CFG.num_layers, CFG.hidden_size, 4)
    assert lora.b["wo"].shape == (CFG.num_layers, 4, CFG.hidden_size)
    # nonzero B: W + A @ B * alpha / r
    lora = dataclasses.replace(lora, b={n: 0.1 * jnp.ones_like(x) for n, x in lora.b.items()})
    merged = apply_lora(params, lora, 8.0)
    want = params.layers.wk + jnp.einsum("lir,lro->lio", lora.a["wk"], lora.b["wk"]) * 2.0
    np.testing.assert_allclose(merged.layers.wk, want, rtol=1e-6)


def _job(tmp_path, **kw):
    fc = FinetuneConfig(seq_len=SEQ, batch_size=4, steps=8, top_k=4, rank=4, alpha=8.0, lr=3e-2, warmup=1,
                        eval_seqs=4, save_every=4, keep=1, log_every=1, out=str(tmp_path / "run"), **kw)
    rng = np.random.default_rng(0)
    motifs = rng.integers(0, 120, (6, 8))  # repeated motifs: learnable next tokens
    data = motifs[rng.integers(0, 6, (12, SEQ // 8))].reshape(12, SEQ).astype(np.int32)
    return Job(fc.validate(), CFG, tiny_params(), data[:8], data[8:])


def test_finetune_lowers_topk_loss_freezes_base_and_saves_the_adapter(tmp_path):
    job = _job(tmp_path)
    base_before = jax.tree_util.tree_map(np.array, job.params)
    batch = jnp.asarray(job.train[:4])
    topk = topk_attention(job.fc.top_k)
    loss0 = nll_sum(job.params, CFG, batch, topk)
    report = run(job, progress=False)
    out = tmp_path / "run"

    # base bitwise unchanged; the adapter merged in changes only the LoRA targets
    merged = merge_adapter(job.params, out / "adapter")
    for a, b in zip(jax.tree_util.tree_leaves(base_before), jax.tree_util.tree_leaves(job.params)):
        np.testing.assert_array_equal(a, b)
    for f in dataclasses.fields(merged.layers):
        old, new = getattr(base_before.layers, f.name), getattr(merged.layers, f.name)
        if old is not None:
            assert (f.name in TARGETS) == (not np.array_equal(old, new)), f.name
    np.testing.assert_array_equal(merged.embed, base_before.embed)

    # the top-K loss on a training batch went down
    loss1 = nll_sum(merged, CFG, batch, topk)
    assert float(loss1[0]) < 0.9 * float(loss0[0])
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 9))
    saved = json.loads((out / "report.json").read_text())
    assert saved["heldout_ppl"] == report["heldout_ppl"]
    assert report["heldout_ppl"]["after"]["topk"] < report["heldout_ppl"]["before"]["topk"]
    assert "| top-4 |" in report_table(report)
    card = (out / "adapter" / "MODEL_CARD.md").read_text()
    assert "| top-4 |" in card and "rank 4, alpha 8.0" in card
    meta = load_adapter(out / "adapter")[1]
    assert (meta["rank"], meta["alpha"], meta["config"]["steps"]) == (4, 8.0, 8)
    with pytest.raises(ValueError, match="exists"):
        run(job, progress=False)


def test_base_stays_bitwise_frozen_through_the_optimizer_and_the_saved_adapter_matches_on_the_fly(tmp_path):
    job = _job(tmp_path, seed=3)
    job = dataclasses.replace(job, fc=dataclasses.replace(job.fc, steps=3, save_every=100))
    base, lora, losses = train(job, progress=False)
    assert len(losses) == 3
    for a, b in zip(jax.tree_util.tree_leaves(job.params), jax.tree_util.tree_leaves(base)):
        np.testing.assert_array_equal(a, b)  # what the optimizer returned for the base
    assert all(float(jnp.abs(x).max()) > 0 for x in lora.b.values())  # the LoRA leaves moved
    fresh = init_lora(job.params, job.fc.rank, jax.random.key(job.fc.seed))
    assert not np.array_equal(fresh.a["wq"], lora.a["wq"])

    tokens = jnp.asarray(job.heldout[:2])
    B, n = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))
    empty = KVCache.empty(CFG.num_layers, B, 0, CFG.num_kv_heads, CFG.head_dim)
    save_adapter(tmp_path / "adapter", lora, job.fc.alpha, {})
    merged = merge_adapter(base, tmp_path / "adapter")
    got = forward(merged, CFG, tokens, pos, empty, topk_attention(4))[0]
    on_the_fly = jax.jit(lambda lo: forward(apply_lora(base, lo, job.fc.alpha), CFG, tokens, pos, empty, topk_attention(4))[0])
    np.testing.assert_allclose(got, on_the_fly(lora), rtol=1e-5, atol=1e-5)


def test_parse_config(tmp_path):
    path = tmp_path / "ft.toml"
    path.write_text('steps = 7\ntop_k = 16\nout = "x"\n')
    fc = parse_config(["--config", str(path), "--rank", "2", "--alpha", "4"])
    assert (fc.steps, fc.top_k, fc.rank, fc.alpha, fc.out) == (7, 16, 2, 4.0, "x")
    path.write_text("bogus = 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        parse_config(["--config", str(path)])
    with pytest.raises(ValueError):
        parse_config(["--rank", "0"])


def test_load_job_reads_the_configured_mix(tmp_path, monkeypatch):
    """`mix` selects the packed rows: load_job asks train.data for that mix's folder."""
    import types

    import models.loading
    import train.data
    from train.finetune import load_job

    asked = []

    def packed(data_dir, tokenizer, seq_len, mix=None):
        asked.append((seq_len, mix))
        for split, n in (("train", 6), ("heldout", 2)):
            np.save(tmp_path / f"{split}.npy", np.full((n, seq_len), 3, np.int32))
        return tmp_path

    model = types.SimpleNamespace(cfg=CFG, params=tiny_params(), tokenizer=None, source="tiny")
    monkeypatch.setattr(models.loading, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(train.data, "load_or_build_packed", packed)
    job = load_job(parse_config(["--seq-len", "16", "--mix", "books=0.5,retrieval=0.5"]))
    assert asked == [(16, "books=0.5,retrieval=0.5")] and job.train.shape == (6, 16)
    load_job(parse_config(["--seq-len", "16"]))
    assert asked[-1] == (16, None)


def test_the_stage1_config_file_parses():
    path = Path(__file__).parents[1] / "train" / "configs" / "stage1-smollm2-135m.toml"
    fc = parse_config(["--config", str(path)])
    assert (fc.seq_len, fc.top_k, fc.top_k * 8) == (2048, 256, fc.seq_len)  # K = 1/8 of the sequence


# Narrative prose written for this test (not from any corpus): the packaged adapter was fitted on books.
PROSE = (
    "Mrs. Hartley had long been of the opinion that a quiet evening at home was worth any number of balls, and "
    "she said so to her daughters with a regularity which did nothing to persuade them. Eleanor, the elder, "
    "listened with the patience of one who has heard a sermon many times and means to profit by none of it; "
    "Lucy, who was but seventeen, declared that she should die of dullness before the winter was out. Their "
    "father, reading by the fire, observed only that the roads were very bad, and that Colonel Ashby had written "
    "to say he would call on Thursday. At this the room fell silent, for each of the ladies had her own reasons "
    "for wishing to know what the Colonel could mean by it, and none of them was willing to be the first to ask."
)


def test_the_packaged_adapter_fits_the_default_model_and_lowers_the_loss_on_prose(smollm2_model):
    """`--adapter packaged` names the shipped Stage-1 adapter; it merges into SmolLM2 and,
    fitted on books, lowers the full-attention loss on narrative prose it never saw."""
    from adore_jax.hub import PACKAGED_ADAPTER, resolve_adapter

    assert resolve_adapter("packaged") == str(PACKAGED_ADAPTER) and resolve_adapter("x/y") == "x/y"
    assert (PACKAGED_ADAPTER / "MODEL_CARD.md").is_file()
    cfg, params = smollm2_model.cfg, smollm2_model.params
    merged = merge_adapter(params, resolve_adapter("packaged"))
    ids = jnp.asarray([smollm2_model.tokenizer.encode(PROSE)], jnp.int32)
    base, n = nll_sum(params, cfg, ids)
    adapted, _ = nll_sum(merged, cfg, ids)
    assert n > 100
    assert float(adapted) / n < float(base) / n - 0.1, (float(base) / n, float(adapted) / n)
