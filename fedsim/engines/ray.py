"""The Ray engine: Flower's Simulation Engine running the same ServerApp and ClientApp.

Client resources come from the scenario's ``[ray]`` section (default 1 CPU per client, so a
2-core machine runs 2 clients at a time instead of Flower's default of one). Ray listens on
loopback only here, and its logs stay quiet unless asked.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedsim.config import Scenario
from fedsim.errors import EngineError


def run_ray(scenario: Scenario, out_dir: str | Path, on_round=None) -> dict[str, Any]:
    try:
        from flwr.simulation import run_simulation
    except ImportError as err:  # pragma: no cover - depends on the install
        raise EngineError("the Ray engine needs flwr[simulation]", "pip install 'flwr[simulation]'") from err
    from fedsim.catalog import resolve
    from fedsim.clients.client_app import build_client_app
    from fedsim.server import build_server_app

    resolve(scenario)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    result: dict[str, Any] = {}
    client_app = build_client_app(scenario)
    server_app = build_server_app(scenario, out_dir, engine="ray", on_round=on_round, result=result)
    cpus = os.cpu_count() or 1
    r = scenario.ray
    init_args: dict[str, Any] = {"num_cpus": cpus, "include_dashboard": False, "logging_level": logging.ERROR,
                                 "log_to_driver": False, "_node_ip_address": "127.0.0.1"}
    if r.num_gpus > 0:
        init_args["num_gpus"] = 1
    backend_config = {"client_resources": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
                      "init_args": init_args}
    if r.max_workers:
        backend_config["init_args"]["num_cpus"] = min(cpus, r.max_workers * r.num_cpus)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=scenario.data.num_clients,
                       backend_config=backend_config)
    except KeyboardInterrupt as err:
        # the signal reaches this (main) thread only: the ServerApp thread stops before its next
        # round, and the summary says so now, whatever that thread still manages to write
        from fedsim.results import write_stopped_summary
        from fedsim.server import request_stop

        request_stop()
        write_stopped_summary(out_dir, "interrupted", str(err.args[0]) if err.args else "SIGINT",
                              rounds_planned=scenario.run.rounds, strategy=scenario.strategy.name,
                              seed=scenario.run.seed)
        raise
    if not result:
        raise EngineError("the Ray simulation ended without a result",
                          "look at the log above for the ServerApp's error; try --engine local to debug")
    return result
