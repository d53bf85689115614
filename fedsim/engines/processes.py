"""Processes of a local Flower federation (free ports, environments, TLS certificates, SuperNode keys,
a SuperLink with N SuperNodes on 127.0.0.1, always stopped), used by :mod:`fedsim.engines.deploy`.

Secure by default (flwr 1.39, Flower docs "Authenticate SuperNodes"): TLS, and a SuperLink with
``--enable-supernode-auth`` (no self-registration on the Fleet API). Each SuperNode gets an EC P-384
key made for the run, registered with ``flwr supernode register`` before the node starts; the node
signs its Fleet calls with it (``--auth-supernode-private-key``). An unregistered key cannot activate
("No SuperNode found with the given public key") and the node exits; node ids are tied to keys.
So the federation knows, before the run, which node id holds which partition
(:attr:`LocalFederation.node_partitions`: each registered key's node id, with the ``partition-id``
and ``num-partitions`` of the node started with that key).
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
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.engines.credentials import Certificates, make_node_key, make_test_certificates  # noqa: F401
from fedsim.errors import EngineError

LOOPBACK = "127.0.0.1"
CONNECTION = "fedsim"
ACTIVATED = re.compile(r"ActivateNode\]?\s*Activated node_id=(\d+)", re.IGNORECASE)
GRACE_S = 10.0  # seconds between SIGTERM and SIGKILL at teardown
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


def child_env(flwr_home: Path, pythonpath: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Environment for every Flower process: own FLWR_HOME, telemetry off, no proxies, venv first;
    ``pythonpath`` directories go first on ``PYTHONPATH`` (a ClientApp module the processes must import)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*pythonpath, *filter(None, [env.get("PYTHONPATH", "")])])
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
    ``insecure=False`` (default): TLS *and* SuperNode authentication, a key per node registered before
    it starts (``registered``: node name -> node id; ``node_partitions``: node id -> its node config's
    ``(partition-id, num-partitions)``). ``insecure=True``: neither, any node may join.
    ``pythonpath``: directories put first on every process's ``PYTHONPATH``.
    """

    nodes: int
    workdir: Path
    insecure: bool = False
    startup_timeout: float = 120.0
    node_config: list[dict[str, Any]] | None = None
    procs: list[_Proc] = field(default_factory=list)
    http_port: int = 0
    fleet_port: int = 0
    certs: Certificates | None = None
    timings: dict[str, float] = field(default_factory=dict)
    registered: dict[str, int] = field(default_factory=dict)  # node name -> registered node id
    pythonpath: list[str] = field(default_factory=list)
    #: node id -> (partition-id, num-partitions) of the SuperNode started with that node's registered key
    node_partitions: dict[int, tuple[int, int]] = field(default_factory=dict)
    _key_ids: dict[bytes, int] = field(default_factory=dict, repr=False)  # registered public key -> node id
    _control: Any = field(default=None, repr=False)  # Flower's Control API client, made on first use

    @property
    def node_auth(self) -> bool:  # exactly when TLS is on: Flower refuses node auth without TLS
        return not self.insecure

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
        return child_env(home or self.home, self.pythonpath)

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
            "--ssl-ca-certfile", str(self.certs.ca), "--enable-supernode-auth"]
        self._spawn("superlink", link, self.superlink_log, self.env())
        self._wait_health(deadline)
        self._write_connection()
        self.timings["superlink_ready_s"] = round(time.monotonic() - t0, 2)

        t1 = time.monotonic()
        keys: list[Path | None] = [None] * self.nodes
        if self.node_auth:  # one key per node, made for this run and registered before any node starts
            keys = [self.workdir / "keys" / f"supernode-{i}" for i in range(self.nodes)]
            pubs = [make_node_key(k) for k in keys]
            with ThreadPoolExecutor(max_workers=min(4, self.nodes)) as pool:  # each a Control API request
                list(pool.map(lambda i: self.register_key(pubs[i], f"supernode-{i}"), range(self.nodes)))
            self.timings["nodes_registered_s"] = round(time.monotonic() - t1, 2)
        for i, port in enumerate(node_ports):
            cfg = {"partition-id": i, "num-partitions": self.nodes, **(self.node_config[i] if self.node_config else {})}
            self.add_supernode(f"supernode-{i}", cfg, port, keys[i])
        self._wait_activated(deadline)
        self.timings["nodes_ready_s"] = round(time.monotonic() - t1, 2)

    def control_client(self):
        """Flower's Control API client for this SuperLink (``ControlHttpClient``, TLS-verified against the
        federation's CA), as the ``flwr`` CLI builds it, but made once and used from this process: a
        ``flwr`` CLI process costs ≈ 2 s of CPU, which the federation's own processes need."""
        if self._control is None:
            from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
            from flwr.supercore.control import ControlHttpClient
            from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

            self._control = ControlHttpClient.from_server_address(
                server_address=f"{LOOPBACK}:{self.http_port}", insecure=self.certs is None,
                root_certificates=None if self.certs is None else str(self.certs.ca),
                interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
        return self._control

    def register_key(self, public_key: Path, name: str) -> int:
        """Register a SuperNode public key as ``name`` (the ``RegisterNode`` request of ``flwr supernode
        register``, through :meth:`control_client`); its node id."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=E0611
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

        fix = "see the SuperLink log; node keys must be EC keys on a NIST curve in OpenSSH format"
        try:
            key = serialization.load_ssh_public_key(public_key.read_bytes())
            if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
                raise ValueError(f"{type(key).__name__} is not an EC key on a NIST curve")
        except (OSError, ValueError) as err:
            raise EngineError(f"the public key of {name} ({public_key}) cannot be registered: {err}", fix) from None
        try:
            res = self.control_client().RegisterNode(
                request=RegisterNodeRequest(public_key=public_key_to_bytes(key), name=name))
        except Exception as err:  # noqa: BLE001 - refused, unreachable: said with the SuperLink's log
            raise EngineError(f"registering the key of {name} failed: {type(err).__name__}: {str(err)[-400:]}\n"
                              f"--- superlink log\n{_tail(self.superlink_log, 12)}", fix) from None
        if not res.node_id:
            raise EngineError(f"the SuperLink registered no node id for {name}\n--- superlink log\n"
                              f"{_tail(self.superlink_log, 12)}", fix)
        self.registered[name] = int(res.node_id)
        self._key_ids[_key_text(public_key.read_bytes())] = self.registered[name]
        return self.registered[name]

    def add_supernode(self, name: str, node_config: dict[str, Any], port: int | None = None,
                      private_key: Path | None = None) -> None:
        """Start a ``flower-supernode`` (own FLWR_HOME, log ``logs/NAME.log``). With node authentication
        only a ``private_key`` registered by :meth:`register_key` lets it activate; its node id then holds
        ``node_config``'s ``partition-id`` in :attr:`node_partitions`."""
        port = port if port is not None else free_ports(1)[0]
        node_id = self._key_ids.get(_public_key_of(private_key)) if private_key is not None else None
        if node_id is not None and "partition-id" in node_config:
            self.node_partitions[node_id] = (int(node_config["partition-id"]),
                                             int(node_config.get("num-partitions", 0)))
        node = [flower_bin("flower-supernode"), "--grpc-rere", "--superlink", f"{LOOPBACK}:{self.fleet_port}",
                "--host", LOOPBACK, "--port", str(port), "--node-config", _node_config(node_config)]
        node += ["--insecure"] if self.certs is None else ["--root-certificates", str(self.certs.ca)]
        node += ["--auth-supernode-private-key", str(private_key)] if private_key is not None else []
        home = self.workdir / name / "home"
        home.mkdir(parents=True, exist_ok=True)
        self._spawn(name, node, self.logs / f"{name}.log", self.env(home))

    def stop(self) -> None:
        """SIGTERM the SuperNodes, then the SuperLink; SIGKILL every process group after the grace period."""
        if self._control is not None:
            with contextlib.suppress(Exception):
                self._control.close()
            self._control = None
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
        end = time.monotonic() + GRACE_S
        while (left := leftover_processes(self.workdir)) and time.monotonic() < end:
            for pid in left:  # SIGKILL is delivered asynchronously: sweep until none is left
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

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

    def activated(self) -> set[int]:
        """Node ids the SuperLink has activated so far (from its log)."""
        with contextlib.suppress(OSError):
            return {int(n) for n in ACTIVATED.findall(self.superlink_log.read_text(errors="replace"))}
        return set()

    def check_only_registered(self) -> None:
        """With node authentication, raise unless every activated node holds a registered key."""
        strangers = self.activated() - set(self.registered.values()) if self.node_auth else set()
        if strangers:
            raise EngineError(f"SuperNodes {sorted(strangers)} were activated but only "
                              f"{sorted(self.registered.values())} were registered: results are not trusted",
                              "SuperNode authentication was not in force; see the SuperLink log")

    def _wait_activated(self, deadline: float) -> None:
        """Wait for N activated nodes; with node authentication they must be the registered ones."""
        while True:
            self._check_alive()
            self.check_only_registered()
            n = len(self.activated())
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


def _key_text(openssh_public: bytes) -> bytes:
    """An OpenSSH public key's type and key fields (its comment dropped)."""
    return b" ".join(openssh_public.split()[:2])


def _public_key_of(private_key: Path) -> bytes:
    """The OpenSSH public key of an OpenSSH private key file, as :func:`_key_text` writes it."""
    from cryptography.hazmat.primitives import serialization as ser

    key = ser.load_ssh_private_key(Path(private_key).read_bytes(), password=None)
    return _key_text(key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH))


def _node_config(cfg: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in cfg.items())
