"""The build of traffic-shaper: pyproject.toml has the metadata; this compiles the data path.

The modules every request runs through are compiled to C with mypyc (part of mypy: the same
type annotations mypy checks, turned into an extension module each), which takes about a third
of the CPU off a proxied request. `SHAPER_PURE=1` at install time builds without them; so does
a build without mypyc installed (it says so). Either way the same source runs, and
`proxy.native` tells at run time which it is.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _native():  # proxy/native.py by itself: importing the package would need its dependencies
    spec = importlib.util.spec_from_file_location("_shaper_native", HERE / "proxy" / "native.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions() -> list[object]:
    if os.environ.get("SHAPER_PURE", "") not in ("", "0"):
        print("traffic-shaper: SHAPER_PURE is set: building without compiled modules")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("traffic-shaper: mypyc is not installed: building without compiled modules")
        return []
    native = _native()
    native.write_manifest(HERE / "proxy")
    sources = [f"proxy/{name}.py" for name in native.COMPILED]
    return list(mypycify(sources, opt_level="3", group_name="proxy_native"))


setup(ext_modules=_extensions())
