"""ghost_linear DP-SGD (fedsim.clients.dp_linear): exact per-sample clipping from ghost norms, Opacus's noise,
refused before the run where it would not be exact."""

import copy

import pytest
import torch
from torch import nn

from fedsim.clients.dp_linear import GhostLinear, ghost_linear_reason
from fedsim.clients.plugin_api import PluginStack
from fedsim.clients.plugins.dp_sgd import GRAD_SAMPLE_MODES, DPSGD, preflight
from fedsim.clients.trainer import train_local
from fedsim.config import ClientConfig
from fedsim.errors import ConfigError, IncompatibleModelError


def _net(first="both"):
    """Every case of the norm formula: weight and bias, weight alone (no bias; a frozen bias), bias alone;
    ``first``: what the first layer trains ("both", "weight", "bias")."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6, bias=first != "weight"), nn.Tanh(),
                        nn.Sequential(nn.Linear(6, 5, bias=False), nn.ELU(), nn.Linear(5, 4)), nn.ReLU(),
                        nn.Linear(4, 3))
    net[1].weight.requires_grad_(first != "bias")
    net[3][2].weight.requires_grad_(False)
    net[5].bias.requires_grad_(False)
    return net


def _ghost_grads(net, x, y, clip, std=0.0, ebs=5, generator=None):
    params = [p for p in net.parameters() if p.requires_grad]
    ghost = GhostLinear(net, params)
    nn.functional.cross_entropy(ghost(x), y, reduction="sum").backward()
    assert all(p.grad is None for p in params), "the backward pass computes no parameter gradient"
    ghost.private_grads(clip, std, ebs, generator, False)
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("first", ["both", "weight", "bias"])
def test_clipped_sum_equals_clipping_each_per_sample_gradient(first):
    net, x, y = _net(first), torch.randn(7, 3, 4) * torch.arange(1, 8.0)[:, None, None], torch.randint(0, 3, (7,))
    params = [p for p in net.parameters() if p.requires_grad]
    per_sample = []
    for i in range(7):  # the definition: one backward per sample
        g = torch.autograd.grad(nn.functional.cross_entropy(net(x[i:i + 1]), y[i:i + 1], reduction="sum"), params)
        per_sample.append(torch.cat([t.flatten() for t in g]))
    norms = torch.stack(per_sample).norm(dim=1)
    clip = float(norms.median())
    assert (norms > clip).any() and (norms < clip).any(), "some samples clipped, some not"
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = (factor[:, None] * torch.stack(per_sample)).sum(0) / 5
    got = torch.cat([g.flatten() for g in _ghost_grads(net, x, y, clip)])
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    unclipped = torch.stack(per_sample).sum(0) / 5
    assert not torch.allclose(got, unclipped, rtol=1e-5, atol=1e-6)


def test_an_empty_batch_gives_one_opacus_noise_draw_alone():
    net = _net()
    params = [p for p in net.parameters() if p.requires_grad]
    got = _ghost_grads(net, torch.zeros(0, 3, 4), torch.zeros(0, dtype=torch.long), 1.0, std=0.7, ebs=4,
                       generator=torch.Generator().manual_seed(11))
    flat = torch.normal(0.0, 0.7, size=(sum(p.numel() for p in params),), generator=torch.Generator().manual_seed(11))
    assert torch.equal(torch.cat([g.flatten() for g in got]), flat / 4)


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x)


def _reused():
    lin = nn.Linear(4, 4)
    return nn.Sequential(lin, nn.ReLU(), lin)


def _tied():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    net[2].weight = net[0].weight
    return net


def _hooked():
    net = nn.Sequential(nn.Linear(4, 2))
    net[0].register_forward_hook(lambda *_: None)
    return net


def _relu_with_parameter():
    net = nn.Sequential(nn.Linear(4, 2), nn.ReLU())
    net[1].register_parameter("scale", nn.Parameter(torch.ones(1)))
    return net


@pytest.mark.parametrize("make, shape, why", [
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2)), (1, 8, 8),
     None),
    (lambda: nn.Linear(4, 2), (4,), None),
    (lambda: nn.Sequential(nn.Sequential(nn.Linear(4, 3), nn.GELU()), nn.Linear(3, 2)), (4,), None),
    (lambda: nn.Linear(4, 2), (3, 4), "3-D input"),
    (lambda: nn.Sequential(nn.Flatten(0), nn.Linear(4, 2)), (4,), "flattens the batch"),
    (lambda: nn.Sequential(nn.Flatten(2), nn.Linear(4, 2)), (3, 2, 2), "3-D input"),
    (_Custom, (4,), "not an nn.Sequential"),
    (_reused, (4,), "applied twice"),
    (_tied, (4,), "shared"),
    (_hooked, (4,), "hooks"),
    (_relu_with_parameter, (4,), "holds parameters"),
    (lambda: nn.Sequential(nn.Linear(4, 2), nn.ReLU(inplace=True)), (4,), "in place"),
    (lambda: nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2, affine=False)), (4,), "not an nn.Linear"),
    (lambda: nn.Sequential(nn.Linear(4, 2), nn.Softmax(dim=0)), (4,), "not an nn.Linear"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Conv2d(1, 2, 3)), (1, 4, 4), "not an nn.Linear"),
])
def test_which_models_qualify(make, shape, why):
    reason = ghost_linear_reason(make(), shape)
    assert reason is None if why is None else why in reason


def test_a_trainable_parameter_outside_the_linears_or_frozen_model_does_not_qualify():
    net = nn.Sequential(nn.Linear(4, 2))
    assert "no trainable parameter" in ghost_linear_reason(net, (4,), params=[])
    assert "does not belong" in ghost_linear_reason(net, (4,), params=[nn.Parameter(torch.ones(1))])


def _round(model, x, y, mode, plugins=(), secure=False, seed=7, optimizer=None):
    model = copy.deepcopy(model)
    plug = DPSGD(DPSGD.Settings(noise_multiplier=1.0, clip_norm=0.5, sample_rate=0.2, grad_sample_mode=mode,
                                secure_rng=secure))
    torch.manual_seed(seed)  # dropout (and secure_rng) draw from torch's default generator
    res = train_local(model, x, y, ClientConfig(epochs=1, batch_size=4, lr=0.5, max_steps=6),
                      PluginStack([plug, *plugins]), round=1, client_id=0, seed=0,
                      rng=torch.Generator().manual_seed(seed), optimizer=optimizer and optimizer(model))
    return torch.cat([p.detach().flatten() for p in model.parameters()]), res.metrics


def _mlp():
    from fedsim.config import ModelConfig
    from fedsim.models import build_model

    return build_model(ModelConfig(name="mlp", hidden=[16], dropout=0.25), (1, 8, 8), 10, 0)


def test_dropout_and_a_reordered_optimizer_match_the_hooks(monkeypatch):
    """Same dropout masks, same noise per coordinate (Opacus orders the noise by the optimizer's parameters;
    here they are reversed and one is frozen), same update."""
    from tests.clients.test_dp_sgd import fix_noise_by_coordinate

    x, y = torch.rand(30, 1, 8, 8), torch.randint(0, 10, (30,))
    net = _mlp()
    net[1].bias.requires_grad_(False)
    reverse = lambda m: torch.optim.SGD(list(m.parameters())[::-1], lr=0.5)  # noqa: E731
    cursor = fix_noise_by_coordinate(monkeypatch)
    got = {}
    for mode in ("hooks", "ghost_linear"):
        cursor[0] = 0
        got[mode], metrics = _round(net, x, y, mode, optimizer=reverse)
    assert metrics["dp_sgd/grad_sample_mode"] == GRAD_SAMPLE_MODES.index("ghost_linear") == 3
    assert torch.allclose(got["ghost_linear"], got["hooks"], rtol=0, atol=1e-5)
    assert torch.equal(got["ghost_linear"][16 * 64:16 * 64 + 16], net[1].bias.detach())  # frozen: never moved
    cursor[0] = 0
    in_order, _ = _round(net, x, y, "ghost_linear")  # the noise lands elsewhere: the order is seen
    assert not torch.allclose(in_order, got["hooks"], rtol=0, atol=1e-5)


def test_secure_rng_goes_through_opacus_secure_draw_once_a_step(monkeypatch):
    import opacus.optimizers.optimizer as opacus_optimizer

    real, calls = opacus_optimizer._generate_noise, []

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", spy)
    x, y = torch.rand(30, 1, 8, 8), torch.randint(0, 10, (30,))
    got, metrics = _round(_mlp(), x, y, "ghost_linear", secure=True)
    n = sum(p.numel() for p in _mlp().parameters())
    assert len(calls) == metrics["dp_sgd/steps"] == 5  # round(1 / q) steps
    assert all(c["secure_mode"] and c["generator"] is None and c["reference"].shape == (n,) for c in calls)
    assert all(c["std"] == 0.5 for c in calls)  # σ·C
    assert torch.isfinite(got).all()


def test_noise_level_matches_theory():
    """Zero inputs → zero per-sample gradients: ||w||² after k steps ≈ k·d·(z·C·lr/B)² (within 15 %)."""
    def run(z, seed, d=200, n=64, q=0.25, k=4):
        net = nn.Sequential(nn.Linear(d, 2, bias=False))
        nn.init.zeros_(net[0].weight)
        plug = DPSGD(DPSGD.Settings(noise_multiplier=z, clip_norm=1.0, sample_rate=q, grad_sample_mode="ghost_linear"))
        train_local(net, torch.zeros(n, d), torch.zeros(n, dtype=torch.long),
                    ClientConfig(epochs=1, batch_size=int(q * n), lr=1.0, max_steps=k), PluginStack([plug]),
                    round=1, client_id=0, seed=0, rng=torch.Generator().manual_seed(seed))
        return float((net[0].weight.detach() ** 2).sum())

    expected = 4 * 400 * (2.0 / 16) ** 2
    assert sum(run(2.0, s) for s in range(10)) / 10 == pytest.approx(expected, rel=0.15)
    assert run(2.0 / 3, 0) < expected / 4  # a planted bug (noise / 3) is caught


def test_microbatch_splitting_a_step_is_refused_and_one_part_is_the_plain_step():
    from fedsim.clients.plugins.microbatch import MicroBatch

    x, y = torch.rand(30, 1, 8, 8), torch.randint(0, 10, (30,))
    plain, _ = _round(_mlp(), x, y, "ghost_linear")
    one, _ = _round(_mlp(), x, y, "ghost_linear", [MicroBatch(MicroBatch.Settings(micro_batches=1))])
    assert torch.equal(one, plain)
    with pytest.raises(ConfigError, match="client.plugins"):
        _round(_mlp(), x, y, "ghost_linear", [MicroBatch(MicroBatch.Settings(micro_batches=2))])


def test_ghost_linear_is_refused_before_the_run_where_it_does_not_apply():
    from fedsim.config import ModelConfig
    from fedsim.models import build_model
    from tests.conftest import tiny

    cnn = build_model(ModelConfig(name="cnn", norm="group", channels=[4], groups=2), (1, 8, 8), 10, 0)
    start = [p.detach().clone() for p in cnn.parameters()]
    with pytest.raises(IncompatibleModelError, match="dp_sgd.grad_sample_mode"):
        _round(cnn, torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,)), "ghost_linear")
    with pytest.raises(IncompatibleModelError, match="dp_sgd.grad_sample_mode.*layer 0 .Conv2d"):
        preflight(cnn, "ghost_linear", (1, 8, 8))
    assert all(torch.equal(a, b) for a, b in zip(start, cnn.parameters()))
    preflight(_mlp(), "ghost_linear", (1, 8, 8))  # accepted
    sets = ['privacy.mechanism="dp-sgd"', "privacy.noise_multiplier=1.0"]
    plugin = DPSGD(DPSGD.Settings(grad_sample_mode="ghost_linear"))
    with pytest.raises(IncompatibleModelError, match="dp_sgd.grad_sample_mode"):
        plugin.preflight(tiny([*sets, 'model.name="cnn"', 'model.norm="group"', "model.channels=[4]"]))
    plugin.preflight(tiny(sets))  # the MLP: accepted


def test_auto_runs_ghost_linear_for_the_mlp_and_reports_it(tmp_path):
    from fedsim.engines.local import run_local
    from fedsim.results import read_jsonl
    from tests.conftest import tiny

    run_local(tiny(['privacy.mechanism="dp-sgd"', "privacy.noise_multiplier=1.0", "run.rounds=1",
                    "privacy.release_counters=false"]), tmp_path)
    rows = read_jsonl(tmp_path / "clients.jsonl")
    assert rows and all(r["dp_sgd/grad_sample_mode"] == GRAD_SAMPLE_MODES.index("ghost_linear") for r in rows)
