"""LoRA adapters on the attention projections: the factors, the merge into the weights, and adapter folders.

For each target W in wq, wk, wv, wo (LayerParams): W' = W + A @ B * (alpha / r),
A [L, in, r], B [L, r, out]. An adapter folder holds the factors (orbax,
`adapter/`) and `adapter.json` (rank, alpha, the weight shapes it fits, and
whatever the writer adds: training settings, results); train/finetune.py writes
one, `load_model(..., adapter=DIR)` merges one on the host before the weights
are placed on the device (models.loading.place_params).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from models.llama import Params

TARGETS = ("wq", "wk", "wv", "wo")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraParams:
    """LoRA factors per target projection ("wq", "wk", "wv", "wo")."""

    a: dict  # name -> [L, in, r]
    b: dict  # name -> [L, r, out]

    @property
    def rank(self) -> int:
        return next(iter(self.a.values())).shape[-1]


def _target_shape(params: Params, name: str) -> tuple[int, int, int]:
    """[L, in, out] of a target weight, stacked or unstacked layers."""
    if isinstance(params.layers, tuple):
        return (len(params.layers), *getattr(params.layers[0], name).shape)
    return tuple(getattr(params.layers, name).shape)


def init_lora(params: Params, rank: int, key: jax.Array) -> LoraParams:
    """A = normal / sqrt(in) [L, in, r], B = 0 [L, r, out] (fp32) for each target."""
    a, b = {}, {}
    for name, k in zip(TARGETS, jax.random.split(key, len(TARGETS))):
        L, d_in, d_out = _target_shape(params, name)
        a[name] = jax.random.normal(k, (L, d_in, rank), jnp.float32) / math.sqrt(d_in)
        b[name] = jnp.zeros((L, rank, d_out), jnp.float32)
    return LoraParams(a, b)


def _merged(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """w [..., in, out] + a [..., in, r] @ b [..., r, out] * scale, in fp32, stored in w's dtype."""
    return (w.astype(jnp.float32) + jnp.einsum("...ir,...ro->...io", a, b) * scale).astype(w.dtype)


def apply_lora(params: Params, lora: LoraParams, alpha: float) -> Params:
    """Params with W + A @ B * (alpha / r) for each target; stacked or unstacked layers."""
    scale = alpha / lora.rank
    if isinstance(params.layers, tuple):
        layers = tuple(
            dataclasses.replace(lp, **{n: _merged(getattr(lp, n), lora.a[n][i], lora.b[n][i], scale) for n in TARGETS})
            for i, lp in enumerate(params.layers))
    else:
        layers = dataclasses.replace(
            params.layers, **{n: _merged(getattr(params.layers, n), lora.a[n], lora.b[n], scale) for n in TARGETS})
    return dataclasses.replace(params, layers=layers)


def save_adapter(path, lora: LoraParams, alpha: float, meta: dict) -> Path:
    """Write an adapter folder: path/adapter (orbax) and path/adapter.json (rank, alpha,
    the [L, in, out] shape of each target, and meta). Returns the folder."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "adapter", {"a": lora.a, "b": lora.b}, force=True)
    shapes = {n: [lora.a[n].shape[0], lora.a[n].shape[1], lora.b[n].shape[2]] for n in TARGETS}
    (path / "adapter.json").write_text(json.dumps({"rank": lora.rank, "alpha": alpha, "shapes": shapes, **meta},
                                                  indent=2, default=str))
    return path


def load_adapter(path) -> tuple[LoraParams, dict]:
    """(factors, adapter.json) of a folder written by save_adapter; ValueError if it is not one."""
    path = Path(path).expanduser().absolute()
    try:
        meta = json.loads((path / "adapter.json").read_text())
        shapes, r = meta["shapes"], int(meta["rank"])
        float(meta["alpha"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"not an adapter folder: {path} ({type(e).__name__}: {e})") from None
    # A target on this host's CPU: an adapter written on another topology (a GPU) restores anywhere.
    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=host)
    target = {"a": {n: spec((s[0], s[1], r)) for n, s in shapes.items()},
              "b": {n: spec((s[0], r, s[2])) for n, s in shapes.items()}}
    with ocp.StandardCheckpointer() as ckpt:
        tree = jax.device_get(ckpt.restore(path / "adapter", target))  # host arrays: merged where the weights live
    return LoraParams(tree["a"], tree["b"]), meta


def merge_adapter(params: Params, path) -> Params:
    """params with the adapter folder at path merged in; ValueError if its shapes do not fit."""
    lora, meta = load_adapter(path)
    for name in TARGETS:
        want = _target_shape(params, name)
        got = tuple(meta["shapes"].get(name, ()))
        if got != want:
            raise ValueError(f"adapter {path} was trained for {name} of shape {list(got)}, this model's is {list(want)}")
    return apply_lora(params, lora, float(meta["alpha"]))
