"""The import graph is layered (DESIGN.md): model/, data/, sharding.py <- train/ <- infer/ <- eval/.

Every import statement of every module is read from the source (function-level imports included), so a
lazy import cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "alpacare_jax"

# Where a module lives -> the packages it must never import.
FORBIDDEN = {
    "alpacare_jax.model": ("alpacare_jax.train", "alpacare_jax.infer", "alpacare_jax.eval", "alpacare_jax.workdir"),
    "alpacare_jax.data": ("alpacare_jax.train", "alpacare_jax.infer", "alpacare_jax.eval", "alpacare_jax.workdir"),
    "alpacare_jax.sharding": ("alpacare_jax.train", "alpacare_jax.infer", "alpacare_jax.eval"),
    "alpacare_jax.train": ("alpacare_jax.infer", "alpacare_jax.eval"),
    "alpacare_jax.infer": ("alpacare_jax.eval",),
    "alpacare_jax.storage": ("alpacare_jax.model", "alpacare_jax.data", "alpacare_jax.sharding", "alpacare_jax.train",
                             "alpacare_jax.infer", "alpacare_jax.eval", "alpacare_jax.workdir", "alpacare_jax.hf"),
    "data_gen": ("alpacare_jax",),
}


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = REPO_ROOT) -> set[str]:
    """Absolute names of everything `path` imports (`from x import y` gives x and x.y)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def sources() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *(REPO_ROOT / "data_gen").rglob("*.py")])


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_imports_point_down_the_layers(path):
    name = module_name(path)
    forbidden = [f for layer, banned in FORBIDDEN.items() if _within(name, layer) for f in banned]
    upward = sorted(i for i in imported_modules(path) if any(_within(i, f) for f in forbidden))
    assert not upward, f"{name} imports {upward}, above its layer"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_alpacare_jax_uses_only_the_public_api_of_data_gen(path):
    private = sorted(i for i in imported_modules(path) if i.startswith("data_gen.")
                     and i.split(".")[1] not in _public_names())
    assert not private, f"{module_name(path)} reaches into data_gen's modules: {private}"


def _public_names() -> set[str]:
    import data_gen

    return set(data_gen.__all__)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    probe = tmp_path / "alpacare_jax" / "model" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from alpacare_jax.infer import serve\n    from ..train import loop\n")
    assert {"alpacare_jax.infer.serve", "alpacare_jax.train.loop"} <= imported_modules(probe, tmp_path)
