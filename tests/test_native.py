"""The compiled build's guard (proxy/native.py): a compiled module whose source changed, a
build missing a module, or SHAPER_PURE, runs the whole data path from source instead."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import native

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _package(tmp_path: Path, *, compiled: bool = True) -> Path:
    """A package directory as setup.py leaves it: sources (one not compiled among them),
    manifest and (empty) extensions."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.py").write_text("LIMIT: int = 1\n")
    for name in native.COMPILED:
        (tmp_path / f"{name}.py").write_text(f"NAME = {name!r}\n")
        if compiled:
            (tmp_path / f"{name}{SUFFIX}").write_bytes(b"")
    native.write_manifest(tmp_path)
    return tmp_path


def _beside(directory: Path) -> str:
    return str(directory.parent / f"{native.LIBRARY}{SUFFIX}")


def _check(directory: Path, environ: dict[str, str]) -> tuple[bool, str]:
    return native.check(directory, environ, lambda: _beside(directory))


def test_a_build_whose_sources_match_its_manifest_is_used(tmp_path: Path) -> None:
    assert _check(_package(tmp_path), {}) == (True, "")


def test_a_changed_source_makes_the_whole_data_path_run_from_source(tmp_path: Path) -> None:
    directory = _package(tmp_path)
    (directory / "forward.py").write_text("NAME = 'edited'\n")
    active, reason = _check(directory, {})
    assert not active
    assert reason.startswith("forward.py changed since compiled")


def test_pure_from_the_environment_wins_over_a_good_build(tmp_path: Path) -> None:
    directory = _package(tmp_path)
    assert _check(directory, {"SHAPER_PURE": "1"}) == (False, "SHAPER_PURE is set")
    assert _check(directory, {"SHAPER_PURE": "0"}) == (True, "")


def test_a_build_without_extensions_or_with_some_missing_runs_from_source(tmp_path: Path) -> None:
    assert _check(_package(tmp_path, compiled=False), {}) == (
        False,
        "built without compiled modules",
    )
    directory = _package(tmp_path / "partial")
    (directory / f"listener{SUFFIX}").unlink()
    assert _check(directory, {}) == (False, "compiled modules missing: listener")


def test_extensions_without_a_manifest_are_not_trusted(tmp_path: Path) -> None:
    directory = _package(tmp_path)
    (directory / native.MANIFEST).unlink()
    active, reason = _check(directory, {})
    assert not active and native.MANIFEST in reason


def test_an_install_without_sources_uses_its_extensions(tmp_path: Path) -> None:
    directory = _package(tmp_path)
    for name in native.COMPILED:
        (directory / f"{name}.py").unlink()
    assert _check(directory, {}) == (True, "")


def test_the_source_finder_takes_the_data_path_modules_only(tmp_path: Path) -> None:
    finder = native._SourceFinder(_package(tmp_path))
    spec = finder.find_spec("proxy.forward", None)
    assert spec is not None and spec.origin == str(tmp_path / "forward.py")
    assert finder.find_spec("proxy.config", None) is None
    assert finder.find_spec("other.forward", None) is None


def _new_interpreter(environ: dict[str, str]) -> list[str]:
    """[whether the compiled build is active, the file proxy.forward came from], as a proxy
    starting in `environ` sees them, outside the checkout (the install itself must find the
    compiled code)."""
    code = "import proxy.forward as f, proxy.native as n; print(n.active, f.__file__)"
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=environ,
        cwd="/",
    ).stdout.split()


SOURCE = str(Path(native.__file__).with_name("forward.py"))


def test_this_run_uses_the_build_it_was_given() -> None:
    """Under `make test` the data path is the compiled one (the product as installed); with
    SHAPER_PURE=1 it is the source."""
    out = _new_interpreter(dict(os.environ))
    if os.environ.get("SHAPER_PURE", "") not in ("", "0"):
        assert out == ["False", SOURCE]
    else:
        assert out[0] == "True", f"the compiled build is not in use: {native.reason}"
        assert out[1].endswith(SUFFIX)


@pytest.mark.parametrize("value", ["1", "yes"])
def test_pure_in_a_new_interpreter_imports_the_sources(value: str) -> None:
    assert _new_interpreter({**os.environ, "SHAPER_PURE": value}) == ["False", SOURCE]


def test_a_changed_module_that_is_not_compiled_counts_too(tmp_path: Path) -> None:
    """Compiled code takes the types of what it imports as they were at build time."""
    directory = _package(tmp_path)
    (directory / "config.py").write_text("LIMIT: float = 1.0\n")
    assert _check(directory, {}) == (
        False,
        "config.py changed since compiled (rebuild: make, or pip install -e .)",
    )
    (directory / "new.py").write_text("")
    assert "new.py" in _check(directory, {})[1]


def test_the_shared_library_must_be_the_one_beside_the_package(tmp_path: Path) -> None:
    directory = _package(tmp_path / "site" / "proxy")
    elsewhere = str(tmp_path / "other" / f"{native.LIBRARY}{SUFFIX}")
    active, reason = native.check(directory, {}, lambda: elsewhere)
    assert not active and reason.endswith("not beside this package")
    active, reason = native.check(directory, {}, lambda: None)
    assert not active and "not importable" in reason


def test_pure_is_ignored_where_there_are_no_sources(tmp_path: Path) -> None:
    directory = _package(tmp_path)
    for name in native.COMPILED:
        (directory / f"{name}.py").unlink()
    assert _check(directory, {"SHAPER_PURE": "1"}) == (
        True,
        "SHAPER_PURE ignored: installed without sources",
    )
    assert native._SourceFinder(directory).find_spec("proxy.forward", None) is None
