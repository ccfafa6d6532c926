"""Light installs: every optional module the tests use is named in tests/_extras.py, with the extra of setup.py
that installs it, and the ``test`` extra (what CI installs) holds them all, so CI skips nothing for want of one."""

import ast
import sys
from pathlib import Path

import pytest

from . import _extras

ROOT = Path(__file__).resolve().parents[1]
# the base install (setup.py install_requires, and pytest), the package itself, and this checkout's folders
BASE = {"torch", "einops", "colt5_attention", "numpy", "pytest", "product_key_memory", "tests", "benchmarks",
        "examples"}
SKIPPERS = {"importorskip", "needs", "missing", "find_spec"}


def extras_of_setup() -> dict:
    """``extras_require`` of setup.py, read without running it: ``{extra: [requirement names]}``."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    extras = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))
    name = lambda req: req.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
    return {extra: [name(r) for r in reqs] for extra, reqs in extras.items()}


def modules_used_by_tests() -> dict:
    """``{top-level module: first test file}`` of every import in tests/, and of every name the tests skip on."""
    found = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str) \
                    and getattr(node.func, "attr", getattr(node.func, "id", None)) in SKIPPERS:
                names = [node.args[0].value]
            for name in names:
                found.setdefault(name.split(".")[0], path.relative_to(ROOT).as_posix())
    return found


def test_every_optional_module_of_the_tests_is_named_with_its_extra():
    optional = {m: f for m, f in modules_used_by_tests().items()
                if m not in BASE and m not in sys.stdlib_module_names and not m.startswith("_")}
    unnamed = {m: f for m, f in optional.items() if m not in _extras.EXTRAS and m not in _extras.NOT_IN_EXTRAS}
    assert not unnamed, f"add these to tests/_extras.py (module -> package, extra) and skip on them: {unnamed}"


@pytest.mark.parametrize("module", sorted(_extras.EXTRAS))
def test_the_extra_named_and_the_test_extra_install_the_module(module):
    extras = extras_of_setup()
    package, extra = _extras.EXTRAS[module]
    assert package.lower() in extras[extra], f"setup.py's {extra!r} extra lacks {package} (for {module})"
    assert package.lower() in extras["test"], f"setup.py's 'test' extra lacks {package}: CI would skip its tests"


def test_skip_reasons_name_the_extra():
    assert _extras.reason("faiss") == "needs faiss-cpu, of the faiss extra: pip install -e '.[faiss]'"
    assert "--no-deps" in _extras.reason("memorizing_transformers_pytorch")
    with pytest.raises(KeyError, match="in no extra"):
        _extras.reason("not_a_module")


def test_optional_modules_skip_through_extras_so_the_reason_names_the_extra():
    """``pytest.importorskip("triton")`` would skip without saying which extra installs it."""
    plain = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.name == "_extras.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip" \
                    and getattr(node.func.value, "id", None) == "pytest" and node.args \
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value not in BASE:
                plain.append(f"{path.relative_to(ROOT)}:{node.lineno} ({node.args[0].value})")
    assert not plain, "use tests/_extras.importorskip for these: " + ", ".join(plain)
