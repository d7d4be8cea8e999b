"""Static checks of the deployment files: docker-compose.yml, deploy/Dockerfile, the
local-infra scripts and the Kafka pom.

Pure: nothing here needs Docker, a network or a running service. Docker cannot run on
our machines, so this is what keeps the compose file from rotting unnoticed.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
POM = ROOT / "deploy" / "local" / "kafka" / "pom.xml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def _depends_on(service: dict) -> list[str]:
    deps = service.get("depends_on", [])
    return list(deps) if isinstance(deps, (list, dict)) else []


def test_compose_has_the_four_services(services: dict) -> None:
    assert {"kafka", "redis", "worker", "collector"} <= set(services)


def test_compose_top_level_keys_are_known(compose: dict) -> None:
    known = {"name", "services", "volumes", "networks", "secrets", "configs", "include"}
    unknown = {k for k in compose if k not in known and not k.startswith("x-")}
    assert not unknown, f"unknown top-level keys in docker-compose.yml: {unknown}"


def test_every_service_has_image_or_build(services: dict) -> None:
    missing = [name for name, svc in services.items() if "image" not in svc and "build" not in svc]
    assert not missing, f"services without image or build: {missing}"


def test_depends_on_names_exist(services: dict) -> None:
    for name, svc in services.items():
        for dep in _depends_on(svc):
            assert dep in services, f"{name} depends on unknown service {dep!r}"
            assert dep != name


def test_depends_on_healthy_targets_have_healthchecks(services: dict) -> None:
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        if not isinstance(deps, dict):
            continue
        for dep, cond in deps.items():
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, but it has no healthcheck"


def test_build_contexts_and_dockerfiles_exist(services: dict) -> None:
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = ROOT / build.get("context", ".")
        assert context.is_dir(), f"{name}: build context {context} missing"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"


def test_named_volumes_are_declared(compose: dict, services: dict) -> None:
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} uses undeclared volume {source!r}"


def test_images_are_the_agreed_ones(services: dict) -> None:
    assert services["kafka"]["image"] == "apache/kafka:3.9.1"
    assert services["redis"]["image"].split(":")[0] == "redis"
    assert services["redis"]["image"].split(":")[1].startswith("7")


def test_app_services_point_at_the_compose_network(services: dict) -> None:
    for name, command, port in (("worker", "worker", 6066), ("collector", "collector", 8088)):
        svc = services[name]
        env = svc["environment"]
        assert env["CDP_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert env["CDP_REDIS_URL"] == "redis://redis:6379/0"
        assert svc["command"] == [command]
        assert any(str(p).split(":")[-1] == str(port) for p in svc["ports"]), f"{name} does not publish {port}"
        assert set(_depends_on(svc)) == {"kafka", "redis"}


def test_kafka_advertises_what_it_listens_on(services: dict) -> None:
    env = services["kafka"]["environment"]
    listeners = {item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")}
    advertised = {item.split("://")[0] for item in env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    protocol_map = {item.split(":")[0] for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")}
    assert advertised <= listeners
    assert listeners <= protocol_map
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_shape() -> None:
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert ("ENTRYPOINT", '["streamcdp"]') in instructions
    users = [arg for word, arg in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"


def test_dockerfile_copies_every_package_pyproject_includes() -> None:
    copied = set()
    for word, arg in _dockerfile_instructions():
        if word == "COPY":
            *sources, _dest = shlex.split(arg)
            for src in sources:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
                copied.add(src.rstrip("/"))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {re.sub(r"\*$", "", pattern) for pattern in includes}
    assert packages <= copied, f"Dockerfile does not copy {packages - copied}"
    assert "pyproject.toml" in copied


def test_kafka_pom_dependencies() -> None:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    root = ET.parse(POM).getroot()
    deps = {
        (d.findtext("m:groupId", namespaces=ns), d.findtext("m:artifactId", namespaces=ns)): d.findtext(
            "m:version", namespaces=ns
        )
        for d in root.findall("m:dependencies/m:dependency", ns)
    }
    assert deps == {
        ("org.apache.kafka", "kafka_2.13"): "3.9.1",
        ("org.slf4j", "slf4j-reload4j"): "1.7.36",
    }


@pytest.mark.parametrize("script", ["deploy/local/infra.sh", ".ci/run"])
def test_shell_scripts_parse(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
