"""The run directory: resolved config, per-round metrics, per-client records, checkpoints, summary.

Layout::

    RUN_DIR/config.toml      resolved scenario + [meta] (seed, engine, package versions)
    RUN_DIR/metrics.jsonl    one JSON object per round (appended and flushed as rounds finish)
    RUN_DIR/metrics.csv      the same table as CSV (rewritten atomically each round)
    RUN_DIR/clients.jsonl    one object per client per round (ok / error / timeout / invalid ...)
    RUN_DIR/privacy.jsonl    ε(δ) per round per mechanism (private runs)
    RUN_DIR/checkpoints/     round_NNNN.npz (model + strategy state) and latest.json
    RUN_DIR/summary.json     final metrics and status (also written when a run stops on an error)
    RUN_DIR/plots/*.png      accuracy, loss and participation per round

Every file is written so that a crash leaves what was already written valid: JSONL lines are
appended whole and flushed; other files are written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config import Scenario, dumps_scenario


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("fedsim", "flwr", "torch", "numpy", "opacus", "dp-accounting", "scikit-learn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode) as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RunRecorder:
    """Writes one run directory as the run goes."""

    def __init__(self, out_dir: str | Path, scenario: Scenario, engine: str | None = None) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "checkpoints").mkdir(exist_ok=True)
        self.scenario = scenario
        self.rows: list[dict[str, Any]] = []
        self.started = time.time()
        meta = {"seed": scenario.run.seed, "engine": engine or scenario.run.engine,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.started)),
                "versions": package_versions()}
        import tomli_w

        atomic_write(self.dir / "config.toml", dumps_scenario(scenario) + "\n" + tomli_w.dumps({"meta": meta}))
        for name in ("metrics.jsonl", "clients.jsonl", "privacy.jsonl"):
            (self.dir / name).write_text("")

    # ---------------------------------------------------------------------------------------
    def _append(self, name: str, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        with open(self.dir / name, "a") as fh:
            for r in records:
                fh.write(json.dumps(_jsonable(r), sort_keys=True) + "\n")
            fh.flush()

    def log_round(self, row: dict[str, Any]) -> None:
        self.rows.append(_jsonable(row))
        self._append("metrics.jsonl", [row])
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write(self.dir / "metrics.csv", buf.getvalue())

    def log_clients(self, records: list[dict[str, Any]]) -> None:
        self._append("clients.jsonl", records)

    def log_privacy(self, records: list[dict[str, Any]]) -> None:
        self._append("privacy.jsonl", records)

    def checkpoint(self, server_round: int, keys: list[str], arrays: list[np.ndarray],
                   strategy_state: dict[str, np.ndarray], extra: dict[str, Any] | None = None) -> Path:
        """Model, strategy state and JSON extras (e.g. accountant state) for ``server_round``."""
        path = self.dir / "checkpoints" / f"round_{server_round:04d}.npz"
        payload = {f"model/{k}": a for k, a in zip(keys, arrays)}
        payload.update({f"strategy/{k}": np.asarray(v) for k, v in strategy_state.items()})
        payload["meta/json"] = np.frombuffer(json.dumps(_jsonable({"round": server_round, "keys": keys,
                                                                    **(extra or {})})).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **payload)
        atomic_write(path, buf.getvalue())
        atomic_write(self.dir / "checkpoints" / "latest.json",
                     json.dumps({"round": server_round, "file": path.name}))
        return path

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write ``summary.json`` (with wall time and run directory) and return it."""
        summary = {**summary, "wall_time_s": round(time.time() - self.started, 3), "run_dir": str(self.dir)}
        atomic_write(self.dir / "summary.json", json.dumps(_jsonable(summary), indent=2, sort_keys=True))
        return summary


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :meth:`RunRecorder.checkpoint`."""
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta/json"]).decode())
        model = [z[f"model/{k}"] for k in meta["keys"]]
        strategy = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("strategy/")}
    return {"meta": meta, "model": model, "strategy": strategy}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


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
