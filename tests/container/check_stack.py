#!/usr/bin/env python3
"""Checks the container stack without a Docker engine (none runs in CI):

1. The Rust version is in one place: Cargo.toml's `rust-version` equals the highest
   `rust_version` among the locked packages (`cargo metadata --locked`), and the
   Dockerfile's build image is pinned to at least that version.
2. The Dockerfile's HEALTHCHECK asks `paysync healthcheck` in exec form (no shell:
   Debian's /bin/sh is dash, which has no /dev/tcp, and a port is not health).
3. docker-compose.yml parses with a compose implementation (`docker-compose config`,
   Debian's docker-compose 1.29), every image is pinned to a tag, every service
   built from this Dockerfile that does not serve paysync's /healthz overrides the
   health check, paysync's environment there is a valid configuration
   (`paysync check-config`), every topic it needs is created by the init step, and
   every `depends_on: service_healthy` target has a health check.

Usage: python tests/container/check_stack.py  (exit 1 with the reasons on failure)
"""
import json
import os
import re
import shutil
import subprocess
import sys

import yaml

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
problems = []


def problem(text):
    problems.append(text)


def version(text):
    return tuple(int(x) for x in text.split("."))


def check_rust_version():
    with open(os.path.join(ROOT, "Cargo.toml"), encoding="utf-8") as f:
        manifest = f.read()
    m = re.search(r'^rust-version\s*=\s*"([0-9.]+)"', manifest, re.M)
    if not m:
        problem("Cargo.toml has no rust-version")
        return
    declared = version(m.group(1))
    meta = json.loads(subprocess.run(
        ["cargo", "metadata", "--locked", "--format-version", "1"],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    needs = [(version(p["rust_version"]), f"{p['name']} {p['version']}")
             for p in meta["packages"] if p.get("rust_version")]
    highest, who = max(needs)
    if declared[:2] != highest[:2]:
        problem(f"Cargo.toml rust-version {m.group(1)} is not the locked tree's minimum "
                f"{'.'.join(map(str, highest))} (set by {who})")
    with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as f:
        dockerfile = f.read()
    m = re.search(r"^FROM rust:([0-9][0-9.]*)(-[a-z]+)?\s+AS build", dockerfile, re.M | re.I)
    if not m:
        problem("the Dockerfile's build stage is not FROM rust:<version>-<debian>")
    else:
        image = version(m.group(1))
        if image < highest:
            problem(f"Dockerfile builds with rust:{m.group(1)}, older than the "
                    f"{'.'.join(map(str, highest))} that {who} needs")
        if len(image) < 3:
            problem(f"Dockerfile's rust:{m.group(1)} is not pinned to a patch release")
    print(f"rust-version: Cargo.toml {'.'.join(map(str, declared))}, locked tree needs "
          f"{'.'.join(map(str, highest))} ({who}), Dockerfile {m.group(1) if m else '?'}")
    return dockerfile


def check_healthcheck(dockerfile):
    m = re.search(r"^HEALTHCHECK(?:\s+--\S+)*\s*\\?\s*\n?\s*CMD\s+(\[.*\])", dockerfile, re.M)
    if not m:
        problem("the Dockerfile has no exec-form HEALTHCHECK")
        return
    cmd = json.loads(m.group(1))
    if cmd[:2] != ["/usr/local/bin/paysync", "healthcheck"]:
        problem(f"the HEALTHCHECK runs {cmd}, not `paysync healthcheck`")
    if any("/dev/tcp" in part or part in ("/bin/sh", "sh") for part in cmd):
        problem("the HEALTHCHECK uses a shell or /dev/tcp")


def check_compose():
    tool = shutil.which("docker-compose")
    if tool is None:
        problem("docker-compose is not installed (apt-get install docker-compose)")
        return
    run = subprocess.run([tool, "-f", os.path.join(ROOT, "docker-compose.yml"), "config"],
                         cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        problem(f"docker-compose config failed:\n{run.stderr}")
        return
    stack = yaml.safe_load(run.stdout)
    services = stack["services"]
    for name, svc in services.items():
        image = svc.get("image", "")
        if not image:
            problem(f"service {name} has no image name")
        elif ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
            problem(f"service {name} image {image} is not pinned to a tag")
        for dep, cond in (svc.get("depends_on") or {}).items():
            if cond.get("condition") == "service_healthy":
                target = services[dep]
                has_check = "healthcheck" in target or target.get("build")
                if not has_check:
                    problem(f"{name} waits for {dep} to be healthy, but {dep} has no health check")
    built = {n: s for n, s in services.items() if s.get("build")}
    for name, svc in built.items():
        command = svc.get("command") or ["run"]
        if command[0] != "run" and "healthcheck" not in svc:
            problem(f"service {name} runs `{command[0]}` from the paysync image but inherits "
                    "its /healthz check on 9464; give it its own or none")
        check = (svc.get("healthcheck") or {}).get("test")
        if check and ("/dev/tcp" in " ".join(check) or "CMD-SHELL" in check and "sh" in check[1]):
            problem(f"service {name}'s health check uses a shell")
    paysync = services["paysync"]
    env = paysync.get("environment") or {}
    defaults = {"PAYSYNC_KAFKA__INPUT_TOPIC": "payment-status-requests",
                "PAYSYNC_KAFKA__OUTPUT_TOPIC": "payment-status-events",
                "PAYSYNC_KAFKA__DEAD_LETTER_TOPIC": "payment-status-requests.dlq"}
    wanted = {env.get(k, v) for k, v in defaults.items()}
    wanted |= set(needed_recheck_topics(env, env.get("PAYSYNC_KAFKA__INPUT_TOPIC", defaults["PAYSYNC_KAFKA__INPUT_TOPIC"])))
    init = " ".join(services["kafka-init"].get("command") or [])
    specs = re.search(r"for spec in ([^;]*);", init)
    created = set(re.findall(r"([A-Za-z0-9._-]+):\d+", specs.group(1) if specs else ""))
    for topic in sorted(wanted - created):
        problem(f"topic {topic} that paysync needs is not created by kafka-init")
    print(f"compose: {len(services)} services parse; topics created: {sorted(created)}")


def needed_recheck_topics(env, input_topic):
    """Every topic paysync's compose environment needs, from `paysync check-config
    --topics` run with that environment (which also proves the environment is a
    valid configuration)."""
    binary = os.path.join(ROOT, "target", "debug", "paysync")
    if not os.path.exists(binary):
        problem("target/debug/paysync is not built (cargo build) to check the compose environment")
        return []
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAYSYNC_")}
    run = subprocess.run([binary, "check-config", "--topics"], env={**clean, **{k: str(v) for k, v in env.items()}},
                         capture_output=True, text=True)
    if run.returncode != 0:
        problem(f"paysync's compose environment is not a valid configuration: {run.stderr.strip()}")
        return []
    return [line.strip() for line in run.stdout.splitlines() if line.strip()]


def main():
    dockerfile = check_rust_version()
    if dockerfile:
        check_healthcheck(dockerfile)
    check_compose()
    if problems:
        print("container stack problems:", *problems, sep="\n  - ")
        sys.exit(1)
    print("OK: the image can build with the pinned toolchain, its health check checks health, the stack parses")


if __name__ == "__main__":
    main()
