"""The fedsim ClientApp: one Flower ``ClientApp`` for every engine (local, Ray, deployment).

Actions
-------
``train``            local training with the plugin loop (the ``fit`` task)
``train.<task>``     a strategy-specific client task registered in
                     :data:`fedsim.clients.tasks.CLIENT_TASKS`
``evaluate``         loss/accuracy of the received model on the client's own data
``query.whoami``     the node's partition id (the server maps random node ids to partitions once)

The app is built after the registries are complete (the entry points resolve the scenario first,
``fedsim.catalog.resolve``); each action holds its task function itself, so a process that
unpickles the app (a Ray actor) gets the task's module imported with it.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.clients.runtime import runtime_for
from fedsim.clients.tasks import CLIENT_TASKS, ClientCall, TaskFn
from fedsim.clients.trainer import evaluate
from fedsim.config import Scenario


def build_client_app(scenario: Scenario | None = None) -> ClientApp:
    """The ClientApp; with ``scenario=None`` it reads the scenario TOML from ``run_config``.

    Every task registered in :data:`CLIENT_TASKS` when it is built becomes the action ``train.<task>``.
    """
    app = ClientApp()

    def _call(msg: Message, context: Context) -> ClientCall:
        text = str(context.run_config.get("scenario", "")) if scenario is None else None
        return ClientCall(runtime_for(scenario, text), msg, context)

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
