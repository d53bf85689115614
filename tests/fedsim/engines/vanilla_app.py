"""A vanilla Flower ClientApp, written as Flower's quickstart-pytorch writes one: no fedsim import.

It reads ``partition-id`` / ``num-partitions`` from ``context.node_config``, takes every
``num-partitions``-th sample of scikit-learn's digits from its partition id on, trains a
64-16-10 MLP (the state-dict keys of fedsim's ``mlp`` with ``hidden = [16]``) for a few SGD steps
and replies with ``arrays`` and ``metrics`` (``num-examples``, ``train_loss``). It answers nothing
but ``train``: a ``query.*`` message would get Flower's error reply.

:func:`named_app` is the zero-argument factory a scenario names (``run.client_app =
"tests.fedsim.engines.vanilla_app:named_app"``): the same app, which also echoes its ``partition-id``
in its metrics (fedsim then checks it against the partition the server gave that node: a wrong node
directory makes the reply ``invalid``) and records every message it gets, a ``query.whoami`` included
(which it still refuses), in :data:`SEEN` and, when ``VANILLA_APP_LOG`` is set, as a line of that file
(the deployment's ClientApp processes).
"""

from __future__ import annotations

import os

#: ``(message type, partition id)`` of every message :func:`named_app`'s apps got in this process
SEEN: list[tuple[str, int]] = []


def named_app():
    """The vanilla app as a scenario names it (see the module docstring)."""
    return build_vanilla_app(SEEN, echo_partition=True, log=os.environ.get("VANILLA_APP_LOG") or None)


def _record(seen: list | None, log: str | None, kind: str, pid: int) -> None:
    if seen is not None:
        seen.append((kind, pid))
    if log:
        with open(log, "a") as fh:
            fh.write(f"{kind} {pid}\n")


def build_vanilla_app(seen: list | None = None, steps: int = 3, echo_partition: bool = False, log: str | None = None):
    """The app; ``seen`` (in-process engines only) collects ``(message type, partition id)``; with ``log``
    (a file path) each message also appends a line; ``echo_partition`` adds ``partition-id`` to the reply's
    metrics. Only these two options register a ``query.whoami`` handler, which records and then refuses."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    if echo_partition or log:
        @app.query("whoami")
        def whoami(msg, context):
            _record(seen, log, msg.metadata.message_type, int(context.node_config["partition-id"]))
            raise ValueError("a vanilla ClientApp answers only train")

    @app.train()
    def train(msg, context):
        import numpy as np
        import torch
        from sklearn.datasets import load_digits

        torch.set_num_threads(1)
        pid = int(context.node_config["partition-id"])
        parts = int(context.node_config["num-partitions"])
        _record(seen, log, msg.metadata.message_type, pid)
        digits = load_digits()
        x = torch.tensor(digits.data[pid::parts] / 16.0, dtype=torch.float32)
        y = torch.tensor(digits.target[pid::parts], dtype=torch.long)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 10))
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rng = np.random.default_rng(pid)
        loss = torch.tensor(0.0)
        for _ in range(steps):
            idx = torch.as_tensor(rng.choice(len(y), size=min(32, len(y)), replace=False))
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        metrics = {"num-examples": len(y), "train_loss": float(loss.detach())}
        if echo_partition:
            metrics["partition-id"] = pid
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    return app
