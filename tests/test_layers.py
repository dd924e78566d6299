"""Imports flow one way through the layers (docs/architecture.md), and importing the engine
does not import matplotlib."""

import ast
import subprocess
import sys
from pathlib import Path

import cryosgd

# Lowest first; a module may import its own layer and the layers below it.
LAYERS = [
    ("errors", "conventions", "compiled", "resources", "dist"),
    ("io",),
    ("data",),
    ("fourier",),
    ("model",),
    ("objective",),
    ("optim",),
    ("pose",),
    ("recon",),
    ("analysis", "sim", "report"),
    ("api",),
    ("cli", "__main__"),
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
PACKAGE = Path(cryosgd.__file__).parent


def _imports(path: Path):
    """``cryosgd.X…`` modules that ``path`` imports (anywhere in the file), with line numbers."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("cryosgd"):
            names = [node.module] if node.module != "cryosgd" else [f"cryosgd.{a.name}" for a in node.names]
            yield from ((name, node.lineno) for name in names)
        elif isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names if a.name.startswith("cryosgd."))


def test_every_module_has_a_layer_and_imports_only_its_layer_and_below():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue  # the lazy public facade
        assert parts[0] in LAYER_OF, f"{path}: not in any layer of tests/test_layers.py"
        own = LAYER_OF[parts[0]]
        for name, line in _imports(path):
            target = name.split(".")[1]
            if LAYER_OF[target] > own:
                violations.append(f"{path.relative_to(PACKAGE)}:{line} imports {name}")
    assert not violations, "\n".join(violations)


def test_importing_the_engine_imports_neither_matplotlib_nor_the_compiler():
    code = ("import sys, cryosgd.recon.reconstruct, cryosgd.api\n"
            "print('matplotlib' in sys.modules, 'torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False"], result.stdout + result.stderr
