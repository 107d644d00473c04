"""The shape of the package: no import circle, no library import from tests/, a trainer of plain functions, comments
that cite the repository only, every config field declared once (reading the source, not running it)."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "dff_jax"


def _imports(path: Path) -> set[str]:
    """dff_jax modules imported anywhere in `path` (top level or inside functions: a lazy import is still an edge)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "dff_jax":
                out |= {a.name for a in node.names}
            elif node.module.startswith("dff_jax."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dff_jax.")}
    return out


def test_no_import_circle_in_the_package():
    graph = {p.stem: _imports(p) - {p.stem} for p in PACKAGE.glob("*.py")}
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import circle: {' -> '.join([*path, module])}"
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            visit(dep, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_the_library_never_imports_from_tests():
    for path in [*PACKAGE.glob("*.py"), *(REPO / "extract").glob("*.py")]:
        text = path.read_text()
        tree = ast.parse(text)
        modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in modules if m.split(".")[0] in ("tests", "conftest", "torch_sasrec")], path
        assert '"tests"' not in text and "'tests'" not in text, f"{path} reaches into tests/"


def test_train_is_plain_functions_with_a_module_level_step():
    for name in ("train.py", "train_state.py", "evaluate.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        assert not [n.name for n in tree.body if isinstance(n, ast.ClassDef)], f"{name} defines a class"
    functions = {
        n.name for n in ast.parse((PACKAGE / "train_state.py").read_text()).body if isinstance(n, ast.FunctionDef)
    }
    assert {"create_train_state", "train_step", "jit_train_step"} <= functions
    assert "train_and_evaluate" in {
        n.name for n in ast.parse((PACKAGE / "train.py").read_text()).body if isinstance(n, ast.FunctionDef)
    }


def test_comments_cite_the_repository_not_the_folders_beside_it():
    for folder in ("dff_jax", "extract", "configs"):
        for path in (REPO / folder).glob("*.py"):
            text = path.read_text()
            assert "shared/reference" not in text and "reference/microlens-protocol" not in text, path


def test_no_module_keeps_config_defaults_of_its_own():
    # the fallbacks that once shadowed dff_jax/defaults.py (models._cfg, losses._cfg, parallel._get/default_config)
    for path in PACKAGE.glob("*.py"):
        if path.name == "defaults.py":
            continue
        defs = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
        assert not defs & {"_cfg", "_get", "default_config"}, path
