"""Serving over a mesh (adore_jax.sharding): the mesh, its checks, and sharded
generate against one device on 8 CPU devices (tests/sharded_runs.py)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh

from adore_jax.sharding import check_mesh, default_mesh, make_mesh, parse_mesh
from tiny_model import CFG


def test_parse_and_make_mesh():
    assert parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
    assert parse_mesh("model=2") == {"data": 1, "model": 2}
    for bad in ("data=2,fsdp=4", "data=0", "data"):
        with pytest.raises(ValueError, match="data=2,model=4"):
            parse_mesh(bad)
    mesh = make_mesh("data=1,model=1")
    assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (1, 1)
    with pytest.raises(ValueError, match="needs 8 devices, 1 are here"):
        make_mesh({"data": 2, "model": 4})
    assert default_mesh(4) is None  # one device: no mesh


def test_check_mesh_errors():
    mesh = AbstractMesh((2, 2), ("data", "model"))  # CFG: 4 query heads, 2 KV heads
    check_mesh(mesh, CFG, 4)
    with pytest.raises(ValueError, match="batch of 3 sequences is not a multiple of the mesh's data axis"):
        check_mesh(mesh, CFG, 3)
    with pytest.raises(ValueError, match="prefill group of 1 sequences"):
        check_mesh(mesh, CFG, 4, 1)
    with pytest.raises(ValueError, match="2 KV heads do not split over the mesh's model axis \\(4\\)"):
        check_mesh(AbstractMesh((1, 4), ("data", "model")), CFG, 4)
    with pytest.raises(ValueError, match="4 query heads"):
        check_mesh(AbstractMesh((1, 8), ("data", "model")), CFG, 4)
    check_mesh(AbstractMesh((1, 4), ("data", "model")), dataclasses.replace(CFG, num_kv_heads=1), 4)  # MQA
    with pytest.raises(ValueError, match="axes"):
        check_mesh(AbstractMesh((2,), ("model",)), CFG, 4)


def test_sharded_generate_equals_one_device(tmp_path):
    """Every policy gives one device's greedy tokens on the (2, 4) mesh, and on
    meshes (8, 1) and (1, 8) those whose sharded step differs there (GQA; MQA on 8
    model shards; a random checkpoint loaded onto the mesh); one decode step on a
    sharded cache gathers nothing cache-sized and copies the cache no more often
    than on one device; meshes that do not fit are refused."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
           "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
    root = Path(__file__).parent.parent
    res = subprocess.run([sys.executable, str(root / "tests" / "sharded_runs.py"), str(tmp_path / "ckpt")],
                         capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out["cases"]) == 7 + 2 + 2
    for case in out["cases"]:
        assert case["equal"] and all(case["equal"].values()), case
    assert {k for c in out["cases"] if c["model"] == "gqa" for k in c["equal"]} == {"8x1", "2x4", "1x8"}
    assert all("2x4" in c["equal"] for c in out["cases"] if c["model"] == "gqa")
    hlo = out["hlo"]
    assert hlo["cache_collectives"] == []
    assert hlo["cache_copies_sharded"] <= hlo["cache_copies_one_device"]
    assert "batch of 6 sequences is not a multiple of the mesh's data axis (8)" in out["errors"]["batch"]
    assert "2 KV heads do not split over the mesh's model axis (8)" in out["errors"]["kv_heads"]
