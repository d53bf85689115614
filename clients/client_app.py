"""The fedsim ClientApp: one Flower ``ClientApp`` for every engine (local, Ray, deployment).

Actions
-------
``train``            local training with the plugin loop (the ``fit`` task)
``train.<task>``     a strategy-specific client task registered in :data:`CLIENT_TASKS`
``evaluate``         loss/accuracy of the received model on the client's own data
``query.whoami``     the node's partition id (the server maps random node ids to partitions once)

Every reply echoes ``partition-id`` so the server can attribute results and failures.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.clients.plugin_api import PluginStack, build_plugins, to_numpy_state
from fedsim.clients.runtime import ClientRuntime, runtime_for
from fedsim.clients.trainer import TrainResult, evaluate, train_local
from fedsim.config import Scenario
from fedsim.errors import ClientFailure
from fedsim.registry import Registry
from fedsim.rng import numpy_rng, torch_generator

TaskFn = Callable[["ClientCall"], RecordDict]
CLIENT_TASKS: Registry = Registry("client task")


class ClientDropout(ClientFailure):
    """Injected by the fault model: the client left the round (simulated dropout)."""


class InjectedCrash(ClientFailure):
    """Injected by the fault model: the ClientApp raises (``faults.crash_clients``)."""


class ClientCall:
    """What a task needs: the runtime, the message, the context and this client's identity."""

    def __init__(self, runtime: ClientRuntime, msg: Message, context: Context) -> None:
        self.runtime = runtime
        self.msg = msg
        self.context = context
        self.scenario: Scenario = runtime.scenario
        self.partition_id = int(context.node_config.get("partition-id", 0))
        self.data_path = str(context.node_config.get("data-path", "") or "")
        cfg = msg.content.config_records.get("config")
        self.config: dict[str, Any] = dict(cfg) if cfg is not None else {}
        self.round = int(self.config.get("server-round", 0))

    # -- model / data helpers -------------------------------------------------------------------
    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.runtime.client_data(self.partition_id, self.data_path or None)

    def load_global(self) -> torch.nn.Module:
        """Load the received arrays into the process's model (no rebuild) and return it."""
        arrays = self.msg.content.array_records["arrays"]
        model = self.runtime.model
        model.load_state_dict(self.runtime.decoded(arrays), strict=True)
        return model

    def rng(self, purpose: str) -> torch.Generator:
        return torch_generator(self.scenario.run.seed, purpose, self.round, self.partition_id)

    def plugins(self) -> PluginStack:
        c = self.scenario.client
        from fedsim.strategies.base import STRATEGIES

        needed = STRATEGIES.get(self.scenario.strategy.name, key="strategy.name").client_plugins
        names = list(c.plugins) + [p for p in needed if p not in c.plugins]
        if self.scenario.privacy.mechanism == "dp-sgd" and "dp_sgd" not in names:
            names.append("dp_sgd")
        stack = build_plugins(names, lambda n: dp_sgd_settings(self.scenario) if n == "dp_sgd"
                              else c.plugin_settings(n))
        for p in stack.plugins:
            saved = self.context.state.config_records.get(f"plugin.{p.name}")
            arrays = self.context.state.array_records.get(f"plugin.{p.name}")
            if saved is not None or arrays is not None:
                d: dict[str, Any] = dict(saved or {})
                d.update({k: v.numpy() for k, v in (arrays or {}).items()})
                p.load_state_dict(d)
        return stack

    def save_plugins(self, stack: PluginStack) -> None:
        for p in stack.plugins:
            state = to_numpy_state(p.state_dict())
            arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
            scalars = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
            if scalars:
                self.context.state[f"plugin.{p.name}"] = ConfigRecord(scalars)
            if arrays:
                self.context.state[f"plugin.{p.name}"] = ArrayRecord({k: _arr(v) for k, v in arrays.items()})

    def reply_metrics(self, **values: float | int) -> MetricRecord:
        out: dict[str, float | int] = {"partition-id": self.partition_id}
        for k, v in values.items():
            out[k] = int(v) if isinstance(v, (bool, np.integer)) else (float(v) if not isinstance(v, int) else v)
        return MetricRecord(out)

    def apply_faults(self) -> None:
        f = self.scenario.faults
        if self.partition_id in f.crash_clients and (not f.crash_rounds or self.round in f.crash_rounds):
            if f.crash_mode == "exit":
                if self.scenario.run.engine == "deploy":
                    os._exit(1)  # the ClientApp process dies as if killed: no reply, no traceback
                if self.scenario.run.engine == "local":
                    raise SystemExit(1)  # the local grid treats the node as dead
            raise InjectedCrash(f"client {self.partition_id}: injected crash in round {self.round}")
        if f.dropout > 0 and numpy_rng(self.scenario.run.seed, "dropout", self.round, self.partition_id).random() < f.dropout:
            raise ClientDropout(f"client {self.partition_id}: dropped out of round {self.round}")

    def simulated_time(self, steps: int) -> float:
        """Simulated compute time: one unit per local step, times the slowdown for a straggler."""
        f = self.scenario.faults
        slow = f.stragglers > 0 and numpy_rng(self.scenario.run.seed, "straggler", self.round,
                                              self.partition_id).random() < f.stragglers
        return float(steps) * (f.straggler_slowdown if slow else 1.0)


def dp_sgd_settings(scenario: Scenario) -> dict[str, Any]:
    """The ``dp_sgd`` plugin's settings come from the ``[privacy]`` section."""
    p = scenario.privacy
    return {"noise_multiplier": p.noise_multiplier, "clip_norm": p.clip_norm, "sample_rate": p.sample_rate,
            "accountant": p.accountant, "delta": p.delta, "secure_rng": p.secure_rng,
            **scenario.client.plugin_settings("dp_sgd")}


def _arr(v: np.ndarray):
    from fedsim.wire import from_numpy

    return from_numpy(v)


def state_to_arrays(model: torch.nn.Module) -> ArrayRecord:
    """The model's full state dict (buffers included) as an ArrayRecord of copied NumPy arrays."""
    return ArrayRecord({k: _arr(v.detach().cpu().numpy().copy()) for k, v in model.state_dict().items()})


def corrupt(call: ClientCall, arrays: ArrayRecord) -> ArrayRecord:
    """Byzantine behaviour for clients listed in ``faults.byzantine_clients``."""
    f = call.scenario.faults
    if f.attack == "none" or call.partition_id not in f.byzantine_clients:
        return arrays
    glob = call.msg.content.array_records["arrays"]
    rng = numpy_rng(call.scenario.run.seed, "attack", call.round, call.partition_id)
    out = {}
    for k, a in arrays.items():
        w, g = a.numpy(), glob[k].numpy()
        if not np.issubdtype(w.dtype, np.floating):
            out[k] = _arr(w)
            continue
        if f.attack == "sign_flip":
            w = g - (w - g)
        elif f.attack == "gaussian":
            w = g + rng.normal(0.0, 1.0, size=w.shape).astype(w.dtype)
        elif f.attack == "nan":
            w = np.full_like(w, np.nan)
        out[k] = _arr(np.asarray(w))
    return ArrayRecord(out)


@CLIENT_TASKS.register("fit")
def fit(call: ClientCall) -> RecordDict:
    """Plain local training: load the global model, run the plugin loop, return the new weights."""
    model = call.load_global()
    x, y = call.data()
    stack = call.plugins()
    rounds = max(call.scenario.run.rounds, 1)
    res: TrainResult = train_local(
        model, x, y, call.scenario.client, stack, round=call.round, client_id=call.partition_id,
        seed=call.scenario.run.seed, rng=call.rng("train"), config=call.config,
        progress=(call.round - 1) / rounds,
    )
    call.save_plugins(stack)
    return fit_reply(call, corrupt(call, state_to_arrays(model)), y, res.num_examples, res.steps, res.metrics)


def fit_reply(call: ClientCall, arrays: ArrayRecord, y: torch.Tensor, num_examples: int, steps: int,
              metrics: dict[str, float]) -> RecordDict:
    """The reply of a plain local round (shared by ``fit`` and the vectorised local path)."""
    record = call.reply_metrics(**{"num-examples": num_examples, "steps": steps,
                                   "sim-time": call.simulated_time(steps)}, **metrics)
    if call.scenario.privacy.mechanism != "none" and call.scenario.privacy.release_counters:
        # for the server's DP label-histogram counter only (never written to the logs)
        record["label-counts"] = [int(c) for c in torch.bincount(y, minlength=call.runtime.num_classes).tolist()]
    return RecordDict({"arrays": arrays, "metrics": record})


def build_client_app(scenario: Scenario | None = None) -> ClientApp:
    """The ClientApp; with ``scenario=None`` it reads the scenario TOML from ``run_config``.

    Every task in :data:`CLIENT_TASKS` becomes the named action ``train.<task>``.
    """
    from fedsim.catalog import load_all

    load_all()
    app = ClientApp()

    def _call(msg: Message, context: Context) -> ClientCall:
        text = str(context.run_config.get("scenario", "")) if scenario is None else None
        return ClientCall(runtime_for(scenario, text), msg, context)

    def _run(task: str, msg: Message, context: Context) -> Message:
        call = _call(msg, context)
        call.apply_faults()
        content = CLIENT_TASKS.get(task, key="message_type")(call)
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _run("fit", msg, context)

    for name in CLIENT_TASKS.names():
        if name != "fit":
            app.train(name)(lambda msg, context, _n=name: _run(_n, msg, context))

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        call = _call(msg, context)
        model = call.load_global()
        x, y = call.data()
        m = evaluate(model, x, y)
        metrics = call.reply_metrics(**{"num-examples": int(x.shape[0]), "eval_loss": m["loss"],
                                        "eval_accuracy": m["accuracy"]})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    @app.query("whoami")
    def whoami(msg: Message, context: Context) -> Message:
        pid = int(context.node_config.get("partition-id", 0))
        n = int(context.node_config.get("num-partitions", 0))
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid, "num-partitions": n})}),
                       reply_to=msg)

    return app
