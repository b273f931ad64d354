"""The controller ablation: its variants, configs, schedule scores, table and plot."""

import argparse

import numpy as np
import pytest

from tiny_model import CFG, tiny_controller, tiny_params
from train.variants import LEVERS, REFERENCES, _baseline_policies, _controller_policies, plot, schedule_scores, table
from train.variants import train_config, variants


def test_each_variant_turns_off_exactly_its_lever():
    v = variants()
    assert set(v) == {"all", "none", *(f"no-{lever}" for lever in LEVERS)}
    for lever, (on, off) in LEVERS.items():
        assert all(v["all"][k] == val for k, val in on.items()) and all(v["none"][k] == val for k, val in off.items())
        changed = {k for k in v["all"] if v["all"][k] != v[f"no-{lever}"][k]}
        assert changed == set(on), lever
    assert not set(v) & set(REFERENCES)


def test_train_config_resolves_the_recent_window():
    args = argparse.Namespace(seq_len=512, batch_size=2, steps=3, eval_batches=1, num_buckets=12, out="/tmp/x")
    tc = train_config("all", args)
    assert (tc.cache_size, tc.sinks, tc.recent, tc.horizon, tc.num_buckets) == (64, 4, 16, 128, 12)
    tc = train_config("none", args)
    assert (tc.sinks, tc.recent, tc.horizon, tc.on_policy, tc.feature, tc.mix) == (0, 0, 1, 0.0, "embedding", "")


def test_schedule_scores_equal_the_decode_loop_and_score_a_controller():
    """The baselines' perplexities equal those of engine.score through the decode loop."""
    from adore_jax import engine
    from adore_jax.policies import make_policy

    params = tiny_params()
    tokens = np.random.default_rng(0).integers(0, 120, (2, 48)).astype(np.int32)
    base = schedule_scores(params, CFG, tokens, [6, 12], _baseline_policies)
    ppl = lambda pol: float(np.exp(-np.mean(engine.score(params, CFG, tokens, 1, policy=pol)[0])))
    assert base["full"][6] == pytest.approx(ppl(make_policy("full")), rel=1e-5) == base["full"][12]
    assert base["streaming"][6] == pytest.approx(ppl(make_policy("streaming", 6)), rel=1e-5)
    assert base["window"][12] == pytest.approx(ppl(make_policy("window", 12)), rel=1e-5)
    assert base["streaming"][6] != base["streaming"][12]
    gd, state = tiny_controller(seed=1)
    got = schedule_scores(params, CFG, tokens, [6], _controller_policies(gd, state, "embedding", [(0, 0), (2, 25)]))
    assert set(got) == {"s0-w0", "s2-w25"} and all(np.isfinite(d[6]) for d in got.values())
    assert got["s0-w0"][6] != got["s2-w25"][6]


def test_table_and_plot(tmp_path):
    results = {
        "baselines": {"ppl": {"full": {"8": 10.0, "16": 10.0}, "streaming": {"8": 14.0, "16": 12.0},
                              "window": {"8": 20.0, "16": 15.0}}},
        "all": {"ppl": {"s0-w0": {"8": 13.0, "16": 11.0}, "s4-w0": {"8": 12.5, "16": 11.2}}},
    }
    md = table(results, [8, 16])
    assert "| all | s4-w0 | 12.50 | 11.20 |" in md and "| streaming | - | 14.00 | 12.00 |" in md
    plot(results, [8, 16], tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000
