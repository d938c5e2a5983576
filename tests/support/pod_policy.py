"""What every trainer pod must be, whatever the spec says: one checker, used by unit and fuzz tests."""

from __future__ import annotations

from typing import Any

SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def hardening_problems(pod: dict[str, Any]) -> list[str]:
    """Every way `pod` falls short of the trainer pod policy (empty when it complies)."""
    problems: list[str] = []
    spec = pod.get("spec", {})
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken is not false: the trainer would get an API token")
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        problems.append("shares a host namespace")
    if spec.get("shareProcessNamespace"):
        problems.append("shares its process namespace")
    psc = spec.get("securityContext") or {}
    if psc.get("runAsUser") == 0 or psc.get("runAsGroup") == 0:
        problems.append("pod runs as uid/gid 0")
    if (psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("no seccomp profile")
    for volume in spec.get("volumes") or []:
        if "hostPath" in volume:
            problems.append(f"hostPath volume {volume.get('name')}")
        if "projected" in volume or "secret" in volume:
            problems.append(f"volume {volume.get('name')} mounts secrets or a token")
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    if not containers:
        problems.append("no containers")
    for c in containers:
        name = c.get("name")
        sc = c.get("securityContext") or {}
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            problems.append(f"{name}: runs as uid 0")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: root filesystem is writable")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{name}: capabilities not all dropped")
        if caps.get("add"):
            problems.append(f"{name}: adds capabilities {caps['add']}")
        for env in c.get("env") or []:
            if env.get("name") in SECRET_ENV and "value" in env:
                problems.append(f"{name}: {env['name']} given as a literal value, not a secretKeyRef")
        for source in c.get("envFrom") or []:
            if "secretRef" in source:
                problems.append(f"{name}: envFrom a whole Secret")
        for port in c.get("ports") or []:
            if "hostPort" in port:
                problems.append(f"{name}: hostPort")
    return problems
