"""Engine behaviour on a tiny random model: batching, chunking, streaming, sampling."""

import jax
import numpy as np
import pytest

from adore_jax import engine
from adore_jax.sampling import SamplingParams
from models.llama import LlamaConfig
from tiny_model import CFG, prompts, tiny_params



@pytest.fixture(scope="module")
def params():
    return tiny_params()


_prompts = prompts


def test_batch_mixed_lengths_equals_single(params):
    prompts = _prompts(1, [3, 17, 9, 1])
    batched = engine.generate(params, CFG, prompts, 24)
    for p, b in zip(prompts, batched):
        assert engine.generate(params, CFG, [p], 24) == [b]


def test_chunked_prefill_equals_one_chunk(params):
    prompts = _prompts(2, [37, 20])
    whole = engine.generate(params, CFG, prompts, 16)
    chunked = engine.generate(params, CFG, prompts, 16, chunk=8)
    assert whole == chunked
    assert len(whole[0]) > 0


def test_unstacked_layers_equal_the_scan(params):
    """Per-layer weight buffers (unrolled layers) give the scan's log-probs and tokens,
    for full attention and for ADORE with rebuilt rows."""
    from adore_jax.policies import build_policy
    from models.llama import unstack_layers

    flat = unstack_layers(params)
    assert isinstance(flat.layers, tuple) and len(flat.layers) == CFG.num_layers
    prompts = _prompts(6, [13, 5])
    assert engine.generate(flat, CFG, prompts, 12) == engine.generate(params, CFG, prompts, 12)
    toks = np.array(_prompts(7, [40, 40]))
    pol, pp, _ = build_policy("adore", CFG, 16, rebuild=2)
    want, _ = engine.score(params, CFG, toks, 4, pp, policy=pol)
    got, _ = engine.score(flat, CFG, toks, 4, pp, policy=pol)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_layer_layouts_round_trip(params):
    """stack_layers undoes unstack_layers (device and host arrays); "auto" is stacked
    on the CPU; an unknown layout is a ValueError."""
    import jax
    import pytest

    from models.llama import default_layout, stack_layers, unstack_layers, with_layout

    same = lambda a, b: jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: bool((np.asarray(x) == np.asarray(y)).all()), a, b))
    assert same(stack_layers(unstack_layers(params)), params)
    host = jax.tree_util.tree_map(np.asarray, params)
    assert isinstance(unstack_layers(host).layers[1].wq, np.ndarray) and same(stack_layers(unstack_layers(host)), host)
    assert default_layout() == "stacked" and with_layout(params) is params
    assert isinstance(with_layout(params, "unstacked").layers, tuple)
    with pytest.raises(ValueError, match="layout"):
        with_layout(params, "sideways")


def test_stream_equals_generate(params):
    prompts = _prompts(3, [5, 11])
    ref = engine.generate(params, CFG, prompts, 20)
    compiled = engine._decode_chunk_jit._cache_size()
    chunks = list(engine.stream(params, CFG, prompts, 20, steps_per_chunk=3))
    assert engine._decode_chunk_jit._cache_size() == compiled + 1  # one chunk program, the short last chunk too
    assert chunks[0].shape == (2, 1)  # first yield: the prefill token
    with pytest.raises(ValueError, match="steps per chunk"):
        next(engine.stream(params, CFG, prompts, 20, steps_per_chunk=0))
    got = np.concatenate(chunks, axis=1)
    for row, r in zip(got, ref):
        assert row[: len(r)].tolist() == r


def test_eos_stops_each_sequence(params):
    # Sampled rows stop at their own EOS; declaring a sampled token EOS cuts right after it.
    prompts = _prompts(4, [6, 6, 6])
    out = engine.generate(params, CFG, prompts, 40, SamplingParams(1.5), seed=3)
    for r in out:
        assert 127 not in r[:-1]  # nothing after an EOS
    cfg_eos = LlamaConfig(**{**vars(CFG), "eos_token_ids": (out[0][2],)})
    cut = engine.generate(params, cfg_eos, prompts[:1], 40, SamplingParams(1.5), seed=3)
    assert cut[0] == out[0][: out[0].index(out[0][2]) + 1]


def test_sampling_seeded_and_truncations(params):
    prompts = _prompts(5, [8, 4])
    greedy = engine.generate(params, CFG, prompts, 16)
    hot = SamplingParams(1.0)
    a = engine.generate(params, CFG, prompts, 16, hot, seed=7)
    assert a == engine.generate(params, CFG, prompts, 16, hot, seed=7)
    assert a != engine.generate(params, CFG, prompts, 16, hot, seed=8)
    assert engine.generate(params, CFG, prompts, 16, SamplingParams(1.0, top_k=1), seed=7) == greedy
    assert engine.generate(params, CFG, prompts, 16, SamplingParams(1.0, top_p=1e-6), seed=7) == greedy
    # a sampled row does not depend on the other rows of the batch
    assert engine.generate(params, CFG, prompts[:1], 16, hot, seed=7) == a[:1]


def test_top_k_restricts_support():
    from adore_jax.sampling import row_keys, sample

    logits = jax.random.normal(jax.random.key(1), (4, 50))
    top3 = np.argsort(-np.asarray(logits), axis=1)[:, :3]
    draw = jax.jit(jax.vmap(lambda k: sample(logits, row_keys(k, 0, 4), SamplingParams(5.0, 3, 1.0).validate())))
    toks = np.asarray(draw(jax.random.split(jax.random.key(0), 50)))  # [50 draws, 4 rows]
    assert all(t in top3[r] for d in toks for r, t in enumerate(d))
    assert len({tuple(d) for d in toks}) > 1  # it does sample


@pytest.mark.parametrize(
    "sp", [SamplingParams(-1.0), SamplingParams(1.0, top_k=-2), SamplingParams(1.0, top_p=0.0), SamplingParams(1.0, top_p=1.5)]
)
def test_invalid_sampling(sp):
    with pytest.raises(ValueError):
        sp.validate()


def test_too_long_prompt(params):
    with pytest.raises(ValueError, match="maximum length"):
        engine.generate(params, CFG, [[1] * 250], 10)


def test_unstacked_layers_give_the_same_features(params):
    """The hidden-state input (the residual entering layer l) is the same whether the
    layers are scanned or unrolled (where it is picked statically), for every l."""
    from models.cache import KVCache
    from models.llama import forward, unstack_layers

    flat = unstack_layers(params)
    cache = KVCache.empty(CFG.num_layers, 2, 8, CFG.num_kv_heads, CFG.head_dim, np.float32)
    tok = np.array(_prompts(9, [5, 5]), np.int32)
    pos = np.tile(np.arange(5, dtype=np.int32), (2, 1))
    feats = []
    for l in range(CFG.num_layers + 1):
        want = forward(params, CFG, tok, pos, cache, feature_layer=l).feature
        got = forward(flat, CFG, tok, pos, cache, feature_layer=l).feature
        np.testing.assert_allclose(got, want, atol=1e-5)
        feats.append(want)
    assert not np.allclose(feats[0], feats[1])  # a different layer, a different input


def test_feature_layer_bad_values(params):
    from models.cache import KVCache
    from adore_jax.controller import feature_layer
    from models.llama import forward

    assert feature_layer("embedding") is None and feature_layer("hidden:8") == 8
    for bad in ("hidden", "hidden:x", "layer:3"):
        with pytest.raises(ValueError, match="embedding or hidden:<layer>"):
            feature_layer(bad)
    empty = KVCache.empty(CFG.num_layers, 1, 0, CFG.num_kv_heads, CFG.head_dim, np.float32)
    tok = np.zeros((1, 1), np.int32)
    with pytest.raises(ValueError, match=r"feature_layer must be in \[0, 2\]"):
        forward(params, CFG, tok, tok, empty, feature_layer=3)
