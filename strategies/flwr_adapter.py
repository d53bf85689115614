"""Flower's own strategies (``strategy.name = "flwr:FedAvg"``) and any ``flwr.serverapp.strategy.Strategy``
named ``module:object``, run with fedsim's clients and round loop.

:func:`flower_strategy_class` makes a :class:`~fedsim.strategies.base.FedSimStrategy` subclass around the
Flower class. The Flower strategy samples the nodes and aggregates; fedsim adds what its clients and its
records need and Flower leaves out:

* the train config keys fedsim's ``fit`` task reads (``plugins``; Flower sets ``server-round``);
* nodes mapped to partitions (only nodes that hold one are offered to Flower), a deadline on the wait for
  nodes (``QuorumError``), and Flower's ``random.sample`` drawn from the root seed (the global
  ``random`` state is restored afterwards), so a run is reproducible;
* every reply validated as for fedsim's strategies before Flower sees it (invalid, error and missing
  replies are recorded in ``clients.jsonl`` and left out), the quorum check, omniscient attacks, DP-SGD
  reply checks, and fedsim's per-round metrics.

Constructor keywords with a number, string or boolean default become ``[strategy]`` options
(e.g. ``eta`` for ``flwr:FedAdam``); ``fraction_train``, ``fraction_evaluate`` and ``min_train_clients``
map to Flower's sampling keywords. Refused before the run: Flower strategies whose clients must do
something fedsim's clients do not (FedProx's ``proximal-mu``, the XGBoost strategies, client-side DP),
keywords without a default a scenario cannot give (QFedAvg's ``client_learning_rate``, the DP wrappers'
``strategy``), and the keywords fixed by fedsim's message protocol or without effect on the server.
A run with a Flower strategy cannot be resumed: its state lives in Python objects fedsim does not
checkpoint. Reference: Beutel et al., "Flower: A Friendly Federated Learning Framework", 2020.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import random
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim import faults
from fedsim.clients.tasks import PLUGINS_KEY
from fedsim.errors import CheckpointError
from fedsim.rng import derive_seed
from fedsim.strategies.base import FedSimStrategy
from fedsim.wire import to_numpy

#: Flower strategies that need a client doing more than fedsim's plain train task, and why
NEEDS_OTHER_CLIENTS = {
    "FedProx": "its proximal term ('proximal-mu') is added by the client; use strategy.name = \"fedprox\" "
               "(fedsim's FedProx with its client plugin)",
    "FedXgbBagging": "it exchanges XGBoost trees, not model arrays",
    "FedXgbCyclic": "it exchanges XGBoost trees, not model arrays",
    "DifferentialPrivacyClientSideFixedClipping": "clipping happens in a client mod fedsim's clients do not run; "
                                                  "use privacy.mechanism = \"dp-fedavg\"",
    "DifferentialPrivacyClientSideAdaptiveClipping": "clipping happens in a client mod fedsim's clients do not "
                                                     "run; use privacy.mechanism = \"dp-fedavg\"",
}
#: keywords fedsim sets itself: the message protocol of its clients, and the sampling keys of [strategy]
FIXED = {"weighted_by_key": "num-examples", "arrayrecord_key": "arrays", "configrecord_key": "config"}
SAMPLING = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes")
#: keywords a Flower strategy stores but never uses on the server (FedOpt's client learning rate)
NO_SERVER_EFFECT = {"eta_l": "client.lr sets the clients' learning rate"}


def flower_strategy_class(flower_cls: type, name: str) -> type[FedSimStrategy]:
    """A fedsim strategy class running ``flower_cls`` (a ``flwr.serverapp.strategy.Strategy`` subclass),
    registered nowhere; ``name`` is the scenario's ``strategy.name``. Raises ``TypeError`` saying why a
    class cannot run with fedsim's clients."""
    if not (isinstance(flower_cls, type) and issubclass(flower_cls, Strategy)):
        raise TypeError("not a flwr.serverapp.strategy.Strategy subclass")
    if flower_cls.__name__ in NEEDS_OTHER_CLIENTS:
        raise TypeError(f"Flower's {flower_cls.__name__} cannot run with fedsim's clients: "
                        f"{NEEDS_OTHER_CLIENTS[flower_cls.__name__]}")
    if inspect.isabstract(flower_cls):
        raise TypeError(f"{flower_cls.__qualname__} is abstract")
    fields = []
    for p in inspect.signature(flower_cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"{flower_cls.__qualname__} needs the constructor argument '{p.name}', which a scenario "
                            "cannot give")
        if p.name in FIXED or p.name in SAMPLING or p.name in NO_SERVER_EFFECT:
            continue
        if p.default is None or isinstance(p.default, (bool, int, float, str)):
            fields.append((p.name, Any, dataclasses.field(default=p.default)))
    options = dataclasses.make_dataclass(f"{flower_cls.__name__}Options", fields, frozen=True)
    return type(f"Flower{flower_cls.__name__}", (FlowerStrategy,),
                {"name": name, "Options": options, "flower_class": flower_cls, "__module__": __name__})


class FlowerStrategy(FedSimStrategy):
    """Base of the classes :func:`flower_strategy_class` makes; ``inner`` is the Flower strategy."""

    flower_class: ClassVar[type] = Strategy

    def __init__(self, scenario, options: Any | None = None) -> None:
        super().__init__(scenario, options)
        want = min(self.min_train_clients, self.num_partitions)
        kwargs: dict[str, Any] = {
            **FIXED, "fraction_train": self.fraction_train, "fraction_evaluate": self.fraction_evaluate,
            "min_train_nodes": want, "min_evaluate_nodes": want if self.fraction_evaluate > 0 else 0,
            "min_available_nodes": want, **dataclasses.asdict(self.options)}
        params = inspect.signature(self.flower_class.__init__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        with _flower_log_level(logging.ERROR):  # its constructor warns about fraction_evaluate = 0.0
            self.inner = self.flower_class(**kwargs)

    # ------------------------------------------------------------------ sampling, by Flower
    def _nodes(self, server_round: int, grid: Grid) -> tuple[Grid, dict[int, int]]:
        """A view of ``grid`` offering only nodes that hold a partition, and ``{node: partition}``."""
        by_pid = self.available(grid, min(self.min_train_clients, self.num_partitions))
        return _NodesView(grid, sorted(by_pid.values())), {node: pid for pid, node in by_pid.items()}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.server_round = server_round
        self.set_global(arrays)
        self.failures, self.last_updates = [], []
        view, pid_of = self._nodes(server_round, grid)
        cfg = ConfigRecord({**dict(config), PLUGINS_KEY: self.plugin_list})
        with _seeded_random(derive_seed(self.seed, "flwr-sample", server_round)), _flower_log_level(logging.WARNING):
            msgs = list(self.inner.configure_train(server_round, arrays, cfg, view))
        self.sampled = sorted(pid_of[m.metadata.dst_node_id] for m in msgs)
        self._sent = msgs
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates = self.collect(server_round, list(replies))
        updates = faults.apply_omniscient_attack(self, server_round, updates)
        self.last_updates = updates
        need = self.min_replies()
        if len(updates) < need:
            self.record_failure(server_round, None, "quorum", f"{len(updates)} valid replies < quorum {need}; "
                                "model left unchanged this round")
            return None, MetricRecord({"num-clients": len(updates), "quorum-failed": 1})
        sent = {m.metadata.dst_node_id: m for m in self._sent}
        # what Flower aggregates: the validated (and, for Byzantine clients, attacked) arrays
        checked = [Message(RecordDict({"arrays": self.to_record(u.arrays),
                                       "metrics": u.content.metric_records["metrics"]}),
                           reply_to=sent[u.node_id]) for u in updates]
        with _flower_log_level(logging.WARNING):  # Flower logs every round at INFO
            new, _ = self.inner.aggregate_train(server_round, checked)
        if new is None:
            self.record_failure(server_round, None, "aggregation", f"{self.name} returned no model")
            return None, MetricRecord({"num-clients": len(updates), "aggregation-failed": 1})
        self.current = [to_numpy(new[k]).astype(ref.dtype, copy=False) for k, ref in zip(self.keys, self.current)]
        return self.to_record(self.current), MetricRecord(self.train_metrics(updates))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self.server_round = server_round
        if self.fraction_evaluate <= 0:
            return []
        view, _ = self._nodes(server_round, grid)
        with _seeded_random(derive_seed(self.seed, "flwr-sample-evaluate", server_round)), \
                _flower_log_level(logging.WARNING):
            return list(self.inner.configure_evaluate(server_round, arrays, ConfigRecord(dict(config)), view))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = [r for r in replies if not r.has_error() and "metrics" in r.content.metric_records]
        if not good:
            return None
        with _flower_log_level(logging.WARNING):
            out = self.inner.aggregate_evaluate(server_round, good)
        return None if out is None else MetricRecord({k: v for k, v in out.items() if k != "partition-id"})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise CheckpointError(f"strategy '{self.name}' is Flower's: its state lives in Python objects fedsim does "
                              "not checkpoint, so a resumed run could not continue it exactly",
                              "start the run again with `fedsim run`, or use a fedsim strategy (`fedsim list`)")


class _NodesView(Grid):
    """``grid`` with ``get_node_ids`` limited to ``nodes`` (sorted: Flower's sample is then seeded only)."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._grid, attr)

    # the abstract Grid interface, delegated
    run = property(lambda self: self._grid.run)

    def set_run(self, run_id: int) -> None:
        self._grid.set_run(run_id)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


@contextlib.contextmanager
def _seeded_random(seed: int) -> Iterator[None]:
    """Python's global ``random`` seeded for the block (Flower samples with it), then put back."""
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)


@contextlib.contextmanager
def _flower_log_level(level: int) -> Iterator[None]:
    logger = logging.getLogger("flwr")
    saved = logger.level
    logger.setLevel(max(level, saved))
    try:
        yield
    finally:
        logger.setLevel(saved)
