"""rollouts.yaml: the pydantic models, loading, validation and the JSON Schema export.

Data flows one way: YAML text -> `load_text()` -> an immutable `Config`, or a `ConfigError`
listing every problem with its YAML path (`routes[2].rollout.weight`) and line. Nothing here
does I/O except `load()`, which reads the file. Reload builds a whole new `Config`; an existing
one is never mutated (the models are frozen).

Durations are written `250ms`, `5s`, `1m`, `1h`; sizes `512KiB`, `10MB`, `1GiB`; both also
accept plain numbers (seconds, bytes). Percentages accept `10`, `10.5` or `10%`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from .breaker import BreakerSettings

__all__ = [
    "AdminConfig",
    "Config",
    "ConfigError",
    "Listen",
    "Route",
    "Upstream",
    "export_schema",
    "load",
    "load_text",
    "parse_duration",
    "parse_size",
]


class ConfigError(Exception):
    """A config that cannot be used; `errors` holds one `path: message (line N)` string per
    problem, in file order (`routes[2].rollout.weight: must be between 0 and 100 (line 23)`)."""

    def __init__(self, errors: list[str], source: str = "") -> None:
        self.errors = errors
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + f"{len(errors)} error(s)\n  " + "\n  ".join(errors))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_NON_FINITE = frozenset({"nan", "inf", "infinity"})  # what float() takes for NaN and infinity
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}


def parse_duration(value: object) -> float:
    """`250ms` / `5s` / `1m` / `1h` / a number of seconds -> seconds as a float."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 250ms, 5s or 1m")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int past float's range (JSON and YAML allow any size)
            raise ValueError("must be a finite duration, got a number too large for one") from None
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    elif isinstance(value, str) and value.strip().lower().lstrip("+-") in _NON_FINITE:
        raise ValueError(f"must be a finite duration, got {value!r}")
    else:
        raise ValueError(f"must be a duration such as 250ms, 5s or 1m, got {value!r}")
    # NaN would compare false against every deadline, and inf means "never": neither is a timeout.
    if not math.isfinite(seconds):
        raise ValueError(f"must be a finite duration, got {value!r}")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def parse_size(value: object) -> int:
    """`512KiB` / `10MB` / a number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as 512KiB or 10MB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        number = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
        if not math.isfinite(number):  # int(inf) would raise OverflowError, not a config error
            raise ValueError(f"is too large, got {value!r}")
        size = int(number)
    else:
        raise ValueError(f"must be a size such as 512KiB or 10MB, got {value!r}")
    if size < 0:
        raise ValueError("must not be negative")
    return size


def _parse_percent(value: object) -> object:
    # YAML reads `weight: yes` as True, which pydantic would take as 1 percent.
    if isinstance(value, bool):
        raise ValueError(f"must be a percentage such as 10 or 12.5%, got {value!r}")
    if isinstance(value, str):
        text = value.strip().removesuffix("%").strip()
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"must be a percentage such as 10 or 12.5%, got {value!r}") from None
    return value


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _DURATION.pattern},
                {"type": "number", "minimum": 0},
            ],
            "description": "a duration: 250ms, 5s, 1m, 1h, or seconds",
        }
    ),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _SIZE.pattern},
                {"type": "integer", "minimum": 0},
            ],
            "description": "a size: 512KiB, 10MB, 1GiB, or bytes",
        }
    ),
]
Percent = Annotated[
    float,
    BeforeValidator(_parse_percent),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": 100},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*%?\s*$"},
            ],
            "description": "percent, 0-100, decimals allowed",
        }
    ),
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^`|~0-9A-Za-z-]+$")
# What a request's Host is compared with: a name or address, never a port, scheme or path.
_MATCH_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _header_name(value: str) -> str:
    if not _HEADER_NAME.match(value) or "_" in value:
        raise ValueError(f"{value!r} is not a valid header name (letters, digits and dashes)")
    return value


class Listen(_Model):
    """Where the data plane accepts client connections."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class AdminConfig(_Model):
    """The admin server: metrics, health, the JSON API. Mutating calls need the token."""

    host: str = "127.0.0.1"
    port: int = Field(9901, ge=0, le=65535)
    token_env: str | None = Field(
        "SHAPER_ADMIN_TOKEN",
        description="name of the environment variable holding the admin bearer token",
    )
    max_body_size: Size = 65536


class Limits(_Model):
    """Client-facing limits of the data plane (RFC 9112 section 2.3 guidance)."""

    max_request_line: int = Field(8190, ge=256, le=65536, description="longer: 414")
    max_header_size: int = Field(8192, ge=256, le=65536, description="one header line; over: 431")
    max_headers: int = Field(100, ge=8, le=1000, description="more header lines: 431")
    header_timeout: Duration = Field(10.0, description="the whole request head must arrive by")
    keepalive_timeout: Duration = Field(75.0, description="idle client connections close after")
    max_body_size: Size = Field(
        100 * 1024**2, description="default request body limit of a route; over: 413"
    )
    max_connections: int = Field(10000, ge=1, description="client connections held at once")


class ProxyOptions(_Model):
    """Response decoration and header policy."""

    variant_header: bool = Field(True, description="add X-Shaper-Variant: stable|canary")
    via: str = Field("1.1 shaper", description="the Via entry this proxy appends")
    forward_interim: bool = Field(
        True,
        description="pass the upstream's 1xx interim responses (103 Early Hints, 102 "
        "Processing) on to HTTP/1.1 clients ahead of the final one, as RFC 9110 section 15.2 "
        "asks of a proxy; false drops them, as nginx does by default",
    )


class Pool(_Model):
    """Keep-alive connections to one upstream endpoint."""

    max_connections: int = Field(256, ge=1, le=100000, description="per endpoint")
    keepalive_timeout: Duration = Field(
        15.0,
        description="idle pooled connections close after; keep below the upstream's (an "
        "upstream's Keep-Alive: timeout=N shortens it to N - 1s)",
    )


def _fraction(value: float) -> float:
    if not 0.0 < value <= 100.0:
        raise ValueError("must be more than 0 and at most 100 percent")
    return value


class BreakerConfig(_Model):
    """Circuit breaker of each endpoint of an upstream (see proxy/breaker.py)."""

    consecutive_failures: int = Field(5, ge=1, description="gateway failures in a row that trip")
    failure_rate: Percent = Field(50.0, description="failure rate over `window` that trips")
    window: Duration = 10.0
    min_calls: int = Field(20, ge=1, description="calls in `window` before a rate can trip")
    slow_call_duration: Duration | None = Field(
        None, description="a call slower than this to the response head is slow"
    )
    slow_call_rate: Percent = Field(80.0, description="slow-call rate over `window` that trips")
    open_base: Duration = Field(5.0, description="first open time; doubles each trip in a row")
    open_max: Duration = 300.0
    half_open_probes: int = Field(1, ge=1, le=100, description="probes admitted at once")
    probe_lease: Duration = Field(30.0, description="a probe not back by then counts as failed")
    close_after: int = Field(3, ge=1, description="probe successes in a row that close it")

    @field_validator("failure_rate", "slow_call_rate", mode="after")
    @classmethod
    def _rates(cls, value: float) -> float:
        return _fraction(value)

    def settings(self) -> BreakerSettings:
        return BreakerSettings(
            consecutive_failures=self.consecutive_failures,
            failure_rate=self.failure_rate / 100.0,
            window=self.window,
            min_calls=self.min_calls,
            slow_call_duration=self.slow_call_duration,
            slow_call_rate=self.slow_call_rate / 100.0,
            open_base=self.open_base,
            open_max=self.open_max,
            half_open_probes=self.half_open_probes,
            probe_lease=self.probe_lease,
            close_after=self.close_after,
        )


class HealthCheck(_Model):
    """Active health check of each endpoint: GET `path`, 2xx/3xx within `timeout` is healthy."""

    path: str = "/healthz"
    interval: Duration = 5.0
    timeout: Duration = 1.0
    healthy_threshold: int = Field(2, ge=1, description="successes in a row to return")
    unhealthy_threshold: int = Field(3, ge=1, description="failures in a row to leave rotation")

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError("must start with /")
        return path


class Upstream(_Model):
    """A named set of endpoints serving one version of the service."""

    endpoints: list[str] = Field(min_length=1)
    connect_timeout: Duration = 2.0
    request_timeout: Duration = Field(30.0, description="until the response head arrives")
    idle_timeout: Duration = Field(60.0, description="longest pause inside a body, either way")
    pool: Pool = Pool()
    host_header: Literal["preserve", "endpoint"] = Field(
        "preserve", description="send the client's Host, or the endpoint's host:port"
    )
    breaker: BreakerConfig = BreakerConfig()
    health_check: HealthCheck | None = None

    @field_validator("endpoints")
    @classmethod
    def _endpoints_are_http_urls(cls, endpoints: list[str]) -> list[str]:
        for i, endpoint in enumerate(endpoints):
            parts = urlsplit(endpoint)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"endpoint [{i}] {endpoint!r} must be http://HOST:PORT")
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError(f"endpoint [{i}] {endpoint!r} must not have a path or query")
            try:
                parts.port  # noqa: B018 - property raises on a bad port
            except ValueError:
                raise ValueError(f"endpoint [{i}] {endpoint!r} has a bad port") from None
        if len(set(endpoints)) != len(endpoints):
            raise ValueError("endpoints must not repeat")
        return endpoints


class Match(_Model):
    """Which requests a route takes: the longest matching path prefix wins, host-specific
    routes before host-less ones."""

    path_prefix: str = "/"
    host: str | None = Field(None, description="exact host, without port; case-insensitive")

    @field_validator("path_prefix")
    @classmethod
    def _absolute(cls, prefix: str) -> str:
        if not prefix.startswith("/"):
            raise ValueError("must start with /")
        return prefix

    @field_validator("host")
    @classmethod
    def _lower(cls, host: str | None) -> str | None:
        # Requests are matched on the host without its port, so `example.com:8080` (or an
        # empty host) would silently never match.
        if host is not None and not _MATCH_HOST.match(host):
            raise ValueError(f"{host!r} must be a host name without port, such as example.com")
        return host.lower() if host else host


class Sticky(_Model):
    """Where the user identity comes from; exactly one of the three."""

    header: str | None = None
    cookie: str | None = None
    source_ip: bool = False

    @field_validator("header")
    @classmethod
    def _valid_header(cls, value: str | None) -> str | None:
        return _header_name(value) if value else value

    @model_validator(mode="after")
    def _exactly_one(self) -> Sticky:
        chosen = [bool(self.header), bool(self.cookie), self.source_ip]
        if sum(chosen) != 1:
            raise ValueError("set exactly one of header, cookie or source_ip: true")
        return self


class Override(_Model):
    """A request header whose value `always` / `never` forces the canary / the stable."""

    header: str

    @field_validator("header")
    @classmethod
    def _valid_header(cls, value: str) -> str:
        return _header_name(value)


class LatencySlo(_Model):
    """The canary's latency quantile must stay under this; give exactly one."""

    p50: Duration | None = None
    p90: Duration | None = None
    p95: Duration | None = None
    p99: Duration | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> LatencySlo:
        if sum(v is not None for v in (self.p50, self.p90, self.p95, self.p99)) != 1:
            raise ValueError("give exactly one of p50, p90, p95 or p99")
        return self

    @property
    def quantile(self) -> tuple[float, float]:
        """(quantile, seconds)."""
        for q, value in ((0.5, self.p50), (0.9, self.p90), (0.95, self.p95), (0.99, self.p99)):
            if value is not None:
                return q, value
        raise AssertionError("validated to have one")


class Slo(_Model):
    """What the canary must keep to; the analysis rolls back when it does not."""

    error_rate: Percent | None = Field(
        None, description="max fraction of failed requests (5xx or upstream failure), e.g. 1%"
    )
    latency: LatencySlo | None = None
    min_requests: int = Field(100, ge=1, description="per variant, before any verdict")
    false_rollback_rate: Percent = Field(
        1.0, description="at most this share of healthy rollouts may be rolled back by chance"
    )

    @field_validator("error_rate", mode="after")
    @classmethod
    def _error_rate(cls, value: float | None) -> float | None:
        return None if value is None else _fraction(value)

    @field_validator("false_rollback_rate", mode="after")
    @classmethod
    def _alpha(cls, value: float) -> float:
        if not 0.0 < value <= 20.0:
            raise ValueError("must be more than 0 and at most 20 percent")
        return value


class Step(_Model):
    """One step of a progressive rollout: this weight for at least `hold`."""

    weight: Percent
    hold: Duration

    @field_validator("weight", mode="after")
    @classmethod
    def _weight_range(cls, weight: float) -> float:
        if not 0.0 <= weight <= 100.0:
            raise ValueError("must be between 0 and 100")
        return weight


class Gates(_Model):
    """What must hold before a step advances (besides its hold time and the analysis)."""

    canary_healthy: bool = Field(True, description="every canary endpoint healthy and closed")
    max_stable_burn_rate: float | None = Field(
        10.0,
        gt=0,
        description="stable error-budget burn over both windows must stay under this "
        "(needs slo.error_rate); null disables",
    )
    burn_windows: tuple[Duration, Duration] = Field(
        (60.0, 300.0), description="short and long window of the burn-rate gate (at most 5m)"
    )

    @field_validator("burn_windows", mode="after")
    @classmethod
    def _within_horizon(cls, windows: tuple[float, float]) -> tuple[float, float]:
        # The proxy keeps five minutes of per-second signals.
        if not 1.0 <= windows[0] <= windows[1] <= 300.0:
            raise ValueError("must be [short, long] with 1s <= short <= long <= 5m")
        return windows

    min_requests: int | None = Field(
        None, ge=1, description="canary requests in the step; default slo.min_requests"
    )


class Rollout(_Model):
    """Split between the stable and the canary upstream."""

    stable: str
    canary: str
    weight: Percent = Field(0.0, description="percent of users sent to the canary (no steps)")
    steps: list[Step] | None = Field(
        None, min_length=1, description="progressive weights; instead of a fixed weight"
    )
    slo: Slo = Slo()
    on_breach: Literal["rollback", "pause"] = "rollback"
    gates: Gates = Gates()
    sticky: Sticky | None = None
    override: Override | None = None
    salt: str | None = Field(
        None, description="bucketing salt; defaults to the route name. Change it to reshuffle"
    )

    @field_validator("weight", mode="after")
    @classmethod
    def _weight_range(cls, weight: float) -> float:
        if not 0.0 <= weight <= 100.0:
            raise ValueError("must be between 0 and 100")
        return weight

    @model_validator(mode="after")
    def _different(self) -> Rollout:
        if self.stable == self.canary:
            raise ValueError("stable and canary must be different upstreams")
        if self.steps is not None and "weight" in self.model_fields_set:
            raise ValueError("set weight or steps, not both")
        return self


class Route(_Model):
    """A named route: a match and either a rollout or a plain upstream."""

    name: str
    match: Match = Match()
    priority: Literal["critical", "default", "sheddable"] = Field(
        "default", description="brownout level 1 sheds sheddable, level 2 also default"
    )
    rollout: Rollout | None = None
    upstream: str | None = None
    max_body_size: Size | None = Field(None, description="request body limit; default limits.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError("must be 1-63 letters, digits, '.', '_' or '-'")
        return name

    @model_validator(mode="after")
    def _one_target(self) -> Route:
        if (self.rollout is None) == (self.upstream is None):
            raise ValueError("set exactly one of rollout or upstream")
        return self

    @property
    def upstream_names(self) -> tuple[str, ...]:
        if self.rollout is not None:
            return (self.rollout.stable, self.rollout.canary)
        assert self.upstream is not None
        return (self.upstream,)


class AutoBrownout(_Model):
    """Raise the brownout level by itself when an upstream saturates; null limits disable."""

    max_in_flight: int | None = Field(None, ge=1, description="requests in flight per upstream")
    latency_target: Duration | None = Field(
        None, description="an upstream's p99 to the response head over the last 10s"
    )
    raise_after: Duration = Field(5.0, description="saturated this long: one level up")
    lower_after: Duration = Field(30.0, description="relieved this long: one level down")


class FlagDefaults(_Model):
    """Incident flags as the file sets them; runtime changes (CLI, API) override them until
    they expire, then these values return."""

    safe_mode: bool = Field(False, description="all traffic to stable, every rollout frozen")
    brownout: int = Field(0, ge=0, le=2, description="0 off, 1 shed sheddable, 2 also default")
    quarantine: list[str] = Field(
        default_factory=list, description="UPSTREAM or UPSTREAM/ENDPOINT-URL out of rotation"
    )
    auto_brownout: AutoBrownout = AutoBrownout()


EVENT_TYPES = (
    "rollout.start",
    "rollout.advance",
    "rollout.promote",
    "rollout.pause",
    "rollout.resume",
    "rollout.rollback",
    "rollout.retry",
    "rollout.set_weight",
    "rollout.rename",
    "breaker.open",
    "breaker.half_open",
    "breaker.closed",
    "health.healthy",
    "health.unhealthy",
    "brownout.level",
    "safe_mode",
    "quarantine",
    "release",
    "config.reload_succeeded",
    "config.reload_failed",
    "outbox.set_aside",
)


class Webhook(_Model):
    """A JSON POST per event, signed with HMAC-SHA256 over the body."""

    name: str
    url: str
    secret_env: str = Field(description="environment variable holding the signing secret")
    types: list[str] = Field(
        default_factory=lambda: ["*"],
        description="event types to send; a trailing .* matches a family, * everything",
    )
    timeout: Duration = 5.0
    retries: int = Field(5, ge=0, le=100, description="retries after the first attempt")
    backoff: Duration = Field(1.0, description="first retry delay; doubles each retry, max 5m")
    breaker: BreakerConfig = BreakerConfig(consecutive_failures=3, open_base=10.0)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError("must be 1-63 letters, digits, '.', '_' or '-'")
        return name

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} must be an http:// or https:// URL")
        return url

    @field_validator("types")
    @classmethod
    def _known_types(cls, types: list[str]) -> list[str]:
        for pattern in types:
            prefix = pattern.removesuffix("*").removesuffix(".")
            if pattern != "*" and not any(
                t == pattern or (pattern.endswith("*") and t.startswith(prefix))
                for t in EVENT_TYPES
            ):
                raise ValueError(f"{pattern!r} matches no event type ({', '.join(EVENT_TYPES)})")
        return types

    def wants(self, event_type: str) -> bool:
        for pattern in self.types:
            if pattern == "*" or pattern == event_type:
                return True
            if pattern.endswith("*") and event_type.startswith(pattern[:-1]):
                return True
        return False


class Events(_Model):
    """Where events go besides the log."""

    webhooks: list[Webhook] = Field(default_factory=list)

    @field_validator("webhooks")
    @classmethod
    def _unique(cls, webhooks: list[Webhook]) -> list[Webhook]:
        names = [w.name for w in webhooks]
        if len(set(names)) != len(names):
            raise ValueError("webhook names must be unique")
        return webhooks


class Config(_Model):
    """The whole of rollouts.yaml."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={"title": "traffic-shaper rollouts.yaml"},
    )

    listen: Listen = Listen()
    admin: AdminConfig = AdminConfig()
    state_dir: str = ".shaper"
    drain_timeout: Duration = Field(
        30.0, description="on SIGTERM, how long in-flight requests may take to finish"
    )
    limits: Limits = Limits()
    proxy: ProxyOptions = ProxyOptions()
    flags: FlagDefaults = FlagDefaults()
    events: Events = Events()
    upstreams: dict[str, Upstream] = Field(min_length=1)
    routes: list[Route] = Field(min_length=1)

    @field_validator("upstreams")
    @classmethod
    def _upstream_names(cls, upstreams: dict[str, Upstream]) -> dict[str, Upstream]:
        for name in upstreams:
            if not _NAME.match(name):
                raise ValueError(f"upstream name {name!r}: 1-63 letters, digits, '.', '_' or '-'")
        return upstreams

    def body_limit(self, route: Route) -> int:
        return route.max_body_size if route.max_body_size is not None else self.limits.max_body_size


Loc = tuple[int | str, ...]


def quarantine_problem(target: str, upstreams: dict[Any, Any]) -> str | None:
    """Why `UPSTREAM` or `UPSTREAM/ENDPOINT` names nothing in `upstreams` (None when it does).
    Shared by the config check, the admin API and the CLI's local mode."""
    name, _, endpoint = target.partition("/")
    spec = upstreams.get(name)
    if spec is None:
        known = ", ".join(sorted(str(k) for k in upstreams)) or "none"
        return f"unknown upstream {name!r} (known: {known})"
    if endpoint:
        endpoints = spec.endpoints if isinstance(spec, Upstream) else (spec or {}).get("endpoints")
        listed = [str(e).rstrip("/") for e in endpoints or []]
        if endpoint.rstrip("/") not in listed:
            return f"{name} has no endpoint {endpoint!r} (endpoints: {', '.join(listed)})"
    return None


def _cross_check(raw: dict[Any, Any]) -> list[tuple[Loc, str]]:
    """Errors that involve more than one part of the file (references, duplicates).

    Works on the raw YAML data, skipping whatever has the wrong shape, so that these errors are
    reported together with the field errors instead of only after those are fixed."""
    errors: list[tuple[Loc, str]] = []
    upstreams = raw.get("upstreams")
    known = {k for k in upstreams if isinstance(k, str)} if isinstance(upstreams, dict) else None
    flags = raw.get("flags")
    quarantine = flags.get("quarantine") if isinstance(flags, dict) else None
    if isinstance(quarantine, list) and isinstance(upstreams, dict):
        for i, target in enumerate(quarantine):
            if isinstance(target, str) and (problem := quarantine_problem(target, upstreams)):
                errors.append((("flags", "quarantine", i), problem))
    routes = raw.get("routes")
    if not isinstance(routes, list):
        return errors
    seen_names: dict[str, int] = {}
    seen_matches: dict[tuple[str | None, str], int] = {}
    for i, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        name = route.get("name")
        if isinstance(name, str):
            if name in seen_names:
                errors.append(
                    (
                        ("routes", i, "name"),
                        f"{name!r} is already used by routes[{seen_names[name]}]",
                    )
                )
            seen_names.setdefault(name, i)
        match = route.get("match", {})
        if isinstance(match, dict):
            host, prefix = match.get("host"), match.get("path_prefix", "/")
            if isinstance(host, str | None) and isinstance(prefix, str):
                key = (host.lower() if host else None, prefix)
                if key in seen_matches:
                    errors.append(
                        (
                            ("routes", i, "match"),
                            f"same host and path_prefix as routes[{seen_matches[key]}]",
                        )
                    )
                seen_matches.setdefault(key, i)
        refs: list[tuple[Loc, object]] = [(("routes", i, "upstream"), route.get("upstream"))]
        rollout = route.get("rollout")
        if isinstance(rollout, dict):
            refs += [
                (("routes", i, "rollout", side), rollout.get(side)) for side in ("stable", "canary")
            ]
        for loc, ref in refs:
            if known is not None and isinstance(ref, str) and ref not in known:
                listed = ", ".join(sorted(known)) or "none"
                errors.append((loc, f"unknown upstream {ref!r} (known: {listed})"))
    return errors


def _format_loc(loc: Loc, raw: object) -> str:
    """`routes[2].rollout.weight`: list positions in brackets, mapping keys (even numeric
    ones) after dots; the raw data says which is which."""
    out = ""
    node = raw
    for part in loc:
        if part == "[key]":  # pydantic's marker for "the key itself", not its value
            out += " (key)"
            continue
        if isinstance(node, list) and isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if 0 <= part < len(node) else None
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out or "(top level)"


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ")


def _line_index(text: str) -> dict[Loc, int]:
    """Map each YAML path to the 1-based line it starts on, so errors can point at it."""
    index: dict[Loc, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return index

    seen: set[int] = set()

    def walk(node: yaml.Node, path: Loc) -> None:
        index.setdefault(path, node.start_mark.line + 1)
        if id(node) in seen:
            # An alias: its node was walked where it was defined. Walking it again could go
            # round for ever (an anchor inside itself) or take exponential time (aliases of
            # aliases); errors under it point at the alias, the nearest line indexed.
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                index[(*path, key)] = key_node.start_mark.line + 1
                walk(value_node, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    if root is not None:
        walk(root, ())
    return index


def _line_of(loc: Loc, lines: dict[Loc, int]) -> int | None:
    """The line of `loc`, or of its nearest ancestor present in the file (a missing key)."""
    # YAML mapping keys are indexed as text, sequence items by position; a numeric part of
    # `loc` may be either, so try both spellings.
    path = tuple(p for p in loc if p != "[key]")
    for end in range(len(path), -1, -1):
        line = lines.get(path[:end]) or lines.get(tuple(str(p) for p in path[:end]))
        if line:
            return line
    return None


def load_text(text: str, source: str = "") -> Config:
    """Parse and validate YAML text; raise ConfigError naming every problem, each as
    `path: message (line N)`, in file order."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}invalid YAML: {problem}"], source) from None
    except (ValueError, RecursionError) as exc:
        # PyYAML's constructors raise these for some well-formed but unusable scalars and for
        # absurdly deep nesting.
        raise ConfigError([f"invalid YAML: {exc}"], source) from None
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): must be a mapping of settings"], source)
    problems: list[tuple[Loc, str]] = []
    config: Config | None = None
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems += [(tuple(e["loc"]), _message(e)) for e in exc.errors()]
    problems += _cross_check(raw)
    if not problems:
        assert config is not None
        return config
    lines = _line_index(text)
    located = [(_line_of(loc, lines), _format_loc(loc, raw), msg) for loc, msg in problems]
    located.sort(key=lambda p: p[0] if p[0] is not None else math.inf)
    raise ConfigError(
        [f"{path}: {msg}" + (f" (line {line})" if line else "") for line, path, msg in located],
        source,
    )


def load(path: str | Path) -> Config:
    """Read and validate a config file; ConfigError on any problem, including unreadable files."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror or exc}"], str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"cannot read: not UTF-8 text ({exc.reason})"], str(path)) from None
    return load_text(text, str(path))


def config_hash(config: Config) -> str:
    """A short stable digest of the effective config, recorded with every decision."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def export_schema() -> str:
    """The JSON Schema of rollouts.yaml, as committed in schema/rollouts.schema.json."""
    schema = Config.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
