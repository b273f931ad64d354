"""The ADORE controller: a GRU over the token sequence and a scoring head.

For token t with GRU state g_t and each earlier token i with feature c_i:
    s(t, i) = sigmoid(<W_q g_t, W_k c_i> / sqrt(d_c) + b[bucket(t - i)] + b0)
One score per (t, i) is shared by every layer and head. Buckets are log-spaced
in the distance t - i (0, 1, 2-3, 4-7, ...), so recency can be learned as well
as content. Inputs are the backbone's token embeddings [E] (known before the
forward pass), or, for a controller with `feature_layer` l, the RMS-normalized
residual stream entering layer l (known after the forward pass: its scores lag
one step when choosing the rows to rebuild).

The decode loop stores k_i = W_k c_i per token in the history, so scoring a
step costs one [N, d_c] matrix-vector product.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

NUM_BUCKETS = 16


def distance_bucket(dist: jax.Array, num_buckets: int = NUM_BUCKETS) -> jax.Array:
    """Log-spaced bucket of a distance >= 0: 0 -> 0, 1 -> 1, 2..3 -> 2, 4..7 -> 3, capped."""
    d = jnp.maximum(dist, 0).astype(jnp.int32)
    b = jnp.where(d > 0, 32 - jax.lax.clz(d), 0)  # 1 + floor(log2 d) for d >= 1
    return jnp.minimum(b, num_buckets - 1)


def feature_layer(feature: str) -> Optional[int]:
    """The controller input named by `feature`: "embedding" -> None, "hidden:l" -> l."""
    if feature == "embedding":
        return None
    name, _, layer = feature.partition(":")
    if name != "hidden" or not layer.isdigit():
        raise ValueError(f"controller feature must be embedding or hidden:<layer>, got {feature!r}")
    return int(layer)


class Controller(nnx.Module):
    """GRU controller. d_in: backbone embedding size; d_c: feature size;
    feature_layer: None (inputs are token embeddings) or l (the normalized
    residual stream entering backbone layer l)."""

    def __init__(self, d_in: int, d_c: int = 64, num_buckets: int = NUM_BUCKETS, feature_layer: Optional[int] = None,
                 *, rngs: nnx.Rngs):
        self.d_c = d_c
        self.feature_layer = feature_layer
        self.proj = nnx.Linear(d_in, d_c, rngs=rngs)
        self.gru = nnx.GRUCell(d_c, d_c, rngs=rngs)
        self.wq = nnx.Linear(d_c, d_c, use_bias=False, rngs=rngs)
        self.wk = nnx.Linear(d_c, d_c, use_bias=False, rngs=rngs)
        # Start from a recency prior (nearer buckets score higher); training adds content.
        self.bucket_bias = nnx.Param(-jnp.arange(num_buckets, dtype=jnp.float32))
        self.b0 = nnx.Param(jnp.zeros((), jnp.float32))

    def init_state(self, batch: int) -> jax.Array:
        """GRU hidden state [B, d_c] before the first token."""
        return jnp.zeros((batch, self.d_c), jnp.float32)

    def step(self, h: jax.Array, x: jax.Array):
        """One token: h [B, d_c], x [B, E] -> (h', q [B, d_c], k [B, d_c])."""
        h, _ = self.gru(h, jnp.tanh(self.proj(x.astype(jnp.float32))))
        return h, self.wq(h), self.wk(h)

    def scan(self, h: jax.Array, x: jax.Array, valid: jax.Array):
        """Run tokens x [B, T, E]; rows with valid [B, T] False leave h unchanged.

        Returns (h', q [B, T, d_c], k [B, T, d_c])."""

        def body(h, xs):
            xt, vt = xs
            h2, q, k = self.step(h, xt)
            return jnp.where(vt[:, None], h2, h), (q, k)

        xs = (jnp.swapaxes(x, 0, 1), jnp.swapaxes(valid, 0, 1))
        h, (q, k) = jax.lax.scan(body, h, xs)
        return h, jnp.swapaxes(q, 0, 1), jnp.swapaxes(k, 0, 1)

    def logits(self, q: jax.Array, q_pos: jax.Array, k: jax.Array, k_pos: jax.Array) -> jax.Array:
        """Pre-sigmoid scores [B, Tq, Tk] for queries q [B, Tq, d_c] at q_pos [B, Tq]
        against keys k [B, Tk, d_c] at k_pos [B, Tk]."""
        s = jnp.einsum("btc,bnc->btn", q, k) / jnp.sqrt(jnp.float32(self.d_c))
        bucket = distance_bucket(q_pos[:, :, None] - k_pos[:, None, :], self.bucket_bias.shape[0])
        return s + self.bucket_bias[...][bucket] + self.b0[...]


def new_controller(d_in: int, d_c: int = 64, seed: int = 0, feature_layer: Optional[int] = None) -> Controller:
    """A randomly initialized controller (until a trained one is loaded)."""
    return Controller(d_in, d_c, feature_layer=feature_layer, rngs=nnx.Rngs(seed))


def recency_controller(d_in: int, d_c: int = 64) -> Controller:
    """A controller that scores by recency alone (zero query weights; the initial
    bucket bias falls with distance): the reference a trained controller must beat."""
    ctrl = new_controller(d_in, d_c)
    ctrl.wq.kernel[...] = jnp.zeros_like(ctrl.wq.kernel[...])
    return ctrl


ASSETS = Path(__file__).parent / "assets" / "controllers"


def model_signature(cfg) -> str:
    """A name for the backbone shape a controller was trained for."""
    return f"L{cfg.num_layers}-E{cfg.hidden_size}-H{cfg.num_heads}x{cfg.num_kv_heads}-V{cfg.vocab_size}"


def save_controller(path, ctrl: Controller, meta: dict) -> None:
    """Write the controller's params (orbax) and controller.json (shape + meta) to folder path."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    _, state = nnx.split(ctrl)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "params", nnx.to_pure_dict(state), force=True)
    shape = dict(d_in=ctrl.proj.in_features, d_c=ctrl.d_c, num_buckets=int(ctrl.bucket_bias.shape[0]),
                 feature="embedding" if ctrl.feature_layer is None else f"hidden:{ctrl.feature_layer}")
    (path / "controller.json").write_text(json.dumps({**meta, **shape}, indent=2))


def load_controller(path) -> tuple[Controller, dict]:
    """Read a controller written by save_controller; returns (controller, its json)."""
    path = Path(path).absolute()
    try:
        meta = json.loads((path / "controller.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"not a controller checkpoint: {path} ({e})") from None
    # A concrete target places the params on this process's default device,
    # whatever topology the checkpoint was written on.
    layer = feature_layer(meta.get("feature", "embedding"))
    gd, state = nnx.split(Controller(meta["d_in"], meta["d_c"], meta["num_buckets"], layer, rngs=nnx.Rngs(0)))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(path / "params", nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(gd, state), meta


def default_controller(cfg, path=None):
    """(graphdef, state, description) of the controller to use for this backbone.

    path: a checkpoint folder; else the packaged controller trained for this
    backbone shape, if any; else a random one (description says so)."""
    if path is None and (ASSETS / model_signature(cfg)).is_dir():
        path = ASSETS / model_signature(cfg)
    if path is not None:
        ctrl, meta = load_controller(path)
        if ctrl.proj.in_features != cfg.hidden_size:
            raise ValueError(f"controller {path} expects embeddings of size {ctrl.proj.in_features}, model has {cfg.hidden_size}")
        gd, state = nnx.split(ctrl)
        source = "" if ctrl.feature_layer is None else f" (input: the hidden state entering layer {ctrl.feature_layer})"
        return gd, state, f"controller {path}{source}"
    gd, state = nnx.split(new_controller(cfg.hidden_size))
    return gd, state, "randomly initialized controller (none trained for this model)"
