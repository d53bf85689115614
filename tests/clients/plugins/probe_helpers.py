"""Helpers the probe plugin tests share: a tiny smooth model, a dense Hessian by autograd, per-example
gradients by a plain loop (no vmap), and one local round of the real loop in a chosen round."""

from __future__ import annotations

import pytest
import torch

from fedsim.clients.diagnostics import unflat
from fedsim.clients.functional import batch_loss_fn, flat
from fedsim.clients.plugin_api import PluginStack
from fedsim.clients.trainer import train_local
from fedsim.models import build_model
from tests.conftest import tiny


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (these models are tiny: more threads only add contention), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_problem(seed: int = 0, n: int = 24, d: int = 6, hidden: int = 5, classes: int = 3):
    """``(model, x, y)``: a 6-5-3 tanh MLP (53 parameters) and a batch of ``n`` examples."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, classes))
    x = torch.randn(n, d, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return model, x, y


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def dense_hessian(model, x, y) -> torch.Tensor:
    """The full Hessian of the mean cross-entropy in the flattened parameters (float64)."""
    p = params(model)
    f = batch_loss_fn(model, x, y)
    return torch.autograd.functional.hessian(lambda v: f(unflat(v, p)), flat(p)).double()


def loop_per_example_grads(model, x, y) -> torch.Tensor:
    """``[B, D]`` gradients of each example's cross-entropy, one backward pass per example."""
    rows = []
    for i in range(x.shape[0]):
        loss = torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).double()


def local_round(plugins, *, round: int = 1, client_id: int = 0, seed: int = 0, n: int = 40):
    """``(model, result)`` after one local round of the real loop on a tiny digits-shaped MLP."""
    s = tiny(["client.max_steps=3", "client.batch_size=16"])
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 64, generator=gen), torch.arange(n) % 10
    model = build_model(s.model, (64,), 10, seed)
    res = train_local(model, x, y, s.client, PluginStack(plugins), round=round, client_id=client_id, seed=seed,
                      rng=torch.Generator().manual_seed(round), config={}, progress=0.0, progress_span=0.5,
                      probe_rng=torch.Generator().manual_seed(100 + round))
    return model, res


def weights(model) -> list[bytes]:
    return [v.detach().numpy().tobytes() for v in model.state_dict().values()]
