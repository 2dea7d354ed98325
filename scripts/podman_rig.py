#!/usr/bin/env python3
"""docker-compose.yml under podman: the compose topology itself, checked.

Run through scripts/podman-rig, which installs podman and its networking,
builds the images (the runtime stage and the stand-ins) and the virtualenv
this runs in, and points podman at its own containers.conf.

This reads docker-compose.yml and runs its services with `podman` commands
derived from it key by key, with the compose semantics the rig depends on
(replicas, service-name DNS on a project network, health-gated start order,
init, stop signal and grace period, restart policy, profiles, one-off runs).
A key it does not map fails the run instead of being ignored, so the rig
cannot drift from the file unnoticed. What it cannot reproduce on this
machine it adapts, and says so: the deviations are printed before anything
starts (`plan`).

  podman_rig.py plan               the containers and every deviation
  podman_rig.py rig [--skip SVC]   up, the checks (PASS/FAIL), down always
  podman_rig.py down               remove the project's containers, its
                                   network and their volumes (images stay)

Environment: SUBGATE_RIG_WORK (a scratch directory, required for `rig`),
SUBGATE_RIG_LOADGEN (the loadgen's profile arguments).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
RIG_LABEL = "org.subgate.podman-rig=1"
# The address every published port is bound to: the rig stays on loopback.
BIND_IP = "127.0.0.1"
# podman's rootful default process limit (4194304) is refused here; the
# rig's default, as scripts/podman-smoke's.
NPROC_DEFAULT = 4096
# Docker's embedded DNS, which deploy/haproxy/haproxy.cfg's resolvers use.
DOCKER_DNS = "127.0.0.11"
LOADGEN_DEFAULT = "--connections 300 --rate 20 --duration 10"

SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "healthcheck", "ulimits", "deploy",
    "init", "stop_signal", "stop_grace_period", "depends_on", "environment",
    "restart", "volumes", "ports", "profiles",
}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "disable"}
DEPLOY_KEYS = {"replicas", "mode"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


class RigError(Exception):
    pass


def say(msg: str) -> None:
    print(f"podman-rig: {msg}", flush=True)


# ------------------------------------------------------------- compose ----

def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    if not path.exists():
        return env
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


_VAR = re.compile(r"\$(?:(\$)|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: $VAR, ${VAR}, ${VAR:-d}, ${VAR-d},
    ${VAR:?e}, ${VAR?e}, ${VAR:+a}, ${VAR+a}, and $$ for a dollar."""

    def one(m: re.Match) -> str:
        if m.group(1):
            return "$"
        if m.group(3):
            return env.get(m.group(3), "")
        expr = m.group(2)
        v = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", expr, re.S)
        if not v:
            raise RigError(f"cannot interpolate ${{{expr}}}")
        name, op, arg = v.group(1), v.group(2), v.group(3) or ""
        value = env.get(name)
        set_ = value is not None
        nonempty = set_ and value != ""
        if op is None:
            return value or ""
        if op in (":-", "-"):
            return value if (nonempty if op == ":-" else set_) else arg
        if op in (":?", "?"):
            if not (nonempty if op == ":?" else set_):
                raise RigError(f"{name}: {arg or 'required'}")
            return value
        return arg if (nonempty if op == ":+" else set_) else ""

    return _VAR.sub(one, text)


def interpolate_tree(node, env):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(n, env) for n in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


def seconds(text, where: str) -> float:
    """A compose duration (1m30s, 500ms, 40s) or a number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    total, pos = 0.0, 0
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    for m in re.finditer(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise RigError(f"{where}: not a duration: {text!r}")
    return total


def go_duration(s: float) -> str:
    return f"{int(s)}s" if s == int(s) else f"{int(s * 1000)}ms"


def argv(value, where: str) -> list[str]:
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list):
        return [str(v) for v in value]
    raise RigError(f"{where}: a string or a list")


@dataclass
class Service:
    name: str
    image: str
    built: bool = False
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    health_args: list[str] = field(default_factory=list)
    healthcheck: str = "image"  # "compose", "disabled" or "image"
    ulimits: dict[str, tuple[int, int]] = field(default_factory=dict)
    replicas: int = 1
    init: bool = False
    stop_signal: str | None = None
    stop_grace: float | None = None
    depends_on: dict[str, str] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    restart: str = "no"
    volumes: list[tuple[str, str, str]] = field(default_factory=list)
    ports: list[tuple[str, int, int, str]] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)


def parse_service(name: str, d: dict, env: dict[str, str]) -> Service:
    where = f"services.{name}"
    unknown = set(d) - SERVICE_KEYS - {k for k in d if k.startswith("x-")}
    if unknown:
        raise RigError(f"{where}: the rig does not map {', '.join(sorted(unknown))} "
                       "(extend scripts/podman_rig.py)")
    if "image" not in d:
        raise RigError(f"{where}: no image (the rig runs prebuilt images only)")
    s = Service(name=name, image=str(d["image"]), built="build" in d)
    if "command" in d:
        s.command = argv(d["command"], f"{where}.command")
    if "entrypoint" in d:
        s.entrypoint = argv(d["entrypoint"], f"{where}.entrypoint")

    hc = d.get("healthcheck")
    if hc is not None:
        unknown = set(hc) - HEALTHCHECK_KEYS
        if unknown:
            raise RigError(f"{where}.healthcheck: the rig does not map {', '.join(sorted(unknown))}")
        test = hc.get("test")
        if hc.get("disable") or test == ["NONE"]:
            s.healthcheck, s.health_args = "disabled", ["--no-healthcheck"]
        else:
            s.healthcheck = "compose"
            if isinstance(test, str):
                s.health_args += ["--health-cmd", test]
            elif isinstance(test, list) and test and test[0] == "CMD":
                s.health_args += ["--health-cmd", json.dumps([str(t) for t in test[1:]])]
            elif isinstance(test, list) and len(test) == 2 and test[0] == "CMD-SHELL":
                s.health_args += ["--health-cmd", str(test[1])]
            elif test is not None:
                raise RigError(f"{where}.healthcheck.test: {test!r}")
            for key, flag in (("interval", "--health-interval"), ("timeout", "--health-timeout"),
                              ("start_period", "--health-start-period")):
                if key in hc:
                    s.health_args += [flag, go_duration(seconds(hc[key], f"{where}.healthcheck.{key}"))]
            if "retries" in hc:
                s.health_args += ["--health-retries", str(int(hc["retries"]))]

    for kind, v in (d.get("ulimits") or {}).items():
        if isinstance(v, dict):
            s.ulimits[kind] = (int(v["soft"]), int(v["hard"]))
        else:
            s.ulimits[kind] = (int(v), int(v))

    dep = d.get("deploy") or {}
    unknown = set(dep) - DEPLOY_KEYS
    if unknown:
        raise RigError(f"{where}.deploy: the rig does not map {', '.join(sorted(unknown))}")
    if dep.get("mode", "replicated") != "replicated":
        raise RigError(f"{where}.deploy.mode: only replicated")
    s.replicas = int(dep.get("replicas", 1))

    s.init = bool(d.get("init", False))
    s.stop_signal = d.get("stop_signal")
    if "stop_grace_period" in d:
        s.stop_grace = seconds(d["stop_grace_period"], f"{where}.stop_grace_period")

    deps = d.get("depends_on") or {}
    if isinstance(deps, list):
        deps = {x: {"condition": "service_started"} for x in deps}
    for dep_name, spec in deps.items():
        cond = (spec or {}).get("condition", "service_started")
        if cond not in CONDITIONS:
            raise RigError(f"{where}.depends_on.{dep_name}: condition {cond!r}")
        s.depends_on[dep_name] = cond

    envd = d.get("environment") or {}
    if isinstance(envd, list):
        envd = dict(e.split("=", 1) if "=" in e else (e, None) for e in envd)
    for k, v in envd.items():
        if v is None:
            if k in env:
                s.environment[k] = env[k]
        else:
            s.environment[k] = str(v).lower() if isinstance(v, bool) else str(v)

    restart = str(d.get("restart", "no"))
    if not re.fullmatch(r"no|always|unless-stopped|on-failure(:\d+)?", restart):
        raise RigError(f"{where}.restart: {restart!r}")
    s.restart = restart

    for v in d.get("volumes") or []:
        if not isinstance(v, str):
            raise RigError(f"{where}.volumes: only the short syntax is mapped")
        parts = v.split(":")
        if len(parts) not in (2, 3) or not parts[0].startswith(("./", "../", "/")):
            raise RigError(f"{where}.volumes: {v!r}: only bind mounts of host paths are mapped")
        mode = parts[2] if len(parts) == 3 else "rw"
        if mode not in ("ro", "rw"):
            raise RigError(f"{where}.volumes: {v!r}: mode {mode!r}")
        s.volumes.append((parts[0], parts[1], mode))

    for p in d.get("ports") or []:
        m = re.fullmatch(r"(?:(\d+\.\d+\.\d+\.\d+):)?(\d+):(\d+)(?:/(tcp|udp))?", str(p))
        if not m:
            raise RigError(f"{where}.ports: {p!r}: only [IP:]HOST:CONTAINER is mapped")
        s.ports.append((m.group(1) or "", int(m.group(2)), int(m.group(3)), m.group(4) or "tcp"))

    s.profiles = [str(p) for p in d.get("profiles") or []]
    return s


@dataclass
class Project:
    name: str
    services: dict[str, Service]

    @property
    def network(self) -> str:
        return f"{self.name}_default"

    def container(self, svc: str, n: int) -> str:
        return f"{self.name}-{svc}-{n}"

    def containers(self, svc: str) -> list[str]:
        return [self.container(svc, n) for n in range(1, self.services[svc].replicas + 1)]


def load_project(path: Path = COMPOSE) -> Project:
    env = read_env_file(path.parent / ".env")
    env.update(os.environ)
    doc = yaml.safe_load(path.read_text())
    unknown = {k for k in doc if not k.startswith("x-")} - {"name", "services"}
    if unknown:
        raise RigError(f"top level: the rig does not map {', '.join(sorted(unknown))}")
    doc = interpolate_tree({k: v for k, v in doc.items() if not k.startswith("x-")}, env)
    name = doc.get("name") or path.parent.name
    services = {n: parse_service(n, d, env) for n, d in doc["services"].items()}
    for s in services.values():
        for dep in s.depends_on:
            if dep not in services:
                raise RigError(f"services.{s.name}.depends_on: no service {dep}")
    return Project(name=name, services=services)


def start_order(project: Project, wanted: list[str]) -> list[str]:
    """The services in `wanted` and their dependencies, dependencies first."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in stack:
            raise RigError(f"depends_on cycle: {' -> '.join(stack + (name,))}")
        if name in seen:
            return
        for dep in project.services[name].depends_on:
            visit(dep, stack + (name,))
        seen.add(name)
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


# ----------------------------------------------------------- the host ----

def host_hard_limit(kind: str) -> int:
    import resource
    which = {"nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC}[kind]
    hard = resource.getrlimit(which)[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 30


@dataclass
class Adaptation:
    """How the rig runs the file on this machine, beyond the file itself."""
    skip: dict[str, str]
    nofile_cap: int
    nproc: int
    deviations: list[str] = field(default_factory=list)


def adaptation(project: Project, skip: dict[str, str]) -> Adaptation:
    a = Adaptation(skip=skip, nofile_cap=host_hard_limit("nofile"),
                   nproc=min(NPROC_DEFAULT, host_hard_limit("nproc")))
    for name, why in skip.items():
        a.deviations.append(f"{name}: not started ({why})")
    for s in project.services.values():
        if s.name in skip:
            continue
        if s.built:
            a.deviations.append(
                f"{s.name}: build: not run; {s.image} is the Dockerfile's runtime stage built by "
                "scripts/podman-rig on a debootstrap stand-in for its base, around the binaries built here "
                "(target/release, or $SUBGATE_BIN and $SUBGATE_LOADGEN_BIN)")
        for kind, (soft, hard) in s.ulimits.items():
            if kind == "nofile" and hard > a.nofile_cap:
                a.deviations.append(
                    f"{s.name}: ulimits.nofile {soft}:{hard} lowered to {min(soft, a.nofile_cap)}:"
                    f"{a.nofile_cap} (this machine's hard limit; runc cannot raise it)")
            elif kind not in ("nofile", "nproc"):
                raise RigError(f"services.{s.name}.ulimits.{kind}: not mapped")
        for ip, host, cont, proto in s.ports:
            if not ip:
                a.deviations.append(f"{s.name}: port {host}:{cont} published on {BIND_IP} only")
        if s.healthcheck == "compose" and any(
                c == "service_healthy" and d == s.name
                for o in project.services.values() for d, c in o.depends_on.items()):
            a.deviations.append(
                f"{s.name}: its healthcheck is run by the rig (podman healthcheck run, at its "
                "interval) to honour depends_on: service_healthy; podman 4.3 schedules health "
                "checks with systemd timers, and there is no systemd here")
    a.deviations.append(f"every container: ulimits.nproc {a.nproc} unless the file says otherwise "
                        "(podman's rootful default is refused here)")
    a.deviations.append("no health check runs in the background (`podman ps` shows the nodes "
                        "`starting`); the checks below run each node's HEALTHCHECK once")
    a.deviations.append(f"haproxy: its config is mounted as a copy with one change: `nameserver dns "
                        f"{DOCKER_DNS}:53` (Docker's embedded DNS) becomes the network's gateway, "
                        "where aardvark-dns answers")
    return a


# -------------------------------------------------------------- podman ----

class Podman:
    def __init__(self, log: Path | None):
        self.log = log

    def __call__(self, *args: str, check: bool = True, timeout: float = 120,
                 capture: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(["podman", *args], text=True, timeout=timeout,
                           stdout=subprocess.PIPE if capture else None,
                           stderr=subprocess.PIPE)
        if self.log is not None:
            with self.log.open("a") as f:
                f.write(f"$ podman {shlex.join(args)}\n")
                if p.stderr:
                    f.write(p.stderr if p.stderr.endswith("\n") else p.stderr + "\n")
        if check and p.returncode != 0:
            tail = "; ".join(l for l in (p.stderr or "").splitlines()
                             if "systemd" not in l)[-600:]
            raise RigError(f"podman {args[0]} {args[1] if len(args) > 1 else ''} failed "
                           f"({p.returncode}): {tail}")
        return p

    def inspect(self, name: str) -> dict:
        return json.loads(self("container", "inspect", name).stdout)[0]

    def ip(self, name: str, network: str) -> str:
        return self.inspect(name)["NetworkSettings"]["Networks"][network]["IPAddress"]


def container_args(project: Project, s: Service, a: Adaptation, n: int, name: str,
                   mounts: dict[str, str], oneoff: bool, command: list[str] | None) -> list[str]:
    args = ["--name", name, "--pull", "never",
            "--label", f"com.docker.compose.project={project.name}",
            "--label", f"com.docker.compose.service={s.name}",
            "--label", f"com.docker.compose.container-number={n}",
            "--label", f"com.docker.compose.oneoff={'True' if oneoff else 'False'}",
            "--label", RIG_LABEL,
            "--network", project.network]
    if not oneoff:
        args += ["--network-alias", s.name]
    if s.init:
        args.append("--init")
    nofile = s.ulimits.get("nofile", (a.nofile_cap, a.nofile_cap))
    nproc = s.ulimits.get("nproc", (a.nproc, a.nproc))
    args += ["--ulimit", f"nofile={min(nofile[0], a.nofile_cap)}:{min(nofile[1], a.nofile_cap)}",
             "--ulimit", f"nproc={nproc[0]}:{nproc[1]}"]
    if s.stop_signal:
        args += ["--stop-signal", s.stop_signal]
    if s.stop_grace is not None:
        args += ["--stop-timeout", str(int(round(s.stop_grace)))]
    args += ["--restart", "no" if oneoff else s.restart]
    args += s.health_args
    for k, v in s.environment.items():
        args += ["-e", f"{k}={v}"]
    for src, dst, mode in s.volumes:
        host = mounts.get(src) or str((COMPOSE.parent / src).resolve())
        args += ["-v", f"{host}:{dst}:{mode}"]
    if not oneoff:
        for ip, host, cont, proto in s.ports:
            args += ["-p", f"{ip or BIND_IP}:{host}:{cont}/{proto}"]
    if s.entrypoint is not None:
        args += ["--entrypoint", json.dumps(s.entrypoint)]
    args.append(s.image)
    cmd = command if command is not None else s.command
    if cmd is not None:
        args += cmd
    return args


class Rig:
    def __init__(self, project: Project, a: Adaptation, work: Path | None):
        self.p = project
        self.a = a
        self.work = work
        self.podman = Podman(work / "podman.log" if work else None)
        self.mounts: dict[str, str] = {}
        self.started: list[str] = []
        self.health_seconds: dict[str, float] = {}
        self.dns_watch: DnsWatch | None = None

    # ----- up
    def create_network(self) -> str:
        if self.podman("network", "exists", self.p.network, check=False).returncode == 0:
            raise RigError(f"network {self.p.network} exists and was not made by the rig "
                           f"(podman-compose?): `podman network rm {self.p.network}` if it is unused")
        self.podman("network", "create",
                    "--label", f"com.docker.compose.project={self.p.name}",
                    "--label", "com.docker.compose.network=default",
                    "--label", RIG_LABEL, self.p.network)
        net = json.loads(self.podman("network", "inspect", self.p.network).stdout)[0]
        if not net.get("dns_enabled"):
            raise RigError(f"{self.p.network}: no DNS (is aardvark-dns installed?)")
        return net["subnets"][0]["gateway"]

    def adapt_haproxy_cfg(self, gateway: str) -> None:
        svc = self.p.services.get("haproxy")
        if not svc or "haproxy" in self.a.skip:
            return
        for src, dst, _ in svc.volumes:
            if not dst.endswith("/haproxy.cfg"):
                continue
            text = (COMPOSE.parent / src).read_text()
            pat = re.compile(rf"^(\s*nameserver\s+\S+\s+){re.escape(DOCKER_DNS)}(:53\s*)$", re.M)
            new, count = pat.subn(rf"\g<1>{gateway}\g<2>", text)
            if count != 1:
                raise RigError(f"{src}: expected one `nameserver … {DOCKER_DNS}:53` line, found {count}")
            out = self.work / "haproxy.cfg"
            out.write_text(new)
            out.chmod(0o644)
            self.mounts[src] = str(out)

    def run_detached(self, s: Service, n: int) -> None:
        name = self.p.container(s.name, n)
        self.podman("run", "-d", *container_args(self.p, s, self.a, n, name, self.mounts, False, None))
        self.started.append(name)

    def wait_healthy(self, name: str) -> float:
        """Docker's health monitor for one container, until it is healthy:
        the check every interval, failures counted after the start period,
        unhealthy after `retries` failures in a row."""
        hc = self.podman.inspect(name)["Config"].get("Healthcheck") or {}
        if not hc.get("Test") or hc["Test"] == ["NONE"]:
            raise RigError(f"{name}: service_healthy, but it has no health check")
        interval = (hc.get("Interval") or 30e9) / 1e9
        start_period = (hc.get("StartPeriod") or 0) / 1e9
        retries = hc.get("Retries") or 3
        t0 = time.monotonic()
        failures = 0
        while True:
            time.sleep(interval)
            state = self.podman.inspect(name)["State"]
            if not state.get("Running"):
                raise RigError(f"{name}: exited ({state.get('ExitCode')}) before it was healthy")
            if self.podman("healthcheck", "run", name, check=False).returncode == 0:
                return time.monotonic() - t0
            if time.monotonic() - t0 > start_period:
                failures += 1
                if failures >= retries:
                    raise RigError(f"{name}: unhealthy after {failures} failed checks")

    def wait_dependencies(self, s: Service) -> None:
        for dep, cond in s.depends_on.items():
            for c in self.p.containers(dep):
                if cond == "service_healthy":
                    if c not in self.health_seconds:
                        self.health_seconds[c] = self.wait_healthy(c)
                elif cond == "service_completed_successfully":
                    code = self.podman("wait", c, timeout=600).stdout.strip()
                    if code != "0":
                        raise RigError(f"{c}: exited {code}; {s.name} needs it to complete")
                else:
                    if not self.podman.inspect(c)["State"].get("Running"):
                        raise RigError(f"{c}: not running; {s.name} depends on it")

    def up(self, services: list[str]) -> None:
        gateway = self.create_network()
        self.dns_watch = DnsWatch(gateway).start()
        self.adapt_haproxy_cfg(gateway)
        for name in start_order(self.p, services):
            s = self.p.services[name]
            self.wait_dependencies(s)
            for n in range(1, s.replicas + 1):
                self.run_detached(s, n)
            say(f"started {', '.join(self.p.containers(name))}")

    def run_oneoff(self, svc: str, command: list[str], out_log: Path) -> tuple[int, str]:
        """`docker compose run --rm SVC COMMAND…`: its dependencies must be up."""
        s = self.p.services[svc]
        self.wait_dependencies(s)
        name = f"{self.p.name}-{svc}-run-{uuid.uuid4().hex[:12]}"
        args = container_args(self.p, s, self.a, 1, name, self.mounts, True, command)
        with out_log.open("w") as err:
            p = subprocess.run(["podman", "run", "--rm", *args], text=True,
                               stdout=subprocess.PIPE, stderr=err, timeout=600)
        return p.returncode, p.stdout

    # ----- down
    def ours(self) -> list[str]:
        out = self.podman("ps", "-a", "--filter", f"label=com.docker.compose.project={self.p.name}",
                          "--filter", f"label={RIG_LABEL}", "--format", "{{.Names}}",
                          check=False).stdout or ""
        return out.split()

    def down(self) -> None:
        """`docker compose down`: one-off containers first, then service by
        service in reverse dependency order (a node stops while its Redis is
        still there), each container with its own stop signal and grace
        period, a service's replicas at once; then the network."""
        names = self.ours()
        if names:
            by_service: dict[str, list[str]] = {}
            for line in self.podman("ps", "-a", "--filter", f"label={RIG_LABEL}", "--filter",
                                    f"label=com.docker.compose.project={self.p.name}", "--format",
                                    '{{.Names}} {{index .Labels "com.docker.compose.service"}} '
                                    '{{index .Labels "com.docker.compose.oneoff"}}',
                                    check=False).stdout.splitlines():
                name, svc, oneoff = (line.split() + ["", ""])[:3]
                by_service.setdefault("" if oneoff == "True" else svc, []).append(name)
            known = [s for s in start_order(self.p, list(self.p.services)) if s in by_service]
            waves = [by_service.pop("", [])] + [by_service.pop(s) for s in reversed(known)]
            waves += list(by_service.values())  # services no longer in the file
            for wave in waves:
                if wave:
                    self.podman("stop", *wave, check=False, timeout=120)
            self.podman("rm", "-f", "-v", *names, check=False, timeout=120)
        if self.podman("network", "exists", self.p.network, check=False).returncode == 0:
            net = json.loads(self.podman("network", "inspect", self.p.network).stdout)[0]
            if net.get("labels", {}).get("org.subgate.podman-rig") == "1":
                self.podman("network", "rm", "-f", self.p.network, check=False)
            else:
                say(f"network {self.p.network} was not made by the rig: left alone")

    def dump_logs(self) -> None:
        for name in self.ours():
            p = self.podman("logs", "--tail", "15", name, check=False)
            lines = ((p.stdout or "") + (p.stderr or "")).splitlines()
            for line in lines[-15:]:
                print(f"    {name}| {line}")


# -------------------------------------------------------------- checks ----

def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def wait_for(probe, timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = probe()
        if last[0]:
            return last
        if time.monotonic() > deadline:
            return last
        time.sleep(interval)


def published(s: Service, container_port: int) -> int:
    for _, host, cont, _ in s.ports:
        if cont == container_port:
            return host
    raise RigError(f"{s.name} publishes no port {container_port}")


def haproxy_servers(stats_url: str) -> dict[str, dict[str, str]]:
    """The `subgate` backend's servers from HAProxy's CSV, by address."""
    code, body = http_get(stats_url + ";csv")
    if code != 200:
        return {}
    rows = csv.DictReader(io.StringIO(body.lstrip("# ")))
    return {r["addr"]: r for r in rows
            if r.get("pxname") == "subgate" and r.get("svname") not in ("FRONTEND", "BACKEND")
            and r.get("addr")}


def dns_query(server: str, name: str, timeout: float) -> tuple[str, int] | None:
    """One A query for `name` to `server`:53 over UDP: the response code
    ("NOERROR", "NXDOMAIN", ...) and the number of answers, or None when
    nothing answered in time."""
    tid = int.from_bytes(os.urandom(2), "big")
    head = tid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\x00"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(head + qname + b"\x00\x01\x00\x01", (server, 53))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                data = sock.recv(4096)
                if data[:2] == head[:2]:
                    code = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN"}.get(data[3] & 15, str(data[3] & 15))
                    return code, int.from_bytes(data[6:8], "big")
        except OSError:
            return None
    return None


class DnsWatch:
    """Keeps the network's DNS (aardvark-dns) answering while the checks run.

    Debian 12's aardvark-dns (1.4) tears down and rebinds every listener on
    each SIGHUP netavark sends when a container joins or leaves the network,
    and now and then it never reads its socket again: it keeps running,
    queries pile up unread in its receive queue, and every container's DNS
    times out from then on (containers/aardvark-dns#389, fixed upstream in
    1.11). HAProxy's resolver then drops the replicas and Prometheus loses
    its targets: a fault of the container runtime on this machine, not of
    the compose file or the gateway. The watch asks aardvark-dns for the
    `subgate` service every half second; after `stuck_after` seconds without
    an answer it restarts it with its own command line (netavark's), and
    every lapse is reported with the checks."""

    def __init__(self, gateway: str, name: str = "subgate", stuck_after: float = 3.0):
        self.gateway, self.name, self.stuck_after = gateway, name, stuck_after
        self.lapses: list[str] = []
        # Once the service runs, an answer without its addresses (NXDOMAIN
        # or none: aardvark-dns reloading its configuration when a
        # container joins, and now and then left without the records) is a
        # lapse too: HAProxy drops the replicas after `hold nx` (5 s).
        self.records_expected = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "DnsWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        silent_since = None
        while not self._stop.wait(0.5):
            answer = dns_query(self.gateway, self.name, 1.0)
            healthy = answer is not None and (not self.records_expected
                                              or (answer[0] == "NOERROR" and answer[1] > 0))
            if healthy:
                if silent_since is not None:
                    say(f"dns: aardvark-dns answers again after "
                        f"{time.monotonic() - silent_since:.1f}s")
                silent_since = None
                continue
            now = time.monotonic()
            if silent_since is None:
                silent_since = now
            elif now - silent_since >= self.stuck_after:
                self.lapses.append(self._restart(now - silent_since))
                say(f"dns: {self.lapses[-1]}")
                silent_since = time.monotonic()

    def _restart(self, silent: float) -> str:
        sockets = subprocess.run(["ss", "-ulpnH", f"src {self.gateway}:53"], text=True,
                                 capture_output=True).stdout.split()
        queued = sockets[1] if len(sockets) > 1 else "?"
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
        for pid in pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"aardvark-dns"):
                args = [a.decode() for a in cmdline if a]
                os.kill(int(pid), signal.SIGKILL)
                subprocess.run(args, check=False, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=10)
                return (f"aardvark-dns on {self.gateway}:53 gave no address of {self.name} for {silent:.1f}s "
                        f"({queued} bytes unread in its socket): restarted it as `{shlex.join(args)}`")
        return f"aardvark-dns on {self.gateway}:53 gave no address of {self.name} for {silent:.1f}s and is not running"


class Checks:
    def __init__(self, rig: Rig):
        self.rig = rig
        self.failed: list[str] = []

    def result(self, ok: bool, what: str) -> bool:
        print(f"podman-rig: {'PASS' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            self.failed.append(what)
        return ok


def run_checks(rig: Rig, loadgen_args: list[str], profiles: set[str]) -> Checks:
    p, pm, ch = rig.p, rig.podman, Checks(rig)
    net = p.network
    redis = p.containers("redis")[0]
    nodes = p.containers("subgate")
    haproxy = p.services["haproxy"]
    front = f"http://{BIND_IP}:{published(haproxy, 8080)}"
    stats = f"http://{BIND_IP}:{published(haproxy, 8404)}/"
    prom = f"http://{BIND_IP}:{published(p.services['prometheus'], 9090)}"

    # Redis: healthy by its compose health check, before the nodes started.
    status = pm.inspect(redis)["State"].get("Health", {}).get("Status")
    again = pm("healthcheck", "run", redis, check=False).returncode == 0
    took = rig.health_seconds.get(redis)
    ch.result(status == "healthy" and again,
              f"redis healthy: `redis-cli ping` (its compose healthcheck) passed "
              f"{f'after {took:.1f}s, before the nodes started' if took else ''}"
              f"{'' if again else '; now failing'} (status {status})")

    # Three replicas, each ready on its own /readyz and healthy by the
    # image's HEALTHCHECK.
    running = [n for n in nodes if pm.inspect(n)["State"].get("Running")]
    ips = {n: pm.ip(n, net) for n in running}
    bad = []
    for n in running:
        ok = wait_for(lambda n=n: (pm("exec", n, "subgate", "healthcheck", "--url",
                                      "http://127.0.0.1:8080/readyz", check=False).returncode == 0,),
                      30, 0.5)[0]
        if not ok or pm("healthcheck", "run", n, check=False).returncode != 0:
            bad.append(n)
    ch.result(len(running) == len(nodes) == 3 and not bad,
              f"{len(running) - len(bad)} of 3 subgate replicas ready (/readyz 200, image "
              f"HEALTHCHECK healthy): {', '.join(f'{n} {ips[n]}' for n in running)}"
              f"{'; not ready: ' + ', '.join(bad) if bad else ''}")
    want = {f"{ip}:8080" for ip in ips.values()}
    if rig.dns_watch and running:
        rig.dns_watch.records_expected = True

    if "cluster" in profiles:
        # The Redis Cluster of the profile: made once by redis-cluster-init,
        # and the nodes on it (their /readyz names the shards they use).
        init = p.containers("redis-cluster-init")[0]
        code = pm("wait", init, check=False, timeout=120).stdout.strip()
        first = p.containers("redis-cluster-1")[0]
        info = wait_for(lambda: ("cluster_state:ok" in (i := pm("exec", first, "redis-cli", "cluster",
                                                               "info", check=False).stdout), i),
                        20, 0.5)[1]
        # Through HAProxy: the replicas are ready, HAProxy may not have
        # checked them UP yet.
        front_body = wait_for(lambda: ("cluster, 3 shards" in (b := http_get(front + "/readyz")[1]), b),
                              40, 0.5)[1]
        ch.result(code == "0" and "cluster_state:ok" in info and "cluster, 3 shards" in front_body,
                  f"redis cluster profile: redis-cluster-init exited {code}; "
                  f"{'cluster_state:ok' if 'cluster_state:ok' in info else 'cluster not ok'}; "
                  f"/readyz through HAProxy: {front_body.strip()[:160]}")

    # HAProxy: every replica found through DNS and UP, /readyz through it,
    # and new connections spread over the three.
    def all_up():
        servers = haproxy_servers(stats)
        up = {a for a, r in servers.items() if r["status"].startswith("UP")}
        return (bool(want) and up == want, servers)
    ok, servers = wait_for(all_up, 40)
    code = wait_for(lambda: ((c := http_get(front + "/readyz")[0]) == 200, c), 20)[1]
    before = {a: int(r["stot"]) for a, r in haproxy_servers(stats).items()}
    for _ in range(30):
        http_get(front + "/readyz")
    after = {a: int(r["stot"]) for a, r in haproxy_servers(stats).items()}
    spread = [after.get(a, 0) - before.get(a, 0) for a in sorted(want)]
    ch.result(ok and code == 200 and len(spread) == 3 and min(spread) > 0,
              f"haproxy on {front}: /readyz {code}; servers UP "
              f"{sorted(a for a, r in servers.items() if r['status'].startswith('UP'))} "
              f"(found through aardvark-dns); 30 new connections spread "
              f"{'/'.join(map(str, spread))} over the replicas")

    # Prometheus: the three replicas scraped one by one through DNS SD.
    def targets():
        code, body = http_get(prom + "/api/v1/targets")
        if code != 200:
            return (False, [])
        t = [x for x in json.loads(body)["data"]["activeTargets"] if x["labels"]["job"] == "subgate"]
        up = sorted(x["labels"]["instance"] for x in t if x["health"] == "up")
        return (set(up) == want and len(t) == 3, up)
    ok, up = wait_for(targets, 60, 1)
    ch.result(ok, f"prometheus on {prom}: {len(up)} subgate targets up {up}")

    # The loadgen service, its command overridden by a shorter profile.
    command = ["--url", "http://haproxy:8080", "--metrics-url", "http://subgate:8080", *loadgen_args]
    for attempt in (1, 2):
        say(f"loadgen: run --rm loadgen {shlex.join(command)}")
        before = {a: int(r["stot"]) for a, r in haproxy_servers(stats).items()}
        t0 = time.monotonic()
        progress = rig.work / "loadgen.progress"
        code, report = rig.run_oneoff("loadgen", command, progress)
        took = time.monotonic() - t0
        after = {a: int(r["stot"]) for a, r in haproxy_servers(stats).items()}
        # A server whose session count went down was re-created by
        # HAProxy's resolver: aardvark-dns stopped answering for longer than
        # `hold timeout` (seen on a first podman run on a fresh machine,
        # while it forwards search-domain queries to an unreachable
        # upstream), and requests meanwhile got 503 "no server". That is
        # the rig's network, not the gateway: measure once more, and say so.
        reset = [a for a in sorted(want) if after.get(a, 0) < before.get(a, 0)]
        if not reset or attempt == 2:
            break
        say(f"loadgen: HAProxy re-created {', '.join(reset)} during the run (its DNS "
            f"resolution lapsed); running the loadgen once more")
        wait_for(all_up, 40)
    for line in report.rstrip().splitlines():
        print(f"    {line}")
    m = re.search(r"lost (\d+)\s+duplicates (\d+)", report)
    spread = [after.get(a, 0) - before.get(a, 0) for a in sorted(want)]
    total = sum(spread) or 1
    even = len(spread) == 3 and min(spread) >= total * 0.2
    if code != 0:
        for line in progress.read_text().splitlines()[-10:]:
            print(f"    loadgen stderr| {line}")
    ch.result(code == 0 and m is not None and m.groups() == ("0", "0") and even,
              f"loadgen: exit {code} after {took:.0f}s; lost {m.group(1) if m else '?'}, "
              f"duplicates {m.group(2) if m else '?'}; HAProxy sessions per replica "
              f"{'/'.join(map(str, spread))}")

    # A replica stopped as `docker stop` would: SIGTERM, its grace period.
    victim = nodes[-1]
    addr = f"{ips.get(victim)}:8080"
    t0 = time.monotonic()
    stopper = threading.Thread(target=lambda: pm("stop", victim, check=False, timeout=120))
    stopper.start()
    down_after = None
    seen = []
    while stopper.is_alive() or down_after is None:
        row = haproxy_servers(stats).get(addr)
        status = row["status"] if row else "(gone)"
        if not seen or seen[-1] != status:
            seen.append(status)
        if row and status.startswith("DOWN") and down_after is None:
            down_after = time.monotonic() - t0
        if not stopper.is_alive() and down_after is None:
            break
        time.sleep(0.1)
    stopper.join()
    stopped_after = time.monotonic() - t0
    state = pm.inspect(victim)["State"]
    others = {a: r["status"] for a, r in haproxy_servers(stats).items() if a in want and a != addr}
    ch.result(down_after is not None and not state.get("Running") and state.get("ExitCode") == 0
              and all(s.startswith("UP") for s in others.values()) and len(others) == 2,
              f"podman stop {victim}: HAProxy marked it DOWN after "
              f"{f'{down_after:.1f}s' if down_after is not None else 'never'} "
              f"({' -> '.join(seen)}); it exited {state.get('ExitCode')} after {stopped_after:.1f}s "
              f"(stop_grace_period {p.services['subgate'].stop_grace:.0f}s); "
              f"the other two {sorted(set(others.values()))}")
    return ch


# ---------------------------------------------------------------- main ----

def main(argv_: list[str]) -> int:
    cmd = argv_[0] if argv_ else "plan"
    skip: dict[str, str] = {}
    profiles: set[str] = set()
    rest = argv_[1:]
    while rest[:1] in (["--skip"], ["--profile"]) and len(rest) >= 2:
        if rest[0] == "--skip":
            name, _, why = rest[1].partition("=")
            skip[name] = why or "skipped"
        else:
            profiles.add(rest[1])
        rest = rest[2:]
    try:
        project = load_project()
        a = adaptation(project, skip)
    except RigError as e:
        say(f"FAIL docker-compose.yml: {e}")
        return 1
    work = Path(os.environ["SUBGATE_RIG_WORK"]) if os.environ.get("SUBGATE_RIG_WORK") else None
    rig = Rig(project, a, work)

    if cmd == "down":
        rig.down()
        return 0

    # `docker compose --profile P up`: the services of no profile, and those
    # of the profiles named.
    default = [s.name for s in project.services.values()
               if (not s.profiles or profiles & set(s.profiles)) and s.name not in skip]
    if cmd == "plan" or cmd == "rig":
        say(f"project {project.name}, network {project.network} (netavark, aardvark-dns)")
        for name in start_order(project, default):
            s = project.services[name]
            say(f"  {name}: {', '.join(project.containers(name))} from {s.image}")
        for name in skip:
            say(f"  {name}: NOT STARTED ({skip[name]})")
        for s in project.services.values():
            if s.profiles and not profiles & set(s.profiles):
                say(f"  {s.name}: profile {'/'.join(s.profiles)}, not started"
                    f"{' (run once by the checks)' if s.name == 'loadgen' else ''}")
        say("deviations from docker-compose.yml:")
        for d in a.deviations:
            say(f"  - {d}")
    if cmd == "plan":
        return 0
    if cmd != "rig" or work is None:
        say(f"usage: podman_rig.py plan | rig [--skip SVC=WHY] | down (SUBGATE_RIG_WORK for rig)")
        return 2

    # The host ports the file publishes must be free: it fixes them.
    for name in default:
        for _, host, _, _ in project.services[name].ports:
            with socket.socket() as sock:
                try:
                    sock.bind((BIND_IP, host))
                except OSError:
                    holder = subprocess.run(["ss", "-ltnpH", f"sport = :{host}"], text=True,
                                            capture_output=True).stdout.strip()
                    say(f"FAIL host port {host} is taken ({holder or 'in use'}); docker-compose.yml "
                        f"publishes {name} on it with no override: free it and run again")
                    return 1

    loadgen = shlex.split(os.environ.get("SUBGATE_RIG_LOADGEN") or LOADGEN_DEFAULT)
    # Interrupted (scripts/podman-rig forwards its INT or TERM as TERM; a
    # background job starts with SIGINT ignored): stop and tear down.
    def interrupted(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    rig.down()  # what an interrupted run left (the rig's own, by label)
    checks = None
    try:
        t0 = time.monotonic()
        rig.up(default)
        say(f"up in {time.monotonic() - t0:.1f}s")
        checks = run_checks(rig, loadgen, profiles)
    except (RigError, subprocess.TimeoutExpired) as e:
        say(f"FAIL {e}")
    except KeyboardInterrupt:
        say("FAIL interrupted")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if rig.dns_watch:
            rig.dns_watch.stop()
        if checks is None or checks.failed:
            say("the containers' last log lines:")
            rig.dump_logs()
        t1 = time.monotonic()
        rig.down()
        say(f"down in {time.monotonic() - t1:.1f}s: containers, network and volumes removed; "
            "images kept")
        # Said again last, where a log's tail shows it.
        for lapse in rig.dns_watch.lapses if rig.dns_watch else []:
            say(f"note: the network's DNS lapsed: {lapse}")
        for what in checks.failed if checks else ["the rig did not get to its checks (see above)"]:
            say(f"failed: {what}")
    if checks is None or checks.failed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
