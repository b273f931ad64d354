"""Policies: equality with full attention at large budgets, cache bounds, the
baselines against NumPy references, rebuilt KV against a plain recomputation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adore_jax import engine
from adore_jax.policies import POLICIES, make_policy
from adore_jax.sampling import SamplingParams
from models.cache import KVCache, write_rows
from models.llama import embed_tokens, forward
from tiny_model import CFG, prompts, tiny_controller, tiny_params


@pytest.fixture(scope="module")
def params():
    return tiny_params()


@pytest.fixture(scope="module")
def ctrl():
    return tiny_controller()


def _policy(name, m, ctrl, **kw):
    return make_policy(name, m, controller_graphdef=ctrl[0], **kw)


@pytest.mark.parametrize("name", [p for p in POLICIES if p != "full"] + ["adore-hidden"])
def test_large_budget_equals_full(params, ctrl, name):
    """m >= total length: teacher-forced log-probs equal full attention's to 1e-5
    (fp32), and greedy text is identical."""
    toks = np.asarray(prompts(11, [40, 40]))
    ref, _ = engine.score(params, CFG, toks, 9)
    kw = dict(rebuild=3) if name.startswith("adore") else {}
    if name == "adore-hidden":  # a controller reading the hidden state entering layer 1
        name, ctrl, kw = "adore", tiny_controller(feature_layer=1), dict(kw, feature_layer=1)
    pol = _policy(name, 64, ctrl, **kw)
    got, _ = engine.score(params, CFG, toks, 9, policy=pol, policy_params=ctrl[1], chunk=4)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    ps = prompts(12, [7, 13])
    assert engine.generate(params, CFG, ps, 20, policy=pol, policy_params=ctrl[1]) == engine.generate(params, CFG, ps, 20)


@pytest.mark.parametrize("name", ["window", "streaming", "h2o", "tova", "adore", "adore-hidden"])
def test_cache_never_exceeds_budget(params, ctrl, name):
    m = 8
    kw = dict(rebuild=2) if name.startswith("adore") else {}
    if name == "adore-hidden":
        name, ctrl, kw = "adore", tiny_controller(feature_layer=2), dict(kw, feature_layer=2)
    toks = np.asarray(prompts(13, [30, 30]))
    _, cache = engine.score(params, CFG, toks, 20, policy=_policy(name, m, ctrl, **kw), policy_params=ctrl[1], chunk=8)
    assert cache.pos.shape[1] == m
    pos = np.asarray(cache.pos)
    for row in pos:
        held = row[row >= 0]
        assert len(held) == m and len(set(held.tolist())) == m
        if name in ("window", "streaming", "h2o"):  # recency-protected: the last token fed stays
            assert held.max() == 28  # (the last target is scored, not fed)
    if name == "window":
        assert all(sorted(r.tolist()) == list(range(21, 29)) for r in pos)
    if name == "streaming":
        assert all(sorted(r.tolist()) == [0, 1, 2, 3, 25, 26, 27, 28] for r in pos)


def test_streaming_prefill_cuts_back_and_releases_kv(params, ctrl):
    """A prompt longer than m, prefilled in chunks: the cache keeps the last m
    (window) and the released tokens' keys are gone from every slot."""
    toks = np.asarray(prompts(14, [37]))
    _, full_cache = engine.score(params, CFG, toks, 36)
    _, cache = engine.score(params, CFG, toks, 36, policy=_policy("window", 6, ctrl), chunk=8)
    assert sorted(np.asarray(cache.pos)[0].tolist()) == list(range(30, 36))
    # Released tokens' keys (layer 0 is the same in both runs: it depends on the token and position only).
    released = np.asarray(full_cache.k[0, 0, :30])
    kept = np.asarray(cache.k[0, 0])
    for r in released:
        assert not np.any(np.all(np.isclose(kept, r[None], atol=1e-6), axis=(1, 2)))


# ---------------------------------------------------------------- baselines vs NumPy


def _np_keep(cands, score, protected, m):
    """Reference top-m: protected first, then score, then larger position."""
    if len(cands) <= m:
        return set(cands)
    order = sorted(cands, key=lambda p: (p in protected, score[p], p), reverse=True)
    return set(order[:m])


@pytest.mark.parametrize("name,sinks,recent", [("window", 0, 0), ("streaming", 2, None), ("h2o", 0, 3), ("tova", 0, 0), ("tova", 1, 2)])
def test_baseline_choice_matches_numpy(name, sinks, recent):
    m, n, B = 6, 25, 2
    pol = make_policy(name, m, sinks=sinks, recent=recent)
    rng = np.random.default_rng(0)
    cache = KVCache.empty(1, B, m, 1, 1)
    state = pol.init(None, B, n)
    kept = [set() for _ in range(B)]
    acc = np.zeros((B, n))
    for t in range(n):
        positions = jnp.full((B, 1), t, jnp.int32)
        mass = rng.random((B, 1, m + 1)).astype(np.float32)
        slots, state = pol.assign_slots(None, state, cache, positions, jnp.asarray(mass))
        pos_before = np.asarray(cache.pos)
        cache = write_rows(cache, jnp.zeros((1, B, 1, 1, 1)), jnp.zeros((1, B, 1, 1, 1)), slots, positions)
        for b in range(B):
            keys = list(pos_before[b]) + [t]
            score = {}
            for j, p in enumerate(keys):
                if p < 0:
                    continue
                if name == "h2o":
                    acc[b, p] += mass[b, 0, j]
                    score[p] = acc[b, p]
                elif name == "tova":
                    score[p] = mass[b, 0, j]
                else:
                    score[p] = p
            prot = {p for p in score if p < pol.sinks or p > t - pol.recent}
            kept[b] = _np_keep(sorted(score), score, prot, m)
            held = set(np.asarray(cache.pos)[b][np.asarray(cache.pos)[b] >= 0].tolist())
            assert held == kept[b], (name, t, b)


# ---------------------------------------------------------------- ADORE rebuild


_forward = jax.jit(forward, static_argnums=1)  # the model's forward in one program (op by op, each shape compiles ~100 small ones)


def _reference_rows_kv(params, cache, tokens, positions):
    """Recompute rows one at a time (T = 1 forwards), each against a cache view
    holding only slots at earlier positions plus the rows already recomputed at
    positions <= its own. Returns {position: (k [L, Hkv, D], v)}."""
    out = {}
    rows = sorted((int(p), int(t)) for p, t in zip(positions, tokens) if p >= 0)
    for p, tok in rows:
        done = [q for q in out if q <= p and q != p]
        S = cache.pos.shape[1]
        view = KVCache(
            jnp.concatenate([cache.k, jnp.zeros((CFG.num_layers, 1, len(done), *cache.k.shape[3:]))], 2),
            jnp.concatenate([cache.v, jnp.zeros((CFG.num_layers, 1, len(done), *cache.v.shape[3:]))], 2),
            jnp.concatenate([jnp.where(cache.pos < p, cache.pos, -1), jnp.full((1, len(done)), -1, jnp.int32)], 1),
        )
        for i, q in enumerate(done):
            k, v = out[q]
            view = write_rows(view, k[:, None, None], v[:, None, None], jnp.array([[S + i]]), jnp.array([[q]]))
        _, nk, nv, *_ = _forward(params, CFG, jnp.array([[tok]]), jnp.array([[p]]), view)
        out[p] = (nk[:, 0, 0], nv[:, 0, 0])
    return out


def test_rebuilt_kv_equals_plain_recomputation(params, ctrl):
    pol = _policy("adore", 6, ctrl, rebuild=3)
    select_rows = jax.jit(pol.select_rows, static_argnums=6)
    rebuilt_seen = 0
    for seed in range(6):
        p = prompts(20 + seed, [1 + seed * 3])
        s = engine.decode(params, CFG, p, 12, policy=pol, policy_params=ctrl[1])
        rows_tok, rows_pos, _ = select_rows(ctrl[1], s.policy_state, s.cache, s.last[:, None], s.pos[:, None], params.embed, True)
        rows_pos = np.asarray(rows_pos)[0]
        if (rows_pos[1:] < 0).all():
            continue
        rebuilt_seen += 1
        assert not set(rows_pos[1:][rows_pos[1:] >= 0]) & set(np.asarray(s.cache.pos)[0].tolist())  # only released tokens
        _, nk, nv, *_ = _forward(params, CFG, rows_tok, jnp.asarray(rows_pos[None]), s.cache)
        ref = _reference_rows_kv(params, s.cache, np.asarray(rows_tok)[0], rows_pos)
        for r, pos in enumerate(rows_pos):
            if pos >= 0:
                np.testing.assert_allclose(nk[:, 0, r], ref[pos][0], atol=1e-5)
                np.testing.assert_allclose(nv[:, 0, r], ref[pos][1], atol=1e-5)
    assert rebuilt_seen >= 2


@pytest.mark.parametrize("rebuild", [0, 3])
def test_adore_never_releases_protected_positions(params, ctrl, rebuild):
    """ADORE with 2 sinks and 5 recent positions protected, m = 10, after every
    prefix length (each token through a decode step, with and without rebuild):
    the cache holds the sinks and the 5 latest positions."""
    pol = _policy("adore", 10, ctrl, sinks=2, recent=5, rebuild=rebuild)
    toks = np.asarray(prompts(41, [40, 40]))
    for n in (19, 40):
        _, cache = engine.score(params, CFG, toks[:, :n], 1, policy=pol, policy_params=ctrl[1])
        for row in np.asarray(cache.pos):  # the last token is scored, not fed: n - 2 is the latest held
            assert {0, 1} | set(range(n - 6, n - 1)) <= set(row.tolist()), (n, sorted(row.tolist()))
    leave = np.asarray(pol.__class__(10, 2, 5, graphdef=ctrl[0]).release_schedule(ctrl[1], embed_tokens(params, toks)))
    assert (leave[:, :2] == 40).all() and (leave[:, 2:] >= np.minimum(np.arange(2, 40) + 5, 40)).all()


def test_adore_deterministic_and_batch_independent(params, ctrl):
    pol = _policy("adore", 8, ctrl, rebuild=2, rebuild_every=2)
    ps = prompts(30, [12, 25, 5, 17])
    hot = SamplingParams(0.8, top_k=20)
    a = engine.generate(params, CFG, ps, 24, hot, seed=3, policy=pol, policy_params=ctrl[1])
    assert a == engine.generate(params, CFG, ps, 24, hot, seed=3, policy=pol, policy_params=ctrl[1])
    # Row keys depend on (seed, step, row index): a batch of one equals row 0 when sampling,
    assert engine.generate(params, CFG, ps[:1], 24, hot, seed=3, policy=pol, policy_params=ctrl[1]) == [a[0]]
    # and greedy decisions equal those of any row.
    g = engine.generate(params, CFG, ps, 24, policy=pol, policy_params=ctrl[1])
    assert engine.generate(params, CFG, ps[2:3], 24, policy=pol, policy_params=ctrl[1]) == [g[2]]


@pytest.mark.parametrize("queries", [1, 5, 40])
def test_a_prefill_cut_keeps_the_best_scores_over_the_chunks_last_queries(params, ctrl, queries):
    """One prefill chunk of 19 tokens cut to m = 6: each position's score is its
    best controller logit over the chunk's last Q queries (NumPy over the
    controller's own q and k; Q beyond the chunk: all of it), and the cache keeps
    the 6 best positions."""
    gd, state = ctrl
    pol = _policy("adore", 6, ctrl, sinks=0, prefill_queries=queries)
    ps = prompts(7, [19, 14])
    s = engine.decode(params, CFG, ps, 1, policy=pol, policy_params=state, chunk=19)  # the prefill only
    c = nnx.merge(gd, state)
    for b, p in enumerate(ps):
        n = len(p)
        x = embed_tokens(params, jnp.asarray([p]))
        _, q, k = c.scan(c.init_state(1), x, jnp.ones((1, n), bool))
        pos = jnp.arange(n)[None]
        logits = np.asarray(c.logits(q, pos, k, pos))[0]  # [query, key]
        rows = range(max(n - queries, 0), n)
        want = np.max([np.where(np.arange(n) <= i, logits[i], -np.inf) for i in rows], axis=0)
        np.testing.assert_allclose(np.asarray(s.policy_state.score[b, :n]), want, rtol=1e-5, atol=1e-5)
        kept = set(np.asarray(s.cache.pos[b])[np.asarray(s.cache.pos[b]) >= 0].tolist())
        assert kept == set(np.argsort(-want, kind="stable")[:6].tolist()), (sorted(kept), want)


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(name="adore", cache_size=0), "cache size"),
        (dict(name="window", cache_size=None), "cache size"),
        (dict(name="adore", cache_size=8, sinks=4, recent=5), "exceed the cache size"),
        (dict(name="adore", cache_size=8, rebuild=9), "rebuild R"),
        (dict(name="adore", cache_size=8, rebuild_every=0), "rebuild-every"),
        (dict(name="adore", cache_size=8, prefill_queries=0), "prefill queries"),
        (dict(name="h2o", cache_size=8, rebuild=2), "adore policy only"),
        (dict(name="lru", cache_size=8), "unknown policy"),
    ],
)
def test_invalid_settings(ctrl, kw, msg):
    with pytest.raises(ValueError, match=msg):
        make_policy(kw.pop("name"), kw.pop("cache_size"), controller_graphdef=ctrl[0], **kw)


def test_stats_policy_needs_stats_kernel(params):
    from models.attention import reference_attention

    def no_stats(*a, **k):
        return reference_attention(*a, **k)

    no_stats.supports_stats = False
    with pytest.raises(ValueError, match="statistics"):
        engine.generate(params, CFG, [[1, 2]], 4, policy=make_policy("h2o", 8), attn_fn=no_stats)


def test_rebuild_every_k_skips_rows_with_the_same_result(params, ctrl):
    """Rebuilding every k steps (periods of an (R+1)-row step and k - 1 1-row
    steps, a shorter period last) equals a reference that always runs the R+1 rows
    and masks them when not due: in scoring, in generation, and streamed in chunks."""
    from adore_jax.policies import AdorePolicy

    @dataclasses.dataclass(frozen=True)
    class MaskedEvery(AdorePolicy):
        period = 1

        def select_rows(self, pp, st, cache, tokens, positions, embed, decode, extra=True):
            due = st.step % self.rebuild_every == 0
            toks, pos, st = super().select_rows(pp, st, cache, tokens, positions, embed, decode, extra)
            if toks.shape[1] > tokens.shape[1]:
                pos = pos.at[:, 1:].set(jnp.where(due, pos[:, 1:], -1))
            return toks, pos, st

    fast = _policy("adore", 8, ctrl, rebuild=3, rebuild_every=3)
    ref = MaskedEvery(**{f.name: getattr(fast, f.name) for f in dataclasses.fields(fast)})
    toks = np.asarray(prompts(50, [40, 40]))
    a, _ = engine.score(params, CFG, toks, 6, policy=fast, policy_params=ctrl[1])
    b, _ = engine.score(params, CFG, toks, 6, policy=ref, policy_params=ctrl[1])
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    every1, _ = engine.score(params, CFG, toks, 6, policy=_policy("adore", 8, ctrl, rebuild=3), policy_params=ctrl[1])
    assert np.abs(every1 - a).max() > 1e-4  # rebuilding every step is a different run
    no_eos = dataclasses.replace(CFG, eos_token_ids=())
    ps = prompts(51, [30, 17])  # 11 new tokens: 10 decode steps, periods 3 + 3 + 3 + 1
    got = engine.decode(params, no_eos, ps, 11, policy=fast, policy_params=ctrl[1], chunk=8)
    want = engine.decode(params, no_eos, ps, 11, policy=ref, policy_params=ctrl[1], chunk=8)
    np.testing.assert_array_equal(np.asarray(got.out), np.asarray(want.out))
    np.testing.assert_array_equal(np.asarray(got.cache.pos), np.asarray(want.cache.pos))
    assert int(got.policy_state.step) == int(want.policy_state.step) == 10
    streamed = list(engine.stream(params, no_eos, ps, 11, steps_per_chunk=2, policy=fast, policy_params=ctrl[1], chunk=8))
    assert [c.shape[1] for c in streamed] == [1, 3, 3, 3, 1]  # chunks of 2 rounded up to the period
    np.testing.assert_array_equal(np.concatenate(streamed, axis=1), np.asarray(got.out))


def test_hidden_controller_keys_match_training_features(params):
    """A hidden-state controller in decode (nothing evicted) stores, for every
    token, the key the same controller gives over train.controller.features of a
    plain full-attention forward: the decode path feeds it the same inputs."""
    from train.controller import features

    gd, state = tiny_controller(feature_layer=1)
    ps = prompts(21, [11, 11])
    pol = _policy("adore", 64, (gd, state), rebuild=2, feature_layer=1)
    no_eos = dataclasses.replace(CFG, eos_token_ids=())  # every sequence feeds all 8 of its new tokens
    s = engine.decode(params, no_eos, ps, 9, policy=pol, policy_params=state, chunk=4)
    seq = np.concatenate([np.asarray(ps), np.asarray(s.out)[:, :8]], axis=1)  # the 19 tokens fed
    x = features(params, CFG, jnp.asarray(seq), "hidden:1")
    ctrl = nnx.merge(gd, state)
    _, _, want = ctrl.scan(ctrl.init_state(2), x, jnp.ones(seq.shape, bool))
    np.testing.assert_allclose(np.asarray(s.policy_state.key[:, :19]), np.asarray(want), atol=2e-5)
    with pytest.raises(ValueError, match="feature_layer"):  # a policy built without the controller's input
        engine.decode(params, CFG, ps, 2, policy=_policy("adore", 64, (gd, state)), policy_params=state)


@pytest.mark.parametrize("name", ["full", "adore"])
def test_prefill_in_groups_equals_the_whole_batch(params, ctrl, name):
    """Prefilling 4 sequences in groups (of 1, and of 2 when 3 is asked: the largest
    divisor of the batch) gives the whole batch's cache, policy state and first
    tokens, then the same generated tokens and scores. Full attention (no policy
    state) and ADORE (state leaves per sequence and a step count shared by the
    batch): the grouping is the same code for every policy, by the kind of leaf."""
    pol = {} if name == "full" else {"policy": _policy(name, 8, ctrl, **({"rebuild": 2} if name == "adore" else {}))}
    pp = ctrl[1] if name == "adore" else None
    kw = dict(pol, policy_params=pp)
    ps = prompts(31, [12, 25, 5, 17])
    ec, toks, lens = engine._prepare(CFG, ps, 6, {"chunk": 8, **pol})
    args = (params, pp, CFG, ec, toks, lens, jax.random.key(0), SamplingParams().validate())
    run = lambda ec: engine._prefill_jit(*args[:3], ec, *args[4:])
    temp = lambda ec: engine._prefill_jit.lower(*args[:3], ec, *args[4:]).compile().memory_analysis().temp_size_in_bytes
    whole = dataclasses.replace(run(ec), key=None)  # the key is the one passed in
    assert temp(dataclasses.replace(ec, prefill_group=1)) < temp(ec)  # one sequence's temporaries at a time
    for g in (1, 3):
        assert engine.group_size(4, g) == {1: 1, 3: 2}[g]
        got = dataclasses.replace(run(dataclasses.replace(ec, prefill_group=g)), key=None)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), got, whole)
        np.testing.assert_array_equal(got.cache.pos, whole.cache.pos)  # the slots each group chose
    want = engine.generate(params, CFG, ps, 6, chunk=8, **kw)
    assert engine.generate(params, CFG, ps, 6, chunk=8, prefill_group=2, **kw) == want
    toks2 = np.array(prompts(32, [30, 30, 30]))
    ref, _ = engine.score(params, CFG, toks2, 16, pp, chunk=8, **pol)
    got, _ = engine.score(params, CFG, toks2, 16, pp, chunk=8, prefill_group=1, **pol)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    with pytest.raises(ValueError, match="prefill group"):
        engine.generate(params, CFG, ps, 6, prefill_group=0, **kw)
