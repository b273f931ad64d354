"""Full attention: every token keeps its KV; slot index = position."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from adore_jax.policies.base import Policy


@dataclasses.dataclass(frozen=True)
class FullPolicy(Policy):
    """Full attention: a slot for every position, nothing released (the reference)."""

    def num_slots(self, max_total: int) -> int:
        return max_total

    def assign_slots(self, pp, state, cache, positions, mass, feature=None):
        return jnp.where(positions >= 0, positions, -1), state


full_policy = FullPolicy()
