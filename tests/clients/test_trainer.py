"""The loop's own bookkeeping: the round's metrics and weights are, to the bit, those of the plain per-step
loop (``loss_sum += loss * batch``, ``correct += (argmax == y).sum()`` after every step), whether the loop
defers that bookkeeping (no plugin) or does it step by step (plugins), and events nobody handles cost no call."""

import numpy as np
import pytest
import torch

from fedsim.clients.plugin_api import ClientPlugin, Event, PluginStack
from fedsim.clients.trainer import _Tally, make_optimizer, train_local
from fedsim.config import ClientConfig


def _reference(model, x, y, cfg, rng):
    """The loop as it was written before its bookkeeping was deferred: one reduction per step."""
    opt = make_optimizer(cfg, model.parameters())
    loss_sum, correct, seen, steps = torch.zeros(()), torch.zeros((), dtype=torch.long), 0, 0
    for _ in range(cfg.epochs):
        order = torch.randperm(int(x.shape[0]), generator=rng)
        for s in range(0, int(order.shape[0]), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            bx, by = x[idx], y[idx]
            out = model(bx)
            loss = torch.nn.functional.cross_entropy(out, by)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                loss_sum += loss.detach() * by.shape[0]
                correct += (out.argmax(1) == by).sum()
            seen += int(by.shape[0])
            steps += 1
    return {"train_loss": float(loss_sum) / seen, "train_accuracy": float(correct) / seen}, steps


class AfterStep(ClientPlugin):
    """A neutral plugin: its presence alone makes the loop reduce every step at once."""
    name = "after_step_probe"
    events = frozenset({Event.AFTER_STEP})

    def __init__(self, settings=None):
        super().__init__(settings)
        self.calls = 0

    def on(self, event, state):
        self.calls += 1


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("n, batch, epochs", [(50, 10, 1), (203, 7, 2), (1500, 16, 1), (3, 8, 3)])
@pytest.mark.parametrize("with_plugin", [False, True])
def test_metrics_and_weights_are_those_of_the_per_step_loop(n, batch, epochs, with_plugin):
    x, y = _data(n)
    cfg = ClientConfig(epochs=epochs, batch_size=batch, lr=0.1, momentum=0.9)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    twin = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    twin.load_state_dict(model.state_dict())
    want, steps = _reference(twin, x, y, cfg, torch.Generator().manual_seed(7))
    plugin = AfterStep()
    res = train_local(model, x, y, cfg, PluginStack([plugin] if with_plugin else []), round=1, client_id=0,
                      seed=0, rng=torch.Generator().manual_seed(7))
    assert res.metrics == want  # == on floats: bit for bit
    assert res.steps == steps and plugin.calls == (steps if with_plugin else 0)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def _per_step(losses, sizes, outputs, labels):
    loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)
    for loss, n, out, lab in zip(losses, sizes, outputs, labels):
        if n:
            loss_sum += loss * n
        correct += (out.argmax(1) == lab).sum()
    return float(loss_sum), int(correct)


@pytest.mark.parametrize("defer", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_tally_equals_the_per_step_running_sum_to_the_bit(defer, dtype):
    """Hundreds of steps of losses spread over five decades and odd batch sizes (an empty batch among
    them): a pairwise or double-precision sum would differ from the float32 running sum in the last bits."""
    g = torch.Generator().manual_seed(0)
    steps = 300
    sizes = [int(s) for s in torch.randint(1, 33, (steps,), generator=g)]
    sizes[17] = 0
    scale = 10.0 ** torch.randint(-2, 3, (steps,), generator=g)
    losses = [(torch.rand((), generator=g) * s).to(dtype) for s in scale]
    outputs = [torch.randn(n, 4, generator=g) for n in sizes]
    labels = [torch.randint(0, 4, (n,), generator=g) for n in sizes]
    tally = _Tally(torch.device("cpu"), defer=defer)
    for loss, out, lab in zip(losses, outputs, labels):
        tally.add(loss, out, lab)
    assert tally.totals() == _per_step(losses, sizes, outputs, labels)
    float32_pairwise = float(np.add.reduce(np.array([float(v) * n for v, n in zip(losses, sizes)], np.float32)))
    assert dtype is torch.float64 or float32_pairwise != tally.totals()[0]  # the check can tell the difference


def test_an_empty_round_reports_zero():
    assert _Tally(torch.device("cpu"), defer=True).totals() == (0.0, 0)


def test_events_nobody_handles_are_a_no_op_and_handled_ones_fire():
    plugin = AfterStep()
    stack = PluginStack([plugin])
    stack.trace = []
    assert stack.hook(Event.BATCH) is PluginStack([]).hook(Event.BATCH)  # the one shared no-op
    stack.hook(Event.BATCH)(None)
    stack.hook(Event.AFTER_STEP)(None)
    assert plugin.calls == 1 and stack.trace == [("after_step", "after_step_probe")]
