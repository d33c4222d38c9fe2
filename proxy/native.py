"""Whether the data path runs compiled, and the guard that keeps a stale build from running.

setup.py compiles the modules every request runs through (COMPILED) with mypyc, which takes
about a third of the CPU off a proxied request, and records a hash of every source of the
package in `_native.json` beside them. An extension module is imported before a `.py` of the
same name, so a compiled module whose source has changed since (an edit in a checkout
installed with `pip install -e`) would run the old code. `use()` checks the hashes, and that
the shared library holding the compiled code is the one beside the package, when the package
is imported: on any difference, or with `SHAPER_PURE=1` in the environment, all the COMPILED
modules are imported from their source instead (all or none: compiled modules call one
another directly, so a mix would run old code too). Standard library only: setup.py loads
this file by itself, before anything is installed.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

PACKAGE = "proxy"
# The data path; setup.py compiles these, as one group (one shared library).
COMPILED = (
    "breaker",
    "client",
    "forward",
    "headers",
    "listener",
    "metrics",
    "protocol",
    "routing",
    "signals",
    "upstream",
)
MANIFEST = "_native.json"
_HERE = Path(__file__).resolve().parent

# Set by `use()`: whether the COMPILED modules are the compiled ones, and why not.
active = False
reason = "not checked"


LIBRARY = "proxy_native__mypyc"  # the group's shared library, beside the package


def source_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every module's source in the package, by module name: all of them, not only
    the COMPILED ones, whose compiled code takes the types of what they import (a field of
    config.py made a float would fail in them as an int) as they were at build time."""
    return {
        path.stem: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.glob("*.py"))
    }


def write_manifest(directory: Path) -> None:
    """What setup.py records at build time: the hashes of the package's sources."""
    text = json.dumps(source_hashes(directory), indent=1, sort_keys=True) + "\n"
    (directory / MANIFEST).write_text(text)


def _compiled_files(directory: Path) -> list[str]:
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    return [name for name in COMPILED if any((directory / f"{name}{s}").exists() for s in suffixes)]


def _library_origin() -> str | None:
    """Where the group's shared library would be imported from (not importing it)."""
    try:
        spec = importlib.util.find_spec(LIBRARY)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def check(
    directory: Path,
    environ: dict[str, str] | os._Environ[str],
    library: Callable[[], str | None] = _library_origin,
) -> tuple[bool, str]:
    """(whether the compiled modules may be used, why not). `library` finds the shared
    library that holds their code: it must be the one built beside this package."""
    sources = any((directory / f"{name}.py").exists() for name in COMPILED)
    if environ.get("SHAPER_PURE", "") not in ("", "0"):
        if sources:
            return False, "SHAPER_PURE is set"
        return True, "SHAPER_PURE ignored: installed without sources"
    present = _compiled_files(directory)
    if not present:
        return False, "built without compiled modules"
    if len(present) != len(COMPILED):
        missing = sorted(set(COMPILED) - set(present))
        return False, f"compiled modules missing: {', '.join(missing)}"
    origin = library()
    if origin is None:
        return False, f"the compiled modules' library {LIBRARY} is not importable"
    if Path(origin).resolve().parent != directory.resolve().parent:
        return False, f"{LIBRARY} found at {origin}, not beside this package"
    if not sources:
        return True, ""  # installed without sources: the compiled modules are all there is
    try:
        recorded = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False, f"no readable {MANIFEST} beside the compiled modules"
    now = source_hashes(directory)
    changed = sorted(n for n in now.keys() | recorded.keys() if recorded.get(n) != now.get(n))
    if changed:
        files = ", ".join(f"{name}.py" for name in changed)
        return False, f"{files} changed since compiled (rebuild: make, or pip install -e .)"
    return True, ""


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Imports the COMPILED modules from their `.py` files, ahead of the extension modules."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        source = self.directory / f"{name}.py"
        if package != PACKAGE or name not in COMPILED or not source.exists():
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def use(directory: Path = _HERE) -> bool:
    """Decide once, at the package's import, before any COMPILED module is imported."""
    global active, reason
    if any(isinstance(finder, _SourceFinder) for finder in sys.meta_path):
        return active
    active, reason = check(directory, os.environ)
    if not active:
        sys.meta_path.insert(0, _SourceFinder(directory))
        if _compiled_files(directory) and "SHAPER_PURE" not in os.environ:
            print(f"traffic-shaper: running the data path from source: {reason}", file=sys.stderr)
    return active
