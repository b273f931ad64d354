"""LoRA adapters (models/lora.py): the merge in both layer layouts, adapter folders, load_model(adapter=)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.llama import stack_layers, unstack_layers
from models.loading import ModelLoadError, load_model
from models.lora import TARGETS, apply_lora, init_lora, load_adapter, merge_adapter, save_adapter
from tiny_model import CFG, tiny_params


def _random_lora(params, rank=3, seed=0):
    lora = init_lora(params, rank, jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 1), len(TARGETS))
    return dataclasses.replace(lora, b={n: jax.random.normal(k, lora.b[n].shape) for n, k in zip(TARGETS, keys)})


def test_merge_is_the_same_in_both_layouts_and_round_trips_through_a_folder(tmp_path):
    params = tiny_params()
    lora = _random_lora(params)
    stacked = apply_lora(params, lora, 6.0)
    unstacked = apply_lora(unstack_layers(params), lora, 6.0)
    for a, b in zip(jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(stack_layers(unstacked))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    want = params.layers.wv[1] + lora.a["wv"][1] @ lora.b["wv"][1] * 2.0
    np.testing.assert_allclose(stacked.layers.wv[1], want, rtol=1e-5, atol=1e-5)

    save_adapter(tmp_path / "ad", lora, 6.0, {"note": "test"})
    back, meta = load_adapter(tmp_path / "ad")
    assert (meta["rank"], meta["alpha"], meta["note"]) == (3, 6.0, "test")
    for n in TARGETS:
        np.testing.assert_array_equal(back.a[n], lora.a[n])
        np.testing.assert_array_equal(back.b[n], lora.b[n])
    merged = merge_adapter(params, tmp_path / "ad")
    for a, b in zip(jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(merged)):
        np.testing.assert_array_equal(a, b)


def test_bad_adapters_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not an adapter folder"):
        load_adapter(tmp_path)
    other = dataclasses.replace(CFG, hidden_size=32, head_dim=8)
    from models.llama import init_params

    save_adapter(tmp_path / "small", init_lora(init_params(other, jax.random.key(0)), 2, jax.random.key(1)), 4.0, {})
    with pytest.raises(ValueError, match="trained for wq of shape"):
        merge_adapter(tiny_params(), tmp_path / "small")


def test_load_model_merges_an_adapter(tiny_hf_checkpoints, tmp_path):
    path = tiny_hf_checkpoints["gqa_tied"]
    base = load_model(path, layers="stacked")
    lora = _random_lora(base.params, rank=2)
    save_adapter(tmp_path / "ad", lora, 4.0, {})
    model = load_model(path, layers="unstacked", adapter=tmp_path / "ad")
    want = apply_lora(base.params, lora, 4.0)
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(stack_layers(model.params))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert model.source.endswith(f"+ adapter {tmp_path / 'ad'}")
    assert not np.allclose(model.params.layers[0].wq, base.params.layers.wq[0])
    with pytest.raises(ModelLoadError, match="trained for"):
        load_model(tiny_hf_checkpoints["mha_untied"], adapter=tmp_path / "ad")
    from adore_jax.sharding import make_mesh

    mesh = make_mesh("data=1,model=1")  # on a mesh: merged, and every weight keeps its sharding
    sharded = load_model(path, mesh=mesh, layers="stacked", adapter=tmp_path / "ad")
    placed = load_model(path, mesh=mesh, layers="stacked")
    for a, b, w in zip(jax.tree_util.tree_leaves(sharded.params), jax.tree_util.tree_leaves(placed.params),
                       jax.tree_util.tree_leaves(want)):
        assert a.sharding == b.sharding
        np.testing.assert_allclose(a, w, rtol=1e-6, atol=1e-6)
