"""The files under docker/ and deploy/kubernetes/, checked offline (no
container engine runs here): the compose file against the compose-spec
schema, the Kubernetes manifests with kubernetes-validate (the
ServiceMonitor against tests/deploy/schemas/), the Dockerfiles with
hadolint, the unbound config with unbound-checkconf, the proxy config and
scenarios with the proxy's own loader, the entrypoint's flags, and the
dashboard and provisioning files against each other and the README."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from proxy.config import Settings
from proxy.core.model import Scenario
from proxy.loader import load_model, load_scenario, load_scenario_text
from support.net import free_port

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = REPO / "deploy" / "kubernetes"
BIN = Path(sys.executable).parent
DASHBOARD = DOCKER / "grafana" / "dashboards" / "dnschaos.json"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed (`pip install -e '.[test]'` / `make test`)")
    return str(path)


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def readme_metrics() -> set[str]:
    section = (REPO / "README.md").read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(dnschaos_\w+)` \|", section, re.MULTILINE))


# --- compose -----------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec() -> None:
    out = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
              str(DOCKER / "compose.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_wiring() -> None:
    spec = compose()
    services = spec["services"]
    assert {"dnschaos", "unbound", "prometheus", "grafana"} <= set(services)
    clients = [name for name in services if name.startswith("client")]
    assert clients, "a client container makes queries"
    # Every bind-mounted file or directory is in the repository.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"
        build = service.get("build")
        if build:
            context = DOCKER / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).exists(), name
    # Fixed addresses are in the network, outside its dynamic range, and distinct.
    ipam = spec["networks"]["gameday"]["ipam"]["config"][0]
    subnet, dynamic = ipaddress.ip_network(ipam["subnet"]), ipaddress.ip_network(ipam["ip_range"])
    fixed = {name: ipaddress.ip_address(s["networks"]["gameday"]["ipv4_address"])
             for name, s in services.items()
             if isinstance(s.get("networks"), dict)}
    assert len(set(fixed.values())) == len(fixed)
    for name, address in fixed.items():
        assert address in subnet and address not in dynamic, name
    # The proxy forwards to unbound; the clients ask the proxy; Prometheus scrapes it.
    config = yaml.safe_load((DOCKER / "dnschaos.yaml").read_text())
    assert config["upstreams"] == [f"{fixed['unbound']}:53"]
    proxies = ["dnschaos", "dnschaos-2"]  # two proxies, one game day (the control plane)
    asked = set()
    for name in clients:
        env = {**services[name].get("environment", {})}
        assert env["DNS_SERVER"] in {str(fixed[p]) for p in proxies}
        asked.add(env["DNS_SERVER"])
        assert env["DNS_PORT"] == config["listen"][0].rsplit(":", 1)[1]
    assert asked == {str(fixed[p]) for p in proxies}
    prometheus = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] if job["job_name"] == "dnschaos"
               for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"{p}:" + config["admin"].rsplit(":", 1)[1] for p in proxies]
    # Both follow the same Redis; only the first is given the scenario to start.
    envs = [services[p]["environment"] for p in proxies]
    assert envs[0]["DNSCHAOS_CONTROL"] == envs[1]["DNSCHAOS_CONTROL"]
    assert envs[0]["DNSCHAOS_CONTROL"].endswith("@redis:6379/0")
    assert envs[1]["DNSCHAOS_SCENARIO"] == ""
    assert "--appendonly" in services["redis"]["command"]
    assert "ports" not in services["redis"]  # not on the host: writing to it injects faults
    # Clients land in the client_groups the dashboard shows (one is left ungrouped).
    groups = {ipaddress.ip_network(cidr): group for cidr, group in config["client_groups"].items()}
    named = {name: [g for net, g in groups.items() if fixed[name] in net] for name in clients}
    assert named["client-payments"] == ["payments"]
    assert named["client-checkout"] == ["checkout"]
    assert named["client-batch"] == []
    assert all(fixed[name] in ipaddress.ip_network(c) for name in clients
               for c in config["allow"][:1])
    # The scenario the proxy starts is in the mounted directory.
    env = services["dnschaos"]["environment"]
    assert env["DNSCHAOS_SCENARIO"].startswith("/etc/dnschaos/scenarios/")
    assert (DOCKER / "scenarios" / Path(env["DNSCHAOS_SCENARIO"]).name).exists()


def test_compose_proxy_config_and_scenarios_load() -> None:
    settings = load_model((DOCKER / "dnschaos.yaml").read_text(), "docker/dnschaos.yaml",
                          Settings)
    assert settings.client_groups and settings.scenario_dir == "/etc/dnschaos/scenarios"
    for path in (DOCKER / "scenarios").glob("*.yaml"):
        scenario = load_scenario(path)
        assert scenario.phases
    # The demo's db outage targets the payments group only.
    demo = load_scenario(DOCKER / "scenarios" / "shop-gameday.yaml")
    db = [r for p in demo.phases for r in p.rules if r.name == "db-nxdomain"][0]
    payments = [c for c, g in settings.client_groups.items() if g == "payments"]
    assert db.match.clients == payments


def test_unbound_config_is_valid() -> None:
    if not shutil.which("unbound-checkconf"):
        pytest.skip("unbound is not installed (`make test` installs it)")
    out = run("unbound-checkconf", str(DOCKER / "unbound" / "unbound.conf"))
    assert out.returncode == 0, out.stdout + out.stderr
    # The names the clients ask for are answered by unbound itself.
    conf = (DOCKER / "unbound" / "unbound.conf").read_text()
    for name in ("api", "db", "cdn", "checkout", "payments"):
        assert f'"{name}.shop.test. ' in conf


# --- Dockerfiles and the entrypoint ---------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "unbound/Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    out = run(tool("hadolint"), "--failure-threshold", "info", str(DOCKER / dockerfile))
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_essentials() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:[\d.]+-slim", text, re.MULTILINE)
    assert re.search(r"^USER 10001", text, re.MULTILINE), "runs as non-root"
    assert "HEALTHCHECK" in text and "dnschaos-healthcheck" in text
    assert "/ready" in (DOCKER / "healthcheck.py").read_text()  # not upstream health
    assert '".[control]"' in text  # redis-py, for DNSCHAOS_CONTROL
    assert "COPY scenarios /usr/share/dnschaos/scenarios" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    for needed in ("proxy", "scenarios", "pyproject.toml", "README.md", "docker/entrypoint.sh"):
        assert needed not in ignored


def test_entrypoint_passes_only_the_arguments_given(tmp_path: Path) -> None:
    """The proxy reads DNSCHAOS_* itself (tests/unit/test_settings_env.py), so
    a variable never turns into a flag that would beat the user's own."""
    env = {"PATH": os.environ["PATH"], "DNSCHAOS_COMMAND": "echo",
           "DNSCHAOS_LISTEN": "0.0.0.0:1053", "DNSCHAOS_ADMIN_LISTEN": "0.0.0.0:5380"}
    out = run("sh", str(DOCKER / "entrypoint.sh"), "--policy", "random", env=env)
    assert out.returncode == 0 and not out.stderr, out.stderr
    assert out.stdout.split() == ["run", "--policy", "random"]
    # The old name is refused out loud, not silently.
    old = run("sh", str(DOCKER / "entrypoint.sh"),
              env={**env, "DNSCHAOS_ADMIN_LISTEN": "", "DNSCHAOS_ADMIN": "0.0.0.0:5380"})
    assert old.stdout.split() == ["run"] and "DNSCHAOS_ADMIN_LISTEN" in old.stderr


def test_the_image_environment_sets_no_option() -> None:
    """An ENV default would override the config file mounted over the image's:
    the image's defaults are in docker/defaults.yaml, copied to DNSCHAOS_CONFIG."""
    from proxy.cli import ENV_SETTINGS, build_parser, load_settings

    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    env = dict(pair.split("=", 1) for line in re.findall(r"^ENV (.*)$", text, re.MULTILINE)
               for pair in line.split())
    assert not set(env) & set(ENV_SETTINGS), env
    assert f"COPY docker/defaults.yaml {env['DNSCHAOS_CONFIG']}" in text
    image = load_settings(build_parser().parse_args(["run"]),
                          {"DNSCHAOS_CONFIG": str(DOCKER / "defaults.yaml")})
    assert image.listen == ["0.0.0.0:1053"] and image.admin == "0.0.0.0:5380"
    exposed = set(re.search(r"^EXPOSE (.*)$", text, re.MULTILINE).group(1).split())
    assert exposed == {"1053/udp", "1053/tcp", "5380/tcp"}


def test_healthcheck_finds_the_admin_listener_as_the_proxy_does(start_proxy, tmp_path) -> None:
    proxy = start_proxy()
    admin = "%s:%d" % proxy.admin
    script = str(DOCKER / "healthcheck.py")
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)}

    def check(**env: str) -> int:
        return run(sys.executable, script, env={**base, **env}).returncode

    config = tmp_path / "dnschaos.yaml"
    config.write_text(f'admin: "{admin}"\n')
    assert check(DNSCHAOS_CONFIG=str(config)) == 0  # from the file
    assert check(DNSCHAOS_ADMIN_LISTEN=admin) == 0  # from the environment
    wildcard = "0.0.0.0:%d" % proxy.admin[1]
    assert check(DNSCHAOS_ADMIN_LISTEN=wildcard) == 0  # asked on loopback
    closed = "127.0.0.1:%d" % free_port()
    assert check(DNSCHAOS_CONFIG=str(config), DNSCHAOS_ADMIN_LISTEN=closed) == 1


# --- Grafana and Prometheus -------------------------------------------------------------


def test_dashboard_json_and_provisioning() -> None:
    board = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "dashboards" / "dnschaos.yaml").read_text())
    mounts = compose()["services"]["grafana"]["volumes"]
    assert any(m.endswith(":" + provider["providers"][0]["options"]["path"] + ":ro")
               and m.startswith("./grafana/dashboards") for m in mounts)
    titles = {p["title"] for p in board["panels"]}
    for wanted in ("Query rate", "Fault rate by rule", "Affected clients",
                   "Faults received per client", "Latency percentiles"):
        assert wanted in titles
    assert any(a.get("expr") and "dnschaos_active_phase" in a["expr"]
               for a in board["annotations"]["list"]), "phases as annotations"
    known = readme_metrics()
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid
            for metric in re.findall(r"dnschaos_\w+", target["expr"]):
                base = re.sub(r"_(bucket|sum|count)$", "", metric)
                assert base in known, f"{panel['title']}: {metric} is not in the README table"
    # No two panels overlap on the grid.
    cells = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, panel["title"]
        assert g["x"] + g["w"] <= 24
        cells |= area


def test_promtool_check_config() -> None:
    if not shutil.which("promtool"):
        pytest.skip("promtool is not installed (Debian package prometheus; `make test`)")
    out = run("promtool", "check", "config", str(DOCKER / "prometheus" / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


# --- Kubernetes --------------------------------------------------------------------------


def documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in MANIFESTS
            for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name != "servicemonitor.yaml"],
                         ids=lambda p: p.name)
def test_kubernetes_manifest_validates(path: Path) -> None:
    out = run(tool("kubernetes-validate"), "--strict", "--kubernetes-version", "1.30.0",
              str(path))
    assert out.returncode == 0 and "passed" in out.stdout, out.stdout + out.stderr


def test_servicemonitor_validates_against_its_schema() -> None:
    """ServiceMonitor is a CRD that kubernetes-validate does not know: checked
    against tests/deploy/schemas/servicemonitor.schema.json (see its $comment)."""
    schema = json.loads((Path(__file__).parent / "schemas" /
                         "servicemonitor.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    monitor = yaml.safe_load((K8S / "servicemonitor.yaml").read_text())
    jsonschema.validate(monitor, schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema does refuse typos
        jsonschema.validate({**monitor, "spec": {**monitor["spec"], "endpoint": []}}, schema)


def test_kubernetes_objects_fit_together() -> None:
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in documents()}
    deployment = objects[("Deployment", "dnschaos")]
    service = objects[("Service", "dnschaos")]
    monitor = objects[("ServiceMonitor", "dnschaos")]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels
    assert service["spec"]["selector"].items() <= pod_labels
    monitor_labels = monitor["spec"]["selector"]["matchLabels"].items()
    assert monitor_labels <= service["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports
        assert ports[port["targetPort"]]["protocol"] == port["protocol"]
    assert {p["port"] for p in service["spec"]["ports"] if p["name"].startswith("dns")} == {53}
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    # Non-root, matching the image's user.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    # The scenarios ConfigMap is mounted as a directory (no subPath: updates reach the
    # pod) where the config's scenario_dir points, and every scenario in it is valid.
    config_map = objects[("ConfigMap", "dnschaos-config")]
    settings = load_model(config_map["data"]["dnschaos.yaml"], "dnschaos-config", Settings)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    def from_map(name: str) -> list[dict]:
        return [m for m in mounts.values()
                if volumes[m["name"]].get("configMap", {}).get("name") == name]

    scenario_mounts = from_map("dnschaos-scenarios")
    assert len(scenario_mounts) == 1 and "subPath" not in scenario_mounts[0]
    assert scenario_mounts[0]["mountPath"] == settings.scenario_dir
    config_mount = from_map("dnschaos-config")[0]
    env = {e["name"]: e for e in container["env"]}
    assert env["DNSCHAOS_CONFIG"]["value"] == config_mount["mountPath"]
    assert "secretKeyRef" in env["DNSCHAOS_ADMIN_TOKEN"]["valueFrom"]
    assert settings.admin.rsplit(":", 1)[1] == str(ports["admin"]["containerPort"])
    scenarios = objects[("ConfigMap", "dnschaos-scenarios")]["data"]
    assert scenarios
    for name, text in scenarios.items():
        scenario: Scenario = load_scenario_text(text, name)
        assert name == f"{scenario.name}.yaml"


def test_kubernetes_runs_a_fleet_without_a_single_point_of_failure() -> None:
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in documents()}
    deployment = objects[("Deployment", "dnschaos")]
    spec = deployment["spec"]
    pod = spec["template"]
    labels = pod["metadata"]["labels"].items()
    assert spec["replicas"] >= 2
    assert spec["strategy"] == {"type": "RollingUpdate",
                                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pdb = objects[("PodDisruptionBudget", "dnschaos")]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels
    spread = pod["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname",
                                                  "topology.kubernetes.io/zone"}
    assert all(c["labelSelector"]["matchLabels"].items() <= labels for c in spread)
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"  # not upstream health
    env = {e["name"]: e for e in container["env"]}
    control = env["DNSCHAOS_CONTROL"]["value"]
    assert control == "redis://:$(REDIS_PASSWORD)@dnschaos-redis.dnschaos.svc:6379/0"
    assert list(env).index("REDIS_PASSWORD") < list(env).index("DNSCHAOS_CONTROL")
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "dnschaos-redis"
    settings = Settings(control=control.replace("$(REDIS_PASSWORD)", "pw"),
                        upstreams=["10.96.0.10:53"])
    assert settings.control
    # The Redis it names: a Service selecting the Redis pod, its log on a volume.
    service = objects[("Service", "dnschaos-redis")]
    redis = objects[("Deployment", "dnschaos-redis")]["spec"]["template"]
    assert service["spec"]["selector"].items() <= redis["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == 6379
    args = redis["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert "--requirepass" in args
    claim = redis["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in objects
