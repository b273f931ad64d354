"""The package layers depend one way, bottom-up: models <- adore_jax <- train, eval."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A layer may import the layers listed for it (and itself); nothing above it.
FORBIDDEN = {"models": {"adore_jax", "train", "eval"}, "adore_jax": {"train", "eval"}}
# The command line dispatches to the train and eval jobs.
EXEMPT = {"adore_jax/cli.py"}


def imported_packages(path: Path) -> set[str]:
    """The top-level package of every absolute import in one file, at any depth (function-level too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def modules(layer: str) -> list[Path]:
    """Every Python file of one layer's package."""
    return sorted((ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer):
    files = modules(layer)
    assert files, f"no modules found under {layer}/"
    bad = {}
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if rel in EXEMPT:
            continue
        up = imported_packages(path) & FORBIDDEN[layer]
        if up:
            bad[rel] = sorted(up)
    assert not bad, f"{layer}/ imports a layer above it: {bad}"


def test_imported_packages_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    from eval.runner import x\n    import train.data\n")
    assert imported_packages(f) == {"os", "eval", "train"}
