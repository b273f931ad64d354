"""Cache policies, all run by the same engine, cache and attention functions."""

from adore_jax.policies.base import Policy
from adore_jax.policies.full import FullPolicy, full_policy

__all__ = ["Policy", "FullPolicy", "full_policy"]
