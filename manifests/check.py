#!/usr/bin/env python3
"""Check topoproxy's kustomize tree: rendered by the real kustomize, then the project's own rules.

    python3 manifests/check.py    # exit 0: all checks pass, 1: a check failed

Needs PyYAML (`pip install pyyaml`) and kustomize (`cargo xtask k8s-setup` installs it; found
in TOPOPROXY_TOOLS_BIN, k8s-setup's cache, or PATH). Schema, defaulting and admission are the
real apiserver's job: `cargo test --test k8s_agent every_overlay_and_chart` runs a server-side dry run of
every render. What this file checks:

1. Every *.yaml under manifests/ parses.
2. Each kustomization (base, overlays/*, and every component on top of overlays/ipvs) is
   rendered by `kustomize build`; every YAML file of the tree is referenced by some
   kustomization, and every rendered object has apiVersion, kind and metadata.name.
4. The rendered objects are checked for what matters to a service proxy: read-only RBAC
   (get/list/watch on services, nodes and endpointslices, list/watch on MCS serviceimports,
   nothing else), references
   (ServiceAccount, ConfigMap, ClusterRole, volumes) resolve, the config file parses and its
   ports agree with the probes and declared ports, privileges fit the proxy mode, API
   validation rules the server would enforce (Bidirectional propagation only when
   privileged, allowPrivilegeEscalation: false not with privileged or SYS_ADMIN), and the
   shadow DaemonSet can run beside kube-proxy and the real agent (names, selectors, ports).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the machine
    print("check.py needs PyYAML: pip install pyyaml", file=sys.stderr)
    sys.exit(1)

ROOT = Path(__file__).resolve().parent
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

# Kustomizations to render and what each must produce.
RENDERS = {
    "base": {"mode": "ipvs"},
    "overlays/ipvs": {"mode": "ipvs"},
    "overlays/cutover": {"mode": "ipvs", "node_selector": "topoproxy.io/proxy"},
    "overlays/ebpf": {"mode": "ebpf"},
    "overlays/shadow": {"mode": "dry-run"},
}
# Components are rendered on top of this overlay to check that they apply.
COMPONENT_HOST = "overlays/ipvs"
# Renders that run at the same time in one cluster during the migration.
COEXIST = [("overlays/shadow", "overlays/ipvs"), ("overlays/shadow", "overlays/cutover")]

# The keys `topoproxy run --config` accepts (agent/src/config/mod.rs, deny_unknown_fields).
CONFIG_KEYS = {
    "kubeconfig", "hostname-override", "source", "proxy-mode", "min-sync-period", "sync-period",
    "healthz-bind-address", "metrics-bind-address", "ipvs-scheduler", "service-proxy-name",
    "source-poll-period", "log-format", "masquerade-all", "cluster-cidr", "ipvs-exclude-cidrs",
    "ipvs-strict-arp", "ipvs-drain-timeout", "bpf-pin-dir", "cgroup-path", "topology-default",
    "cluster-id", "north-south-interfaces", "snat-port-range", "nodeport-addresses",
    "ipvs-tcp-timeout", "ipvs-tcpfin-timeout", "ipvs-udp-timeout", "conntrack-max-per-core",
    "conntrack-min", "conntrack-tcp-timeout-established", "conntrack-tcp-timeout-close-wait",
    "conntrack-tcp-be-liberal", "conntrack-udp-timeout", "conntrack-udp-timeout-stream",
    "oom-score-adj", "detect-local-mode", "pod-bridge-interface", "pod-interface-name-prefix",
}
PROXY_MODES = {"ipvs", "ebpf", "dry-run"}
RBAC_ALLOWED = {
    (group, resource, verb)
    for group, resource in (("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices"))
    for verb in ("get", "list", "watch")
} | {("multicluster.x-k8s.io", "serviceimports", verb) for verb in ("list", "watch")}
# Host ports taken by kube-proxy (10249, 10256), kube-scheduler (10259),
# kube-controller-manager (10257), cloud-controller-manager (10258) and the kubelet.
KUBE_PORTS = {10248, 10249, 10250, 10255, 10256, 10257, 10258, 10259}
MODE_CAPS = {
    "ipvs": {"NET_ADMIN"},
    "ebpf": {"BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE"},
    "dry-run": set(),
}


class CheckError(Exception):
    """A problem that stops rendering one kustomization."""


failures: list[str] = []


def fail(where: str, message: str) -> None:
    failures.append(f"{where}: {message}")


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT.parent))
    except ValueError:
        return str(path)


def load_docs(path: Path) -> list:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


# ---------------------------------------------------------------------------------------
# Rendering: the real kustomize (installed by `cargo xtask k8s-setup`)
# ---------------------------------------------------------------------------------------

def kustomize_binary() -> str:
    """kustomize from TOPOPROXY_TOOLS_BIN, else k8s-setup's cache, else PATH."""
    candidates = []
    if os.environ.get("TOPOPROXY_TOOLS_BIN"):
        candidates.append(Path(os.environ["TOPOPROXY_TOOLS_BIN"]) / "kustomize")
    cache = os.environ.get("TOPOPROXY_CACHE")
    if cache:
        candidates.append(Path(cache) / "bin" / "kustomize")
    elif os.environ.get("XDG_CACHE_HOME"):
        candidates.append(Path(os.environ["XDG_CACHE_HOME"]) / "topoproxy" / "bin" / "kustomize")
    else:
        candidates.append(Path.home() / ".cache" / "topoproxy" / "bin" / "kustomize")
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("kustomize")
    if found:
        return found
    print("check.py needs kustomize: run `cargo xtask k8s-setup`", file=sys.stderr)
    sys.exit(1)


def group_of(obj: dict) -> str:
    api = obj.get("apiVersion", "")
    return api.split("/")[0] if "/" in api else ""


def ident(obj: dict) -> tuple:
    meta = obj.get("metadata") or {}
    return (obj.get("kind"), meta.get("namespace") or "", meta.get("name"))


def find_kustomization(directory: Path) -> Path | None:
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    return None


def kustomize_build(directory: Path) -> list[dict]:
    """`kustomize build DIRECTORY`, parsed."""
    try:
        out = subprocess.run([kustomize_binary(), "build", str(directory)], check=True,
                             capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as e:
        raise CheckError(f"kustomize build failed: {e.stderr.strip()}") from e
    return [d for d in yaml.safe_load_all(out) if d is not None]


def referenced(directory: Path, used: set[Path]) -> None:
    """Records the files a kustomization (and what it includes) names, for the unused-file check."""
    kfile = find_kustomization(directory)
    if kfile is None:
        raise CheckError(f"{rel(directory)}: no kustomization.yaml")
    used.add(kfile.resolve())
    k = (load_docs(kfile) or [{}])[0]
    for entry in (k.get("resources") or []) + (k.get("components") or []):
        path = directory / entry
        if path.is_dir():
            referenced(path, used)
        else:
            used.add(path.resolve())
    for patch in k.get("patches") or []:
        if isinstance(patch, dict) and "path" in patch:
            used.add((directory / patch["path"]).resolve())


def build(directory: Path, used: set[Path]) -> list[dict]:
    referenced(directory, used)
    return kustomize_build(directory)


def build_with_component(host: Path, component: Path, used: set[Path]) -> list[dict]:
    """HOST's objects with COMPONENT applied, through a throwaway kustomization beside them."""
    referenced(component, used)
    with tempfile.TemporaryDirectory(dir=ROOT) as scratch:
        scratch_dir = Path(scratch)
        (scratch_dir / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(host, scratch_dir)],
            "components": [os.path.relpath(component, scratch_dir)],
        }))
        return kustomize_build(scratch_dir)


def pod_spec(obj: dict) -> dict | None:
    if obj.get("kind") in ("DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job"):
        return ((obj.get("spec") or {}).get("template") or {}).get("spec")
    return None


def all_containers(pod: dict) -> list[dict]:
    return (pod.get("initContainers") or []) + (pod.get("containers") or [])


# ---------------------------------------------------------------------------------------
# Checks on rendered objects
# ---------------------------------------------------------------------------------------

def index(objects: list[dict]) -> dict[tuple, dict]:
    return {ident(o): o for o in objects}


def port_of(address: str) -> int:
    host, _, port = str(address).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not host:port: {address!r}")
    return int(port)


def host_ports(objects: list[dict]) -> set[int]:
    ports = set()
    for obj in objects:
        pod = pod_spec(obj)
        if pod and pod.get("hostNetwork"):
            for container in all_containers(pod):
                ports.update(p["containerPort"] for p in container.get("ports") or [])
    return ports


def check_render(where: str, objects: list[dict], expect: dict) -> None:
    seen = set()
    for obj in objects:
        if ident(obj) in seen:
            fail(where, f"duplicate object {ident(obj)}")
        seen.add(ident(obj))
    by_id = index(objects)
    daemonsets = [o for o in objects if o["kind"] == "DaemonSet"]
    if len(daemonsets) != 1:
        fail(where, f"expected one DaemonSet, found {len(daemonsets)}")
    for obj in objects:
        if obj["kind"] == "ClusterRole":
            check_cluster_role(where, obj)
        elif obj["kind"] == "ClusterRoleBinding":
            role = obj.get("roleRef") or {}
            if ("ClusterRole", "", role.get("name")) not in by_id:
                fail(where, f"ClusterRoleBinding {obj['metadata']['name']}: roleRef {role.get('name')} not rendered")
            for subject in obj.get("subjects") or []:
                if (subject.get("kind"), subject.get("namespace") or "", subject.get("name")) not in by_id:
                    fail(where, f"ClusterRoleBinding {obj['metadata']['name']}: subject {subject} not rendered")
        elif obj["kind"] == "DaemonSet":
            check_daemonset(where, obj, by_id, expect)


def check_cluster_role(where: str, role: dict) -> None:
    granted = set()
    for rule in role.get("rules") or []:
        if rule.get("resourceNames") or rule.get("nonResourceURLs"):
            fail(where, f"ClusterRole {role['metadata']['name']}: unexpected rule {rule}")
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                for verb in rule.get("verbs") or []:
                    granted.add((group, resource, verb))
    if granted != RBAC_ALLOWED:
        extra = sorted(granted - RBAC_ALLOWED)
        missing = sorted(RBAC_ALLOWED - granted)
        fail(where, f"ClusterRole {role['metadata']['name']}: grants extra {extra}, misses {missing}")


def check_daemonset(where: str, ds: dict, by_id: dict, expect: dict) -> None:
    name = ds["metadata"]["name"]
    ns = ds["metadata"].get("namespace") or ""
    here = f"{where}: DaemonSet {name}"
    spec = ds.get("spec") or {}
    pod = pod_spec(ds) or {}
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        fail(here, f"selector {selector} does not match the pod template labels {labels}")
    strategy = spec.get("updateStrategy") or {}
    rolling = strategy.get("rollingUpdate") or {}
    if strategy.get("type") != "RollingUpdate" or rolling.get("maxUnavailable") != 1:
        fail(here, "updateStrategy must be RollingUpdate with maxUnavailable 1")
    if pod.get("hostNetwork") is not True:
        fail(here, "hostNetwork must be true")
    if rolling.get("maxSurge", 0) not in (0, "0", "0%"):
        fail(here, "maxSurge must be 0 with hostNetwork (two agents would bind the same ports)")
    if not any(t == {"operator": "Exists"} for t in pod.get("tolerations") or []):
        fail(here, "must tolerate every taint (a toleration with only operator: Exists)")
    sa = pod.get("serviceAccountName")
    if ("ServiceAccount", ns, sa) not in by_id:
        fail(here, f"serviceAccountName {sa} is not rendered in {ns}")
    if expect.get("node_selector") and expect["node_selector"] not in (pod.get("nodeSelector") or {}):
        fail(here, f"nodeSelector must select on {expect['node_selector']}")

    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    containers = pod.get("containers") or []
    if len(containers) != 1:
        fail(here, f"expected one container, found {len(containers)}")
        return
    c = containers[0]
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
    used_volumes = {m["name"] for m in mounts.values()}
    for m in mounts.values():
        if m["name"] not in volumes:
            fail(here, f"volumeMount {m['mountPath']} names missing volume {m['name']}")
    for v in volumes:
        if v not in used_volumes:
            fail(here, f"volume {v} is not mounted")
    for v in volumes.values():
        cm = v.get("configMap")
        if cm and not cm.get("optional") and ("ConfigMap", ns, cm["name"]) not in by_id:
            fail(here, f"volume {v['name']}: ConfigMap {cm['name']} is not rendered")

    sc = c.get("securityContext") or {}
    caps = sc.get("capabilities") or {}
    added = set(caps.get("add") or [])
    privileged = sc.get("privileged") is True
    if sc.get("allowPrivilegeEscalation") is False and (privileged or "SYS_ADMIN" in added):
        fail(here, "API validation: allowPrivilegeEscalation: false is rejected with privileged or SYS_ADMIN")
    for m in mounts.values():
        if m.get("mountPropagation") == "Bidirectional" and not privileged:
            fail(here, f"API validation: Bidirectional propagation on {m['mountPath']} needs a privileged container")
    if not privileged and "ALL" not in (caps.get("drop") or []):
        fail(here, "capabilities must drop ALL and add back what the mode needs")

    # The command line and the config file.
    command = (c.get("command") or []) + (c.get("args") or [])
    if command[:2] != ["/usr/local/bin/topoproxy", "run"]:
        fail(here, f"command must be /usr/local/bin/topoproxy run, is {shlex.join(command)}")
    env = {e["name"]: e for e in c.get("env") or []}
    if "--hostname-override=$(NODE_NAME)" not in command or \
            ((env.get("NODE_NAME") or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
        fail(here, "--hostname-override=$(NODE_NAME) with NODE_NAME from spec.nodeName is required")
    config_path = command[command.index("--config") + 1] if "--config" in command[:-1] else None
    config = None
    if config_path is None:
        fail(here, "no --config PATH")
    else:
        directory, _, key = config_path.rpartition("/")
        mount = mounts.get(directory)
        cm = volumes.get(mount["name"], {}).get("configMap") if mount else None
        obj = by_id.get(("ConfigMap", ns, cm["name"])) if cm else None
        if obj is None or key not in (obj.get("data") or {}):
            fail(here, f"--config {config_path} is not a key of a mounted, rendered ConfigMap")
        else:
            try:
                config = yaml.safe_load(obj["data"][key])
            except yaml.YAMLError as e:
                fail(here, f"config file {config_path} does not parse: {e}")
    if not isinstance(config, dict):
        if config is not None:
            fail(here, "config file is not a mapping")
        return
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        fail(here, f"config file has unknown keys {sorted(unknown)}")
    mode = config.get("proxy-mode")
    if mode not in PROXY_MODES:
        fail(here, f"proxy-mode {mode!r} is not one of {sorted(PROXY_MODES)}")
    if expect.get("mode") and mode != expect["mode"]:
        fail(here, f"proxy-mode is {mode}, this kustomization is meant for {expect['mode']}")
    try:
        healthz = port_of(config["healthz-bind-address"])
        metrics = port_of(config["metrics-bind-address"])
    except (KeyError, ValueError) as e:
        fail(here, f"bind addresses: {e}")
        return
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/healthz")):
        get = (c.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != path or get.get("port") != healthz:
            fail(here, f"{probe} must be httpGet {path} on the healthz port {healthz}, is {get}")
    declared = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    if declared != {"healthz": healthz, "metrics": metrics}:
        fail(here, f"declared ports {declared} differ from the config's healthz {healthz} / metrics {metrics}")

    # Privileges per mode.
    if mode == "dry-run":
        if privileged or added or any("hostPath" in v for v in volumes.values()):
            fail(here, "dry-run needs no privilege, capability or host mount")
        if sc.get("runAsNonRoot") is not True:
            fail(here, "dry-run should run as non-root")
        if healthz in KUBE_PORTS or metrics in KUBE_PORTS:
            fail(here, f"dry-run runs beside kube-proxy and the control plane: ports {healthz}/{metrics} collide with {sorted(KUBE_PORTS)}")
    elif mode in MODE_CAPS and not privileged and not MODE_CAPS[mode] <= added:
        fail(here, f"{mode} mode needs capabilities {sorted(MODE_CAPS[mode])}, has {sorted(added)}")
    if mode == "ebpf":
        host_paths = {v.get("hostPath", {}).get("path") for v in volumes.values()}
        for needed in ("/sys/fs/bpf", "/sys/fs/cgroup", "/run/netns"):
            if needed not in host_paths:
                fail(here, f"ebpf mode needs the host's {needed} mounted")
        # Pods' namespaces are pinned after the agent started: without propagation the
        # container sees empty files and reaches no pod's connected UDP sockets.
        netns = mounts.get("/run/netns")
        if netns is not None and netns.get("mountPropagation") != "HostToContainer":
            fail(here, "ebpf mode mounts /run/netns with mountPropagation: HostToContainer")
    if mode in ("ipvs", "ebpf") and pod.get("priorityClassName") != "system-node-critical":
        fail(here, "the real agent must be system-node-critical")


def check_coexist(a_name: str, a: list[dict], b_name: str, b: list[dict]) -> None:
    where = f"{a_name} beside {b_name}"
    clash = {ident(o) for o in a} & {ident(o) for o in b}
    if clash:
        fail(where, f"objects with the same kind/namespace/name: {sorted(map(str, clash))}")
    for da in (o for o in a if o["kind"] == "DaemonSet"):
        for db in (o for o in b if o["kind"] == "DaemonSet"):
            for x, y in ((da, db), (db, da)):
                sel = x["spec"]["selector"]["matchLabels"]
                labels = y["spec"]["template"]["metadata"]["labels"]
                if all(labels.get(k) == v for k, v in sel.items()):
                    fail(where, f"DaemonSet {x['metadata']['name']} selects the pods of {y['metadata']['name']}")
    shared = host_ports(a) & host_ports(b)
    if shared:
        fail(where, f"both bind host ports {sorted(shared)}")


def check_kube_proxy_patch(cutover: list[dict]) -> None:
    path = ROOT / "migration" / "kube-proxy-node-affinity.yaml"
    where = rel(path)
    try:
        docs = load_docs(path)
        terms = docs[0]["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    except (OSError, KeyError, IndexError, TypeError) as e:
        fail(where, f"not the expected node-affinity patch ({e!r})")
        return
    selector_keys = set()
    for obj in cutover:
        pod = pod_spec(obj)
        if pod:
            selector_keys |= set(pod.get("nodeSelector") or {}) - {"kubernetes.io/os"}
    for term in terms:
        keys = {e.get("key") for e in term.get("matchExpressions") or [] if e.get("operator") == "DoesNotExist"}
        if not selector_keys <= keys:
            fail(where, f"every term must keep kube-proxy off nodes labelled {sorted(selector_keys)}")


# ---------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    all_yaml = sorted(p for p in ROOT.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    for path in all_yaml:
        try:
            load_docs(path)
        except yaml.YAMLError as e:
            fail(rel(path), f"does not parse: {e}")
    if failures:
        return report(len(all_yaml), 0)

    used: set[Path] = set()
    renders: dict[str, list[dict]] = {}
    render_failed = False
    for name, expect in RENDERS.items():
        try:
            renders[name] = build(ROOT / name, used)
        except CheckError as e:
            fail(name, str(e))
            render_failed = True
            continue
        for obj in renders[name]:
            meta = obj.get("metadata") or {}
            if not obj.get("apiVersion") or not obj.get("kind") or not meta.get("name"):
                fail(name, f"rendered object without apiVersion/kind/metadata.name: {obj}")
        check_render(name, renders[name], expect)

    components = sorted(p.parent for p in (ROOT / "components").glob("*/kustomization.yaml"))
    for component in components:
        name = f"{COMPONENT_HOST} + {rel(component)}"
        try:
            objects = build_with_component(ROOT / COMPONENT_HOST, component, used)
        except CheckError as e:
            fail(name, str(e))
            render_failed = True
            continue
        check_render(name, objects, RENDERS[COMPONENT_HOST])

    for a, b in COEXIST:
        if a in renders and b in renders:
            check_coexist(a, renders[a], b, renders[b])
    if "overlays/cutover" in renders:
        check_kube_proxy_patch(renders["overlays/cutover"])

    # Every YAML file of the kustomize tree is used by some kustomization (only telling
    # when every render got through: a failed one leaves its later patches unvisited).
    if not render_failed:
        for path in all_yaml:
            if path.parent.name == "migration" or path.resolve() in used:
                continue
            fail(rel(path), "not referenced by any kustomization")
    return report(len(all_yaml), len(renders) + len(components))


def report(files: int, renders: int) -> int:
    for line in failures:
        print(f"FAIL {line}")
    status = "failed" if failures else "ok"
    print(f"manifests check {status}: {files} YAML files, {renders} renders, {len(failures)} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
