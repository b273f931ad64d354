"""The decode engine: chunked prefill and decode inside jit, cache donated.

One step, for prefill chunks and decode alike:
  rows   = policy.select_rows(...)      # [B, T] tokens and positions to run
  logits, new K/V, stats = forward(rows against the cache)
  slots  = policy.assign_slots(...)     # [B, T] where each new row goes (-1: dropped)
  cache  = cache_update(cache, new K/V, slots)

`generate` runs prefill and the whole decode loop (lax.while_loop) in one jit
call; `stream` runs prefill, then decode in jitted chunks of a few steps so a
caller can stream text between chunks. Both share `_prefill` and `_decode_steps`.

A policy whose steps differ (ADORE rebuilding every k steps: `policy.period`)
runs in periods of k steps, the first with the extra rows and k - 1 without,
each traced once: no conditional inside the decode loop. On the GPU a lax.cond
there made ADORE R=8/8 up to 2.1x slower a step (docs/THROUGHPUT.md, "Design notes").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from adore_jax import sharding
from adore_jax.kernels import default_kernels
from adore_jax.policies import Policy, full_policy
from adore_jax.sampling import SamplingParams, row_keys, sample
from models.cache import KVCache, kv_dtype
from models.llama import LlamaConfig, Params, forward


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static settings of a compiled engine (hashable)."""

    max_new_tokens: int
    prompt_len: int  # padded prompt length (a multiple of chunk)
    chunk: int  # prefill chunk length
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    policy: Policy = full_policy
    # The kernels; "auto": adore_jax.kernels.default_kernels() (Pallas on GPU, XLA's reference elsewhere)
    attn_fn: Union[Callable, str] = "auto"  # adore_jax.kernels.get_attention_fn
    cache_update: Union[Callable, str] = "auto"  # adore_jax.kernels.get_cache_update_fn
    matmul_fn: Union[Callable, str, None] = "auto"  # the layers' projections (adore_jax.kernels.get_matmul_fn); None: XLA
    prefill_group: Optional[int] = None  # prefill at most this many sequences at a time (None: the whole batch)
    mesh: Optional[Mesh] = None  # axes (data, model) (adore_jax.sharding): each step runs under shard_map; None: one device
    kv_dtype: str = "auto"  # the cache slots: "auto" (the weights' dtype), "bfloat16", "float32", "int8", "float8_e4m3"

    def __post_init__(self):
        auto = [f for f in ("attn_fn", "cache_update", "matmul_fn") if isinstance(getattr(self, f), str)]
        if auto:
            defaults = default_kernels()
            for f in auto:
                if getattr(self, f) != "auto":
                    raise ValueError(f"{f} must be a function or 'auto', got {getattr(self, f)!r}")
                object.__setattr__(self, f, defaults[f])
        check_kv_dtype(self.kv_dtype)
        if self.prefill_group is not None and self.prefill_group < 1:
            raise ValueError(f"prefill group must be >= 1 sequence, got {self.prefill_group}")

    @property
    def max_total(self) -> int:
        return self.prompt_len + self.max_new_tokens


def check_kv_dtype(name: str) -> None:
    """ValueError unless `name` is a cache dtype this machine takes: float8_e4m3 on
    a GPU needs compute capability 8.9 or later (Ada, Hopper)."""
    kv_dtype(name, jnp.float32)  # unknown names
    if name == "float8_e4m3" and jax.default_backend() == "gpu":
        cc = getattr(jax.devices()[0], "compute_capability", None)
        if cc is not None and tuple(int(x) for x in str(cc).split(".")[:2]) < (8, 9):
            raise ValueError(f"kv dtype float8_e4m3 needs a GPU of compute capability >= 8.9; this one is {cc} "
                             "(use int8)")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The decode loop's carry: cache, policy state and per-sequence progress (B sequences, N new tokens at most)."""
    cache: KVCache
    policy_state: Any
    last: jax.Array  # [B] int32: last emitted token (next input)
    pos: jax.Array  # [B] int32: position of `last`
    done: jax.Array  # [B] bool
    out: jax.Array  # [B, N] int32: emitted tokens (pad after EOS)
    step: jax.Array  # [] int32: tokens emitted so far
    key: jax.Array  # PRNG key


def _run_rows(params, pp, cfg, ec: EngineConfig, cache, pstate, tokens, positions, logits_rows, decode: bool,
              extra: bool = True):
    """Forward rows [B, T] and let the policy place them in the cache; with a
    mesh, on each shard's slice under shard_map (adore_jax.sharding.shard_step).

    extra (static): whether a decode step adds the policy's extra rows (the
    first step of each period). Returns (logits [B, len(logits_rows), V], cache, policy state)."""
    if ec.mesh is None:
        return _rows(params, pp, cache, pstate, tokens, positions, logits_rows, cfg=cfg, ec=ec, decode=decode,
                     extra=extra)
    fn = functools.partial(_rows, cfg=cfg, ec=ec, decode=decode, extra=extra, model_axis=sharding.MODEL)
    return sharding.shard_step(fn, ec.mesh, cfg, params, pp, cache, pstate, tokens, positions, logits_rows)


def _rows(params, pp, cache, pstate, tokens, positions, logits_rows, *, cfg, ec: EngineConfig, decode: bool,
          extra: bool, model_axis=None):
    """`_run_rows` on the sequences and heads at hand (model_axis: models.llama.forward's)."""
    policy = ec.policy
    tokens, positions, pstate = policy.select_rows(pp, pstate, cache, tokens, positions, params.embed, decode, extra)
    view = cache
    run = functools.partial(forward, params, cfg, tokens, positions, attn_fn=ec.attn_fn, logits_rows=logits_rows,
                            matmul_fn=ec.matmul_fn, model_axis=model_axis)
    if policy.two_pass:
        view = policy.restrict(pstate, cache, positions, run(cache, with_stats=True).mass)
    out = run(view, with_stats=policy.needs_stats and not policy.two_pass, feature_layer=policy.feature_layer)
    slots, pstate = policy.assign_slots(pp, pstate, cache, positions, out.mass, out.feature)
    cache = ec.cache_update(cache, out.new_k, out.new_v, slots, positions)
    return out.logits, cache, pstate


def group_size(batch: int, prefill_group: Optional[int]) -> int:
    """Sequences per prefill group: the largest divisor of batch not above prefill_group."""
    g = min(prefill_group or batch, batch)  # EngineConfig keeps prefill_group >= 1
    while batch % g:
        g -= 1
    return g


def _prefill_logits(params, pp, cfg: LlamaConfig, ec: EngineConfig, tokens, lens):
    """Prefill prompts [B, P] (right-padded, lens [B]) in groups of `group_size`
    sequences, one after another, each group in chunks. A group's temporaries
    (every layer's new K/V of a chunk, the activations) scale with the group, not
    the batch; each group's cache, policy state and logits are written into the
    batch's. Returns (cache, policy state, logits [B, V] of each prompt's last token)."""
    B = tokens.shape[0]
    g = group_size(B, ec.prefill_group)
    run = functools.partial(_prefill_chunks, params, pp, cfg, ec)
    if g == B:
        return run(tokens, lens)
    whole, part = jax.eval_shape(run, tokens, lens), jax.eval_shape(run, tokens[:g], lens[:g])
    # each leaf's batch axis: where its shape for B and for g sequences differ (none: shared, e.g. a step count)
    axes = jax.tree.map(lambda a, b: next((i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y), None),
                        whole, part)

    def group(i, acc):
        out = run(jax.lax.dynamic_slice_in_dim(tokens, i * g, g), jax.lax.dynamic_slice_in_dim(lens, i * g, g))
        put = lambda a, o, ax: o if ax is None else jax.lax.dynamic_update_slice_in_dim(a, o, i * g, ax)
        return jax.tree.map(put, acc, out, axes)

    return jax.lax.fori_loop(0, B // g, group, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), whole))


def _prefill_chunks(params, pp, cfg: LlamaConfig, ec: EngineConfig, tokens, lens):
    """Prefill prompts [B, P] (right-padded, lens [B]) in chunks: (cache, policy state, last logits [B, V])."""
    B, P = tokens.shape
    C = ec.chunk
    slots = ec.policy.num_slots(ec.max_total)
    cache = KVCache.empty(cfg.num_layers, B, slots, cfg.num_kv_heads, cfg.head_dim,
                          kv_dtype(ec.kv_dtype, params.embed.dtype))
    pstate = ec.policy.init(pp, B, ec.max_total)
    last_row = lens - 1

    def chunk(carry, c):
        cache, pstate, logits_last = carry
        toks = jax.lax.dynamic_slice_in_dim(tokens, c * C, C, axis=1)
        pos = c * C + jnp.arange(C, dtype=jnp.int32)[None, :]
        pos = jnp.where(pos < lens[:, None], pos, -1)
        row = jnp.clip(last_row - c * C, 0, C - 1)[:, None]
        logits, cache, pstate = _run_rows(params, pp, cfg, ec, cache, pstate, toks, pos, row, False)
        here = (last_row >= c * C) & (last_row < (c + 1) * C)
        logits_last = jnp.where(here[:, None], logits[:, 0], logits_last)
        return (cache, pstate, logits_last), None

    init = (cache, pstate, jnp.zeros((B, cfg.vocab_size), jnp.float32))
    return jax.lax.scan(chunk, init, jnp.arange(P // C))[0]


def _step(params, pp, cfg, ec: EngineConfig, cache, pstate, tok, pos, extra: bool):
    """One decode step: tokens [B] at positions [B] (-1: finished row); extra as in _run_rows.

    Returns (logits [B, V], cache, policy state)."""
    zero = jnp.zeros((tok.shape[0], 1), jnp.int32)
    logits, cache, pstate = _run_rows(params, pp, cfg, ec, cache, pstate, tok[:, None], pos[:, None], zero, True, extra)
    return logits[:, 0], cache, pstate


def _period(step, carry, xs, m: int):
    """m (static) steps of one period: step(carry, x, extra) -> (carry, y), the
    first with extra=True, the other m - 1 (a scan) with extra=False.
    xs: per-step inputs [m, ...] or None. Returns (carry, ys [m, ...] or None)."""
    carry, y = step(carry, None if xs is None else xs[0], True)
    if m == 1:
        return carry, jax.tree.map(lambda a: a[None], y)
    carry, ys = jax.lax.scan(lambda c, x: step(c, x, False), carry, None if xs is None else xs[1:], length=m - 1)
    return carry, jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), y, ys)


def _scan_periods(step, carry, xs, k: int):
    """`_period` over xs [n, ...] (n static) in periods of k steps, the last one
    shorter when k does not divide n. Returns (carry, ys [n, ...])."""
    n = xs.shape[0]
    if n == 0:
        return jax.lax.scan(lambda c, x: step(c, x, True), carry, xs)
    q, r = divmod(n, k)
    parts = []
    if q:
        carry, ys = jax.lax.scan(lambda c, x: _period(step, c, x, k), carry, xs[: q * k].reshape(q, k, *xs.shape[1:]))
        parts.append(ys.reshape(q * k, *ys.shape[2:]))
    if r:
        carry, ys = _period(step, carry, xs[q * k :], r)
        parts.append(ys)
    return carry, jnp.concatenate(parts)


def _is_eos(tok, eos_ids):
    return jnp.isin(tok, jnp.asarray(eos_ids or (-1,), jnp.int32))


def _prefill(params, pp, cfg: LlamaConfig, ec: EngineConfig, tokens, lens, key, sp: SamplingParams) -> DecodeState:
    """Prefill and emit the first token."""
    B = tokens.shape[0]
    cache, pstate, logits = _prefill_logits(params, pp, cfg, ec, tokens, lens)
    first = sample(logits, row_keys(key, 0, B), sp)
    out = jnp.full((B, ec.max_new_tokens), ec.pad_id, jnp.int32).at[:, 0].set(first)
    return DecodeState(cache, pstate, first, lens.astype(jnp.int32), _is_eos(first, ec.eos_ids), out, jnp.int32(1), key)


def _decode_step(params, pp, cfg: LlamaConfig, ec: EngineConfig, s: DecodeState, sp: SamplingParams,
                 extra: bool = True) -> DecodeState:
    """Run the last token of every sequence, emit one more token per live sequence."""
    B = s.last.shape[0]
    logits, cache, pstate = _step(params, pp, cfg, ec, s.cache, s.policy_state, s.last, jnp.where(s.done, -1, s.pos), extra)
    tok = sample(logits, row_keys(s.key, s.step, B), sp)
    tok = jnp.where(s.done, ec.pad_id, tok)
    out = jax.lax.dynamic_update_slice_in_dim(s.out, tok[:, None], s.step, axis=1)
    done = s.done | _is_eos(tok, ec.eos_ids)
    return DecodeState(cache, pstate, tok, s.pos + 1, done, out, s.step + 1, s.key)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _score_jit(params, pp, cfg, ec, prompt, lens, targets):
    """Log-probs [B, N] of targets [B, N] following the prompts, fed one by one."""
    cache, pstate, logits = _prefill_logits(params, pp, cfg, ec, prompt, lens)

    def body(carry, i, extra):
        cache, pstate, logits = carry
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, i, None], axis=1)[:, 0]
        logits, cache, pstate = _step(params, pp, cfg, ec, cache, pstate, targets[:, i], lens + i, extra)
        return (cache, pstate, logits), lp

    steps = jnp.arange(targets.shape[1] - 1)
    (cache, pstate, logits), lps = _scan_periods(body, (cache, pstate, logits), steps, ec.policy.period)
    last = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, -1:], axis=1)
    return jnp.concatenate([lps.T, last], axis=1), cache


def _decode_steps(params, pp, cfg, ec: EngineConfig, s: DecodeState, sp: SamplingParams, n: int) -> DecodeState:
    """Up to n (static) more decode steps from the start of a policy period: whole
    periods (k = ec.policy.period steps) in a while loop that stops early once
    every row is done or the next period would pass max_new_tokens, then the
    n % k steps left (the caller keeps those within max_new_tokens)."""
    k = ec.policy.period
    step = lambda s, _, extra: (_decode_step(params, pp, cfg, ec, s, sp, extra), None)
    end = jnp.minimum(s.step + n, ec.max_new_tokens)
    s = jax.lax.while_loop(lambda s: ~jnp.all(s.done) & (s.step + k <= end),
                           lambda s: _period(step, s, None, k)[0], s)
    return _period(step, s, None, n % k)[0] if n % k else s


@functools.partial(jax.jit, static_argnums=(2, 3))
def _generate_jit(params, pp, cfg, ec, tokens, lens, key, sp):
    s = _prefill(params, pp, cfg, ec, tokens, lens, key, sp)
    return _decode_steps(params, pp, cfg, ec, s, sp, ec.max_new_tokens - 1)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _prefill_jit(params, pp, cfg, ec, tokens, lens, key, sp):
    return _prefill(params, pp, cfg, ec, tokens, lens, key, sp)


@functools.partial(jax.jit, static_argnums=(2, 3, 6), donate_argnums=(4,))
def _decode_chunk_jit(params, pp, cfg, ec, s, sp, n):
    return _decode_steps(params, pp, cfg, ec, s, sp, n)


def _bucket(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def plan(
    prompt_lens: Sequence[int],
    max_new_tokens: int,
    max_len: int,
    chunk: int = 512,
    **kw,
) -> EngineConfig:
    """Pick padded prompt length and chunk for these prompts; checks lengths.

    max_len: the model's maximum total length (prompt + new tokens)."""
    if max_new_tokens < 1:
        raise ValueError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    if not prompt_lens or min(prompt_lens) < 1:
        raise ValueError("every prompt must hold at least one token")
    longest = max(prompt_lens)
    if longest + max_new_tokens > max_len:
        raise ValueError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the maximum length {max_len}"
        )
    c = min(_bucket(longest), chunk)
    ec = EngineConfig(max_new_tokens=max_new_tokens, prompt_len=-(-longest // c) * c, chunk=c, **kw)
    if ec.policy.needs_stats and not getattr(ec.attn_fn, "supports_stats", True):
        raise ValueError(f"policy {type(ec.policy).__name__} needs attention statistics, which this attention kernel does not provide")
    return ec


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0):
    """Right-pad token lists into tokens [B, length] int32 and lens [B] int32."""
    toks = np.full((len(prompts), length), pad_id, np.int32)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = p
    return jnp.asarray(toks), jnp.asarray([len(p) for p in prompts], jnp.int32)


def check_mesh(ec: EngineConfig, cfg: LlamaConfig, batch: int) -> None:
    """ValueError unless ec.mesh (if any) splits `batch` sequences, their prefill groups and cfg's heads."""
    if ec.mesh is not None:
        sharding.check_mesh(ec.mesh, cfg, batch, group_size(batch, ec.prefill_group))


def _prepare(cfg: LlamaConfig, prompts, max_new_tokens: int, engine_kw: dict):
    """(EngineConfig, tokens [B, P], lens [B]) for these prompts."""
    ec = plan([len(p) for p in prompts], max_new_tokens, cfg.max_position_embeddings, eos_ids=cfg.eos_token_ids, **engine_kw)
    check_mesh(ec, cfg, len(prompts))
    return (ec, *pad_prompts(prompts, ec.prompt_len, ec.pad_id))


def _trim(row: np.ndarray, eos_ids) -> list[int]:
    """Tokens up to and including the first EOS."""
    out = []
    for t in row.tolist():
        out.append(t)
        if t in eos_ids:
            break
    return out


def decode(
    params: Params,
    cfg: LlamaConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    policy_params=None,
    **engine_kw,
) -> DecodeState:
    """Prefill and decode a batch of token-id prompts of any lengths in one jit call.

    policy_params: the policy's params pytree (ADORE: the controller state).
    engine_kw: EngineConfig fields (policy, attn_fn, cache_update, chunk, mesh, ...); with a
    mesh, params are best placed on it (models.loading.place_params / load_model(mesh=)).
    Returns the final DecodeState (out [B, max_new_tokens], cache, policy state)."""
    ec, tokens, lens = _prepare(cfg, prompts, max_new_tokens, engine_kw)
    return _generate_jit(params, policy_params, cfg, ec, tokens, lens, jax.random.key(seed), sampling.validate())


def generate(params: Params, cfg: LlamaConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *args, **kw):
    """`decode`, returning the new tokens per prompt cut after the first EOS."""
    s = decode(params, cfg, prompts, max_new_tokens, *args, **kw)
    return [_trim(r, cfg.eos_token_ids) for r in np.asarray(s.out)]


def score(params: Params, cfg: LlamaConfig, tokens, prefill: int, policy_params=None, **engine_kw):
    """Teacher-forced log-probs through the real decode step.

    tokens [B, L] int; the first `prefill` tokens are prefilled (chunked), the
    rest are fed one decode step at a time. Returns (log p(tokens[:, t] | < t)
    for t in [prefill, L) as numpy [B, L - prefill], final cache)."""
    tokens = np.asarray(tokens, np.int32)
    B, L = tokens.shape
    if not 1 <= prefill < L:
        raise ValueError(f"prefill must be in [1, {L - 1}], got {prefill}")
    ec = plan([prefill] * B, L - prefill, cfg.max_position_embeddings, **engine_kw)
    check_mesh(ec, cfg, B)
    prompt, lens = pad_prompts(tokens[:, :prefill], ec.prompt_len, ec.pad_id)
    lp, cache = _score_jit(params, policy_params, cfg, ec, prompt, lens, jnp.asarray(tokens[:, prefill:]))
    return np.asarray(lp), cache


def stream(
    params: Params,
    cfg: LlamaConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    steps_per_chunk: int = 8,
    policy_params=None,
    **engine_kw,
) -> Iterator[np.ndarray]:
    """Like `generate`, but yields the tokens [B, k] emitted by each jitted chunk.

    Rows that hit EOS yield `pad_id` afterwards; the first yield is the
    prefill's token (time to first token). steps_per_chunk is rounded up to a
    multiple of the policy's period k (ADORE: rebuild_every); when k does not
    divide max_new_tokens - 1, the steps left at the end run as one shorter
    chunk (a second compiled program)."""
    if steps_per_chunk < 1:
        raise ValueError(f"steps per chunk must be >= 1, got {steps_per_chunk}")
    ec, tokens, lens = _prepare(cfg, prompts, max_new_tokens, engine_kw)
    per_chunk = -(-steps_per_chunk // ec.policy.period) * ec.policy.period
    sp = sampling.validate()
    s = _prefill_jit(params, policy_params, cfg, ec, tokens, lens, jax.random.key(seed), sp)
    done_upto = 0
    while True:
        step = int(s.step)
        if step > done_upto:
            yield np.asarray(s.out[:, done_upto:step])
            done_upto = step
        if step >= max_new_tokens or bool(jnp.all(s.done)):
            return
        left = max_new_tokens - step
        s = _decode_chunk_jit(params, policy_params, cfg, ec, s, sp, per_chunk if left >= ec.policy.period else left)
