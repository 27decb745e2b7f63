"""What the rendered Kubernetes manifests (deploy/k8s overlays) must keep true, beyond the
schema that kubernetes-validate checks:

- the gramstyle container has native gRPC startup, readiness and liveness probes;
- terminationGracePeriodSeconds exceeds GRAMSTYLE_GRACE plus the preStop sleep;
- it runs non-root with a read-only root filesystem, an emptyDir at /tmp, no privilege
  escalation and no capabilities; no service-account token is mounted;
- the memory limit exceeds GRAMSTYLE_MEMORY_BUDGET (the server's admission budget);
- TLS and tokens come from Secrets mounted where GRAMSTYLE_TLS_* / GRAMSTYLE_AUTH_TOKENS
  point;
- there are a headless and a ClusterIP Service, an HPA, a PDB and a NetworkPolicy.

    python .ci/check_k8s.py rendered-cpu.yaml rendered-gpu.yaml
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
         "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def size_bytes(text: str) -> int:
    """A Kubernetes quantity or a size such as 4608MiB / 6Gi, in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", str(text).strip())
    if not match or match.group(2) not in UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def check(path: Path) -> list[str]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    problems = []

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(f"{path.name}: {message}")

    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                 "NetworkPolicy", "ConfigMap"):
        need(kind in by_kind, f"no {kind}")
    if problems:
        return problems
    services = by_kind["Service"]
    need(any(s["spec"].get("clusterIP") == "None" for s in services), "no headless Service")
    need(any(s["spec"].get("clusterIP") != "None" for s in services), "no ClusterIP Service")
    config = by_kind["ConfigMap"][0]["data"]
    pod = by_kind["Deployment"][0]["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "gramstyle")

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        need("grpc" in container.get(probe, {}), f"{probe} is not a native gRPC probe")
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
    sleep = float(pre_stop["command"][1]) if pre_stop.get("command", [""])[0] == "sleep" else 0
    grace = float(config.get("GRAMSTYLE_GRACE", 30))
    need(pod.get("terminationGracePeriodSeconds", 30) > grace + sleep,
         f"terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds', 30)} is not "
         f"above GRAMSTYLE_GRACE {grace:g} + preStop {sleep:g} s")

    security = container.get("securityContext", {})
    need(security.get("readOnlyRootFilesystem") is True, "root filesystem not read-only")
    need(security.get("allowPrivilegeEscalation") is False, "privilege escalation allowed")
    need(security.get("capabilities", {}).get("drop") == ["ALL"], "capabilities not dropped")
    need(pod.get("securityContext", {}).get("runAsNonRoot") is True
         or security.get("runAsNonRoot") is True, "runAsNonRoot is not set")
    need(pod.get("automountServiceAccountToken") is False, "a service-account token is mounted")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    need("emptyDir" in volumes.get(mounts.get("/tmp", ""), {}), "no emptyDir at /tmp")
    for variable in ("GRAMSTYLE_TLS_CERT", "GRAMSTYLE_TLS_KEY", "GRAMSTYLE_AUTH_TOKENS"):
        where = config.get(variable)
        if where is None:
            problems.append(f"{path.name}: {variable} is not set")
            continue
        folder = str(Path(where).parent)
        need("secret" in volumes.get(mounts.get(folder, ""), {}),
             f"{variable}={where} is not in a mounted Secret")

    limits = container.get("resources", {}).get("limits", {})
    budget = config.get("GRAMSTYLE_MEMORY_BUDGET")
    need(budget is not None, "GRAMSTYLE_MEMORY_BUDGET is not set")
    need("memory" in limits, "no memory limit")
    if budget is not None and "memory" in limits and config.get("GRAMSTYLE_DEVICE") != "cuda":
        # On CPU the budget is host memory, so it must fit in the container with the model.
        need(size_bytes(limits["memory"]) > size_bytes(budget),
             f"memory limit {limits['memory']} is not above GRAMSTYLE_MEMORY_BUDGET {budget}")
    if config.get("GRAMSTYLE_DEVICE") == "cuda":
        need(str(limits.get("nvidia.com/gpu")) == "1", "the gpu overlay asks no nvidia.com/gpu")
    return problems


def main() -> None:
    problems = [p for path in sys.argv[1:] for p in check(Path(path))]
    for problem in problems:
        print(f"check_k8s: {problem}", file=sys.stderr)
    if problems:
        raise SystemExit(1)
    print(f"check_k8s: {', '.join(Path(p).name for p in sys.argv[1:])}: probes, shutdown, "
          "security, Secrets, memory and the objects are as required")


if __name__ == "__main__":
    main()
