"""Quality evaluations (eval/) on a tiny random model: correctness of the streaming
perplexity, files written, recall and agreement sanity, the pass-key cell runner."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import agreement, passkey_eval, ppl, recall
from eval.common import build, parse_budgets, parse_policies, parse_policy, segments
from models.cache import KVCache
from models.llama import forward
from tiny_model import CFG, tiny_params

SPECS = parse_policies(["full,window", "adore-r2"])  # few policies: every one compiles its own decode loop


class CharTokenizer:
    """ASCII characters as token ids (fits the tiny model's vocabulary of 128; 127 is EOS)."""

    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) if ord(c) < 127 else ord("?") for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 127)


@pytest.fixture(scope="module")
def params():
    return tiny_params()


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 120, (2, 48)).astype(np.int32)


def test_streaming_full_equals_one_forward(params, tokens):
    # Tolerance: relative 1e-5 on perplexity, 1e-4 absolute on each log-prob (fp32).
    B, L = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    empty = KVCache.empty(CFG.num_layers, B, L, CFG.num_kv_heads, CFG.head_dim, jnp.float32)
    logits, *_ = forward(params, CFG, jnp.asarray(tokens), pos, empty)
    lp = np.asarray(jax.nn.log_softmax(logits[:, :-1]))
    ref = -np.take_along_axis(lp, tokens[:, 1:, None], axis=2)[..., 0]
    nll = ppl.streaming_nll(params, CFG, tokens, prefill=1)
    assert nll.shape == (B, L - 1)
    np.testing.assert_allclose(nll, ref, atol=1e-4)
    assert math.exp(nll.mean()) == pytest.approx(math.exp(ref.mean()), rel=1e-5)


def test_ppl_writes_json_table_plot(params, tokens, tmp_path, monkeypatch):
    # same shapes as the test above: full's decode loop is compiled once for both
    run = lambda: ppl.run_ppl(params, CFG, tokens, SPECS, [8, 48], prefill=1, batch_size=2,
                              meta=dict(text="random tokens"), resume_dir=tmp_path)
    res = run()
    monkeypatch.setattr(ppl, "streaming_nll", lambda *a, **k: pytest.fail("finished rows must be reused"))
    assert run() == res  # a rerun with the same settings resumes from tmp_path/.parts
    paths = ppl.write_ppl(res, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths.values())
    data = json.loads(paths["json"].read_text())
    labels = [s.label for s in SPECS if s.name != "full"]
    assert {(r["policy"], r["budget"]) for r in data["results"]} == {(p, 8) for p in labels}
    assert {(s["policy"], s["budget"]) for s in data["skipped"]} == {(p, 48) for p in labels}
    for row in data["results"] + [data["full"]]:
        assert all(v is not None for k, v in row.items() if k != "budget"), row
        assert row["ppl"] > 1 and math.isfinite(row["ppl_after_budget"])
    assert data["controller"].startswith("random")
    md = paths["md"].read_text()
    assert md.count("| adore-r2 |") == 2 and "=full" in md and "m=8" in md and "{" not in md  # both tables filled in
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_ppl_rows_are_keyed_by_the_cache_dtype(params, tokens, tmp_path):
    """An int8 run beside a float32 one in the same results folder: its rows are its
    own (not the float32 rows resumed), near them, and the result names the dtype."""
    specs = parse_policies(["full"])
    run = lambda kv: ppl.run_ppl(params, CFG, tokens, specs, [8], prefill=1, batch_size=2, resume_dir=tmp_path,
                                 kv_dtype=kv)
    auto, int8 = run("auto"), run("int8")
    assert (auto["kv_dtype"], int8["kv_dtype"]) == ("auto", "int8")
    assert int8["full"]["ppl"] != auto["full"]["ppl"]
    assert int8["full"]["ppl"] == pytest.approx(auto["full"]["ppl"], rel=0.05)
    assert "cache slots int8" in ppl.write_ppl(int8, tmp_path / "int8")["md"].read_text()


def test_recall_oracle_is_one_when_everything_fits(params, tokens):
    n = 32
    res = recall.run_recall(params, CFG, tokens[:, :n], parse_policies(["oracle"]), [n], topk=4)
    assert res["results"][0]["recall"] == 1.0  # m >= n: everything kept
    assert res["results"][0]["kept"] == n and res["queries"] == [n - 1]
    small = recall.run_recall(params, CFG, tokens[:, :n], parse_policies(["window"]), [8], topk=4)["results"][0]
    assert 0 <= small["recall"] <= 1 and small["kept"] == 8
    assert small["precision"] == pytest.approx(small["recall"] * 4 / 8)


def test_set_scores():
    top = np.array([[True, False, True, True]])
    r, p = recall.set_scores(np.array([[0, 1, -1, 9]]), top)
    assert r[0] == pytest.approx(1 / 3) and p[0] == pytest.approx(1 / 2)


def test_passkey_cells_and_heatmap(params, tmp_path):
    tok = CharTokenizer()
    cfg = dataclasses.replace(CFG, max_position_embeddings=1024)
    prompts = passkey_eval.passkey_prompts(tok, 260, [0.0, 1.0], trials=2, seed=1)
    assert len(prompts) == 4 and all(len(p["key"]) == 5 for p in prompts)
    assert prompts == passkey_eval.passkey_prompts(tok, 260, [0.0, 1.0], trials=2, seed=1)  # fixed seeds
    res = passkey_eval.run_passkey(params, cfg, tok, prompts, parse_policies(["full,streaming"]), [32, 4096],
                                   max_new_tokens=4, batch_size=4, chunk=64)
    paths = passkey_eval.write_passkey(res, tmp_path)
    assert {(r["policy"], r["budget"], r["depth"]) for r in res["results"]} == {
        ("full", None, 0.0), ("full", None, 1.0), ("streaming", 32, 0.0), ("streaming", 32, 1.0)}
    assert res["skipped"] == [dict(policy="streaming", budget=4096, reason="m >= prompt + answer: equals full attention")]
    assert all(0 <= r["accuracy"] <= 1 and r["trials"] == 2 for r in res["results"])
    assert paths["png"].read_bytes()[:4] == b"\x89PNG" and "| streaming |" in paths["md"].read_text()


def test_agreement_full_vs_full_is_exact(params, tokens, tmp_path):
    tok = CharTokenizer()
    prompts = agreement.chat_prompts(tok, 2) + agreement.book_prompts(tokens[0].tolist(), 2, 24)
    res = agreement.run_agreement(params, CFG, tok, prompts, parse_policies(["full,window"]), [16],
                                  max_new_tokens=12, batch_size=4)
    for r in res["results"]:
        assert r["prompts"] == 2
        if r["policy"] == "full":
            assert r["match"] == 1.0 and r["rouge_l"] == 1.0
        assert 0 <= r["match"] <= 1 and 0 <= r["bleu"] <= 1
    assert {r["kind"] for r in res["results"]} == {"chat", "book"}
    assert "| window | 16 |" in agreement.write_agreement(res, tmp_path)["md"].read_text()


def test_parsing_and_bad_input():
    assert [s.label for s in parse_policies(["full,adore-r0", "adore-r8", "full"])] == ["full", "adore", "adore-r8"]
    spec = parse_policies(["adore-r8-s4"])[0]
    assert (spec.name, spec.rebuild, spec.sinks) == ("adore", 8, 4)
    assert parse_policies(["adore-s0"])[0].sinks == 0 and parse_policies(["adore"])[0].sinks is None
    policy, _, _ = build(spec, CFG, 32)
    assert policy.sinks == 4 and policy.rebuild == 8
    spec = parse_policies(["adore-s2-w25"])[0]
    assert (spec.rebuild, spec.sinks, spec.recent_pct) == (0, 2, 25)
    policy, _, _ = build(spec, CFG, 32)
    assert (policy.sinks, policy.recent) == (2, 8)
    spec = parse_policies(["adore-w25-q64"])[0]
    assert (spec.label, spec.recent_pct, spec.queries) == ("adore-w25-q64", 25, 64)
    assert build(spec, CFG, 32)[0].prefill_queries == 64 and build(parse_policy("adore"), CFG, 32)[0].prefill_queries == 1
    with pytest.raises(ValueError, match="unknown policy"):
        parse_policy("adore-q0")
    assert parse_budgets(["128,64", "64"]) == [64, 128]
    for bad, fn in ((["lru"], parse_policies), (["adore-s"], parse_policies), (["adore-w100"], parse_policies), (["0"], parse_budgets), (["x"], parse_budgets)):
        with pytest.raises(ValueError):
            fn(bad)
    with pytest.raises(ValueError, match="fewer than one segment"):
        segments(list(range(10)), 16, 2)
    assert segments(list(range(40)), 16, 5).shape == (2, 16)


def test_cli_eval_bad_input_one_line(capsys):
    from adore_jax.cli import main

    assert main(["eval", "ppl", "--policy", "lru"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adore: error: unknown policy 'lru'") and err.count("\n") == 1
    assert main(["eval", "recall", "--kv-dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adore: error: --kv-dtype int8 is taken by `adore eval ppl` only") and err.count("\n") == 1
