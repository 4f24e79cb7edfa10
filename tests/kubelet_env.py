"""The environment the kubelet gives a pod: the variables it injects for each
Service of the pod's namespace ("service links", on unless the pod sets
``enableServiceLinks: false``), built the way Kubernetes' own
``pkg/kubelet/envvars.FromServices`` builds them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def service_links(services: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Service-link variables for *services* (Service manifests, each with a
    ``spec.clusterIP`` or a stand-in address); headless Services get none."""
    env: dict[str, str] = {}
    for index, service in enumerate(services):
        spec = service["spec"]
        ip = spec.get("clusterIP", f"10.96.0.{10 + index}")
        if ip == "None":
            continue
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        ports = spec["ports"]
        env[f"{prefix}_SERVICE_HOST"] = ip
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        for port in ports:
            if "name" in port:
                name = port["name"].upper().replace("-", "_")
                env[f"{prefix}_SERVICE_PORT_{name}"] = str(port["port"])
        for i, port in enumerate(ports):
            proto = port.get("protocol", "TCP")
            url = f"{proto.lower()}://{ip}:{port['port']}"
            if i == 0:
                env[f"{prefix}_PORT"] = url
            base = f"{prefix}_PORT_{port['port']}_{proto}"
            env[base] = url
            env[f"{base}_PROTO"] = proto.lower()
            env[f"{base}_PORT"] = str(port["port"])
            env[f"{base}_ADDR"] = ip
    return env


def service(name: str, *ports: int, cluster_ip: str | None = None) -> dict[str, Any]:
    """A minimal Service manifest named *name* with TCP *ports*."""
    spec: dict[str, Any] = {"ports": [{"name": f"p{p}", "port": p} for p in ports]}
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    return {"metadata": {"name": name}, "spec": spec}
