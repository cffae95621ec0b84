"""The import floors of docs/design.md ("Package layout"): a module imports only from its own floor
or below, anywhere in the file (function-level imports included). And the repository explains
itself: both layout maps name every module, and nothing cites a file outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fingerprint_lm"
# floor of each top-level module or subpackage of fingerprint_lm
FLOORS = {
    "errors": 0, "storage": 0, "devices": 0, "resolvers": 0, "config_schema": 0, "pixels": 0,
    "models": 1, "data": 1,
    "methods": 2, "attacks": 2, "metrics": 2, "registry": 2, "lit": 2,
    "distributor": 3, "evaluation": 3, "report": 3,
    "tasks": 4, "bench": 4, "bench_sd": 4, "sweep_guard": 4,
    "__main__": 5, "__init__": 5,
}


def _unit(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported_units(tree: ast.AST) -> set[str]:
    units = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fingerprint_lm."):
            units.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "fingerprint_lm":
            units.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            units.update(a.name.split(".")[1] for a in node.names if a.name.startswith("fingerprint_lm."))
    return units


def test_every_unit_has_a_floor():
    units = {_unit(p) for p in PACKAGE.rglob("*.py")}
    assert units <= set(FLOORS), sorted(units - set(FLOORS))


def test_no_module_imports_a_higher_floor():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        for imported in _imported_units(ast.parse(path.read_text())):
            if imported in FLOORS and FLOORS[imported] > FLOORS[unit]:
                violations.append(f"{path.relative_to(PACKAGE)} imports {imported}")
    assert not violations, violations


def test_storage_imports_nothing_of_the_project():
    assert not _imported_units(ast.parse((PACKAGE / "storage.py").read_text()))


def test_torch_load_only_ever_reads_weights():
    """Anything that travels is safetensors; a torch.load anywhere in the package must be
    weights_only=True (no pickled code runs), and so must Lightning's own load of a checkpoint to
    resume from (``trainer.fit(..., ckpt_path=...)``: Lightning's default defers to torch's, which
    was a full unpickling before torch 2.6); pickle itself is never imported."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and getattr(
                    getattr(node.func, "value", None), "id", None) == "torch":
                flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                assert flags.get("weights_only") is True, f"{path.relative_to(PACKAGE)}:{node.lineno}"
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "fit" and any(
                    k.arg == "ckpt_path" for k in node.keywords):
                flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                assert flags.get("weights_only") is True, f"{path.relative_to(PACKAGE)}:{node.lineno}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not {"pickle", "dill", "cloudpickle"} & set(names), f"{path.relative_to(PACKAGE)}:{node.lineno}"


def test_project_imports_inside_functions_say_why():
    """A project import inside a function is there only to put off a heavy third-party import, and
    a comment on the line or just above says which (docs/design.md, "Package layout"): package,
    tests and experiments."""
    unexplained, root = [], PACKAGE.parent
    for path in sorted([*PACKAGE.rglob("*.py"), *(root / "tests").glob("*.py"), *(root / "experiments").glob("*.py")]):
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                modules = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                           else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                if any(m == "fingerprint_lm" or m.startswith("fingerprint_lm.") for m in modules):
                    around = lines[max(node.lineno - 3, 0) : node.lineno]
                    if not any("#" in line for line in around):
                        unexplained.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not unexplained, unexplained


def test_no_file_over_400_lines_and_no_function_over_80():
    """Sizes a reader can hold (docs/design.md, "Coding style"): package, tests and experiments."""
    root = PACKAGE.parent
    too_long = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(root / "tests").glob("*.py"), *(root / "experiments").glob("*.py")]):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            too_long.append(f"{path.relative_to(root)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 80:
                too_long.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: "
                                f"{node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long


# -- the repository explains itself ---------------------------------------------------------------
def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


def test_both_layout_maps_name_every_module_and_shipped_checkpoint():
    """README's "Layout" and docs/design.md's "Package layout" are the maps a newcomer reads."""
    maps = {
        "README.md": _section((ROOT / "README.md").read_text(), "## Layout", "## Running at scale"),
        "docs/design.md": _section((ROOT / "docs" / "design.md").read_text(), "## Package layout", "Import floors:"),
    }
    missing = [
        f"{where}: {path.relative_to(ROOT)}"
        for path in sorted((ROOT / "fingerprint_lm").rglob("*.py")) if path.name != "__init__.py"
        for where, text in maps.items() if not re.search(rf"(?<![\w.]){path.stem}(\.py)?\b", text)
    ]
    missing += [f"{where}: assets/{folder.name}/" for folder in sorted((ROOT / "fingerprint_lm" / "assets").iterdir())
                if folder.is_dir() for where, text in maps.items() if f"assets/{folder.name}/" not in text]
    assert not missing


def test_nothing_cites_files_outside_the_repository():
    """The method, the layers and the peers' figures are in docs/design.md and the README."""
    outside = re.compile(r"\.\./shared|\b(?:DESIGN|STYLE|FIELD)\.md\b")
    files = [*(ROOT / "fingerprint_lm").rglob("*.py"), *(ROOT / "tests").rglob("*.py"),
             *(ROOT / "experiments").rglob("*.py"), *(ROOT / "conf").rglob("*.yaml"), *(ROOT / "docs").rglob("*.md"),
             ROOT / "README.md", ROOT / "Makefile", ROOT / "experiments" / "README.md"]
    citing = [str(f.relative_to(ROOT)) for f in files
              if f.resolve() != Path(__file__).resolve() and outside.search(f.read_text())]
    assert not citing
