"""The fedsim ClientApp: one Flower ``ClientApp`` for every engine (local, Ray, deployment).

Actions
-------
``train``            local training with the plugin loop (the ``fit`` task)
``train.<task>``     a strategy-specific client task registered in
                     :data:`fedsim.clients.tasks.CLIENT_TASKS`
``evaluate``         loss/accuracy of the received model on the client's own data
``query.whoami``     the node's partition id, for a deployment's server that does not know it (the
                     local and Ray engines, ``flwr run`` simulations and ``fedsim deploy`` with node
                     authentication know every node's partition and never send it)

Another ClientApp as the clients (``run.client_app = "module:object"``, :func:`load_client_app`): the
local and Ray engines run that app itself; where Flower loads fedsim's app by name (``flwr run``, the
deployment engine), fedsim's app hands every message to it as it is (:class:`DelegatingClientApp`), so
the app components in ``pyproject.toml`` stay fixed. fedsim's client side (plugins, client tasks,
client-side faults, label noise) then does not run, so a scenario that asks for it is refused before
the run (:func:`check_foreign_app`).

The app is built after the registries are complete (the entry points resolve the scenario first,
``fedsim.catalog.resolve``); each action holds its task function itself, so a process that
unpickles the app (a Ray actor) gets the task's module imported with it.

Flower's Ray backend pickles the ClientApp with every message. The app holds its scenario through a
:class:`ScenarioHandle`, which pickles as the scenario's TOML text and unpickles to one shared
handle per text and process, so an actor keeps one client runtime (model, resident client data)
across all the virtual clients it serves instead of rebuilding it per message.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

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


FEDSIM_APP = "fedsim"  #: what ``summary.json``'s ``client_app`` says when fedsim's own ClientApp served


@functools.lru_cache(maxsize=8)
def load_client_app(name: str) -> ClientApp:
    """The ClientApp ``run.client_app`` names (``module:object``): a ``flwr.clientapp.ClientApp``, or a
    zero-argument factory returning one (called once per process). A name that cannot be imported or
    does not give a ClientApp is a :class:`~fedsim.errors.ConfigError` naming ``run.client_app``."""
    from fedsim.errors import ConfigError
    from fedsim.registry import import_object

    obj = import_object(name, "run.client_app")
    if not isinstance(obj, ClientApp) and callable(obj) and not isinstance(obj, type):
        try:
            obj = obj()
        except Exception as err:  # noqa: BLE001 - the user's factory failed
            raise ConfigError("run.client_app", f"the factory '{name}' raised {type(err).__name__}: {err}",
                              "fix the factory so that calling it with no argument returns a ClientApp") from None
    if not isinstance(obj, ClientApp):
        raise ConfigError("run.client_app", f"'{name}' gives a {type(obj).__name__}, not a flwr.clientapp.ClientApp",
                          "name a ClientApp object, or a function taking no argument that returns one")
    return obj


def describe_client_app(app: Any, scenario: Scenario) -> str:
    """What ``summary.json`` records as ``client_app``: the scenario's ``run.client_app`` when it names the
    app that serves, ``"fedsim"`` for fedsim's own, else the given object's class (passed from Python)."""
    if app is None:
        return scenario.run.client_app or FEDSIM_APP
    if scenario.run.client_app and app is load_client_app(scenario.run.client_app):
        return scenario.run.client_app
    return f"python object ({type(app).__module__}.{type(app).__qualname__})"


def check_foreign_app(scenario: Scenario, what: str) -> None:
    """Refuse (:class:`~fedsim.errors.ConfigError`, ``run.client_app``) a scenario that asks fedsim's client
    side for something another ClientApp (``what``) would not do: client plugins (DP-SGD included), a
    strategy's own client task, client-side faults or label noise. Its results would claim them."""
    from fedsim.errors import ConfigError
    from fedsim.faults import OMNISCIENT_ATTACKS
    from fedsim.strategies.base import STRATEGIES

    strategy = STRATEGIES.get(scenario.strategy.name, key="strategy.name")
    plugins = list(strategy.plugin_names(scenario))
    asks = [f"client plugins {plugins}"] if plugins else []
    action = getattr(strategy, "train_action", "train")
    if action != "train":
        asks.append(f"strategy '{scenario.strategy.name}' sends '{action}' messages (a fedsim client task)")
    f = scenario.faults
    client_side = {"faults.crash_clients": bool(f.crash_clients), "faults.dropout": f.dropout > 0,
                   "faults.stragglers": f.stragglers > 0, "data.label_noise": scenario.data.label_noise > 0,
                   "faults.attack": f.attack != "none" and f.attack not in OMNISCIENT_ATTACKS}
    asks += [key for key, on in client_side.items() if on]
    if asks:
        raise ConfigError("run.client_app", f"{what} serves as the clients, so fedsim's client side does not run, "
                          f"yet the scenario asks it for: {'; '.join(asks)}", "drop those settings, or leave "
                          "run.client_app empty (and pass no client_app) to use fedsim's ClientApp")


class DelegatingClientApp(ClientApp):
    """fedsim's ClientApp that, when the scenario it serves names another ClientApp (``run.client_app``),
    hands every message to that app as it is; ``named(context)`` gives that name ("" = fedsim's own)."""

    def __init__(self, named) -> None:
        super().__init__()
        self._named = named

    def __call__(self, message: Message, context: Context) -> Message:
        name = self._named(context)
        if name:
            return load_client_app(name)(message=message, context=context)
        return super().__call__(message, context)


def build_client_app(scenario: Scenario | None = None) -> ClientApp:
    """The ClientApp; with ``scenario=None`` it reads the scenario TOML from ``run_config``.

    Every task registered in :data:`CLIENT_TASKS` when it is built becomes the action ``train.<task>``.
    A scenario naming another ClientApp (``run.client_app``) gets every message passed to that app.
    """
    handle = ScenarioHandle(scenario) if scenario is not None else None

    def _named(context: Context) -> str:
        if handle is None:
            from fedsim.app_config import scenario_text

            return handle_for_text(scenario_text(context.run_config)).scenario.run.client_app
        return handle.scenario.run.client_app

    app = DelegatingClientApp(_named)

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
