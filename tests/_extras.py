"""Optional packages of the tests, and the setup.py extra that installs each: one place for every skip reason.

A base install (``pip install -e .``: torch, einops, colt5-attention, numpy) runs the core tests; a test
of an optional integration skips with a reason naming the extra to install. ``pip install -e ".[test]"``
installs every extra's packages, so CI runs everything (tests/test_extras.py checks that it covers
every module named here).

    from .._extras import importorskip, needs
    faiss = importorskip("faiss")                 # in a test, or at module level
    @needs("matplotlib")                          # a mark

Property tests import ``given``, ``settings``, ``st`` and ``HealthCheck`` from here: Hypothesis's own when it
is installed, otherwise stand-ins under which each ``@given`` test skips (the module's other tests still run).
"""

from __future__ import annotations

import importlib.util

import pytest

# module -> (pip package, extra of setup.py that installs it); the test extra installs them all
EXTRAS = {
    "hypothesis": ("hypothesis", "test"),
    "matplotlib": ("matplotlib", "plot"),
    "tqdm": ("tqdm", "examples"),
    "triton": ("triton", "test"),
    "faiss": ("faiss-cpu", "faiss"),
    "transformers": ("transformers", "hf"),
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "PEER_pytorch": ("PEER-pytorch", "test"),
    "mkdocs": ("mkdocs", "docs"),
    "mkdocstrings": ("mkdocstrings", "docs"),
}

# optional packages no extra can hold, with the install line instead: 0.4.1 pins faiss-gpu, so it goes in
# without its dependencies (tests/test_extras.py allows exactly these)
NOT_IN_EXTRAS = {
    "memorizing_transformers_pytorch": "pip install --no-deps memorizing-transformers-pytorch==0.4.1 "
                                       "faiss-cpu joblib cloudpickle einops-exts",
}


def reason(module: str) -> str:
    """Why a test of ``module`` skips, and how to install it."""
    if module in NOT_IN_EXTRAS:
        return f"needs {module}: {NOT_IN_EXTRAS[module]}"
    if module not in EXTRAS:
        raise KeyError(f"{module!r} is in no extra: add it to tests/_extras.py EXTRAS and to setup.py")
    package, extra = EXTRAS[module]
    return f"needs {package}, of the {extra} extra: pip install -e '.[{extra}]'"


def missing(module: str) -> bool:
    reason(module)  # an unknown module fails here, not as a silent skip
    return importlib.util.find_spec(module) is None


def importorskip(module: str, minversion: str | None = None):
    """``pytest.importorskip`` with the reason that names the extra."""
    return pytest.importorskip(module, minversion=minversion, reason=reason(module))


def needs(module: str):
    """A mark that skips the test when ``module`` is not installed."""
    return pytest.mark.skipif(missing(module), reason=reason(module))


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # stand-ins: strategies are built at import time, the tests they feed skip

    class _Anything:
        """Any attribute, call or item of it is another one: ``st.lists(st.integers(0, 4)).map(f)`` builds."""

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return self

        def __getitem__(self, key):
            return self

    st = HealthCheck = _Anything()

    def settings(*args, **kwargs):
        return lambda test: test

    def given(*args, **kwargs):
        def skip_instead(test):
            # a new function without the test's arguments, which pytest would otherwise look up as fixtures
            def skipped():
                pytest.skip(reason("hypothesis"))

            skipped.__name__, skipped.__qualname__, skipped.__doc__ = test.__name__, test.__qualname__, test.__doc__
            skipped.__module__ = test.__module__
            return skipped

        return skip_instead
