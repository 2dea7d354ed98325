#!/usr/bin/env python3
"""Every check of subgate's deployment files, one line per check.

Run through scripts/check-deploy (which picks the tools' virtualenv); the
tools come from scripts/install-tools. A check either passes, fails with the
reasons listed under it, or says explicitly what it could not cover (a NOTE
line): nothing is skipped in silence. Exit status 1 when any check failed.

Environment:
  SUBGATE_BIN        the subgate binary for the live checks
                     (default target/release/subgate)
  SUBGATE_TOOLS_DIR  where install-tools put the venv and npm packages
                     (default .tools)
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(os.environ.get("SUBGATE_TOOLS_DIR", ROOT / ".tools"))
VENV_BIN = TOOLS / "venv" / "bin"
NPM_DIR = TOOLS / "npm"
SUBGATE_BIN = Path(os.environ.get("SUBGATE_BIN", ROOT / "target" / "release" / "subgate"))

# Kubernetes versions the manifests are validated against: 1.30 is the
# oldest this deployment supports (lifecycle.preStop.sleep is on by default
# from 1.30), 1.37 the newest kubernetes-validate ships.
K8S_VERSIONS = ["1.30.0", "1.37.0"]

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
PROM_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "subgate.json"
K8S_DIR = ROOT / "deploy" / "kubernetes"
PROD_TOML = ROOT / "config" / "production.toml"


class Failed(Exception):
    """A check's verdict: a one-line summary and the reasons, one per line."""

    def __init__(self, summary: str, details: list[str] | None = None):
        super().__init__(summary)
        self.summary = summary
        self.details = details or []


CHECKS: list[tuple[str, callable]] = []


def check(name: str):
    def register(fn):
        CHECKS.append((name, fn))
        return fn

    return register


def expect(problems: list[str], summary: str) -> None:
    if problems:
        raise Failed(summary, problems)


# ------------------------------------------------------------- helpers ----


def tool(name: str) -> str:
    """The venv's copy of a tool first, then PATH; a missing tool fails."""
    for candidate in (VENV_BIN / name, shutil.which(name)):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise Failed(f"{name} not found: run scripts/install-tools")


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def output_lines(p: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]


def load_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def wait_for(what: str, probe, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = probe()
            if result:
                return result
        except (OSError, urllib.error.URLError) as e:
            last = e
        time.sleep(interval)
    raise Failed(f"timed out after {timeout:g} s waiting for {what}" + (f" ({last})" if last else ""))


def duration_seconds(text: str) -> float:
    """A compose duration: 40s, 1m30s, 1h, 500ms."""
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text):
        if m.start() != pos:
            break
        value, unit = float(m.group(1)), m.group(2)
        total += value * {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 0.000001}[unit]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a duration: {text!r}")
    return total


def drain_numbers(toml_text: str, where: str) -> tuple[int, int]:
    server = tomllib.loads(toml_text).get("server", {})
    try:
        return int(server["drain_grace_seconds"]), int(server["drain_timeout_seconds"])
    except KeyError as e:
        raise Failed(f"{where} has no server.{e.args[0]}")


# ---------------------------------------------------------- Dockerfile ----


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments out."""
    out, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a parent wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        pat = pat.strip("/")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            excluded = not negate
    return excluded


@check("dockerfile-lint")
def _():
    hadolint = tool("hadolint")
    version = run([hadolint, "--version"]).stdout.split()[-1]
    p = run([hadolint, "--no-color", str(DOCKERFILE)])
    if p.returncode != 0 or output_lines(p):
        raise Failed(f"hadolint {version} reports findings", output_lines(p))
    return f"hadolint {version}: Dockerfile clean"


@check("dockerfile-contract")
def _():
    ins = dockerfile_instructions()
    problems = []
    froms = [i for i, (k, _) in enumerate(ins) if k == "FROM"]
    if len(froms) < 2:
        problems.append("not multi-stage (fewer than two FROM)")
    for i in froms:
        image = ins[i][1].split()[0]
        if ":" not in image.split("/")[-1] or image.endswith(":latest"):
            problems.append(f"base image not pinned to a tag: {image}")
    runtime = ins[froms[-1]:] if froms else []
    build = ins[: froms[-1]] if froms else ins
    runs = [a for k, a in build if k == "RUN"]
    if sum("cargo build --release --locked" in a for a in runs) < 2:
        problems.append("expected a dependencies-only `cargo build --release --locked` and the real one")
    copies = [(i, a) for i, (k, a) in enumerate(build) if k == "COPY"]
    manifest_at = next((i for i, a in copies if "Cargo.toml" in a and "Cargo.lock" in a), None)
    src_at = next((i for i, a in copies if a.split()[0] == "src"), None)
    if manifest_at is None or src_at is None or manifest_at > src_at:
        problems.append("Cargo.toml/Cargo.lock must be copied (and built) before src/")

    def last(kind):
        values = [a for k, a in runtime if k == kind]
        return values[-1] if values else None

    user = last("USER")
    if not user or user.split(":")[0] in ("root", "0"):
        problems.append(f"runtime USER is not a non-root user: {user!r}")
    for kind, want in (("ENTRYPOINT", ["/usr/local/bin/subgate"]), ("CMD", ["serve"])):
        value = last(kind)
        try:
            if json.loads(value or "null") != want:
                problems.append(f"{kind} is {value!r}, want exec form {json.dumps(want)}")
        except json.JSONDecodeError:
            problems.append(f"{kind} is not in exec form: {value!r}")
    if "8080" not in (last("EXPOSE") or "").split():
        problems.append("EXPOSE 8080 missing")
    if last("STOPSIGNAL") != "SIGTERM":
        problems.append("STOPSIGNAL SIGTERM missing")
    envs = " ".join(a for k, a in runtime if k == "ENV")
    if not re.search(r"\bSUBGATE__SERVER__HOST=0\.0\.0\.0\b", envs):
        problems.append("ENV SUBGATE__SERVER__HOST=0.0.0.0 missing")
    hc = last("HEALTHCHECK") or ""
    hc_cmd = hc.split("CMD", 1)[1].strip() if "CMD" in hc else ""
    try:
        if json.loads(hc_cmd or "null") != ["/usr/local/bin/subgate", "healthcheck"]:
            problems.append(f"HEALTHCHECK is not CMD [\"/usr/local/bin/subgate\",\"healthcheck\"]: {hc!r}")
    except json.JSONDecodeError:
        problems.append(f"HEALTHCHECK CMD is not in exec form: {hc!r}")
    workdir = last("WORKDIR")
    rt_copies = [a for k, a in runtime if k == "COPY"]
    if not workdir or not any("config/default.toml" in a and "config/production.toml" in a
                              and f"{workdir.rstrip('/')}/config/" in a for a in rt_copies):
        problems.append("config/default.toml and config/production.toml must be copied to $WORKDIR/config/")
    if not any("/subgate " in a + " " and "subgate-loadgen" in a and "/usr/local/bin/" in a
               for a in rt_copies):
        problems.append("both binaries (subgate, subgate-loadgen) must be copied to /usr/local/bin/")
    labels = " ".join(a for k, a in runtime if k == "LABEL")
    for label in ("title", "description", "licenses", "version"):
        if f"org.opencontainers.image.{label}=" not in labels:
            problems.append(f"OCI label org.opencontainers.image.{label} missing")

    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    for needed in ("Cargo.toml", "Cargo.lock", "src/main.rs", "src/lib.rs",
                   "src/bin/subgate-loadgen/main.rs", "config/default.toml",
                   "config/production.toml"):
        if dockerignore_excludes(needed, patterns):
            problems.append(f".dockerignore keeps {needed} out of the build context")
    for unwanted in ("target/release/subgate", ".git/config", ".tools/venv"):
        if not dockerignore_excludes(unwanted, patterns):
            problems.append(f".dockerignore lets {unwanted.split('/')[0]}/ into the build context")
    expect(problems, "Dockerfile breaks the image contract")
    return (f"{len(froms)} stages, deps layer before sources, USER {user}, exec ENTRYPOINT/CMD, "
            "EXPOSE 8080, SIGTERM, HEALTHCHECK, 0.0.0.0, config in WORKDIR, OCI labels; "
            ".dockerignore passes only what COPY needs")


# ------------------------------------------------------------- compose ----


@check("compose-schema")
def _():
    cj = tool("check-jsonschema")
    version = run([cj, "--version"]).stdout.split()[-1]
    p = run([cj, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    if p.returncode != 0:
        raise Failed("docker-compose.yml does not match the compose specification", output_lines(p))
    return f"docker-compose.yml valid against the compose-spec schema bundled with check-jsonschema {version}"


@check("compose-contract")
def _():
    doc = load_yaml(COMPOSE)
    problems = []
    if "version" in doc:
        problems.append("obsolete top-level `version:` key")
    svc = doc.get("services", {})
    for name in ("redis", "subgate", "haproxy", "prometheus", "grafana", "loadgen"):
        if name not in svc:
            problems.append(f"service {name} missing")
    if problems:
        raise Failed("docker-compose.yml lacks services", problems)
    for name, s in svc.items():
        image = s.get("image", "")
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        if "build" not in s and (not tag or tag == "latest" or not re.search(r"\d", tag)):
            problems.append(f"{name}: image {image!r} not pinned to a version")

    r = svc["redis"]
    if not r.get("image", "").startswith("redis:7."):
        problems.append("redis: image is not redis:7.x")
    if r.get("command") != ["redis-server", "--save", "", "--appendonly", "no"]:
        problems.append("redis: command should be redis-server --save \"\" --appendonly no")
    if "redis-cli" not in r.get("healthcheck", {}).get("test", []) or "ping" not in r["healthcheck"]["test"]:
        problems.append("redis: healthcheck is not redis-cli ping")

    n = svc["subgate"]
    if "build" not in n:
        problems.append("subgate: not built from the Dockerfile")
    if n.get("deploy", {}).get("replicas") != 3:
        problems.append("subgate: deploy.replicas is not 3")
    if n.get("init") is not True:
        problems.append("subgate: init is not true")
    nofile = n.get("ulimits", {}).get("nofile", {})
    if not isinstance(nofile, dict) or min(nofile.get("soft", 0), nofile.get("hard", 0)) < 65536:
        problems.append("subgate: ulimits.nofile below 65536")
    if n.get("ports"):
        problems.append("subgate: publishes host ports (clients go through HAProxy)")
    if n.get("depends_on", {}).get("redis", {}).get("condition") != "service_healthy":
        problems.append("subgate: depends_on redis is not condition: service_healthy")
    env = n.get("environment", {})
    if env.get("SUBGATE_ENV") != "production":
        problems.append("subgate: SUBGATE_ENV is not production")
    # One Redis unless the cluster profile's variables say otherwise.
    if env.get("SUBGATE__REDIS__URL") != "${SUBGATE_REDIS_URL:-redis://redis:6379}":
        problems.append("subgate: SUBGATE__REDIS__URL is not ${SUBGATE_REDIS_URL:-redis://redis:6379}")
    if env.get("SUBGATE__REDIS__MODE") != "${SUBGATE_REDIS_MODE:-single}":
        problems.append("subgate: SUBGATE__REDIS__MODE is not ${SUBGATE_REDIS_MODE:-single}")
    cluster = sorted(name for name, c in svc.items() if "cluster" in (c.get("profiles") or []))
    want = [f"redis-cluster-{i}" for i in range(1, 7)] + ["redis-cluster-init"]
    if cluster != sorted(want):
        problems.append(f"profile cluster: services {cluster}, not {sorted(want)}")
    m = re.fullmatch(r"\$\{SUBGATE_JWT_SECRET:-(.+)\}", str(env.get("SUBGATE__AUTH__JWT_SECRET", "")))
    if not m or len(m.group(1)) < 32:
        problems.append("subgate: SUBGATE__AUTH__JWT_SECRET is not ${SUBGATE_JWT_SECRET:-<32+ bytes>}")
    if not env.get("SUBGATE__PUBLISH__API_KEYS"):
        problems.append("subgate: SUBGATE__PUBLISH__API_KEYS missing")
    for key in ("SUBGATE__RATELIMIT__PUBLISH_PER_SECOND", "SUBGATE__RATELIMIT__PUBLISH_BURST"):
        if int(env.get(key, 0)) <= 1000:
            problems.append(f"subgate: {key} not raised for load")

    h = svc["haproxy"]
    if not h.get("image", "").startswith("haproxy:2."):
        problems.append("haproxy: image is not haproxy:2.x")
    if "./deploy/haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" not in h.get("volumes", []):
        problems.append("haproxy: deploy/haproxy/haproxy.cfg not mounted read-only")
    for port in ("8080:8080", "8404:8404"):
        if port not in h.get("ports", []):
            problems.append(f"haproxy: port {port} not published")

    p = svc["prometheus"]
    vols = " ".join(p.get("volumes", []))
    for f in ("prometheus.yml", "alerts.yml"):
        if f"./deploy/prometheus/{f}:/etc/prometheus/{f}:ro" not in vols:
            problems.append(f"prometheus: deploy/prometheus/{f} not mounted read-only at /etc/prometheus")
    if "9090:9090" not in p.get("ports", []):
        problems.append("prometheus: 9090 not published")

    g = svc["grafana"]
    gv = g.get("volumes", [])
    if "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" not in gv:
        problems.append("grafana: provisioning not mounted")
    if not any(v.startswith("./deploy/grafana/dashboards:") for v in gv):
        problems.append("grafana: dashboards not mounted")
    if "3000:3000" not in g.get("ports", []):
        problems.append("grafana: 3000 not published")

    lg = svc["loadgen"]
    if lg.get("profiles") != ["load"]:
        problems.append("loadgen: not under profiles: [load]")
    if lg.get("entrypoint") not in (["/usr/local/bin/subgate-loadgen"], ["subgate-loadgen"]):
        problems.append("loadgen: entrypoint is not subgate-loadgen")
    cmd = lg.get("command", [])
    for flag, value in (("--url", "http://haproxy:8080"), ("--metrics-url", "http://subgate:8080")):
        if flag not in cmd or cmd[cmd.index(flag) + 1] != value:
            problems.append(f"loadgen: {flag} {value} missing")
    if "haproxy" not in (lg.get("depends_on") or []):
        problems.append("loadgen: does not depend on haproxy")
    if lg.get("image") != n.get("image"):
        problems.append("loadgen: not the same image as subgate")
    expect(problems, "docker-compose.yml breaks the rig's contract")
    return ("redis 7 (no persistence, ping healthcheck), 3 subgate replicas (init, nofile, "
            "no host port, production env), haproxy, prometheus, grafana, loadgen under profile load")


@check("compose-stop-grace")
def _():
    grace, timeout = drain_numbers(PROD_TOML.read_text(), "config/production.toml")
    sgp = load_yaml(COMPOSE)["services"]["subgate"].get("stop_grace_period")
    if sgp is None:
        raise Failed("subgate has no stop_grace_period (Docker's default is 10 s)")
    seconds = duration_seconds(str(sgp))
    if not seconds > grace + timeout:
        raise Failed(f"stop_grace_period {sgp} is not longer than drain_grace_seconds {grace} + "
                     f"drain_timeout_seconds {timeout} of config/production.toml")
    return f"stop_grace_period {sgp} > drain_grace {grace} s + drain_timeout {timeout} s (config/production.toml)"


# ---------------------------------------------------------- Kubernetes ----

RENDERS: dict[str, list[dict]] = {}


def kustomize(overlay: str) -> list[dict]:
    if overlay not in RENDERS:
        kubectl = tool("kubectl")
        p = run([kubectl, "kustomize", str(K8S_DIR / overlay)])
        if p.returncode != 0:
            raise Failed(f"kubectl kustomize deploy/kubernetes/{overlay} failed", output_lines(p))
        RENDERS[overlay] = [d for d in yaml.safe_load_all(p.stdout) if d]
    return RENDERS[overlay]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def is_crd_kind(doc: dict) -> bool:
    return doc.get("apiVersion", "").startswith("monitoring.coreos.com/")


@check("k8s-render")
def _():
    kubectl = tool("kubectl")
    version = json.loads(run([kubectl, "version", "--client", "-o", "json"]).stdout)["clientVersion"]["gitVersion"]
    summary = []
    for overlay in (".", "monitoring"):
        docs = kustomize(overlay)
        kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
        summary.append(f"deploy/kubernetes/{overlay if overlay != '.' else ''}".rstrip("/") + f": {len(docs)} objects")
        if overlay == "." and by_kind(docs, "Secret"):
            raise Failed("the base kustomization renders a Secret: secrets must not live in the repository")
        if overlay == "." and any(is_crd_kind(d) for d in docs):
            raise Failed("the base renders CRD objects; keep them in the monitoring overlay", kinds)
    return f"kubectl {version} kustomize: " + ", ".join(summary)


@check("k8s-schema")
def _():
    import kubernetes_validate
    from importlib.metadata import version as pkg_version

    docs = [("deploy/kubernetes", d) for d in kustomize(".")]
    docs += [("deploy/kubernetes/monitoring", d) for d in kustomize("monitoring")]
    docs += [("deploy/kubernetes/secret.example.yaml", d)
             for d in yaml.safe_load_all((K8S_DIR / "secret.example.yaml").read_text()) if d]
    problems, count, crds = [], 0, set()
    for k8s in K8S_VERSIONS:
        for where, d in docs:
            name = f"{where}: {d.get('kind')}/{d.get('metadata', {}).get('name')}"
            if is_crd_kind(d):
                crds.add(f"{d['kind']}/{d['metadata']['name']}")
                continue
            try:
                kubernetes_validate.validate(d, k8s, strict=True)
                count += 1
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{name} (Kubernetes {k8s}): {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{name}: {e.message}")
    expect(problems, "Kubernetes manifests do not validate")
    return (f"kubernetes-validate {pkg_version('kubernetes-validate')} (strict): {count // len(K8S_VERSIONS)} "
            f"objects valid against Kubernetes {' and '.join(v.rsplit('.', 1)[0] for v in K8S_VERSIONS)}; "
            f"{', '.join(sorted(crds)) or 'no CRD objects'} has no Kubernetes schema: see k8s-crd")


# The ServiceMonitor validator: prometheus-operator's CRD schema, compiled by
# @kubernetes-models/prometheus-operator. Reads a JSON list of objects on
# stdin, prints one JSON result per object.
SERVICEMONITOR_JS = r"""
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
let input = "";
for await (const chunk of process.stdin) input += chunk;
for (const obj of JSON.parse(input)) {
  try {
    new ServiceMonitor(obj).validate();
    console.log(JSON.stringify({ name: obj.metadata.name, ok: true }));
  } catch (e) {
    console.log(JSON.stringify({ name: obj.metadata.name, ok: false, error: String(e.message || e) }));
  }
}
"""


@check("k8s-crd")
def _():
    objs = [d for d in kustomize("monitoring") if is_crd_kind(d)]
    other = [d for d in objs if d["kind"] != "ServiceMonitor"]
    if other:
        raise Failed("CRD objects without a validator", [f"{d['kind']}/{d['metadata']['name']}" for d in other])
    if not objs:
        raise Failed("no ServiceMonitor rendered by deploy/kubernetes/monitoring")
    node = shutil.which("node")
    pkg = NPM_DIR / "node_modules" / "@kubernetes-models" / "prometheus-operator" / "package.json"
    if not node or not pkg.exists():
        raise Failed("node or @kubernetes-models/prometheus-operator missing: run scripts/install-tools")
    pkg_version = json.loads(pkg.read_text())["version"]
    p = run([node, "--input-type=module", "-e", SERVICEMONITOR_JS], input=json.dumps(objs), cwd=NPM_DIR)
    if p.returncode != 0:
        raise Failed("the ServiceMonitor validator did not run", output_lines(p))
    results = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    bad = [f"ServiceMonitor/{r['name']}: {r['error']}" for r in results if not r["ok"]]
    if len(results) != len(objs):
        bad.append(f"validated {len(results)} of {len(objs)} objects")
    # What the schema cannot say: that the ServiceMonitor finds the Service.
    svc = by_kind(kustomize("monitoring"), "Service")[0]
    for sm in objs:
        sel = sm["spec"]["selector"].get("matchLabels", {})
        if any(svc["metadata"].get("labels", {}).get(k) != v for k, v in sel.items()):
            bad.append(f"ServiceMonitor/{sm['metadata']['name']} does not select Service/{svc['metadata']['name']}")
        ports = {p.get("name") for p in svc["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            if ep.get("port") not in ports:
                bad.append(f"ServiceMonitor endpoint port {ep.get('port')!r} is not a port of the Service")
    expect(bad, "ServiceMonitor does not validate")
    return (f"{len(objs)} ServiceMonitor valid against prometheus-operator's CRD schema "
            f"(@kubernetes-models/prometheus-operator {pkg_version}) and selects the Service's http port. "
            "NOTE: the CRD schema checks types, enums and required fields but, like the CRD itself, "
            "does not reject unknown fields")


def container(deploy: dict) -> dict:
    return deploy["spec"]["template"]["spec"]["containers"][0]


@check("k8s-contract")
def _():
    docs = kustomize(".")
    problems = []
    kinds = {d["kind"] for d in docs}
    for kind in ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget",
                 "HorizontalPodAutoscaler", "Ingress"):
        if kind not in kinds:
            problems.append(f"no {kind} in deploy/kubernetes")
    if problems:
        raise Failed("deploy/kubernetes lacks objects", problems)
    dep = by_kind(docs, "Deployment")[0]
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    c = container(dep)
    if spec.get("replicas", 0) < 3:
        problems.append("Deployment: fewer than 3 replicas")
    if spec.get("strategy", {}).get("rollingUpdate", {}).get("maxUnavailable") != 0:
        problems.append("Deployment: rollingUpdate.maxUnavailable is not 0")
    if not pod.get("topologySpreadConstraints"):
        problems.append("Deployment: no topologySpreadConstraints")
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in res.get(part, {}):
                problems.append(f"container: resources.{part}.{r} missing")
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
        problems.append("pod securityContext: runAsNonRoot/runAsUser")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("pod securityContext: seccompProfile RuntimeDefault")
    for key, want in (("runAsNonRoot", True), ("readOnlyRootFilesystem", True),
                      ("allowPrivilegeEscalation", False)):
        if csc.get(key) is not want:
            problems.append(f"container securityContext: {key} is not {want}")
    if csc.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("container securityContext: capabilities.drop is not [ALL]")
    if csc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("container securityContext: seccompProfile RuntimeDefault")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", None)):
        got = c.get(probe, {}).get("httpGet", {}).get("path")
        if not got or (path and got != path):
            problems.append(f"container: {probe} is not httpGet {path or '(any)'}")
    if c.get("readinessProbe", {}).get("periodSeconds", 10) > 5:
        problems.append("container: readinessProbe.periodSeconds above 5 (a draining pod leaves late)")
    if not c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds"):
        problems.append("container: lifecycle.preStop.sleep.seconds missing")
    env = {e["name"]: e for e in c.get("env", [])}
    if env.get("SUBGATE_ENV", {}).get("value") != "production":
        problems.append("container: SUBGATE_ENV is not production")
    for name in ("SUBGATE__AUTH__JWT_SECRET", "SUBGATE__REDIS__URL"):
        if "secretKeyRef" not in env.get(name, {}).get("valueFrom", {}):
            problems.append(f"container: {name} does not come from a Secret")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    cfg = mounts.get("/app/config/production.toml")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    cm_name = volumes.get(cfg["name"], {}).get("configMap", {}).get("name") if cfg else None
    if not cm_name or cm_name not in {d["metadata"]["name"] for d in by_kind(docs, "ConfigMap")}:
        problems.append("container: /app/config/production.toml is not mounted from the rendered ConfigMap")
    if pod.get("enableServiceLinks") is not False:
        problems.append("pod: enableServiceLinks should be false (Service env vars collide with SUBGATE_*)")
    svc = by_kind(docs, "Service")[0]
    if svc["spec"].get("type", "ClusterIP") != "ClusterIP" or not any(
            p.get("name") == "http" and p.get("port") == 8080 for p in svc["spec"]["ports"]):
        problems.append("Service: not ClusterIP with port 8080 named http")
    hpa = by_kind(docs, "HorizontalPodAutoscaler")[0]
    if hpa["apiVersion"] != "autoscaling/v2":
        problems.append("HPA: not autoscaling/v2")
    mon_hpa = by_kind(kustomize("monitoring"), "HorizontalPodAutoscaler")[0]
    metric_types = {m["type"] for m in mon_hpa["spec"]["metrics"]}
    if metric_types != {"Resource", "Pods"}:
        problems.append(f"monitoring HPA: metrics are {sorted(metric_types)}, want CPU and a Pods metric")
    ann = by_kind(docs, "Ingress")[0]["metadata"].get("annotations", {})
    for key, want in (("proxy-read-timeout", "3600"), ("proxy-send-timeout", "3600"), ("proxy-buffering", "off")):
        if ann.get(f"nginx.ingress.kubernetes.io/{key}") != want:
            problems.append(f"Ingress: nginx.ingress.kubernetes.io/{key} is not {want!r}")
    expect(problems, "Kubernetes manifests break the deployment contract")
    return ("Deployment (3 replicas, maxUnavailable 0, spread, resources, restricted securityContext, "
            "probes, preStop sleep, secrets from a Secret, ConfigMap production.toml), Service, PDB, "
            "HPA v2 (+ Pods metric in monitoring), Ingress timeouts")


@check("k8s-drain-timing")
def _():
    docs = kustomize(".")
    dep = by_kind(docs, "Deployment")[0]
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    cm_name = next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
    cm = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == cm_name)
    k_grace, k_timeout = drain_numbers(cm["data"]["production.toml"], f"ConfigMap {cm_name}")
    r_grace, r_timeout = drain_numbers(PROD_TOML.read_text(), "config/production.toml")
    problems = []
    if (k_grace, k_timeout) != (r_grace, r_timeout):
        problems.append(f"the ConfigMap's production.toml (grace {k_grace}, timeout {k_timeout}) disagrees "
                        f"with config/production.toml (grace {r_grace}, timeout {r_timeout})")
    pre = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    need = pre + k_grace + k_timeout + 5
    if tgps < need:
        problems.append(f"terminationGracePeriodSeconds {tgps} < preStop {pre} + grace {k_grace} + "
                        f"timeout {k_timeout} + margin 5 = {need}")
    expect(problems, "the pod's termination timing does not cover the drain")
    return (f"terminationGracePeriodSeconds {tgps} >= preStop {pre} + drain_grace {k_grace} + "
            f"drain_timeout {k_timeout} + 5 = {need}; ConfigMap and config/production.toml agree")


# ---------------------------------------------------------- Prometheus ----


def prometheus_adapt(text: str, nodes: list[int], stats: int, prom: int) -> str:
    """The fleet test's adaptation, per the contract at the top of prometheus.yml."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.strip() == "dns_sd_configs:":
            indent = len(line) - len(line.lstrip())
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                i += 1
            out.append(" " * indent + "static_configs:")
            out.append(" " * (indent + 2) + "- targets: [" + ", ".join(f'"127.0.0.1:{p}"' for p in nodes) + "]")
            continue
        out.append(line.replace("haproxy:8404", f"127.0.0.1:{stats}").replace("localhost:9090", f"127.0.0.1:{prom}"))
    return "\n".join(out) + "\n"


@check("promtool-config")
def _():
    promtool = tool("promtool")
    p = run([promtool, "check", "config", str(PROM_DIR / "prometheus.yml")])
    if p.returncode != 0:
        raise Failed("promtool check config failed", output_lines(p))
    text = (PROM_DIR / "prometheus.yml").read_text()
    problems = []
    if sum(ln.strip() == "dns_sd_configs:" for ln in text.splitlines()) != 1:
        problems.append("prometheus.yml must discover the nodes in exactly one `dns_sd_configs:` block")
    for addr in ("haproxy:8404", "localhost:9090"):
        if addr not in text:
            problems.append(f"prometheus.yml no longer names {addr}, which the fleet test replaces")
    if not problems:
        with tempfile.TemporaryDirectory() as tmp:
            adapted = Path(tmp) / "prometheus.yml"
            adapted.write_text(prometheus_adapt(text, [18081, 18082, 18083], 18404, 19090))
            shutil.copy(PROM_DIR / "alerts.yml", Path(tmp) / "alerts.yml")
            p = run([promtool, "check", "config", str(adapted)])
            if p.returncode != 0:
                problems += [f"adapted for the fleet test: {ln}" for ln in output_lines(p)]
            elif "subgate" not in yaml.safe_load(adapted.read_text())["scrape_configs"][0]["job_name"]:
                problems.append("adapted for the fleet test: the subgate job moved")
    expect(problems, "prometheus.yml breaks the fleet test's adaptation contract")
    return (f"{run([promtool, '--version']).stdout.split()[2]}: deploy/prometheus/prometheus.yml valid "
            "(rule files included), also as the fleet test adapts it")


@check("promtool-rules")
def _():
    promtool = tool("promtool")
    p = run([promtool, "check", "rules", str(PROM_DIR / "alerts.yml")])
    if p.returncode != 0:
        raise Failed("promtool check rules failed", output_lines(p))
    found = re.search(r"(\d+) rules found", p.stdout)
    return f"deploy/prometheus/alerts.yml: {found.group(1) if found else '?'} rules valid"


@check("promtool-test")
def _():
    promtool = tool("promtool")
    p = run([promtool, "test", "rules", str(PROM_DIR / "alerts_test.yml")])
    if p.returncode != 0:
        raise Failed("promtool test rules failed", output_lines(p))
    return "deploy/prometheus/alerts_test.yml: every case passes"


def alert_rules() -> list[dict]:
    doc = load_yaml(PROM_DIR / "alerts.yml")
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


@check("alerts-contract")
def _():
    problems = []
    rules = alert_rules()
    for r in rules:
        name = r["alert"]
        if "for" not in r:
            problems.append(f"{name}: no `for`")
        if r.get("labels", {}).get("severity") not in ("critical", "warning"):
            problems.append(f"{name}: severity label not critical or warning")
        for a in ("summary", "description"):
            if not r.get("annotations", {}).get(a):
                problems.append(f"{name}: no {a} annotation")
    tests = load_yaml(PROM_DIR / "alerts_test.yml")
    firing, silent = set(), set()
    for t in tests.get("tests", []):
        for case in t.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    for r in rules:
        if r["alert"] not in firing:
            problems.append(f"{r['alert']}: no test shows it firing")
        if r["alert"] not in silent:
            problems.append(f"{r['alert']}: no test shows it silent")
    prom = load_yaml(PROM_DIR / "prometheus.yml")
    if "alerts.yml" not in prom.get("rule_files", []):
        problems.append("prometheus.yml: rule_files does not load alerts.yml")
    jobs = {j["job_name"]: j for j in prom.get("scrape_configs", [])}
    sd = (jobs.get("subgate", {}).get("dns_sd_configs") or [{}])[0]
    if sd.get("names") != ["subgate"] or sd.get("type") != "A" or sd.get("port") != 8080:
        problems.append("prometheus.yml: job subgate does not discover replicas by DNS (names [subgate], A, 8080)")
    if "haproxy" not in jobs:
        problems.append("prometheus.yml: no haproxy job")
    expect(problems, "alert rules or scrape config break the contract")
    return (f"{len(rules)} alerts, each with for/severity/summary/description and tested firing and silent; "
            "job subgate discovers every replica by DNS")


# ------------------------------------------------------------- HAProxy ----


def haproxy_adapt(text: str, servers: list[int], front: int, stats: int) -> str:
    """The fleet test's adaptation, per the contract at the top of haproxy.cfg."""
    out, skipping = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if skipping:
            if line and not line[0].isspace() and not line.startswith("#"):
                skipping = False
            else:
                continue
        if stripped == "resolvers docker":
            skipping = True
            continue
        if stripped.startswith("server-template subgate"):
            indent = line[: len(line) - len(line.lstrip())]
            words = stripped.split()[4:]
            opts = " ".join(words).replace("resolvers docker", "").replace("init-addr none", "")
            opts = " ".join(opts.split())
            out += [f"{indent}server s{i + 1} 127.0.0.1:{port} {opts}" for i, port in enumerate(servers)]
            continue
        if stripped == "bind :8080":
            line = line.replace(":8080", f"127.0.0.1:{front}")
        elif stripped == "bind :8404":
            line = line.replace(":8404", f"127.0.0.1:{stats}")
        out.append(line)
    return "\n".join(out) + "\n"


def haproxy_check(path: Path) -> list[str]:
    p = run([tool("haproxy"), "-c", "-f", str(path)])
    lines = output_lines(p)
    if p.returncode != 0 or any("[WARNING]" in ln or "[ALERT]" in ln for ln in lines):
        return lines or [f"exit status {p.returncode}"]
    return []


@check("haproxy-config")
def _():
    problems = haproxy_check(HAPROXY_CFG)
    expect(problems, "haproxy -c fails on deploy/haproxy/haproxy.cfg")
    version = run([tool("haproxy"), "-v"]).stdout.split()[2]
    return f"haproxy {version} -c: deploy/haproxy/haproxy.cfg valid, no warnings"


@check("haproxy-contract")
def _():
    text = HAPROXY_CFG.read_text()
    lines = [ln.strip() for ln in text.splitlines()]
    problems = []
    templates = [ln for ln in lines if ln.startswith("server-template subgate")]
    if len(templates) != 1:
        problems.append(f"{len(templates)} lines start with `server-template subgate`, want exactly 1")
    elif not re.search(r"\bsubgate:8080\b", templates[0]) or "resolvers docker init-addr none" not in templates[0] \
            or " check" not in templates[0]:
        problems.append("the server-template line lacks `subgate:8080`, `check` or `resolvers docker init-addr none`")
    for needed, count in (("resolvers docker", 1), ("bind :8080", 1), ("bind :8404", 1),
                          ("nameserver dns 127.0.0.11:53", 1)):
        got = lines.count(needed)
        if got != count:
            problems.append(f"`{needed}` appears on {got} lines of its own, want {count}")
    for needed in ("balance leastconn", "timeout tunnel", "timeout client-fin", "timeout server-fin",
                   "option httpchk GET /readyz", "http-check expect status 200",
                   "http-request use-service prometheus-exporter if { path /metrics }"):
        if not any(ln.startswith(needed) for ln in lines):
            problems.append(f"`{needed}` missing")
    if "Contract with the fleet test" not in text:
        problems.append("the comment block stating the fleet test's contract is missing")
    if not problems:
        with tempfile.TemporaryDirectory() as tmp:
            adapted = Path(tmp) / "haproxy.cfg"
            adapted.write_text(haproxy_adapt(text, [18081, 18082, 18083], 18080, 18404))
            for ln in haproxy_check(adapted):
                problems.append(f"adapted for the fleet test: {ln}")
            if any("resolvers" in ln.split("#", 1)[0] for ln in adapted.read_text().splitlines()):
                problems.append("adapted for the fleet test: a `resolvers` reference is left")
    expect(problems, "haproxy.cfg breaks the fleet test's adaptation contract")
    return "one server-template line, resolvers section, bind :8080 / :8404; the fleet test's adaptation passes haproxy -c"


# ------------------------------------------------------------- Grafana ----

RATE_RE = re.compile(r"\b(rate|irate|increase|delta|idelta|deriv)\s*\(")


def range_selectors(expr: str) -> list[str]:
    return re.findall(r"\[([^\]]+)\]", expr)


def dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if v.get("type") == "query":
            out.append((f"variable {v['name']}", q.get("query", "") if isinstance(q, dict) else q))
    return out


@check("grafana-dashboard")
def _():
    try:
        dash = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        raise Failed(f"{DASHBOARD.relative_to(ROOT)} is not JSON: {e}")
    problems = []
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no `datasource` variable of type datasource (prometheus)")
    if "instance" not in variables:
        problems.append("no `instance` variable")
    panels = 0

    def walk(ps):
        nonlocal panels
        for p in ps:
            if p.get("type") == "row":
                walk(p.get("panels", []))
                continue
            panels += 1
            title = p.get("title", "?")
            uids = [p.get("datasource", {}).get("uid")] + [t.get("datasource", {}).get("uid")
                                                         for t in p.get("targets", [])]
            if any(u != "${datasource}" for u in uids):
                problems.append(f"panel {title!r}: datasource is not ${{datasource}}")
            for t in p.get("targets", []):
                expr = t.get("expr", "")
                if RATE_RE.search(expr) and any(r != "$__rate_interval" for r in range_selectors(expr)):
                    problems.append(f"panel {title!r}: a range other than $__rate_interval: {expr}")
                if "$instance" not in expr and "subgate_" in expr:
                    problems.append(f"panel {title!r}: query ignores $instance: {expr}")

    walk(dash.get("panels", []))
    dsprov = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    d0 = (dsprov.get("datasources") or [{}])[0]
    if d0.get("type") != "prometheus" or d0.get("url") != "http://prometheus:9090":
        problems.append("provisioned datasource is not prometheus at http://prometheus:9090")
    dbprov = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "subgate.yml")
    path = (dbprov.get("providers") or [{}])[0].get("options", {}).get("path")
    mounts = load_yaml(COMPOSE)["services"]["grafana"].get("volumes", [])
    if not any(v.startswith("./deploy/grafana/dashboards:" + (path or "\0")) for v in mounts):
        problems.append(f"dashboard provider path {path!r} is not where docker-compose mounts deploy/grafana/dashboards")
    expect(problems, "the Grafana dashboard or its provisioning is wrong")
    return (f"{panels} panels, datasource variable everywhere, $__rate_interval in every rate, "
            "instance variable; provisioning matches the compose mounts")


# --------------------------------------------------------- live checks ----


class Live:
    """A redis-server and a subgate node on free ports, started once."""

    def __init__(self):
        self.tmp = None
        self.procs: list[subprocess.Popen] = []
        self.node = None
        self.node_log = None
        self.addr = None
        self.error = None

    def start(self):
        if self.addr or self.error:
            if self.error:
                raise Failed(self.error)
            return
        try:
            self._start()
        except Failed as e:
            self.error = e.summary
            raise

    def _start(self):
        if not SUBGATE_BIN.exists():
            raise Failed(f"{SUBGATE_BIN} does not exist: build it (cargo build --release) or set SUBGATE_BIN")
        redis = tool("redis-server")
        self.tmp = Path(tempfile.mkdtemp(prefix="subgate-check-deploy-"))
        rport = free_port()
        rlog = open(self.tmp / "redis.log", "w")
        self.procs.append(subprocess.Popen(
            [redis, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp)], stdout=rlog, stderr=subprocess.STDOUT))

        def redis_up():
            with socket.create_connection(("127.0.0.1", rport), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_for("redis-server", redis_up, 10)
        # The node runs in a scratch directory holding the repository's
        # config/default.toml, as it would be deployed, on a port of its own.
        (self.tmp / "config").mkdir()
        shutil.copy(ROOT / "config" / "default.toml", self.tmp / "config" / "default.toml")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUBGATE")}
        env.update({
            "SUBGATE__SERVER__PORT": "0",
            "SUBGATE__REDIS__URL": f"redis://127.0.0.1:{rport}",
            # A drain long enough to watch HAProxy take the node out.
            "SUBGATE__SERVER__DRAIN_GRACE_SECONDS": "5",
            "SUBGATE__SERVER__DRAIN_TIMEOUT_SECONDS": "10",
            "RUST_LOG": "info",
        })
        self.node_log = self.tmp / "subgate.log"
        log = open(self.node_log, "w")
        self.node = subprocess.Popen([str(SUBGATE_BIN), "serve"], cwd=self.tmp, env=env,
                                     stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(self.node)

        def listening():
            if self.node.poll() is not None:
                raise Failed(f"subgate exited with {self.node.returncode} before listening",
                             self.node_log.read_text().splitlines()[-20:])
            m = re.search(r"listening on (\S+?)[\"\s]", self.node_log.read_text())
            return m.group(1) if m else None

        self.addr = wait_for("subgate's `listening on ADDR` line", listening, 20)
        wait_for("/readyz 200 (subgate connected to Redis)",
                 lambda: http_get(f"http://{self.addr}/readyz")[0] == 200, 20)

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


LIVE = Live()


def metric_families(text: str) -> dict[str, str]:
    families = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            families[name] = kind
        elif line and not line.startswith("#"):
            families.setdefault(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0), "sample")
    return families


def referenced_metrics() -> dict[str, set[str]]:
    """Metric names the dashboard, the alerts and the HPA query, and where."""
    refs: dict[str, set[str]] = {}

    def add(expr: str, where: str):
        for name in re.findall(r"\b(subgate_[a-zA-Z0-9_]+)\b", expr):
            refs.setdefault(name, set()).add(where)

    for title, expr in dashboard_queries(json.loads(DASHBOARD.read_text())):
        add(expr, f"dashboard: {title}")
    for r in alert_rules():
        add(r["expr"], f"alert {r['alert']}")
    for overlay in (".", "monitoring"):
        for hpa in by_kind(kustomize(overlay), "HorizontalPodAutoscaler"):
            for m in hpa["spec"]["metrics"]:
                if m["type"] == "Pods":
                    add(m["pods"]["metric"]["name"], "HPA Pods metric")
    return refs


@check("live-metrics")
def _():
    LIVE.start()
    status, text = http_get(f"http://{LIVE.addr}/metrics")
    if status != 200:
        raise Failed(f"GET /metrics answered {status}")
    families = metric_families(text)
    missing = []
    refs = referenced_metrics()
    for name in sorted(refs):
        if name in families:
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if base != name and families.get(base) in ("histogram", "summary"):
            continue
        missing.append(f"{name} (used by {'; '.join(sorted(refs[name]))})")
    others = sorted({n for r in alert_rules() for n in re.findall(r"\b(up)\b\s*\{", r["expr"])})
    if missing:
        raise Failed(f"{len(missing)} of {len(refs)} metrics queried are not in a live node's /metrics", missing)
    note = f"; NOTE: {', '.join(others)} is Prometheus's own, not looked for" if others else ""
    return (f"all {len(refs)} subgate metrics the dashboard, alerts and HPA query are in /metrics of "
            f"{SUBGATE_BIN.relative_to(ROOT) if SUBGATE_BIN.is_relative_to(ROOT) else SUBGATE_BIN} "
            f"on {LIVE.addr} with Redis{note}")


def haproxy_server_status(stats: int, server: str) -> str | None:
    status, text = http_get(f"http://127.0.0.1:{stats}/;csv")
    if status != 200:
        return None
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) > 17 and fields[0] == "subgate" and fields[1] == server:
            return fields[17]
    return None


@check("haproxy-live")
def _():
    LIVE.start()
    node_port = int(LIVE.addr.rsplit(":", 1)[1])
    front, stats = free_port(), free_port()
    cfg = LIVE.tmp / "haproxy.cfg"
    cfg.write_text(haproxy_adapt(HAPROXY_CFG.read_text(), [node_port], front, stats))
    hlog = open(LIVE.tmp / "haproxy.log", "w")
    haproxy = subprocess.Popen([tool("haproxy"), "-db", "-f", str(cfg)], stdout=hlog, stderr=subprocess.STDOUT)
    LIVE.procs.append(haproxy)
    wait_for("HAProxy to see the node UP", lambda: haproxy_server_status(stats, "s1") == "UP", 10)
    problems = []
    status, _ = http_get(f"http://127.0.0.1:{front}/readyz")
    if status != 200:
        problems.append(f"GET /readyz through HAProxy answered {status}")
    status, text = http_get(f"http://127.0.0.1:{stats}/metrics")
    if status != 200 or "haproxy_server_status" not in text and "haproxy_backend_status" not in text:
        problems.append(f"HAProxy's prometheus-exporter on the stats port answered {status} without haproxy_* metrics")
    # Drain: SIGTERM the node; HAProxy must take it out while it is still
    # serving its grace period (5 s here), within about 2 s.
    LIVE.node.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        wait_for("HAProxy to mark the draining node DOWN",
                 lambda: haproxy_server_status(stats, "s1") not in ("UP", None)
                 and haproxy_server_status(stats, "s1") != "UP 1/2", 4, 0.05)
        took = time.monotonic() - t0
        if LIVE.node.poll() is not None:
            problems.append("the node exited before HAProxy noticed: the drain grace was not what took it out")
        elif took > 2.5:
            problems.append(f"HAProxy took {took:.1f} s to take the draining node out (want about 2 s)")
    except Failed as e:
        problems.append(e.summary)
        took = float("nan")
    expect(problems, "HAProxy with the fleet test's adaptation misbehaves")
    return (f"adapted config proxies /readyz to the node, serves haproxy_* on the stats port, and "
            f"took the node out {took:.1f} s after SIGTERM, while it was still draining")


# ---------------------------------------------------------------- main ----


def main() -> int:
    os.chdir(ROOT)
    passed = failed = 0
    try:
        for name, fn in CHECKS:
            try:
                summary = fn()
                print(f"PASS {name}: {summary}", flush=True)
                passed += 1
            except Failed as e:
                print(f"FAIL {name}: {e.summary}", flush=True)
                for d in e.details:
                    print(f"       {d}", flush=True)
                failed += 1
            except Exception as e:  # a check that crashed is a failed check
                print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
                failed += 1
    finally:
        LIVE.stop()
    print(f"check-deploy: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
