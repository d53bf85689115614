"""The deployment engine: Flower's SuperLink and SuperNodes on loopback, the run started with ``flwr run``.

What :func:`run_deploy` does, in order (flwr 1.39, whose Fleet API is gRPC, ``grpc-rere``):

1. picks free loopback ports (bind to port 0) and makes a temporary directory holding a
   ``FLWR_HOME`` per process, the logs and a tiny Flower app (``pyproject.toml`` plus a module
   re-exporting :mod:`fedsim.flower_app`) whose run config carries the resolved scenario as TOML
   text and the absolute run directory. The app has no dependencies and the SuperLink is started
   with ``--disable-runtime-dependency-installation``, so nothing is ever installed at run time;
2. starts ``flower-superlink`` (Control/Runtime HTTP API on ``--port``, Fleet API gRPC-rere on
   ``--fleet-api-address``), waits for ``/health``;
3. starts N ``flower-supernode`` processes, node ``i`` with ``partition-id=i num-partitions=N``,
   and waits until the SuperLink log shows N activated nodes;
4. submits the run with ``flwr run APP CONN --format json`` (not ``--stream``, whose exit code is
   0 even when the ServerApp failed), then polls ``flwr ls CONN --run-id ID --format json``
   until the status is ``finished:*``;
5. succeeds only if the status is ``finished:completed`` and the run directory has a fresh
   ``summary.json`` with status ``completed``; anything else raises :class:`EngineError` with the
   status and the tail of the ServerApp/SuperLink logs;
6. always stops every process it started (SIGTERM the SuperNodes, then the SuperLink, then
   SIGKILL each process group after a grace period) and copies the logs to
   ``RUN_DIR/deploy-logs/``.

Only 127.0.0.1 is used. With ``scenario.deploy.insecure = false`` the SuperLink serves TLS
(a throw-away CA and server certificate from :func:`make_test_certificates`), the SuperNodes use
``--root-certificates`` and the CLI connection uses ``root-certificates``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.config import Scenario, dumps_scenario
from fedsim.errors import ConfigError, EngineError

LOOPBACK = "127.0.0.1"
CONNECTION = "fedsim"
APP_MODULE = "fedsim_deploy_app"
ACTIVATED = re.compile(r"ActivateNode\]?\s*Activated node_id", re.IGNORECASE)
GRACE_S = 10.0  # seconds between SIGTERM and SIGKILL at teardown
POLL_S = 2.0  # seconds between `flwr ls` status polls (each call is a short CLI process)
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy", "ftp_proxy")


# ------------------------------------------------------------------------------------------------
# helpers: ports, environment, executables, certificates
# ------------------------------------------------------------------------------------------------
def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (all sockets held open until all are chosen)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def flower_bin(name: str) -> str:
    """The path of a Flower executable, preferring the running interpreter's environment."""
    here = Path(sys.executable).parent
    cand = here / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise EngineError(f"'{name}' was not found next to {sys.executable} or on PATH",
                          "install Flower 1.39 in this environment: pip install 'flwr[simulation]==1.39.0'")
    return found


def child_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process: own FLWR_HOME, telemetry off, no proxies, venv first."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        # superexec, flwr-serverapp and flwr-clientapp are found on PATH: use this environment's
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    return env


@dataclass
class Certificates:
    ca: Path
    cert: Path
    key: Path


def make_test_certificates(directory: str | Path, days: int = 2) -> Certificates:
    """A throw-away CA and a server certificate for 127.0.0.1 (SAN ``IP:127.0.0.1``), via openssl.

    For tests and loopback runs only; on real machines use certificates from your own CA with the
    SuperLink's real address in the SAN.
    """
    openssl = shutil.which("openssl")
    if not openssl:
        raise EngineError("TLS needs the 'openssl' command, which is not on PATH",
                          "install openssl, or set deploy.insecure = true for a loopback test")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert, ext = (d / n for n in ("ca.key", "ca.crt", "server.key", "server.csr",
                                                        "server.pem", "san.ext"))
    ext.write_text("subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n")
    steps = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", str(days), "-subj", "/CN=fedsim-test-ca"],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", str(days), "-extfile", ext],
    ]
    for cmd in steps:
        res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise EngineError(f"openssl failed ({' '.join(str(c) for c in cmd[:3])}): {res.stderr.strip()[-400:]}",
                              "check that openssl works: openssl version")
    return Certificates(ca=ca.resolve(), cert=cert.resolve(), key=key.resolve())


def write_app(app_dir: Path, scenario_text: str, out_dir: Path) -> Path:
    """The tiny Flower app directory ``flwr run`` builds its FAB from (two small files)."""
    import tomli_w

    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / f"{APP_MODULE}.py").write_text(
        '"""Generated by fedsim deploy: the Flower app objects of fedsim."""\n'
        "import fedsim.flower_app as _fa\n\n"
        "# plain assignments: flwr checks component references by static analysis\n"
        "server_app = _fa.server_app\n"
        "client_app = _fa.client_app\n")
    pyproject = {
        "project": {"name": "fedsim-deploy", "version": "1.0.0", "description": "fedsim run (generated)",
                    "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "fedsim",
                                  "components": {"serverapp": f"{APP_MODULE}:server_app",
                                                 "clientapp": f"{APP_MODULE}:client_app"},
                                  "config": {"scenario": scenario_text, "out-dir": str(out_dir)}}}},
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return app_dir


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NOISE = ("[uvicorn.access]", "ControlServicer.ListRuns", "ControlServicer.StreamLogs")


def _clean(text: str, lines: int) -> str:
    """The last ``lines`` lines of a Flower log, without colour codes and HTTP access lines."""
    keep = [ln.rstrip() for ln in _ANSI.sub("", text).splitlines()
            if ln.strip() and not any(n in ln for n in _NOISE)]
    return "\n".join(keep[-lines:])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return _clean(path.read_text(errors="replace"), lines)
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------
# the local federation: one SuperLink, N SuperNodes, all owned by this object
# ------------------------------------------------------------------------------------------------
@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    fh: Any


@dataclass
class LocalFederation:
    """A SuperLink and ``nodes`` SuperNodes on 127.0.0.1 in ``workdir``; use as a context manager.

    ``node_config`` (optional) gives each node's extra ``--node-config`` entries, e.g.
    ``{"data-path": "/data/node0.npz"}``; ``partition-id`` and ``num-partitions`` are always set.
    """

    nodes: int
    workdir: Path
    insecure: bool = True
    startup_timeout: float = 120.0
    node_config: list[dict[str, Any]] | None = None
    procs: list[_Proc] = field(default_factory=list)
    http_port: int = 0
    fleet_port: int = 0
    certs: Certificates | None = None
    timings: dict[str, float] = field(default_factory=dict)

    # -- paths ----------------------------------------------------------------------------------
    @property
    def home(self) -> Path:
        return self.workdir / "home"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def superlink_log(self) -> Path:
        return self.logs / "superlink.log"

    def env(self, home: Path | None = None) -> dict[str, str]:
        return child_env(home or self.home)

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "LocalFederation":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.startup_timeout
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        if not self.insecure:
            self.certs = make_test_certificates(self.workdir / "certs")
        ports = free_ports(2 + self.nodes)
        self.http_port, self.fleet_port, node_ports = ports[0], ports[1], ports[2:]

        link = [flower_bin("flower-superlink"), "--host", LOOPBACK, "--port", str(self.http_port),
                "--fleet-api-type", "grpc-rere", "--fleet-api-address", f"{LOOPBACK}:{self.fleet_port}",
                "--disable-runtime-dependency-installation"]
        link += ["--insecure"] if self.certs is None else [
            "--ssl-certfile", str(self.certs.cert), "--ssl-keyfile", str(self.certs.key),
            "--ssl-ca-certfile", str(self.certs.ca)]
        self._spawn("superlink", link, self.superlink_log, self.env())
        self._wait_health(deadline)
        self.timings["superlink_ready_s"] = round(time.monotonic() - t0, 2)

        t1 = time.monotonic()
        for i, port in enumerate(node_ports):
            cfg = {"partition-id": i, "num-partitions": self.nodes, **(self.node_config[i] if self.node_config else {})}
            node = [flower_bin("flower-supernode"), "--grpc-rere", "--superlink", f"{LOOPBACK}:{self.fleet_port}",
                    "--host", LOOPBACK, "--port", str(port), "--node-config", _node_config(cfg)]
            node += ["--insecure"] if self.certs is None else ["--root-certificates", str(self.certs.ca)]
            home = self.workdir / f"node{i}" / "home"
            home.mkdir(parents=True, exist_ok=True)
            self._spawn(f"supernode-{i}", node, self.logs / f"supernode-{i}.log", self.env(home))
        self._wait_activated(deadline)
        self.timings["nodes_ready_s"] = round(time.monotonic() - t1, 2)
        self._write_connection()

    def stop(self) -> None:
        """SIGTERM the SuperNodes, then the SuperLink; SIGKILL every process group after the grace period."""
        nodes = [p for p in self.procs if p.name != "superlink"]
        links = [p for p in self.procs if p.name == "superlink"]
        for group in (nodes, links):
            for p in group:
                if p.popen.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.popen.send_signal(signal.SIGTERM)
            end = time.monotonic() + GRACE_S
            for p in group:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=max(0.0, end - time.monotonic()))
        for p in self.procs:  # the leader and anything it left behind in its session
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=5)
            with contextlib.suppress(OSError):
                p.fh.close()
        self.procs = []
        # The SuperLink starts its SuperExec in a session of its own (and that one starts
        # flwr-serverapp), so a process-group kill cannot reach them: sweep by FLWR_HOME, which
        # every process of this federation inherited and which is unique to this workdir.
        for pid in leftover_processes(self.workdir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    # -- the CLI --------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run ``flwr ARGS`` against this federation (own session, killed on timeout)."""
        cmd = [flower_bin("flwr"), *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env(), cwd=self.workdir, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise EngineError(f"`flwr {' '.join(args[:2])}` did not finish within {timeout:.0f} s: {err[-400:]}",
                              "the SuperLink may be overloaded or stuck; see its log") from None
        finally:
            if proc.poll() is None:  # pragma: no cover - interrupted
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    # -- internals ------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], log: Path, env: dict[str, str]) -> None:
        fh = open(log, "ab")
        try:
            popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=self.workdir, start_new_session=True)
        except OSError as err:
            fh.close()
            raise EngineError(f"could not start {name} ({cmd[0]}): {err}",
                              "check the Flower installation: flower-superlink --version") from err
        self.procs.append(_Proc(name, popen, log, fh))

    def _check_alive(self) -> None:
        for p in self.procs:
            rc = p.popen.poll()
            if rc is not None:
                raise EngineError(f"{p.name} exited with code {rc} during startup:\n{_tail(p.log, 20)}",
                                  "see the log above; a port may be taken or a TLS file unreadable")

    def _wait_health(self, deadline: float) -> None:
        scheme = "http" if self.certs is None else "https"
        url = f"{scheme}://{LOOPBACK}:{self.http_port}/health"
        handlers: list[Any] = [urllib.request.ProxyHandler({})]  # never a proxy, even if one is set
        if self.certs is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(self.certs.ca))))
        opener = urllib.request.build_opener(*handlers)
        while True:
            self._check_alive()
            with contextlib.suppress(OSError, urllib.error.URLError):
                with opener.open(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise EngineError(f"the SuperLink did not answer {url} within {self.startup_timeout:.0f} s:\n"
                                  f"{_tail(self.superlink_log)}", "raise deploy.startup_timeout or see the log")
            time.sleep(0.2)

    def _wait_activated(self, deadline: float) -> None:
        while True:
            self._check_alive()
            text = self.superlink_log.read_text(errors="replace") if self.superlink_log.exists() else ""
            n = len(ACTIVATED.findall(text))
            if n >= self.nodes:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name}\n{_tail(p.log, 8)}" for p in self.procs)
                raise EngineError(f"only {n} of {self.nodes} SuperNodes connected within "
                                  f"{self.startup_timeout:.0f} s:\n{tails}",
                                  "raise deploy.startup_timeout, or check the SuperNode logs")
            time.sleep(0.2)

    def _write_connection(self) -> None:
        import tomli_w

        conn: dict[str, Any] = {"address": f"{LOOPBACK}:{self.http_port}"}
        if self.certs is None:
            conn["insecure"] = True
        else:
            conn["root-certificates"] = str(self.certs.ca)
        (self.home / "config.toml").write_text(
            tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))


def leftover_processes(workdir: str | Path) -> list[int]:
    """PIDs of live processes whose ``FLWR_HOME`` lies under ``workdir`` (Linux ``/proc``; else [])."""
    proc = Path("/proc")
    if not proc.is_dir():  # pragma: no cover - non-Linux: SuperExec exits when its parent does
        return []
    home = f"FLWR_HOME={Path(workdir)}".encode()
    me = os.getpid()
    found = []
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            env = (d / "environ").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(v == home or v.startswith(home + b"/") for v in env.split(b"\0")):
            found.append(int(d.name))
    return sorted(found)


def _node_config(cfg: dict[str, Any]) -> str:
    parts = []
    for k, v in cfg.items():
        parts.append(f"{k}={json.dumps(v) if isinstance(v, str) else v}")
    return " ".join(parts)


def _parse_json(text: str) -> dict[str, Any]:
    """The JSON object in a CLI's stdout (tolerates log lines around it)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return {}
    try:
        return json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return {}


@contextlib.contextmanager
def _sigterm_as_exit():
    """In the main thread, turn SIGTERM into SystemExit so the ``finally`` teardown still runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # pragma: no cover - signal path
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------
def run_deploy(scenario: Scenario, out_dir: str | Path, nodes: int) -> dict[str, Any]:
    """Run ``scenario`` on a real Flower deployment (SuperLink + ``nodes`` SuperNodes, gRPC, loopback).

    Returns the run's ``summary.json`` plus ``engine="deploy"`` and a ``deploy`` section (run id,
    status, ports, timings). Raises :class:`EngineError` unless Flower reports
    ``finished:completed`` *and* the run directory has a completed summary.
    """
    if nodes < 1:
        raise ConfigError("deploy.nodes", f"must be at least 1 (got {nodes})")
    if nodes > scenario.data.num_clients:
        raise ConfigError("deploy.nodes", f"{nodes} SuperNodes but only {scenario.data.num_clients} data "
                          "partitions", "set data.num_clients to at least the number of nodes")
    flower_bin("flower-superlink")  # fail early and clearly if Flower is missing
    scen = scenario.model_copy(deep=True)
    scen.run.engine = "deploy"
    out = Path(out_dir).expanduser().resolve()
    dep = scen.deploy
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="fedsim-deploy-"))
    fed = LocalFederation(nodes=nodes, workdir=workdir, insecure=dep.insecure, startup_timeout=dep.startup_timeout)
    info: dict[str, Any] = {"nodes": nodes, "fleet_api": "grpc-rere", "tls": not dep.insecure,
                            "scratch_dir": str(workdir)}
    try:
        with _sigterm_as_exit(), fed:
            info.update(http_port=fed.http_port, fleet_port=fed.fleet_port, **fed.timings)
            app = write_app(workdir / "app", dumps_scenario(scen), out)
            t_run = time.monotonic()
            run_id = _submit(fed, app)
            info["run_id"] = run_id
            status = _wait_finished(fed, run_id, dep.run_timeout)
            info["status"] = status
            info["run_s"] = round(time.monotonic() - t_run, 2)
            _save_serverapp_log(fed, run_id)
            summary = _read_summary(out, started)
            if status != "finished:completed" or summary.get("status") != "completed":
                what = summary.get("status", "no summary.json") if summary else "no summary.json written"
                err = summary.get("error") if summary else None
                raise EngineError(
                    f"deployment run {run_id} ended with status '{status}' (run directory: {what}"
                    f"{'; ' + str(err) if err else ''}).\n{_log_tails(fed, run_id)}",
                    f"the full logs are in {out / 'deploy-logs'}; try `fedsim run --engine local` "
                    "with the same scenario to debug the ServerApp")
    finally:
        _keep_logs(fed, out)
        shutil.rmtree(workdir, ignore_errors=True)
    return {**summary, "engine": "deploy", "deploy": info}


def _submit(fed: LocalFederation, app: Path) -> int:
    res = fed.flwr("run", str(app), CONNECTION, "--format", "json", timeout=180)
    data = _parse_json(res.stdout)
    run_id = data.get("run-id")
    if res.returncode != 0 or not data.get("success", True) or run_id is None:
        raise EngineError(f"`flwr run` could not submit the run (exit {res.returncode}): "
                          f"{(data.get('error-message') or res.stdout or res.stderr).strip()[-800:]}\n"
                          f"--- superlink log\n{_tail(fed.superlink_log, 20)}",
                          "see the SuperLink log; the generated app is a pyproject.toml and one module")
    return int(run_id)


def _status(fed: LocalFederation, run_id: int) -> tuple[str, str]:
    """``(status, error)``: the run's status from ``flwr ls``, or ``""`` and the CLI's complaint."""
    res = fed.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=60)
    data = _parse_json(res.stdout)
    runs = data.get("runs") or []
    if res.returncode == 0 and runs:
        return str(runs[0].get("status", "")), ""
    return "", str(data.get("error-message") or res.stderr or res.stdout).strip()[-400:]


def _wait_finished(fed: LocalFederation, run_id: int, run_timeout: float) -> str:
    deadline = time.monotonic() + run_timeout
    failures = 0
    status = ""
    while True:
        current, problem = _status(fed, run_id)
        if current.startswith("finished"):
            return current
        status = current or status
        failures = failures + 1 if problem else 0
        if failures >= 5:
            raise EngineError(f"`flwr ls` failed 5 times in a row for run {run_id}: {problem}",
                              "see the SuperLink log; the Control API may be unreachable")
        if time.monotonic() > deadline:
            with contextlib.suppress(EngineError):
                fed.flwr("stop", str(run_id), CONNECTION, timeout=60)
            raise EngineError(f"deployment run {run_id} did not finish within {run_timeout:.0f} s "
                              f"(last status '{status or 'unknown'}'); it was stopped.\n{_log_tails(fed, run_id)}",
                              "raise deploy.run_timeout (each message exchange costs ~7-10 s), "
                              "or lower run.rounds")
        for p in fed.procs:
            if p.name == "superlink" and p.popen.poll() is not None:
                raise EngineError(f"the SuperLink exited (code {p.popen.returncode}) during run {run_id}:\n"
                                  f"{_tail(p.log)}", "see the SuperLink log")
        time.sleep(POLL_S)


def _read_summary(out: Path, started: float) -> dict[str, Any]:
    path = out / "summary.json"
    try:
        if path.stat().st_mtime < started - 1:
            return {}  # a stale summary from an earlier run in the same directory
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _save_serverapp_log(fed: LocalFederation, run_id: int) -> None:
    """Fetch the ServerApp's log from the SuperLink (``flwr log ID --show``) into logs/serverapp.log."""
    with contextlib.suppress(EngineError, OSError):
        res = fed.flwr("log", str(run_id), CONNECTION, "--show", timeout=30)
        (fed.logs / "serverapp.log").write_text(_ANSI.sub("", res.stdout or ""))


def _log_tails(fed: LocalFederation, run_id: int) -> str:
    parts = []
    if not (fed.logs / "serverapp.log").exists():
        _save_serverapp_log(fed, run_id)
    text = _tail(fed.logs / "serverapp.log", 20)
    if text:
        parts.append("--- ServerApp log (flwr log --show), last lines\n" + text)
    parts.append("--- SuperLink log, last lines\n" + _tail(fed.superlink_log, 12))
    return "\n".join(parts)


def _keep_logs(fed: LocalFederation, out: Path) -> None:
    """Copy the Flower logs into RUN_DIR/deploy-logs/ (best effort)."""
    if not fed.logs.exists():
        return
    with contextlib.suppress(OSError):
        dest = out / "deploy-logs"
        dest.mkdir(parents=True, exist_ok=True)
        for f in fed.logs.glob("*.log"):
            shutil.copy2(f, dest / f.name)


# ------------------------------------------------------------------------------------------------
# `python -m fedsim.engines.deploy app ...`: the Flower app for a SuperLink you run yourself
# ------------------------------------------------------------------------------------------------
def _main(argv: list[str] | None = None) -> int:
    """Write the tiny Flower app for SCENARIO, to submit with ``flwr run APP_DIR CONNECTION``."""
    import argparse

    from fedsim.config import load_scenario

    parser = argparse.ArgumentParser(prog="python -m fedsim.engines.deploy",
                                     description="Tools for running fedsim on your own SuperLink.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    app = sub.add_parser("app", help="write the Flower app directory for a scenario")
    app.add_argument("scenario", help="scenario TOML file (or a built-in name)")
    app.add_argument("--app-dir", required=True, help="directory to write (pyproject.toml + one module)")
    app.add_argument("--out", required=True,
                     help="run directory, as a path on the SuperLink's machine (the ServerApp writes it)")
    app.add_argument("--set", "-s", action="append", default=[], dest="overrides",
                     help="override: section.key=value (repeatable)")
    certs = sub.add_parser("certs", help="a throw-away CA and a server certificate for 127.0.0.1")
    certs.add_argument("directory")
    args = parser.parse_args(argv)
    if args.cmd == "certs":
        c = make_test_certificates(args.directory)
        print(f"ca={c.ca}\ncert={c.cert}\nkey={c.key}")
        return 0
    scen = load_scenario(args.scenario, args.overrides)
    scen.run.engine = "deploy"
    out = Path(args.out).expanduser()
    out = out if out.is_absolute() else out.resolve()
    path = write_app(Path(args.app_dir), dumps_scenario(scen), out)
    print(path.resolve())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main())
