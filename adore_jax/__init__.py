"""adore-jax: ADORE (adaptive token release) sparse-attention decoding in JAX.

Entry points: `adore_jax.engine` (generate, stream, decode, score),
`adore_jax.policies` (build_policy, make_policy), `models` (load_model),
and the `adore` command (adore_jax.cli).
"""
