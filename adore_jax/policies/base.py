"""The policy interface: which rows run each step and where their KV goes."""

from __future__ import annotations

from typing import Any, Protocol

import jax


class Policy(Protocol):
    """A static (hashable) eviction policy. All methods run inside jit.

    Shapes: B batch, T rows this step, S cache slots.
    """

    needs_stats: bool  # forward must return attention mass per key

    def num_slots(self, max_total: int) -> int:
        """Cache slots for sequences of at most max_total tokens."""
        ...

    def init(self, batch: int, max_total: int) -> Any:
        """Initial policy state pytree."""
        ...

    def select_rows(self, state, cache, tokens: jax.Array, positions: jax.Array):
        """Rows to run: given the new tokens [B, T0] return tokens, positions [B, T], state."""
        ...

    def assign_slots(self, state, cache, positions: jax.Array, mass):
        """Slots [B, T] (-1: drop) for the rows just run, and the new state."""
        ...
