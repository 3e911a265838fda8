"""common/'s layers import only downward (the rule and the order are in common/__init__.py).

Every import of every module is read from its syntax tree, lazy imports inside functions
included, so a layer cannot reach up by importing late. The checker is tested on a
deliberately wrong import too, so a broken checker cannot pass silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

from common import LAYERS
from tests.conftest import REPO_ROOT

COMMON = REPO_ROOT / "common"


def layer_of(module: str) -> str | None:
    """``common.quant.int8`` -> ``quant``; None for ``common`` itself and non-project names."""
    parts = module.split(".")
    if parts[0] != "common" or len(parts) < 2:
        return None
    return parts[1]


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) for every ``import``/``from`` of a ``common`` module in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "common":  # from common import quant -> the subpackage
                found += [(node.lineno, f"common.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.split(".")[0] == "common"]


def upward_imports(path: Path, source: str) -> list[str]:
    """One line per import of ``source`` (the module at ``path``) from a higher layer."""
    own = path.relative_to(COMMON).parts[0]
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    problems = []
    for line, name in imported_modules(source):
        layer = layer_of(name)
        if layer in rank and rank[layer] > rank[own]:
            problems.append(
                f"{path.relative_to(REPO_ROOT)}:{line} imports {name}: layer {layer!r} is "
                f"above {own!r} (order: {' < '.join(LAYERS)})"
            )
    return problems


def test_every_module_sits_in_a_layer() -> None:
    loose = [p.name for p in COMMON.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules directly in common/ belong in a layer: {loose}"
    packages = sorted(p.name for p in COMMON.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(LAYERS), (packages, LAYERS)


def test_layers_import_only_downward() -> None:
    problems = []
    for path in sorted(COMMON.rglob("*.py")):
        if path.parent == COMMON:
            continue
        problems += upward_imports(path, path.read_text())
    assert problems == [], "\n".join(problems)


def test_an_upward_import_is_caught_even_when_lazy() -> None:
    source = "def run():\n    from common.steps.cli import main\n    return main\n"
    problems = upward_imports(COMMON / "quant" / "int8.py", source)
    assert problems == [
        "common/quant/int8.py:2 imports common.steps.cli: layer 'steps' is above 'quant' "
        f"(order: {' < '.join(LAYERS)})"
    ]
    assert upward_imports(COMMON / "steps" / "cli.py", source) == []  # same layer
    below = "import common.core.errors\nfrom common.models import get_adapter\n"
    assert upward_imports(COMMON / "quant" / "int8.py", below) == []
