#!/usr/bin/env bash
# Checks the structure of docker-compose.yml without a Docker engine: every
# service has an image or a build (whose Dockerfile exists), every depends_on
# target exists with a known condition, and the services others wait for as
# healthy have healthchecks. Then what worldline needs of it: every role has
# its service, each long-running role a healthcheck that runs `worldline probe`
# (the image has no curl) against the port that role listens on, serve a token
# configuration, and Kafka the local stack's version and settings.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FILE=${1:-$ROOT/docker-compose.yml}

command -v python3 >/dev/null 2>&1 || {
    echo "check-compose: python3 is needed" >&2
    exit 1
}
# PyYAML: the distribution's package where apt can install it (Debian's pip
# refuses to install into the system Python), else pip.
install_pyyaml_with_apt() {
    command -v apt-get >/dev/null 2>&1 || return 1
    local -a sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || return 1
        sudo=(sudo -n)
    fi
    echo "check-compose: installing python3-yaml with apt-get" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=300 update >/dev/null &&
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=300 install -y --no-install-recommends python3-yaml >/dev/null
}
if ! python3 -c 'import yaml' 2>/dev/null; then
    { install_pyyaml_with_apt && python3 -c 'import yaml' 2>/dev/null; } ||
        python3 -m pip install --quiet --disable-pip-version-check --user pyyaml >/dev/null 2>&1 ||
        python3 -m pip install --quiet --disable-pip-version-check pyyaml >/dev/null 2>&1 ||
        {
            echo "check-compose: PyYAML is missing and could not be installed (apt-get install python3-yaml, or pip install pyyaml)" >&2
            exit 1
        }
fi

python3 - "$FILE" <<'EOF'
import os
import sys

import yaml

path = sys.argv[1]
root = os.path.dirname(os.path.abspath(path))
errors = []


def err(msg):
    errors.append(msg)


with open(path, encoding="utf-8") as f:
    doc = yaml.safe_load(f)

if not isinstance(doc, dict):
    sys.exit(f"{path}: not a mapping at the top level")

services = doc.get("services")
if not isinstance(services, dict) or not services:
    sys.exit(f"{path}: no services")

declared_volumes = set((doc.get("volumes") or {}).keys())
conditions = {"service_started", "service_healthy", "service_completed_successfully"}

for name, svc in services.items():
    if not isinstance(svc, dict):
        err(f"service {name}: not a mapping")
        continue
    if "image" not in svc and "build" not in svc:
        err(f"service {name}: has neither image nor build")
    build = svc.get("build")
    if build is not None:
        if isinstance(build, str):
            context, dockerfile = build, "Dockerfile"
        else:
            context = build.get("context", ".")
            dockerfile = build.get("dockerfile", "Dockerfile")
        df = os.path.join(root, context, dockerfile)
        if not os.path.isfile(df):
            err(f"service {name}: build file {df} does not exist")
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        deps = {d: {"condition": "service_started"} for d in deps}
    for dep, spec in deps.items():
        if dep not in services:
            err(f"service {name}: depends_on unknown service {dep!r}")
            continue
        cond = (spec or {}).get("condition", "service_started")
        if cond not in conditions:
            err(f"service {name}: depends_on {dep}: unknown condition {cond!r}")
        if cond == "service_healthy" and "healthcheck" not in services[dep]:
            err(f"service {name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
        if cond == "service_completed_successfully" and services[dep].get("restart") not in (None, "no"):
            err(f"service {name}: waits for {dep} to complete, but {dep} restarts ({services[dep].get('restart')})")
    for vol in svc.get("volumes") or []:
        src = vol.split(":", 1)[0] if isinstance(vol, str) else (vol or {}).get("source", "")
        if not src:
            continue
        if src.startswith((".", "/")):
            if src.startswith(".") and not os.path.exists(os.path.join(root, src)):
                err(f"service {name}: bind mount source {src} does not exist")
        elif src not in declared_volumes:
            err(f"service {name}: volume {src!r} is not declared under volumes:")
    env = svc.get("environment") or {}
    if isinstance(env, dict):
        for key, value in env.items():
            if value is None:
                err(f"service {name}: environment {key} has no value")

for required in ("kafka", "postgres"):
    if required not in services:
        err(f"no {required} service")
    else:
        hc = services[required].get("healthcheck")
        if not hc or not hc.get("test"):
            err(f"service {required}: no healthcheck test")

kafka_env = (services.get("kafka") or {}).get("environment") or {}
expect = {
    "KAFKA_PROCESS_ROLES": "broker,controller",
    "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
    "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
    "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
    "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
}
for key, want in expect.items():
    got = kafka_env.get(key)
    if str(got).lower() != want:
        err(f"service kafka: {key} should be {want}, is {got!r}")

if not str((services.get("kafka") or {}).get("image", "")).endswith(":4.3.1"):
    err("service kafka: the image should be apache/kafka:4.3.1, the version the local stack runs")

# The worldline roles: the one-shot set-up steps and the long-running roles with
# the port their /readyz is served on inside the container.
one_shot = {"topics": ["topics", "create"], "migrate": ["migrate"]}
long_running = {
    "produce-clock": (["produce", "clock"], "WORLDLINE__OPS__LISTEN"),
    "produce-weather": (["produce", "weather"], "WORLDLINE__OPS__LISTEN"),
    "simulate": (["simulate"], "WORLDLINE__OPS__LISTEN"),
    "project": (["project"], "WORLDLINE__OPS__LISTEN"),
    "serve": (["serve"], "WORLDLINE__HTTP__LISTEN"),
}


def env_of(svc):
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


for name, command in one_shot.items():
    svc = services.get(name)
    if svc is None:
        err(f"no {name} service (runs `worldline {' '.join(command)}`)")
    elif svc.get("command") != command:
        err(f"service {name}: command should be {command}, is {svc.get('command')!r}")

for name, (command, listen_var) in long_running.items():
    svc = services.get(name)
    if svc is None:
        err(f"no {name} service (runs `worldline {' '.join(command)}`)")
        continue
    if svc.get("command") != command:
        err(f"service {name}: command should be {command}, is {svc.get('command')!r}")
    if "build" not in svc and "worldline" not in str(svc.get("image", "")):
        err(f"service {name}: should run the worldline image")
    listen = str(env_of(svc).get(listen_var) or "")
    if not listen:
        err(f"service {name}: {listen_var} is not set, so its port inside the container is unknown")
        continue
    port = listen.rsplit(":", 1)[-1]
    test = (svc.get("healthcheck") or {}).get("test") or []
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    words = " ".join(str(t) for t in test[1:])
    if "curl" in words or "wget" in words:
        err(f"service {name}: the healthcheck uses curl or wget, which the runtime image lacks; use `worldline probe`")
    elif "worldline probe" not in words.replace("/usr/local/bin/worldline", "worldline"):
        err(f"service {name}: the healthcheck should run `worldline probe <url>`, it is {test!r}")
    elif f"127.0.0.1:{port}/" not in words and f"localhost:{port}/" not in words:
        err(f"service {name}: the healthcheck probes {words!r}, but the role listens on port {port} ({listen_var})")

serve_env = env_of(services.get("serve") or {})
if not serve_env.get("WORLDLINE__AUTH__TOKENS") and not serve_env.get("WORLDLINE__AUTH__JWT__ISSUER"):
    err("service serve: no WORLDLINE__AUTH__TOKENS (or JWT settings): every request would get 401")

if errors:
    for e in errors:
        print(f"check-compose: {path}: {e}", file=sys.stderr)
    sys.exit(1)
print(f"check-compose: {os.path.basename(path)} ok: {len(services)} services ({', '.join(services)})")
EOF
