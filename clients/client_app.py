"""The fedsim ClientApp: one Flower ``ClientApp`` for every engine (local, Ray, deployment).

Actions
-------
``train``            local training with the plugin loop (the ``fit`` task)
``train.<task>``     a strategy-specific client task registered in
                     :data:`fedsim.clients.tasks.CLIENT_TASKS`
``evaluate``         loss/accuracy of the received model on the client's own data
``query.whoami``     the node's partition id, for a real deployment's server (the local and Ray
                     engines know every node's partition and never send it)

The app is built after the registries are complete (the entry points resolve the scenario first,
``fedsim.catalog.resolve``); each action holds its task function itself, so a process that
unpickles the app (a Ray actor) gets the task's module imported with it.

Flower's Ray backend pickles the ClientApp with every message. The app holds its scenario through a
:class:`ScenarioHandle`, which pickles as the scenario's TOML text and unpickles to one shared
handle per text and process, so an actor keeps one client runtime (model, resident client data)
across all the virtual clients it serves instead of rebuilding it per message.
"""

from __future__ import annotations

import threading

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.clients.runtime import runtime_for
from fedsim.clients.tasks import CLIENT_TASKS, ClientCall, TaskFn
from fedsim.clients.trainer import evaluate
from fedsim.config import Scenario, dumps_scenario, loads_scenario


class ScenarioHandle:
    """A scenario that pickles as its TOML text and unpickles to this process's one handle for it."""

    def __init__(self, scenario: Scenario, text: str | None = None) -> None:
        self.scenario = scenario
        self.text = text  # made on first pickling (the local engine never pickles the app)

    def __reduce__(self):
        if self.text is None:
            self.text = dumps_scenario(self.scenario)
        return (handle_for_text, (self.text,))


_HANDLES: dict[str, ScenarioHandle] = {}
_HANDLES_LOCK = threading.Lock()


def handle_for_text(text: str) -> ScenarioHandle:
    """The process's handle for a scenario's TOML text (the last few kept)."""
    with _HANDLES_LOCK:
        handle = _HANDLES.get(text)
        if handle is None:
            if len(_HANDLES) >= 4:
                _HANDLES.pop(next(iter(_HANDLES)))
            handle = _HANDLES[text] = ScenarioHandle(loads_scenario(text), text)
        return handle


def build_client_app(scenario: Scenario | None = None) -> ClientApp:
    """The ClientApp; with ``scenario=None`` it reads the scenario TOML from ``run_config``.

    Every task registered in :data:`CLIENT_TASKS` when it is built becomes the action ``train.<task>``.
    """
    app = ClientApp()
    handle = ScenarioHandle(scenario) if scenario is not None else None

    def _call(msg: Message, context: Context) -> ClientCall:
        if handle is None:
            from fedsim.app_config import scenario_text  # the run config's scenario + overrides, as the server's

            return ClientCall(runtime_for(None, scenario_text(context.run_config)), msg, context)
        return ClientCall(runtime_for(handle.scenario), msg, context)

    def _run(task: TaskFn, msg: Message, context: Context) -> Message:
        call = _call(msg, context)
        call.apply_faults()
        return Message(task(call), reply_to=msg)

    fit = CLIENT_TASKS.get("fit")

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _run(fit, msg, context)

    for name, task in CLIENT_TASKS.items():
        if name != "fit":
            app.train(name)(lambda msg, context, _t=task: _run(_t, msg, context))

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
