"""The packages import one way: math <- sampling <- training <- commands.

``lightning_modules`` (the training module and its CLI) may use the math, the sampler, the
callback and the datamodules, never the commands; ``datamodules`` use the math only; math,
sampling and training never import either.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> the project packages it may import (besides itself)
ALLOWED = {
    "certify.math": set(),
    "certify.sampling": {"certify.math"},
    "certify.training": {"certify.math", "certify.sampling"},
    "certify.commands": {
        "certify.math",
        "certify.sampling",
        "certify.training",
        "lightning_modules",
        "datamodules",
    },
    "lightning_modules": {"certify.math", "certify.sampling", "certify.training", "datamodules"},
    "datamodules": {"certify.math"},
}


def package_of(module: str) -> str | None:
    """The package of ``ALLOWED`` that ``module`` belongs to (``certify`` itself: None)."""
    for package in ALLOWED:
        if module == package or module.startswith(package + "."):
            return package
    return None


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


@pytest.mark.parametrize("package", list(ALLOWED))
def test_package_imports_only_the_layers_below(package):
    assert sources(package), f"{package} has no sources"
    wrong = set()
    for path in sources(package):
        for name in imports(path):
            if name == "certify" and package != "certify.commands":
                wrong.add(f"{path.relative_to(ROOT)}: {name}")  # the package's __init__
                continue
            target = package_of(name)
            if target is not None and target != package and target not in ALLOWED[package]:
                wrong.add(f"{path.relative_to(ROOT)}: {name}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_checker_sees_a_wrong_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from certify.commands.cli import main\nimport lightning_modules.cli\n")
    found = {package_of(name) for name in imports(source)}
    assert {"certify.commands", "lightning_modules"} <= found
    assert "certify.commands" not in ALLOWED["lightning_modules"]
