#!/usr/bin/env python3
"""Checks the deployment files without a cluster: deploy/kubernetes/*.yaml and the
alerting rules deploy/prometheus/alerts.yml (with their tests alerts_test.yml).

1. Every manifest parses (PyYAML), names no namespace, and kustomization.yaml lists
   exactly the manifests in the folder.
2. Core resources (ConfigMap, Secret, Deployment, Service, PodDisruptionBudget)
   validate against the Kubernetes OpenAPI schemas of KUBERNETES_VERSION in strict
   mode (unknown fields are errors), with the schemas bundled in the PyPI package
   kubernetes-validate (no network). The KEDA ScaledObject's HPA behavior is
   validated against the HorizontalPodAutoscaler schema the same way.
3. The custom resources (ServiceMonitor, ScaledObject, PrometheusRule) have no schema
   there, so the fields that matter are checked by hand (known keys, types, values).
4. Cross-cutting facts: the probes ask /healthz and /readyz on the container port of
   paysync.toml's http.listen (which must listen on all interfaces);
   terminationGracePeriodSeconds > processing.shutdown_timeout; the pod runs as the
   Dockerfile's non-root user with a read-only root filesystem, no privilege
   escalation, no capabilities, seccomp RuntimeDefault; every secret the config reads
   from a file is a key of the mounted Secret, readable by that user; the config
   checksum annotation matches the ConfigMap; the Service, ServiceMonitor, PDB and
   anti-affinity select the Deployment's pods; the ServiceMonitor scrapes a port the
   Service has, under the job name the alerts use; the ScaledObject scales the
   Deployment on the input topic (never a re-check topic) of the config's group and
   brokers, with maxReplicaCount <= INPUT_PARTITIONS (checked against
   docker-compose.yml's kafka-init); prometheusrule.yaml holds exactly alerts.yml's
   groups.
5. Every alert has severity (page|ticket) and team labels, a summary, a description
   and a runbook_url to the README anchor runbook-<alert name in lower case>; lag and
   watermark alerts select a topic; every alert has a firing and a not-firing case in
   alerts_test.yml.
6. When promtool is on PATH: `promtool check rules` and `promtool test rules`
   (--require-promtool makes its absence an error; Debian: apt-get install prometheus).
7. When a paysync binary is at hand (PAYSYNC_BIN, target/debug/paysync or
   target/release/paysync): `paysync check-config` accepts the ConfigMap's file, with
   its secret files in place and the Deployment's environment, and `check-config
   --topics` lists the topics to create.

Usage:
  python tests/deploy/check_deploy.py            check; exit 1 with the problems
  python tests/deploy/check_deploy.py --write    regenerate prometheusrule.yaml from
                                                 alerts.yml and the checksum/config
                                                 annotation, then check
Requirements: tests/requirements.txt (PyYAML, kubernetes-validate).
"""
import argparse
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
K8S_DIR = os.path.join(ROOT, "deploy", "kubernetes")
PROM_DIR = os.path.join(ROOT, "deploy", "prometheus")
ALERTS = os.path.join(PROM_DIR, "alerts.yml")
ALERTS_TEST = os.path.join(PROM_DIR, "alerts_test.yml")
PROMETHEUS_RULE = os.path.join(K8S_DIR, "prometheusrule.yaml")

# Kubernetes schema version for kubernetes-validate (it bundles 1.25 to 1.37).
KUBERNETES_VERSION = "1.30"
# Partitions of the input topic: docker-compose.yml's kafka-init creates
# payment-status-requests with 6 (checked below). KEDA must not scale past it.
INPUT_PARTITIONS = 6
# Where the runbooks live: README headings "Runbook: <AlertName>".
RUNBOOK_BASE = "https://github.com/paysync/paysync/blob/main/README.md#"
SEVERITIES = {"page", "ticket"}
TEAM = "payments"
# paysync's own defaults (src/config/raw.rs), for keys the file leaves out.
DEFAULTS = {
    "kafka.brokers": "127.0.0.1:9092",
    "kafka.group_id": "paysync",
    "kafka.input_topic": "payment-status-requests",
    "processing.shutdown_timeout": "30s",
    "processing.stuck_after": "5m",
    "http.listen": "0.0.0.0:9464",
}
CORE_KINDS = {("v1", "ConfigMap"), ("v1", "Secret"), ("apps/v1", "Deployment"),
              ("v1", "Service"), ("policy/v1", "PodDisruptionBudget")}
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"),
                ("keda.sh/v1alpha1", "ScaledObject"),
                ("monitoring.coreos.com/v1", "PrometheusRule")}
GENERATED_HEADER = (
    "# Generated from deploy/prometheus/alerts.yml by\n"
    "#   python tests/deploy/check_deploy.py --write\n"
    "# Do not edit: edit alerts.yml (and alerts_test.yml), then regenerate; the check\n"
    "# fails when the two differ. The Prometheus Operator loads PrometheusRules that its\n"
    "# ruleSelector matches (kube-prometheus-stack: `release: <helm release>`): add\n"
    "# that label to metadata.labels in the generator (prometheus_rule() in the script).\n"
)

problems = []
notes = []


def problem(text):
    problems.append(text)


_mark = 0


def checked(text):
    """Prints a check's line: ok, or FAIL when problems were found since the last line."""
    global _mark
    print(f"  {'FAIL' if len(problems) > _mark else 'ok  '} {text}")
    _mark = len(problems)


def guarded(check, *args):
    """Runs one check; a crash (a manifest shaped unlike anything expected) is a problem."""
    try:
        return check(*args)
    except Exception as e:  # noqa: BLE001 - reported, and the run fails
        problem(f"{check.__name__} could not run: {type(e).__name__}: {e}")
        checked(check.__name__)
        return None


# --------------------------------------------------------------------------- helpers

def load_yaml_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def duration_seconds(text):
    """A humantime duration ("30s", "5m", "1m30s", "250ms") in seconds."""
    units = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1, "sec": 1, "secs": 1,
             "second": 1, "seconds": 1, "m": 60, "min": 60, "mins": 60, "minute": 60,
             "minutes": 60, "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
             "d": 86400, "day": 86400, "days": 86400}
    text = str(text).strip()
    parts = re.findall(r"(\d+)\s*([a-z]+)", text)
    if not parts or re.sub(r"\s+", "", text) != "".join(n + u for n, u in parts):
        raise ValueError(f"not a duration: {text!r}")
    total = 0.0
    for number, unit in parts:
        if unit not in units:
            raise ValueError(f"unknown unit {unit!r} in {text!r}")
        total += int(number) * units[unit]
    return total


def quantity(text):
    """A Kubernetes quantity ("250m", "128Mi", "1Gi", "2") as a number."""
    m = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(text))
    if not m:
        raise ValueError(f"not a quantity: {text!r}")
    factor = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return float(m.group(1)) * factor


def selector_matches(selector, labels):
    """A Kubernetes LabelSelector (matchLabels, matchExpressions) against labels."""
    if not selector:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return bool(selector.get("matchLabels") or selector.get("matchExpressions"))


def dig(d, dotted, default=None):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def setting(config, key):
    return dig(config, key, DEFAULTS.get(key))


def unknown_keys(where, mapping, allowed):
    if not isinstance(mapping, dict):
        problem(f"{where} is not a mapping")
        return
    for k in sorted(set(mapping) - set(allowed)):
        problem(f"{where}: unknown field {k!r}")


class _LiteralDumper(yaml.SafeDumper):
    pass


def _str_representer(dumper, data):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_LiteralDumper.add_representer(str, _str_representer)


# ----------------------------------------------------------------------- manifests

def load_manifests():
    """{(kind, name): (doc, file)} of every manifest in deploy/kubernetes."""
    resources = {}
    files = sorted(f for f in os.listdir(K8S_DIR) if f.endswith((".yaml", ".yml")))
    for name in files:
        if name == "kustomization.yaml":
            continue
        path = os.path.join(K8S_DIR, name)
        try:
            docs = load_yaml_docs(path)
        except yaml.YAMLError as e:
            problem(f"{name}: does not parse: {e}")
            continue
        if not docs:
            problem(f"{name}: no document")
        for doc in docs:
            if not isinstance(doc, dict) or not all(k in doc for k in ("apiVersion", "kind", "metadata")):
                problem(f"{name}: a document without apiVersion, kind and metadata")
                continue
            meta = doc["metadata"] or {}
            if "name" not in meta:
                problem(f"{name}: {doc['kind']} without metadata.name")
                continue
            if "namespace" in meta:
                problem(f"{name}: {doc['kind']}/{meta['name']} names a namespace (the manifests are namespace-agnostic)")
            key = (doc["kind"], meta["name"])
            if key in resources:
                problem(f"{name}: {doc['kind']}/{meta['name']} is defined twice")
            resources[key] = (doc, name)
    checked(f"{len(files)} files in deploy/kubernetes parse (PyYAML); "
            f"{len(resources)} resources, none names a namespace")
    return resources, files


def check_kustomization(files):
    path = os.path.join(K8S_DIR, "kustomization.yaml")
    if not os.path.exists(path):
        problem("deploy/kubernetes/kustomization.yaml is missing")
        return
    k = load_yaml_docs(path)[0]
    if k.get("kind") != "Kustomization":
        problem("kustomization.yaml: kind is not Kustomization")
    listed = k.get("resources") or []
    for r in listed:
        if not os.path.exists(os.path.join(K8S_DIR, r)):
            problem(f"kustomization.yaml lists {r}, which does not exist")
    for f in files:
        if f != "kustomization.yaml" and f not in listed:
            problem(f"kustomization.yaml does not list {f}")
    if len(set(listed)) != len(listed):
        problem("kustomization.yaml lists a file twice")
    checked(f"kustomization.yaml lists exactly the {len(listed)} manifests")


def check_schemas(resources):
    versions = set()
    for (kind, name), (doc, file) in sorted(resources.items()):
        api = doc["apiVersion"]
        if (api, kind) in CUSTOM_KINDS:
            continue
        if (api, kind) not in CORE_KINDS:
            problem(f"{file}: {api} {kind} is neither a known core resource nor a checked custom resource")
            continue
        try:
            versions.add(kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True))
        except ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problem(f"{file}: {kind}/{name} does not validate against Kubernetes {e.version}: {path}: {e.message}")
        except SchemaNotFoundError as e:
            problem(f"{file}: {e.message}")
    checked(f"core resources validate in strict mode against the Kubernetes "
            f"{', '.join(sorted(versions)) or '?'} schemas (kubernetes-validate "
            f"{kubernetes_validate.__version__}, offline)")
    return versions


def one(resources, kind):
    found = [(doc, file) for (k, _), (doc, file) in resources.items() if k == kind]
    if len(found) != 1:
        problem(f"expected one {kind}, found {len(found)}")
        return None, None
    return found[0]


# ----------------------------------------------------------- deployment and config

def dockerfile_facts():
    with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as f:
        text = f.read()
    user = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", text, re.M)
    entry = re.search(r'^ENTRYPOINT\s+\["([^"]+)"', text, re.M)
    return {
        "uid": int(user[-1][0]) if user else None,
        "gid": int(user[-1][1]) if user and user[-1][1] else None,
        "entrypoint": entry.group(1) if entry else None,
    }


def compose_input_partitions():
    with open(os.path.join(ROOT, "docker-compose.yml"), encoding="utf-8") as f:
        m = re.search(r"\bpayment-status-requests:(\d+)\b", f.read())
    return int(m.group(1)) if m else None


def config_from_deployment(resources, deployment, container):
    """(text, parsed) of the config file the container's --config names, followed
    through its volume mount to a ConfigMap key."""
    args = (container.get("command") or []) + (container.get("args") or [])
    if "--config" not in args or args.index("--config") + 1 >= len(args):
        problem("deployment: the container's arguments have no --config FILE")
        return None, None
    path = args[args.index("--config") + 1]
    mount, volume = mount_for(deployment, container, path)
    if not volume or "configMap" not in volume:
        problem(f"deployment: --config {path} is not on a ConfigMap volume")
        return None, None
    rel = os.path.relpath(path, mount["mountPath"])
    key = rel
    items = volume["configMap"].get("items")
    if items:
        key = next((i["key"] for i in items if i["path"] == rel), None)
    cm_name = volume["configMap"].get("name")
    cm = resources.get(("ConfigMap", cm_name), (None, None))[0]
    if cm is None:
        problem(f"deployment: ConfigMap {cm_name} (the config volume) is not in the manifests")
        return None, None
    text = (cm.get("data") or {}).get(key)
    if text is None:
        problem(f"ConfigMap {cm_name} has no key {key!r} for {path}")
        return None, None
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        problem(f"ConfigMap {cm_name} key {key}: not valid TOML: {e}")
        return None, None
    checked(f"--config {path} is ConfigMap {cm_name} key {key} (valid TOML)")
    return text, parsed


def mount_for(deployment, container, path):
    """The container's volume mount holding path (longest prefix) and its volume."""
    best = None
    for m in container.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    if best is None:
        return None, None
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes") or []}
    return best, volumes.get(best["name"])


def secret_sources(config, prefix=""):
    """(key, source) of every `{ file = ... }` / `{ env = ... }` secret in the config."""
    if isinstance(config, dict):
        if set(config) in ({"file"}, {"env"}):
            yield prefix, config
            return
        for k, v in config.items():
            yield from secret_sources(v, f"{prefix}.{k}" if prefix else k)


def listen_port(listen):
    m = re.fullmatch(r"\[?([^\]]*)\]?:(\d+)", listen)
    if not m:
        problem(f"http.listen {listen!r} is not HOST:PORT")
        return None, None
    return m.group(1), int(m.group(2))


def resolve_port(container, port):
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def check_deployment(resources, docker):
    deployment, dfile = one(resources, "Deployment")
    if deployment is None:
        return None
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"].get("labels") or {}
    if not selector_matches(spec.get("selector"), pod_labels):
        problem("deployment: spec.selector does not match the pod template's labels")
    containers = [c for c in pod["containers"] if c["name"] == "paysync"] or pod["containers"][:1]
    c = containers[0]
    facts = {"deployment": deployment, "container": c, "pod_labels": pod_labels, "file": dfile}

    # image and arguments
    image = c.get("image", "")
    if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        problem(f"deployment: image {image!r} is not pinned to a tag")
    if c.get("command") and c["command"][0] != docker["entrypoint"]:
        problem(f"deployment: command {c['command']} replaces the image's ENTRYPOINT {docker['entrypoint']}")
    if (c.get("args") or [None])[0] != "run":
        problem(f"deployment: args {c.get('args')} do not start with `run` (the ENTRYPOINT is {docker['entrypoint']})")
    checked(f"image {image}, args {c.get('args')} after ENTRYPOINT {docker['entrypoint']}")

    # security
    psc, csc = pod.get("securityContext") or {}, c.get("securityContext") or {}

    def effective(key):
        return csc.get(key, psc.get(key))

    if effective("runAsNonRoot") is not True:
        problem("deployment: runAsNonRoot is not true")
    if effective("runAsUser") != docker["uid"]:
        problem(f"deployment: runAsUser {effective('runAsUser')} is not the Dockerfile's USER {docker['uid']}")
    if docker["gid"] is not None and effective("runAsGroup") not in (None, docker["gid"]):
        problem(f"deployment: runAsGroup {effective('runAsGroup')} is not the Dockerfile's group {docker['gid']}")
    if csc.get("readOnlyRootFilesystem") is not True:
        problem("deployment: readOnlyRootFilesystem is not true")
    if csc.get("allowPrivilegeEscalation") is not False:
        problem("deployment: allowPrivilegeEscalation is not false")
    if csc.get("privileged"):
        problem("deployment: the container is privileged")
    if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
        problem("deployment: capabilities do not drop ALL")
    if (csc.get("capabilities") or {}).get("add"):
        problem("deployment: capabilities are added")
    if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problem("deployment: seccompProfile is not RuntimeDefault")
    checked(f"runs as non-root uid {effective('runAsUser')} (the Dockerfile's USER), read-only root, "
            f"no privilege escalation, capabilities drop ALL, seccomp {(effective('seccompProfile') or {}).get('type')}")

    # resources
    res = c.get("resources") or {}
    try:
        for path in ("requests.cpu", "requests.memory", "limits.memory"):
            if dig(res, path) is None:
                problem(f"deployment: resources.{path} is not set")
        if dig(res, "requests.memory") and dig(res, "limits.memory") and \
                quantity(res["requests"]["memory"]) > quantity(res["limits"]["memory"]):
            problem("deployment: memory request exceeds its limit")
    except ValueError as e:
        problem(f"deployment: resources: {e}")
    checked(f"resources {res}")

    # anti-affinity
    terms = dig(pod, "affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution") or []
    if not any(selector_matches(t["podAffinityTerm"].get("labelSelector"), pod_labels) for t in terms):
        problem("deployment: no preferred pod anti-affinity term selects paysync's own pods")
    checked("preferred pod anti-affinity selects paysync's own pods")

    # volumes and mounts
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = {m["name"] for m in c.get("volumeMounts") or []}
    for m in sorted(mounts - set(volumes)):
        problem(f"deployment: volumeMount {m} has no volume")
    for v in sorted(set(volumes) - mounts):
        problem(f"deployment: volume {v} is not mounted")
    for v in volumes.values():
        if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in resources:
            problem(f"deployment: volume {v['name']}: ConfigMap {v['configMap']['name']} is not in the manifests")
        if "secret" in v and ("Secret", v["secret"]["secretName"]) not in resources:
            problem(f"deployment: volume {v['name']}: Secret {v['secret']['secretName']} is not in the manifests")
    checked(f"volumes {sorted(volumes)} are mounted and name resources of these manifests")
    return facts


def check_config_facts(resources, facts, docker):
    deployment, c = facts["deployment"], facts["container"]
    pod = deployment["spec"]["template"]["spec"]
    text, config = config_from_deployment(resources, deployment, c)
    if config is None:
        return None
    facts["config"], facts["config_text"] = config, text

    # checksum annotation
    want = hashlib.sha256(text.encode("utf-8")).hexdigest()
    got = (deployment["spec"]["template"]["metadata"].get("annotations") or {}).get("checksum/config")
    if got != want:
        problem(f"deployment: annotation checksum/config is {got!r}, the ConfigMap's paysync.toml has "
                f"sha256 {want} (run with --write, or paste it)")
    checked("pod annotation checksum/config is the sha256 of paysync.toml (a config change rolls the pods)")

    # listen address and probes
    host, port = listen_port(str(setting(config, "http.listen")))
    if host not in ("0.0.0.0", "::"):
        problem(f"http.listen host {host!r}: the kubelet probes and Prometheus scrapes the pod IP, "
                f"so listen on 0.0.0.0 (or ::)")
    ports = {p.get("containerPort") for p in c.get("ports") or []}
    if port not in ports:
        problem(f"deployment: no containerPort {port} (http.listen)")
    wanted = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for probe, path in wanted.items():
        p = c.get(probe)
        if p is None:
            if probe != "startupProbe":
                problem(f"deployment: no {probe}")
            continue
        get = p.get("httpGet")
        if not get:
            problem(f"deployment: {probe} is not an httpGet probe")
            continue
        if get.get("path") != path:
            problem(f"deployment: {probe} asks {get.get('path')}, not {path}")
        if resolve_port(c, get.get("port")) != port:
            problem(f"deployment: {probe} port {get.get('port')} is not http.listen's port {port}")
        if get.get("scheme", "HTTP") != "HTTP":
            problem(f"deployment: {probe} uses {get.get('scheme')}; paysync serves plain HTTP")
    checked(f"probes: liveness/startup GET /healthz, readiness GET /readyz on port {port} "
            f"(http.listen {setting(config, 'http.listen')})")

    # shutdown
    shutdown = duration_seconds(setting(config, "processing.shutdown_timeout"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if not grace > shutdown:
        problem(f"deployment: terminationGracePeriodSeconds {grace} is not more than "
                f"processing.shutdown_timeout {shutdown:g}s")
    checked(f"terminationGracePeriodSeconds {grace} > processing.shutdown_timeout {shutdown:g}s")

    # secrets
    env_names = {e["name"] for e in c.get("env") or []}
    has_env_from = bool(c.get("envFrom"))
    psc = pod.get("securityContext") or {}
    used_keys = {}
    sources = list(secret_sources(config))
    for key, src in sources:
        if "env" in src:
            if src["env"] not in env_names and not has_env_from:
                problem(f"config {key} reads ${src['env']}, which the container does not set")
            continue
        path = src["file"]
        mount, volume = mount_for(deployment, c, path)
        if not volume or "secret" not in volume:
            problem(f"config {key} reads {path}, which is not on a Secret volume")
            continue
        if not mount.get("readOnly"):
            problem(f"deployment: the Secret mount {mount['mountPath']} is not readOnly")
        rel = os.path.relpath(path, mount["mountPath"])
        secret_key, mode = rel, volume["secret"].get("defaultMode", 0o644)
        items = volume["secret"].get("items")
        if items:
            item = next((i for i in items if i["path"] == rel), None)
            if item is None:
                problem(f"config {key} reads {path}, but the Secret volume's items have no path {rel}")
                continue
            secret_key, mode = item["key"], item.get("mode", mode)
        name = volume["secret"]["secretName"]
        secret = resources.get(("Secret", name), (None, None))[0]
        if secret is None:
            continue  # reported with the volumes
        keys = set(secret.get("data") or {}) | set(secret.get("stringData") or {})
        if secret_key not in keys:
            problem(f"config {key} reads {path}: Secret {name} has no key {secret_key!r} (keys: {sorted(keys)})")
            continue
        used_keys.setdefault(name, set()).add(secret_key)
        # Secret files are owned by root, group fsGroup when the pod sets one.
        readable = bool(mode & 0o004) or (bool(mode & 0o040) and psc.get("fsGroup") is not None)
        if not readable:
            problem(f"Secret file {path} (mode {mode:04o}) is not readable by uid "
                    f"{docker['uid']}: give other-read, or group-read with a pod fsGroup")
        checked(f"config {key} = {{ file = {path!r} }} -> Secret {name} key {secret_key}, "
                f"mounted read-only, mode {mode:04o}" + (f", group {psc.get('fsGroup')}" if psc.get("fsGroup") else ""))
    if not sources:
        notes.append("the config reads no secret from a file or the environment")
    for (kind, name), (doc, _) in resources.items():
        if kind == "Secret":
            keys = set(doc.get("data") or {}) | set(doc.get("stringData") or {})
            for k in sorted(keys - used_keys.get(name, set())):
                notes.append(f"Secret {name} key {k} is not read by the config")
    return config


def check_service(resources, facts):
    service, _ = one(resources, "Service")
    if service is None:
        return None
    spec = service["spec"]
    if not selector_matches({"matchLabels": spec.get("selector") or {}}, facts["pod_labels"]):
        problem("service: its selector does not match the Deployment's pod labels")
    c = facts["container"]
    for p in spec.get("ports") or []:
        target = p.get("targetPort", p.get("port"))
        if resolve_port(c, target) is None:
            problem(f"service: port {p.get('name')} targets {target}, which the container does not have")
    if spec.get("type", "ClusterIP") != "ClusterIP":
        problem(f"service: type {spec.get('type')} (metrics only: ClusterIP)")
    checked(f"Service {service['metadata']['name']} selects the pods; ports "
            f"{[(p.get('name'), p.get('port')) for p in spec.get('ports') or []]}")
    return service


SM_SPEC_KEYS = {"selector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels",
                "namespaceSelector", "sampleLimit", "targetLimit", "labelLimit",
                "labelNameLengthLimit", "labelValueLengthLimit", "attachMetadata",
                "keepDroppedTargets", "scrapeProtocols", "scrapeClass", "bodySizeLimit",
                "fallbackScrapeProtocol", "selectorMechanism", "serviceDiscoveryRole",
                "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor",
                "scrapeClassicHistograms", "convertClassicHistogramsToNHCB"}
SM_ENDPOINT_KEYS = {"port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout",
                    "tlsConfig", "bearerTokenFile", "bearerTokenSecret", "authorization",
                    "honorLabels", "honorTimestamps", "trackTimestampsStaleness", "basicAuth",
                    "oauth2", "metricRelabelings", "relabelings", "proxyUrl", "followRedirects",
                    "enableHttp2", "filterRunning", "noProxy", "proxyFromEnvironment",
                    "proxyConnectHeader"}
PROM_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def check_service_monitor(resources, service, alert_job):
    sm, _ = one(resources, "ServiceMonitor")
    if sm is None or service is None:
        return
    if sm["apiVersion"] != "monitoring.coreos.com/v1":
        problem(f"servicemonitor: apiVersion {sm['apiVersion']}")
    spec = sm.get("spec") or {}
    unknown_keys("servicemonitor spec", spec, SM_SPEC_KEYS)
    if not selector_matches(spec.get("selector"), service["metadata"].get("labels") or {}):
        problem("servicemonitor: spec.selector does not match the Service's labels")
    ns = spec.get("namespaceSelector")
    if ns and not ns.get("any") and not ns.get("matchNames"):
        problem("servicemonitor: namespaceSelector selects nothing")
    port_names = {p.get("name") for p in service["spec"].get("ports") or []}
    endpoints = spec.get("endpoints") or []
    if not endpoints:
        problem("servicemonitor: no endpoints")
    for i, ep in enumerate(endpoints):
        unknown_keys(f"servicemonitor endpoints[{i}]", ep, SM_ENDPOINT_KEYS)
        if ep.get("port") not in port_names:
            problem(f"servicemonitor: endpoint port {ep.get('port')!r} is not a port name of the Service {sorted(port_names)}")
        if ep.get("path", "/metrics") != "/metrics":
            problem(f"servicemonitor: path {ep.get('path')} is not /metrics")
        if ep.get("scheme", "http") != "http":
            problem(f"servicemonitor: scheme {ep.get('scheme')} (paysync serves plain HTTP)")
        for key in ("interval", "scrapeTimeout"):
            if key in ep and not PROM_DURATION.match(str(ep[key])):
                problem(f"servicemonitor: {key} {ep[key]!r} is not a Prometheus duration")
        if "interval" in ep and "scrapeTimeout" in ep and PROM_DURATION.match(str(ep["interval"])) \
                and PROM_DURATION.match(str(ep["scrapeTimeout"])) \
                and duration_seconds(ep["scrapeTimeout"]) > duration_seconds(ep["interval"]):
            problem("servicemonitor: scrapeTimeout is longer than interval")
    job = (service["metadata"].get("labels") or {}).get(spec["jobLabel"]) if spec.get("jobLabel") \
        else service["metadata"]["name"]
    if alert_job and job != alert_job:
        problem(f"servicemonitor: targets get job={job!r}, but PaysyncDown selects up{{job={alert_job!r}}}")
    checked(f"ServiceMonitor selects Service {service['metadata']['name']} and scrapes its port(s) "
            f"{[ep.get('port') for ep in endpoints]} at /metrics; job label {job!r} = the alerts' job")


def check_pdb(resources, facts):
    pdb, _ = one(resources, "PodDisruptionBudget")
    if pdb is None:
        return
    spec = pdb["spec"]
    if not selector_matches(spec.get("selector"), facts["pod_labels"]):
        problem("pdb: its selector does not match the Deployment's pod labels")
    if "maxUnavailable" not in spec:
        problem("pdb: no maxUnavailable (minAvailable blocks draining a single replica)")
    elif spec["maxUnavailable"] in (0, "0", "0%"):
        problem("pdb: maxUnavailable 0 blocks every drain")
    checked(f"PodDisruptionBudget selects the pods, maxUnavailable {spec.get('maxUnavailable')}")


SO_SPEC_KEYS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback",
                "advanced", "triggers"}
SO_KAFKA_KEYS = {"bootstrapServers", "consumerGroup", "topic", "lagThreshold",
                 "activationLagThreshold", "offsetResetPolicy", "allowIdleConsumers",
                 "scaleToZeroOnInvalidOffset", "excludePersistentLag", "version",
                 "partitionLimitation", "limitToPartitionsWithLag", "ensureEvenDistributionOfPartitions",
                 "sasl", "tls", "unsafeSsl", "saslTokenProvider", "awsRegion", "awsEndpoint"}


def check_scaled_object(resources, facts, config):
    so, _ = one(resources, "ScaledObject")
    if so is None:
        return
    deployment = facts["deployment"]
    if so["apiVersion"] != "keda.sh/v1alpha1":
        problem(f"scaledobject: apiVersion {so['apiVersion']}")
    spec = so.get("spec") or {}
    unknown_keys("scaledobject spec", spec, SO_SPEC_KEYS)
    ref = spec.get("scaleTargetRef") or {}
    if ref.get("name") != deployment["metadata"]["name"] or ref.get("kind", "Deployment") != "Deployment" \
            or ref.get("apiVersion", "apps/v1") != "apps/v1":
        problem(f"scaledobject: scaleTargetRef {ref} is not the Deployment {deployment['metadata']['name']}")
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    for key, v in (("minReplicaCount", lo), ("maxReplicaCount", hi)):
        if not isinstance(v, int):
            problem(f"scaledobject: {key} {v!r} is not an integer")
    if isinstance(lo, int) and lo < 1:
        problem(f"scaledobject: minReplicaCount {lo}: re-checks come due with no input lag, keep at least 1")
    partitions = compose_input_partitions()
    if partitions is not None and partitions != INPUT_PARTITIONS:
        problem(f"INPUT_PARTITIONS is {INPUT_PARTITIONS} in this script, docker-compose.yml creates "
                f"the input topic with {partitions}")
    if isinstance(hi, int) and hi > INPUT_PARTITIONS:
        problem(f"scaledobject: maxReplicaCount {hi} exceeds the input topic's {INPUT_PARTITIONS} partitions")
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        problem("scaledobject: minReplicaCount > maxReplicaCount")
    replicas = deployment["spec"].get("replicas", 1)
    if all(isinstance(v, int) for v in (lo, hi, replicas)) and not lo <= replicas <= hi:
        problem(f"deployment: replicas {replicas} outside the ScaledObject's {lo}..{hi}")

    # HPA behavior: validate with the HorizontalPodAutoscaler schema
    behavior = dig(spec, "advanced.horizontalPodAutoscalerConfig.behavior")
    if behavior is not None:
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": "check"},
               "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                        "maxReplicas": 1, "behavior": behavior}}
        try:
            kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)
        except ValidationError as e:
            problem(f"scaledobject: advanced.horizontalPodAutoscalerConfig.behavior: "
                    f"{'.'.join(str(p) for p in e.path)}: {e.message}")

    input_topic = setting(config, "kafka.input_topic")
    rechecks = recheck_topics(config)
    triggers = spec.get("triggers") or []
    kafka = [t for t in triggers if t.get("type") == "kafka"]
    if not kafka:
        problem("scaledobject: no kafka trigger")
    for t in triggers:
        md = t.get("metadata") or {}
        for k, v in md.items():
            if not isinstance(v, str):
                problem(f"scaledobject: trigger metadata {k} is {type(v).__name__}, KEDA wants strings (quote it)")
        if t.get("type") != "kafka":
            continue
        unknown_keys("scaledobject kafka trigger metadata", md, SO_KAFKA_KEYS)
        topic = md.get("topic")
        if not topic:
            problem("scaledobject: the kafka trigger names no topic (it would scale on every topic of the group)")
        elif topic in rechecks or ".recheck." in topic:
            problem(f"scaledobject: trigger topic {topic} is a re-check topic (they lag by design)")
        elif topic != input_topic:
            problem(f"scaledobject: trigger topic {topic} is not the input topic {input_topic}")
        if md.get("consumerGroup") != setting(config, "kafka.group_id"):
            problem(f"scaledobject: consumerGroup {md.get('consumerGroup')} is not kafka.group_id "
                    f"{setting(config, 'kafka.group_id')}")
        brokers = {b.strip() for b in str(setting(config, "kafka.brokers")).split(",")}
        if {b.strip() for b in str(md.get("bootstrapServers", "")).split(",")} != brokers:
            problem(f"scaledobject: bootstrapServers {md.get('bootstrapServers')} are not kafka.brokers "
                    f"{setting(config, 'kafka.brokers')}")
        if not re.fullmatch(r"[1-9][0-9]*", str(md.get("lagThreshold", ""))):
            problem(f"scaledobject: lagThreshold {md.get('lagThreshold')!r} is not a positive integer string")
        if md.get("offsetResetPolicy", "latest") != "earliest":
            problem("scaledobject: offsetResetPolicy is not earliest (paysync's auto.offset.reset)")
        if md.get("allowIdleConsumers", "false") == "true":
            problem("scaledobject: allowIdleConsumers true scales past the partition count")
    checked(f"ScaledObject scales Deployment {ref.get('name')} {lo}..{hi} (<= {INPUT_PARTITIONS} input "
            f"partitions) on group {setting(config, 'kafka.group_id')}'s lag on {input_topic}, "
            f"not on the re-check topics {sorted(rechecks)}")


def recheck_topics(config):
    prefix = dig(config, "kafka.recheck_topic_prefix") or f"{setting(config, 'kafka.input_topic')}.recheck"
    topics = set()
    for name, conn in (config.get("connectors") or {}).items():
        follow = conn.get("follow")
        if follow is None:
            continue
        schedule = follow.get("schedule", [["60s", 1], ["300s", 5]])
        for delay, _count in schedule:
            topics.add(f"{prefix}.{int(duration_seconds(delay))}s")
    return topics


# ----------------------------------------------------------------------- alerting

def load_alerts():
    try:
        doc = load_yaml_docs(ALERTS)[0]
    except (OSError, yaml.YAMLError, IndexError) as e:
        problem(f"alerts.yml: {e}")
        return None, []
    rules = [r for g in doc.get("groups") or [] for r in g.get("rules") or [] if "alert" in r]
    return doc, rules


def check_alerts(rules):
    names = [r["alert"] for r in rules]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problem(f"alerts.yml: alert {n} is defined twice")
    for r in rules:
        name, labels, ann = r["alert"], r.get("labels") or {}, r.get("annotations") or {}
        if labels.get("severity") not in SEVERITIES:
            problem(f"alert {name}: severity {labels.get('severity')!r} is not one of {sorted(SEVERITIES)}")
        if labels.get("team") != TEAM:
            problem(f"alert {name}: team {labels.get('team')!r} is not {TEAM!r}")
        for key in ("summary", "description", "runbook_url"):
            if not str(ann.get(key, "")).strip():
                problem(f"alert {name}: no {key} annotation")
        want = RUNBOOK_BASE + runbook_anchor(name)
        if ann.get("runbook_url") and ann["runbook_url"] != want:
            problem(f"alert {name}: runbook_url {ann['runbook_url']} is not {want}")
        expr = str(r.get("expr", ""))
        for metric in ("paysync_consumer_lag", "paysync_commit_watermark_stuck_seconds"):
            for m in re.finditer(re.escape(metric) + r"\b(\{[^}]*\})?", expr):
                if "topic" not in (m.group(1) or ""):
                    problem(f"alert {name}: {metric} without a topic matcher "
                            f"(re-check topics lag by design: select the input topic)")
    checked(f"{len(rules)} alerts have severity ({'|'.join(sorted(SEVERITIES))}) and team labels, "
            f"summary, description and runbook_url; lag/watermark alerts select a topic")
    return names


def runbook_anchor(alert):
    """GitHub's anchor of the heading "Runbook: <alert>"."""
    heading = f"Runbook: {alert}".strip().lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def check_runbook_headings(names, require):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                    for h in re.findall(r"^#{1,6}\s+(.*)$", f.read(), re.M)}
    missing = [n for n in names if runbook_anchor(n) not in headings]
    if not missing:
        checked("README has a \"Runbook: <alert>\" heading for every alert")
    elif require:
        for n in missing:
            problem(f"README has no heading \"Runbook: {n}\" (anchor #{runbook_anchor(n)})")
    else:
        notes.append(f"README has no \"Runbook: <alert>\" heading yet for {len(missing)} alert(s) "
                     f"({', '.join(missing)}); --require-runbooks makes this an error")


def check_alert_tests(names):
    try:
        doc = load_yaml_docs(ALERTS_TEST)[0]
    except (OSError, yaml.YAMLError, IndexError) as e:
        problem(f"alerts_test.yml: {e}")
        return
    if os.path.basename(ALERTS) not in [os.path.basename(f) for f in doc.get("rule_files") or []]:
        problem("alerts_test.yml: rule_files does not load alerts.yml")
    firing, quiet = set(), set()
    for t in doc.get("tests") or []:
        for a in t.get("alert_rule_test") or []:
            (firing if a.get("exp_alerts") else quiet).add(a.get("alertname"))
    for n in names:
        if n not in firing:
            problem(f"alerts_test.yml: no case where {n} fires")
        if n not in quiet:
            problem(f"alerts_test.yml: no case where {n} does not fire")
    for n in sorted((firing | quiet) - set(names)):
        problem(f"alerts_test.yml tests {n}, which alerts.yml does not define")
    checked(f"alerts_test.yml has a firing and a not-firing case for each of the {len(names)} alerts")


def alert_job(rules):
    for r in rules:
        m = re.search(r'\bup\{[^}]*job="([^"]+)"', str(r.get("expr", "")))
        if m:
            return m.group(1)
    return None


def prometheus_rule(alerts_doc):
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "paysync",
                     "labels": {"app.kubernetes.io/name": "paysync", "app.kubernetes.io/instance": "paysync"}},
        "spec": {"groups": alerts_doc["groups"]},
    }


def write_prometheus_rule(alerts_doc):
    text = GENERATED_HEADER + yaml.dump(prometheus_rule(alerts_doc), Dumper=_LiteralDumper,
                                        sort_keys=False, width=1000, allow_unicode=True)
    with open(PROMETHEUS_RULE, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"  wrote {os.path.relpath(PROMETHEUS_RULE, ROOT)}")


def check_prometheus_rule(resources, alerts_doc):
    found = [(doc, f) for (k, _), (doc, f) in resources.items() if k == "PrometheusRule"]
    if not found:
        notes.append("no PrometheusRule in deploy/kubernetes (optional)")
        return
    doc, file = found[0]
    if alerts_doc is not None and doc != prometheus_rule(alerts_doc):
        problem(f"{file} is not alerts.yml wrapped in a PrometheusRule: run "
                f"python tests/deploy/check_deploy.py --write")
    checked(f"{file} holds exactly alerts.yml's groups")


def write_checksum(resources):
    deployment, dfile = one(resources, "Deployment")
    if deployment is None:
        return
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    text, _ = config_from_deployment(resources, deployment, c)
    if text is None:
        return
    path = os.path.join(K8S_DIR, dfile)
    with open(path, encoding="utf-8") as f:
        body = f.read()
    new = re.sub(r'(checksum/config:\s*)"[^"]*"', r'\g<1>"%s"' % hashlib.sha256(text.encode()).hexdigest(), body)
    if new != body:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
        print(f"  wrote checksum/config in {dfile}")


def run_promtool(require):
    promtool = shutil.which("promtool")
    if not promtool:
        if require:
            problem("promtool is not on PATH (Debian: apt-get install prometheus)")
        else:
            notes.append("promtool is not on PATH: rules not compiled or unit-tested "
                         "(Debian: apt-get install prometheus; --require-promtool makes this an error)")
        return
    version = subprocess.run([promtool, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    for args in (["check", "rules", ALERTS], ["test", "rules", ALERTS_TEST]):
        run = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=ROOT)
        out = re.sub(r"\n\s*\n+", "\n", (run.stdout + run.stderr).strip())
        if run.returncode != 0:
            problem(f"promtool {' '.join(args[:2])} failed:\n{out}")
        else:
            last = [line.strip() for line in out.splitlines() if line.strip()][-1]
            checked(f"promtool {args[0]} {args[1]} {os.path.relpath(args[2], ROOT)}: {last} ({version})")


# ---------------------------------------------------------------- paysync binary

def paysync_binary():
    candidates = [os.environ.get("PAYSYNC_BIN"),
                  os.path.join(ROOT, "target", "debug", "paysync"),
                  os.path.join(ROOT, "target", "release", "paysync")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def check_with_paysync(resources, facts):
    binary = paysync_binary()
    if not binary:
        notes.append("no paysync binary (PAYSYNC_BIN, target/debug or target/release): "
                     "`paysync check-config` not run on the ConfigMap")
        return
    config, text = facts.get("config"), facts.get("config_text")
    if config is None:
        return
    deployment, c = facts["deployment"], facts["container"]
    with tempfile.TemporaryDirectory() as tmp:
        # Put every secret file where the config reads it: the Secret's value, under
        # the temporary directory instead of the mount path.
        for key, src in secret_sources(config):
            if "file" not in src:
                continue
            mount, volume = mount_for(deployment, c, src["file"])
            if not volume or "secret" not in volume:
                continue
            secret = resources.get(("Secret", volume["secret"]["secretName"]), (None, None))[0] or {}
            rel = os.path.relpath(src["file"], mount["mountPath"])
            skey = next((i["key"] for i in volume["secret"].get("items") or [] if i["path"] == rel), rel)
            value = (secret.get("stringData") or {}).get(skey)
            if value is None and skey in (secret.get("data") or {}):
                value = base64.b64decode(secret["data"][skey]).decode("utf-8")
            local = os.path.join(tmp, "secrets", src["file"].lstrip("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "w", encoding="utf-8") as f:
                f.write((value or "") + "\n")
            text = text.replace(f'"{src["file"]}"', f'"{local}"')
        path = os.path.join(tmp, "paysync.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSYNC_")}
        env.update({e["name"]: e["value"] for e in c.get("env") or [] if "value" in e})
        if deployment["spec"]["template"]["spec"].get("enableServiceLinks", True):
            # What the kubelet injects for a Service named paysync: must not be settings.
            env.update({"PAYSYNC_SERVICE_HOST": "10.0.0.10", "PAYSYNC_SERVICE_PORT": "9464",
                        "PAYSYNC_SERVICE_PORT_METRICS": "9464", "PAYSYNC_PORT": "tcp://10.0.0.10:9464",
                        "PAYSYNC_PORT_9464_TCP": "tcp://10.0.0.10:9464", "PAYSYNC_PORT_9464_TCP_PROTO": "tcp",
                        "PAYSYNC_PORT_9464_TCP_PORT": "9464", "PAYSYNC_PORT_9464_TCP_ADDR": "10.0.0.10"})
        run = subprocess.run([binary, "check-config", "--config", path], env=env, capture_output=True, text=True)
        if run.returncode != 0:
            problem(f"paysync check-config refuses the ConfigMap's paysync.toml (exit {run.returncode}): "
                    f"{(run.stderr or run.stdout).strip()}")
            return
        topics = subprocess.run([binary, "check-config", "--topics", "--config", path], env=env,
                                capture_output=True, text=True)
        listed = [t.strip() for t in topics.stdout.splitlines() if t.strip() and not t.startswith("#")]
        missing = (recheck_topics(config) | {setting(config, "kafka.input_topic")}) - set(listed)
        if topics.returncode != 0 or missing:
            problem(f"paysync check-config --topics: {topics.stderr.strip() or f'does not list {sorted(missing)}'}")
            return
    checked(f"{os.path.relpath(binary, ROOT)} check-config accepts the ConfigMap's paysync.toml "
            f"with the Secret's files; topics to create: {', '.join(listed)}")


# ---------------------------------------------------------------------------- grafana

def check_dashboard():
    """Every metric paysync registers (src/telemetry/mod.rs) is on the Grafana dashboard."""
    import json
    source = open(os.path.join(ROOT, "src", "telemetry", "mod.rs"), encoding="utf-8").read()
    registered = set(re.findall(r'"(paysync_[a-z_]+)"', source))
    path = os.path.join(ROOT, "deploy", "grafana", "dashboards", "paysync.json")
    dashboard = json.load(open(path, encoding="utf-8"))
    exprs = " ".join(t.get("expr", "") for p in dashboard.get("panels", []) for t in p.get("targets", []))
    shown = set(re.findall(r"paysync_[a-z_]+", exprs))
    suffixes = ("_bucket", "_sum", "_count")
    shown |= {n[: -len(suf)] for n in shown for suf in suffixes if n.endswith(suf)}
    missing = sorted(registered - shown)
    if missing:
        problem(f"the Grafana dashboard has no panel for {', '.join(missing)}")
        return
    checked(f"the Grafana dashboard shows all {len(registered)} metrics paysync registers")


# ---------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true",
                        help="regenerate prometheusrule.yaml and the checksum/config annotation first")
    parser.add_argument("--require-promtool", action="store_true",
                        help="fail when promtool is not on PATH")
    parser.add_argument("--require-runbooks", action="store_true",
                        help="fail when README lacks a 'Runbook: <alert>' heading for an alert")
    args = parser.parse_args()

    alerts_doc, rules = load_alerts()
    if args.write:
        print("--write:")
        if alerts_doc is not None:
            write_prometheus_rule(alerts_doc)
        write_checksum(load_manifests()[0])
        problems.clear()

    print("deploy/kubernetes:")
    resources, files = load_manifests()
    guarded(check_kustomization, files)
    guarded(check_schemas, resources)
    docker = dockerfile_facts()
    facts = guarded(check_deployment, resources, docker)
    config = guarded(check_config_facts, resources, facts, docker) if facts else None
    service = guarded(check_service, resources, facts) if facts else None
    guarded(check_service_monitor, resources, service, alert_job(rules))
    if facts:
        guarded(check_pdb, resources, facts)
    if facts and config is not None:
        guarded(check_scaled_object, resources, facts, config)
    guarded(check_prometheus_rule, resources, alerts_doc)
    if facts:
        guarded(check_with_paysync, resources, facts)

    print("deploy/grafana:")
    guarded(check_dashboard)

    print("deploy/prometheus:")
    names = guarded(check_alerts, rules) or []
    guarded(check_alert_tests, names)
    guarded(check_runbook_headings, names, args.require_runbooks)
    guarded(run_promtool, args.require_promtool)

    for n in notes:
        print(f"  note {n}")
    if problems:
        print(f"\n{len(problems)} deployment problem(s):", *problems, sep="\n  - ")
        sys.exit(1)
    print("OK: manifests validate, their cross-references hold, every alert is labelled, "
          "documented and tested")


if __name__ == "__main__":
    main()
