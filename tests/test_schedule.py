"""Release schedules: release_times against a NumPy simulation, and one parallel
pass under a schedule against the decode loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adore_jax import engine
from adore_jax.policies import make_policy, release_times
from adore_jax.schedule import schedule_logprobs
from models.llama import embed_tokens
from tiny_model import CFG, prompts, tiny_controller, tiny_params


def _np_leave(scores, m, sinks, recent):
    """leave[b, j] by simulating keep-top-m one token a step (protected, score, position)."""
    B, n, _ = scores.shape
    leave = np.full((B, n), n)
    for b in range(B):
        held = []
        for t in range(n):
            held.append(t)
            if len(held) > m:
                key = lambda j: (j < sinks or j > t - recent, scores[b, t, j], j)
                victim = min(held, key=key)
                held.remove(victim)
                leave[b, victim] = t
    return leave


@pytest.mark.parametrize("m,sinks,recent,ties", [(5, 0, 0, False), (6, 2, 3, False), (4, 1, 0, True), (7, 0, 7, False)])
def test_release_times_match_numpy(m, sinks, recent, ties):
    B, n = 3, 29
    rng = np.random.default_rng(m + sinks)
    scores = rng.normal(size=(B, n, n)).astype(np.float32)
    if ties:  # few distinct values: the older of equal scores goes first
        scores = np.round(scores).astype(np.float32)
    leave = release_times(lambda t: jnp.asarray(scores)[:, t], B, n, m, sinks, recent)
    np.testing.assert_array_equal(np.asarray(leave), _np_leave(scores, m, sinks, recent))


@pytest.mark.parametrize("name,kw", [("window", {}), ("streaming", {}), ("adore", {}), ("adore", dict(sinks=2, recent=3))])
def test_schedule_logprobs_equal_the_decode_loop(name, kw):
    """One parallel pass under the policy's schedule gives the decode loop's
    log-probs (fp32 rounding), with a budget far below the length."""
    params = tiny_params()
    gd, state = tiny_controller(seed=3)
    toks = np.asarray(prompts(21, [48, 48, 48]))
    pol = make_policy(name, 9, controller_graphdef=gd, **kw)
    pp = state if name == "adore" else None
    ref, _ = engine.score(params, CFG, toks, 1, policy=pol, policy_params=pp)
    leave = pol.release_schedule(pp, embed_tokens(params, jnp.asarray(toks)))
    assert int(jnp.min(leave)) < 48  # tokens are released
    got = schedule_logprobs(params, CFG, jnp.asarray(toks), leave, 16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)
    full, _ = engine.score(params, CFG, toks, 1)
    assert np.abs(np.asarray(got) - np.asarray(full)).max() > 1e-2  # the schedule matters


def test_schedule_is_refused_where_it_needs_the_decode_loop():
    gd, state = tiny_controller()
    x = jnp.zeros((1, 8, CFG.hidden_size))
    with pytest.raises(NotImplementedError):
        make_policy("tova", 4).release_schedule(None, x)
    with pytest.raises(NotImplementedError):
        make_policy("adore", 4, rebuild=2, controller_graphdef=gd).release_schedule(state, x)
