"""Controller training: labels, learning, exact resume, and data/fsdp sharding."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adore_jax.controller import Controller, recency_controller
from train.controller import (Job, TrainConfig, features, loss_fn, make_optimizer, metrics_fn, pair_weights,
                              parse_config, schedule_policy, train)
from train.labels import attention_labels, topk_labels
from train.mesh import make_mesh
from tiny_model import CFG, tiny_params

SEQ = 64


def _job(tmp_path, **kw):
    tc = TrainConfig(seq_len=SEQ, batch_size=4, block=16, top_k=8, steps=6, lr=1e-2, warmup=2, eval_every=1000,
                     eval_batches=1, recall_m=(8, 16), save_every=2, log_every=1, out=str(tmp_path), d_c=16, **kw)
    rng = np.random.default_rng(0)
    # a little structure: repeated motifs, so attention and the labels are not uniform
    motifs = rng.integers(0, 120, (8, 8))
    data = motifs[rng.integers(0, 8, (48, SEQ // 8))].reshape(48, SEQ).astype(np.int32)
    return Job(tc.validate(), CFG, tiny_params(), data[:40], data[40:], make_mesh())


def test_topk_labels_match_dense_labels():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 120, (2, SEQ)))
    idx, w = topk_labels(tiny_params(), CFG, tokens, 8, 16)
    attn, y = attention_labels(tiny_params(), CFG, tokens, 8, 16)
    attn, y, idx, w = map(np.asarray, (attn, y, idx, w))
    for b in range(2):
        for t in range(8, SEQ):  # rows with at least K causal keys
            assert set(idx[b, t].tolist()) == set(np.nonzero(y[b, t])[0].tolist())
            np.testing.assert_allclose(np.sort(w[b, t]), np.sort(attn[b, t][idx[b, t]]), rtol=1e-5)


@pytest.mark.parametrize("horizon,agg", [(1, "max"), (5, "max"), (17, "max"), (9, "sum")])
def test_future_labels_match_brute_force(horizon, agg):
    """Top-K of the next H rows' attention (max or sum) against NumPy loops over the
    dense attention; H up to block + 1 crosses block boundaries."""
    K, block = 6, 16
    tokens = jnp.asarray(np.random.default_rng(horizon).integers(0, 120, (2, SEQ)))
    idx, w = map(np.asarray, topk_labels(tiny_params(), CFG, tokens, K, block, horizon, agg))
    attn = np.asarray(attention_labels(tiny_params(), CFG, tokens, K, block)[0], np.float64)
    red = np.max if agg == "max" else np.sum
    for b in range(2):
        for t in range(K, SEQ):
            f = red(attn[b, t:t + horizon, : t + 1], axis=0)
            want = np.argsort(-f)[:K]
            assert set(idx[b, t].tolist()) == set(want.tolist()), (b, t)
            np.testing.assert_allclose(np.sort(w[b, t]), np.sort(f[want]), rtol=1e-4)
    if horizon > 1:  # the future changes the labels
        now = np.asarray(topk_labels(tiny_params(), CFG, tokens, K, block)[0])
        assert (np.sort(now, -1) != np.sort(idx, -1)).any()


def test_pair_weights_follow_the_schedule():
    """On-policy weights: causal pairs times (1 - w), plus w on the unprotected keys
    still held at a row once the cache is full."""
    tc = TrainConfig(seq_len=64, block=16, budget=6, sinks=1, recent=2, on_policy=0.75).validate()
    leave = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 64)), jnp.int32)
    leave = jnp.maximum(leave, jnp.arange(64))  # a position leaves at or after its own step
    rows = jnp.arange(16, 32)
    got = np.asarray(pair_weights(rows, 64, leave, tc))
    for b in range(2):
        for i, t in enumerate(range(16, 32)):
            for j in range(64):
                cand = j <= t <= int(leave[b, j]) and not (j < 1 or j > t - 2)
                want = 0.25 * (j <= t) + 0.75 * cand
                assert got[b, i, j] == pytest.approx(want), (b, t, j)
    off = np.asarray(pair_weights(rows, 64, leave, dataclasses.replace(tc, on_policy=0.0)))
    assert (off[0] == (np.arange(64)[None] <= np.arange(16, 32)[:, None])).all()


def test_training_lowers_loss_and_improves_heldout_auc(tmp_path):
    job = _job(tmp_path)
    job = dataclasses.replace(job, tc=dataclasses.replace(job.tc, steps=30, save_every=100, eval_every=10, lr=2e-2))
    _, metrics = train(job, progress=False)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    evals = [r["eval"] for r in recs if "eval" in r]
    assert len(losses) == 30 and len(evals) == 3
    assert np.mean(losses[-5:]) < 0.92 * np.mean(losses[:5])
    assert evals[-1]["auc"] > evals[0]["auc"]
    assert evals[-1] == metrics
    m = job.tc.cache_size
    assert metrics[f"ppl_full@{m}"] < metrics[f"ppl_streaming@{m}"]  # the schedules cost perplexity
    assert np.isfinite(metrics[f"ppl_adore@{m}"])


def test_on_policy_training_lowers_its_loss(tmp_path):
    """Future labels and the on-policy schedule (protected sinks and recent): a few
    steps lower the on-policy loss on a fixed batch."""
    job = _job(tmp_path, horizon=8, on_policy=1.0, budget=12, sinks=1, recent=3)
    tokens = jnp.asarray(job.train[:4])
    gd, state = nnx.split(Controller(CFG.hidden_size, 16, rngs=nnx.Rngs(0)))
    tc = dataclasses.replace(job.tc, lr=2e-2)
    idx, w = topk_labels(job.params, CFG, tokens, tc.top_k, tc.block, tc.horizon)
    x = features(job.params, CFG, tokens, tc.feature)
    opt = make_optimizer(tc)
    opt_state = opt.init(state)

    @jax.jit
    def losses(state):
        leave = schedule_policy(gd, tc).release_schedule(state, x)
        return loss_fn(nnx.merge(gd, state), x, idx, w, tc, leave)

    @jax.jit  # one compiled step (run op by op, each step took seconds)
    def step(state, opt_state):
        g = jax.grad(losses)(state)
        upd, opt_state = opt.update(g, opt_state, state)
        return optax.apply_updates(state, upd), opt_state

    first = float(losses(state))
    for _ in range(tc.steps):
        state, opt_state = step(state, opt_state)
    assert float(losses(state)) < 0.9 * first


def test_metrics_on_a_recency_controller():
    """Labels = the K most recent keys; a controller that scores by recency only
    (zero query/key weights, bucket bias decreasing with distance) has recall 1,
    precision K/m and AUC 1."""
    K, n = 8, 64
    tc = TrainConfig(seq_len=n, block=16, top_k=K, recall_m=(8, 16)).validate()
    ctrl = recency_controller(CFG.hidden_size, 16)
    t = np.arange(n)[:, None]
    idx = np.maximum(t - np.arange(K)[None], 0)  # [n, K] most recent keys
    w = np.where(t - np.arange(K)[None] >= 0, 1.0, 0.0)
    x = jax.random.normal(jax.random.key(0), (2, n, CFG.hidden_size))
    acc = metrics_fn(ctrl, x, jnp.asarray(np.broadcast_to(idx, (2, n, K))), jnp.asarray(np.broadcast_to(w, (2, n, K)), jnp.float32), tc)
    m = {k: float(s) / int(c) for k, (s, c) in acc.items()}
    assert m["recall@8"] == pytest.approx(1.0) and m["recall@16"] == pytest.approx(1.0)
    assert m["precision@16"] == pytest.approx(0.5)
    assert m["auc"] == pytest.approx(1.0)
    ctrl.bucket_bias[...] = jnp.arange(16, dtype=jnp.float32)  # the opposite preference
    acc = metrics_fn(ctrl, x, jnp.asarray(np.broadcast_to(idx, (2, n, K))), jnp.asarray(np.broadcast_to(w, (2, n, K)), jnp.float32), tc)
    assert float(acc["auc"][0]) / int(acc["auc"][1]) < 0.05


def test_resume_is_exact(tmp_path):
    """Training stopped after step 3 and resumed ends with the uninterrupted run's
    weights, bit for bit (with the listwise loss: the tests above train with bce)."""
    whole, _ = train(_job(tmp_path / "a", loss="listwise"), progress=False)
    train(_job(tmp_path / "b", loss="listwise"), stop_after=3, progress=False)  # "killed" after step 3
    resumed, _ = train(_job(tmp_path / "b", loss="listwise"), progress=False)
    a, b = nnx.state(whole), nnx.state(resumed)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == ["3", "4", "6"]  # keep-last-3: the forced save at the stop, then 4 and 6


def test_eight_fake_devices_same_loss(tmp_path):
    """One step on a (data=4, fsdp=2) mesh of 8 fake CPU devices equals one device."""
    script = textwrap.dedent(f"""
        import sys, json
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import jax, numpy as np
        from test_train import _job
        from train.controller import train
        from train.mesh import make_mesh
        from pathlib import Path
        out = {{}}
        for name, (d, f) in {{"one": (1, 1), "eight": (4, 2)}}.items():
            job = _job(Path({str(tmp_path)!r}) / name)
            devs = jax.devices()[: d * f]
            mesh = jax.sharding.Mesh(np.asarray(devs).reshape(d, f), ("data", "fsdp"))
            job = job.__class__(**{{**job.__dict__, "mesh": mesh}})
            train(job, stop_after=2, progress=False)
            out[name] = [json.loads(l)["loss"] for l in open(Path({str(tmp_path)!r}) / name / "metrics.jsonl")]
        print(json.dumps(out))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
           "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}  # compiling is most of it
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    out = eval(res.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["eight"], out["one"], rtol=1e-5)


def test_config_file_and_overrides(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('seq_len = 512\nloss = "listwise"\nrecall_m = [64, 128]\n')
    tc = parse_config(["--config", str(cfg), "--steps", "7"])
    assert (tc.seq_len, tc.loss, tc.recall_m, tc.steps) == (512, "listwise", (64, 128), 7)
    cfg.write_text("bogus = 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        parse_config(["--config", str(cfg)])
    with pytest.raises(ValueError, match="multiple of block"):
        parse_config(["--seq-len", "100"])


def test_hidden_feature_controller_round_trip(tmp_path):
    """A controller trained on hidden:1 features is saved as such, loads with its
    feature_layer, and build_policy makes an ADORE policy that reads that layer."""
    from adore_jax.controller import load_controller, save_controller
    from adore_jax.policies import build_policy

    job = _job(tmp_path, feature="hidden:1")
    trained, _ = train(dataclasses.replace(job, tc=dataclasses.replace(job.tc, steps=2)), progress=False)
    save_controller(tmp_path / "controller", trained, {"backbone": "tiny"})  # as `adore train-controller` does
    ctrl, meta = load_controller(tmp_path / "controller")
    assert ctrl.feature_layer == 1 and meta["feature"] == "hidden:1"
    policy, _, _ = build_policy("adore", CFG, 16, controller=tmp_path / "controller")
    assert policy.feature_layer == 1


def test_shipped_controller_matches_its_config_file():
    """The shipped controller's recorded training settings are those of the config
    file that reproduces it (bookkeeping fields aside)."""
    from adore_jax.controller import ASSETS

    root = Path(__file__).parent.parent
    tc = parse_config(["--config", str(root / "train" / "configs" / "smollm2-135m.toml")])
    shipped = json.loads((ASSETS / "L30-E576-H9x3-V49152" / "controller.json").read_text())
    bookkeeping = {"out", "eval_every", "save_every", "keep", "log_every"}
    ours = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(tc).items()}
    assert {k: v for k, v in ours.items() if k not in bookkeeping} == \
        {k: v for k, v in shipped["train"].items() if k not in bookkeeping}
    assert shipped["feature"] == tc.feature and shipped["num_buckets"] == tc.num_buckets


def test_prior_lr_scales_only_the_recency_prior():
    """prior_lr multiplies the step of bucket_bias and b0; 1 is plain AdamW on everything."""
    _, state = nnx.split(Controller(CFG.hidden_size, 16, 8, rngs=nnx.Rngs(0)))
    grads = jax.tree_util.tree_map(jnp.ones_like, state)

    def step(tc):
        opt = make_optimizer(tc)
        return opt.update(grads, opt.init(state), state)[0]

    tc = TrainConfig(warmup=0, lr=1e-2).validate()
    base, fast = step(tc), step(dataclasses.replace(tc, prior_lr=10.0))
    plain = optax.chain(optax.clip_by_global_norm(tc.clip), optax.adamw(1e-2, weight_decay=tc.weight_decay))
    want = plain.update(grads, plain.init(state), state)[0]
    for (path, b), f, w in zip(jax.tree_util.tree_leaves_with_path(base), jax.tree_util.tree_leaves(fast),
                               jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(b, w, rtol=1e-6, atol=1e-9)
        prior = any(getattr(k, "key", None) in ("bucket_bias", "b0") for k in path)
        np.testing.assert_allclose(f, 10 * b if prior else b, rtol=1e-5, atol=1e-9)
    assert sum(any(getattr(k, "key", None) in ("bucket_bias", "b0") for k in p)
               for p, _ in jax.tree_util.tree_leaves_with_path(base)) == 2
    with pytest.raises(ValueError, match="prior_lr"):
        TrainConfig(prior_lr=0).validate()
