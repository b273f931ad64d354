"""The `adore` command: streaming generation and one-line errors for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

from adore_jax.cli import main


@pytest.fixture
def default_model(smollm2_gguf, smollm2_model, monkeypatch):
    """Commands that load the default model get the package's smollm2_model: load_model
    of the default GGUF in float32 on one device, the call the command makes, hands out
    that call's earlier result instead of parsing and dequantizing the file again (about
    10 s a load on a 2-core CPU). Any other load (a mesh, an adapter) runs for real."""
    import jax.numpy as jnp

    import models.loading

    real = models.loading.load_model

    def load_model(spec, dtype=jnp.float32, mesh=None, layers="auto", adapter=None):
        if (Path(spec), dtype, mesh, layers, adapter) == (smollm2_gguf, jnp.float32, None, "auto", None):
            return smollm2_model
        return real(spec, dtype, mesh, layers, adapter)

    monkeypatch.setattr(models.loading, "load_model", load_model)


def _run(args, capsys):
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_generate_default_model(default_model, capsys):
    rc, out, err = _run(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "12"], capsys)
    assert rc == 0
    assert "Paris" in out
    assert "tokens" in err and "tokens/s" in err


def test_generate_adore_policy(default_model, capsys):
    rc, out, err = _run(["generate", "--prompt", "Hello", "--max-new-tokens", "6", "--policy", "adore",
                         "--cache-size", "8", "--rebuild", "2"], capsys)
    assert rc == 0 and len(out.strip()) > 0


def test_generate_on_a_mesh(smollm2_gguf, capsys):
    """--mesh: the weights placed on it, the steps under shard_map (test_sharding.py
    compares the tokens with one device's)."""
    rc, out, _ = _run(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "4",
                       "--mesh", "data=1,model=1"], capsys)
    assert rc == 0 and "Paris" in out


def test_info_reports_cache_bytes(default_model, capsys):
    rc, out, _ = _run(["info", "--policy", "window", "--cache-size", "512", "--max-len", "4096"], capsys)
    assert rc == 0
    assert "full attention: 180.00 MiB" in out  # 2 (K,V) x 30 layers x 3 heads x 64 x 4 bytes x 4096
    assert "8.0x smaller" in out


@pytest.mark.parametrize(
    "args,msg",
    [
        (["generate", "--prompt", "x", "--model", "/no/such/dir"], "no such model"),
        (["generate", "--prompt", "x", "--adapter", "/no/such/adapter"], "not an adapter folder"),
        (["generate", "--prompt", "x", "--temperature", "-1"], "temperature"),
        (["generate", "--prompt", "x", "--top-p", "0"], "top-p"),
        (["generate", "--prompt", "x", "--max-new-tokens", "0"], "max-new-tokens"),
        (["generate", "--prompt", "word " * 9000], "maximum length"),
        (["generate", "--prompt", "x", "--policy", "adore"], "cache size"),
        (["generate", "--prompt", "x", "--policy", "window", "--cache-size", "4", "--sinks", "3", "--recent", "3"], "exceed"),
        (["generate", "--prompt", "x", "--mesh", "data=2,model=4"], "needs 8 devices, 1 are here"),
        (["generate", "--prompt", "x", "--mesh", "rows=2"], "data=2,model=4"),
        (["train-controller", "--steps", "0"], "must be >= 1"),
        (["train-controller", "--config", "/no/such.toml"], "cannot read config"),
    ],
)
def test_bad_input_one_line_error(default_model, capsys, args, msg):
    rc, out, err = _run(args, capsys)
    assert rc == 2
    assert err.startswith("adore: error:") and msg in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_packaged_adapter_on_another_model_is_a_one_line_error(tiny_hf_checkpoints, capsys):
    """`--adapter packaged` fits the default model only: on another shape, one line and exit 2."""
    rc, _, err = _run(["generate", "--prompt", "x", "--model", str(tiny_hf_checkpoints["mha_untied"]),
                       "--adapter", "packaged"], capsys)
    assert rc == 2 and err.startswith("adore: error:") and "trained for" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_corrupt_checkpoint_from_shell(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    res = subprocess.run([sys.executable, "-m", "adore_jax", "generate", "--prompt", "x", "--model", str(bad)],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith("adore: error:") and "Traceback" not in res.stderr


def test_adore_uses_the_packaged_controller(smollm2_model, default_model, capsys):
    """For SmolLM2 the trained controller shipped in the package is the default."""
    from adore_jax.controller import ASSETS, model_signature
    from adore_jax.policies import build_policy

    _, state, note = build_policy("adore", smollm2_model.cfg, 64)
    assert str(ASSETS / model_signature(smollm2_model.cfg)) in note
    assert (ASSETS / model_signature(smollm2_model.cfg) / "MODEL_CARD.md").exists()
    rc, _, err = _run(["generate", "--prompt", "Hi", "--max-new-tokens", "2", "--policy", "adore", "--cache-size", "8"], capsys)
    assert rc == 0 and "assets/controllers" in err


def test_out_of_device_memory_one_line_with_a_hint(capsys):
    """JAX's out-of-memory error (as XLA raises it on a GPU) ends in one line and exit status 1."""
    import jax

    from adore_jax.cli import run_main

    def oom():
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 62.43GiB with "
                                         "allocator GPU_0_bfc on device 0.\nCurrent allocation summary follows.")

    rc = run_main(oom)
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("adore: error: out of device memory (RESOURCE_EXHAUSTED") and "MEM_FRACTION" in err
    assert "Traceback" not in err and err.count("\n") == 1
    def other():
        raise RuntimeError("not memory")

    with pytest.raises(RuntimeError, match="not memory"):  # other runtime errors keep their traceback
        run_main(other)


def test_info_reports_8bit_slot_bytes(default_model, capsys):
    rc, out, _ = _run(["info", "--policy", "window", "--cache-size", "512", "--max-len", "4096", "--kv-dtype", "int8"],
                      capsys)
    assert rc == 0
    assert "12240 bytes per slot, int8 slots" in out  # 2 (K,V) x 30 layers x 3 heads x (64 + a 4-byte scale)
    assert "full attention: 47.81 MiB" in out
