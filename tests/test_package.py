"""The package's shape: what ``import product_key_memory`` loads, module paths of earlier
versions, and no import cycles."""

import ast
import importlib
import importlib.util
import pkgutil
import subprocess
import sys

import pytest

import product_key_memory

ADD_ONS = (
    "product_key_memory.knn",
    "product_key_memory.models",
    "product_key_memory.diagnostics",
    "product_key_memory.tables.quantized",
    "product_key_memory.training.distributed",
    "product_key_memory.training.clip",
    "product_key_memory.integrations",
    "product_key_memory.cuda_graphs",
)


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_import_loads_the_core_only():
    loaded = run("import sys, product_key_memory; print(' '.join(sorted(sys.modules)))").split()
    assert "product_key_memory.layers.pkm" in loaded and "product_key_memory.ops.search" in loaded
    for name in ADD_ONS:
        assert name not in loaded, f"import product_key_memory loaded {name}"
    assert "triton" not in loaded and "colt5_attention" not in loaded


@pytest.mark.parametrize("name", sorted(product_key_memory._LAZY))
def test_every_public_name_resolves(name):
    assert getattr(product_key_memory, name) is not None
    assert name in product_key_memory.__all__


class _Imports(ast.NodeVisitor):
    """The package modules one module imports, at module level and inside functions."""

    def __init__(self, package: str):
        self.package, self.depth = package, 0
        self.top, self.inner = set(), set()

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def _add(self, names):
        names = {n for n in names if n.split(".")[0] == "product_key_memory"}
        (self.inner if self.depth else self.top).update(names)

    def visit_Import(self, node):
        self._add(a.name for a in node.names)

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")
            parts = parts[: len(parts) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        names = [base]
        if base.split(".")[0] != "product_key_memory":
            return  # another project's module, maybe not installed (an extra): find_spec would import its parent
        for a in node.names:  # `from . import x` may name a submodule
            if importlib.util.find_spec(base) and importlib.util.find_spec(base).submodule_search_locations:
                if importlib.util.find_spec(f"{base}.{a.name}") is not None:
                    names.append(f"{base}.{a.name}")
        self._add(names)


def package_imports():
    """``{module: (imports at module level, imports inside functions)}`` for every module of the package."""
    found = {}
    for info in pkgutil.walk_packages(product_key_memory.__path__, "product_key_memory."):
        visitor = _Imports(info.name if info.ispkg else info.name.rpartition(".")[0])
        visitor.visit(ast.parse(open(importlib.util.find_spec(info.name).origin).read()))
        found[info.name] = (visitor.top, visitor.inner)
    return found


def test_no_import_cycle():
    graph = {m: {t for t in top if t != m} for m, (top, _) in package_imports().items()}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        if state.get(m) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m):] + [m])}")
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            # importing a.b.c runs a.b first (a package's __init__ imports its modules): parents are edges too
            for target in [".".join(t.split(".")[:i]) for i in range(2, t.count(".") + 2)]:
                if target in graph and target != m and not m.startswith(target + "."):
                    visit(target, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


def test_no_function_level_import_of_package_modules():
    # lazy imports are for optional dependencies (the Triton kernels), never to dodge a cycle
    for module, (_, inner) in package_imports().items():
        for target in inner:
            if module == target or module.startswith(target + "."):
                continue  # its own package, loaded already
            assert "triton" in target, f"{module} imports {target} inside a function"


@pytest.mark.parametrize("old, new", sorted(product_key_memory._MOVED.items()))
def test_module_paths_of_earlier_versions_import_the_moved_module(old, new):
    module = importlib.import_module(f"product_key_memory.{old}")
    assert module is importlib.import_module(f"product_key_memory.{new}")
    assert module.__spec__.name == f"product_key_memory.{new}"  # the module keeps its own identity


def test_030_module_path():
    from product_key_memory.product_key_memory import PKM, fetch_optimizer_parameters, fetch_pkm_value_parameters

    assert PKM is product_key_memory.PKM
    assert fetch_optimizer_parameters is product_key_memory.fetch_optimizer_parameters
    assert fetch_pkm_value_parameters is product_key_memory.fetch_pkm_value_parameters
