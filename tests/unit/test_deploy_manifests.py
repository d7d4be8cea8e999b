"""Static checks of the monitoring and Kubernetes files: deploy/k8s, deploy/prometheus,
deploy/grafana and their services in docker-compose.yml.

Pure: no cluster, no Prometheus, no network. What is checked is what breaks
silently: a reference between manifests that points nowhere, a probe on the wrong
port, a metric name in a dashboard or alert that the code does not export (the
names come from the code's own metric classes, instantiated on fresh registries),
a runbook link to a heading that does not exist.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from streams.settings import Settings
from tests import monitoring_refs as refs
from tests.unit.test_deploy_files import _dockerfile_instructions

ROOT = refs.ROOT
K8S = ROOT / "deploy" / "k8s"
GRAFANA = ROOT / "deploy" / "grafana"
OPERATIONS = ROOT / "docs" / "operations.md"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
#: The configuration files the worker reads: setting variable → shipped file.
CONFIG_FILES = {
    "CDP_IDENTITY_RULES": "config/identity-rules.yaml",
    "CDP_MATCHING_CONFIG": "config/matching.yaml",
    "CDP_PROFILE_CONFIG": "config/profile.yaml",
    "CDP_COMPUTED_TRAITS": "config/computed-traits.yaml",
    "CDP_DESTINATIONS": "config/destinations.yaml",
}

STANDARD_KINDS = {
    ("v1", "Namespace"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"),
    ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
#: The port each streamcdp command serves on, from the settings' defaults.
COMMAND_PORTS = {"worker": Settings().web_port, "collector": Settings().collector_port}


# ------------------------------------------------------------------ loading


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml") and p.stem != "kustomization")


@pytest.fixture(scope="module")
def docs() -> list[tuple[str, dict]]:
    """(file name, document) of every Kubernetes object in deploy/k8s (multi-document safe)."""
    out = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _of_kind(docs, *kinds: str) -> list[dict]:
    return [doc for _, doc in docs if doc["kind"] in kinds]


def _by_name(docs, kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in _of_kind(docs, kind)}


def _containers(workload: dict) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def _template_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _command(container: dict) -> str:
    args = container.get("args") or container.get("command") or []
    return args[0] if args else ""


def _env(container: dict, docs) -> dict[str, str]:
    """The container's environment as Kubernetes builds it (envFrom, then env)."""
    configmaps, secrets = _by_name(docs, "ConfigMap"), _by_name(docs, "Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]].get("data", {}))
        if "secretRef" in source:
            env.update(secrets[source["secretRef"]["name"]].get("stringData", {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"].get("configMapKeyRef") or item["valueFrom"].get("secretKeyRef")
            source = configmaps.get(ref["name"]) or secrets.get(ref["name"]) or {}
            env[item["name"]] = {**source.get("data", {}), **source.get("stringData", {})}.get(ref["key"], "")
    return env


# ------------------------------------------------------------------ Kubernetes


def test_every_manifest_parses_with_a_standard_kind(docs) -> None:
    assert docs, "no manifests in deploy/k8s"
    for name, doc in docs:
        assert (doc.get("apiVersion"), doc.get("kind")) in STANDARD_KINDS, f"{name}: {doc.get('apiVersion')} {doc.get('kind')}"
        assert doc["metadata"].get("name"), f"{name}: metadata.name missing"


def test_names_are_unique_per_kind(docs) -> None:
    seen = set()
    for name, doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{name}: a second {key[0]} named {key[1]}"
        seen.add(key)


def test_kustomization_lists_exactly_the_files_present(kustomization: dict) -> None:
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    assert sorted(listed) == [p.name for p in _manifest_files()]


def test_one_namespace_for_everything(docs, kustomization: dict) -> None:
    [namespace] = _of_kind(docs, "Namespace")
    assert kustomization["namespace"] == namespace["metadata"]["name"]
    for name, doc in docs:
        assert doc["metadata"].get("namespace", kustomization["namespace"]) == kustomization["namespace"], name


def test_kustomization_image_is_the_one_the_workloads_use(docs, kustomization: dict) -> None:
    names = {image["name"] for image in kustomization.get("images", [])}
    for workload in _of_kind(docs, *WORKLOAD_KINDS):
        for container in _containers(workload):
            assert container["image"].split(":")[0] in names, f"{container['name']}: image not set by kustomization"


def test_every_config_reference_exists(docs) -> None:
    configmaps, secrets = _by_name(docs, "ConfigMap"), _by_name(docs, "Secret")

    def keys(source: dict) -> set[str]:
        return set(source.get("data", {})) | set(source.get("stringData", {}))

    checked = 0
    for workload in _of_kind(docs, *WORKLOAD_KINDS):
        where = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        for container in _containers(workload):
            for source in container.get("envFrom", []):
                for field, known in (("configMapRef", configmaps), ("secretRef", secrets)):
                    if field in source and not source[field].get("optional"):
                        assert source[field]["name"] in known, f"{where}: {field} {source[field]['name']} does not exist"
                        checked += 1
            for item in container.get("env", []):
                for field, known in (("configMapKeyRef", configmaps), ("secretKeyRef", secrets)):
                    ref = item.get("valueFrom", {}).get(field)
                    if ref is None or ref.get("optional"):
                        continue
                    assert ref["name"] in known, f"{where}: {item['name']} refers to missing {field} {ref['name']}"
                    assert ref["key"] in keys(known[ref["name"]]), f"{where}: {ref['name']} has no key {ref['key']}"
                    checked += 1
        for volume in pod.get("volumes", []):
            for field, known, name_key in (("configMap", configmaps, "name"), ("secret", secrets, "secretName")):
                if field in volume and not volume[field].get("optional"):
                    name = volume[field][name_key]
                    assert name in known, f"{where}: volume {volume['name']} uses missing {field} {name}"
                    for item in volume[field].get("items", []):
                        assert item["key"] in keys(known[name]), f"{where}: {name} has no key {item['key']}"
                    checked += 1
    assert checked >= 4


def test_volume_mounts_use_declared_volumes(docs) -> None:
    for workload in _of_kind(docs, *WORKLOAD_KINDS):
        declared = {v["name"] for v in workload["spec"]["template"]["spec"].get("volumes", [])}
        for container in _containers(workload):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in declared, f"{workload['metadata']['name']}: mount of undeclared {mount['name']}"


def test_workload_selectors_match_their_pod_labels(docs) -> None:
    workloads = _of_kind(docs, *WORKLOAD_KINDS)
    assert {_command(c) for w in workloads for c in _containers(w)} == set(COMMAND_PORTS)
    for workload in workloads:
        selector = workload["spec"]["selector"]["matchLabels"]
        assert _selects(selector, _template_labels(workload)), workload["metadata"]["name"]
    for a in workloads:  # no workload's selector catches another's pods
        for b in workloads:
            if a is not b:
                assert not _selects(a["spec"]["selector"]["matchLabels"], _template_labels(b))


def test_services_select_their_pods_and_ports(docs) -> None:
    workloads = _of_kind(docs, *WORKLOAD_KINDS)
    services = _of_kind(docs, "Service")
    commands_served = set()
    for service in services:
        selected = [w for w in workloads if _selects(service["spec"]["selector"], _template_labels(w))]
        assert len(selected) == 1, f"service {service['metadata']['name']} selects {len(selected)} workloads"
        [container] = selected[0]["spec"]["template"]["spec"]["containers"]
        ports = {p.get("name") for p in container["ports"]} | {p["containerPort"] for p in container["ports"]}
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in ports, f"{service['metadata']['name']}: targetPort not a container port"
        commands_served.add(_command(container))
    assert "collector" in commands_served, "no Service selects the collector pods"


def test_pod_disruption_budgets_select_existing_pods(docs) -> None:
    workloads = _of_kind(docs, *WORKLOAD_KINDS)
    budgets = _of_kind(docs, "PodDisruptionBudget")
    assert budgets
    covered = set()
    for pdb in budgets:
        spec = pdb["spec"]
        selected = [w for w in workloads if _selects(spec["selector"]["matchLabels"], _template_labels(w))]
        assert len(selected) == 1, f"PDB {pdb['metadata']['name']} selects {len(selected)} workloads"
        assert ("minAvailable" in spec) != ("maxUnavailable" in spec)
        if isinstance(spec.get("minAvailable"), int):
            assert spec["minAvailable"] < selected[0]["spec"]["replicas"], "a PDB that blocks every drain"
        covered.add(_command(selected[0]["spec"]["template"]["spec"]["containers"][0]))
    assert "worker" in covered


def test_probes_point_at_the_health_routes_on_the_container_port(docs) -> None:
    for workload in _of_kind(docs, *WORKLOAD_KINDS):
        [container] = workload["spec"]["template"]["spec"]["containers"]
        command = _command(container)
        [port] = container["ports"]
        assert port["containerPort"] == COMMAND_PORTS[command], f"{command} listens on {COMMAND_PORTS[command]}"
        names = {port.get("name"), port["containerPort"]}
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in container:
                assert container[probe]["httpGet"]["port"] in names, f"{command} {probe} on another port"


def test_ports_agree_with_the_env_configmap(docs) -> None:
    for workload in _of_kind(docs, *WORKLOAD_KINDS):
        [container] = workload["spec"]["template"]["spec"]["containers"]
        settings = Settings.from_env(_env(container, docs))
        port = container["ports"][0]["containerPort"]
        expected = settings.web_port if _command(container) == "worker" else settings.collector_port
        assert port == expected
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true"
        assert annotations.get("prometheus.io/port") == str(port)
        assert annotations.get("prometheus.io/path") == "/metrics"


def test_containers_run_a_streamcdp_command() -> None:
    from streamcdp.cli import _parser

    for command in COMMAND_PORTS:
        assert getattr(_parser().parse_args([command]), "run", None), command


def test_resources_are_requested_and_limited(docs) -> None:
    units = {"m": 0.001, "": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}

    def quantity(text) -> float:
        number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(text)).groups()
        return float(number) * units[unit]

    for workload in _of_kind(docs, *WORKLOAD_KINDS):
        for container in _containers(workload):
            resources = container["resources"]
            for resource in ("cpu", "memory"):
                request = quantity(resources["requests"][resource])
                limit = quantity(resources["limits"][resource])
                assert 0 < request <= limit, f"{container['name']} {resource}"


def test_pods_run_as_the_images_user_with_a_grace_period(docs) -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    uid = int(re.search(r"--uid\s+(\d+)", dockerfile).group(1))
    for workload in _of_kind(docs, *WORKLOAD_KINDS):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        assert pod["terminationGracePeriodSeconds"] >= 30
        for container in _containers(workload):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def _identity_rules(document, source):
    from agents.identity.rules import IdentityRules

    return IdentityRules.parse(document, source=source)


def _matching(document, source):
    from agents.identity.fuzzy import MatchConfig

    return MatchConfig.parse(document, source=source)


def _profile(document, source):
    from agents.profiles.computed import ComputedTraits
    from agents.profiles.model import ProfileModel

    return ProfileModel.parse(document, ComputedTraits([]), source=source)


def _computed(document, source):
    from agents.profiles.computed import ComputedTraits

    return ComputedTraits.parse(document, source=source)


def _destinations(document, source):
    from agents.activation.destinations import Destinations

    return Destinations.parse(document, source=source)


_PARSERS = {
    "CDP_IDENTITY_RULES": _identity_rules,
    "CDP_MATCHING_CONFIG": _matching,
    "CDP_PROFILE_CONFIG": _profile,
    "CDP_COMPUTED_TRAITS": _computed,
    "CDP_DESTINATIONS": _destinations,
}


def test_every_config_setting_has_a_parser() -> None:
    from streams import settings as settings_module

    variables = {variable for variable, _ in settings_module._ENV.values()}
    assert set(CONFIG_FILES) <= variables and set(_PARSERS) == set(CONFIG_FILES)


@pytest.mark.parametrize(
    ("variable", "shipped", "parse"),
    [(variable, shipped, _PARSERS[variable]) for variable, shipped in CONFIG_FILES.items()],
)
def test_config_files_are_mounted_where_the_worker_looks(docs, variable, shipped, parse) -> None:
    [worker] = [w for w in _of_kind(docs, *WORKLOAD_KINDS) if _command(w["spec"]["template"]["spec"]["containers"][0]) == "worker"]
    [container] = worker["spec"]["template"]["spec"]["containers"]
    path = Path(_env(container, docs)[variable])
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    configmap = _by_name(docs, "ConfigMap")[volumes[mount["name"]]["configMap"]["name"]]
    content = configmap["data"][path.name]
    # The same as the shipped file, and valid for the worker.
    assert yaml.safe_load(content) == yaml.safe_load((ROOT / shipped).read_text()), (
        f"ConfigMap {configmap['metadata']['name']} differs from {shipped}: copy the file into it"
    )
    parse(yaml.safe_load(content), f"configmap {configmap['metadata']['name']}")


def test_the_image_points_every_config_setting_at_the_shipped_file() -> None:
    """Installed with pip, the package does not find the repository's config/; the
    image (docker compose's worker, `docker run`) must point each setting at its copy,
    or the worker runs on built-in defaults (no destinations at all)."""
    copies: dict[str, str] = {}
    env: dict[str, str] = {}
    for word, arg in _dockerfile_instructions():
        if word == "COPY":
            *sources, target = shlex.split(arg)
            for source in sources:
                copies[target.rstrip("/")] = source.rstrip("/")
        elif word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(arg))
    for variable, shipped in CONFIG_FILES.items():
        assert variable in env, f"the image does not set {variable}"
        directory, name = env[variable].rsplit("/", 1)
        assert directory in copies, f"{variable}={env[variable]}: the image copies nothing to {directory}"
        assert f"{copies[directory]}/{name}" == shipped, f"{variable} points at {copies[directory]}/{name}, not {shipped}"
        assert (ROOT / shipped).is_file()


def test_env_configmap_holds_valid_settings(docs) -> None:
    from streams import settings as settings_module
    from streamcdp.collector import auth

    known = {variable for variable, _ in settings_module._ENV.values()}
    known |= {auth.ENV_KEYS, auth.ENV_KEYS_FILE, auth.ENV_ALLOW_ANONYMOUS}
    [env] = [cm for cm in _of_kind(docs, "ConfigMap") if any(k.startswith("CDP_") for k in cm.get("data", {}))]
    data = env["data"]
    assert set(data) <= known, f"unknown variables: {set(data) - known}"
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    Settings.from_env(data)  # raises ConfigError naming a bad value


def test_secret_example_is_marked_and_usable(docs) -> None:
    from streamcdp.collector.auth import parse_keys_env

    for secret in _of_kind(docs, "Secret"):
        values = secret["stringData"]
        assert values, "the example Secret has no values"
        assert all("REPLACE-ME" in value for value in values.values()), "example values must say to replace them"
        parse_keys_env(values["CDP_WRITE_KEYS"])
    text = (K8S / "secret-example.yaml").read_text()
    assert "EXAMPLE ONLY" in text


# ------------------------------------------------------------------ metric names


def _known_series() -> set[str]:
    return set(refs.worker_series()) | set(refs.collector_series()) | refs.PROMETHEUS_SERIES


def test_promql_name_extraction() -> None:
    expr = 'histogram_quantile(0.99, sum by (le, op) (rate(cdp_a_bucket{instance=~"$w"}[$__rate_interval]))) > 2.5'
    assert refs.promql_metric_names(expr) == {"cdp_a_bucket"}
    expr = 'sum by (reason) (rate(x_total[5m])) / on() group_left() (sum(rate(y_total[5m])) + 1e-9) and up{job="j"} == 0'
    assert refs.promql_metric_names(expr) == {"x_total", "y_total", "up"}
    assert refs.template_query_metric_names("label_values(cdp_worker_ready, instance)") == {"cdp_worker_ready"}


def test_code_exports_the_readme_metrics() -> None:
    worker = set(refs.worker_series())
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(cdp_[a-z_]+)", section))
    assert listed, "README lists no metrics"
    families = {refs.worker_series()[name] for name in worker}
    for name in listed:
        assert name in worker or name in families, f"README lists {name}, which the worker does not export"


def _exported_metrics() -> dict[str, tuple[str, set[str]]]:
    """Series name (counters with ``_total``) → (type, label names) of every metric the
    worker and the collector define."""
    from streamcdp.collector.metrics import CollectorMetrics
    from streams.metrics import Metrics

    out = {}
    for metrics in (Metrics(CollectorRegistry()), CollectorMetrics(CollectorRegistry())):
        for value in vars(metrics).values():
            if isinstance(value, MetricWrapperBase):
                name = value._name + ("_total" if value._type == "counter" else "")  # noqa: SLF001
                out[name] = (value._type, set(value._labelnames))  # noqa: SLF001
    return out


def _documented_metrics() -> dict[str, tuple[str, set[str]]]:
    section = OPERATIONS.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*`(cdp_[a-z_]+)`\s*\|\s*(\w+)\s*\|([^|]*)\|", section, re.M)
    names = [name for name, _, _ in rows]
    assert len(names) == len(set(names)), "a metric is listed twice in docs/operations.md"
    return {name: (kind, set(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def test_operations_lists_every_metric_with_its_type_and_labels() -> None:
    exported, documented = _exported_metrics(), _documented_metrics()
    assert len(exported) >= 35
    assert sorted(set(exported) - set(documented)) == [], "metrics missing from the table in docs/operations.md"
    assert sorted(set(documented) - set(exported)) == [], "docs/operations.md lists metrics nothing exports"
    for name, (kind, labels) in exported.items():
        assert documented[name] == (kind, labels), f"{name}: the code has {kind} {sorted(labels)}, the table {documented[name]}"


# ------------------------------------------------------------------ Prometheus


@pytest.fixture(scope="module")
def prometheus() -> dict:
    return yaml.safe_load(refs.PROMETHEUS_CONFIG.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _scrape_targets(job: dict) -> set[str]:
    targets = set()
    for config in job.get("static_configs", []):
        targets |= set(config["targets"])
    for config in job.get("dns_sd_configs", []):
        targets |= {f"{name}:{config['port']}" for name in config["names"]}
    return targets


def test_prometheus_scrapes_the_worker_and_collector_services(prometheus: dict, compose: dict) -> None:
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    services = compose["services"]
    for job_name, service, port in (("streamcdp-worker", "worker", 6066), ("streamcdp-collector", "collector", 8088)):
        job = jobs[job_name]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert _scrape_targets(job) == {f"{service}:{port}"}
        assert service in services
        env = services[service]["environment"]
        configured = env["CDP_WEB_PORT"] if service == "worker" else env["CDP_COLLECTOR_PORT"]
        assert int(configured) == port
    for rule_file in prometheus["rule_files"]:
        assert (refs.PROMETHEUS_CONFIG.parent / rule_file).is_file(), rule_file


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            anchors.add(re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def _jobs_in(expr: str) -> set[str]:
    return set(re.findall(r'\bjob\s*=\s*"([^"]+)"', expr))


def test_alert_rules_are_complete_and_use_existing_metrics(prometheus: dict) -> None:
    rules = refs.alert_rules()
    known, anchors = _known_series(), _anchors(OPERATIONS.read_text())
    jobs = {job["job_name"] for job in prometheus["scrape_configs"]}
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        name = rule["alert"]
        used = refs.promql_metric_names(rule["expr"])
        assert used, f"{name}: no metric found in its expression"
        assert used <= known, f"{name} uses {used - known}, which nothing exports"
        assert _jobs_in(rule["expr"]) <= jobs, f"{name}: a job Prometheus does not scrape"
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: needs a 'for' duration"
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        url = annotations["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page.endswith("docs/operations.md"), f"{name}: runbook_url must point into docs/operations.md"
        assert anchor in anchors, f"{name}: docs/operations.md has no heading for #{anchor}"


def test_the_alerts_the_issue_asks_for_exist() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in refs.alert_rules()}
    wanted = {
        "cdp_consumer_lag_events": "lag growing",
        "cdp_dead_letters_total": "dead-letter rate",
        "cdp_event_latency_seconds_bucket": "p99 latency",
        "cdp_redis_errors_total": "Redis errors",
        "cdp_worker_ready": "worker not ready",
        "up": "worker down",
        "cdp_collector_requests_total": "collector 5xx",
    }
    wanted |= {
        "cdp_segment_change_latency_seconds_bucket": "segment-change p99 latency",
        "cdp_segment_expiry_delay_seconds": "segment timer falling behind",
        "cdp_kafka_produce_errors_total": "produce errors (activation delivery among them)",
    }
    used = set().union(*(refs.promql_metric_names(e) for e in exprs.values()))
    for metric, what in wanted.items():
        assert metric in used, f"no alert for {what} ({metric})"
    assert "histogram_quantile(0.99" in " ".join(exprs.values())
    assert 'topic=~"cdp\\\\.activations\\\\..+"' in exprs["StreamcdpActivationDeliveryErrors"]
    assert 'topic!~"cdp\\\\.activations\\\\..+"' in exprs["StreamcdpKafkaProduceErrors"], "two alerts for one error"


def test_alert_rule_tests_name_existing_alerts() -> None:
    """deploy/prometheus/alerts_test.yml (run with promtool) tests these rules and
    only alerts that exist; every alert whose expression is more than a threshold
    on one metric has a test there."""
    document = yaml.safe_load(ALERT_TESTS.read_text())
    assert document["rule_files"] == [refs.ALERTS.name]
    tested = {case["alertname"] for test in document["tests"] for case in test["alert_rule_test"]}
    alerts = {rule["alert"] for rule in refs.alert_rules()}
    assert tested <= alerts, f"alerts_test.yml tests unknown alerts: {tested - alerts}"
    assert {"StreamcdpActivationDeliveryErrors", "StreamcdpKafkaProduceErrors", "StreamcdpSegmentChangeLatencyP99High",
            "StreamcdpSegmentTimerBehind", "StreamcdpSegmentBackfillStalled"} <= tested


# ------------------------------------------------------------------ Grafana


def test_dashboard_shape() -> None:
    board = refs.dashboard()
    assert board["uid"] and board["title"]
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = list(refs._panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = {p["title"] for p in panels if p["type"] == "row"}
    for wanted in ("Throughput", "Dead letters", "Latency", "Identity", "Segments", "Activation and privacy", "Redis",
                   "Kafka consumer lag", "Worker readiness", "Collector"):
        assert wanted in rows, f"no row {wanted!r}"
    occupied: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for dx in range(grid["w"]):
            for dy in range(grid["h"]):
                cell = (grid["x"] + dx, grid["y"] + dy)
                assert cell not in occupied, f"{panel['title']!r} overlaps {occupied[cell]!r}"
                occupied[cell] = panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], f"{panel['title']} has no query"
            for target in panel["targets"]:
                assert target.get("datasource", panel["datasource"])["uid"] == "${DS_PROMETHEUS}"


def test_dashboard_uses_only_metrics_the_code_exports(prometheus: dict) -> None:
    known = _known_series()
    jobs = {job["job_name"] for job in prometheus["scrape_configs"]}
    exprs = refs.dashboard_exprs()
    assert len(exprs) >= 20
    for title, expr in exprs:
        used = refs.promql_metric_names(expr)
        assert used, f"{title}: no metric found in {expr}"
        assert used <= known, f"{title} uses {used - known}, which nothing exports"
        assert _jobs_in(expr) <= jobs, f"{title}: a job Prometheus does not scrape"
    for name, query in refs.dashboard_variable_queries():
        used = refs.template_query_metric_names(query)
        assert used <= known, f"variable {name} uses {used - known}"


def test_dashboard_shows_every_metric_the_issue_names() -> None:
    used = refs.dashboard_metric_names()
    for metric in (
        "cdp_events_consumed_total", "cdp_events_produced_total", "cdp_events_processed_total",
        "cdp_dead_letters_total", "cdp_event_latency_seconds_bucket", "cdp_stage_duration_seconds_bucket",
        "cdp_identity_merges_total", "cdp_identity_merges_blocked_total", "cdp_identity_conflicts_total",
        "cdp_redis_call_duration_seconds_bucket", "cdp_redis_errors_total", "cdp_consumer_lag_events",
        "cdp_worker_ready", "up", "cdp_collector_requests_total", "cdp_collector_events_received_total",
        "cdp_collector_request_duration_seconds_bucket",
        # segments, activation and privacy
        "cdp_segment_transitions_total", "cdp_segment_change_latency_seconds_bucket",
        "cdp_segment_expiry_delay_seconds", "cdp_segment_expiry_backlog_profiles", "cdp_segment_backfills_running",
        "cdp_segment_backfill_profiles_total", "cdp_activations_total", "cdp_activations_consent_blocked_total",
        "cdp_events_suppressed_total", "cdp_privacy_requests_total", "cdp_profiles_deleted_total",
    ):
        assert metric in used, f"the dashboard does not show {metric}"


def test_dashboard_queries_follow_the_instance_variables() -> None:
    """Every selector of a streamcdp metric narrows to the chosen instances, as the
    worker and collector variables promise."""
    worker, collector = set(refs.worker_series()), set(refs.collector_series())
    for title, expr in refs.dashboard_exprs():
        for name, matchers in re.findall(r"\b(cdp_[a-z_]+)(\{[^}]*\})?", expr):
            variable = "$worker" if name in worker else "$collector" if name in collector else None
            assert variable, f"{title}: {name} is neither the worker's nor the collector's"
            assert f'instance=~"{variable}"' in matchers, f"{title}: {name} without instance=~\"{variable}\""


def test_dashboard_rows_keep_their_panels_together() -> None:
    """Panels sit below their row and above the next one (the file's order is the
    screen's), so a row collapsed or moved in Grafana takes the right panels along."""
    panels = refs.dashboard()["panels"]
    row_y = None
    last_y = -1
    for panel in panels:
        y = panel["gridPos"]["y"]
        assert y >= last_y, f"{panel['title']!r} is above the panel before it in the file"
        if panel["type"] == "row":
            row_y = y
        else:
            assert row_y is not None and y > row_y, f"{panel['title']!r} is not below its row"
        last_y = y


# ------------------------------------------------------------------ compose


def _bind_mounts(service: dict) -> list[tuple[Path, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":") if isinstance(volume, str) else (volume["source"], ":", volume["target"])
        if source.startswith((".", "/")):
            mounts.append(((ROOT / source).resolve(), rest.split(":")[0]))
    return mounts


def test_compose_runs_prometheus_and_grafana_on_existing_files(compose: dict) -> None:
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        service = services[name]
        image, _, tag = service["image"].partition(":")
        assert tag and tag != "latest", f"{name}: pin the image version"
        mounts = _bind_mounts(service)
        assert mounts, f"{name} mounts nothing from the repository"
        for source, _target in mounts:
            assert source.exists(), f"{name} mounts {source}, which does not exist"


def test_compose_prometheus_reads_this_config(compose: dict) -> None:
    service = compose["services"]["prometheus"]
    flags = dict(arg.split("=", 1) for arg in service["command"] if arg.startswith("--") and "=" in arg)
    config_in_container = flags["--config.file"]
    visible = {}
    for source, target in _bind_mounts(service):
        if source.is_dir():
            for path in source.rglob("*"):
                visible[str(Path(target) / path.relative_to(source))] = path
        else:
            visible[target] = source
    assert visible.get(config_in_container) == refs.PROMETHEUS_CONFIG.resolve()
    for rule_file in yaml.safe_load(refs.PROMETHEUS_CONFIG.read_text())["rule_files"]:
        assert str(Path(config_in_container).parent / rule_file) in visible


def test_compose_grafana_provisions_the_dashboard_and_datasource(compose: dict) -> None:
    service = compose["services"]["grafana"]
    mounts = {target: source for source, target in _bind_mounts(service)}
    env = service["environment"]
    assert str(env["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"

    datasources = mounts["/etc/grafana/provisioning/datasources"]
    [source] = [d for f in sorted(datasources.glob("*.y*ml")) for d in yaml.safe_load(f.read_text())["datasources"]]
    assert source["type"] == "prometheus"
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)/?", source["url"]).groups()
    assert host in compose["services"] and any(p.endswith(f":{port}") for p in compose["services"][host]["ports"])

    providers_dir = mounts["/etc/grafana/provisioning/dashboards"]
    [provider] = [p for f in sorted(providers_dir.glob("*.y*ml")) for p in yaml.safe_load(f.read_text())["providers"]]
    dashboards_dir = provider["options"]["path"]
    mounted = {target: source for target, source in mounts.items() if str(Path(target).parent) == dashboards_dir}
    assert refs.DASHBOARD.resolve() in mounted.values(), "the dashboard is not in the provider's folder"
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] in mounted


def test_provisioning_files_parse() -> None:
    files = sorted((GRAFANA / "provisioning").rglob("*.y*ml"))
    assert len(files) >= 2
    for path in files:
        assert yaml.safe_load(path.read_text())["apiVersion"] == 1, path


