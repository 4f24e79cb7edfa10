"""deploy/k8s/, docker-compose.yml and deploy/otel-collector.yaml, checked
without a cluster or a Docker engine: every Kubernetes manifest against the
OpenAPI schemas that kubernetes-validate ships (strict: unknown fields fail),
the compose file against the compose-spec schema that check-jsonschema ships,
and the essentials of each: gRPC health probes, resources, a non-root
security context, credentials from the Secret, a configuration that
cachecoord itself loads."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from kubelet_env import service as a_service
from kubelet_env import service_links

from cachecoord.config import Kind, load

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
COLLECTOR = ROOT / "deploy" / "otel-collector.yaml"
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# Native gRPC probes are GA from Kubernetes 1.27; the newest schemas shipped too.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
GRPC_PORT = 50051
INSTANCES = ("cachecoord-1", "cachecoord-2")

Doc = dict[str, Any]


def _manifests() -> list[tuple[str, Doc]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _kustomization() -> Doc:
    kustomization: Doc = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return kustomization


def _configmap() -> Doc:
    """The ConfigMap that kustomization.yaml generates (before its hash suffix)."""
    (generator,) = _kustomization()["configMapGenerator"]
    return {
        "metadata": {"name": generator["name"]},
        "data": {name: (K8S / name).read_text() for name in generator["files"]},
    }


def _pod_environ(container: Doc) -> dict[str, str]:
    """The environment the server sees in a pod, as the kubelet builds it: the
    image's ENV, the service links of every Service in the namespace (ours, and
    backends a user may well call cachecoord-redis and cachecoord-postgres),
    then the container's env (Secret values, literals, the pod name)."""
    secret = _one("Secret")["stringData"]
    services = [doc for _, doc in _manifests() if doc["kind"] == "Service"]
    services += [a_service("cachecoord-redis", 6379), a_service("cachecoord-postgres", 5432)]
    environ = {"CACHECOORD_SERVER_LISTEN": _image_env("CACHECOORD_SERVER_LISTEN")}
    environ |= service_links(services)
    for var in container["env"]:
        source = var.get("valueFrom", {})
        if "secretKeyRef" in source:
            environ[var["name"]] = secret[source["secretKeyRef"]["key"]]
        elif "fieldRef" in source:
            environ[var["name"]] = "cachecoord-7d9f-abcde"
        else:
            environ[var["name"]] = var["value"]
    return environ


def _one(kind: str) -> Doc:
    found = [doc for _, doc in _manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container() -> Doc:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Doc = containers[0]
    return container


def _image_env(name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", DOCKERFILE)
    assert match, f"the Dockerfile sets no {name}"
    return match.group(1)


# Kubernetes


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    for name, doc in _manifests():
        if doc["kind"] == "Kustomization":
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "cachecoord", name


def test_schema_validation_rejects_a_misspelled_field() -> None:
    deployment = copy.deepcopy(_one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    listed = set(_kustomization()["resources"])
    examples = {p.name for p in K8S.glob("*.example.yaml")}
    assert examples == {"secret.example.yaml"}
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} - examples


def test_a_configuration_change_rolls_the_pods() -> None:
    # The generated ConfigMap's name carries a hash of its content (kustomize's
    # default), and the pods mount it by that name.
    generator = _kustomization()["configMapGenerator"][0]
    assert generator.get("options", {}).get("disableNameSuffixHash") is not True
    for kind in ("Deployment", "Job"):
        volumes = _one(kind)["spec"]["template"]["spec"]["volumes"]
        assert {"name": "config", "configMap": {"name": generator["name"]}} in volumes, kind


def test_probes_are_grpc_health_on_the_serving_port() -> None:
    container = _container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # service unset: the server's overall health, NOT_SERVING while draining.
        assert container[probe]["grpc"] == {"port": GRPC_PORT}, probe
        assert not {"httpGet", "tcpSocket", "exec"} & set(container[probe]), probe


def test_resources_are_requested_and_memory_is_limited() -> None:
    resources = _container()["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_pods_run_as_non_root_without_privileges() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(
        re.findall(r"^USER (\d+)", DOCKERFILE, re.M)[-1]
    )
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    container = _container()["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container["capabilities"]["drop"] == ["ALL"]


def test_backend_credentials_come_from_the_secret() -> None:
    secret = _one("Secret")
    env = {e["name"]: e for e in _container()["env"]}
    for var in ("CACHECOORD_POSTGRES_URL", "CACHECOORD_REDIS_URL"):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    config = tomllib.loads(_configmap()["data"]["cachecoord.toml"])
    for section in ("redis", "postgres"):
        assert "url" not in config.get(section, {}), "backend URLs belong in the Secret"


def test_configmap_is_a_valid_cachecoord_configuration(tmp_path: Path) -> None:
    deployment = _one("Deployment")["spec"]["template"]["spec"]
    container = _container()
    configmap = _configmap()
    # Mounted where the image looks for it.
    (volume,) = [v for v in deployment["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    (key,) = configmap["data"]
    assert f"{mount['mountPath']}/{key}" == _image_env("CACHECOORD_CONFIG")

    # Service links are off, and the server would ignore them anyway.
    assert deployment["enableServiceLinks"] is False
    environ = _pod_environ(container)
    assert {"CACHECOORD_PORT", "CACHECOORD_REDIS_SERVICE_HOST"} <= environ.keys()
    path = tmp_path / key
    path.write_text(configmap["data"][key])
    settings = load(path, environ)
    assert settings.server.listen.rsplit(":", 1)[1] == str(GRPC_PORT)
    assert settings.server.instance_id == "cachecoord-7d9f-abcde"
    assert settings.namespaces, "the ConfigMap configures no namespace"
    # SIGTERM comes after the preStop hook; the drain must end before SIGKILL.
    pre_stop_s = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace_s = settings.server.shutdown_grace / 1000
    assert pre_stop_s + grace_s < deployment["terminationGracePeriodSeconds"]


def test_a_job_installs_the_triggers_of_mapped_namespaces(tmp_path: Path) -> None:
    job = _one("Job")["spec"]["template"]["spec"]
    (container,) = job["containers"]
    assert container["image"] == _container()["image"]
    assert container["command"][:3] == ["cachecoord", "triggers", "install"]
    assert job["enableServiceLinks"] is False
    assert container["volumeMounts"][0]["mountPath"] == "/etc/cachecoord"
    path = tmp_path / "cachecoord.toml"
    path.write_text(_configmap()["data"]["cachecoord.toml"])
    settings = load(path, _pod_environ(container))
    (namespace,) = container["command"][3:]
    assert settings.namespaces[namespace].kind is Kind.MAPPED


def test_services_autoscaler_and_budget_select_the_deployment() -> None:
    deployment = _one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    services = [doc for _, doc in _manifests() if doc["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"cachecoord", "cachecoord-headless"}
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        (port,) = service["spec"]["ports"]
        assert (port["port"], port["targetPort"], port["appProtocol"]) == (
            GRPC_PORT,
            "grpc",
            "grpc",
        )
    hpa = _one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["minReplicas"] >= 2
    assert hpa["maxReplicas"] > hpa["minReplicas"]
    pdb = _one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()


# docker-compose.yml and the collector


def _compose() -> Doc:
    compose: Doc = yaml.safe_load(COMPOSE.read_text())
    return compose


def test_compose_file_follows_the_compose_spec() -> None:
    checker = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", COMPOSE],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_two_health_checked_instances_on_the_backends(tmp_path: Path) -> None:
    services = _compose()["services"]
    assert {"redis", "postgres", "otel-collector", *INSTANCES} <= set(services)
    copied = re.search(r"^COPY deploy/healthcheck\.py (\S+)$", DOCKERFILE, re.M)
    assert copied, "the Dockerfile does not copy deploy/healthcheck.py"
    host_ports = []
    for name in INSTANCES:
        service = services[name]
        assert service["healthcheck"]["test"][:3] == ["CMD", "python", copied.group(1)], name
        for backend in ("redis", "postgres"):
            assert service["depends_on"][backend]["condition"] == "service_healthy", name
            assert "healthcheck" in services[backend], backend
        env = service["environment"]
        for var, backend in (
            ("CACHECOORD_REDIS_URL", "redis"),
            ("CACHECOORD_POSTGRES_URL", "postgres"),
        ):
            assert urlsplit(env[var]).hostname == backend, var
        otlp = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert otlp.hostname == "otel-collector"
        assert f"{otlp.port}:{otlp.port}" in services["otel-collector"]["ports"]
        (published,) = service["ports"]
        host, container = published.split(":")
        assert int(container) == GRPC_PORT
        host_ports.append(host)
        # The image's configuration, with this service's environment.
        path = tmp_path / f"{name}.toml"
        path.write_text((ROOT / "examples" / "cachecoord.toml").read_text())
        settings = load(path, {k: v for k, v in env.items() if k.startswith("CACHECOORD_")})
        assert settings.server.instance_id == name
        assert settings.server.listen == f"0.0.0.0:{GRPC_PORT}"
    assert len(set(host_ports)) == len(host_ports), "two instances publish the same host port"
    assert "COPY examples/cachecoord.toml /etc/cachecoord/cachecoord.toml" in DOCKERFILE


def test_compose_bind_mounts_exist() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).is_file(), f"{name} mounts missing {source}"
    postgres_init = [v for v in _compose()["services"]["postgres"]["volumes"] if "initdb" in v]
    assert postgres_init == ["./examples/schema.sql:/docker-entrypoint-initdb.d/10-schema.sql:ro"]


def test_collector_pipelines_use_only_defined_components() -> None:
    collector = yaml.safe_load(COLLECTOR.read_text())
    assert collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    pipelines = collector["service"]["pipelines"]
    assert {"traces", "metrics", "logs"} <= set(pipelines)
    for name, pipeline in pipelines.items():
        for part in ("receivers", "processors", "exporters"):
            missing = set(pipeline.get(part, [])) - set(collector.get(part, {}))
            assert not missing, f"pipeline {name} uses undefined {part}: {missing}"


def test_dockerfile_health_check_runs_the_grpc_health_script() -> None:
    assert re.search(
        r'^HEALTHCHECK .*\\\n\s+CMD \["python", "/opt/cachecoord/healthcheck\.py"', DOCKERFILE, re.M
    )


def _copy_from_head(source: str, context: Path) -> None:
    """*source* (a file or folder) as committed, into the build *context*."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "HEAD", source], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(context)], input=archive.stdout, check=True)


INSTALLED = """import importlib.metadata as m, json
print(json.dumps({d.metadata["Name"].lower().replace("_", "-"): d.version
                  for d in m.distributions()}))"""


def test_image_installs_exactly_the_locked_set_without_the_dev_tools(tmp_path: Path) -> None:
    # The Dockerfile's build stage without Docker: its COPY sources into a
    # context, then its `uv sync` lines, with the uv version it installs.
    uv_version = re.search(r"pip install --no-cache-dir uv==(\S+)", DOCKERFILE)
    assert uv_version, "the Dockerfile installs no pinned uv"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["uv"]["required-version"] == f"=={uv_version.group(1)}"
    uv = ROOT / "tools" / "uv" / "bin" / "uv"
    assert uv.exists(), "run `make install`"
    build = DOCKERFILE.split("\nFROM ", 2)[1]
    context = tmp_path / "src"
    context.mkdir()
    for sources in re.findall(r"^COPY (?!--from)(.+) /src/\S*$", build, re.M):
        for source in sources.split():
            _copy_from_head(source, context)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["UV_PROJECT_ENVIRONMENT"] = str(venv)
    syncs = re.findall(r"^RUN (uv sync .+)$", build, re.M)
    assert syncs, "the Dockerfile does not install with uv sync"
    for sync in syncs:
        assert "--locked" in sync.split(), sync
        argv = [str(uv), *sync.split()[1:], "--python", sys.executable, "--quiet"]
        subprocess.run(argv, cwd=context, env=env, check=True, timeout=300)
    listing = subprocess.run(
        [venv / "bin" / "python", "-c", INSTALLED], capture_output=True, text=True, check=True
    )
    installed = json.loads(listing.stdout)
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {package["name"]: package["version"] for package in lock["package"]}
    assert {name: locked.get(name) for name in installed} == installed
    assert not {"pytest", "mypy", "ruff"} & installed.keys()
    assert {"cachecoord", "cachecoord-client", "redis", "grpcio", "psycopg"} <= installed.keys()
