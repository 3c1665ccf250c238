"""The Kubernetes Pod Security Standards (``baseline`` and ``restricted``, policy version ``latest``) as
the PodSecurity admission controller applies them to a pod spec, for the loopback harness (which
refuses to create a pod that violates its namespace's level) and for the chart and Job tests.

Written from the published standard (kubernetes.io/docs/concepts/security/pod-security-standards)
and the admission controller's message format (``violates PodSecurity "restricted:latest": <check>
(<detail>), ...``). Covered: every baseline control (host namespaces, privileged containers,
capabilities, hostPath volumes, host ports, AppArmor, SELinux, /proc mount type, seccomp, sysctls)
and every restricted one (volume types, privilege escalation, running as non-root, non-zero UID,
seccomp, capabilities drop ALL / add only NET_BIND_SERVICE). Windows pods are out of scope.
"""

from __future__ import annotations

from typing import Any

LEVELS = ("privileged", "baseline", "restricted")

_BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                  "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                 "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                 "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                 "net.ipv4.tcp_keepalive_probes"}
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", []), *spec.get("ephemeralContainers", [])]


def _names(cs: list[dict[str, Any]]) -> str:
    return ", ".join(f'"{c["name"]}"' for c in cs)


def _container_word(cs: list[dict[str, Any]]) -> str:
    return "container" if len(cs) == 1 else "containers"


def check(spec: dict[str, Any], level: str = "restricted") -> list[str]:
    """The violations of ``level`` by a pod spec, each as the admission controller words it."""
    if level not in LEVELS:
        raise ValueError(f"unknown Pod Security level {level!r}")
    if level == "privileged":
        return []
    out: list[str] = []
    psc = spec.get("securityContext") or {}
    cs = _containers(spec)

    def sc(c: dict[str, Any]) -> dict[str, Any]:
        return c.get("securityContext") or {}

    # -- baseline ---------------------------------------------------------------------------
    host = [f"{k}={str(spec[k]).lower()}" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    if host:
        out.append(f"host namespaces ({', '.join(host)})")
    priv = [c for c in cs if sc(c).get("privileged")]
    if priv:
        out.append(f"privileged ({_container_word(priv)} {_names(priv)} must not set securityContext.privileged=true)")
    added = {c["name"]: [a for a in (sc(c).get("capabilities") or {}).get("add", []) if a not in _BASELINE_CAPS]
             for c in cs}
    bad = [c for c in cs if added[c["name"]]]
    if bad:
        caps = sorted({a for c in bad for a in added[c["name"]]})
        out.append(f"non-default capabilities ({_container_word(bad)} {_names(bad)} must not include "
                   f"{', '.join(repr(a) for a in caps)} in securityContext.capabilities.add)")
    hp = [v["name"] for v in spec.get("volumes", []) if "hostPath" in v]
    if hp:
        out.append(f"hostPath volumes ({'volume' if len(hp) == 1 else 'volumes'} {', '.join(repr(v) for v in hp)})")
    ports = [p for c in cs for p in c.get("ports", []) if p.get("hostPort")]
    if ports:
        out.append(f"hostPort ({_container_word(cs)} {_names(cs)} uses hostPort "
                   f"{', '.join(str(p['hostPort']) for p in ports)})")
    for where in [psc, *(sc(c) for c in cs)]:
        if (where.get("appArmorProfile") or {}).get("type") == "Unconfined":
            out.append('forbidden AppArmor profile (appArmorProfile.type="Unconfined")')
            break
    for where in [psc, *(sc(c) for c in cs)]:
        se = where.get("seLinuxOptions") or {}
        if se.get("type") not in (None, "", "container_t", "container_init_t", "container_kvm_t",
                                  "container_engine_t") or se.get("user") or se.get("role"):
            out.append("seLinuxOptions (forbidden securityContext.seLinuxOptions)")
            break
    pm = [c for c in cs if sc(c).get("procMount") not in (None, "Default")]
    if pm:
        out.append(f"procMount ({_container_word(pm)} {_names(pm)} must not set securityContext.procMount)")
    unconfined = [c for c in cs if (sc(c).get("seccompProfile") or {}).get("type") == "Unconfined"]
    if (psc.get("seccompProfile") or {}).get("type") == "Unconfined" or unconfined:
        out.append("seccompProfile (pod or containers must not set securityContext.seccompProfile.type to "
                   '"Unconfined")')
    sysctls = [s["name"] for s in psc.get("sysctls", []) if s.get("name") not in _SAFE_SYSCTLS]
    if sysctls:
        out.append(f"forbidden sysctls ({', '.join(sysctls)})")
    if level == "baseline":
        return out
    # -- restricted -------------------------------------------------------------------------
    vols = [v["name"] for v in spec.get("volumes", []) if not (set(v) - {"name"}) & _RESTRICTED_VOLUMES]
    if vols:
        out.append(f"restricted volume types ({'volume' if len(vols) == 1 else 'volumes'} "
                   f"{', '.join(repr(v) for v in vols)} uses restricted volume type)")
    esc = [c for c in cs if sc(c).get("allowPrivilegeEscalation") is not False]
    if esc:
        out.append(f"allowPrivilegeEscalation != false ({_container_word(esc)} {_names(esc)} must set "
                   "securityContext.allowPrivilegeEscalation=false)")
    caps = [c for c in cs if "ALL" not in ((sc(c).get("capabilities") or {}).get("drop") or [])
            or set((sc(c).get("capabilities") or {}).get("add") or []) - {"NET_BIND_SERVICE"}]
    if caps:
        out.append(f"unrestricted capabilities ({_container_word(caps)} {_names(caps)} must set "
                   'securityContext.capabilities.drop=["ALL"])')
    pod_nonroot = psc.get("runAsNonRoot") is True
    nonroot = [c for c in cs if sc(c).get("runAsNonRoot") is False or (not pod_nonroot
                                                                        and sc(c).get("runAsNonRoot") is not True)]
    if nonroot:
        out.append(f"runAsNonRoot != true (pod or {_container_word(nonroot)} {_names(nonroot)} must set "
                   "securityContext.runAsNonRoot=true)")
    zero = [c for c in cs if sc(c).get("runAsUser") == 0] + ([{"name": "pod"}] if psc.get("runAsUser") == 0 else [])
    if zero:
        out.append("runAsUser=0 (pod and containers must not set runAsUser=0)")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost")
    no_sc = [c for c in cs if (sc(c).get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost")
             and not (pod_seccomp and not sc(c).get("seccompProfile"))]
    if no_sc:
        out.append(f'seccompProfile (pod or {_container_word(no_sc)} {_names(no_sc)} must set '
                   'securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")')
    return out


def message(pod_name: str, violations: list[str], level: str = "restricted") -> str:
    """The API server's refusal, as the Job controller reports it in a FailedCreate event."""
    return (f'pods "{pod_name}" is forbidden: violates PodSecurity "{level}:latest": ' + ", ".join(violations))
