"""The `shaper` command, run for real in a subprocess (`python -m proxy ...`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy import __version__
from proxy.config import export_schema

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "rollouts.yaml"


def shaper(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI the way a user does, from the project root."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env if env is not None else os.environ.copy(),
        timeout=30,
        check=False,
    )


def test_check_valid_config_prints_a_summary() -> None:
    """`check` on the example exits 0 and summarises routes, upstreams and addresses."""
    result = shaper("check", "-c", "rollouts.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "rollouts.yaml: ok: 2 route(s) (1 with a rollout), 2 upstream(s), "
        "listen 127.0.0.1:8080, admin 127.0.0.1:9901"
    )
    assert "  shop: */ -> shop-v1 / shop-v2 at 10%" in lines
    assert "  static: */static -> shop-v1" in lines


def test_check_bad_config_prints_every_error(tmp_path: Path) -> None:
    """`check` on a file with three mistakes lists all three with their paths and exits 1."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["routes"][0]["rollout"]["weight"] = 150
    raw["routes"][1]["upstream"] = "shop-v9"
    raw["listen"]["prot"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = shaper("check", "-c", str(bad))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"shaper: {bad}: invalid, 3 errors:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "listen.prot",
        "routes[0].rollout.weight",
        "routes[1].upstream",
    ]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["check"], "required: -c/--config"),
        (["serve", "-c", "rollouts.yaml", "--listen", "nope"], "'nope' is not HOST:PORT"),
        (["serve", "-c", "rollouts.yaml", "--admin", "127.0.0.1:70000"], "is not HOST:PORT"),
        (["check", "-c", "rollouts.yaml", "--frob"], "unrecognized arguments: --frob"),
        (["--frob", "check", "-c", "rollouts.yaml"], "unrecognized arguments: --frob"),
        ([], "required: COMMAND"),
        (["demo", "--duration", "-1"], "must be greater than 0"),
        (["demo", "--rate", "nan"], "'nan' is not a finite number"),
        (["status", "--admin", "nonsense"], "'nonsense' is not an http:// or https:// URL"),
        (["status", "--admin", "http://[::1"], "'http://[::1' is not a URL"),
        (["status", "--admin", "http://:9901"], "names no host"),
        (["status", "--admin", "http://127.0.0.1:99999"], "Port out of range"),
        (["status", "--watch", "--interval", "nan"], "'nan' is not a finite number"),
        (["status", "--watch", "--interval", "inf"], "'inf' is not a finite number"),
        (["status", "--watch", "--interval", "1e300"], "must be at most 86400 seconds"),
        (["status", "--admin", "http://127.0.0.1:1", "--actor", "a\nb"], "control character"),
    ],
    ids=[
        "unknown-command",
        "missing-config",
        "bad-listen",
        "bad-admin-port",
        "unknown-flag",
        "unknown-global-flag",
        "no-command",
        "bad-duration",
        "nan-rate",
        "admin-not-a-url",
        "admin-bad-ipv6",
        "admin-no-host",
        "admin-bad-port",
        "nan-interval",
        "inf-interval",
        "huge-interval",
        "newline-in-actor",
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], expected: str) -> None:
    """Any mistake in the command line is exactly one stderr line, exit code 2, no traceback."""
    result = shaper(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("shaper: ")
    assert expected in lines[0]


def test_a_bad_shaper_admin_is_refused_in_remote_mode_only(tmp_path: Path) -> None:
    """SHAPER_ADMIN is checked like --admin when a command would use it (one line, exit 2),
    and left alone in local mode, which needs no server."""
    env = {**os.environ, "SHAPER_ADMIN": "http://[::1"}
    remote = shaper("status", env=env)
    assert remote.returncode == 2
    assert remote.stderr.splitlines() == [
        "shaper: --admin (or SHAPER_ADMIN) 'http://[::1' is not a URL (Invalid IPv6 URL)"
    ]
    local = shaper("status", "--state-dir", str(tmp_path), env=env)
    assert local.returncode == 0, local.stderr


def test_schema_command_prints_the_schema(tmp_path: Path) -> None:
    """`schema` prints the exported schema, and `-o` writes the same text to a file."""
    result = shaper("schema")
    assert result.returncode == 0
    assert result.stdout == export_schema()
    out = tmp_path / "schema.json"
    assert shaper("schema", "-o", str(out)).returncode == 0
    assert out.read_text() == export_schema()


def test_version() -> None:
    """`--version` prints the package version and exits 0."""
    result = shaper("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"shaper {__version__}"


def test_serve_with_a_missing_config_is_one_line(tmp_path: Path) -> None:
    """`serve -c missing.yaml` exits 1 with one error line naming the file, no traceback."""
    missing = tmp_path / "missing.yaml"
    result = shaper("serve", "-c", str(missing))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"shaper: {missing}: cannot read: No such file or directory"
    ]


def test_serve_with_an_invalid_config_lists_the_errors(tmp_path: Path) -> None:
    """`serve` refuses an invalid file before starting, listing errors like `check` does."""
    bad = tmp_path / "bad.yaml"
    text = EXAMPLE.read_text()
    bad.write_text(text.replace("weight: 10 ", "weight: 101"))
    line = 1 + text[: text.index("weight: 10 ")].count("\n")
    result = shaper("serve", "-c", str(bad))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"shaper: {bad}: routes[0].rollout.weight: must be between 0 and 100 (line {line})"
    ]


def _public_admin_config(tmp_path: Path) -> Path:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["listen"] = {"host": "127.0.0.1", "port": 0}
    raw["admin"] = {"host": "0.0.0.0", "port": 0, "token_env": "SHAPER_TEST_UNSET_TOKEN"}
    raw["state_dir"] = str(tmp_path / "state")
    path = tmp_path / "public-admin.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _without_token() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "SHAPER_TEST_UNSET_TOKEN"}


def test_serve_refuses_a_public_admin_without_a_token(tmp_path: Path) -> None:
    """A non-loopback admin host without a token is refused with a message naming the fix."""
    result = shaper("serve", "-c", str(_public_admin_config(tmp_path)), env=_without_token())
    assert result.returncode == 1
    assert "admin.host 0.0.0.0 is not loopback and no admin token is set" in result.stderr
    assert "SHAPER_TEST_UNSET_TOKEN" in result.stderr
    # only the reason: no traceback, no "Unclosed client session" from a half-built server
    assert len(result.stderr.splitlines()) == 1, result.stderr
