"""The run directory: resolved config, per-round metrics, per-client records, checkpoints, summary.

Layout::

    RUN_DIR/config.toml      resolved scenario + [meta] (seed, engine, package versions)
    RUN_DIR/metrics.jsonl    one JSON object per round (appended and flushed as rounds finish)
    RUN_DIR/metrics.csv      the same table as CSV (rewritten atomically each round)
    RUN_DIR/clients.jsonl    one object per client per round (ok / error / timeout / invalid ...)
    RUN_DIR/privacy.jsonl    ε(δ) per round per mechanism (private runs)
    RUN_DIR/checkpoints/     round_NNNN.npz (model, strategy, privacy and client state) and latest.json
    RUN_DIR/summary.json     final metrics and status (also written when a run stops on an error)
    RUN_DIR/plots/*.png      accuracy, loss and participation per round

Every file is written so that a crash leaves what was already written valid: JSONL lines are
appended whole and flushed; other files are written to a temporary name unique to the writing
process and thread, then renamed (``os.replace`` is atomic on POSIX). A round's lines are all
written before its checkpoint, and ``latest.json`` names a checkpoint only once that file is
complete, so ``latest.json`` is the commit point a resume starts from (:func:`resume_point`).

A new run directory is created exclusively (:func:`create_run_dir`: a numbered suffix when two
runs start in the same second) and a directory that already holds a run is never written over
(:class:`~fedsim.errors.RunDirectoryError`), unless it is emptied first (:func:`prepare_out_dir`
with ``overwrite``) or resumed (``RunRecorder(..., resume_round=k)``, which drops every line after
round ``k``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config import Scenario, dumps_scenario
from fedsim.errors import CheckpointError, RunDirectoryError
from fedsim.sinks import Sinks

#: files that mark a directory as holding a run
RUN_FILES = ("config.toml", "metrics.jsonl", "clients.jsonl", "privacy.jsonl", "metrics.csv", "summary.json")
JSONL_FILES = ("metrics.jsonl", "clients.jsonl", "privacy.jsonl")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("fedsim", "flwr", "torch", "numpy", "opacus", "dp-accounting", "scikit-learn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file unique to this process and thread.

    Two writers of the same path (two runs, or a run and ``fedsim plot``) never share the temporary
    file, so each rename publishes one complete version; the temporary file is removed on failure.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ run dirs
def safe_name(name: str) -> str:
    """``run.name`` as one path component: runs of characters other than letters, digits, ``.``,
    ``_`` and ``-`` become ``-`` and leading/trailing dots and dashes go (``"../../x"`` → ``"x"``),
    so the run directory always stays inside ``run.output``."""
    return _UNSAFE.sub("-", name).strip(".-")[:80] or "run"


def create_run_dir(output: str | Path, name: str, seed: int, stamp: str | None = None) -> Path:
    """Create and return a new, empty ``OUTPUT/<name>-<time>-s<seed>[-N]`` directory.

    Creation is exclusive (``mkdir`` fails if the directory exists): a run started in the same second
    with the same name and seed gets the next free suffix ``-2``, ``-3``… instead of sharing it.
    """
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    base = f"{safe_name(name)}-{stamp or time.strftime('%Y%m%d-%H%M%S')}-s{seed}"
    for i in range(1, 10_000):
        candidate = root / (base if i == 1 else f"{base}-{i}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise RunDirectoryError(f"no free run directory named {base}-N under {root}",
                            "clean up run.output or choose another run.name")


def holds_run(path: Path) -> list[str]:
    """The run files already in ``path`` (empty when it holds no run)."""
    found = [n for n in RUN_FILES if (path / n).exists()]
    return found + (["checkpoints/"] if (path / "checkpoints").is_dir() and any((path / "checkpoints").iterdir())
                    else [])


def prepare_out_dir(path: str | Path, overwrite: bool = False) -> Path:
    """An explicit ``--out``: created if missing; an existing, non-empty directory is refused unless
    ``overwrite`` is set *and* it is a fedsim run directory (it has a ``config.toml``), which is then
    emptied — so no stale checkpoint or line of an earlier run can sit beside the new one."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RunDirectoryError(f"--out {p} is a file, not a directory", "pass a directory path")
    entries = sorted(e.name for e in p.iterdir()) if p.is_dir() else []
    if entries:
        shown = ", ".join(entries[:4]) + ("…" if len(entries) > 4 else "")
        if not overwrite:
            raise RunDirectoryError(
                f"--out {p} is not empty ({shown}); a new run would mix its files with what is there",
                f"pass a new directory, add --overwrite to replace the run in it, or continue it with "
                f"`fedsim resume {p}`")
        if not (p / "config.toml").is_file():
            raise RunDirectoryError(f"--overwrite replaces a fedsim run directory only, and {p} has no config.toml "
                                    f"({shown})", "pass an empty or new directory")
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    return p


# ------------------------------------------------------------------------------------------ recorder
def scenario_fingerprint(scenario: Scenario) -> str:
    """SHA-256 of the resolved scenario's TOML: a checkpoint only resumes the scenario that wrote it."""
    import hashlib

    return hashlib.sha256(dumps_scenario(scenario).encode()).hexdigest()


class RunRecorder:
    """Writes one run directory as the run goes.

    Parameters
    ----------
    out_dir
        The run directory; a directory that already holds a run is refused (``RunDirectoryError``).
    scenario
        The resolved scenario (written to ``config.toml``; its fingerprint goes into checkpoints).
    engine
        Engine name recorded in ``config.toml``'s ``[meta]``.
    resume_round
        Continue the run in ``out_dir`` after its checkpoint of this round: ``config.toml`` is kept,
        JSONL lines of later rounds (and later checkpoints) are dropped.
    """

    def __init__(self, out_dir: str | Path, scenario: Scenario, engine: str | None = None,
                 resume_round: int | None = None) -> None:
        self.dir = Path(out_dir)
        self.scenario = scenario
        self.fingerprint = scenario_fingerprint(scenario)
        self.started = time.time()
        self.rows: list[dict[str, Any]] = []
        self.sinks = Sinks(self.dir, scenario, 0 if resume_round is None else resume_round + 1)  # run.log
        if resume_round is not None:
            self._truncate(resume_round)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        found = holds_run(self.dir)
        if found:
            raise RunDirectoryError(f"{self.dir} already holds a run ({', '.join(found)}); writing a new one there "
                                    "would mix the two", f"use a new directory, or continue it with "
                                    f"`fedsim resume {self.dir}`")
        (self.dir / "checkpoints").mkdir(exist_ok=True)
        meta = {"seed": scenario.run.seed, "engine": engine or scenario.run.engine,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.started)),
                "versions": package_versions()}
        import tomli_w

        atomic_write(self.dir / "config.toml", dumps_scenario(scenario) + "\n" + tomli_w.dumps({"meta": meta}))
        for name in JSONL_FILES:
            (self.dir / name).write_text("")

    def _truncate(self, k: int) -> None:
        """Keep the lines of rounds ``<= k`` (a torn last line, from a crash mid-append, is dropped)."""
        for name in JSONL_FILES:
            path = self.dir / name
            lines = [ln for ln in (path.read_text().splitlines() if path.exists() else []) if ln.strip()]
            keep = []
            for i, line in enumerate(lines):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines) - 1:
                        continue  # the last append of a killed run, after the checkpoint
                    raise CheckpointError(f"{path}: line {i + 1} is not JSON", "the file was edited or corrupted; "
                                          "the run cannot be continued from it") from None
                if int(record.get("round", 0)) <= k:
                    keep.append(line)
            atomic_write(path, "".join(line + "\n" for line in keep))
        self.rows = read_jsonl(self.dir / "metrics.jsonl")
        if [r.get("round") for r in self.rows] != list(range(k + 1)):
            raise CheckpointError(f"{self.dir / 'metrics.jsonl'} does not hold rounds 0..{k} once each, as the "
                                  f"checkpoint of round {k} requires", "the run directory was edited; start a new run")
        for old in (self.dir / "checkpoints").glob("round_*.npz"):
            if _round_of(old) > k:
                old.unlink()
        self._write_csv()

    # ---------------------------------------------------------------------------------------
    def _append(self, name: str, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        with open(self.dir / name, "a") as fh:
            for r in records:
                fh.write(json.dumps(_jsonable(r), sort_keys=True) + "\n")
            fh.flush()

    def _write_csv(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write(self.dir / "metrics.csv", buf.getvalue())

    def log_round(self, row: dict[str, Any]) -> None:
        self.rows.append(_jsonable(row))
        self._append("metrics.jsonl", [row])
        self._write_csv()
        self.sinks.log(int(row["round"]), self.rows[-1])

    def written_rows(self) -> list[dict[str, Any]]:
        """The complete lines of ``metrics.jsonl``: what the run really finished, even when an
        interrupt landed between writing a round and noting it in memory (a torn line is skipped)."""
        out = []
        for line in (self.dir / "metrics.jsonl").read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def log_clients(self, records: list[dict[str, Any]]) -> None:
        self._append("clients.jsonl", records)

    def log_privacy(self, records: list[dict[str, Any]]) -> None:
        self._append("privacy.jsonl", records)

    def checkpoint(self, server_round: int, keys: list[str], arrays: list[np.ndarray],
                   strategy_state: dict[str, np.ndarray], extra: dict[str, Any] | None = None,
                   client_states: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None) -> Path:
        """Model, strategy state, JSON extras (accountant state, …) and, when the engine has them,
        every node's ``context.state`` for ``server_round``, then ``latest.json`` names it.
        ``client_states`` is ``(description, arrays)`` as the local engine packs them
        (:meth:`fedsim.engines.local.LocalGrid.export_state`): arrays are stored under ``clients/…``."""
        path = self.dir / "checkpoints" / f"round_{server_round:04d}.npz"
        payload = {f"model/{k}": a for k, a in zip(keys, arrays)}
        payload.update({f"strategy/{k}": np.asarray(v) for k, v in strategy_state.items()})
        meta = _jsonable({"round": server_round, "keys": keys, "scenario_sha256": self.fingerprint, **(extra or {})})
        if client_states is not None:
            meta["clients"] = client_states[0]
            payload.update({f"clients/{k}": v for k, v in client_states[1].items()})
        payload["meta/json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **payload)
        atomic_write(path, buf.getvalue())
        atomic_write(self.dir / "checkpoints" / "latest.json", json.dumps({"round": server_round, "file": path.name}))
        return path

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write ``summary.json`` (with wall time and run directory) and return it."""
        summary = {**summary, "wall_time_s": round(time.time() - self.started, 3), "run_dir": str(self.dir)}
        atomic_write(self.dir / "summary.json", json.dumps(_jsonable(summary), indent=2, sort_keys=True))
        self.sinks.close(str(summary.get("status")))
        return summary


def write_stopped_summary(run_dir: str | Path, status: str, error: str | None, **fields: Any) -> dict[str, Any]:
    """``summary.json`` for a run whose ServerApp could not write its own (an engine interrupted
    from outside it, e.g. the deployment engine's processes stopped): status, the rounds that
    ``metrics.jsonl`` shows complete, and the last row."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    last = rows[-1] if rows else {}
    summary = {"status": status, "rounds_completed": int(last.get("round", 0)), "final": last, "error": error,
               "run_dir": str(run_dir), **fields}
    if run_dir.is_dir():
        atomic_write(run_dir / "summary.json", json.dumps(_jsonable(summary), indent=2, sort_keys=True))
    return summary


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :meth:`RunRecorder.checkpoint`: ``meta``, ``model`` (arrays in the
    order of ``meta["keys"]``), ``strategy`` and ``clients`` (``(description, arrays)`` of the nodes'
    state, or ``None``). A missing, truncated or corrupted file raises :class:`CheckpointError`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta/json"]).decode())
            missing = [k for k in meta["keys"] if f"model/{k}" not in z.files]
            if missing:
                raise CheckpointError(f"{path}: model arrays {missing[:3]} are missing",
                                      "the checkpoint is incomplete; resume from an intact run directory")
            model = [z[f"model/{k}"] for k in meta["keys"]]
            strategy = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("strategy/")}
            clients = None
            if "clients" in meta:
                clients = (meta["clients"], {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("clients/")})
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - zip, npy, JSON and key errors all mean "unusable file"
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err})",
                              "the checkpoint is missing, truncated or corrupted; nothing can be resumed from "
                              "it") from None
    return {"meta": meta, "model": model, "strategy": strategy, "clients": clients}


def resume_point(run_dir: str | Path, scenario: Scenario) -> dict[str, Any]:
    """The checkpoint ``checkpoints/latest.json`` names, checked for a resume of ``scenario``:
    readable, of the round ``latest.json`` says, written by the same scenario (its fingerprint),
    and with every node's client state. Anything else raises :class:`CheckpointError`."""
    ckdir = Path(run_dir) / "checkpoints"
    latest = ckdir / "latest.json"
    if not latest.exists():
        raise CheckpointError(f"{run_dir} has no checkpoint (checkpoints/latest.json)",
                              "only runs with run.checkpoint_every > 0 that finished a checkpointed round "
                              "can be resumed; start it again with `fedsim run`")
    try:
        pointer = json.loads(latest.read_text())
        k, name = int(pointer["round"]), str(pointer["file"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{latest} is not a valid checkpoint pointer ({type(err).__name__}: {err})",
                              "the file is corrupted; the run cannot be continued") from None
    if name != f"round_{k:04d}.npz":
        raise CheckpointError(f"{latest} names '{name}' for round {k}", "the file was edited; restore it or "
                              "start a new run")
    ck = load_checkpoint(ckdir / name)
    meta = ck["meta"]
    if meta.get("round") != k:
        raise CheckpointError(f"{ckdir / name} holds round {meta.get('round')}, latest.json says {k}",
                              "the checkpoints were mixed up; start a new run")
    if meta.get("scenario_sha256") != scenario_fingerprint(scenario):
        raise CheckpointError(f"the checkpoint of round {k} was written by a different scenario than "
                              f"{Path(run_dir) / 'config.toml'} now describes",
                              "resume only the scenario that wrote the run (restore config.toml), or start a "
                              "new run with `fedsim run`")
    if ck["clients"] is None:
        raise CheckpointError(f"the checkpoint of round {k} has no client state (context.state of every node)",
                              "only runs of the local engine can be resumed")
    return ck


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _round_of(path: Path) -> int:
    try:
        return int(path.stem.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
