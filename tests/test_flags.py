"""Incident flags, pure: priorities and shedding, overrides with expiry, quarantine, storage,
and the automatic brownout governor, all on an injected clock (no loop, no sockets)."""

from __future__ import annotations

import json

import pytest

from proxy.flags import BrownoutGovernor, Flags, Priority, effective_priority, sheds

T0 = 1_700_000_000.0  # an arbitrary "now", in unix seconds
EP = "v1/http://127.0.0.1:8001"


# -- priorities ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "header", "expected"),
    [
        ("default", None, "default"),
        ("default", "", "default"),
        ("default", "sheddable", "sheddable"),
        ("default", " Sheddable ", "sheddable"),
        ("critical", "default", "default"),
        ("critical", "sheddable", "sheddable"),
        ("default", "critical", "default"),
        ("sheddable", "critical", "sheddable"),
        ("sheddable", "default", "sheddable"),
        ("default", "urgent", "default"),
        ("critical", "critical", "critical"),
    ],
)
def test_effective_priority_lowers_but_never_raises(
    route: Priority, header: str | None, expected: Priority
) -> None:
    """X-Request-Priority may lower a route's priority, never raise it; junk is ignored."""
    assert effective_priority(route, header) == expected


@pytest.mark.parametrize(
    ("level", "shed"),
    [
        (0, set()),
        (1, {"sheddable"}),
        (2, {"sheddable", "default"}),
    ],
)
def test_sheds_per_level(level: int, shed: set[str]) -> None:
    """Level 0 sheds nothing, 1 sheds sheddable, 2 also default; critical never."""
    priorities: tuple[Priority, ...] = ("critical", "default", "sheddable")
    assert {p for p in priorities if sheds(level, p)} == shed


# -- overrides and expiry ----------------------------------------------------------------------


def test_safe_mode_with_ttl_reverts_to_yaml_default_at_expiry() -> None:
    """Safe mode set for 30 minutes is on until then, and at expiry reverts by itself with a
    change whose actor is "expiry"."""
    flags, change = Flags().set_safe_mode(True, "alice", "db on fire", T0, ttl=1800)
    assert flags.safe_mode
    assert (change.flag, change.action, change.before, change.after) == (
        "safe_mode",
        "set",
        False,
        True,
    )
    assert (change.actor, change.reason, change.expires) == ("alice", "db on fire", T0 + 1800)
    assert flags.next_expiry() == T0 + 1800

    same, changes = flags.expire(T0 + 1799.9)
    assert same.safe_mode and changes == []

    after, changes = flags.expire(T0 + 1800)
    assert not after.safe_mode
    assert after.safe_mode_override is None
    assert after.next_expiry() is None
    [expired] = changes
    assert (expired.flag, expired.action, expired.actor) == ("safe_mode", "expired", "expiry")
    assert (expired.before, expired.after) == (True, False)
    assert "alice" in expired.reason and "db on fire" in expired.reason


def test_override_against_the_yaml_default_reverts_to_that_default() -> None:
    """With safe mode on in the YAML, a 10-minute disable ends with safe mode on again; a
    brownout raised over a YAML level 1 goes back to 1, not to 0."""
    flags = Flags(default_safe_mode=True, default_brownout=1)
    flags, _ = flags.set_safe_mode(False, "bob", "need the canary", T0, ttl=600)
    flags, _ = flags.set_brownout(2, "bob", "overload", T0 + 60, ttl=60)
    assert not flags.safe_mode
    assert flags.brownout == 2
    assert flags.next_expiry() == T0 + 120

    flags, changes = flags.expire(T0 + 120)
    assert [(c.flag, c.before, c.after) for c in changes] == [("brownout", 2, 1)]
    assert flags.brownout == 1
    assert not flags.safe_mode

    flags, changes = flags.expire(T0 + 600)
    assert [(c.flag, c.before, c.after, c.actor) for c in changes] == [
        ("safe_mode", False, True, "expiry")
    ]
    assert flags.safe_mode


def test_several_overrides_due_at_once_all_expire() -> None:
    """Safe mode, brownout and a quarantine all due by the same instant expire together."""
    flags = Flags()
    flags, _ = flags.set_safe_mode(True, "a", "r", T0, ttl=10)
    flags, _ = flags.set_brownout(1, "a", "r", T0, ttl=20)
    flags, _ = flags.set_quarantine("v2", True, "a", "r", T0, ttl=30)
    flags, changes = flags.expire(T0 + 1000)
    assert sorted(c.flag for c in changes) == ["brownout", "quarantine", "safe_mode"]
    assert all(c.actor == "expiry" and c.action == "expired" for c in changes)
    assert (flags.safe_mode, flags.brownout, flags.quarantined) == (False, 0, frozenset())
    assert flags == Flags()


def test_setting_the_yaml_value_without_ttl_clears_the_override() -> None:
    """Disabling safe mode (or brownout) back to the YAML value leaves nothing to remember."""
    flags, _ = Flags().set_safe_mode(True, "a", "r", T0)
    flags, change = flags.set_safe_mode(False, "a", "over", T0 + 5)
    assert flags.safe_mode_override is None
    assert (change.action, change.before, change.after) == ("clear", True, False)
    flags, _ = flags.set_brownout(2, "a", "r", T0)
    flags, change = flags.set_brownout(0, "a", "ok", T0 + 5)
    assert flags.brownout_override is None
    assert (change.action, change.before, change.after) == ("clear", 2, 0)


def test_brownout_level_must_be_0_1_or_2() -> None:
    """Level 3 is refused with ValueError and nothing changes."""
    with pytest.raises(ValueError, match="0, 1 or 2"):
        Flags().set_brownout(3, "a", "r", T0)


# -- quarantine ----------------------------------------------------------------------------------


def test_quarantine_an_upstream_and_an_endpoint_then_expire() -> None:
    """A whole upstream and one endpoint of another go out of rotation; the endpoint's TTL
    returns it by itself while the upstream (no TTL) stays out."""
    flags, change = Flags().set_quarantine("v2", True, "alice", "bad build", T0)
    assert change.flag == "quarantine" and change.target == "v2" and change.action == "set"
    flags, change = flags.set_quarantine(EP, True, "alice", "flaky", T0, ttl=300)
    assert change.expires == T0 + 300
    assert flags.quarantined == {"v2", EP}

    flags, changes = flags.expire(T0 + 300)
    [expired] = changes
    assert (expired.target, expired.before, expired.after, expired.actor) == (
        EP,
        True,
        False,
        "expiry",
    )
    assert flags.quarantined == {"v2"}


def test_quarantining_twice_and_releasing_nothing_are_refused() -> None:
    """Quarantining what is already out, or releasing what is not, raises ValueError."""
    flags, _ = Flags().set_quarantine("v2", True, "a", "r", T0)
    with pytest.raises(ValueError, match="already quarantined"):
        flags.set_quarantine("v2", True, "a", "again", T0)
    with pytest.raises(ValueError, match="not quarantined"):
        flags.set_quarantine("v1", False, "a", "r", T0)
    yaml_listed = Flags(default_quarantine=frozenset({EP}))
    with pytest.raises(ValueError, match="already quarantined"):
        yaml_listed.set_quarantine(EP, True, "a", "r", T0)


def test_release_then_quarantine_again_leaves_no_override() -> None:
    """Releasing an operator's quarantine forgets it entirely (the YAML does not list it)."""
    flags, _ = Flags().set_quarantine("v2", True, "a", "r", T0, ttl=60)
    flags, change = flags.set_quarantine("v2", False, "a", "fixed", T0 + 1)
    assert (change.action, change.before, change.after, change.expires) == (
        "clear",
        True,
        False,
        None,
    )
    assert flags.quarantined == frozenset()
    assert flags.quarantine_overrides == {}
    assert flags.next_expiry() is None


def test_releasing_a_yaml_listed_target_is_remembered() -> None:
    """Releasing an endpoint that the YAML quarantines keeps it released (an override of
    False), through storage and a reload; quarantining it again puts it back."""
    flags = Flags(default_quarantine=frozenset({EP, "v2"}))
    assert flags.quarantined == {EP, "v2"}
    flags, change = flags.set_quarantine(EP, False, "carol", "it is fixed", T0)
    assert (change.before, change.after) == (True, False)
    assert flags.quarantined == {"v2"}
    assert flags.quarantine_overrides[EP].value is False

    stored = json.loads(json.dumps(flags.to_json()))
    reloaded = Flags(default_quarantine=frozenset({EP, "v2"})).with_overrides_from(stored)
    assert reloaded.quarantined == {"v2"}
    new_yaml = reloaded.with_defaults(False, 0, frozenset({EP}))
    assert new_yaml.quarantined == frozenset()

    again, _ = flags.set_quarantine(EP, True, "carol", "broke again", T0 + 5)
    assert again.quarantined == {EP, "v2"}


def test_holds_is_what_a_release_may_name_whatever_the_config() -> None:
    """`holds`: quarantined (by the YAML or an override) or carrying an override (a YAML
    entry released); nothing else, so only those skip the config check on release."""
    flags = Flags(default_quarantine=frozenset({"v2"}))
    flags, _ = flags.set_quarantine("v3", True, "dave", "bad host", T0)
    flags, _ = flags.set_quarantine("v2", False, "dave", "fixed", T0)
    flags, _ = flags.set_quarantine(EP, True, "dave", "flaky", T0)
    assert [t for t in ("v2", "v3", EP, "v9", "v1") if flags.holds(t)] == ["v2", "v3", EP]
    released, _ = flags.set_quarantine("v3", False, "dave", "removed by reload", T0)
    assert not released.holds("v3")


# -- storage -------------------------------------------------------------------------------------


def test_to_json_and_with_overrides_from_round_trip() -> None:
    """Every override survives the state-store form (through real JSON) unchanged."""
    defaults = Flags(default_brownout=1, default_quarantine=frozenset({"v3"}))
    flags, _ = defaults.set_safe_mode(True, "alice", "incident 42", T0, ttl=1800)
    flags, _ = flags.set_brownout(2, "bob", "overload", T0 + 1)
    flags, _ = flags.set_quarantine(EP, True, "carol", "flaky", T0 + 2, ttl=60)
    flags, _ = flags.set_quarantine("v3", False, "carol", "fixed", T0 + 3)

    stored = json.loads(json.dumps(flags.to_json()))
    restored = defaults.with_overrides_from(stored)
    assert restored == flags
    assert restored.describe() == flags.describe()
    assert restored.safe_mode_override is not None
    assert restored.safe_mode_override.expires == T0 + 1800
    assert Flags().with_overrides_from(Flags().to_json()) == Flags()


def test_with_overrides_from_ignores_damaged_parts() -> None:
    """A malformed stored document loses only its bad parts, never the proxy."""
    good = {"value": True, "actor": "a", "reason": "r", "set_at": T0, "expires": None}
    raw = {
        "safe_mode": {"actor": "no value"},
        "brownout": {"value": 7, "actor": "a", "reason": "r", "set_at": T0},
        "quarantine": {"v2": good, "v9": "not an override"},
        "unknown": 1,
    }
    flags = Flags().with_overrides_from(raw)
    assert (flags.safe_mode, flags.brownout, flags.quarantined) == (False, 0, frozenset({"v2"}))
    assert Flags().with_overrides_from(None) == Flags()
    assert Flags().with_overrides_from({"quarantine": ["v2"]}) == Flags()


def test_describe_shows_who_and_until_when() -> None:
    """describe() gives the effective values with actor, reason and expiry of each override."""
    flags, _ = Flags(default_quarantine=frozenset({"v3"})).set_brownout(
        1, "alice", "db slow", T0, ttl=600
    )
    shown = flags.describe()
    assert shown["brownout"]["level"] == 1
    assert shown["brownout"]["override"]["actor"] == "alice"
    assert shown["brownout"]["override"]["expires"] == T0 + 600
    assert shown["safe_mode"] == {"enabled": False, "override": None}
    assert shown["quarantine"] == [{"target": "v3", "override": None, "from_config": True}]


# -- the governor --------------------------------------------------------------------------------


def _feed(
    governor: BrownoutGovernor,
    start: float,
    end: float,
    in_flight: dict[str, int],
    p99: dict[str, float | None] | None = None,
    step: float = 0.25,
) -> list[tuple[float, int, str]]:
    """Readings every `step` seconds over [start, end); the (time, level, cause) changes."""
    changes = []
    now = start
    while now < end:
        changed = governor.observe(now, in_flight, p99 or {})
        if changed is not None:
            changes.append((now, *changed))
        now += step
    return changes


def test_governor_raises_after_raise_after_and_stops_at_2() -> None:
    """Saturated in-flight load raises the level once per `raise_after` seconds, up to 2."""
    governor = BrownoutGovernor(max_in_flight=10, raise_after=5, lower_after=30)
    assert _feed(governor, 0, 4.99, {"v1": 11, "v2": 0}) == []
    changes = _feed(governor, 5, 60, {"v1": 11, "v2": 0})
    assert [(t, level) for t, level, _ in changes] == [(5, 1), (10, 2)]
    assert changes[0][2] == "v1: 11 in flight > 10"
    assert governor.level == 2


def test_governor_lowers_only_after_lower_after_below_relief() -> None:
    """After saturation ends, each level comes down only after `lower_after` seconds below
    80% of the limit, one level at a time."""
    governor = BrownoutGovernor(max_in_flight=10, raise_after=5, lower_after=30)
    _feed(governor, 0, 11, {"v1": 50})
    assert governor.level == 2
    assert _feed(governor, 11, 40.99, {"v1": 8}) == []
    changes = _feed(governor, 41, 100, {"v1": 8})
    assert changes == [(41, 1, "v1: 50 in flight > 10"), (71, 0, "saturation relieved")]
    assert (governor.level, governor.cause) == (0, "saturation relieved")


def test_governor_does_not_flap_when_load_hovers_at_the_limit() -> None:
    """Load at the limit (not over, not below the relief band) holds the level for an hour;
    a dip into the band restarts the count towards lowering."""
    governor = BrownoutGovernor(max_in_flight=10, raise_after=5, lower_after=30)
    _feed(governor, 0, 5.01, {"v1": 11})
    assert governor.level == 1
    assert _feed(governor, 6, 3600, {"v1": 10}, step=1.0) == []
    assert _feed(governor, 3600, 3629, {"v1": 2}, step=1.0) == []
    assert _feed(governor, 3629, 3630, {"v1": 9}, step=1.0) == []  # back in the band once
    assert _feed(governor, 3630, 3658.9, {"v1": 2}, step=0.5) == []
    changes = _feed(governor, 3659, 3700, {"v1": 2}, step=0.5)
    assert [(level, cause) for _, level, cause in changes] == [(0, "saturation relieved")]


def test_governor_counts_calm_from_the_first_calm_reading() -> None:
    """After a reading in the relief band, lowering waits `lower_after` seconds from the first
    reading below it, not from the band reading."""
    governor = BrownoutGovernor(max_in_flight=10, raise_after=5, lower_after=30)
    _feed(governor, 0, 5.01, {"v1": 11})
    assert _feed(governor, 100, 101, {"v1": 9}, step=1.0) == []
    assert _feed(governor, 110, 139.9, {"v1": 2}, step=1.0) == []
    assert _feed(governor, 140, 141, {"v1": 2}, step=1.0) == [(140, 0, "saturation relieved")]


def test_governor_short_spikes_do_not_raise() -> None:
    """Saturation shorter than `raise_after` each time never raises the level."""
    governor = BrownoutGovernor(max_in_flight=10, raise_after=5, lower_after=30)
    for minute in range(10):
        start = minute * 60.0
        assert _feed(governor, start, start + 4, {"v1": 20}) == []
        assert _feed(governor, start + 4, start + 60, {"v1": 1}) == []
    assert governor.level == 0


def test_governor_latency_saturation() -> None:
    """A p99 over the latency target raises the level (cause names the upstream and both
    latencies); a p99 in the relief band holds it; no data (None) counts as calm."""
    governor = BrownoutGovernor(latency_target=0.2, raise_after=5, lower_after=30)
    changes = _feed(governor, 0, 6, {"v1": 500, "v2": 3}, {"v1": 0.3, "v2": None})
    assert changes == [(5, 1, "v1: p99 300ms > 200ms")]
    assert _feed(governor, 6, 600, {"v1": 500}, {"v1": 0.17}, step=1.0) == []
    assert governor.level == 1
    changes = _feed(governor, 600, 700, {"v1": 500}, {"v1": None}, step=1.0)
    assert [(level, cause) for _, level, cause in changes] == [(0, "saturation relieved")]
    assert changes[0][0] >= 629  # about lower_after


def test_governor_without_limits_never_acts() -> None:
    """With neither limit configured, no load changes the level."""
    governor = BrownoutGovernor(raise_after=1, lower_after=1)
    assert _feed(governor, 0, 100, {"v1": 10_000}, {"v1": 60.0}, step=1.0) == []
    assert governor.level == 0
