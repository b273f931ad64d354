"""Cache policies, all run by the same engine, cache, attention and budget m.

`make_policy` builds one by name and checks its settings.
"""

from __future__ import annotations

from typing import Any, Optional

from adore_jax.policies.adore import AdorePolicy, AdoreState
from adore_jax.policies.base import Evicting, Policy, keep_top_m, release_times
from adore_jax.policies.baselines import H2OPolicy, OraclePolicy, RecencyPolicy, TOVAPolicy
from adore_jax.policies.full import FullPolicy, full_policy

POLICIES = ("full", "window", "streaming", "h2o", "tova", "adore", "oracle")
# adore protects this many sink tokens by default (at most a quarter of the slots): an embedding-input
# controller without them loses the first token and its perplexity doubles (docs/TRAINING.md, the ablation)
ADORE_SINKS = 4


def make_policy(
    name: str,
    cache_size: Optional[int] = None,
    *,
    sinks: Optional[int] = None,
    recent: Optional[int] = None,
    rebuild: int = 0,
    rebuild_every: int = 1,
    controller_graphdef: Any = None,
    feature_layer: Optional[int] = None,
    prefill_queries: int = 1,
) -> Policy:
    """Build a policy. cache_size m (slots) is required except for `full`.

    Defaults: streaming keeps 4 sinks + recent; h2o keeps m/2 recent positions;
    adore keeps ADORE_SINKS sinks (at most m/4); tova, window and oracle protect
    nothing unless asked.
    Raises ValueError for invalid settings."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    if name == "full":
        return full_policy
    if cache_size is None or cache_size < 1:
        raise ValueError(f"policy {name} needs a cache size >= 1 (got {cache_size})")
    if sinks is None:
        sinks = {"streaming": 4, "adore": min(ADORE_SINKS, cache_size // 4)}.get(name, 0)
    recent = (cache_size // 2 if name == "h2o" else 0) if recent is None else recent
    if name == "streaming":
        sinks = min(sinks, cache_size)
        recent = cache_size - sinks
    if sinks < 0 or recent < 0:
        raise ValueError("sinks and recent must be >= 0")
    if sinks + recent > cache_size:
        raise ValueError(f"sinks ({sinks}) + recent ({recent}) exceed the cache size ({cache_size})")
    if name != "adore" and rebuild:
        raise ValueError("--rebuild applies to the adore policy only")
    common = dict(cache_size=cache_size, sinks=sinks, recent=recent)
    if name in ("window", "streaming"):
        return RecencyPolicy(**common)
    if name == "h2o":
        return H2OPolicy(**common)
    if name == "tova":
        return TOVAPolicy(**common)
    if name == "oracle":
        return OraclePolicy(**common)
    if rebuild < 0 or rebuild > cache_size:
        raise ValueError(f"rebuild R must be in [0, cache size {cache_size}], got {rebuild}")
    if rebuild_every < 1:
        raise ValueError(f"rebuild-every must be >= 1, got {rebuild_every}")
    if prefill_queries < 1:
        raise ValueError(f"prefill queries must be >= 1, got {prefill_queries}")
    if controller_graphdef is None:
        raise ValueError("the adore policy needs a controller")
    return AdorePolicy(**common, rebuild=rebuild, rebuild_every=rebuild_every, graphdef=controller_graphdef,
                       feature_layer=feature_layer, prefill_queries=prefill_queries)


def build_policy(name: str, cfg, cache_size: Optional[int] = None, *, controller=None, **kw):
    """(policy, policy params, note) for a backbone config: like make_policy, and for
    adore also loads the controller (`controller`: a checkpoint folder; default: the
    packaged one for this backbone, else random; `note` says which)."""
    if name != "adore":
        return make_policy(name, cache_size, **kw), None, ""
    from flax import nnx

    from adore_jax.controller import default_controller

    gd, state, note = default_controller(cfg, controller)
    layer = nnx.merge(gd, state).feature_layer
    return make_policy(name, cache_size, controller_graphdef=gd, feature_layer=layer, **kw), state, note


__all__ = [
    "POLICIES", "ADORE_SINKS", "Policy", "Evicting", "FullPolicy", "full_policy", "RecencyPolicy", "H2OPolicy",
    "TOVAPolicy", "OraclePolicy", "AdorePolicy", "AdoreState", "keep_top_m", "release_times", "make_policy",
    "build_policy",
]
