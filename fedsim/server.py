"""The fedsim ServerApp and its round loop, shared by every engine.

The loop drives a ``flwr.serverapp.strategy.Strategy`` through Flower's own sequence
(configure_train → send_and_receive → aggregate_train → configure/aggregate_evaluate → central
evaluation) and adds what a trustworthy simulator needs: a budget check *before* each round,
per-client records (including failures), checkpoints, and a summary written even on failure.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedsim.catalog import resolve
from fedsim.clients.trainer import evaluate
from fedsim.config import Scenario
from fedsim.data.federation import federation_of
from fedsim.errors import (CheckpointError, ConfigError, FailedRoundError, FedSimError, QuorumError,
                           RunDirectoryError)
from fedsim.models import build_model, resolve_device, to_fast_layout
from fedsim.privacy.ledger import build_ledger
from fedsim.privacy.mechanisms import RoundOutcome
from fedsim.results import RunRecorder, create_run_dir, prepare_out_dir, resume_point
from fedsim.rng import derive_seed
from fedsim.strategies.base import FedSimStrategy, make_strategy
from fedsim.strategies.wire_bytes import MeteredGrid, client_fields, round_fields
from fedsim.wire import from_numpy, state_to_arrays

RoundCallback = Callable[[int, dict[str, Any]], None]
_STOP = threading.Event()
#: warnings of a run (partitions no node holds, ...): Flower's logger, so `flwr run --stream`,
#: `flwr log` and fedsim's CLI all show them
_LOG = logging.getLogger("flwr")


class ServerRuntime:
    """Server-side model and data: the central test set (and the labelled split, if any)."""

    def __init__(self, scenario: Scenario) -> None:
        self.federation = federation_of(scenario)
        ds = self.federation.dataset
        self.device = resolve_device(scenario.run.device)
        torch.set_num_threads(scenario.run.threads)
        self.model = to_fast_layout(build_model(scenario.model, tuple(ds.input_shape), int(ds.num_classes),
                                                derive_seed(scenario.run.seed, "model-init")), self.device)
        self.x_test = torch.tensor(np.asarray(ds.x_test), dtype=torch.float32, device=self.device)
        self.y_test = torch.tensor(np.asarray(ds.y_test), dtype=torch.long, device=self.device)
        self.eval_hooks = plugin_eval_hooks(scenario)

    def initial_arrays(self) -> ArrayRecord:
        return state_to_arrays(self.model)

    def load(self, arrays: ArrayRecord) -> torch.nn.Module:
        self.model.load_state_dict({k: torch.from_numpy(v.numpy()) for k, v in arrays.items()})
        return self.model

    def evaluate(self, arrays: ArrayRecord) -> dict[str, float]:
        model = self.load(arrays)
        m = evaluate(model, self.x_test, self.y_test)
        out = {"test_loss": m["loss"], "test_accuracy": m["accuracy"]}
        for hook in self.eval_hooks:  # enabled plugins' evaluations of the global model (robust accuracy)
            out.update(hook(model, self.x_test, self.y_test))
        return out


def plugin_eval_hooks(scenario: Scenario) -> list[Callable[..., dict[str, float]]]:
    """The server-side evaluations of the scenario's client plugins: each plugin class with a
    ``evaluate_global(settings, model, x_test, y_test, seed) -> metrics`` classmethod adds its metrics
    to every central evaluation (e.g. ``adversarial/test_robust_accuracy``)."""
    import fedsim.clients.plugins  # noqa: F401  (fills the plugin registry)
    from fedsim.clients.plugin_api import PLUGINS, make_settings

    hooks = []
    for name in scenario.client.plugins:
        cls = PLUGINS.get(name, key="client.plugins")
        if getattr(cls, "evaluate_global", None) is not None:
            settings = make_settings(cls, scenario.client.plugin_settings(name))
            hooks.append(functools.partial(cls.evaluate_global, settings, seed=scenario.run.seed))
    return hooks


def request_stop() -> None:
    """Ask the running :func:`run_federation` (e.g. the Ray engine's ServerApp thread, which no signal
    reaches) to stop before its next round; it ends with status ``interrupted``."""
    _STOP.set()


def run_federation(grid: Grid, scenario: Scenario, out_dir: str | Path, *, engine: str | None = None,
                   on_round: RoundCallback | None = None, resume: bool = False,
                   client_app: str | None = None) -> dict[str, Any]:
    """Run the scenario's rounds on ``grid`` and write the run directory. Returns the summary.

    ``summary.json`` always says how the run ended: ``completed``; ``stopped: <Error>`` for a typed
    error (a failed round under ``run.on_failed_round = "stop"``, a privacy budget, a federation
    refused before round 1…); ``failed: every round failed`` when, under ``"continue"``, no round got
    a valid reply (:class:`FailedRoundError`); ``interrupted`` (SIGINT/SIGTERM, :func:`request_stop`);
    ``failed: <Type>`` for anything else — the exception is re-raised in every case but ``completed``.
    Before round 1 the federation is checked (:func:`check_partitions`): partitions no node holds are
    a warning (``summary.json``: ``partitions_never_trained``), or a refusal with
    ``run.require_all_partitions``. With ``resume=True`` the run continues in ``out_dir``
    after its latest checkpoint (model, strategy, privacy ledger and every node's ``context.state``;
    the grid must offer ``restore_state``, as the local engine's does). ``summary.json``'s ``client_app``
    says which ClientApp served: ``client_app`` as the engine describes it, else ``run.client_app``, else
    ``"fedsim"``.
    """
    _STOP.clear()
    strategy = make_strategy(scenario)
    grid = MeteredGrid(grid)  # bytes on the wire per node and round (fedsim.strategies.wire_bytes)
    server = ServerRuntime(scenario)
    strategy.attach_server(server)
    privacy = build_ledger(scenario, strategy.privacy_mechanisms(), server.federation)
    arrays = server.initial_arrays()
    rounds = scenario.run.rounds
    start = 0
    if resume:
        arrays, start = _restore(grid, scenario, out_dir, strategy, privacy, arrays)
        rec = RunRecorder(out_dir, scenario, engine, resume_round=start)
        row: dict[str, Any] = rec.rows[-1]
    else:
        rec = RunRecorder(out_dir, scenario, engine)
        row = {"round": 0, **server.evaluate(arrays)}
        rec.log_round(row)
    status, error, error_type = "completed", None, None
    never_trained: list[int] = []
    try:
        try:
            never_trained = check_partitions(grid, strategy, scenario, settle=0.0 if engine == "local" else 3.0)
        finally:
            rec.log_clients([f.to_json() for f in strategy.failures])  # nodes refused before round 1
            strategy.failures = []
        if on_round:
            on_round(start, row)
        for rnd in range(start + 1, rounds + 1):
            if _STOP.is_set():
                raise KeyboardInterrupt("stop requested")
            if privacy is not None:
                privacy.before_round(rnd)  # raises PrivacyBudgetExceeded before any client works
            t0 = time.perf_counter()
            cfg = ConfigRecord({"progress": (rnd - 1) / rounds, "num-rounds": rounds})
            msgs = list(strategy.configure_train(rnd, arrays, cfg, grid))
            replies = list(grid.send_and_receive(msgs, timeout=scenario.run.round_timeout)) if msgs else []
            new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
            if new_arrays is not None:
                arrays = new_arrays
            failure = _round_failure(rnd, strategy)
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
            if failure:
                row["round-failed"] = 1
            wire = grid.meter.take()  # this round's messages (and any node discovery since the last round)
            row.update(round_fields(wire))
            rec.log_clients(_client_records(rnd, strategy, wire))
            if privacy is not None:
                records = privacy.after_round(rnd, _outcome(strategy))
                rec.log_privacy(records)
                row.update(privacy.round_metrics(records))
            rec.log_round(row)
            if scenario.run.checkpoint_every and (rnd % scenario.run.checkpoint_every == 0 or rnd == rounds):
                _checkpoint(rec, rnd, arrays, strategy, privacy, grid)
            if on_round:
                on_round(rnd, row)
            if failure and scenario.run.on_failed_round == "stop":
                raise FailedRoundError(failure, FAILED_ROUND_HINT)
        _raise_if_every_round_failed(rec.written_rows())
    except FailedRoundError as err:
        every = getattr(err, "every_round", False)
        status, error, error_type = ("failed: every round failed" if every else "stopped: FailedRoundError",
                                     err, "FailedRoundError")
        raise
    except FedSimError as err:
        status, error, error_type = f"stopped: {type(err).__name__}", err, type(err).__name__
        raise
    except KeyboardInterrupt as err:
        status, error, error_type = "interrupted", (str(err.args[0]) if err.args else "SIGINT"), "KeyboardInterrupt"
        raise
    except BaseException as err:
        status, error, error_type = f"failed: {type(err).__name__}", err, type(err).__name__
        raise
    finally:
        written = rec.written_rows()  # the file, not memory: a signal may land between the two
        last = written[-1] if written else {}
        summary = {"status": status, "rounds_completed": int(last.get("round", 0)), "rounds_planned": rounds,
                   "strategy": scenario.strategy.name, "seed": scenario.run.seed,
                   "final": {k: v for k, v in last.items()},
                   "failed_rounds": [r["round"] for r in written if r.get("round-failed")],
                   "on_failed_round": scenario.run.on_failed_round, "resumed_from": start if resume else None,
                   "partitions_never_trained": never_trained,
                   "privacy": None if scenario.privacy.mechanism == "none" else {  # σ as run (target: calibrated)
                       "mechanism": scenario.privacy.mechanism, "noise_multiplier": scenario.privacy.noise_multiplier,
                       "target_epsilon": scenario.privacy.target_epsilon or None},
                   "error": str(error) if error else None, "error_type": error_type,
                   "client_app": client_app or scenario.run.client_app or "fedsim"}
        if callable(getattr(grid, "vectorized", None)):  # the local engine: did the batched path train?
            summary["vectorized"] = grid.vectorized()
        summary = rec.finish(summary)
        if rec.rows:
            from fedsim.plots import plot_run  # matplotlib: imported only when a run has rows to draw

            plot_run(rec.dir)
    return summary


FAILED_ROUND_HINT = ("clients.jsonl has each client's reason; lower run.quorum, raise run.round_timeout if clients "
                     "timed out, or set run.on_failed_round = \"continue\" to go on (failed rounds are then "
                     "counted in summary.json)")


def _raise_if_every_round_failed(rows: list[dict[str, Any]]) -> None:
    """A run whose every round failed (under ``run.on_failed_round = "continue"``) or was skipped by its
    aggregator (``aggregation-failed`` and nothing ``decoded``: coded gradients' own skip) trained nothing
    and must not end ``completed`` (its final model is the initial one)."""
    ran = [r for r in rows if int(r.get("round", 0)) >= 1]
    if ran and all(r.get("round-failed") or (r.get("aggregation-failed") and not r.get("decoded")) for r in ran):
        err = FailedRoundError(f"every one of the {len(ran)} rounds failed (no valid reply, below run.quorum, or "
                               "refused by the aggregator): nothing was trained, the final model is the initial one",
                               "clients.jsonl has each client's reason; fix what makes them fail, lower "
                               "run.quorum, or raise run.round_timeout if clients timed out")
        err.every_round = True  # type: ignore[attr-defined]  (the summary's status says so)
        raise err


def _ranges(ids: list[int]) -> str:
    """``[2, 3, 4, 7]`` → ``"2-4, 7"``."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def wait_for_nodes(grid: Grid, want: int, timeout: float, settle: float = 3.0) -> list[int]:
    """The grid's node ids once ``want`` nodes are there, or once their number has not changed for
    ``settle`` seconds (Flower registers simulated nodes shortly after the ServerApp starts), at most
    ``timeout`` seconds. Refuses (:class:`QuorumError`) a grid with no node at all by then."""
    deadline = time.monotonic() + timeout
    count, since = -1, time.monotonic()
    while True:
        ids = list(grid.get_node_ids())
        now = time.monotonic()
        if len(ids) >= want:
            return ids
        if len(ids) != count:
            count, since = len(ids), now
        elif ids and now - since >= settle:  # settle = 0: the in-process grid has every node at once
            return ids
        if now > deadline:
            if not ids:
                raise QuorumError(f"no node joined the federation within run.round_timeout = {timeout:.0f} s",
                                  "start the SuperNodes (or use a simulation federation), or raise "
                                  "run.round_timeout")
            return ids
        time.sleep(0.2)


def check_partitions(grid: Grid, strategy: FedSimStrategy, scenario: Scenario, settle: float = 3.0) -> list[int]:
    """Before round 1: which of the scenario's ``data.num_clients`` partitions no node holds.

    Waits for the nodes (:func:`wait_for_nodes`), maps them to partitions (``strategy.discover``),
    and returns the partitions that will never train (empty when every partition has a node). Such
    partitions are a warning on Flower's logger; with ``run.require_all_partitions = true``, or when no
    node holds any partition or fewer than a round needs, the federation is refused with
    :class:`QuorumError` before anything trains (a federation of 2 nodes, Flower's default, for a
    scenario of 10 clients trains on 2 of them at best).
    """
    n = scenario.data.num_clients
    nodes = wait_for_nodes(grid, n, scenario.run.round_timeout, settle)
    strategy.server_round = 0  # refusals recorded now are round 0's: before any round trains
    strategy.discover(grid)
    held = sorted(set(strategy.directory.values()))
    held_set = set(held)  # built once: a set per partition made this quadratic (770 s at 10⁵ clients)
    missing = [p for p in range(n) if p not in held_set]
    if not missing:
        return []
    refused = list(strategy.refused_nodes.values())
    what = (f"the federation has {len(nodes)} node(s) and {len(held)} of the scenario's {n} partitions "
            f"(data.num_clients) have a node; partitions {_ranges(missing)} will never train"
            + (f"; {len(refused)} node(s) refused, e.g. {refused[0]}" if refused else ""))
    fix = (f"run on a federation of {n} nodes (flwr run: --federation-config \"num-supernodes={n}\", or the "
           f"pyproject's local-simulation federation), or set data.num_clients = {len(nodes)}")
    need = min(strategy.min_train_clients, strategy.sample_size())
    if not held or len(held) < need:
        raise QuorumError(f"{what}; a round needs {need} (strategy.min_train_clients), so none could run", fix)
    if scenario.run.require_all_partitions:
        raise QuorumError(f"{what}; run.require_all_partitions = true refuses such a federation", fix)
    _LOG.warning("fedsim: %s (set run.require_all_partitions = true to refuse such a run; fix: %s)", what, fix)
    return missing


def _round_failure(rnd: int, strategy: FedSimStrategy) -> str | None:
    """Why round ``rnd`` failed — below quorum, no valid reply from any sampled client (a client
    that sat out or straggled by design answered), or valid replies the strategy refused to aggregate
    (:class:`~fedsim.errors.AggregationError`, unless ``aggregation_may_skip``) — or ``None``."""
    kinds = Counter(f.kind for f in strategy.failures if f.partition_id is not None)
    what = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    if strategy.sampled and not strategy.last_updates and not kinds.keys() & {"sat-out", "straggler"}:
        return (f"round {rnd} failed: no valid reply from the {len(strategy.sampled)} sampled clients ({what}); "
                "the model was left unchanged")
    quorum = [f for f in strategy.failures if f.partition_id is None and f.kind == "quorum"]
    if quorum:
        return f"round {rnd} failed: {quorum[0].reason} ({what or 'no client failure recorded'})"
    refused = [f for f in strategy.failures if f.partition_id is None and f.kind == "aggregation"]
    if refused and not strategy.aggregation_may_skip:
        return (f"round {rnd} failed: {strategy.name} refused to aggregate the {len(strategy.last_updates)} valid "
                f"replies ({refused[0].reason}); the model was left unchanged")
    return None


def _checkpoint(rec: RunRecorder, rnd: int, arrays: ArrayRecord, strategy: FedSimStrategy, privacy: Any,
                grid: Grid) -> None:
    extra: dict[str, Any] = {"privacy": privacy.state_dict()} if privacy is not None else {}
    states = None
    export = getattr(grid, "export_state", None)  # the local engine: every node's context.state
    if export is not None:
        states, dead = export()
        extra["grid"] = {"dead": dead}
    rec.checkpoint(rnd, list(arrays.keys()), [a.numpy() for a in arrays.values()], strategy.state_dict(), extra,
                   client_states=states)


def _restore(grid: Grid, scenario: Scenario, out_dir: str | Path, strategy: FedSimStrategy, privacy: Any,
             initial: ArrayRecord) -> tuple[ArrayRecord, int]:
    """Load the latest checkpoint of ``out_dir`` into the strategy, the ledger and the grid's nodes;
    return the model and the checkpoint's round. Refuses (typed errors) anything it cannot restore."""
    restore = getattr(grid, "restore_state", None)
    if restore is None:
        raise ConfigError("run.engine", f"resume restores every node's context.state, which only the local engine "
                          f"can do, not '{scenario.run.engine}'", "resume the run with run.engine = \"local\"")
    ck = resume_point(out_dir, scenario)
    k, rounds = int(ck["meta"]["round"]), scenario.run.rounds
    if k >= rounds:
        raise CheckpointError(f"{out_dir} already finished all {rounds} rounds; there is nothing to resume",
                              "start a new run to train further")
    keys = list(initial.keys())
    if ck["meta"]["keys"] != keys:
        raise CheckpointError(f"the checkpoint's model keys differ from the scenario's model ({ck['meta']['keys'][:3]}"
                              f" vs {keys[:3]})", "resume only the scenario that wrote the run")
    for key, ref, got in zip(keys, initial.values(), ck["model"]):
        if tuple(got.shape) != tuple(ref.shape) or str(got.dtype) != ref.dtype:
            raise CheckpointError(f"checkpoint array '{key}' is {got.dtype}{list(got.shape)}, the model needs "
                                  f"{ref.dtype}{list(ref.shape)}", "resume only the scenario that wrote the run")
    try:
        strategy.load_state_dict(ck["strategy"])
        if privacy is not None:
            if "privacy" not in ck["meta"]:
                raise KeyError("privacy")
            privacy.load_state_dict(ck["meta"]["privacy"])
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise CheckpointError(f"the checkpoint of round {k} lacks or garbles state the run needs "
                              f"({type(err).__name__}: {err})", "resume only an intact run directory") from None
    restore(ck["clients"], list(ck["meta"].get("grid", {}).get("dead", [])))
    return ArrayRecord({key: from_numpy(a) for key, a in zip(keys, ck["model"])}), k


def _outcome(strategy: FedSimStrategy) -> RoundOutcome:
    return RoundOutcome(sampled=list(strategy.sampled), participants=[u.partition_id for u in strategy.last_updates],
                        metrics={u.partition_id: dict(u.metrics) for u in strategy.last_updates})


def _client_records(rnd: int, strategy: FedSimStrategy, wire: dict[int, tuple[int, int]] | None = None
                    ) -> list[dict[str, Any]]:
    out = []
    for u in strategy.last_updates:
        private = ("partition-id", "num-examples", "label-counts")  # label counts are released only via DP
        out.append({"round": rnd, "client": u.partition_id, "node_id": u.node_id, "status": "ok",
                    "num_examples": u.num_examples, **{k: v for k, v in u.metrics.items() if k not in private},
                    **client_fields(wire or {}, u.node_id)})
    out += [{**f.to_json(), **(client_fields(wire or {}, f.node_id) if f.partition_id is not None else {})}
            for f in strategy.failures]
    return sorted(out, key=lambda r: (r["client"] is None, r["client"] if r["client"] is not None else 0))


def build_server_app(scenario: Scenario | None = None, out_dir: str | Path | None = None,
                     engine: str | None = None, on_round: RoundCallback | None = None,
                     result: dict[str, Any] | None = None, resume: bool = False,
                     client_app: str | None = None) -> ServerApp:
    """The ServerApp. With ``scenario=None`` it reads the scenario, its overrides and the output
    directory from the run config (``scenario``, ``overrides``, ``out-dir``: :mod:`fedsim.app_config`),
    as under ``flwr run``; a key it cannot use stops the run before round 1 with a
    :class:`~fedsim.errors.ConfigError` naming ``run-config.<key>``, logged on one line first."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedsim.app_config import out_dir_from_run_config, scenario_from_run_config

        try:
            scen = scenario if scenario is not None else resolve(scenario_from_run_config(context.run_config))
            given = out_dir_from_run_config(context.run_config) if out_dir is None else ""
            # a run-config out-dir is an explicit --out: new or empty, never a directory holding files
            out = out_dir or (_prepare_run_config_out(given) if given else default_run_dir(scen))
        except FedSimError as err:
            _LOG.error("fedsim: %s: %s", type(err).__name__, err)
            raise
        name = engine or (scen.run.engine if scenario is not None or scen.run.engine == "deploy" else "flwr-run")
        _LOG.info("fedsim: scenario '%s', %d rounds, run directory %s", scen.run.name, scen.run.rounds,
                  Path(out).resolve())
        summary = run_federation(grid, scen, out, engine=name, on_round=on_round, resume=resume,
                                 client_app=client_app)
        _LOG.info("fedsim: %s; summary in %s", summary.get("status"), Path(summary["run_dir"]) / "summary.json")
        if result is not None:
            result.update(summary)

    return app


def _prepare_run_config_out(path: str) -> Path:
    try:
        return prepare_out_dir(path)
    except RunDirectoryError as err:
        raise RunDirectoryError(err.message.replace("--out", "run-config out-dir", 1),
                                "pass a new or empty directory: --run-config 'out-dir=\"runs/new\"'") from None


def default_run_dir(scenario: Scenario) -> Path:
    """Create and return a new run directory ``run.output/<safe run.name>-<time>-s<seed>[-N]``
    (exclusive creation: see :func:`fedsim.results.create_run_dir`)."""
    return create_run_dir(scenario.run.output, scenario.run.name, scenario.run.seed)
