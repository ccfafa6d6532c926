"""Load product-key-memory 0.3.0 beside this library, under another module name.

Both use the import name ``product_key_memory``, so the 0.3.0 wheel is fetched with
``pip download`` into a cache folder and its module file is loaded as ``pkm_030``.
It imports only torch, einops and colt5_attention.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

PEER_VERSION = "0.3.0"
DEFAULT_CACHE = Path(os.environ.get("PKM_PEER_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "peer"))


def fetch_peer_wheel(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Path of the 0.3.0 wheel, downloading it once into ``cache_dir``."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob(f"product_key_memory-{PEER_VERSION}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"product-key-memory=={PEER_VERSION}", "--no-deps",
             "--quiet", "-d", str(cache_dir)],
            check=True,
        )
        wheels = sorted(cache_dir.glob(f"product_key_memory-{PEER_VERSION}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download did not produce a product-key-memory {PEER_VERSION} wheel in {cache_dir}")
    return wheels[0]


def load_peer(cache_dir: Path = DEFAULT_CACHE, name: str = "pkm_030"):
    """The 0.3.0 ``product_key_memory.product_key_memory`` module, imported as ``name``."""
    if name in sys.modules:
        return sys.modules[name]
    wheel = fetch_peer_wheel(cache_dir)
    target = Path(cache_dir) / f"unpacked-{PEER_VERSION}"
    source = target / "product_key_memory" / "product_key_memory.py"
    if not source.exists():
        with zipfile.ZipFile(wheel) as zf:
            zf.extract("product_key_memory/product_key_memory.py", target)
    spec = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
