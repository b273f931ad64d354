"""A functional Llama-family decoder (Llama 1-3, SmolLM, Mistral-style GQA, Qwen2).

Params are a registered dataclass pytree with layers stacked on a leading axis
([L, ...]) so the forward scans over layers (or, unstacked, a tuple of layers it
unrolls). Weights are stored as [in, out]; the MLP's gate and up projections are
one [E, 2, F] weight, read by one matmul.
The forward reads a fixed-size KV cache and returns the new rows' keys/values;
writing them into the cache is the caller's decision (the eviction policy).

Shapes: B batch, T new tokens, S cache slots, L layers, E hidden size,
Hq / Hkv query / key-value heads, D head dim, F MLP size, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from models.attention import AttentionFn, reference_attention
from models.cache import KVCache


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: kind is "linear" or "llama3"."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static model hyper-parameters (hashable: usable as a jit static arg)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def kv_bytes_per_token(self) -> int:
        """K+V elements per token over all layers (multiply by dtype size for bytes)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerParams:
    """One decoder layer; every field carries a leading [L] axis when stacked."""

    attn_norm: jax.Array  # [E]
    wq: jax.Array  # [E, Hq*D]
    wk: jax.Array  # [E, Hkv*D]
    wv: jax.Array  # [E, Hkv*D]
    wo: jax.Array  # [Hq*D, E]
    mlp_norm: jax.Array  # [E]
    w_gate_up: jax.Array  # [E, 2, F]: gate [:, 0], up [:, 1] (one matmul; F stays whole for sharding)
    w_down: jax.Array  # [F, E]
    bq: Optional[jax.Array] = None  # [Hq*D]
    bk: Optional[jax.Array] = None  # [Hkv*D]
    bv: Optional[jax.Array] = None  # [Hkv*D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    """A Llama-family model's weights as a pytree (layers stacked or a tuple of per-layer ones)."""
    embed: jax.Array  # [V, E]
    layers: LayerParams  # stacked [L, ...]; or a tuple of per-layer LayerParams (unstack_layers)
    final_norm: jax.Array  # [E]
    lm_head: Optional[jax.Array] = None  # [E, V]; None when tied to embed


def config_from_hf(hf: Any) -> LlamaConfig:
    """Build a LlamaConfig from a transformers config object or its dict."""
    d = hf if isinstance(hf, dict) else hf.to_dict()
    model_type = d.get("model_type", "llama")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"unsupported model_type {model_type!r} (llama, mistral, qwen2 are supported)")
    window = d.get("sliding_window") if d.get("use_sliding_window", model_type == "mistral") else None
    if window is not None and window < d.get("max_position_embeddings", 4096):
        raise ValueError(f"sliding-window attention (window {window}) is not supported")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if kind == "llama3":
        scaling = RopeScaling(
            "llama3",
            float(rope["factor"]),
            float(rope.get("low_freq_factor", 1.0)),
            float(rope.get("high_freq_factor", 4.0)),
            int(rope.get("original_max_position_embeddings", 8192)),
        )
    elif kind == "linear":
        scaling = RopeScaling("linear", float(rope["factor"]))
    elif kind != "default":
        raise ValueError(f"unsupported rope type {kind!r} (default, linear, llama3 are supported)")
    heads = d["num_attention_heads"]
    eos = d.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return LlamaConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos,
    )


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random params (normal * scale, norms at one): for tests and throughput runs."""
    L, E, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = dict(wq=(E, qd), wk=(E, kd), wv=(E, kd), wo=(qd, E), w_gate_up=(E, 2, F), w_down=(F, E))
    if cfg.attention_bias:
        shapes.update(bq=(qd,), bk=(kd,), bv=(kd,))
    keys = jax.random.split(key, len(shapes) + 2)
    rnd = lambda k, s: (scale * jax.random.normal(k, s, jnp.float32)).astype(dtype)
    layer = {n: rnd(k, (L, *s)) for k, (n, s) in zip(keys, shapes.items())}
    ones = jnp.ones((L, E), dtype)
    return Params(
        embed=rnd(keys[-2], (V, E)),
        layers=LayerParams(attn_norm=ones, mlp_norm=ones, **layer),
        final_norm=jnp.ones((E,), dtype),
        lm_head=None if cfg.tie_word_embeddings else rnd(keys[-1], (E, V)),
    )


LAYOUTS = ("stacked", "unstacked")


def unstack_layers(params: Params) -> Params:
    """Params whose layers are a tuple of L per-layer LayerParams, each weight its
    own buffer; `forward` then unrolls the layers instead of scanning them. For
    decode on GPU: there XLA copies the slice of the stacked weights that a scan
    hands each matmul (docs/THROUGHPUT.md). On device arrays this copies the
    weights (on host numpy arrays it makes views): keep one of the two forms."""
    if isinstance(params.layers, tuple):
        return params
    L = jax.tree_util.tree_leaves(params.layers)[0].shape[0]
    layers = tuple(jax.tree_util.tree_map(lambda w: w[i], params.layers) for i in range(L))
    return dataclasses.replace(params, layers=layers)


def stack_layers(params: Params) -> Params:
    """The inverse of `unstack_layers`: layers stacked [L, ...], scanned by `forward`."""
    if not isinstance(params.layers, tuple):
        return params
    xp = np if isinstance(jax.tree_util.tree_leaves(params.layers[0])[0], np.ndarray) else jnp
    return dataclasses.replace(params, layers=jax.tree_util.tree_map(lambda *ws: xp.stack(ws), *params.layers))


def default_layout() -> str:
    """The layer layout decode runs fastest with on this backend: "unstacked" on GPU
    (the 7B step: 12.5 ms stacked, 5.5 ms unstacked on an H200), "stacked" elsewhere
    (on the CPU unstacked is slower; on TPU not measured)."""
    return "unstacked" if jax.default_backend() == "gpu" else "stacked"


def with_layout(params: Params, layout: str = "auto") -> Params:
    """params with layers "stacked", "unstacked" or "auto" (`default_layout()`)."""
    layout = default_layout() if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layer layout {layout!r} (auto, {', '.join(LAYOUTS)})")
    return unstack_layers(params) if layout == "unstacked" else stack_layers(params)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in fp32, result in x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
    """Inverse frequencies [D/2] (fp32), with linear or Llama-3 scaling."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return inv / s.factor
    low_wl = s.original_max_position_embeddings / s.low_freq_factor
    high_wl = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wl, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """RoPE's (cos, sin), each [..., D/2] fp32, for positions [...] and inverse frequencies [D/2]."""
    ang = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x [B, T, H, D], positions [B, T] (any int; -1 rows are padding)."""
    cos, sin = rope_tables(positions, inv_freq)  # [B, T, D/2]
    cos = jnp.concatenate([cos, cos], -1)[:, :, None, :]
    sin = jnp.concatenate([sin, sin], -1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
    return (xf * cos + rot * sin).astype(x.dtype)


GEMM_MIN_ROWS = 2  # GPU, 7B shapes on an H200: one row reads the weights at 51-62% of copy bandwidth, two at 78-93%


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., E] @ w [E, ...] -> [..., ...] fp32. On GPU fewer than GEMM_MIN_ROWS
    rows are padded with zero rows (dropped after): XLA's one-row matmul reads the
    weights slower than the same matmul with a zero row added (docs/THROUGHPUT.md
    "One row")."""
    lead, rows = x.shape[:-1], math.prod(x.shape[:-1])
    dot = lambda a: jnp.einsum("ne,e...->n...", a, w, preferred_element_type=jnp.float32)
    x2 = x.reshape(rows, x.shape[-1])
    if rows < GEMM_MIN_ROWS and jax.default_backend() == "gpu":
        return dot(jnp.pad(x2, ((0, GEMM_MIN_ROWS - rows), (0, 0))))[:rows].reshape(*lead, *w.shape[1:])
    return dot(x2).reshape(*lead, *w.shape[1:])


def _project(x: jax.Array, ws, bs, group: str, matmul_fn=None, reduce=None) -> list:
    """x [..., E] times each weight of ws ([E, ...]), plus its bias (or None), in
    x's dtype. matmul_fn (adore_jax.kernels.get_matmul_fn) may take the group:
    then one call does all of ws (fp32 [rows, N_i] each); else XLA's matmul.
    reduce: applied to each fp32 product before the bias (the sum of partial
    products over a mesh axis when the contracted dim is split)."""
    lead, E = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(math.prod(lead), E)
    flat = [w.reshape(E, -1) for w in ws]
    if matmul_fn is not None and matmul_fn.takes(group, x2, flat):
        ys = [y.reshape(*lead, *w.shape[1:]) for y, w in zip(matmul_fn(x2, flat), ws)]
    else:
        ys = [_matmul(x, w) for w in ws]
    if reduce is not None:
        ys = [reduce(y) for y in ys]
    return [(y if b is None else y + b.astype(jnp.float32)).astype(x.dtype) for y, b in zip(ys, bs)]


def embed_tokens(params: Params, tokens: jax.Array) -> jax.Array:
    """Token embeddings [B, T, E] for ids [B, T]."""
    return jnp.take(params.embed, tokens, axis=0)


def head_logits(params: Params, x: jax.Array) -> jax.Array:
    """Logits [..., V] fp32 of final-normalized hidden states x [..., E] (the LM head)."""
    return _matmul(x, params.embed.T if params.lm_head is None else params.lm_head)


class ForwardOut(NamedTuple):
    """What `forward` returns: logits, the rows' new K and V, and with_stats the attention mass."""
    logits: jax.Array  # [B, T or R, V] fp32
    new_k: jax.Array  # [L, B, T, Hkv, D]: the rows' keys (after RoPE), to write into the cache
    new_v: jax.Array  # [L, B, T, Hkv, D]
    mass: Optional[jax.Array]  # [B, T, S+T] fp32, summed over query heads, averaged over layers (with_stats)
    feature: Optional[jax.Array]  # [B, T, E] fp32: normalized residual entering layer feature_layer


def forward(
    params: Params,
    cfg: LlamaConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    attn_fn: AttentionFn = reference_attention,
    with_stats: bool = False,
    logits_rows: Optional[jax.Array] = None,
    feature_layer: Optional[int] = None,
    matmul_fn=None,
    model_axis: Optional[str] = None,
) -> ForwardOut:
    """Run T new tokens per sequence against the cache.

    tokens, positions: [B, T] int32; a position of -1 marks a padding row (it
    attends to nothing, nothing attends to it). A row at position p attends to
    cache slots and new rows whose position is in [0, p].
    logits_rows: optional [B, R] row indices; logits are computed only there.
    feature_layer: optional l in [0, L]; also return the RMS-normalized (unit
    weight) residual stream entering layer l (l = L: after the last layer), the
    input of a hidden-state ADORE controller.
    matmul_fn: the layers' projections (adore_jax.kernels.get_matmul_fn); None: XLA's matmul.
    model_axis: inside jax.shard_map, the mesh axis the weights are split over
    (models.loading.param_partition_specs): params and cache hold this shard's
    heads (Hq, Hkv, F and V read from the weights' shapes); the partial products
    of wo and w_down and the attention mass are summed over the axis, and split
    logits gathered. None: params hold every head.
    """
    B, T = tokens.shape
    D, L = cfg.head_dim, cfg.num_layers
    first = params.layers[0] if isinstance(params.layers, tuple) else params.layers
    Hq, Hkv = first.wq.shape[-1] // D, first.wk.shape[-1] // D  # this shard's heads
    split = lambda local, full: model_axis is not None and local != full
    psum = lambda y: jax.lax.psum(y, model_axis)
    sum_o = psum if split(Hq, cfg.num_heads) else None
    sum_down = psum if split(first.w_down.shape[-2], cfg.intermediate_size) else None
    if feature_layer is not None and not 0 <= feature_layer <= L:
        raise ValueError(f"feature_layer must be in [0, {L}], got {feature_layer}")
    inv_freq = rope_inv_freq(cfg)
    cos, sin = rope_tables(positions.reshape(B * T), inv_freq)  # [B*T, D/2], for a matmul_fn that applies RoPE
    x = embed_tokens(params, tokens)
    unit = jnp.ones((cfg.hidden_size,), x.dtype)
    normalized = lambda x: rms_norm(x, unit, cfg.rms_norm_eps).astype(jnp.float32)

    def layer(carry, xs):
        x, feat = carry
        lp, li = xs
        if feature_layer is not None and feature_layer < L:
            if isinstance(li, int):  # unrolled layers: keep the one residual statically
                feat = normalized(x) if li == feature_layer else feat
            else:
                feat = jnp.where(li == feature_layer, normalized(x), feat)
        h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
        ws, bs, h2 = (lp.wq, lp.wk, lp.wv), (lp.bq, lp.bk, lp.bv), h.reshape(B * T, cfg.hidden_size)
        fused = matmul_fn is not None and matmul_fn.takes_qkv_rope(h2, ws, D)  # q, k, v and RoPE: one kernel
        q, k, v = matmul_fn.qkv_rope(h2, ws, bs, cos, sin, D) if fused else _project(h, ws, bs, "qkv", matmul_fn)
        q, k, v = q.reshape(B, T, Hq, D), k.reshape(B, T, Hkv, D), v.reshape(B, T, Hkv, D)
        if not fused:
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)
        # the whole stacked cache goes in with the layer index: slicing it here would
        # copy each layer's cache before a kernel call
        res = attn_fn(q, k, v, cache.k, cache.v, cache.pos, positions, layer=li, with_stats=with_stats)
        x = x + _project(res.out.reshape(B, T, Hq * D).astype(x.dtype), (lp.wo,), (None,), "o", matmul_fn, sum_o)[0]
        h = rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
        gate_up = _project(h, (lp.w_gate_up,), (None,), "gate_up", matmul_fn)[0].astype(jnp.float32)  # [B, T, 2, F]
        gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        x = x + _project((jax.nn.silu(gate) * up).astype(x.dtype), (lp.w_down,), (None,), "down", matmul_fn,
                         sum_down)[0]
        mass = res.mass if with_stats else jnp.zeros((), jnp.float32)
        return (x, feat), (k, v, mass)

    carry = (x, jnp.zeros((B, T, cfg.hidden_size) if feature_layer is not None else (), jnp.float32))
    if isinstance(params.layers, tuple):  # unstacked: one traced layer after another
        outs = []
        for i, lp in enumerate(params.layers):
            carry, o = layer(carry, (lp, i))
            outs.append(o)
        new_k, new_v, mass = (jnp.stack(t) for t in zip(*outs))
    else:
        carry, (new_k, new_v, mass) = jax.lax.scan(layer, carry, (params.layers, jnp.arange(L, dtype=jnp.int32)))
    x, feat = carry
    if feature_layer == L:
        feat = normalized(x)
    if logits_rows is not None:
        x = jnp.take_along_axis(x, logits_rows[..., None], axis=1)
    logits = head_logits(params, rms_norm(x, params.final_norm, cfg.rms_norm_eps))
    if split(logits.shape[-1], cfg.vocab_size):
        logits = jax.lax.all_gather(logits, model_axis, axis=logits.ndim - 1, tiled=True)
    if with_stats:
        mass = mass.mean(0) if sum_o is None else psum(mass.mean(0))  # one collective: the heads of every shard
    return ForwardOut(logits, new_k, new_v, mass if with_stats else None, feat if feature_layer is not None else None)

