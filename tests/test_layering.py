"""The package's layering rules, read from the source: no module of taillor/ or kernels/ imports a private name
(``_x``) of another module of the package, or reaches one through a module it imported; and no module is over the
size a maintainer can hold in mind (about 400 lines)."""
from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
# Installed names of the two source trees (kernels/ is installed as taillor._kernels).
PACKAGES = {"taillor": REPO / "taillor", "taillor._kernels": REPO / "kernels"}
MAX_LINES = 410  # "about 400": a module over it has more than one job


def modules():
    """(dotted module name, path) of every module of the package."""
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join((package, *parts)), path


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(module: str, path: pathlib.Path, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom reads from (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _module_path(dotted: str):
    for package, root in PACKAGES.items():
        if dotted == package or dotted.startswith(package + "."):
            rest = dotted[len(package):].lstrip(".").split(".") if dotted != package else []
            base = root.joinpath(*rest) if rest else root
            if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
                return base
    return None


def private_imports(module: str, path: pathlib.Path, source: str | None = None) -> list[str]:
    """Every ``from <package module> import _x`` and every ``<imported package module>._x`` in one file."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    found, module_aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, path, node)
            if _module_path(source) is None:
                continue  # not our package (torch, triton, ...)
            for alias in node.names:
                if _is_private(alias.name):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: from {source} import {alias.name}")
                elif _module_path(f"{source}.{alias.name}") is not None:
                    module_aliases.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id in module_aliases and _is_private(node.attr):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_private_name_is_imported_across_modules():
    found = [hit for module, path in modules() for hit in private_imports(module, path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_check_sees_a_private_import():
    """The checker itself: a relative import of a private name, and a private attribute of an imported module."""
    source = ("from .model import _replace_module\nfrom . import backends\nbackends._resolve\n"
              "from .model import apply_taillor\nfrom torch.utils._python_dispatch import _get_current_dispatch_mode\n")
    hits = private_imports("taillor.probe", REPO / "taillor" / "probe.py", source)
    assert len(hits) == 2 and "_replace_module" in hits[0] and "backends._resolve" in hits[1]


def test_modules_stay_small():
    sizes = {path.relative_to(REPO): len(path.read_text().splitlines()) for _, path in modules()}
    over = {str(path): lines for path, lines in sizes.items() if lines > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them by job): {over}"


def test_importing_taillor_imports_no_training_stack():
    """PEFT, transformers, TRL and accelerate are optional: only taillor.peft_method / taillor.hf_trainer import
    them, never ``import taillor``."""
    import subprocess
    import sys
    code = ("import sys, taillor\n"
            "found = [m for m in ('peft', 'transformers', 'trl', 'accelerate') if m in sys.modules]\n"
            "assert not found, found\n")
    subprocess.run([sys.executable, "-c", code], check=True)
