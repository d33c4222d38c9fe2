"""The deployment artifacts in deploy/, checked by the real tools: the systemd unit
(systemd-analyze), the container image (statically, and its health check against a real
proxy), the Kubernetes manifests (the Kubernetes schemas), the Prometheus config and rules
(promtool, and a real Prometheus scraping a real proxy), and the Grafana dashboard (every
metric it names exists in the real /metrics output)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Config, load_text
from proxy.server import Shaper

from .conftest import StartShaper, StartUpstream, free_port, make_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
K8S = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "traffic-shaper.json"
UNIT = DEPLOY / "systemd" / "traffic-shaper.service"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
RULE_FILES = (PROM / "recording_rules.yml", PROM / "alert_rules.yml")
TOKEN = "deploy-test-token"
SECRET = "deploy-test-hook-secret"
DEFAULT_DRAIN = Config.model_fields["drain_timeout"].default

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None and not os.environ.get("CI"),
    reason="promtool not installed (make test installs Debian's prometheus package)",
)
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None and not os.environ.get("CI"),
    reason="prometheus not installed (make test installs Debian's prometheus package)",
)


# --- helpers -------------------------------------------------------------------------------


def _run(*cmd: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )


def _seconds(value: str) -> float:
    """A systemd time span such as 45s, 1min 30s or 2m (plain numbers are seconds)."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


def _unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as section -> key -> every value (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _dockerfile(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuations joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether a context path is left out by .dockerignore rules (the last match wins; a
    pattern matching a directory matches everything below it)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _ignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.match(p) for p in prefixes):
            ignored = not negate
    return ignored


def _ignore_patterns(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _manifests() -> dict[str, dict[str, Any]]:
    """The Kubernetes objects in deploy/kubernetes, by kind."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                objects[doc["kind"]] = doc
    return objects


def _configmap_config() -> Config:
    return load_text(_manifests()["ConfigMap"]["data"]["rollouts.yaml"], "configmap.yaml")


def _rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def _dashboard_exprs(node: Any) -> Iterator[str]:
    """Every PromQL expression in the dashboard: panel targets, annotations, variables."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from _dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _dashboard_exprs(item)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENT = re.compile(r"(?<![\w:])[a-zA-Z_:][\w:]*")


def _names_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression: shaper_* series and recording-rule names
    (level:metric:operations); label values, template variables and functions are skipped."""
    text = _VARIABLE.sub(" ", _STRING.sub(" ", expr))
    return {n for n in _IDENT.findall(text) if n.startswith("shaper_") or n.count(":") >= 2}


def _referenced() -> dict[str, set[str]]:
    """Metric name -> where it is used, over the alert rules, recording rules and dashboard."""
    used: dict[str, set[str]] = {}
    for path in RULE_FILES:
        for rule in _rules(path):
            for name in _names_in(rule["expr"]):
                used.setdefault(name, set()).add(path.name)
    for expr in _dashboard_exprs(json.loads(DASHBOARD.read_text())):
        for name in _names_in(expr):
            used.setdefault(name, set()).add(DASHBOARD.name)
    return used


def _recorded() -> set[str]:
    return {rule["record"] for path in RULE_FILES for rule in _rules(path) if "record" in rule}


def _sample_names(text: str) -> set[str]:
    """Every series name in an exposition, as Prometheus stores them (with _total, _bucket,
    _count and _sum)."""
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def _hello(version: str) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=version)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def _receiver(received: list[bytes]) -> web.Application:
    async def hook(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    return app


def _url(address: tuple[str, int]) -> str:
    return "http://{}:{}".format(*address)


async def _traffic(shaper: Shaper, stop: asyncio.Event) -> None:
    """About 100 requests a second from many sticky users until stopped."""
    i = 0
    async with aiohttp.ClientSession() as client:
        while not stop.is_set():
            i += 1
            async with client.get(
                _url(shaper.proxy_address) + "/", headers={"X-User-Id": f"user-{i % 200}"}
            ) as r:
                await r.read()
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _under_traffic(shaper: Shaper) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(_traffic(shaper, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


# --- systemd -------------------------------------------------------------------------------


def test_systemd_unit_settings() -> None:
    """The unit is hardened, uses StateDirectory, reloads on SIGHUP and outlasts the drain."""
    unit = _unit_settings(UNIT.read_text())
    service = unit["Service"]
    one = {key: values[-1] for key, values in service.items()}
    assert one["NoNewPrivileges"] == "yes"
    assert one["ProtectSystem"] == "strict"
    assert one["ProtectHome"] in ("yes", "read-only", "tmpfs")
    assert one["PrivateTmp"] == "yes"
    assert one["CapabilityBoundingSet"] == ""
    assert one["StateDirectory"] == "traffic-shaper"
    assert one["Restart"] == "on-failure"
    assert one.get("KillSignal", "SIGTERM") == "SIGTERM"
    assert re.fullmatch(r"(/usr)?/bin/kill -HUP \$MAINPID", one["ExecReload"])
    assert _seconds(one["TimeoutStopSec"]) > DEFAULT_DRAIN + 5
    argv = shlex.split(one["ExecStart"])
    assert Path(argv[0]).name == "shaper" and argv[1:3] == ["serve", "-c"]
    assert argv[3].startswith("/etc/traffic-shaper/")
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def _verifiable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart points at this checkout's shaper (verify needs the
    binary to exist); every other line is as shipped."""
    shaper = Path(sys.executable).with_name("shaper")
    assert shaper.exists(), "the shaper entry point is not installed in this environment"
    text = UNIT.read_text()
    shipped = shlex.split(_unit_settings(text)["Service"]["ExecStart"][-1])[0]
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={shipped} ", f"ExecStart={shaper} "))
    return copy


def _systemd_analyze_works(tmp_path: Path) -> str | None:
    """None when `systemd-analyze verify` can check a unit file here, else why not."""
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze not installed (Debian's systemd package provides it)"
    probe = tmp_path / "probe.service"
    probe.write_text("[Service]\nExecStart=/bin/true\n")
    result = _run("systemd-analyze", "verify", probe)
    if result.returncode != 0:
        return f"systemd-analyze verify cannot run here: {result.stderr.strip()[:200]}"
    return None


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit with no error and no warning."""
    reason = _systemd_analyze_works(tmp_path)
    if reason:
        pytest.skip(reason)
    result = _run("systemd-analyze", "verify", _verifiable_unit(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


def test_systemd_unit_security_exposure(tmp_path: Path) -> None:
    """`systemd-analyze security --offline` rates the unit's exposure 'OK' (at most 2.0)."""
    reason = _systemd_analyze_works(tmp_path)
    if reason:
        pytest.skip(reason)
    unit = _verifiable_unit(tmp_path)
    result = _run("systemd-analyze", "security", "--offline=yes", "--no-pager", unit)
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip(f"this systemd-analyze has no offline security check: {result.stderr[:200]}")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


# --- container -----------------------------------------------------------------------------


def test_dockerfile_instructions() -> None:
    """Slim 3.11 base, non-root, exec-form entrypoint, curl-free HEALTHCHECK on /healthz."""
    instructions = _dockerfile(DOCKERFILE.read_text())
    stages = _stages(instructions)
    assert stages, "no FROM"
    for stage in stages:
        image = stage[0][1].split()[0]
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image)
    final = dict(stages[-1])
    user = final["USER"].split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) >= 1000)

    entrypoint = json.loads(final["ENTRYPOINT"])  # exec form: a JSON array
    command = json.loads(final["CMD"])
    assert Path(entrypoint[0]).name == "shaper"
    assert command[:2] == ["serve", "-c"]

    options, _, check = final["HEALTHCHECK"].partition("CMD ")
    for flag in ("--interval=", "--timeout=", "--retries="):
        assert flag in options
    probe = json.loads(check)  # exec form: no shell needed
    assert Path(probe[0]).name.startswith("python") and probe[1] == "-c"
    assert "urllib.request" in probe[2] and "/healthz" in probe[2]
    assert not re.search(r"\b(curl|wget)\b", final["HEALTHCHECK"])

    assert set(final["EXPOSE"].split()) >= {"8080", "9901"}
    assert "/var/lib/traffic-shaper" in final["VOLUME"]
    assert final.get("STOPSIGNAL", "SIGTERM") == "SIGTERM"
    # The entry point and the health check's interpreter come from the build stage's venv.
    copied = [args for keyword, args in stages[-1] if keyword == "COPY" and "--from=" in args]
    assert any(entrypoint[0].startswith(args.split()[-1]) for args in copied)


def test_dockerignore_keeps_the_context_small() -> None:
    """The build context holds what the Dockerfile copies and leaves the rest out."""
    shipped = DEPLOY / "docker" / ".dockerignore"
    buildkit = DEPLOY / "docker" / "Dockerfile.dockerignore"
    assert shipped.read_text() == buildkit.read_text()
    patterns = _ignore_patterns(shipped)
    for keyword, args in _dockerfile(DOCKERFILE.read_text()):
        if keyword == "COPY" and "--from=" not in args:
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert not _ignored(source, patterns), f"COPY {source} is excluded"
    # setuptools reads the readme named in pyproject.toml, and the package data ships.
    # setup.py compiles the data path, from the sources (never a build of this checkout's).
    for needed in (
        "pyproject.toml",
        "setup.py",
        "README.md",
        "proxy/cli.py",
        "proxy/dashboard/index.html",
    ):
        assert not _ignored(needed, patterns), needed
    for left_out in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_admin.py",
        ".shaper/x",
        "proxy/__pycache__/cli.cpython-311.pyc",
        "test-artifacts/a.png",
        "proxy/forward.cpython-311-x86_64-linux-gnu.so",
        "proxy/_native.json",
    ):
        assert _ignored(left_out, patterns), left_out


async def test_dockerfile_healthcheck_probes_healthz(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """The HEALTHCHECK command exits 0 on a live admin server, non-zero on a dead port."""
    final = dict(_stages(_dockerfile(DOCKERFILE.read_text()))[-1])
    probe = json.loads(final["HEALTHCHECK"].partition("CMD ")[2])
    upstream = await start_upstream(_hello("v1"))
    shaper = await start_shaper(
        make_config(
            {"v1": [upstream]}, [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "v1"}]
        )
    )

    async def run(port: int) -> int:
        env = {**os.environ, "SHAPER_ADMIN_PORT": str(port)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, *probe[1:], env=env, stderr=asyncio.subprocess.DEVNULL
        )
        return await asyncio.wait_for(process.wait(), 15)

    assert await run(shaper.admin_address[1]) == 0
    assert await run(free_port()) != 0


# --- kubernetes ----------------------------------------------------------------------------


def test_kubernetes_manifests_match_the_schemas() -> None:
    """Built-in objects validate strictly against kubernetes-validate's bundled schemas."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    kinds = set()
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc["apiVersion"].startswith(("monitoring.coreos.com/", "kustomize.")):
                continue  # CRDs: no bundled schema; checked field by field below
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.name}: {exc}")
            kinds.add(doc["kind"])
    assert kinds >= {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}


def test_kubernetes_configmap_holds_a_valid_config() -> None:
    """The ConfigMap's rollouts.yaml passes proxy.config.load_text and binds beyond loopback."""
    config = _configmap_config()
    assert config.listen.host == "0.0.0.0" and config.admin.host == "0.0.0.0"
    assert config.admin.token_env
    assert config.routes and any(route.rollout for route in config.routes)


def test_kubernetes_deployment_fields() -> None:
    """Probes, preStop drain, grace period, volumes, Secret, non-root and selectors all match."""
    objects = _manifests()
    config = _configmap_config()
    deployment, service = objects["Deployment"], objects["Service"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.listen.port, "admin": config.admin.port}

    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["httpGet"]["path"] == "/readyz"
    assert liveness["httpGet"]["path"] == "/healthz"
    for probe in (readiness, liveness):
        assert probe["httpGet"]["port"] in ("admin", config.admin.port)

    pre_stop = container["lifecycle"]["preStop"]
    command = pre_stop.get("exec", {}).get("command", [])
    pause = float(command[1]) if command[:1] == ["sleep"] else pre_stop["sleep"]["seconds"]
    assert pause >= 3
    assert spec["terminationGracePeriodSeconds"] > pause + config.drain_timeout

    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    state = next(m for m in mounts.values() if m["mountPath"] == config.state_dir)
    assert not state.get("readOnly") and state["name"] in volumes
    args = container["args"]
    config_file = Path(args[args.index("-c") + 1])
    config_mount = next(m for m in mounts.values() if m["mountPath"] == str(config_file.parent))
    assert "subPath" not in config_mount, "a subPath mount never sees ConfigMap updates"
    config_map = objects["ConfigMap"]
    assert volumes[config_mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_file.name in config_map["data"]

    env = {e["name"]: e for e in container["env"]}
    assert env[config.admin.token_env or ""]["valueFrom"]["secretKeyRef"]["key"]

    security = {**spec.get("securityContext", {}), **container["securityContext"]}
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    docker_user = dict(_stages(_dockerfile(DOCKERFILE.read_text()))[-1])["USER"]
    assert str(security["runAsUser"]) == docker_user.split(":")[0]

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(config.admin.port)
    assert annotations["prometheus.io/path"] == "/metrics"

    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    pdb = objects["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] > pdb["spec"].get("minAvailable", 0)

    monitor = objects["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).exists(), resource


# --- prometheus ----------------------------------------------------------------------------


@needs_promtool
def test_prometheus_scrape_configs_check(tmp_path: Path) -> None:
    """`promtool check config` accepts both scrape configs, which scrape job traffic-shaper."""
    result = _run("promtool", "check", "config", PROM / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # Debian's build of Prometheus leaves out Kubernetes discovery: check the Kubernetes config
    # (its relabelling, its rule files) with the pod discovery swapped for a static target.
    kube = yaml.safe_load((PROM / "prometheus-kubernetes.yml").read_text())
    for scrape in kube["scrape_configs"]:
        assert scrape.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        scrape["static_configs"] = [{"targets": ["127.0.0.1:9901"]}]
    for rules in RULE_FILES:
        shutil.copy(rules, tmp_path / rules.name)
    (tmp_path / "kube.yml").write_text(yaml.safe_dump(kube))
    result = _run("promtool", "check", "config", tmp_path / "kube.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    for path in (PROM / "prometheus.yml", PROM / "prometheus-kubernetes.yml"):
        jobs = [s["job_name"] for s in yaml.safe_load(path.read_text())["scrape_configs"]]
        assert jobs == ["traffic-shaper"], path.name
        assert [Path(f).name for f in yaml.safe_load(path.read_text())["rule_files"]] == [
            p.name for p in RULE_FILES
        ]


@needs_promtool
def test_promtool_checks_rules() -> None:
    """`promtool check rules` accepts the rules, which hold every alert the issue asks for."""
    result = _run("promtool", "check", "rules", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {rule["alert"]: rule for rule in _rules(PROM / "alert_rules.yml")}
    rollback = alerts["ShaperCanaryRolledBack"]
    assert "shaper_rollout_status" in rollback["expr"] and "rolled_back" in rollback["expr"]
    assert _seconds(rollback.get("for", "0s")) == 0
    assert "shaper_breaker_state" in alerts["ShaperBreakerOpen"]["expr"]
    assert alerts["ShaperBreakerOpen"]["for"] == "5m"
    fast = re.sub(r"\s+", " ", alerts["ShaperErrorBudgetBurn"]["expr"])
    for window, factor in (("1h", "14.4"), ("5m", "14.4"), ("6h", "6"), ("30m", "6")):
        assert f"route:shaper_request_error_ratio:rate{window} > ({factor} * 0.001)" in fast
    assert alerts["ShaperErrorBudgetBurn"]["labels"]["severity"] == "page"
    assert alerts["ShaperErrorBudgetBurnSlow"]["labels"]["severity"] == "ticket"
    assert "shaper_dlq_depth" in alerts["ShaperDeadLetterQueueGrowing"]["expr"]
    assert 'result="failure"' in alerts["ShaperConfigReloadFailing"]["expr"]
    assert all(rule["annotations"]["summary"] for rule in alerts.values())


@needs_promtool
def test_promtool_unit_tests_cover_every_alert() -> None:
    """`promtool test rules` passes, and every alert has a test case in which it fires."""
    result = _run("promtool", "test", "rules", PROM / "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tests = yaml.safe_load((PROM / "rules_test.yml").read_text())
    assert sorted(tests["rule_files"]) == sorted(p.name for p in RULE_FILES)
    firing = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    alerts = {rule["alert"] for rule in _rules(PROM / "alert_rules.yml")}
    assert alerts - firing == set(), "alerts without a firing test case"
    tested = {case["expr"] for test in tests["tests"] for case in test.get("promql_expr_test", [])}
    golden = {r for r in _recorded() if r.startswith("route_variant:")}
    assert golden - tested == set(), "golden-signal recording rules without a test"


# --- grafana -------------------------------------------------------------------------------


def test_grafana_dashboard_structure() -> None:
    """The dashboard is well-formed and covers golden signals per variant, rollout and queues."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "route"} <= set(variables)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]

    by_title = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in panels}
    for title in ("Traffic", "Errors", "Latency p50 / p99", "Saturation"):
        assert re.search(r"by \([^)]*\bvariant\b", by_title[title]), title
    exprs = " ".join(_dashboard_exprs(dashboard))
    for metric in (
        "shaper_rollout_weight",
        "shaper_rollout_status",
        "shaper_breaker_state",
        "shaper_brownout_level",
        "shaper_event_queue_depth",
        "shaper_dlq_depth",
    ):
        assert metric in exprs, metric


# --- the rules and the dashboard against a real proxy --------------------------------------


async def _full_house(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> Shaper:
    """A proxy in which every family the rules and dashboard name has series: a rollout, a webhook
    sink, a dead canary (breaker open, diverted requests), a shed request, a quarantine, a
    rejected request and a rollback."""
    stable = await start_upstream(_hello("v1"))
    canary = await start_upstream(_hello("v2"))
    hook = await start_upstream(_receiver([]))
    dead = f"http://127.0.0.1:{free_port()}"
    raw = make_config(
        {
            "v1": [stable],
            "v2": [canary],
            "dead": {
                "endpoints": [dead],
                "breaker": {"consecutive_failures": 1, "open_base": "1m"},
            },
            "spare": [canary],
        },
        [
            {
                "name": "shop",
                "match": {"path_prefix": "/"},
                "rollout": {
                    "stable": "v1",
                    "canary": "v2",
                    "weight": 50,
                    "sticky": {"header": "X-User-Id"},
                },
            },
            {
                "name": "beta",
                "match": {"path_prefix": "/beta"},
                "rollout": {"stable": "v1", "canary": "dead", "weight": 100},
            },
            {
                "name": "recs",
                "match": {"path_prefix": "/recs"},
                "upstream": "v1",
                "priority": "sheddable",
            },
        ],
        events={
            "webhooks": [
                {"name": "chat", "url": hook + "/hook", "secret_env": "SHAPER_TEST_HOOK_SECRET"}
            ]
        },
        state_dir=str(tmp_path / "state"),
    )
    shaper = await start_shaper(raw)
    proxy, admin = _url(shaper.proxy_address), _url(shaper.admin_address)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as client:
        for i in range(40):
            async with client.get(proxy + "/", headers={"X-User-Id": f"u{i}"}) as r:
                await r.read()
        for _ in range(3):  # the first opens the dead canary's breaker, the rest are diverted
            async with client.get(proxy + "/beta") as r:
                await r.read()
        async with client.get(proxy + "/" + "x" * 9000) as r:
            assert r.status == 414
        for path, body in (
            ("/api/flags/brownout", {"level": 1, "reason": "test", "ttl": "5m"}),
            ("/api/flags/quarantine", {"target": "spare", "reason": "test"}),
            ("/api/rollouts/shop/rollback", {"reason": "test"}),
        ):
            async with client.post(admin + path, json=body, headers=auth) as r:
                assert r.status == 200, await r.text()
        async with client.get(proxy + "/recs") as r:
            assert r.status == 503 and r.headers["X-Shaper-Shed"] == "1"
    return shaper


async def test_every_metric_in_rules_and_dashboard_exists(
    start_upstream: StartUpstream,
    start_shaper: StartShaper,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every metric named in the rules and the dashboard is a series in the real /metrics."""
    monkeypatch.setenv("SHAPER_TEST_TOKEN", TOKEN)
    monkeypatch.setenv("SHAPER_TEST_HOOK_SECRET", SECRET)
    shaper = await _full_house(start_upstream, start_shaper, tmp_path)
    async with aiohttp.ClientSession() as client:
        async with client.get(_url(shaper.admin_address) + "/metrics") as r:
            exposed = _sample_names(await r.text())
    referenced = _referenced()
    assert len(referenced) >= 20, sorted(referenced)  # the parser does find the names
    recorded = _recorded()
    missing = {
        name: sorted(where)
        for name, where in referenced.items()
        if name not in (recorded if ":" in name else exposed)
    }
    assert missing == {}, f"named in deploy/ but not exported: {missing}"


# --- a real Prometheus ---------------------------------------------------------------------


async def _get_json(client: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with client.get(url, params=params) as r:
        return await r.json()


async def _until(what: str, check: Any, timeout: float) -> Any:
    """Poll an async check until it returns something truthy; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.5)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@needs_prometheus
async def test_prometheus_scrapes_records_and_alerts(
    start_upstream: StartUpstream,
    start_shaper: StartShaper,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real Prometheus scrapes, records, parses the dashboard and fires the rollback alert."""
    monkeypatch.setenv("SHAPER_TEST_TOKEN", TOKEN)
    stable = await start_upstream(_hello("v1"))
    canary = await start_upstream(_hello("v2"))
    raw = make_config(
        {"v1": [stable], "v2": [canary]},
        [
            {
                "name": "shop",
                "match": {"path_prefix": "/"},
                "rollout": {
                    "stable": "v1",
                    "canary": "v2",
                    "weight": 50,
                    "sticky": {"header": "X-User-Id"},
                },
            }
        ],
    )
    shaper = await start_shaper(raw)
    admin = _url(shaper.admin_address)

    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROM / name) for name in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["scrape_timeout"] = "1s"
    job["static_configs"] = [{"targets": ["{}:{}".format(*shaper.admin_address)]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prom = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        "prometheus",
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=log,
        stderr=log,
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:

            async def ready() -> bool:
                assert process.returncode is None, (tmp_path / "prometheus.log").read_text()
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with client.get(prom + "/-/ready") as r:
                        return r.status == 200
                return False

            async def query(expr: str) -> dict[str, float]:
                body = await _get_json(client, prom + "/api/v1/query", query=expr)
                assert body["status"] == "success", body
                return {
                    json.dumps(s["metric"], sort_keys=True): float(s["value"][1])
                    for s in body["data"]["result"]
                }

            async def alert(state: str) -> list[dict[str, Any]]:
                body = await _get_json(client, prom + "/api/v1/alerts")
                return [
                    a
                    for a in body["data"]["alerts"]
                    if a["labels"]["alertname"] == "ShaperCanaryRolledBack"
                    and a["labels"].get("route") == "shop"
                    and a["state"] == state
                ]

            await _until("Prometheus to be ready", ready, 20)
            async with _under_traffic(shaper):

                async def rate_per_variant() -> dict[str, float] | None:
                    rates = await query(
                        'sum by (variant) (rate(shaper_requests_total{route="shop"}[10s]))'
                    )
                    by_variant = {json.loads(k)["variant"]: v for k, v in rates.items()}
                    return by_variant if set(by_variant) == {"stable", "canary"} else None

                rates = await _until("the request rate per variant", rate_per_variant, 20)
                assert all(rate > 1 for rate in rates.values()), rates

                async def recorded() -> dict[str, float]:
                    return await query('route_variant:shaper_requests:rate1m{route="shop"}')

                assert len(await _until("the recorded rate per variant", recorded, 15)) == 2

                async def rules_ok() -> list[dict[str, Any]] | None:
                    body = await _get_json(client, prom + "/api/v1/rules")
                    rules = [r for g in body["data"]["groups"] for r in g["rules"]]
                    return rules if all(r["health"] == "ok" for r in rules) else None

                rules = await _until("every rule to evaluate without error", rules_ok, 10)
                assert len(rules) == sum(len(_rules(path)) for path in RULE_FILES)

                substitutions = {
                    "$__rate_interval": "1m",
                    "$__range": "5m",
                    "$job": ".*",
                    "$route": ".*",
                    "${datasource}": "",
                }
                dashboard = json.loads(DASHBOARD.read_text())
                for expr in _dashboard_exprs(dashboard):
                    if expr.startswith("label_values(") or expr == "prometheus":
                        continue  # Grafana's own variable functions, not PromQL
                    for variable, value in substitutions.items():
                        expr = expr.replace(variable, value)
                    await query(expr)  # asserts status "success": the expression parses

                assert await alert("firing") == []
                async with client.post(
                    admin + "/api/rollouts/shop/rollback",
                    json={"reason": "deploy test"},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ) as r:
                    assert r.status == 200
                (firing,) = await _until(
                    "ShaperCanaryRolledBack to fire", lambda: alert("firing"), 20
                )
                assert firing["labels"]["severity"] == "ticket"
                assert firing["labels"]["job"] == "traffic-shaper"
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


# --- README --------------------------------------------------------------------------------


def test_readme_deploying_section_names_real_files() -> None:
    """README's Deploying section covers each option and names only existing deploy/ paths."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Deploying\n", 1)[1].split("\n## ", 1)[0]
    for option in ("systemd", "Docker", "Kubernetes", "Prometheus", "Grafana"):
        assert option in section, option
    paths = set(re.findall(r"deploy/[\w./-]+\w", section))
    assert len(paths) >= 5
    for path in paths:
        assert (ROOT / path).exists(), path
