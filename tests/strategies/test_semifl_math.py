"""SemiFL server math: spec section 2 tests (1), (2), (3), (4), (6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.errors import AggregationError, ConfigError
from fedsim.strategies.semifl_math import (
    ServerMomentum,
    average_parameters,
    combine_bn_statistics,
    is_averaged_key,
    mask_rate,
    pseudo_label,
    server_momentum_step,
)


def model_state(seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 3))
    net[1].running_mean.uniform_()
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def test_averaged_keys_are_weights_and_biases_only():
    state = model_state(0)
    averaged = [k for k in state if is_averaged_key(k)]
    assert averaged == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert not is_averaged_key("1.running_var") and not is_averaged_key("1.num_batches_tracked")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 50), st.integers(2, 10), st.integers(0, 2**31 - 1), st.floats(0, 1), st.floats(0, 1))
def test_mask_rate_monotone_in_tau(n, c, seed, t1, t2):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, c, generator=gen) * 4, dim=1)
    lo, hi = min(t1, t2), max(t1, t2)
    assert mask_rate(probs, lo) >= mask_rate(probs, hi)
    assert mask_rate(probs.numpy(), lo) == mask_rate(probs, lo)


def test_pseudo_label_threshold_inclusive_and_tau_above_one():
    probs = torch.tensor([[0.95, 0.05], [0.2, 0.8], [0.5, 0.5]])
    mask, labels = pseudo_label(probs, 0.8)
    assert mask.tolist() == [True, True, False] and labels.tolist() == [0, 1, 0]
    mask_np, labels_np = pseudo_label(probs.numpy(), 0.95)
    assert mask_np.tolist() == [True, False, False] and labels_np.tolist() == [0, 1, 0]
    assert not pseudo_label(probs, 1.01)[0].any()


def test_no_client_leaves_model_and_momentum_unchanged():
    # tau > 1: every client sits out, so the model equals the server-only model (spec test 2)
    glob = model_state(0)
    new, buf = server_momentum_step(glob, [], {"0.weight": np.ones_like(glob["0.weight"])})
    for k in glob:
        np.testing.assert_array_equal(new[k], glob[k])
    np.testing.assert_array_equal(buf["0.weight"], 1.0)


def test_momentum_zero_one_client_reproduces_client():
    glob, client = model_state(0), model_state(1)
    new, _ = server_momentum_step(glob, [client], momentum=0.0)
    for k in glob:
        np.testing.assert_allclose(new[k], client[k] if is_averaged_key(k) else glob[k], rtol=1e-6, atol=1e-7)


def test_aggregation_ignores_bn_buffers_and_is_unweighted():
    glob, a, b = model_state(0), model_state(1), model_state(2)
    new1, _ = server_momentum_step(glob, [a, b], momentum=0.0)
    a2 = dict(a, **{"1.running_mean": a["1.running_mean"] + 100, "1.running_var": a["1.running_var"] * 7})
    new2, _ = server_momentum_step(glob, [a2, b], momentum=0.0)
    for k in glob:
        np.testing.assert_array_equal(new1[k], new2[k])
    np.testing.assert_array_equal(new1["1.running_mean"], glob["1.running_mean"])
    np.testing.assert_allclose(average_parameters([a, b])["3.bias"], (a["3.bias"] + b["3.bias"]) / 2)


def test_matches_torch_sgd_with_momentum_over_rounds():
    """The reference applies torch.optim.SGD(lr=1, momentum=gm) to d = w - mean(w_i)."""
    rng = np.random.default_rng(0)
    w = {"fc.weight": rng.standard_normal((3, 2)), "fc.bias": rng.standard_normal(3)}
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in w.items()}
    opt = torch.optim.SGD(params.values(), lr=1.0, momentum=0.5)
    server = ServerMomentum(lr=1.0, momentum=0.5)
    for _ in range(4):
        clients = [{k: v + rng.standard_normal(v.shape) for k, v in w.items()} for _ in range(3)]
        mean = average_parameters(clients)
        for k, p in params.items():
            p.grad = p.detach() - torch.tensor(mean[k])
        opt.step()
        w = server.step(w, clients)
        for k in w:
            np.testing.assert_allclose(w[k], params[k].detach().numpy(), rtol=1e-12)
    resumed = ServerMomentum()
    resumed.load_state_dict(server.state_dict())
    clients = [{k: v + 1.0 for k, v in w.items()}]
    out_a, out_b = server.step(w, clients), resumed.step(w, clients)
    for k in w:
        np.testing.assert_array_equal(out_a[k], out_b[k])


def test_errors():
    with pytest.raises(AggregationError):
        average_parameters([])
    with pytest.raises(AggregationError):
        average_parameters([{"a.weight": np.zeros(2)}, {"b.weight": np.zeros(2)}])
    with pytest.raises(ConfigError):
        server_momentum_step({}, [], momentum=1.0)


def test_static_bn_statistics_match_torch_cumulative_average():
    torch.manual_seed(0)
    clients = [[torch.randn(10, 3) * (c + 1) + c for _ in range(c + 2)] for c in range(3)]
    bn = torch.nn.BatchNorm1d(3, momentum=None, track_running_stats=True).double()
    bn.train()
    stats = []
    for batches in clients:
        means = sum(b.double().mean(0) for b in batches)
        vars_ = sum(b.double().var(0, unbiased=True) for b in batches)
        stats.append({"bn": (means.numpy(), vars_.numpy(), len(batches))})
        for b in batches:
            bn(b.double())
    mean, var = combine_bn_statistics(stats)["bn"]
    np.testing.assert_allclose(mean, bn.running_mean.numpy(), rtol=1e-10)
    np.testing.assert_allclose(var, bn.running_var.numpy(), rtol=1e-10)
    # closed form: constant batches c_b give running_mean = mean of c_b, running_var = 0
    const = [{"bn": (np.array([1.0 + 2.0 + 6.0]), np.zeros(1), 3)}, {"bn": (np.array([3.0]), np.zeros(1), 1)}]
    m, v = combine_bn_statistics(const)["bn"]
    assert m[0] == pytest.approx(3.0) and v[0] == 0.0
