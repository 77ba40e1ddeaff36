"""The checks of scripts/check-deploy (run that: it installs what this needs).

Each check prints `ok` or `FAIL` with the reason; the last line counts them.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import kubernetes_validate
import yaml

# The oldest Kubernetes the manifests promise to work on, and the newest schemas bundled.
KUBE_VERSIONS = ["1.29", "1.37"]

DEPLOY = Path("deploy")
KUBE = DEPLOY / "kubernetes"
HELM_VALUES = KUBE / "nats-helm-values.yaml"
KUSTOMIZATION = KUBE / "kustomization.yaml"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
# Where the image keeps its configuration file, and the file it copies there.
IMAGE_CONFIG = "/etc/cachecast/cachecast.toml"
CONTAINER_TOML = DEPLOY / "container.toml"
# Stand-ins for values only a cluster knows (secrets, pod names).
SECRET_PLACEHOLDER = "check-deploy-placeholder-secret-of-some-length"
POD_NAME = "paa-5d8f7c9b6-x7k2p"
POD_UID = "6f1c2a8e-3b4d-4e5f-9a6b-7c8d9e0f1a2b"

passed = 0
failed = 0


def ok(what):
    global passed
    passed += 1
    print(f"ok    {what}")


def fail(what, why):
    global failed
    failed += 1
    print(f"FAIL  {what}: {why}")


def check(what, problems):
    """Reports `what` as passed when `problems` (a list of strings) is empty."""
    if problems:
        fail(what, "; ".join(problems))
    else:
        ok(what)


def load_all(path):
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def yaml_files():
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def manifests():
    """The plain Kubernetes manifests: every YAML file under deploy/kubernetes but the
    kustomization and the Helm values."""
    return sorted(
        p for p in KUBE.glob("*.yaml") if p not in (KUSTOMIZATION, HELM_VALUES)
    )


def all_containers(spec):
    """The containers of a pod spec, native sidecars (restartable init containers) included."""
    return spec.get("initContainers", []) + spec.get("containers", [])


def is_cachecast_image(image):
    name = image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    return name == "cachecast"


def pod_spec(doc):
    if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return doc["spec"]["template"]
    if doc.get("kind") == "Pod":
        return doc
    return None


# ---------------------------------------------------------------------------------------
# YAML and Kubernetes schemas


def check_yaml_parses():
    for path in yaml_files():
        try:
            load_all(path)
            ok(f"{path} parses")
        except yaml.YAMLError as err:
            fail(f"{path} parses", str(err).replace("\n", " "))


def check_kubernetes_schemas():
    for path in manifests():
        for doc in load_all(path):
            what = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            problems = []
            for version in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as err:
                    where = ".".join(str(p) for p in err.path) or "(top)"
                    problems.append(f"Kubernetes {version}: {where}: {err.message}")
                except kubernetes_validate.SchemaNotFoundError as err:
                    problems.append(err.message)
            check(f"{what} validates against Kubernetes {', '.join(KUBE_VERSIONS)} (strict)", problems)


# ---------------------------------------------------------------------------------------
# Consistency the schemas cannot see


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_workloads():
    docs = [(p, d) for p in manifests() for d in load_all(p)]
    pod_labels = [
        pod_spec(d).get("metadata", {}).get("labels", {}) for _, d in docs if pod_spec(d)
    ]
    for path, doc in docs:
        kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
        what = f"{path}: {kind}/{name}"
        problems = []
        template = pod_spec(doc)
        if template is not None:
            labels = template.get("metadata", {}).get("labels", {})
            if "selector" in doc.get("spec", {}) and not matches(
                doc["spec"]["selector"].get("matchLabels"), labels
            ):
                problems.append("spec.selector.matchLabels does not match the pod labels")
            spec = template["spec"]
            containers = all_containers(spec)
            runs_cachecast = any(is_cachecast_image(c["image"]) for c in containers)
            if runs_cachecast and spec.get("enableServiceLinks") is not False:
                problems.append(
                    "enableServiceLinks must be false: Service variables such as "
                    "CACHECAST_API_PORT would be read as unknown configuration keys"
                )
            for c in containers:
                ports = {p.get("name") for p in c.get("ports", [])} | {
                    p["containerPort"] for p in c.get("ports", [])
                }
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    port = c.get(probe, {}).get("httpGet", {}).get("port")
                    if port is not None and port not in ports:
                        problems.append(f"{c['name']}.{probe} uses port {port!r}, not declared")
                if is_cachecast_image(c["image"]):
                    sc = {**spec.get("securityContext", {}), **c.get("securityContext", {})}
                    for key, want in (
                        ("runAsNonRoot", True),
                        ("readOnlyRootFilesystem", True),
                        ("allowPrivilegeEscalation", False),
                    ):
                        if sc.get(key) is not want:
                            problems.append(f"{c['name']}: securityContext.{key} must be {want}")
                    if not c.get("livenessProbe"):
                        problems.append(f"{c['name']}: no livenessProbe")
        if kind in ("Service", "PodDisruptionBudget"):
            selector = doc["spec"].get("selector", {})
            selector = selector.get("matchLabels", selector) if kind == "PodDisruptionBudget" else selector
            if not any(matches(selector, labels) for labels in pod_labels):
                problems.append("its selector matches no pod template in deploy/kubernetes")
        check(f"{what} is consistent", problems)


def check_kustomization():
    problems = []
    (kust,) = load_all(KUSTOMIZATION)
    listed = set(kust.get("resources", []))
    present = {p.name for p in manifests()}
    if listed - present:
        problems.append(f"lists missing files {sorted(listed - present)}")
    if present - listed:
        problems.append(f"does not list {sorted(present - listed)}")
    if "cachecast" not in {i.get("name") for i in kust.get("images", [])}:
        problems.append("no images entry for `cachecast`")
    check(f"{KUSTOMIZATION} lists every plain manifest", problems)


def api_env():
    """The literal CACHECAST_* values of the API container(s)."""
    env = {}
    for path in manifests():
        for doc in load_all(path):
            template = pod_spec(doc)
            for c in all_containers((template or {}).get("spec", {})):
                if is_cachecast_image(c["image"]) and c.get("args", ["serve"])[0] == "serve":
                    env.update({e["name"]: e.get("value") for e in c.get("env", [])})
    return env


def check_helm_values():
    problems = []
    (values,) = load_all(HELM_VALUES)
    config = values.get("config", {})
    cluster, js = config.get("cluster", {}), config.get("jetstream", {})
    if cluster.get("enabled") is not True:
        problems.append("config.cluster.enabled is not true")
    replicas = cluster.get("replicas")
    if replicas != 3:
        problems.append(f"config.cluster.replicas is {replicas!r}, not 3")
    if js.get("enabled") is not True:
        problems.append("config.jetstream.enabled is not true")
    store = js.get("fileStore", {})
    if store.get("enabled") is not True or store.get("pvc", {}).get("enabled") is not True:
        problems.append("JetStream file store on a PVC is not enabled")
    if js.get("merge", {}).get("sync_interval") != "always":
        problems.append("config.jetstream.merge.sync_interval is not `always`")
    env = api_env()
    for key in ("CACHECAST_STREAM__REPLICAS", "CACHECAST_PRESENCE__REPLICAS"):
        if env.get(key) != str(replicas):
            problems.append(f"the API sets {key}={env.get(key)!r}, the cluster has {replicas!r} servers")
    check(f"{HELM_VALUES}: 3-node JetStream cluster, fsync always, R3 in cachecast-api.yaml", problems)


def check_compose():
    problems = []
    (compose,) = load_all(COMPOSE)
    services = compose.get("services", {})
    for required in ("nats", "redis"):
        if required not in services:
            problems.append(f"no `{required}` service")
    nats = services.get("nats", {})
    if "-js" not in nats.get("command", []) or not str(nats.get("image", "")).startswith("nats:"):
        problems.append("`nats` must run a nats image with -js")
    commands = {name: s.get("command", []) for name, s in services.items() if runs_cachecast(s)}
    if not any(c[:1] == ["serve"] for c in commands.values()):
        problems.append("no service runs `cachecast serve`")
    redis_agents = [n for n, c in commands.items() if c[:1] == ["agent"] and "redis" in c]
    if len(redis_agents) < 2:
        problems.append(f"want two agents with the redis backend, found {redis_agents}")
    for name, service in services.items():
        build = service.get("build")
        if isinstance(build, dict):
            dockerfile = (COMPOSE.parent / build.get("context", ".") / build.get("dockerfile", "Dockerfile"))
            if not dockerfile.resolve().is_file():
                problems.append(f"{name}: build dockerfile {dockerfile} does not exist")
        for dep in service.get("depends_on", {}):
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")) and not (COMPOSE.parent / source).exists():
                problems.append(f"{name}: mounts missing {source}")
    check(f"{COMPOSE} has nats, redis, serve and two redis agents, and its files exist", problems)


def runs_cachecast(service):
    build = service.get("build")
    if isinstance(build, dict) and Path(build.get("dockerfile", "")).name == DOCKERFILE.name:
        return True
    return is_cachecast_image(str(service.get("image", "")))


def check_readme():
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    files = sorted(str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file() and p.name != "README.md")
    missing = [f for f in files if f"`{f}`" not in text]
    check(f"{DEPLOY}/README.md describes every file in {DEPLOY}/", [f"not mentioned: {missing}"] if missing else [])


def check_dockerfile():
    text = DOCKERFILE.read_text(encoding="utf-8")
    problems = []
    for pattern, meaning in (
        (r"^FROM rust:[0-9.]+-bookworm AS build$|^FROM rust:\$\{RUST_VERSION\}-bookworm AS build$", "a rust bookworm builder"),
        (r"cargo build --release -p cachecast --locked", "cargo build --release -p cachecast --locked"),
        (r"^FROM debian:bookworm-slim$", "a debian:bookworm-slim runtime"),
        (r"^USER 10001:10001$", "USER 10001:10001"),
        (rf"^COPY {re.escape(str(CONTAINER_TOML))} {re.escape(IMAGE_CONFIG)}$", f"COPY {CONTAINER_TOML} {IMAGE_CONFIG}"),
        (rf"^ENV CACHECAST_CONFIG={re.escape(IMAGE_CONFIG)}$", f"ENV CACHECAST_CONFIG={IMAGE_CONFIG}"),
        (r'^ENTRYPOINT \["cachecast"\]$', 'ENTRYPOINT ["cachecast"]'),
        (r'^CMD \["serve"\]$', 'CMD ["serve"]'),
    ):
        if not re.search(pattern, text, re.MULTILINE):
            problems.append(f"missing {meaning}")
    ignored = Path(".dockerignore").read_text(encoding="utf-8").split()
    for entry in ("target/", ".tools/", ".git/"):
        if entry not in ignored:
            problems.append(f".dockerignore does not exclude {entry}")
    check(f"{DOCKERFILE} and .dockerignore", problems)


# ---------------------------------------------------------------------------------------
# cachecast configurations, checked by cachecast itself


def expand_kube(value, env):
    """Kubernetes' $(VAR) expansion of earlier variables; $$ escapes."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


def kube_env(container, pod_meta):
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand_kube(str(var["value"]), env)
            continue
        source = var.get("valueFrom", {})
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            env[var["name"]] = SECRET_PLACEHOLDER
        elif "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
            if path == "metadata.name":
                env[var["name"]] = POD_NAME
            elif path == "metadata.namespace":
                env[var["name"]] = "default"
            elif path == "metadata.uid":
                env[var["name"]] = POD_UID
            elif label and label.group(1) in pod_meta.get("labels", {}):
                env[var["name"]] = pod_meta["labels"][label.group(1)]
            else:
                raise ValueError(f"{var['name']}: cannot stand in for fieldRef {path}")
        else:
            raise ValueError(f"{var['name']}: unsupported valueFrom {sorted(source)}")
    return env


def compose_value(value):
    """Compose interpolation of ${VAR:-default} / ${VAR} / $$ (VAR as if unset)."""
    return re.sub(
        r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}",
        lambda m: "$" if m.group(0) == "$$" else (m.group(2) or ""),
        str(value),
    )


def cachecast_invocations():
    """(where, args, env) of every cachecast process the artifacts start."""
    runs = []
    for path in manifests():
        for doc in load_all(path):
            template = pod_spec(doc)
            for c in all_containers((template or {}).get("spec", {})):
                if is_cachecast_image(c["image"]):
                    where = f"{path}: {doc['metadata']['name']}/{c['name']}"
                    try:
                        env = kube_env(c, template.get("metadata", {}))
                    except ValueError as err:
                        fail(f"{where} configuration", str(err))
                        continue
                    runs.append((where, c.get("command", [])[1:] + c.get("args", ["serve"]), env))
    (compose,) = load_all(COMPOSE)
    for name, service in compose.get("services", {}).items():
        if runs_cachecast(service):
            environment = service.get("environment", {})
            if isinstance(environment, list):
                environment = dict(e.split("=", 1) for e in environment)
            env = {k: compose_value(v) for k, v in environment.items()}
            runs.append((f"{COMPOSE}: {name}", service.get("command", ["serve"]), env))
    return runs


def check_example_config(binary):
    """deploy/cachecast.example.toml is valid and names every key cachecast has."""
    example = DEPLOY / "cachecast.example.toml"
    needs = {"CACHECAST_AUTH__HS256_SECRET": SECRET_PLACEHOLDER, "CACHECAST_AUTH__ALLOW_HS256": "true",
             "CACHECAST_AGENT__ENV": "dev"}
    for command in ("serve", "agent"):
        result = run_cachecast(binary, [command, "--config", str(example)], needs)
        check(f"{example} passes `cachecast {command} --check-config`",
              [] if result.returncode == 0 else [(result.stderr or result.stdout).strip()])
    # Optional keys print only when set: set them so that they are listed too.
    env = {**needs, "CACHECAST_AGENT__ID": "a1", "CACHECAST_AGENT__ADMIN_LISTEN": "0.0.0.0:9090"}
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    printed = subprocess.run([binary, "serve", "--print-config"], env=full_env,
                             capture_output=True, text=True, timeout=60)
    if printed.returncode != 0:
        fail(f"{example} names every key", f"--print-config failed: {printed.stderr.strip()}")
        return
    effective = {f"{section}.{key}" for section, keys in tomllib.loads(printed.stdout).items() for key in keys}
    documented, section = set(), None
    for line in example.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"\s*\[([a-z_]+(?:\.[a-z_]+)*)\]", line):
            section = m.group(1)
            if "." in section:  # a sub-table ([redis.keyed_caches]) is a key of its parent
                documented.add(section)
        elif m := re.match(r"\s*#?\s*([a-z0-9_]+)\s*=", line):
            documented.add(f"{section}.{m.group(1)}")
    if len(effective) < 10:
        fail(f"{example} names every key", f"--print-config printed too little: {printed.stdout!r}")
        return
    missing = sorted(effective - documented)
    check(f"{example} names every key of `cachecast --print-config`",
          [f"missing {', '.join(missing)}"] if missing else [])


def run_cachecast(binary, args, env):
    # Only what the container would have: the image's configuration file and these variables.
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CACHECAST_CONFIG": str(CONTAINER_TOML), **env}
    return subprocess.run(
        [binary, *args, "--check-config"], env=full_env, capture_output=True, text=True, timeout=60
    )


def check_cachecast_configs(binary):
    for where, args, env in cachecast_invocations():
        result = run_cachecast(binary, args, env)
        shown = " ".join(args)
        if result.returncode == 0:
            ok(f"{where}: `cachecast {shown} --check-config` accepts its configuration")
        else:
            fail(
                f"{where}: `cachecast {shown} --check-config`",
                f"exit {result.returncode}: {(result.stderr or result.stdout).strip()}",
            )
    check_example_config(binary)
    # The check itself must reject what it should, or every pass above means nothing.
    result = run_cachecast(binary, ["serve"], {"CACHECAST_AUTH__HS256_SECRET": SECRET_PLACEHOLDER, "CACHECAST_API__LISTN": "x"})
    if result.returncode == 1 and "listn" in (result.stderr + result.stdout).lower():
        ok("`cachecast serve --check-config` rejects an unknown key (CACHECAST_API__LISTN), naming it")
    else:
        fail("`cachecast serve --check-config` rejects an unknown key", f"exit {result.returncode}: {result.stderr.strip()}")


# ---------------------------------------------------------------------------------------
# NATS server configurations


def check_nats_configs(nats_server):
    for conf in sorted((DEPLOY / "nats").glob("*.conf")):
        text = conf.read_text(encoding="utf-8")
        with tempfile.TemporaryDirectory() as tmp:
            if re.search(r"^\s*(listen|jetstream)\b", text, re.MULTILINE):
                target = conf.resolve()
            else:
                # An include (accounts.conf): test it inside a minimal server config; includes
                # are relative to the including file.
                shutil.copy(conf, Path(tmp) / conf.name)
                target = Path(tmp) / "server.conf"
                target.write_text(f"listen: 127.0.0.1:-1\ninclude ./{conf.name}\n", encoding="utf-8")
            # Variables the file (and what it includes, relative to it) takes from the server's
            # environment.
            for include in re.findall(r"^\s*include\s+\"?\./([^\s\"]+)", text, re.MULTILINE):
                text += "\n" + (conf.parent / include).read_text(encoding="utf-8")
            defined = set(re.findall(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*[=:]", text, re.MULTILINE))
            env = {**os.environ, **{v: "placeholder" for v in re.findall(r"(?<!\")\$([A-Za-z_][A-Za-z0-9_]*)", text) if v not in defined}}
            result = subprocess.run([nats_server, "-t", "-c", str(target)], env=env, capture_output=True, text=True, timeout=60)
            check(f"{conf} is a valid nats-server configuration (nats-server -t)",
                  [] if result.returncode == 0 else [(result.stderr or result.stdout).strip()])
    conf = (DEPLOY / "nats" / "nats-server.conf").read_text(encoding="utf-8")
    check("deploy/nats/nats-server.conf sets sync_interval: always",
          [] if re.search(r"^\s*sync_interval:\s*always\b", conf, re.MULTILINE) else ["not set"])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cachecast", required=True, help="the cachecast binary")
    parser.add_argument("--nats-server", required=True, help="the nats-server binary")
    args = parser.parse_args()
    print(f"kubernetes-validate {kubernetes_validate.__version__}, PyYAML {yaml.__version__}")
    check_yaml_parses()
    check_kubernetes_schemas()
    check_workloads()
    check_kustomization()
    check_helm_values()
    check_compose()
    check_dockerfile()
    check_readme()
    check_nats_configs(args.nats_server)
    check_cachecast_configs(args.cachecast)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
