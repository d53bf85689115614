"""DP-SGD clients (Opacus): persistent per-client accounting, no `_module.` leak, preflight, noise."""

import numpy as np
import pytest
import torch

from fedsim.clients.plugin_api import PluginStack
from fedsim.clients.plugins.dp_sgd import DPSGD
from fedsim.clients.trainer import train_local
from fedsim.config import ClientConfig
from fedsim.engines.local import run_local
from fedsim.errors import IncompatibleModelError
from fedsim.privacy.accountants import make_accountant
from fedsim.privacy.events import PoissonGaussianEvent
from fedsim.results import load_checkpoint, read_jsonl
from tests.conftest import tiny

DPSGD_SETS = ['privacy.mechanism="dp-sgd"', "privacy.noise_multiplier=1.1", "privacy.clip_norm=1.0",
              "client.max_steps=0", "run.rounds=3", "privacy.release_counters=false"]


def test_client_epsilon_persists_and_matches_the_server_mirror(tmp_path):
    run_local(tiny(DPSGD_SETS), tmp_path)
    clients = read_jsonl(tmp_path / "clients.jsonl")
    by_client = {}
    for c in clients:
        by_client.setdefault(c["client"], []).append(c)
    for pid, rows in by_client.items():
        eps = [r["dp_sgd/epsilon"] for r in sorted(rows, key=lambda r: r["round"])]
        assert eps == sorted(eps) and eps[0] < eps[-1], "accountant restarted between rounds"
        acc = make_accountant("rdp")
        for r in rows:
            acc.compose(PoissonGaussianEvent(1.1, r["dp_sgd/sample_rate"]), int(r["dp_sgd/steps"]))
        assert eps[-1] == pytest.approx(acc.epsilon(1e-5), rel=1e-9)
    server = [r for r in read_jsonl(tmp_path / "privacy.jsonl") if r["mechanism"] == "dp-sgd"][-1]
    assert server["epsilon"] == pytest.approx(max(rows[-1]["dp_sgd/epsilon"] for rows in by_client.values()),
                                              rel=1e-9)


def test_no_module_prefix_in_the_global_model(tmp_path):
    run_local(tiny([*DPSGD_SETS, "run.rounds=1"]), tmp_path)
    keys = load_checkpoint(tmp_path / "checkpoints" / "round_0001.npz")["meta"]["keys"]
    assert keys and not any("_module" in k for k in keys)


def test_batchnorm_is_rejected_with_the_fix_named():
    with pytest.raises(IncompatibleModelError, match="GroupNorm"):
        tiny([*DPSGD_SETS, 'model.name="cnn"', 'model.norm="batch"', "model.channels=[4]"])
    tiny([*DPSGD_SETS, 'model.name="cnn"', 'model.norm="group"', "model.channels=[4]"])  # accepted


def test_other_loss_plugins_are_refused():
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match="fedprox"):
        tiny([*DPSGD_SETS, 'client.plugins=["fedprox"]'])


def test_same_seed_same_run(tmp_path):
    a = run_local(tiny(DPSGD_SETS), tmp_path / "a")["final"]
    b = run_local(tiny(DPSGD_SETS), tmp_path / "b")["final"]
    assert a["test_loss"] == b["test_loss"]


def _noise_run(z, seed, steps=4, n=64, d=200, q=0.25, lr=1.0):
    """Zero data → zero per-sample gradients: every parameter change is the DP noise alone."""
    model = torch.nn.Linear(d, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    x = torch.zeros(n, d)
    y = torch.zeros(n, dtype=torch.long)
    cfg = ClientConfig(epochs=1, batch_size=int(q * n), lr=lr, max_steps=steps)
    plug = DPSGD(DPSGD.Settings(noise_multiplier=z, clip_norm=1.0, sample_rate=q))

    class Wrap(torch.nn.Module):  # CE needs 2 logits; keep the only parameter the weight
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self, inp):
            out = self.lin(inp)
            return torch.cat([out, torch.zeros_like(out)], 1)

    m = Wrap()
    train_local(m, x, y, cfg, PluginStack([plug]), round=1, client_id=0, seed=0,
                rng=torch.Generator().manual_seed(seed))
    return float((model.weight.detach() ** 2).sum()), steps, d, q * n


def test_noise_level_matches_theory():
    """Opacus-style: ||w||² after k steps ≈ k·d·(z·C·lr/B)² (within 15 %, averaged over repeats)."""
    z = 2.0
    vals = [_noise_run(z, seed) for seed in range(10)]
    measured = np.mean([v[0] for v in vals])
    _, k, d, b = vals[0]
    expected = k * d * (z * 1.0 * 1.0 / b) ** 2
    assert measured == pytest.approx(expected, rel=0.15)
    assert _noise_run(z / 3, 0)[0] < expected / 4  # a planted bug (noise / 3) is caught


# --- grad-sample modes (Opacus's fast paths): same per-sample clipping, same noise, same update -------
def _dp_round(model, x, y, mode, clip=1.0, q=0.05, steps=20):
    """One client round of Poisson DP-SGD in ``mode``; the model's parameters after it and the metrics."""
    import copy

    model = copy.deepcopy(model)
    plug = DPSGD(DPSGD.Settings(noise_multiplier=1.0, clip_norm=clip, sample_rate=q, grad_sample_mode=mode))
    sizes = []
    plug_sampler = plug._sampler

    def sampler(state):  # record the Poisson batch sizes, to know empty batches were exercised
        plug_sampler(state)
        sizes.extend(int(b.shape[0]) for b in state.batches)

    plug._sampler = sampler
    res = train_local(model, x, y, ClientConfig(epochs=2, batch_size=4, lr=0.5, max_steps=steps),
                      PluginStack([plug]), round=1, client_id=0, seed=0, rng=torch.Generator().manual_seed(7))
    return torch.cat([p.detach().flatten() for p in model.parameters()]), res.metrics, sizes


def fix_noise_by_coordinate(monkeypatch) -> list[int]:
    """Make Opacus's noise function return ``std·z_k`` for the k-th noise value drawn since ``cursor[0] = 0``,
    in whatever pieces it is drawn: Opacus's modes draw per parameter, ``ghost_linear`` once over all of them
    (same order), so both then get the same noise on every coordinate. Returns the cursor, to reset."""
    import opacus.optimizers.optimizer as opacus_optimizer

    z, cursor = torch.randn(10**6, generator=torch.Generator().manual_seed(5)), [0]

    def noise(std, reference, generator=None, secure_mode=False):
        if std == 0:
            return torch.zeros_like(reference)
        n = reference.numel()
        cursor[0] += n
        return z[cursor[0] - n:cursor[0]].view(reference.shape) * std

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", noise)
    return cursor


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_every_grad_sample_mode_gives_the_hooks_update(name, monkeypatch):
    from fedsim.clients.plugins.dp_sgd import GRAD_SAMPLE_MODES, choose_grad_sample_mode
    from fedsim.config import ModelConfig
    from fedsim.models import build_model

    torch.manual_seed(0)
    shape = (1, 8, 8) if name == "mlp" else (1, 12, 12)
    cfg = ModelConfig(name="mlp", hidden=[16]) if name == "mlp" else ModelConfig(name="cnn", norm="group",
                                                                                 channels=[4, 8], groups=2)
    model = build_model(cfg, shape, 10, 0)
    auto = "ghost_linear" if name == "mlp" else "ew"
    assert choose_grad_sample_mode(model, shape) == auto, "MLP: ghost_linear, GroupNorm CNN: expanded weights"
    x, y = torch.rand(40, *shape), torch.randint(0, 10, (40,))
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    reference, metrics, sizes = _dp_round(model, x, y, "hooks")
    assert 0 in sizes and max(sizes) > 1, "the round must mix empty and non-empty Poisson batches"
    assert metrics["dp_sgd/grad_sample_mode"] == GRAD_SAMPLE_MODES.index("hooks")
    assert not torch.allclose(reference, start)
    for mode in ("functorch", "ew", *(("auto",) if auto == "ew" else ())):  # Opacus's modes: same seed, same noise
        params, metrics, mode_sizes = _dp_round(model, x, y, mode)
        assert mode_sizes == sizes
        assert metrics["dp_sgd/grad_sample_mode"] == GRAD_SAMPLE_MODES.index(auto if mode == "auto" else mode)
        assert torch.allclose(params, reference, rtol=0, atol=1e-5), f"{mode} differs from hooks"
    other_clip, _, _ = _dp_round(model, x, y, "ew", clip=0.5)  # the comparison sees a change of clipping
    assert not torch.allclose(other_clip, reference, rtol=0, atol=1e-5)
    if name != "mlp":
        return
    cursor = fix_noise_by_coordinate(monkeypatch)  # ghost_linear draws its noise in one piece
    fixed = {}
    for mode in ("hooks", "ghost_linear", "auto"):
        cursor[0] = 0
        fixed[mode], metrics, mode_sizes = _dp_round(model, x, y, mode)
        assert mode_sizes == sizes
        assert metrics["dp_sgd/grad_sample_mode"] == GRAD_SAMPLE_MODES.index("hooks" if mode == "hooks" else auto)
    assert cursor[0] > 0 and not torch.allclose(fixed["hooks"], reference, rtol=0, atol=1e-5)
    for mode in ("ghost_linear", "auto"):
        assert torch.allclose(fixed[mode], fixed["hooks"], rtol=0, atol=1e-5), f"{mode} differs from hooks"
    cursor[0] = 0
    other_clip, _, _ = _dp_round(model, x, y, "ghost_linear", clip=0.5)
    assert not torch.allclose(other_clip, fixed["hooks"], rtol=0, atol=1e-5)


def test_auto_mode_falls_back_to_hooks_where_expanded_weights_do_not_apply():
    from fedsim.clients.plugins.dp_sgd import choose_grad_sample_mode

    class Scaled(torch.nn.Module):  # a parameter of a module expanded weights do not know
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)
            self.scale = torch.nn.Parameter(torch.ones(2))

        def forward(self, inp):
            return self.lin(inp) * self.scale

    tied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    assert choose_grad_sample_mode(Scaled(), (4,)) == "hooks"
    assert choose_grad_sample_mode(tied, (4,)) == "hooks"
    assert choose_grad_sample_mode(torch.nn.Linear(4, 2), (4,)) == "ghost_linear"
    assert choose_grad_sample_mode(torch.nn.Linear(4, 2), (3, 4)) == "ew"  # a sequence: no ghost norm
    with pytest.raises(ValueError, match="grad_sample_mode"):
        DPSGD.Settings(grad_sample_mode="ghost")
