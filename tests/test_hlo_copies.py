"""eval.hlo_copies on programs whose copies are known."""

import jax
import jax.numpy as jnp

from eval.hlo_copies import copies, main
from models.cache import KVCache
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


GPU_STYLE = """
%fused_transpose (param_0: bf16[2,8,4,16]) -> bf16[2,4,8,16] {
  %param_0 = bf16[2,8,4,16]{3,2,1,0} parameter(0)
  ROOT %transpose.1 = bf16[2,4,8,16]{3,2,1,0} transpose(%param_0), dimensions={0,2,1,3}
}

%fused_slice (param_0.3: bf16[2,8,4,16]) -> bf16[1,8,4,16] {
  %param_0.3 = bf16[2,8,4,16]{3,2,1,0} parameter(0)
  ROOT %slice.1 = bf16[1,8,4,16]{3,2,1,0} slice(%param_0.3), slice={[1:2], [0:8], [0:4], [0:16]}
}

%fused_add (param_0.1: f32[4], param_1: f32[4]) -> f32[4] {
  %param_0.1 = f32[4]{0} parameter(0)
  %param_1 = f32[4]{0} parameter(1)
  ROOT %add.1 = f32[4]{0} add(%param_0.1, %param_1)
}

%gemm_fusion_dot (param_0.2: f32[4,4], param_1.2: f32[4,4]) -> f32[4,4] {
  %param_0.2 = f32[4,4]{1,0} parameter(0)
  %param_1.2 = f32[4,4]{1,0} parameter(1)
  %dot.1 = f32[4,4]{1,0} dot(%param_0.2, %param_1.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %transpose.2 = f32[4,4]{1,0} transpose(%dot.1), dimensions={1,0}
}

ENTRY %main.1 (cache: bf16[2,8,4,16], x: f32[4], w: f32[4,4]) -> (bf16[2,4,8,16], f32[4], f32[4,4], bf16[1,8,4,16]) {
  %cache = bf16[2,8,4,16]{3,2,1,0} parameter(0)
  %x = f32[4]{0} parameter(1)
  %w = f32[4,4]{1,0} parameter(2)
  %wrapped_transpose = bf16[2,4,8,16]{3,2,1,0} fusion(%cache), kind=kInput, calls=%fused_transpose
  %wrapped_slice = bf16[1,8,4,16]{3,2,1,0} fusion(%cache), kind=kLoop, calls=%fused_slice
  %loop_add_fusion = f32[4]{0} fusion(%x, %x), kind=kLoop, calls=%fused_add
  %gemm = f32[4,4]{1,0} fusion(%w, %w), kind=kCustom, calls=%gemm_fusion_dot
  ROOT %tuple = (bf16[2,4,8,16]{3,2,1,0}, f32[4]{0}, f32[4,4]{1,0}, bf16[1,8,4,16]{3,2,1,0}) tuple(%wrapped_transpose, %loop_add_fusion, %gemm, %wrapped_slice)
}
"""


def test_transpose_and_slice_fusions_count_as_copies():
    """XLA:GPU writes a layout change as a fusion whose root is a transpose, and a
    static slice as one whose root is a slice: both are listed with their bytes;
    an elementwise fusion and a matmul with a transposed output are not."""
    found = copies(GPU_STYLE)
    assert [(c.op, c.shape, c.nbytes) for c in found] == [("fusion(transpose)", "bf16[2,4,8,16]", 2 * 4 * 8 * 16 * 2),
                                                          ("fusion(slice)", "bf16[1,8,4,16]", 8 * 4 * 16 * 2)]
