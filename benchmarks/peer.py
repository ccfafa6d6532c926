"""Load product-key-memory 0.3.0 beside this library, under another module name.

Both use the import name ``product_key_memory``, so the 0.3.0 wheel is kept in a cache
folder and its module file is loaded as ``pkm_030``. It imports only torch, einops and
colt5_attention (all three are dependencies of this library).

Where the wheel comes from, first found wins:

1. ``wheel=PATH`` (``bench_gpu.py --peer-wheel PATH``) or the ``PKM_PEER_WHEEL`` variable;
2. ``product_key_memory-0.3.0-*.whl`` in the cache folder: ``.cache/peer`` at the checkout's
   root, or ``PKM_PEER_CACHE``;
3. ``pip download product-key-memory==0.3.0 --no-deps`` into the cache folder (needs network).

On a GPU machine without network, fetch the wheel where there is network and carry it::

    pip download product-key-memory==0.3.0 --no-deps -d .cache/peer     # with network
    # then copy .cache/peer/ (8 KB; git ignores it) into the GPU machine's checkout, or pass
    python benchmarks/bench_gpu.py --peer-wheel /path/to/product_key_memory-0.3.0-py3-none-any.whl
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional, Union

PEER_VERSION = "0.3.0"
WHEEL_GLOB = f"product_key_memory-{PEER_VERSION}-*.whl"
DEFAULT_CACHE = Path(os.environ.get("PKM_PEER_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "peer"))
CARRY_HINT = (
    f"with network run `pip download product-key-memory=={PEER_VERSION} --no-deps -d {DEFAULT_CACHE}` and carry "
    "that folder to this machine, or pass --peer-wheel PATH (PKM_PEER_WHEEL=PATH)"
)


def fetch_peer_wheel(cache_dir: Path = DEFAULT_CACHE, wheel: Optional[Union[str, Path]] = None) -> Path:
    """Path of the 0.3.0 wheel: ``wheel`` (or ``PKM_PEER_WHEEL``), else one in ``cache_dir``,
    else downloaded once into ``cache_dir``."""
    wheel = wheel if wheel is not None else os.environ.get("PKM_PEER_WHEEL") or None
    if wheel is not None:
        wheel = Path(wheel)
        if not wheel.is_file():
            raise FileNotFoundError(f"peer wheel {str(wheel)!r} is not a file; {CARRY_HINT}")
        if not wheel.match(WHEEL_GLOB):
            raise ValueError(f"peer wheel must be named like {WHEEL_GLOB!r}, got {wheel.name!r}")
        return wheel
    cache_dir = Path(cache_dir)
    wheels = sorted(cache_dir.glob(WHEEL_GLOB))
    if not wheels:
        cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", f"product-key-memory=={PEER_VERSION}", "--no-deps",
                 "--quiet", "-d", str(cache_dir)],
                check=True,
            )
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"pip download of product-key-memory {PEER_VERSION} failed ({e}); {CARRY_HINT}") from e
        wheels = sorted(cache_dir.glob(WHEEL_GLOB))
    if not wheels:
        raise RuntimeError(f"pip download did not produce a product-key-memory {PEER_VERSION} wheel in {cache_dir}")
    return wheels[0]


def load_peer(cache_dir: Path = DEFAULT_CACHE, name: str = "pkm_030", wheel: Optional[Union[str, Path]] = None):
    """The 0.3.0 ``product_key_memory.product_key_memory`` module, imported as ``name``
    (``wheel``: see :func:`fetch_peer_wheel`)."""
    if name in sys.modules:
        return sys.modules[name]
    wheel = fetch_peer_wheel(cache_dir, wheel)
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
