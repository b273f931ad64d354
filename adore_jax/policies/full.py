"""Full attention: every token keeps its KV; slot index = position."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class FullPolicy:
    needs_stats: bool = False

    def num_slots(self, max_total: int) -> int:
        return max_total

    def init(self, batch: int, max_total: int):
        return ()

    def select_rows(self, state, cache, tokens, positions):
        return tokens, positions, state

    def assign_slots(self, state, cache, positions, mass):
        return jnp.where(positions >= 0, positions, -1), state


full_policy = FullPolicy()
