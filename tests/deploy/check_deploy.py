#!/usr/bin/env python3
"""Checks the deployment files without a cluster: deploy/kubernetes/*.yaml and the
alerting rules deploy/prometheus/alerts.yml (with their tests alerts_test.yml).

1. Every manifest parses (PyYAML), names no namespace, and kustomization.yaml lists
   exactly the manifests in the folder. There are two Deployments, each with a
   Service, ServiceMonitor, PodDisruptionBudget and ScaledObject of its own name:
   the processor `paysync` (`paysync run --role processor`) and the webhook intake
   `paysync-webhooks` (`--role webhooks`); both read the one ConfigMap and Secret.
2. Core resources (ConfigMap, Secret, Deployments, Services, PodDisruptionBudgets)
   validate against the Kubernetes OpenAPI schemas of KUBERNETES_VERSION in strict
   mode (unknown fields are errors), with the schemas bundled in the PyPI package
   kubernetes-validate (no network). Each KEDA ScaledObject's HPA behavior is
   validated against the HorizontalPodAutoscaler schema the same way.
3. The custom resources (ServiceMonitors, ScaledObjects, PrometheusRule) have no
   schema there, so the fields that matter are checked by hand (known keys, types,
   values; the keys of KEDA's kafka and prometheus triggers).
4. Cross-cutting facts, for both Deployments: the container runs the Deployment's
   role (--role processor / --role webhooks, never the default all); the probes ask
   /healthz, and for readiness /readyz (processor) or /readyz/webhooks (intake), on
   the container port of paysync.toml's http.listen (which must listen on all
   interfaces); the pod runs as the Dockerfile's non-root user with a read-only root
   filesystem, no privilege escalation, no capabilities, seccomp RuntimeDefault, no
   service account token; both run the same image; every secret the config reads
   from a file is a key of the mounted Secret, readable by that user; the config
   checksum annotation matches the ConfigMap on both; each Deployment's selector,
   Service, PDB and anti-affinity select its own pods and none of the other's, and
   each ServiceMonitor selects only its own Service and scrapes the port that reaches
   http.listen.
   The processor: terminationGracePeriodSeconds > processing.shutdown_timeout; it
   declares no container port for webhooks.listen; its PDB sets a non-zero
   maxUnavailable; its ScaledObject scales it on the input topic (never a re-check
   topic) of the config's group and brokers, with maxReplicaCount <=
   INPUT_PARTITIONS (checked against docker-compose.yml's kafka-init); its
   ServiceMonitor's job is the one PaysyncDown selects.
   The intake: paysync.toml has a [webhooks] table whose listen is on all interfaces
   and is the container port named `webhooks`, which its Service targets; that
   Service does not publish not-ready addresses (an unready intake gets no
   webhooks); terminationGracePeriodSeconds > the preStop sleep + the intake's drain
   and flush (INTAKE_SHUTDOWN_SECONDS); its PDB keeps minAvailable >= 1 below the
   minimum replica count; its ScaledObject targets it with prometheus triggers only
   (known metadata keys, serverAddress an http(s) URL, a positive threshold) whose
   query is sum(...) over the rate of paysync_webhooks_total with job = the intake
   Service's name (its ServiceMonitor's job label), valid PromQL when promtool is
   on PATH, minReplicaCount >= 2 and the Deployment's replicas within min..max.
   prometheusrule.yaml holds exactly alerts.yml's groups.
5. Every alert has severity (page|ticket) and team labels, a summary, a description
   and a runbook_url to the README anchor runbook-<alert name in lower case>; lag and
   watermark alerts select a topic; every alert has a firing and a not-firing case in
   alerts_test.yml.
6. When promtool is on PATH: `promtool check rules` and `promtool test rules`
   (--require-promtool makes its absence an error; Debian: apt-get install prometheus).
7. When a paysync binary is at hand (PAYSYNC_BIN, target/debug/paysync or
   target/release/paysync): `paysync check-config` accepts the ConfigMap's file, with
   its secret files in place and each Deployment's environment, and `check-config
   --topics` lists the topics to create.

Usage:
  python tests/deploy/check_deploy.py            check; exit 1 with the problems
  python tests/deploy/check_deploy.py --write    regenerate prometheusrule.yaml from
                                                 alerts.yml and both Deployments'
                                                 checksum/config annotations, then check
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
    "webhooks.listen": "0.0.0.0:9465",
}
# The two Deployments of deploy/kubernetes and the role each runs (`paysync run
# --role`): the processor, and the webhook intake apart from it. Each has a Service, a
# ServiceMonitor, a PodDisruptionBudget and a ScaledObject of its own name.
PROCESSOR = "paysync"
INTAKE = "paysync-webhooks"
ROLES = {PROCESSOR: "processor", INTAKE: "webhooks"}
PER_DEPLOYMENT_KINDS = ("Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget", "ScaledObject")
# What the readiness probe asks, per role (src/server.rs): the intake's own readiness
# is /readyz/webhooks on http.listen.
READINESS_PATHS = {"processor": "/readyz", "webhooks": "/readyz/webhooks"}
# The intake's container port for webhooks.listen, which its Service targets.
INTAKE_PORT_NAME = "webhooks"
# The intake's shutdown: open connections get up to 6 s (src/intake/server.rs), then
# its producer is flushed for up to 5 s (RunningApp::stop in src/app.rs).
INTAKE_SHUTDOWN_SECONDS = 6 + 5
# The intake's request counter, which its ScaledObject scales on.
INTAKE_METRIC = "paysync_webhooks_total"
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


def named(resources, kind, name):
    """The (doc, file) of the manifest kind/name; a problem when it is missing."""
    found = resources.get((kind, name))
    if found is None:
        problem(f"no {kind} {name} in deploy/kubernetes")
        return None, None
    return found


def check_resource_set(resources):
    """One Deployment, Service, ServiceMonitor, PDB and ScaledObject per role, by name."""
    for kind in PER_DEPLOYMENT_KINDS:
        names = {n for (k, n) in resources if k == kind}
        if names != set(ROLES):
            problem(f"{kind}s are {sorted(names)}; expected exactly {sorted(ROLES)} "
                    f"(the processor's and the webhook intake's)")
    checked(f"a Deployment, Service, ServiceMonitor, PodDisruptionBudget and ScaledObject each for "
            f"{' and '.join(f'{n} (--role {r})' for n, r in ROLES.items())}")


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


def config_from_deployment(resources, deployment, container, where="deployment"):
    """(text, parsed) of the config file the container's --config names, followed
    through its volume mount to a ConfigMap key."""
    args = (container.get("command") or []) + (container.get("args") or [])
    if "--config" not in args or args.index("--config") + 1 >= len(args):
        problem(f"{where}: the container's arguments have no --config FILE")
        return None, None
    path = args[args.index("--config") + 1]
    mount, volume = mount_for(deployment, container, path)
    if not volume or "configMap" not in volume:
        problem(f"{where}: --config {path} is not on a ConfigMap volume")
        return None, None
    rel = os.path.relpath(path, mount["mountPath"])
    key = rel
    items = volume["configMap"].get("items")
    if items:
        key = next((i["key"] for i in items if i["path"] == rel), None)
    cm_name = volume["configMap"].get("name")
    cm = resources.get(("ConfigMap", cm_name), (None, None))[0]
    if cm is None:
        problem(f"{where}: ConfigMap {cm_name} (the config volume) is not in the manifests")
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
    checked(f"{where}: --config {path} is ConfigMap {cm_name} key {key} (valid TOML)")
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


def listen_port(listen, key="http.listen"):
    m = re.fullmatch(r"\[?([^\]]*)\]?:(\d+)", listen)
    if not m:
        problem(f"{key} {listen!r} is not HOST:PORT")
        return None, None
    return m.group(1), int(m.group(2))


def resolve_port(container, port):
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def run_role(container):
    """The role `paysync run` gets: --role ROLE (or --role=ROLE), else $PAYSYNC_ROLE,
    else all (clap: the argument wins over the environment)."""
    args = (container.get("command") or [])[1:] + (container.get("args") or [])
    for i, a in enumerate(args):
        if a == "--role" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--role="):
            return a.split("=", 1)[1]
    env = {e["name"]: e.get("value") for e in container.get("env") or []}
    return env.get("PAYSYNC_ROLE") or "all"


def check_deployment(resources, docker, name):
    deployment, dfile = named(resources, "Deployment", name)
    if deployment is None:
        return None
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"].get("labels") or {}
    containers = [c for c in pod["containers"] if c["name"] == "paysync"] or pod["containers"][:1]
    c = containers[0]
    facts = {"name": name, "role": ROLES[name], "deployment": deployment, "container": c,
             "pod_labels": pod_labels, "file": dfile}

    # image, arguments and role
    image = c.get("image", "")
    if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        problem(f"{dfile}: image {image!r} is not pinned to a tag")
    if c.get("command") and c["command"][0] != docker["entrypoint"]:
        problem(f"{dfile}: command {c['command']} replaces the image's ENTRYPOINT {docker['entrypoint']}")
    if (c.get("args") or [None])[0] != "run":
        problem(f"{dfile}: args {c.get('args')} do not start with `run` (the ENTRYPOINT is {docker['entrypoint']})")
    role = run_role(c)
    if role != ROLES[name]:
        why = {("processor", "all"): " (it would run the webhook intake too, on the processor's pods)",
               ("webhooks", "all"): " (it would run the processor too, joining the consumer group)"}
        problem(f"{dfile}: Deployment {name} runs `paysync run --role {role}`, not --role {ROLES[name]}"
                + why.get((ROLES[name], role), ""))
    checked(f"{dfile}: image {image}, args {c.get('args')} after ENTRYPOINT {docker['entrypoint']} "
            f"(--role {ROLES[name]})")

    # security
    psc, csc = pod.get("securityContext") or {}, c.get("securityContext") or {}

    def effective(key):
        return csc.get(key, psc.get(key))

    if effective("runAsNonRoot") is not True:
        problem(f"{dfile}: runAsNonRoot is not true")
    if effective("runAsUser") != docker["uid"]:
        problem(f"{dfile}: runAsUser {effective('runAsUser')} is not the Dockerfile's USER {docker['uid']}")
    if docker["gid"] is not None and effective("runAsGroup") not in (None, docker["gid"]):
        problem(f"{dfile}: runAsGroup {effective('runAsGroup')} is not the Dockerfile's group {docker['gid']}")
    if csc.get("readOnlyRootFilesystem") is not True:
        problem(f"{dfile}: readOnlyRootFilesystem is not true")
    if csc.get("allowPrivilegeEscalation") is not False:
        problem(f"{dfile}: allowPrivilegeEscalation is not false")
    if csc.get("privileged"):
        problem(f"{dfile}: the container is privileged")
    if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
        problem(f"{dfile}: capabilities do not drop ALL")
    if (csc.get("capabilities") or {}).get("add"):
        problem(f"{dfile}: capabilities are added")
    if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problem(f"{dfile}: seccompProfile is not RuntimeDefault")
    if pod.get("automountServiceAccountToken") is not False:
        problem(f"{dfile}: automountServiceAccountToken is not false (paysync never calls the Kubernetes API)")
    checked(f"{dfile}: runs as non-root uid {effective('runAsUser')} (the Dockerfile's USER), read-only root, "
            f"no privilege escalation, capabilities drop ALL, seccomp {(effective('seccompProfile') or {}).get('type')}, "
            f"no service account token")

    # resources
    res = c.get("resources") or {}
    try:
        for path in ("requests.cpu", "requests.memory", "limits.memory"):
            if dig(res, path) is None:
                problem(f"{dfile}: resources.{path} is not set")
        if dig(res, "requests.memory") and dig(res, "limits.memory") and \
                quantity(res["requests"]["memory"]) > quantity(res["limits"]["memory"]):
            problem(f"{dfile}: memory request exceeds its limit")
    except ValueError as e:
        problem(f"{dfile}: resources: {e}")
    checked(f"{dfile}: resources {res}")

    # anti-affinity (that no term selects the other Deployment's pods: check_selectors)
    terms = dig(pod, "affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution") or []
    if not any(selector_matches(t["podAffinityTerm"].get("labelSelector"), pod_labels) for t in terms):
        problem(f"{dfile}: no preferred pod anti-affinity term selects the Deployment's own pods")
    checked(f"{dfile}: preferred pod anti-affinity selects {name}'s own pods")

    # volumes and mounts
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = {m["name"] for m in c.get("volumeMounts") or []}
    for m in sorted(mounts - set(volumes)):
        problem(f"{dfile}: volumeMount {m} has no volume")
    for v in sorted(set(volumes) - mounts):
        problem(f"{dfile}: volume {v} is not mounted")
    for v in volumes.values():
        if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in resources:
            problem(f"{dfile}: volume {v['name']}: ConfigMap {v['configMap']['name']} is not in the manifests")
        if "secret" in v and ("Secret", v["secret"]["secretName"]) not in resources:
            problem(f"{dfile}: volume {v['name']}: Secret {v['secret']['secretName']} is not in the manifests")
    checked(f"{dfile}: volumes {sorted(volumes)} are mounted and name resources of these manifests")
    return facts


def check_probes(facts, listen_port_number):
    """The probes ask the role's paths on the container port of http.listen."""
    c, dfile = facts["container"], facts["file"]
    wanted = {"livenessProbe": "/healthz", "startupProbe": "/healthz",
              "readinessProbe": READINESS_PATHS[facts["role"]]}
    for probe, path in wanted.items():
        p = c.get(probe)
        if p is None:
            if probe != "startupProbe":
                problem(f"{dfile}: no {probe}")
            continue
        get = p.get("httpGet")
        if not get:
            problem(f"{dfile}: {probe} is not an httpGet probe")
            continue
        if get.get("path") != path:
            problem(f"{dfile}: {probe} asks {get.get('path')}, not {path}")
        if resolve_port(c, get.get("port")) != listen_port_number:
            problem(f"{dfile}: {probe} port {get.get('port')} is not http.listen's port {listen_port_number}")
        if get.get("scheme", "HTTP") != "HTTP":
            problem(f"{dfile}: {probe} uses {get.get('scheme')}; paysync serves plain HTTP")


def check_config_facts(resources, facts, docker):
    deployment, c, dfile, role = facts["deployment"], facts["container"], facts["file"], facts["role"]
    pod = deployment["spec"]["template"]["spec"]
    text, config = config_from_deployment(resources, deployment, c, dfile)
    if config is None:
        return None
    facts["config"], facts["config_text"] = config, text

    # checksum annotation
    want = hashlib.sha256(text.encode("utf-8")).hexdigest()
    got = (deployment["spec"]["template"]["metadata"].get("annotations") or {}).get("checksum/config")
    if got != want:
        problem(f"{dfile}: annotation checksum/config is {got!r}, the ConfigMap's paysync.toml has "
                f"sha256 {want} (run with --write, or paste it)")
    checked(f"{dfile}: pod annotation checksum/config is the sha256 of paysync.toml (a config change rolls the pods)")

    # listen addresses, container ports and probes
    host, port = listen_port(str(setting(config, "http.listen")))
    if host not in ("0.0.0.0", "::"):
        problem(f"http.listen host {host!r}: the kubelet probes and Prometheus scrapes the pod IP, "
                f"so listen on 0.0.0.0 (or ::)")
    ports = {p.get("containerPort") for p in c.get("ports") or []}
    if port not in ports:
        problem(f"{dfile}: no containerPort {port} (http.listen)")
    facts["metrics_port"] = port
    webhooks = config.get("webhooks")
    w_host, w_port = listen_port(str(setting(config, "webhooks.listen")), "webhooks.listen") \
        if webhooks is not None else (None, None)
    if role == "webhooks":
        if webhooks is None:
            problem(f"{dfile}: --role webhooks, but paysync.toml has no [webhooks] table "
                    f"(paysync refuses to start)")
        else:
            if w_host not in ("0.0.0.0", "::"):
                problem(f"webhooks.listen host {w_host!r}: the ingress reaches the pod IP, "
                        f"so listen on 0.0.0.0 (or ::)")
            if w_port == port:
                problem(f"webhooks.listen and http.listen share port {port}")
            declared = resolve_port(c, INTAKE_PORT_NAME)
            if declared != w_port:
                problem(f"{dfile}: container port {INTAKE_PORT_NAME!r} is {declared}, "
                        f"webhooks.listen's port is {w_port}")
            facts["webhooks_port"] = w_port
        checked(f"{dfile}: container port {INTAKE_PORT_NAME} {resolve_port(c, INTAKE_PORT_NAME)} is "
                f"webhooks.listen {setting(config, 'webhooks.listen')}; metrics {port} is http.listen")
    elif w_port is not None and w_port in ports:
        problem(f"{dfile}: the processor declares containerPort {w_port} (webhooks.listen), "
                f"but --role {role} opens no intake port")
    check_probes(facts, port)
    checked(f"{dfile}: probes: liveness/startup GET /healthz, readiness GET {READINESS_PATHS[role]} "
            f"on port {port} (http.listen {setting(config, 'http.listen')})")

    # shutdown
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if role == "webhooks":
        sleep = dig(c, "lifecycle.preStop.sleep.seconds", 0)
        need = sleep + INTAKE_SHUTDOWN_SECONDS
        if not grace > need:
            problem(f"{dfile}: terminationGracePeriodSeconds {grace} is not more than the preStop sleep "
                    f"({sleep}s) + the intake's drain and producer flush ({INTAKE_SHUTDOWN_SECONDS}s)")
        checked(f"{dfile}: terminationGracePeriodSeconds {grace} > preStop {sleep}s + intake drain and "
                f"flush {INTAKE_SHUTDOWN_SECONDS}s")
    else:
        shutdown = duration_seconds(setting(config, "processing.shutdown_timeout"))
        if not grace > shutdown:
            problem(f"{dfile}: terminationGracePeriodSeconds {grace} is not more than "
                    f"processing.shutdown_timeout {shutdown:g}s")
        checked(f"{dfile}: terminationGracePeriodSeconds {grace} > processing.shutdown_timeout {shutdown:g}s")

    # secrets
    env_names = {e["name"] for e in c.get("env") or []}
    has_env_from = bool(c.get("envFrom"))
    psc = pod.get("securityContext") or {}
    used_keys = facts["secret_keys"] = {}
    sources = list(secret_sources(config))
    found = []
    for key, src in sources:
        if "env" in src:
            if src["env"] not in env_names and not has_env_from:
                problem(f"config {key} reads ${src['env']}, which {dfile}'s container does not set")
            continue
        path = src["file"]
        mount, volume = mount_for(deployment, c, path)
        if not volume or "secret" not in volume:
            problem(f"config {key} reads {path}, which is not on a Secret volume in {dfile}")
            continue
        if not mount.get("readOnly"):
            problem(f"{dfile}: the Secret mount {mount['mountPath']} is not readOnly")
        rel = os.path.relpath(path, mount["mountPath"])
        secret_key, mode = rel, volume["secret"].get("defaultMode", 0o644)
        items = volume["secret"].get("items")
        if items:
            item = next((i for i in items if i["path"] == rel), None)
            if item is None:
                problem(f"config {key} reads {path}, but {dfile}'s Secret volume items have no path {rel}")
                continue
            secret_key, mode = item["key"], item.get("mode", mode)
        name = volume["secret"]["secretName"]
        secret = resources.get(("Secret", name), (None, None))[0]
        if secret is None:
            continue  # reported with the volumes
        keys = set(secret.get("data") or {}) | set(secret.get("stringData") or {})
        if secret_key not in keys:
            problem(f"{dfile}: config {key} reads {path}: Secret {name} has no key {secret_key!r} "
                    f"(keys: {sorted(keys)})")
            continue
        used_keys.setdefault(name, set()).add(secret_key)
        # Secret files are owned by root, group fsGroup when the pod sets one.
        readable = bool(mode & 0o004) or (bool(mode & 0o040) and psc.get("fsGroup") is not None)
        if not readable:
            problem(f"Secret file {path} (mode {mode:04o}) is not readable by uid "
                    f"{docker['uid']} in {dfile}: give other-read, or group-read with a pod fsGroup")
        found.append(f"{secret_key} (mode {mode:04o})")
    if sources:
        checked(f"{dfile}: the config's {len(sources)} secret files are keys of the mounted Secret, "
                f"read-only, readable by uid {docker['uid']}"
                + (f" via group {psc.get('fsGroup')}" if psc.get("fsGroup") else "") + f": {', '.join(found)}")
    return config


def note_unread_secret_keys(resources, facts):
    if not any("config" in f for f in facts.values()):
        return
    if not any(True for f in facts.values() for _ in secret_sources(f.get("config") or {})):
        notes.append("the config reads no secret from a file or the environment")
    for (kind, name), (doc, _) in resources.items():
        if kind == "Secret":
            keys = set(doc.get("data") or {}) | set(doc.get("stringData") or {})
            used = set().union(*[f.get("secret_keys", {}).get(name, set()) for f in facts.values()])
            for k in sorted(keys - used):
                notes.append(f"Secret {name} key {k} is not read by the config")


def check_selectors(resources, facts):
    """Each role's Deployment selector, anti-affinity, Service and PDB select its own pods
    and none of the other role's; each ServiceMonitor selects its own Service only."""
    pods = {n: f["pod_labels"] for n, f in facts.items()}
    for name, f in facts.items():
        deployment = f["deployment"]
        own = [(f"Deployment {name} spec.selector", deployment["spec"].get("selector"))]
        service = resources.get(("Service", name))
        if service:
            own.append((f"Service {name}", {"matchLabels": service[0]["spec"].get("selector") or {}}))
        pdb = resources.get(("PodDisruptionBudget", name))
        if pdb:
            own.append((f"PodDisruptionBudget {name}", pdb[0]["spec"].get("selector")))
        terms = dig(deployment["spec"]["template"]["spec"],
                    "affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution") or []
        anti = [(f"Deployment {name} anti-affinity term {i}", t["podAffinityTerm"].get("labelSelector"))
                for i, t in enumerate(terms)]
        for what, sel in own:
            if not selector_matches(sel, f["pod_labels"]):
                problem(f"{what}: its selector does not select Deployment {name}'s pods {f['pod_labels']}")
        for what, sel in own + anti:
            for other, labels in pods.items():
                if other != name and selector_matches(sel, labels):
                    problem(f"{what}: its selector also selects Deployment {other}'s pods {labels}")
    services = {n: doc for (k, n), (doc, _) in resources.items() if k == "Service"}
    for (kind, name), (sm, _) in resources.items():
        if kind != "ServiceMonitor":
            continue
        selected = sorted(n for n, s in services.items()
                          if selector_matches((sm.get("spec") or {}).get("selector"), s["metadata"].get("labels") or {}))
        if selected != [name]:
            problem(f"ServiceMonitor {name} selects the Services {selected}, not exactly Service {name}")
    instances = ", ".join(f"{n}: instance={f['pod_labels'].get('app.kubernetes.io/instance')}"
                          for n, f in facts.items())
    checked(f"selectors: each Deployment's selector, Service and PDB select its own pods and not the "
            f"other's ({instances}), no anti-affinity term selects the other's pods, each "
            f"ServiceMonitor selects its own Service only")
    images = {f["container"].get("image") for f in facts.values()}
    if len(images) > 1:
        problem(f"the Deployments run different images {sorted(images)}; they read the same paysync.toml")


def check_service(resources, facts):
    name = facts["name"]
    service, sfile = named(resources, "Service", name)
    if service is None:
        return None
    spec = service["spec"]
    c = facts["container"]
    for p in spec.get("ports") or []:
        target = p.get("targetPort", p.get("port"))
        if resolve_port(c, target) is None:
            problem(f"{sfile}: port {p.get('name')} targets {target}, which {facts['file']}'s container does not have")
    if spec.get("type", "ClusterIP") != "ClusterIP":
        problem(f"{sfile}: type {spec.get('type')} (ClusterIP: an ingress or load balancer fronts the intake)")
    targets = {resolve_port(c, p.get("targetPort", p.get("port"))) for p in spec.get("ports") or []}
    if facts["role"] == "webhooks":
        if facts.get("webhooks_port") is not None and facts["webhooks_port"] not in targets:
            problem(f"{sfile}: no port targets the intake's port {facts['webhooks_port']} (webhooks.listen)")
        if spec.get("publishNotReadyAddresses"):
            problem(f"{sfile}: publishNotReadyAddresses sends webhooks to unready intake pods")
    checked(f"{sfile}: Service {name} ports "
            f"{[(p.get('name'), p.get('port'), resolve_port(c, p.get('targetPort', p.get('port')))) for p in spec.get('ports') or []]}"
            + ("; unready pods leave its endpoints" if facts["role"] == "webhooks" else ""))
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


def check_service_monitor(resources, service, facts, alert_job):
    """Returns the job label the role's targets get."""
    name = facts["name"]
    sm, smfile = named(resources, "ServiceMonitor", name)
    if sm is None or service is None:
        return None
    if sm["apiVersion"] != "monitoring.coreos.com/v1":
        problem(f"{smfile}: apiVersion {sm['apiVersion']}")
    spec = sm.get("spec") or {}
    unknown_keys(f"{smfile} spec", spec, SM_SPEC_KEYS)
    if not selector_matches(spec.get("selector"), service["metadata"].get("labels") or {}):
        problem(f"{smfile}: spec.selector does not match Service {name}'s labels")
    ns = spec.get("namespaceSelector")
    if ns and not ns.get("any") and not ns.get("matchNames"):
        problem(f"{smfile}: namespaceSelector selects nothing")
    service_ports = {p.get("name"): p for p in service["spec"].get("ports") or []}
    endpoints = spec.get("endpoints") or []
    if not endpoints:
        problem(f"{smfile}: no endpoints")
    for i, ep in enumerate(endpoints):
        unknown_keys(f"{smfile} endpoints[{i}]", ep, SM_ENDPOINT_KEYS)
        if ep.get("port") not in service_ports:
            problem(f"{smfile}: endpoint port {ep.get('port')!r} is not a port name of the Service {sorted(service_ports)}")
        else:
            sp = service_ports[ep["port"]]
            scraped = resolve_port(facts["container"], sp.get("targetPort", sp.get("port")))
            if facts.get("metrics_port") is not None and scraped != facts["metrics_port"]:
                problem(f"{smfile}: endpoint port {ep['port']!r} reaches container port {scraped}, "
                        f"not http.listen's {facts['metrics_port']} (/metrics is served there only)")
        if ep.get("path", "/metrics") != "/metrics":
            problem(f"{smfile}: path {ep.get('path')} is not /metrics")
        if ep.get("scheme", "http") != "http":
            problem(f"{smfile}: scheme {ep.get('scheme')} (paysync serves plain HTTP)")
        for key in ("interval", "scrapeTimeout"):
            if key in ep and not PROM_DURATION.match(str(ep[key])):
                problem(f"{smfile}: {key} {ep[key]!r} is not a Prometheus duration")
        if "interval" in ep and "scrapeTimeout" in ep and PROM_DURATION.match(str(ep["interval"])) \
                and PROM_DURATION.match(str(ep["scrapeTimeout"])) \
                and duration_seconds(ep["scrapeTimeout"]) > duration_seconds(ep["interval"]):
            problem(f"{smfile}: scrapeTimeout is longer than interval")
    job = (service["metadata"].get("labels") or {}).get(spec["jobLabel"]) if spec.get("jobLabel") \
        else service["metadata"]["name"]
    if facts["role"] == "processor" and alert_job and job != alert_job:
        problem(f"{smfile}: targets get job={job!r}, but PaysyncDown selects up{{job={alert_job!r}}}")
    checked(f"{smfile}: ServiceMonitor {name} scrapes Service {service['metadata']['name']}'s port(s) "
            f"{[ep.get('port') for ep in endpoints]} (http.listen) at /metrics; job label {job!r}"
            + (" = the alerts' job" if facts["role"] == "processor" else ""))
    return job


def check_pdb(resources, facts):
    name = facts["name"]
    pdb, pfile = named(resources, "PodDisruptionBudget", name)
    if pdb is None:
        return
    spec = pdb["spec"]
    if facts["role"] == "webhooks":
        # Internet-facing: keep one pod serving, and still let a drain take one.
        so = resources.get(("ScaledObject", name), ({}, None))[0]
        lowest = min([v for v in ((so.get("spec") or {}).get("minReplicaCount"),
                                  facts["deployment"]["spec"].get("replicas", 1)) if isinstance(v, int)] or [1])
        available = spec.get("minAvailable")
        if not isinstance(available, int) or available < 1:
            problem(f"{pfile}: minAvailable {available!r}: the intake must keep at least one pod through "
                    f"voluntary disruptions (an integer >= 1)")
        elif available >= lowest:
            problem(f"{pfile}: minAvailable {available} blocks every drain at {lowest} replica(s) "
                    f"(the ScaledObject's minimum / the Deployment's replicas)")
        checked(f"{pfile}: PodDisruptionBudget {name} keeps minAvailable {available} of at least {lowest} replicas")
        return
    if "maxUnavailable" not in spec:
        problem(f"{pfile}: no maxUnavailable (minAvailable blocks draining a single replica)")
    elif spec["maxUnavailable"] in (0, "0", "0%"):
        problem(f"{pfile}: maxUnavailable 0 blocks every drain")
    checked(f"{pfile}: PodDisruptionBudget {name}, maxUnavailable {spec.get('maxUnavailable')}")


SO_SPEC_KEYS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback",
                "advanced", "triggers"}
SO_KAFKA_KEYS = {"bootstrapServers", "consumerGroup", "topic", "lagThreshold",
                 "activationLagThreshold", "offsetResetPolicy", "allowIdleConsumers",
                 "scaleToZeroOnInvalidOffset", "excludePersistentLag", "version",
                 "partitionLimitation", "limitToPartitionsWithLag", "ensureEvenDistributionOfPartitions",
                 "sasl", "tls", "unsafeSsl", "saslTokenProvider", "awsRegion", "awsEndpoint"}
# KEDA's prometheus scaler (keda.sh/docs/latest/scalers/prometheus); metricName and
# cortexOrgID were removed in KEDA 2.12.
SO_PROMETHEUS_KEYS = {"serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
                      "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "timeout",
                      "authModes"}
NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")


def check_scaled_object(resources, facts, job):
    name, config = facts["name"], facts["config"]
    so, sofile = named(resources, "ScaledObject", name)
    if so is None:
        return
    deployment = facts["deployment"]
    intake = facts["role"] == "webhooks"
    if so["apiVersion"] != "keda.sh/v1alpha1":
        problem(f"{sofile}: apiVersion {so['apiVersion']}")
    spec = so.get("spec") or {}
    unknown_keys(f"{sofile} spec", spec, SO_SPEC_KEYS)
    ref = spec.get("scaleTargetRef") or {}
    if ref.get("name") != deployment["metadata"]["name"] or ref.get("kind", "Deployment") != "Deployment" \
            or ref.get("apiVersion", "apps/v1") != "apps/v1":
        problem(f"{sofile}: scaleTargetRef {ref} is not the Deployment {deployment['metadata']['name']}")
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    for key, v in (("minReplicaCount", lo), ("maxReplicaCount", hi)):
        if not isinstance(v, int):
            problem(f"{sofile}: {key} {v!r} is not an integer")
    if intake:
        if isinstance(lo, int) and lo < 2:
            problem(f"{sofile}: minReplicaCount {lo}: the internet-facing intake keeps at least 2 "
                    f"(a pod loss or a drain must leave one serving)")
    else:
        if isinstance(lo, int) and lo < 1:
            problem(f"{sofile}: minReplicaCount {lo}: re-checks come due with no input lag, keep at least 1")
        partitions = compose_input_partitions()
        if partitions is not None and partitions != INPUT_PARTITIONS:
            problem(f"INPUT_PARTITIONS is {INPUT_PARTITIONS} in this script, docker-compose.yml creates "
                    f"the input topic with {partitions}")
        if isinstance(hi, int) and hi > INPUT_PARTITIONS:
            problem(f"{sofile}: maxReplicaCount {hi} exceeds the input topic's {INPUT_PARTITIONS} partitions")
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        problem(f"{sofile}: minReplicaCount > maxReplicaCount")
    replicas = deployment["spec"].get("replicas", 1)
    if all(isinstance(v, int) for v in (lo, hi, replicas)) and not lo <= replicas <= hi:
        problem(f"{facts['file']}: replicas {replicas} outside the ScaledObject's {lo}..{hi}")

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
            problem(f"{sofile}: advanced.horizontalPodAutoscalerConfig.behavior: "
                    f"{'.'.join(str(p) for p in e.path)}: {e.message}")
        for direction in ("scaleUp", "scaleDown"):
            for policy in dig(behavior, f"{direction}.policies") or []:
                if isinstance(policy, dict) and policy.get("type") not in ("Pods", "Percent"):
                    problem(f"{sofile}: behavior.{direction} policy type {policy.get('type')!r} "
                            f"is not Pods or Percent")

    triggers = spec.get("triggers") or []
    for t in triggers:
        for k, v in (t.get("metadata") or {}).items():
            if not isinstance(v, str):
                problem(f"{sofile}: trigger metadata {k} is {type(v).__name__}, KEDA wants strings (quote it)")
    if intake:
        check_prometheus_triggers(sofile, triggers, job)
        checked(f"{sofile}: ScaledObject scales Deployment {ref.get('name')} {lo}..{hi} (replicas {replicas}) "
                f"on Prometheus: the rate of {INTAKE_METRIC} of job {job!r} (the intake Service's targets)"
                + ("; promtool parses the query" if shutil.which("promtool") else ""))
    else:
        check_kafka_triggers(sofile, triggers, config)
        checked(f"{sofile}: ScaledObject scales Deployment {ref.get('name')} {lo}..{hi} (<= {INPUT_PARTITIONS} "
                f"input partitions) on group {setting(config, 'kafka.group_id')}'s lag on "
                f"{setting(config, 'kafka.input_topic')}, not on the re-check topics {sorted(recheck_topics(config))}")


def check_kafka_triggers(sofile, triggers, config):
    input_topic = setting(config, "kafka.input_topic")
    rechecks = recheck_topics(config)
    if not any(t.get("type") == "kafka" for t in triggers):
        problem(f"{sofile}: no kafka trigger")
    for t in triggers:
        if t.get("type") != "kafka":
            continue
        md = t.get("metadata") or {}
        unknown_keys(f"{sofile} kafka trigger metadata", md, SO_KAFKA_KEYS)
        topic = md.get("topic")
        if not topic:
            problem(f"{sofile}: the kafka trigger names no topic (it would scale on every topic of the group)")
        elif topic in rechecks or ".recheck." in topic:
            problem(f"{sofile}: trigger topic {topic} is a re-check topic (they lag by design)")
        elif topic != input_topic:
            problem(f"{sofile}: trigger topic {topic} is not the input topic {input_topic}")
        if md.get("consumerGroup") != setting(config, "kafka.group_id"):
            problem(f"{sofile}: consumerGroup {md.get('consumerGroup')} is not kafka.group_id "
                    f"{setting(config, 'kafka.group_id')}")
        brokers = {b.strip() for b in str(setting(config, "kafka.brokers")).split(",")}
        if {b.strip() for b in str(md.get("bootstrapServers", "")).split(",")} != brokers:
            problem(f"{sofile}: bootstrapServers {md.get('bootstrapServers')} are not kafka.brokers "
                    f"{setting(config, 'kafka.brokers')}")
        if not re.fullmatch(r"[1-9][0-9]*", str(md.get("lagThreshold", ""))):
            problem(f"{sofile}: lagThreshold {md.get('lagThreshold')!r} is not a positive integer string")
        if md.get("offsetResetPolicy", "latest") != "earliest":
            problem(f"{sofile}: offsetResetPolicy is not earliest (paysync's auto.offset.reset)")
        if md.get("allowIdleConsumers", "false") == "true":
            problem(f"{sofile}: allowIdleConsumers true scales past the partition count")


def check_prometheus_triggers(sofile, triggers, job):
    """The intake scales on its request rate: prometheus triggers only, on the rate of
    paysync_webhooks_total of the intake's job, one element (aggregated)."""
    if not triggers:
        problem(f"{sofile}: no trigger")
    for t in triggers:
        if t.get("type") != "prometheus":
            problem(f"{sofile}: trigger type {t.get('type')!r}: the intake scales on its request rate "
                    f"(prometheus), it consumes no topic")
            continue
        md = t.get("metadata") or {}
        unknown_keys(f"{sofile} prometheus trigger metadata", md, SO_PROMETHEUS_KEYS)
        for key in ("serverAddress", "query", "threshold"):
            if not str(md.get(key, "")).strip():
                problem(f"{sofile}: the prometheus trigger has no {key}")
        if md.get("serverAddress") and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", str(md["serverAddress"])):
            problem(f"{sofile}: serverAddress {md['serverAddress']!r} is not an http(s) URL")
        query = str(md.get("query", ""))
        selectors = re.findall(re.escape(INTAKE_METRIC) + r"\b\s*(\{[^}]*\})?", query)
        if not selectors:
            problem(f"{sofile}: the query does not name {INTAKE_METRIC}")
        elif not re.search(r"\b(i?rate|increase)\s*\(\s*" + re.escape(INTAKE_METRIC) + r"\b", query):
            problem(f"{sofile}: the query does not take the rate of {INTAKE_METRIC} (a counter)")
        for sel in selectors:
            jobs = re.findall(r'\bjob\s*=\s*"([^"]*)"', sel)
            if jobs != [job]:
                problem(f"{sofile}: {INTAKE_METRIC}{sel} does not select job=\"{job}\" (the intake "
                        f"Service's name): it would count the processor's webhooks too, or none")
        if query and not re.match(r"\s*sum\s*\(", query):
            problem(f"{sofile}: the query must return one element: wrap it in sum(...)")
        if md.get("threshold") and not (NUMBER.fullmatch(str(md["threshold"])) and float(md["threshold"]) > 0):
            problem(f"{sofile}: threshold {md['threshold']!r} is not a positive number string")
        if "activationThreshold" in md and not NUMBER.fullmatch(str(md["activationThreshold"])):
            problem(f"{sofile}: activationThreshold {md['activationThreshold']!r} is not a number string")
        for key in ("ignoreNullValues", "unsafeSsl"):
            if key in md and md[key] not in ("true", "false"):
                problem(f"{sofile}: {key} {md[key]!r} is not \"true\" or \"false\"")
        if query and shutil.which("promtool"):
            # PromQL syntax, offline: promtool checks a recording rule with the query.
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "query.yml")
                with open(path, "w", encoding="utf-8") as f:
                    yaml.safe_dump({"groups": [{"name": "q", "rules": [{"record": "keda:query", "expr": query}]}]}, f)
                run = subprocess.run([shutil.which("promtool"), "check", "rules", path],
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    problem(f"{sofile}: the query is not valid PromQL: "
                            f"{(run.stderr or run.stdout).strip().splitlines()[-1]}")


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
    """Sets checksum/config in every Deployment that reads paysync.toml from a ConfigMap."""
    for (kind, _), (deployment, dfile) in sorted(resources.items()):
        if kind != "Deployment":
            continue
        c = deployment["spec"]["template"]["spec"]["containers"][0]
        text, _ = config_from_deployment(resources, deployment, c, dfile)
        if text is None:
            continue
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


def service_link_env(resources):
    """What the kubelet injects for the manifests' Services when enableServiceLinks is
    on (PAYSYNC_SERVICE_HOST, PAYSYNC_WEBHOOKS_PORT_9465_TCP, ...): must not be settings."""
    env = {}
    for (kind, name), (doc, _) in sorted(resources.items()):
        if kind != "Service":
            continue
        prefix = re.sub(r"[^A-Z0-9]", "_", name.upper())
        ports = doc["spec"].get("ports") or []
        env[f"{prefix}_SERVICE_HOST"] = "10.0.0.10"
        if ports:
            env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
            env[f"{prefix}_PORT"] = f"tcp://10.0.0.10:{ports[0]['port']}"
        for p in ports:
            proto, port = p.get("protocol", "TCP"), p["port"]
            if p.get("name"):
                env[f"{prefix}_SERVICE_PORT_{re.sub(r'[^A-Z0-9]', '_', p['name'].upper())}"] = str(port)
            base = f"{prefix}_PORT_{port}_{proto}"
            env.update({base: f"{proto.lower()}://10.0.0.10:{port}", f"{base}_PROTO": proto.lower(),
                        f"{base}_PORT": str(port), f"{base}_ADDR": "10.0.0.10"})
    return env


def check_with_paysync(resources, facts):
    binary = paysync_binary()
    if not binary:
        notes.append("no paysync binary (PAYSYNC_BIN, target/debug or target/release): "
                     f"`paysync check-config` not run on the ConfigMap for {facts['file']}")
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
            env.update(service_link_env(resources))
        run = subprocess.run([binary, "check-config", "--config", path], env=env, capture_output=True, text=True)
        if run.returncode != 0:
            problem(f"paysync check-config refuses the ConfigMap's paysync.toml with {facts['file']}'s "
                    f"Secret files and environment (exit {run.returncode}): {(run.stderr or run.stdout).strip()}")
            return
        topics = subprocess.run([binary, "check-config", "--topics", "--config", path], env=env,
                                capture_output=True, text=True)
        listed = [t.strip() for t in topics.stdout.splitlines() if t.strip() and not t.startswith("#")]
        missing = (recheck_topics(config) | {setting(config, "kafka.input_topic")}) - set(listed)
        if topics.returncode != 0 or missing:
            problem(f"paysync check-config --topics: {topics.stderr.strip() or f'does not list {sorted(missing)}'}")
            return
    checked(f"{os.path.relpath(binary, ROOT)} check-config accepts the ConfigMap's paysync.toml "
            f"with {facts['file']}'s Secret files and environment; topics to create: {', '.join(listed)}")



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
        checked("the Grafana dashboard shows every metric paysync registers")
        return
    checked(f"the Grafana dashboard shows all {len(registered)} metrics paysync registers")


# ---------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true",
                        help="regenerate prometheusrule.yaml and the checksum/config annotations first")
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
    guarded(check_resource_set, resources)
    docker = dockerfile_facts()
    facts = {}
    for name in ROLES:
        f = guarded(check_deployment, resources, docker, name)
        if f:
            facts[name] = f
            guarded(check_config_facts, resources, f, docker)
    guarded(check_selectors, resources, facts)
    guarded(note_unread_secret_keys, resources, facts)
    for name, f in facts.items():
        service = guarded(check_service, resources, f)
        job = guarded(check_service_monitor, resources, service, f, alert_job(rules))
        guarded(check_pdb, resources, f)
        if f.get("config") is not None:
            guarded(check_scaled_object, resources, f, job)
    guarded(check_prometheus_rule, resources, alerts_doc)
    for f in facts.values():
        guarded(check_with_paysync, resources, f)

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
