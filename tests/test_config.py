"""Pure tests of proxy/config.py: units, validation, error paths and lines, immutability."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.config import (
    Config,
    ConfigError,
    _line_index,
    load,
    load_text,
    parse_duration,
    parse_size,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "rollouts.yaml"


def base() -> dict[str, Any]:
    """A small valid config as a dict, for tests to break one thing at a time."""
    return {
        "upstreams": {
            "v1": {"endpoints": ["http://127.0.0.1:9001"]},
            "v2": {"endpoints": ["http://127.0.0.1:9002"]},
        },
        "routes": [
            {
                "name": "shop",
                "match": {"path_prefix": "/"},
                "rollout": {
                    "stable": "v1",
                    "canary": "v2",
                    "weight": 10,
                    "sticky": {"header": "X-User-Id"},
                },
            },
            {"name": "static", "match": {"path_prefix": "/static"}, "upstream": "v1"},
        ],
    }


def dump(raw: dict[str, Any]) -> str:
    return yaml.safe_dump(raw, sort_keys=False)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(text, "t.yaml")
    return info.value.errors


def one_error(raw: dict[str, Any]) -> str:
    errors = errors_of(dump(raw))
    assert len(errors) == 1, errors
    return errors[0]


# --- units -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 2 s ", 2.0),
        (3, 3.0),
        (0.5, 0.5),
        ("7", 7.0),
        (0, 0.0),
    ],
)
def test_durations_parse_to_seconds(text: object, seconds: float) -> None:
    """Durations accept ms/s/m/h suffixes and bare numbers of seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["5 sec", "fast", "-1s", -1, True, "", "1e3s", None, [1]])
def test_bad_durations_are_rejected(bad: object) -> None:
    """Anything but a non-negative number with a known unit is a ValueError."""
    with pytest.raises(ValueError, match=r"duration|negative"):
        parse_duration(bad)


@pytest.mark.parametrize(
    "bad",
    [float("nan"), float("inf"), "1" * 400 + "s", 10**400, -(10**400), "nan", "inf", "-Infinity"],
)
def test_non_finite_durations_are_rejected(bad: object) -> None:
    """NaN, infinity and numbers past a float's range (a JSON or YAML int may be any size)
    are not timeouts; each is a ValueError that says so, never an OverflowError."""
    with pytest.raises(ValueError, match="must be a finite duration"):
        parse_duration(bad)


def test_a_huge_integer_duration_in_the_config_file_is_a_config_error() -> None:
    """A duration of 10**400 seconds in the YAML is an error naming its path, not a crash."""
    with pytest.raises(ConfigError) as info:
        load_text(
            "upstreams: {v1: {endpoints: ['http://127.0.0.1:9001']}}\n"
            "routes: [{name: shop, match: {path_prefix: /}, upstream: v1}]\n"
            f"limits: {{header_timeout: {10**400}}}\n",
            "test",
        )
    assert info.value.errors[0].startswith("limits.header_timeout: must be a finite duration")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512KiB", 512 * 1024),
        ("10MB", 10_000_000),
        ("1GiB", 1024**3),
        ("1.5KiB", 1536),
        ("100B", 100),
        ("100", 100),
        (4096, 4096),
    ],
)
def test_sizes_parse_to_bytes(text: object, size: int) -> None:
    """Sizes accept decimal and binary units and bare byte counts."""
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["10 mb", "big", -1, 1.5, True, "1" * 400 + "GiB", None])
def test_bad_sizes_are_rejected(bad: object) -> None:
    """Unknown units, negatives, fractions of a byte, booleans and overflows are ValueErrors."""
    with pytest.raises(ValueError, match=r"size|negative|too large"):
        parse_size(bad)


def test_size_with_a_unit_in_the_config_file() -> None:
    """A size string in YAML ends up as bytes on the model."""
    raw = base()
    raw["limits"] = {"max_body_size": "2MiB"}
    raw["routes"][1]["max_body_size"] = "1KB"
    config = load_text(dump(raw))
    assert config.limits.max_body_size == 2 * 1024**2
    assert config.body_limit(config.routes[1]) == 1000
    assert config.body_limit(config.routes[0]) == 2 * 1024**2


@pytest.mark.parametrize(
    ("weight", "expected"),
    [(10, 10.0), (12.5, 12.5), ("10%", 10.0), ("12.5 %", 12.5), ("0", 0.0), (100, 100.0)],
)
def test_percentages(weight: object, expected: float) -> None:
    """A weight is a number or a string with an optional % sign."""
    raw = base()
    raw["routes"][0]["rollout"]["weight"] = weight
    rollout = load_text(dump(raw)).routes[0].rollout
    assert rollout is not None
    assert rollout.weight == expected


@pytest.mark.parametrize("weight", [101, -1, "150%", ".nan", "ten", True])
def test_bad_percentages_name_the_weight(weight: object) -> None:
    """Out-of-range, non-numeric and boolean weights are errors on routes[0].rollout.weight."""
    raw = base()
    raw["routes"][0]["rollout"]["weight"] = weight
    text = dump(raw)
    if weight == ".nan":
        text = text.replace("'.nan'", ".nan")  # the YAML float NaN, not the string
    error = one_error_text(text)
    assert error.startswith("routes[0].rollout.weight: ")


def one_error_text(text: str) -> str:
    errors = errors_of(text)
    assert len(errors) == 1, errors
    return errors[0]


def test_weight_out_of_range_message_and_line() -> None:
    """The error reads `path: message (line N)` with the line of the offending key."""
    raw = base()
    raw["routes"][0]["rollout"]["weight"] = 150
    text = dump(raw)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "weight: 150" in ln)
    assert (
        one_error_text(text) == f"routes[0].rollout.weight: must be between 0 and 100 (line {line})"
    )


# --- structure -----------------------------------------------------------------------------


def test_unknown_key_is_an_error_naming_its_path() -> None:
    """extra="forbid": a typo in a nested key is reported with its full path."""
    raw = base()
    raw["routes"][1]["match"]["path_prefx"] = "/x"
    assert re.fullmatch(r"routes\[1\]\.match\.path_prefx: unknown key \(line \d+\)", one_error(raw))


def test_unknown_top_level_key() -> None:
    """A misspelt top-level setting is not silently ignored."""
    raw = base()
    raw["listn"] = {"port": 1}
    assert one_error(raw).startswith("listn: unknown key")


def test_missing_required_sections() -> None:
    """upstreams and routes are required, and each missing one is named."""
    errors = errors_of("listen: {port: 1}\n")
    assert [e.split(" (line")[0] for e in errors] == ["upstreams: required", "routes: required"]


def test_every_error_has_a_path_and_a_line() -> None:
    """Each reported line starts with a YAML path and carries the line it points at."""
    text = EXAMPLE.read_text()
    text = text.replace("weight: 10 ", "weight: 300").replace("port: 9901", "port: 99999")
    text = text.replace("connect_timeout: 1s", "connect_timeout: soon", 1)
    errors = errors_of(text)
    lines = text.splitlines()
    for error in errors:
        m = re.fullmatch(r"([A-Za-z_][\w.\[\]-]*): (.+) \(line (\d+)\)", error)
        assert m, error
        key = m.group(1).rsplit(".", 1)[-1]
        assert key.split("[")[0] in lines[int(m.group(3)) - 1], error


def test_all_errors_are_reported_at_once() -> None:
    """A file with three unrelated mistakes yields exactly three error lines, in file order."""
    raw = base()
    raw["drain_timeout"] = "forever"
    raw["upstreams"]["v2"]["endpoints"] = ["ftp://x"]
    raw["routes"][0]["rollout"]["weight"] = 101
    errors = errors_of(dump(raw))
    assert len(errors) == 3, errors
    assert [e.split(":")[0] for e in errors] == [
        "upstreams.v2.endpoints",
        "routes[0].rollout.weight",
        "drain_timeout",
    ]


def test_cross_reference_errors_come_with_field_errors() -> None:
    """An unknown upstream is reported together with a field error, not only after it is fixed."""
    raw = base()
    raw["routes"][0]["rollout"]["weight"] = 101
    raw["routes"][1]["upstream"] = "v3"
    errors = errors_of(dump(raw))
    assert len(errors) == 2, errors
    assert errors[0].startswith("routes[0].rollout.weight: must be between 0 and 100")
    assert errors[1].startswith("routes[1].upstream: unknown upstream 'v3' (known: v1, v2)")


@pytest.mark.parametrize("side", ["stable", "canary"])
def test_unknown_upstream_in_a_rollout(side: str) -> None:
    """Both ends of a rollout must name a configured upstream."""
    raw = base()
    raw["routes"][0]["rollout"][side] = "ghost"
    assert one_error(raw).startswith(f"routes[0].rollout.{side}: unknown upstream 'ghost'")


def test_duplicate_route_names() -> None:
    """Two routes with one name: the second is reported and the first is named."""
    raw = base()
    raw["routes"][1]["name"] = "shop"
    assert one_error(raw).startswith("routes[1].name: 'shop' is already used by routes[0]")


def test_duplicate_match() -> None:
    """Two routes with the same host and prefix would shadow each other."""
    raw = base()
    raw["routes"][1]["match"] = {"path_prefix": "/"}
    assert one_error(raw).startswith("routes[1].match: same host and path_prefix as routes[0]")


def test_duplicate_match_compares_hosts_case_insensitively() -> None:
    """Hosts are lower-cased before duplicates are looked for."""
    raw = base()
    raw["routes"][0]["match"] = {"path_prefix": "/", "host": "Shop.Example"}
    raw["routes"][1]["match"] = {"path_prefix": "/", "host": "shop.example"}
    assert one_error(raw).startswith("routes[1].match: same host and path_prefix as routes[0]")


def test_same_prefix_on_different_hosts_is_fine() -> None:
    """A prefix may repeat when the hosts differ."""
    raw = base()
    raw["routes"][0]["match"] = {"path_prefix": "/", "host": "a.example"}
    raw["routes"][1]["match"] = {"path_prefix": "/"}
    config = load_text(dump(raw))
    assert config.routes[0].match.host == "a.example"


@pytest.mark.parametrize("host", ["example.com:8080", "", "http://example.com", "a/b"])
def test_match_host_must_be_a_bare_host(host: str) -> None:
    """A host with a port, scheme or path would never match a request, so it is an error."""
    raw = base()
    raw["routes"][1]["match"]["host"] = host
    assert one_error(raw).startswith("routes[1].match.host: ")


@pytest.mark.parametrize(
    "sticky",
    [
        {},
        {"header": "X-User", "cookie": "uid"},
        {"cookie": "uid", "source_ip": True},
        {"source_ip": False},
    ],
)
def test_sticky_needs_exactly_one_source(sticky: dict[str, Any]) -> None:
    """sticky with zero or several identity sources is rejected."""
    raw = base()
    raw["routes"][0]["rollout"]["sticky"] = sticky
    assert one_error(raw).startswith(
        "routes[0].rollout.sticky: set exactly one of header, cookie or source_ip: true"
    )


@pytest.mark.parametrize("sticky", [{"header": "X-User"}, {"cookie": "uid"}, {"source_ip": True}])
def test_each_sticky_source_alone_is_valid(sticky: dict[str, Any]) -> None:
    """Any single identity source is accepted."""
    raw = base()
    raw["routes"][0]["rollout"]["sticky"] = sticky
    load_text(dump(raw))


def test_sticky_header_must_be_a_header_name() -> None:
    """Header names with underscores or spaces are refused (they would be dropped in transit)."""
    raw = base()
    raw["routes"][0]["rollout"]["sticky"] = {"header": "X_User"}
    assert one_error(raw).startswith("routes[0].rollout.sticky.header: ")


def test_rollout_and_upstream_are_exclusive() -> None:
    """A route names either a rollout or an upstream, not both."""
    raw = base()
    raw["routes"][1]["rollout"] = {"stable": "v1", "canary": "v2"}
    assert one_error(raw).startswith("routes[1]: set exactly one of rollout or upstream")


def test_route_needs_a_target() -> None:
    """A route with neither a rollout nor an upstream is rejected."""
    raw = base()
    del raw["routes"][1]["upstream"]
    assert one_error(raw).startswith("routes[1]: set exactly one of rollout or upstream")


def test_rollout_stable_and_canary_differ() -> None:
    """Splitting between an upstream and itself is a mistake."""
    raw = base()
    raw["routes"][0]["rollout"]["canary"] = "v1"
    assert "stable and canary must be different" in one_error(raw)


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("https://x:1", "must be http://HOST:PORT"),
        ("127.0.0.1:9002", "must be http://HOST:PORT"),
        ("http://", "must be http://HOST:PORT"),
        ("http://x:99999", "bad port"),
        ("http://x:1/api", "must not have a path or query"),
        ("http://x:1?q=1", "must not have a path or query"),
    ],
)
def test_bad_endpoint_urls(endpoint: str, problem: str) -> None:
    """Endpoints are plain http://HOST:PORT; anything else names the endpoint."""
    raw = base()
    raw["upstreams"]["v2"]["endpoints"] = [endpoint]
    error = one_error(raw)
    assert error.startswith("upstreams.v2.endpoints: ")
    assert problem in error
    assert repr(endpoint) in error


def test_repeated_endpoints() -> None:
    """The same endpoint twice in one upstream is an error."""
    raw = base()
    raw["upstreams"]["v2"]["endpoints"] = ["http://x:1", "http://x:1"]
    assert "must not repeat" in one_error(raw)


def test_bad_route_and_upstream_names() -> None:
    """Names are short slugs; a space or a leading dash is refused."""
    raw = base()
    raw["routes"][1]["name"] = "no spaces"
    assert one_error(raw).startswith("routes[1].name: ")
    raw = base()
    raw["upstreams"]["-v3"] = {"endpoints": ["http://x:1"]}
    assert "'-v3'" in one_error(raw)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: [1, 2\n", r"line \d+: invalid YAML: "),
        ("routes:\n  - name: x\n - bad\n", r"line 3: invalid YAML: "),
        ("- 1\n- 2\n", r"\(top level\): must be a mapping of settings"),
        ("", r"\(top level\): must be a mapping of settings"),
        ("just text", r"\(top level\): must be a mapping of settings"),
    ],
)
def test_invalid_yaml_is_one_clear_error(text: str, expected: str) -> None:
    """Broken YAML or a non-mapping document is one error that says so (with a line if known)."""
    assert re.match(expected, one_error_text(text))


def test_non_string_keys_are_named_by_their_path() -> None:
    """A numeric mapping key is shown as a key (`upstreams.1`), not as a list index."""
    errors = errors_of(dump(base()) + "1: 2\n")
    assert len(errors) == 1
    assert errors[0].startswith("1: ")
    text = dump(base()).replace("upstreams:\n", "upstreams:\n  7: {endpoints: ['http://x:1']}\n")
    errors = errors_of(text)
    assert any(e.startswith("upstreams.7 (key): ") for e in errors), errors


def test_config_error_message_lists_everything() -> None:
    """str(ConfigError) names the source, the count and every error."""
    raw = base()
    raw["routes"][0]["rollout"]["weight"] = 101
    raw["drain_timeout"] = "x"
    with pytest.raises(ConfigError) as info:
        load_text(dump(raw), "conf.yaml")
    text = str(info.value)
    assert text.startswith("conf.yaml: 2 error(s)")
    assert all(e in text for e in info.value.errors)


def test_load_reports_an_unreadable_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError with one short line, not an OSError."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.yaml")
    assert info.value.errors == ["cannot read: No such file or directory"]


def test_load_reports_a_non_utf8_file(tmp_path: Path) -> None:
    """A binary file is a ConfigError, not a UnicodeDecodeError."""
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00listen")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(path)


# --- the models --------------------------------------------------------------------------


def test_models_are_immutable() -> None:
    """A loaded config cannot be changed in place, at any depth."""
    config = load_text(dump(base()))
    with pytest.raises(pydantic.ValidationError):
        config.drain_timeout = 1.0  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        config.routes[0].name = "other"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        config.listen.port = 1  # type: ignore[misc]


def test_defaults() -> None:
    """Unset sections get their documented defaults."""
    config = load_text(dump(base()))
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8080)
    assert config.admin.token_env == "SHAPER_ADMIN_TOKEN"
    assert config.drain_timeout == 30.0
    assert config.upstreams["v1"].host_header == "preserve"


def test_match_host_is_lower_cased() -> None:
    """Hosts are stored lower-case, as requests are matched lower-case."""
    raw = base()
    raw["routes"][1]["match"]["host"] = "Static.Example.COM"
    assert load_text(dump(raw)).routes[1].match.host == "static.example.com"


def test_the_example_config_loads() -> None:
    """The rollouts.yaml at the project root is valid and says what the comments claim."""
    config = load(EXAMPLE)
    assert isinstance(config, Config)
    assert [r.name for r in config.routes] == ["shop", "static"]
    shop = config.routes[0].rollout
    assert shop is not None
    assert (shop.stable, shop.canary, shop.weight) == ("shop-v1", "shop-v2", 10.0)
    assert shop.sticky is not None and shop.sticky.header == "X-User-Id"
    assert config.upstreams["shop-v1"].connect_timeout == 1.0


# --- fuzzing -------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "5s",
            "250ms",
            "-1m",
            "1e400",
            "10%",
            "http://x:1",
            "/",
            "shop-v1",
            "1GiB",
            "9" * 320 + "KB",
        ]
    ),
)
_keys = st.one_of(
    st.sampled_from(
        [
            "listen",
            "admin",
            "routes",
            "upstreams",
            "name",
            "match",
            "rollout",
            "weight",
            "sticky",
            "endpoints",
            "host",
            "port",
            "path_prefix",
            "stable",
            "canary",
            "upstream",
            "limits",
            "max_body_size",
            "connect_timeout",
        ]
    ),
    st.text(max_size=6),
    st.integers(-3, 3),
)
_yamlish = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_keys, children, max_size=4)
    ),
    max_leaves=20,
)


_EXAMPLE_TEXT = EXAMPLE.read_text()
_EXAMPLE_RAW = yaml.safe_load(_EXAMPLE_TEXT)
_DELETE = object()


def _paths_of(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [path] if path else []
    if isinstance(node, dict):
        for key, child in node.items():
            paths += _paths_of(child, (*path, key))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            paths += _paths_of(child, (*path, i))
    return paths


# Every path in the example plus optional settings it leaves out.
_EXAMPLE_PATHS = [
    *_paths_of(_EXAMPLE_RAW),
    ("limits",),
    ("drain_timeout",),
    ("admin", "max_body_size"),
    ("routes", 1, "max_body_size"),
    ("routes", 0, "rollout", "salt"),
    ("upstreams", "shop-v2", "pool"),
    ("upstreams", "shop-v3"),
    ("routes", 2),
]
_interesting = st.sampled_from(
    [
        None,
        True,
        0,
        -1,
        2**64,
        1e308,
        float("nan"),
        float("inf"),
        "",
        "x",
        "5s",
        "-1s",
        "9" * 320 + "GiB",
        "9" * 320 + "s",
        "101%",
        "nan%",
        "shop-v1",
        "shop-v2",
        "/",
        "http://x:1",
        [],
        {},
        [None],
        {"a": 1},
        {1: 2},
    ]
)


def _mutate(raw: Any, path: tuple[Any, ...], value: Any) -> Any:
    """Replace, add or delete the node at `path`, as far as the path still exists."""
    node = raw
    for step in path[:-1]:
        in_dict = isinstance(node, dict) and step in node
        in_list = isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)
        if not (in_dict or in_list):
            return raw
        node = node[step]
    last = path[-1]
    if isinstance(node, dict):
        if value is _DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int):
        if 0 <= last < len(node):
            if value is _DELETE:
                del node[last]
            else:
                node[last] = value
        elif value is not _DELETE:
            node.append(value)
    return raw


_RECURSIVE: dict[str, Any] = {}
_RECURSIVE["name"] = _RECURSIVE


def test_yaml_aliases_give_errors_with_lines_not_a_crash() -> None:
    """An anchor inside itself, and aliases of aliases (a "billion laughs"), are errors with
    a line like any other, found without walking every path the aliases make (that walk went
    round for ever in the first, and grows tenfold with each level in the second)."""
    with pytest.raises(ConfigError) as exc:
        load_text(_EXAMPLE_TEXT.replace("listen:", "listen: &self\n  again: *self\nold_listen:", 1))
    assert any(e.startswith("listen.again: unknown key (line ") for e in exc.value.errors)
    laughs = "lol:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"  {chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n"
        for i in range(5)
    )
    with pytest.raises(ConfigError) as exc:
        load_text(_EXAMPLE_TEXT + laughs)
    assert [e for e in exc.value.errors if e.startswith("lol:")] == [
        f"lol: unknown key (line {_EXAMPLE_TEXT.count(chr(10)) + 1})"
    ]
    # The line index holds each node once, not each of the 10^6 paths through the aliases.
    assert len(_line_index(laughs)) < 100


def _must_only_raise_config_error(text: str) -> None:
    try:
        load_text(text)
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) and e for e in exc.errors)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_yamlish, st.text(max_size=80)))
def test_arbitrary_input_only_raises_config_error(document: Any) -> None:
    """Random scalars, lists, mappings and raw text never raise anything but ConfigError."""
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    _must_only_raise_config_error(text)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_EXAMPLE_PATHS),
            st.one_of(_interesting, _yamlish, st.just(_DELETE)),
        ),
        min_size=1,
        max_size=4,
    )
)
@example([(("admin", "max_body_size"), "9" * 320 + "GiB")])  # float overflow in parse_size
@example([(("listen",), _RECURSIVE)])  # dumped as an anchor inside itself
def test_mutated_example_only_raises_config_error(
    mutations: list[tuple[tuple[Any, ...], Any]],
) -> None:
    """Random edits of the example config either load or raise ConfigError, nothing else."""
    raw = copy.deepcopy(_EXAMPLE_RAW)
    for path, value in mutations:
        raw = _mutate(raw, path, value)
    _must_only_raise_config_error(yaml.safe_dump(raw))
