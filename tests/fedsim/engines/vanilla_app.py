"""A vanilla Flower ClientApp, written as Flower's quickstart-pytorch writes one: no fedsim import.

It reads ``partition-id`` / ``num-partitions`` from ``context.node_config``, takes every
``num-partitions``-th sample of scikit-learn's digits from its partition id on, trains a
64-16-10 MLP (the state-dict keys of fedsim's ``mlp`` with ``hidden = [16]``) for a few SGD steps
and replies with ``arrays`` and ``metrics`` (``num-examples``, ``train_loss``). It answers nothing
but ``train``: a ``query.*`` message would get Flower's error reply.
"""

from __future__ import annotations


def build_vanilla_app(seen: list | None = None, steps: int = 3):
    """The app; ``seen`` (in-process engines only) collects ``(message type, partition id)``."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        import numpy as np
        import torch
        from sklearn.datasets import load_digits

        torch.set_num_threads(1)
        pid = int(context.node_config["partition-id"])
        parts = int(context.node_config["num-partitions"])
        if seen is not None:
            seen.append((msg.metadata.message_type, pid))
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
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": len(y), "train_loss": float(loss.detach())})})
        return Message(content, reply_to=msg)

    return app
