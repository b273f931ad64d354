"""eval.hlo_copies on programs whose copies are known."""

import jax
import jax.numpy as jnp

from adore_jax.cache import KVCache
from eval.hlo_copies import copies, main
from models.llama import forward, init_params, unstack_layers
from tiny_model import CFG


def _decode_step_hlo(params) -> str:
    cache = KVCache.empty(CFG.num_layers, 2, 32, CFG.num_kv_heads, CFG.head_dim, jnp.float32)
    tok = jnp.zeros((2, 1), jnp.int32)
    fn = jax.jit(lambda p: forward(p, CFG, tok, tok, cache).logits)
    return fn.lower(params).compile().as_text()


def test_scan_materializes_each_layers_weights_unstacked_does_not(tmp_path, capsys):
    """Scanned over stacked weights, the step slices out (copies) every weight
    matrix of a layer per iteration; with per-layer buffers nothing is sliced."""
    params = init_params(CFG, jax.random.key(0))
    matrices = [x for x in jax.tree_util.tree_leaves(params.layers) if x.ndim == 3]
    one_layer = sum(x[0].size * x.dtype.itemsize for x in matrices)
    sliced = [c for c in copies(_decode_step_hlo(params)) if "dynamic-slice" in c.op]
    assert sum(c.nbytes for c in sliced) >= one_layer
    assert not any("dynamic-slice" in c.op for c in copies(_decode_step_hlo(unstack_layers(params))))
    path = tmp_path / "step.hlo.txt"
    path.write_text(_decode_step_hlo(params))
    assert main([str(path)]) == 0 and "dynamic-slice" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.txt")]) == 2
