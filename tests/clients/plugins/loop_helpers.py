"""Small helpers the plugin tests of distill, slca, barlow_twins and mixtrain share: one local round of
the real loop on a tiny MLP, and a recorder plugin that looks at the loop's state."""

from __future__ import annotations

import torch

from fedsim.clients.plugin_api import ClientPlugin, Event, PluginStack
from fedsim.clients.trainer import make_optimizer, train_local
from fedsim.models import build_model
from tests.conftest import tiny


def data(n: int = 64, d: int = 64, classes: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=gen), torch.arange(n) % classes


def run_round(plugins, x=None, y=None, *, max_steps: int = 4, progress: float = 0.0, seed: int = 0,
              optimizer: bool = False):
    """``(model, result, optimizer)`` after one local round with ``plugins`` (a list of instances)."""
    if x is None:
        x, y = data()
    cfg = tiny([f"client.max_steps={max_steps}", "client.batch_size=16"]).client
    model = build_model(tiny().model, tuple(x.shape[1:]), 10, seed)
    opt = make_optimizer(cfg, model.parameters()) if optimizer else None
    res = train_local(model, x, y, cfg, PluginStack(plugins), round=1, client_id=0, seed=0,
                      rng=torch.Generator().manual_seed(1), config={}, progress=progress, progress_span=0.5,
                      optimizer=opt)
    return model, res, opt


def weights(model) -> list[bytes]:
    return [v.detach().numpy().tobytes() for v in model.state_dict().values()]


class Recorder(ClientPlugin):
    """Calls ``fn(event, state)`` at the given events (not registered)."""

    name = "recorder"

    def __init__(self, fn, events) -> None:
        super().__init__()
        self.fn = fn
        self.events = frozenset(events)

    def on(self, event: Event, state) -> None:
        self.fn(event, state)
