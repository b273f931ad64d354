"""Load Llama-family weights into `models.llama.Params`.

Sources: a Hugging Face checkpoint directory (config.json + safetensors), a
llama.cpp GGUF file (any quantization the gguf package can dequantize), or a
Hub id (downloaded with huggingface_hub). Every user mistake (missing file,
corrupt file, unsupported architecture, no network) raises `ModelLoadError`
whose str() is one line saying what went wrong and what to do.

Tensors are read with numpy, transposed from torch's [out, in] to [in, out],
stacked over layers ([L, ...]), cast to `dtype` and put on device, optionally
sharded over a mesh axis (`param_partition_specs`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.llama import LAYOUTS, LayerParams, LlamaConfig, Params, RopeScaling, config_from_hf, with_layout

CHAT_EOS_TOKENS = ("<|im_end|>", "<|eot_id|>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "chat_template.jinja"]


class ModelLoadError(ValueError):
    """A model could not be loaded; str(err) is a one-line message for the user."""


def _reason(e: BaseException) -> str:
    """'ErrorType: first line of the message' (one line, for ModelLoadError texts)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded model: config, device params, tokenizer (None if the source has none)."""

    cfg: LlamaConfig
    params: Params
    tokenizer: Any
    source: str


def resolve_dtype(name: str):
    """Param dtype for a name: "auto" is bfloat16 on GPU/TPU and float32 on CPU."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


# ---------------------------------------------------------------- placement


def param_partition_specs(cfg: LlamaConfig, params: Params, axis: str = "model",
                          axis_size: Optional[int] = None) -> Params:
    """PartitionSpecs (a Params-shaped pytree) for tensor parallelism over `axis`.

    Shards the output dim of wq/wk/wv (and their biases), w_gate_up (F) and lm_head,
    the input dim of wo/w_down; replicates norms and the embedding. A weight whose
    sharded unit (heads for attention, F for the MLP, V for lm_head) is not
    divisible by axis_size is replicated (axis_size None: assume divisible).
    Stacked layers get a leading unsplit [L] axis; unstacked ones a spec each.
    """
    ok = lambda n: axis_size is None or n % axis_size == 0
    a = lambda n: axis if ok(n) else None
    q, kv, f = a(cfg.num_heads), a(cfg.num_kv_heads), a(cfg.intermediate_size)
    unstacked = isinstance(params.layers, tuple)
    lp = params.layers[0] if unstacked else params.layers
    S = lambda *dims: P(*dims) if unstacked else P(None, *dims)
    layer = LayerParams(
        attn_norm=P(), mlp_norm=P(),
        wq=S(None, q), wk=S(None, kv), wv=S(None, kv), wo=S(q, None),
        w_gate_up=S(None, None, f), w_down=S(f, None),
        bq=None if lp.bq is None else S(q),
        bk=None if lp.bk is None else S(kv),
        bv=None if lp.bv is None else S(kv),
    )
    layers = tuple(layer for _ in params.layers) if unstacked else layer
    lm_head = None if params.lm_head is None else P(None, a(cfg.vocab_size))
    return Params(embed=P(), layers=layers, final_norm=P(), lm_head=lm_head)


def place_params(cfg: LlamaConfig, params: Params, mesh: Optional[Mesh] = None, layers: str = "auto",
                 axis: str = "model", adapter: Optional[str | os.PathLike] = None) -> Params:
    """device_put host (numpy) params, sharded over mesh[axis] when a mesh is given;
    layers: "stacked", "unstacked" or "auto" (models.llama.default_layout). The
    layout is made on the host (views, no copy), so the device holds no freed
    intermediate between the weights: its free memory stays in one piece
    (unstacking on a GPU leaves a hole the size of the weights). adapter: a LoRA
    adapter folder (models/lora.py), merged on the host before placement."""
    if layers not in ("auto", *LAYOUTS):
        raise ModelLoadError(f"unknown layer layout {layers!r} (auto, {', '.join(LAYOUTS)})")
    if adapter is not None:
        from models.lora import merge_adapter

        try:
            with jax.default_device(jax.devices("cpu")[0]):
                params = jax.device_get(merge_adapter(params, adapter))
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
    params = with_layout(params, layers)  # host numpy: views, no copy
    if mesh is None:
        return jax.device_put(params)
    specs = param_partition_specs(cfg, params, axis, mesh.shape[axis])
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    return jax.device_put(params, shardings)


def _build_params(cfg: LlamaConfig, get: Callable[[str], np.ndarray], names: dict, dtype) -> Params:
    """Stack per-layer tensors into Params (host numpy, cast to dtype).

    get(name) returns an [out, in] (or 1-D) array; names maps our field (and
    w_gate, w_up, which fill w_gate_up) to a format string with {i} for the layer
    index (matrices are transposed).
    """
    np_dtype = np.dtype(jnp.dtype(dtype))
    vectors = ("attn_norm", "mlp_norm", "bq", "bk", "bv")

    def one(name: str, transpose: bool) -> np.ndarray:
        x = np.asarray(get(name))
        return (x.T if transpose else x).astype(np_dtype, copy=False)

    def layer_tensor(field: str, i: int) -> np.ndarray:
        return one(names[field].format(i=i), field not in vectors)

    def stacked(field: str) -> np.ndarray:  # [L, ...]
        first = layer_tensor(field, 0)
        out = np.empty((cfg.num_layers, *first.shape), np_dtype)
        out[0] = first
        for i in range(1, cfg.num_layers):
            out[i] = layer_tensor(field, i)
        return out

    def joined(*fields: str) -> np.ndarray:  # [L, E, len(fields), F]: each layer's [E, F] tensors, written in place
        E, F = cfg.hidden_size, cfg.intermediate_size
        out = np.empty((cfg.num_layers, E, len(fields), F), np_dtype)
        for i in range(cfg.num_layers):
            for j, f in enumerate(fields):
                x = layer_tensor(f, i)
                if x.shape != (E, F):
                    raise ModelLoadError(f"weight {names[f].format(i=i)} has shape {x.shape[::-1]}, config implies {(F, E)}")
                out[i, :, j] = x
        return out

    fields = ["attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_down"]
    if cfg.attention_bias:
        fields += ["bq", "bk", "bv"]
    layers = LayerParams(**{f: stacked(f) for f in fields}, w_gate_up=joined("w_gate", "w_up"))
    params = Params(
        embed=one(names["embed"], False),
        layers=layers,
        final_norm=one(names["final_norm"], False),
        lm_head=None if cfg.tie_word_embeddings else one(names["lm_head"], True),
    )
    _check_shapes(cfg, params)
    return params


def _check_shapes(cfg: LlamaConfig, p: Params) -> None:
    L, E, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    want = dict(embed=(V, E), final_norm=(E,), attn_norm=(L, E), mlp_norm=(L, E), wq=(L, E, qd),
                wk=(L, E, kd), wv=(L, E, kd), wo=(L, qd, E), w_gate_up=(L, E, 2, F),
                w_down=(L, F, E), bq=(L, qd), bk=(L, kd), bv=(L, kd), lm_head=(E, V))
    got = dict(embed=p.embed, final_norm=p.final_norm, lm_head=p.lm_head,
               **{f.name: getattr(p.layers, f.name) for f in dataclasses.fields(p.layers)})
    for name, x in got.items():
        if x is not None and tuple(x.shape) != want[name]:
            raise ModelLoadError(f"weight {name} has shape {tuple(x.shape)}, config implies {want[name]}")


# ---------------------------------------------------------------- Hugging Face directories

HF_NAMES = dict(
    embed="model.embed_tokens.weight", final_norm="model.norm.weight", lm_head="lm_head.weight",
    attn_norm="model.layers.{i}.input_layernorm.weight", mlp_norm="model.layers.{i}.post_attention_layernorm.weight",
    wq="model.layers.{i}.self_attn.q_proj.weight", wk="model.layers.{i}.self_attn.k_proj.weight",
    wv="model.layers.{i}.self_attn.v_proj.weight", wo="model.layers.{i}.self_attn.o_proj.weight",
    bq="model.layers.{i}.self_attn.q_proj.bias", bk="model.layers.{i}.self_attn.k_proj.bias",
    bv="model.layers.{i}.self_attn.v_proj.bias",
    w_gate="model.layers.{i}.mlp.gate_proj.weight", w_up="model.layers.{i}.mlp.up_proj.weight",
    w_down="model.layers.{i}.mlp.down_proj.weight",
)


def read_hf_config(path: str | os.PathLike) -> tuple[LlamaConfig, dict]:
    """(LlamaConfig, raw dict) from <path>/config.json."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} has no config.json (expected a Hugging Face checkpoint directory)")
    try:
        raw = json.loads(cfg_file.read_text())
        return config_from_hf(raw), raw
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON ({_reason(e)})") from None
    except KeyError as e:
        raise ModelLoadError(f"{cfg_file} lacks the field {e}") from None
    except ValueError as e:
        raise ModelLoadError(f"{path}: {str(e).splitlines()[0]}") from None


def _safetensors_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file holding it (single file or sharded index); {} = read the single file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({_reason(e)})") from None
        return {name: path / f for name, f in weight_map.items()}
    if (path / "model.safetensors").is_file():
        return {}
    raise ModelLoadError(
        f"{path} has no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are supported)"
    )


def load_hf_dir(path: str | os.PathLike, dtype=jnp.float32, mesh: Optional[Mesh] = None,
                layers: str = "auto", adapter: Optional[str | os.PathLike] = None) -> tuple[LlamaConfig, Params]:
    """Load a Hugging Face Llama/Mistral/Qwen2 checkpoint directory -> (cfg, device params)
    (adapter: place_params')."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfg, _ = read_hf_config(path)
    file_of = _safetensors_files(path)
    opened: dict[Path, tuple[Any, set]] = {}

    def get(name: str) -> np.ndarray:
        f = file_of.get(name) if file_of else path / "model.safetensors"
        if f is None:
            raise ModelLoadError(f"{path} has no tensor {name!r} (incomplete or not a Llama-family checkpoint)")
        if f not in opened:
            if not f.is_file():
                raise ModelLoadError(f"{f} is missing (named in the safetensors index of {path})")
            h = safe_open(str(f), framework="np")
            opened[f] = (h, set(h.keys()))
        h, keys = opened[f]
        if name not in keys:
            raise ModelLoadError(f"{f} has no tensor {name!r} (incomplete or not a Llama-family checkpoint)")
        return h.get_tensor(name)

    try:
        params = _build_params(cfg, get, HF_NAMES, dtype)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"could not read the safetensors in {path} (corrupt or truncated file?): {_reason(e)}") from None
    finally:
        opened.clear()
    return cfg, place_params(cfg, params, mesh, layers, adapter=adapter)


# ---------------------------------------------------------------- GGUF files

GGUF_NAMES = dict(
    embed="token_embd.weight", final_norm="output_norm.weight", lm_head="output.weight",
    attn_norm="blk.{i}.attn_norm.weight", mlp_norm="blk.{i}.ffn_norm.weight",
    wq="blk.{i}.attn_q.weight", wk="blk.{i}.attn_k.weight", wv="blk.{i}.attn_v.weight",
    wo="blk.{i}.attn_output.weight", bq="blk.{i}.attn_q.bias", bk="blk.{i}.attn_k.bias",
    bv="blk.{i}.attn_v.bias", w_gate="blk.{i}.ffn_gate.weight", w_up="blk.{i}.ffn_up.weight",
    w_down="blk.{i}.ffn_down.weight",
)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order. w: [n_heads*D, ...] -> same shape, HF layout.

    The converter stores row (h, j, i) of the interleaved layout [H, D/2, 2] from
    HF row (h, i, j) of the rotate-half layout [H, 2, D/2]; swap back.
    """
    rest = w.shape[1:]
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _open_gguf(file: Path):
    import gguf

    if not file.is_file():
        raise ModelLoadError(f"GGUF file {file} does not exist")
    try:
        return gguf.GGUFReader(str(file))
    except Exception as e:  # the reader raises assorted errors on bad input
        raise ModelLoadError(f"{file} is not a readable GGUF file (corrupt or truncated?): {_reason(e)}") from None


def gguf_config(reader, file: Path | str = "GGUF file") -> LlamaConfig:
    """LlamaConfig from GGUF metadata (llama.* keys)."""
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{file}: unsupported GGUF architecture {arch!r} (only 'llama' is supported)")
    k = lambda name, default=None: _gguf_field(reader, f"llama.{name}", default)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ModelLoadError(f"{file}: GGUF with explicit rope_freqs (Llama 3.1 rope scaling) is not supported; "
                             "use the Hugging Face checkpoint directory instead")
    try:
        E, heads = int(k("embedding_length")), int(k("attention.head_count"))
        head_dim = int(k("attention.key_length", E // heads))
        scaling = None
        if k("rope.scaling.type") == "linear":
            scaling = RopeScaling("linear", float(k("rope.scaling.factor")))
        elif k("rope.scaling.type") not in (None, "none"):
            raise ModelLoadError(f"{file}: unsupported rope scaling {k('rope.scaling.type')!r}")
        eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
        bos = _gguf_field(reader, "tokenizer.ggml.bos_token_id")
        # The embedding rows are the vocabulary the weights define (the token list may be shorter).
        vocab = int(tensors["token_embd.weight"].shape[-1])
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=E,
            intermediate_size=int(k("feed_forward_length")),
            num_layers=int(k("block_count")),
            num_heads=heads,
            num_kv_heads=int(k("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(k("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(k("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            max_position_embeddings=int(k("context_length", 4096)),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=() if eos is None else (int(eos),),
        )
    except (TypeError, KeyError) as e:
        raise ModelLoadError(f"{file}: GGUF metadata is incomplete ({_reason(e)})") from None


def load_gguf(file: str | os.PathLike, dtype=jnp.float32, mesh: Optional[Mesh] = None,
              layers: str = "auto", adapter: Optional[str | os.PathLike] = None) -> tuple[LlamaConfig, Params]:
    """Load a llama.cpp GGUF file (dequantized to dtype) -> (cfg, device params) in HF layout
    (adapter: place_params')."""
    from gguf.quants import dequantize

    file = Path(file)
    reader = _open_gguf(file)
    cfg = gguf_config(reader, file)
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{file} has no tensor {name!r}: not a Llama-family model or incomplete")
        try:
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except (ValueError, NotImplementedError) as e:
            raise ModelLoadError(f"{file}: cannot dequantize {name} ({t.tensor_type.name}): {_reason(e)}") from None
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, cfg.num_heads)
        elif name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, cfg.num_kv_heads)
        return w

    params = _build_params(cfg, get, GGUF_NAMES, dtype)
    return cfg, place_params(cfg, params, mesh, layers, adapter=adapter)


# ---------------------------------------------------------------- tokenizers


def tokenizer_cache_path(gguf_file: str | os.PathLike) -> Path:
    """The sibling folder `<file>.tokenizer/` that caches a GGUF's converted tokenizer."""
    return Path(str(gguf_file) + ".tokenizer")


def save_tokenizer_cache(gguf_file: str | os.PathLike, out_dir: str | os.PathLike | None = None):
    """Convert a GGUF's tokenizer (slow) and save it atomically to out_dir; returns the tokenizer.

    out_dir defaults to `tokenizer_cache_path(gguf_file)`. Written to a temp folder
    then renamed, so no half-written folder remains. An unwritable folder is skipped.
    """
    from transformers import AutoTokenizer

    gguf_file = Path(gguf_file)
    out = Path(out_dir) if out_dir is not None else tokenizer_cache_path(gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    except Exception as e:
        raise ModelLoadError(f"could not read the tokenizer of {gguf_file}: {_reason(e)}") from None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent))
    except OSError:
        return tok
    try:
        tok.save_pretrained(str(tmp))
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except OSError:  # another process won the race, or the folder is unwritable
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def load_tokenizer(path_or_file: str | os.PathLike):
    """A transformers tokenizer from a checkpoint directory or a .gguf file (cached beside it)."""
    from transformers import AutoTokenizer

    p = Path(path_or_file)
    hint = ""
    if p.is_file() and p.suffix == ".gguf":
        cache = tokenizer_cache_path(p)
        if not (cache / "tokenizer_config.json").is_file():
            return save_tokenizer_cache(p)
        p, hint = cache, " (delete that folder to rebuild it)"
    if not p.is_dir():
        raise ModelLoadError(f"no tokenizer at {path_or_file} (expected a directory or a .gguf file)")
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:
        raise ModelLoadError(f"could not load the tokenizer in {p}: {_reason(e)}{hint}") from None


def with_eos_ids(cfg: LlamaConfig, tokenizer) -> LlamaConfig:
    """cfg with eos_token_ids = config's + tokenizer's eos + chat end-of-turn tokens (in vocab)."""
    ids = list(cfg.eos_token_ids)
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        vocab = tokenizer.get_vocab()
        ids += [int(vocab[t]) for t in CHAT_EOS_TOKENS if t in vocab]
    ids = [i for i in dict.fromkeys(ids) if 0 <= i < cfg.vocab_size]
    return dataclasses.replace(cfg, eos_token_ids=tuple(ids))


# ---------------------------------------------------------------- one entry point

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _download_hub(repo_id: str) -> Path:
    """snapshot_download the files we read; errors become ModelLoadError."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise ModelLoadError(
            f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face Hub ({_reason(e)}); "
            f"download it where the Hub is reachable (`hf download {repo_id} --local-dir DIR`) and pass DIR, "
            "or run `adore fetch-model` for the default model"
        ) from None


def load_model(spec: str | os.PathLike, dtype=jnp.float32, mesh: Optional[Mesh] = None, layers: str = "auto",
               adapter: Optional[str | os.PathLike] = None) -> Model:
    """Load a model from a checkpoint directory, a .gguf file or a Hub id ("org/name").

    layers: how the layer weights are held: "stacked" [L, ...] (scanned), "unstacked"
    (a buffer per layer, unrolled: faster decode on GPU) or "auto" (unstacked on GPU,
    else stacked). Training passes "stacked". mesh: the weights are split over its
    "model" axis (`param_partition_specs`; adore_jax.sharding.make_mesh makes a
    generation mesh). adapter: a LoRA adapter folder (models/lora.py) merged into
    the weights; the model's source then names it."""
    p = Path(spec).expanduser()
    if not p.exists():
        s = str(spec)
        if _HUB_ID.match(s) and not s.endswith(".gguf"):
            p = _download_hub(s)
        else:
            raise ModelLoadError(f"no such model file or directory: {s}")
    if p.is_dir():
        cfg, params = load_hf_dir(p, dtype, mesh, layers, adapter)
        has_tok = any((p / f).is_file() for f in TOKENIZER_FILES)
        tokenizer = load_tokenizer(p) if has_tok else None
    elif p.suffix == ".gguf":
        cfg, params = load_gguf(p, dtype, mesh, layers, adapter)
        tokenizer = load_tokenizer(p)
    else:
        raise ModelLoadError(f"{p} is neither a checkpoint directory nor a .gguf file")
    source = str(spec) + ("" if adapter is None else f" + adapter {Path(adapter).expanduser().absolute()}")
    return Model(with_eos_ids(cfg, tokenizer), params, tokenizer, source)
