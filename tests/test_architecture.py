"""The layering rules of CONVENTIONS.md, held by parsing every import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support import ROOT

OURS = {"schemas", "storage", "workers", "student_train", "stillhouse", "migrations", "examples"}
ALLOWED = {
    "schemas": set(),
    "storage": {"schemas"},
    "workers": {"schemas", "storage", "examples"},
    "student_train": {"schemas", "storage"},
    "migrations": {"storage"},
    "examples": {"schemas"},
    "stillhouse": OURS - {"stillhouse", "migrations"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependencies_point_one_way(package: str) -> None:
    for path in _modules(package):
        ours = (_imports(path) & OURS) - {package}
        assert ours <= ALLOWED[package], (
            f"{path.relative_to(ROOT)} imports {ours - ALLOWED[package]}"
        )


def test_celery_only_in_adapters_and_torch_only_in_student_train() -> None:
    celery_ok = {"workers/celery_app.py", "workers/tasks.py"}
    for package in ALLOWED:
        for path in _modules(package):
            rel = str(path.relative_to(ROOT))
            imports = _imports(path)
            if "celery" in imports:
                assert rel in celery_ok, f"{rel} imports celery"
            if "torch" in imports:
                assert rel.startswith("student_train/"), f"{rel} imports torch"


def test_importing_every_module_is_light_and_needs_no_environment() -> None:
    import subprocess
    import sys

    modules = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for package in ALLOWED
        for p in _modules(package)
        if p.name != "env.py" and "versions" not in p.parts
    ]
    modules = [m.removesuffix(".__init__") for m in modules if not m.endswith("__main__")]
    light = [m for m in modules if not m.startswith("student_train.")]
    trainer = [m for m in modules if m not in light]
    # Everything but the trainer's own modules must import without torch; then the trainer.
    code = (
        "import importlib, sys\n"
        f"for m in {light!r}: importlib.import_module(m)\n"
        "heavy = [m for m in ('torch', 'sentence_transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        f"for m in {trainer!r}: importlib.import_module(m)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={"PATH": "/usr/bin:/bin"}, cwd=ROOT
    )


def _top_level_names(tree: ast.Module) -> tuple[list[str] | None, set[str], set[str]]:
    """A module's ``__all__`` (None without one), every name it binds, its public defs."""
    exported: list[str] | None = None
    bound: set[str] = set()
    public: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            if not node.name.startswith("_"):
                public.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        bound.add(name.id)
                        if name.id == "__all__" and isinstance(node.value, (ast.List, ast.Tuple)):
                            exported = [ast.literal_eval(e) for e in node.value.elts]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
    return exported, bound, public


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_every_all_lists_exactly_the_public_names(package: str) -> None:
    """``__all__`` names only what the module has, and every public function and class:
    a name other modules are not meant to use starts with an underscore."""
    for path in _modules(package):
        if path.name in {"__main__.py", "env.py"} or "versions" in path.parts:
            continue
        exported, bound, public = _top_level_names(ast.parse(path.read_text(encoding="utf-8")))
        rel = path.relative_to(ROOT)
        if exported is None:
            assert not public, f"{rel} has public names {sorted(public)} and no __all__"
            continue
        assert not set(exported) - bound, f"{rel} lists missing {sorted(set(exported) - bound)}"
        assert not public - set(exported), f"{rel} does not list {sorted(public - set(exported))}"
