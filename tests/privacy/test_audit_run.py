"""End-to-end privacy audit (`fedsim privacy audit`): canaries through the real DP-FedAvg server code and
the real DP-SGD client loop; sound on the built-in scenarios, a planted noise/3 bug is caught."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedsim.config import load_scenario
from fedsim.errors import ConfigError, FedSimError
from fedsim.privacy.accountants import make_accountant
from fedsim.privacy.audit_run import audit_scenario
from fedsim.privacy.cli import privacy_app
from fedsim.privacy.events import PoissonGaussianEvent
from tests.conftest import tiny

FEDAVG = ['strategy.name="dp_fedavg"', 'privacy.mechanism="dp-fedavg"', "privacy.noise_multiplier=1.0",
          "strategy.fraction_train=0.5"]
SGD = ['privacy.mechanism="dp-sgd"', "privacy.noise_multiplier=1.0"]


def builtin(name, *sets):
    from fedsim.catalog import resolve

    return resolve(load_scenario(name, list(sets)))


def claimed(z, q, accountant="rdp", delta=1e-5):
    acc = make_accountant(accountant)
    acc.compose(PoissonGaussianEvent(z, q), 1)
    return acc.epsilon(delta)


# ------------------------------------------------------------------------------ refusals, wiring
@pytest.mark.parametrize("sets, key", [
    ([], "privacy.mechanism"),
    (['strategy.name="dp_ftrl"', 'privacy.mechanism="dp-ftrl"', "privacy.noise_multiplier=1.0"], "privacy.mechanism"),
    (['strategy.name="dp_fedavg"', 'privacy.mechanism="dp-fedavg"'], "privacy.noise_multiplier"),
])
def test_what_cannot_be_audited_is_refused_before_any_run(sets, key):
    with pytest.raises(ConfigError) as err:
        audit_scenario(tiny(sets), trials=400)
    assert err.value.key == key


@pytest.mark.parametrize("kwargs, key", [({"trials": 100}, "audit.trials"), ({"confidence": 1.0}, "audit.confidence"),
                                         ({"confidence": 0.0}, "audit.confidence")])
def test_bad_audit_settings_are_refused(kwargs, key):
    with pytest.raises(ConfigError) as err:
        audit_scenario(tiny(FEDAVG), **kwargs)
    assert err.value.key == key


def test_dp_fedavg_canary_goes_through_the_real_aggregate(monkeypatch):
    from fedsim.strategies.dp_fedavg import DPFedAvg

    calls = []
    real = DPFedAvg.aggregate

    def spy(self, rnd, updates):
        norms = {u.partition_id: float(np.sqrt(sum(np.sum((a.astype(np.float64) - g) ** 2)
                                                   for a, g in zip(u.arrays, self.current)))) for u in updates}
        calls.append((rnd, norms, self.clip_norm))
        return real(self, rnd, updates)

    monkeypatch.setattr(DPFedAvg, "aggregate", spy)
    report = audit_scenario(tiny(FEDAVG), trials=400)
    assert len(calls) == 400 and len({rnd for rnd, _, _ in calls}) == 400  # one round each, fresh noise each
    canary_in = [(n[0], clip) for _, n, clip in calls[:200] if 0 in n]
    assert 0 < len(canary_in) < 200  # Poisson-sampled at the accounted rate, not forced in
    assert all(c == pytest.approx(2 * clip, rel=1e-5) for c, clip in canary_in)  # 2C: clipping is exercised
    assert not any(0 in n for _, n, _ in calls[200:])  # out-runs: the canary client is absent
    assert all(v == 0 for _, n, _ in calls for p, v in n.items() if p != 0)  # the others send zero updates
    assert report.release["sample_rate"] == 0.5 and report.release["count"] == 1
    assert report.result.claimed_epsilon == pytest.approx(claimed(1.0, 0.5))


def test_fixed_size_sampling_is_audited_with_replace_one_neighbours(monkeypatch):
    from fedsim.privacy.events import FixedSizeGaussianEvent
    from fedsim.strategies.dp_fedavg import DPFedAvg

    seen = []
    real = DPFedAvg.aggregate
    monkeypatch.setattr(DPFedAvg, "aggregate", lambda self, rnd, ups: (
        seen.append({u.partition_id: float(np.vdot(u.arrays[0].astype(np.float64) - self.current[0],
                                                   np.ones_like(self.current[0]))) for u in ups}),
        real(self, rnd, ups))[1])
    report = audit_scenario(tiny(FEDAVG + ['privacy.client_sampling="fixed"']), trials=400)
    with_canary = [s[0] for s in seen[:200] if 0 in s]
    without = [s[0] for s in seen[200:] if 0 in s]
    assert with_canary and without  # client 0 is sampled in both worlds: it sends the opposite update
    assert np.allclose(np.unique(np.round(with_canary, 5)), -np.unique(np.round(without, 5)))
    acc = make_accountant("rdp")
    acc.compose(FixedSizeGaussianEvent(1.0, 2, 4), 1)
    assert report.result.claimed_epsilon == pytest.approx(acc.epsilon(1e-5))


def test_audit_is_deterministic_per_seed():
    a = audit_scenario(tiny(FEDAVG), trials=400).to_dict()
    assert a == audit_scenario(tiny(FEDAVG), trials=400).to_dict()
    b = audit_scenario(tiny(FEDAVG + ["run.seed=4"]), trials=400).to_dict()
    assert (b["threshold"], b["tpr_lower"], b["fpr_upper"]) != (a["threshold"], a["tpr_lower"], a["fpr_upper"])
    s1 = audit_scenario(tiny(SGD), trials=200).to_dict()
    assert s1 == audit_scenario(tiny(SGD), trials=200).to_dict()


# ------------------------------------------------------------------------------------ DP-SGD path
def test_gradient_canary_lives_on_coordinates_no_client_sample_moves():
    import torch

    from fedsim.data.federation import federation_of
    from fedsim.privacy.audit_run import _gradient_canary, _initial_model, _per_sample_grads

    scen = tiny(SGD)
    fed = federation_of(scen)
    ids = fed.client_indices[0]
    x = torch.tensor(np.asarray(fed.dataset.x_train[ids]), dtype=torch.float32)
    y = torch.tensor(np.asarray(fed.dataset.y_train[ids]), dtype=torch.long)
    model = _initial_model(scen)
    x_c, y_c, d, info = _gradient_canary(model, x, y, 1.0, full=False, seed=0)
    others = torch.cat(list(_per_sample_grads(model, x, y)))
    g_c = torch.cat(list(_per_sample_grads(model, x_c[None], y_c.reshape(1))))[0]
    assert info["dedicated_features"] > 0 and info["score"] == "exclusive coordinates"
    assert float(d.norm()) == pytest.approx(1.0, rel=1e-5)
    assert torch.all(others @ d == 0)  # exactly: no other sample has gradient there
    assert float(g_c.norm()) >= 2.0  # clipping to C = 1 leaves exactly C
    assert float(g_c @ d / g_c.norm()) == pytest.approx(info["exclusive_gradient_share"], rel=1e-4)
    assert 0.5 < info["exclusive_gradient_share"] <= 1.0
    flat = x.reshape(len(x), -1)
    assert torch.all(flat[:, x_c.reshape(-1) != 0] == 0)  # the canary's features are unused by the data
    _, _, d_full, full = _gradient_canary(model, x, y, 1.0, full=True, seed=0)
    assert full["score"] == "full clipped gradient"
    assert float(d_full @ g_c / g_c.norm()) == pytest.approx(1.0, rel=1e-5)


def test_dp_sgd_trials_run_the_real_client_loop_and_match_the_plugins_own_claim(monkeypatch):
    import fedsim.clients.trainer as trainer

    runs = []
    real = trainer.train_local

    def spy(model, x, y, cfg, plugins, **kw):
        res = real(model, x, y, cfg, plugins, **kw)
        runs.append((int(x.shape[0]), [p.name for p in plugins.plugins], res.steps, dict(res.metrics)))
        return res

    monkeypatch.setattr(trainer, "train_local", spy)
    scen = tiny(SGD)
    report = audit_scenario(scen, trials=200)
    sizes = {n for n, *_ in runs}
    assert len(runs) == 200 and len(sizes) == 2 and max(sizes) == min(sizes) + 1  # one extra sample: the canary
    assert all(names == ["dp_sgd"] and steps == 1 for _, names, steps, _ in runs)
    n = min(sizes)
    q = scen.client.batch_size / n  # pinned to the out-world's rate in both worlds
    assert report.release["sample_rate"] == pytest.approx(q) and report.release["sample_rate_pinned"]
    assert report.result.claimed_epsilon == pytest.approx(claimed(1.0, q))
    plugin_claims = {m["dp_sgd/epsilon"] for *_, m in runs if "dp_sgd/epsilon" in m}
    assert all(c == pytest.approx(report.result.claimed_epsilon, rel=1e-9) for c in plugin_claims)


def test_a_trial_that_ran_something_else_than_what_is_accounted_is_refused(monkeypatch):
    import fedsim.clients.trainer as trainer

    real = trainer.train_local

    def other_rate(*args, **kw):
        res = real(*args, **kw)
        res.metrics["dp_sgd/sample_rate"] = 0.9
        return res

    monkeypatch.setattr(trainer, "train_local", other_rate)
    with pytest.raises(FedSimError, match="sample_rate"):
        audit_scenario(tiny(SGD), trials=200)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_prints_the_report_and_exits_1_only_when_the_claim_is_refuted(monkeypatch):
    import fedsim.privacy.audit_run as audit_run

    runner = CliRunner()
    ok = runner.invoke(privacy_app, ["audit", "dp_fedavg_digits.toml", "--set", "data.num_clients=20",
                                     "--trials", "400", "--seed", "2", "--format", "json"])
    assert ok.exit_code == 0, ok.output
    r = json.loads(ok.stdout)
    assert r["seed"] == 2 and r["trials"] == 400 and r["mechanism"] == "dp-fedavg" and not r["violated"]
    assert r["claimed_epsilon"] == pytest.approx(claimed(1.3, 0.25))
    real = audit_run.audit_scenario

    def refuted(scen, **kw):
        rep = real(scen, **kw)
        from dataclasses import replace

        return replace(rep, result=replace(rep.result, epsilon_lower_bound=rep.result.claimed_epsilon + 1))

    monkeypatch.setattr(audit_run, "audit_scenario", refuted)
    bad = runner.invoke(privacy_app, ["audit", "dp_fedavg_digits.toml", "--set", "data.num_clients=20",
                                      "--trials", "400"])
    assert bad.exit_code == 13 and "VIOLATED" in bad.stdout
    refused = runner.invoke(privacy_app, ["audit", "default.toml", "--trials", "400"])
    assert isinstance(refused.exception, ConfigError) and refused.exception.key == "privacy.mechanism"


# ------------------------------------------------------------------- soundness and a planted bug
@pytest.mark.slow
@pytest.mark.parametrize("name, sets, trials", [
    ("dp_fedavg_digits.toml", [], 8000),
    ("dp_fedavg_digits.toml", ["data.num_clients=20", "strategy.fraction_train=1.0"], 20000),
    ("dp_sgd_digits.toml", [], 2000),
    ("dp_sgd_digits.toml", ["privacy.sample_rate=1.0"], 4000),
])
def test_builtin_private_scenarios_are_sound(name, sets, trials):
    report = audit_scenario(builtin(name, *sets), trials=trials)
    r = report.result
    assert not r.violated and r.epsilon_lower_bound < r.claimed_epsilon, report.to_dict()
    if sets and sets[-1].endswith("=1.0"):  # without sampling the canary is always seen: the audit has power
        assert r.epsilon_lower_bound > 0.3, report.to_dict()


def _noise_over_3(monkeypatch, module, name, key):
    real = getattr(module, name)

    def weaker(*args, **kwargs):
        if key in kwargs:
            kwargs[key] = kwargs[key] / 3
        else:
            args = (args[0], args[1] / 3, *args[2:])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, weaker)


@pytest.mark.slow
def test_planted_noise_bug_in_dp_fedavg_is_caught_end_to_end(monkeypatch):
    """σ/3 inside ``dp_fedavg_aggregate``'s noise draw: the CLI reports the violation and exits 1."""
    import fedsim.privacy.clipping as clipping

    args = ["audit", "dp_fedavg_digits.toml", "--set", "data.num_clients=20", "--trials", "40000",
            "--format", "json"]
    sound = CliRunner().invoke(privacy_app, args)
    assert sound.exit_code == 0 and not json.loads(sound.stdout)["violated"], sound.output
    _noise_over_3(monkeypatch, clipping, "gaussian_noise_for_sum", "sigma")
    buggy = CliRunner().invoke(privacy_app, args)
    r = json.loads(buggy.stdout)
    assert buggy.exit_code == 13 and r["violated"], r
    assert r["epsilon_lower_bound"] > r["claimed_epsilon"] == pytest.approx(claimed(1.3, 0.25))


@pytest.mark.slow
def test_planted_noise_bug_in_dp_sgd_is_caught(monkeypatch):
    """σ/3 in Opacus's noise draw (``_generate_noise``), which every grad-sample mode of the dp_sgd plugin calls
    (``DPOptimizer.add_noise``; ``GhostLinear.private_grads`` for the audited MLP)."""
    import opacus.optimizers.optimizer as opacus_optimizer

    _noise_over_3(monkeypatch, opacus_optimizer, "_generate_noise", "std")
    report = audit_scenario(builtin("dp_sgd_digits.toml", "privacy.sample_rate=1.0"), trials=8000)
    r = report.result
    assert r.claimed_epsilon == pytest.approx(claimed(2.0, 1.0))
    assert r.violated and r.epsilon_lower_bound > r.claimed_epsilon, report.to_dict()
