"""The fedsim ServerApp and its round loop, shared by every engine.

The loop drives a ``flwr.serverapp.strategy.Strategy`` through Flower's own sequence
(configure_train → send_and_receive → aggregate_train → configure/aggregate_evaluate → central
evaluation) and adds what a trustworthy simulator needs: a budget check *before* each round,
per-client records (including failures), checkpoints, and a summary written even on failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedsim.catalog import resolve
from fedsim.clients.trainer import evaluate
from fedsim.config import Scenario, loads_scenario
from fedsim.data.federation import federation_of
from fedsim.errors import FedSimError
from fedsim.models import build_model, resolve_device
from fedsim.privacy.ledger import build_ledger
from fedsim.privacy.mechanisms import RoundOutcome
from fedsim.results import RunRecorder
from fedsim.rng import derive_seed
from fedsim.strategies.base import FedSimStrategy, make_strategy
from fedsim.wire import state_to_arrays

RoundCallback = Callable[[int, dict[str, Any]], None]


class ServerRuntime:
    """Server-side model and data: the central test set (and the labelled split, if any)."""

    def __init__(self, scenario: Scenario) -> None:
        self.federation = federation_of(scenario)
        ds = self.federation.dataset
        self.device = resolve_device(scenario.run.device)
        torch.set_num_threads(scenario.run.threads)
        self.model = build_model(scenario.model, tuple(ds.input_shape), int(ds.num_classes),
                                 derive_seed(scenario.run.seed, "model-init")).to(self.device)
        self.x_test = torch.tensor(np.asarray(ds.x_test), dtype=torch.float32, device=self.device)
        self.y_test = torch.tensor(np.asarray(ds.y_test), dtype=torch.long, device=self.device)

    def initial_arrays(self) -> ArrayRecord:
        return state_to_arrays(self.model)

    def load(self, arrays: ArrayRecord) -> torch.nn.Module:
        self.model.load_state_dict({k: torch.from_numpy(v.numpy()) for k, v in arrays.items()})
        return self.model

    def evaluate(self, arrays: ArrayRecord) -> dict[str, float]:
        m = evaluate(self.load(arrays), self.x_test, self.y_test)
        return {"test_loss": m["loss"], "test_accuracy": m["accuracy"]}


def run_federation(grid: Grid, scenario: Scenario, out_dir: str | Path, *,
                   engine: str | None = None, on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Run the scenario's rounds on ``grid`` and write the run directory. Returns the summary."""
    strategy = make_strategy(scenario)
    server = ServerRuntime(scenario)
    strategy.attach_server(server)
    privacy = build_ledger(scenario, strategy.privacy_mechanisms(), server.federation)
    rec = RunRecorder(out_dir, scenario, engine)
    arrays = server.initial_arrays()
    rounds = scenario.run.rounds
    status, error = "completed", None
    row: dict[str, Any] = {"round": 0, **server.evaluate(arrays)}
    rec.log_round(row)
    if on_round:
        on_round(0, row)
    last = row
    completed = 0
    try:
        for rnd in range(1, rounds + 1):
            if privacy is not None:
                privacy.before_round(rnd)  # raises PrivacyBudgetExceeded before any client works
            t0 = time.perf_counter()
            cfg = ConfigRecord({"progress": (rnd - 1) / rounds, "num-rounds": rounds})
            msgs = list(strategy.configure_train(rnd, arrays, cfg, grid))
            replies = list(grid.send_and_receive(msgs, timeout=scenario.run.round_timeout)) if msgs else []
            new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
            if new_arrays is not None:
                arrays = new_arrays
            eval_msgs = list(strategy.configure_evaluate(rnd, arrays, cfg, grid))
            fed_eval = None
            if eval_msgs:
                fed_eval = strategy.aggregate_evaluate(
                    rnd, grid.send_and_receive(eval_msgs, timeout=scenario.run.round_timeout))
            row = {"round": rnd, "wall_s": round(time.perf_counter() - t0, 4)}
            row.update({k: v for k, v in dict(train_metrics or {}).items()})
            if fed_eval:
                row.update({f"fed_{k}": v for k, v in dict(fed_eval).items()})
            if rnd % scenario.run.eval_every == 0 or rnd == rounds:
                row.update(server.evaluate(arrays))
            row["failed-clients"] = sum(1 for f in strategy.failures
                                        if f.partition_id is not None and f.kind not in ("sat-out", "straggler"))
            rec.log_clients(_client_records(rnd, strategy))
            if privacy is not None:
                records = privacy.after_round(rnd, _outcome(strategy))
                rec.log_privacy(records)
                row.update({"epsilon": records[-1]["epsilon"]} if records else {})
                row.update(privacy.released())
            rec.log_round(row)
            last = row
            completed = rnd
            if scenario.run.checkpoint_every and (rnd % scenario.run.checkpoint_every == 0 or rnd == rounds):
                extra = {"privacy": privacy.state_dict()} if privacy is not None else {}
                rec.checkpoint(rnd, list(arrays.keys()), [a.numpy() for a in arrays.values()],
                               strategy.state_dict(), extra)
            if on_round:
                on_round(rnd, row)
    except FedSimError as err:
        status, error = f"stopped: {type(err).__name__}", err
        raise
    finally:
        summary = {"status": status, "rounds_completed": completed, "rounds_planned": rounds,
                   "strategy": scenario.strategy.name, "seed": scenario.run.seed,
                   "final": {k: v for k, v in last.items()},
                   "error": str(error) if error else None}
        summary = rec.finish(summary)
        if rec.rows:
            from fedsim.plots import plot_run  # matplotlib: imported only when a run has rows to draw

            plot_run(rec.dir)
    return summary


def _outcome(strategy: FedSimStrategy) -> RoundOutcome:
    return RoundOutcome(sampled=list(strategy.sampled), participants=[u.partition_id for u in strategy.last_updates],
                        metrics={u.partition_id: dict(u.metrics) for u in strategy.last_updates})


def _client_records(rnd: int, strategy: FedSimStrategy) -> list[dict[str, Any]]:
    out = []
    for u in strategy.last_updates:
        private = ("partition-id", "num-examples", "label-counts")  # label counts are released only via DP
        out.append({"round": rnd, "client": u.partition_id, "node_id": u.node_id, "status": "ok",
                    "num_examples": u.num_examples, **{k: v for k, v in u.metrics.items() if k not in private}})
    out += [f.to_json() for f in strategy.failures]
    return sorted(out, key=lambda r: (r["client"] is None, r["client"] if r["client"] is not None else 0))


def build_server_app(scenario: Scenario | None = None, out_dir: str | Path | None = None,
                     engine: str | None = None, on_round: RoundCallback | None = None,
                     result: dict[str, Any] | None = None) -> ServerApp:
    """The ServerApp. With ``scenario=None`` it reads the scenario TOML and the output directory
    from the run config (``scenario``, ``out-dir``), as under ``flwr run``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        scen = scenario if scenario is not None else resolve(loads_scenario(str(context.run_config["scenario"])))
        out = out_dir or str(context.run_config.get("out-dir") or "") or default_run_dir(scen)
        summary = run_federation(grid, scen, out, engine=engine or scen.run.engine, on_round=on_round)
        if result is not None:
            result.update(summary)

    return app


def default_run_dir(scenario: Scenario) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(scenario.run.output) / f"{scenario.run.name}-{stamp}-s{scenario.run.seed}"
