"""Client tasks: what a client does for each kind of train message, apart from the Flower app.

A task is a function ``task(call: ClientCall) -> RecordDict`` registered in :data:`CLIENT_TASKS`;
the ClientApp (``fedsim.clients.client_app``) routes the action ``train`` to the ``fit`` task and
``train.<name>`` to the task ``<name>``. Strategies with a client protocol of their own (SemiFL,
signSGD, coded gradients) register their tasks beside the strategy; this module depends only on the
runtime, the schema, the fault model, the seeds and the wire format, never on a strategy.

Every reply echoes ``partition-id`` so the server can attribute results and failures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

import fedsim.clients.plugins  # noqa: F401  (fills the plugin registry)
from fedsim import faults
from fedsim.clients.plugin_api import Event, PluginStack, build_plugins, to_numpy_state
from fedsim.clients.runtime import ClientRuntime
from fedsim.clients.trainer import TrainResult, train_local
from fedsim.config import Scenario
from fedsim.errors import ConfigError
from fedsim.registry import Registry
from fedsim.rng import torch_generator
from fedsim.sign_codec import CODEC_RECORD, MARKER_PREFIX, encode_arrays
from fedsim.wire import from_numpy, state_to_arrays, to_numpy

TaskFn = Callable[["ClientCall"], RecordDict]
CLIENT_TASKS: Registry = Registry("client task")

#: train-config key listing the client plugins to run, comma-separated (sent by the strategy)
PLUGINS_KEY = "plugins"
#: ``context.state`` record naming the plugins that have already met this client (``Event.INIT`` fired)
INITIALISED_KEY = "plugins.initialised"


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
        """This client's data; for a train message of a label-flipping Byzantine client, its labels
        flipped (``fedsim.faults.flip_labels``; evaluation replies stay honest)."""
        x, y = self.runtime.client_data(self.partition_id, self.data_path or None)
        if self.msg.metadata.message_type.startswith("train"):
            y = faults.flip_labels(self.scenario, self.partition_id, y, self.runtime.num_classes)
        return x, y

    def load_global(self) -> torch.nn.Module:
        """Load the received arrays into the process's model (no rebuild) and return it."""
        arrays = self.msg.content.array_records["arrays"]
        model = self.runtime.model
        model.load_state_dict(self.runtime.decoded(arrays), strict=True)
        return model

    def rng(self, purpose: str) -> torch.Generator:
        return torch_generator(self.scenario.run.seed, purpose, self.round, self.partition_id)

    def probe_rng(self, stack: PluginStack) -> torch.Generator | None:
        """The probes' generator (seeded per run, purpose, round and client), made only when a plugin of
        ``stack`` probes (deriving a seed costs about as much as a small client's training step)."""
        return self.rng("probe") if stack.has(Event.PROBE) else None

    def progress_span(self) -> float:
        """The share of the federated run one round spans (1 / run.rounds)."""
        return 1.0 / max(self.scenario.run.rounds, 1)

    def progress(self) -> float:
        """Where the federated run stands when this round starts (0..1)."""
        return min(max(self.round - 1, 0) * self.progress_span(), 1.0)

    def plugin_names(self) -> list[str]:
        """The plugins the server asked for (scenario plugins, the strategy's, DP-SGD's)."""
        raw = self.config.get(PLUGINS_KEY)
        if raw is None:
            raise ConfigError(f"config.{PLUGINS_KEY}", "the train message does not say which client plugins to run",
                              "send train messages through a fedsim strategy (FedSimStrategy.configure_train)")
        return [n for n in str(raw).split(",") if n]

    def plugins(self) -> PluginStack:
        """The plugin stack of this round, each plugin's state restored from ``context.state``."""
        stack = build_plugins(self.plugin_names(), lambda n: dp_sgd_settings(self.scenario) if n == "dp_sgd"
                              else self.scenario.client.plugin_settings(n))
        met = self.context.state.config_records.get(INITIALISED_KEY)
        known = set(str(met.get("names", "")).split(",")) if met is not None else set()
        stack.first_visit = {p.name for p in stack.plugins if p.name not in known}
        for p in stack.plugins:
            saved = self.context.state.config_records.get(f"plugin.{p.name}")
            arrays = self.context.state.array_records.get(f"plugin.{p.name}.arrays")
            if saved is not None or arrays is not None:
                d: dict[str, Any] = dict(saved or {})
                d.update({k: v.numpy() for k, v in (arrays or {}).items()})
                p.load_state_dict(d)
        return stack

    def save_plugins(self, stack: PluginStack) -> None:
        """Persist every plugin's state and which plugins have met this client (INIT fired)."""
        if not stack.plugins:
            return
        met = self.context.state.config_records.get(INITIALISED_KEY)
        known = {n for n in str(met.get("names", "")).split(",") if n} if met is not None else set()
        known |= {p.name for p in stack.plugins}
        self.context.state[INITIALISED_KEY] = ConfigRecord({"names": ",".join(sorted(known))})
        for p in stack.plugins:
            state = to_numpy_state(p.state_dict())
            arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
            scalars = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
            if scalars:
                self.context.state[f"plugin.{p.name}"] = ConfigRecord(scalars)
            if arrays:
                self.context.state[f"plugin.{p.name}.arrays"] = ArrayRecord(
                    {k: from_numpy(v) for k, v in arrays.items()})

    def reply_metrics(self, **values: float | int) -> MetricRecord:
        out: dict[str, float | int] = {"partition-id": self.partition_id}
        for k, v in values.items():
            out[k] = int(v) if isinstance(v, (bool, np.integer)) else (float(v) if not isinstance(v, int) else v)
        return MetricRecord(out)

    # -- the fault model (fedsim.faults) for this client and round -------------------------------
    def apply_faults(self) -> None:
        faults.inject_failure(self.scenario, self.round, self.partition_id)

    def simulated_time(self, steps: int) -> float:
        return faults.simulated_time(self.scenario, self.round, self.partition_id, steps)

    def attack_weights(self, arrays: ArrayRecord) -> ArrayRecord:
        """The model this client sends: its own, or a Byzantine client's corruption of it."""
        if not faults.is_byzantine(self.scenario, self.partition_id):
            return arrays
        received = self.msg.content.array_records["arrays"]
        out = faults.attack_weights(self.scenario, self.round, self.partition_id,
                                    {k: to_numpy(a) for k, a in arrays.items()},
                                    {k: to_numpy(received[k]) for k in arrays.keys()})
        return ArrayRecord({k: from_numpy(v) for k, v in out.items()})

    def attack_gradient(self, g: np.ndarray) -> np.ndarray:
        return faults.attack_gradient(self.scenario, self.round, self.partition_id, g)


def dp_sgd_settings(scenario: Scenario) -> dict[str, Any]:
    """The ``dp_sgd`` plugin's settings: from the ``[privacy]`` section only (one source of truth; a
    ``[client.dp_sgd]`` table is refused by the resolver)."""
    p = scenario.privacy
    return {"noise_multiplier": p.noise_multiplier, "clip_norm": p.clip_norm, "sample_rate": p.sample_rate,
            "accountant": p.accountant, "delta": p.delta, "secure_rng": p.secure_rng}


@CLIENT_TASKS.register("fit")
def fit(call: ClientCall) -> RecordDict:
    """Plain local training: load the global model, run the plugin loop, return the new weights."""
    model = call.load_global()
    x, y = call.data()
    stack = call.plugins()
    res: TrainResult = train_local(
        model, x, y, call.scenario.client, stack, round=call.round, client_id=call.partition_id,
        seed=call.scenario.run.seed, rng=call.rng("train"), config=call.config,
        progress=call.progress(), progress_span=call.progress_span(), probe_rng=call.probe_rng(stack),
    )
    call.save_plugins(stack)
    return fit_reply(call, call.attack_weights(state_to_arrays(model)), y, res.num_examples, res.steps, res.metrics)


def fit_reply(call: ClientCall, arrays: ArrayRecord, y: torch.Tensor, num_examples: int, steps: int,
              metrics: dict[str, float]) -> RecordDict:
    """The reply of a plain local round (shared by ``fit`` and the vectorised local path). Arrays that a
    plugin marked with a ``codec.sign1:<key>`` metric travel as 1-bit packed signs (``fedsim.sign_codec``)."""
    packed = [k[len(MARKER_PREFIX):] for k in metrics if k.startswith(MARKER_PREFIX)]
    metrics = {k: v for k, v in metrics.items() if not k.startswith(MARKER_PREFIX)}
    arrays, codec = encode_arrays(arrays, packed) if packed else (arrays, None)
    record = call.reply_metrics(**{"num-examples": num_examples, "steps": steps,
                                   "sim-time": call.simulated_time(steps)}, **metrics)
    if call.scenario.privacy.mechanism != "none" and call.scenario.privacy.release_counters:
        # for the server's DP label-histogram counter only (never written to the logs)
        record["label-counts"] = [int(c) for c in torch.bincount(y, minlength=call.runtime.num_classes).tolist()]
    return RecordDict({"arrays": arrays, "metrics": record, **({CODEC_RECORD: codec} if codec is not None else {})})
