"""End-to-end privacy audit: canaries through fedsim's real training path, an empirical ε lower bound.

``fedsim privacy audit SCENARIO`` runs the scenario's own DP code many times, half of the runs with a
canary and half without, scores each run, and turns the scores into a lower bound on ε that holds
with the stated confidence (one-sided Clopper–Pearson bounds on the TPR and FPR of a threshold test,
:func:`fedsim.privacy.audit.audit_scores`). Beside it stands the ε fedsim claims for exactly what one
run released (fedsim's own accountant, :func:`fedsim.privacy.accountants.make_accountant`, composing
the mechanism's own event). A sound implementation keeps the bound below the claim; a bound above
it proves, at that confidence, that fedsim claims more privacy than it gives.

One run (a *trial*) is the smallest release that carries the claim, where the audit is tightest:

* ``dp-fedavg`` — one server round. The canary is a client: its update is ``2C`` along a fixed random
  direction (so clipping is exercised and leaves exactly ``C``); every other sampled client sends a
  zero update. Clients are sampled by the strategy's own ``sample`` (Poisson at the accounted rate,
  or a fixed-size sample), the updates go through ``DPFedAvg.aggregate`` (clipping, fixed denominator,
  noise seeded per round as in a run), and the score is the released step projected on the canary's
  clipped direction. Out-runs: with Poisson sampling the canary client is absent (add/remove
  neighbours); with fixed-size sampling it sends the opposite update (replace-one neighbours, the
  relation the fixed-size event is accounted under).
* ``dp-sgd`` — one local DP-SGD step of client 0 through :func:`fedsim.clients.trainer.train_local`
  with the ``dp_sgd`` plugin (its ``auto`` grad-sample mode: ``ghost_linear`` for the MLP, Opacus
  ``GradSampleModule`` and ``DPOptimizer`` otherwise; Opacus's noise draw in every mode; Poisson batches
  at rate ``q``) from the initial global model. The canary is one extra training sample, a white-box
  *gradient canary*: its input is non-zero only on features that are zero in every sample of the
  client (so in the first layer only the canary has gradient there), its scale, direction and label
  are chosen so that most of its per-sample gradient lies on parameters no other sample touches, and
  its gradient norm is at least ``2C`` (clipping leaves exactly ``C``). The score is the parameter
  change along the canary's clipped gradient: on those exclusive coordinates when ``q < 1``, on all
  of them when ``q = 1`` (every other sample is then in every batch and adds the same vector to
  both worlds). ``q`` is pinned to the out-world's ``batch_size / n`` when ``sample_rate = 0`` so
  both worlds run, and are accounted with, the same rate.

Why the bound is valid whatever the other clients or samples hold: (ε, δ)-DP constrains every pair
of neighbouring datasets, so the audit may choose the pair. Zero updates from the other clients (or
the client's real data plus one crafted sample) make such a pair, known to the white-box auditor,
and keep the other clients' variance out of the score; the score may be any function of the release.
Why many runs of one canary and not many canaries in one run (Steinke, Nasr, Jagielski, "Privacy
Auditing with One (1) Training Run", NeurIPS 2023): their bound for δ > 0 pays a term growing with
the number of canaries times δ, and canaries sharing one step share its batch normaliser (Opacus
divides by round(q·n), n counting the canaries), so the per-canary tests are not independent;
independent runs give independent Bernoulli trials, which is exactly what Clopper–Pearson needs.

References
----------
Jagielski, Ullman, Oprea, "Auditing Differentially Private Machine Learning: How Private is Private
SGD?", NeurIPS 2020. Nasr, Song, Thakurta, Papernot, Carlini, "Adversary Instantiation: Lower
Bounds for Differentially Private Machine Learning", S&P 2021 (gradient canaries, dedicated
coordinates). Nasr, Hayes, Steinke, Balle, Tramèr, Jagielski, Carlini, Terzis, "Tight Auditing of
Differentially Private Machine Learning", USENIX Security 2023. Clopper, Pearson, Biometrika 1934.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim.errors import ConfigError, FedSimError
from fedsim.privacy.audit import AuditResult, audit_scores
from fedsim.rng import derive_seed, numpy_rng, torch_generator

__all__ = ["AuditReport", "audit_scenario"]

#: fraction of the trials that chooses the threshold (the rest yields the bound)
SELECT_FRACTION = 0.25


@dataclass(frozen=True)
class AuditReport:
    """An audit's outcome: the bound, the claim it is compared with, and what one trial released."""

    scenario: str
    mechanism: str
    seed: int
    release: dict[str, Any]
    canary: dict[str, Any]
    result: AuditResult

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"scenario": self.scenario, "mechanism": self.mechanism, "seed": self.seed,
                "claimed_epsilon": r.claimed_epsilon, "epsilon_lower_bound": r.epsilon_lower_bound,
                "violated": r.violated, "delta": r.delta, "confidence": r.confidence, "trials": r.trials,
                "threshold": r.threshold, "tpr_lower": r.tpr_lower, "fpr_upper": r.fpr_upper,
                "release": self.release, "canary": self.canary}


def audit_scenario(scenario, *, trials: int = 4000, confidence: float = 0.95) -> AuditReport:
    """Audit a resolved scenario's DP mechanism with ``trials`` runs (half with the canary).

    Parameters
    ----------
    scenario : fedsim.config.Scenario
        Validated and resolved (``fedsim.catalog.resolve``); ``run.seed`` seeds everything.
    trials : int
        Runs of the mechanism in all; the first ``trials // 2`` carry the canary.
    confidence : float
        Both Clopper–Pearson bounds hold together with at least this probability.

    Raises
    ------
    ConfigError
        ``privacy.mechanism`` is not audited (``none``, ``dp-ftrl``), or ``trials``/``confidence``
        are out of range.
    """
    mech = scenario.privacy.mechanism
    if mech not in ("dp-fedavg", "dp-sgd"):
        why = ("there is no DP mechanism to audit" if mech == "none" else
               "DP-FTRL's tree noise is correlated across rounds and its claim covers the whole stream, "
               "so a one-release canary test does not measure it")
        raise ConfigError("privacy.mechanism", f"the audit covers dp-fedavg and dp-sgd, not {mech!r}: {why}",
                          "audit a scenario with privacy.mechanism = \"dp-fedavg\" or \"dp-sgd\"")
    if not 0 < confidence < 1:
        raise ConfigError("audit.confidence", f"must lie in (0, 1), got {confidence}", "use e.g. 0.95")
    if trials < 200:
        raise ConfigError("audit.trials", f"too few runs to bound ε: got {trials}, need at least 200",
                          "use thousands of trials (--trials 4000)")
    if scenario.privacy.noise_multiplier <= 0:
        raise ConfigError("privacy.noise_multiplier", "no noise: the claimed ε is infinite, nothing to audit",
                          "set privacy.noise_multiplier > 0")
    n_in = trials // 2
    run = _fedavg_trials if mech == "dp-fedavg" else _dp_sgd_trials
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus, harmless here
        s_in, s_out, claimed, release, canary = run(scenario, n_in, trials - n_in)
    p = scenario.privacy
    release = {**release, "accountant": p.accountant, "delta": p.delta}
    result = audit_scores(s_in, s_out, delta=p.delta, claimed_epsilon=claimed, confidence=confidence,
                          select_fraction=SELECT_FRACTION)
    return AuditReport(scenario.run.name, mech, scenario.run.seed, release, canary, result)


def _claimed(scenario, event, count: int) -> float:
    from fedsim.privacy.accountants import make_accountant

    acc = make_accountant(scenario.privacy.accountant)
    acc.compose(event, count)
    return acc.epsilon(scenario.privacy.delta)


def _initial_model(scenario) -> torch.nn.Module:
    """The global model of round 1, as the server builds it."""
    from fedsim.data.federation import federation_of
    from fedsim.models import build_model

    fed = federation_of(scenario)
    return build_model(scenario.model, tuple(fed.input_shape), int(fed.num_classes),
                       derive_seed(scenario.run.seed, "model-init"))


# ------------------------------------------------------------------------------------ DP-FedAvg
class _Grid:
    """The smallest grid the strategy's sampling needs: one node per partition, all reachable."""

    def __init__(self, n: int) -> None:
        self.node_partitions = {pid + 1: pid for pid in range(n)}

    def get_node_ids(self) -> list[int]:
        return list(self.node_partitions)


def _fedavg_trials(scenario, n_in: int, n_out: int):
    from fedsim.privacy.clipping import per_layer_bounds
    from fedsim.strategies.base import ClientUpdate, make_strategy
    from fedsim.wire import state_to_arrays

    strategy = make_strategy(scenario)
    strategy.set_global(state_to_arrays(_initial_model(scenario)))
    state0 = {k: np.array(v, copy=True) for k, v in strategy.state_dict().items()}
    current = [np.asarray(a) for a in strategy.current]
    idx = [i for i, a in enumerate(current) if a.dtype.kind == "f"]
    rng = numpy_rng(scenario.run.seed, "audit", "dp-fedavg", "canary")
    u = [rng.standard_normal(current[i].shape) for i in idx]
    clip = float(strategy.clip_norm)
    if scenario.privacy.clipping == "per_layer":
        bounds = per_layer_bounds(clip, [current[i].shape for i in idx])
        target = [b * v / np.linalg.norm(v) for b, v in zip(bounds, u)]
    else:
        total = float(np.sqrt(sum(np.sum(v * v) for v in u)))
        target = [clip * v / total for v in u]
    direction = [t / clip for t in target]  # unit: the clipped canary's direction

    def shifted(sign: float) -> list[np.ndarray]:
        out = list(current)
        for i, t in zip(idx, target):
            out[i] = (current[i].astype(np.float64) + sign * 2.0 * t).astype(current[i].dtype)
        return out

    canary, anti = shifted(1.0), shifted(-1.0)
    poisson = scenario.privacy.client_sampling == "poisson"
    grid = _Grid(scenario.data.num_clients)

    def trial(rnd: int, with_canary: bool) -> float:
        strategy.load_state_dict(state0)  # adaptive clipping moves the clip norm: every trial starts alike
        strategy.prepare_round(rnd)
        picks = strategy.sample(rnd, grid)
        if poisson and not with_canary:
            picks = [(p, node) for p, node in picks if p != 0]  # add/remove: the canary client is absent
        strategy.sampled = [p for p, _ in picks]
        updates = [ClientUpdate(p, node, (canary if with_canary else anti) if p == 0 else current, 1, {}, None)
                   for p, node in picks]
        new = strategy.aggregate(rnd, updates)
        return float(sum(np.vdot(new[i].astype(np.float64) - current[i], d) for i, d in zip(idx, direction)))

    s_in = np.array([trial(1 + t, True) for t in range(n_in)])
    s_out = np.array([trial(1 + n_in + t, False) for t in range(n_out)])
    mech = strategy.mechanism
    release = {"kind": "round", "count": 1, "noise_multiplier": mech.noise_multiplier,
               "sampling": mech.sampling, "sample_rate": mech.rate, "sample_size": mech.sample_size,
               "population": mech.population, "clipping": scenario.privacy.clipping,
               "adaptive_clipping": scenario.privacy.adaptive_clipping}
    canary_info = {"kind": "client update", "client": 0, "norm_over_clip": 2.0, "others": "zero updates",
                   "out_world": "canary client absent" if poisson else "canary client sends the opposite update"}
    return s_in, s_out, _claimed(scenario, mech.event, 1), release, canary_info


# --------------------------------------------------------------------------------------- DP-SGD
def _dp_sgd_trials(scenario, n_in: int, n_out: int):
    from fedsim.clients.plugin_api import build_plugins
    from fedsim.clients.tasks import dp_sgd_settings
    from fedsim.clients.trainer import train_local
    from fedsim.data.federation import federation_of
    from fedsim.models import resolve_device
    from fedsim.privacy.events import PoissonGaussianEvent
    from fedsim.strategies.base import STRATEGIES

    names = STRATEGIES.get(scenario.strategy.name, key="strategy.name").plugin_names(scenario)
    if names != ["dp_sgd"]:
        raise ConfigError("client.plugins", f"the DP-SGD audit runs the dp_sgd plugin alone; this scenario "
                          f"runs {names}", "audit a scenario whose clients run only dp_sgd")
    torch.set_num_threads(scenario.run.threads)
    device = resolve_device(scenario.run.device)
    fed = federation_of(scenario)
    ids = fed.client_indices[0]
    x = torch.tensor(np.asarray(fed.dataset.x_train[ids]), dtype=torch.float32, device=device)
    y = torch.tensor(np.asarray(fed.dataset.y_train[ids]), dtype=torch.long, device=device)
    p, c = scenario.privacy, scenario.client
    q = p.sample_rate or min(1.0, c.batch_size / max(int(x.shape[0]), 1))
    audit = scenario.model_copy(deep=True)
    audit.privacy.sample_rate = q
    audit.client.epochs, audit.client.max_steps = 1, 1
    model = _initial_model(scenario).to(device)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x_c, y_c, direction, info = _gradient_canary(model, x, y, p.clip_norm, full=q >= 1.0,
                                                 seed=scenario.run.seed)
    x_in, y_in = torch.cat([x, x_c[None]]), torch.cat([y, y_c.reshape(1)])
    theta0 = torch.cat([t.detach().reshape(-1) for t in model.parameters()])
    settings = lambda name: dp_sgd_settings(audit)  # noqa: E731

    def trial(t: int, with_canary: bool) -> float:
        model.load_state_dict(init)
        stack = build_plugins(["dp_sgd"], settings)
        res = train_local(model, x_in if with_canary else x, y_in if with_canary else y, audit.client, stack,
                          round=1, client_id=0, seed=scenario.run.seed,
                          rng=torch_generator(scenario.run.seed, "audit", "dp-sgd", int(with_canary), t))
        _check_release(res, q, p.noise_multiplier)
        theta1 = torch.cat([t_.detach().reshape(-1) for t_ in model.parameters()])
        return float(torch.dot(theta0 - theta1, direction))

    s_in = np.array([trial(t, True) for t in range(n_in)])
    s_out = np.array([trial(t, False) for t in range(n_out)])
    model.load_state_dict(init)
    release = {"kind": "local step", "count": 1, "noise_multiplier": p.noise_multiplier, "sampling": "poisson",
               "sample_rate": q, "sample_rate_pinned": not p.sample_rate, "client": 0,
               "local_samples": int(x.shape[0]), "clip_norm": p.clip_norm}
    return s_in, s_out, _claimed(scenario, PoissonGaussianEvent(p.noise_multiplier, q), 1), release, info


def _check_release(res, q: float, z: float) -> None:
    """Refuse to compare with a claim for something other than what ran."""
    m = res.metrics
    ran = {"steps": (res.steps, 1), "dp_sgd/sample_rate": (m.get("dp_sgd/sample_rate", q), q),
           "dp_sgd/noise_multiplier": (m.get("dp_sgd/noise_multiplier", z), z)}
    bad = {k: a for k, (a, b) in ran.items() if not np.isclose(float(a), float(b), rtol=1e-12, atol=0)}
    if bad:
        raise FedSimError(f"the DP-SGD trial ran {bad}, the audit accounts steps=1, q={q:g}, z={z:g}",
                          "the dp_sgd plugin and the scenario disagree: fix the plugin's settings")


def _per_sample_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 256):
    """Per-sample gradients of the summed cross-entropy, flattened in ``model.parameters()`` order."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(prm, xi, yi):
        out = functional_call(model, (prm, buffers), (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None], reduction="sum")

    g = vmap(grad(loss), in_dims=(None, 0, 0))
    for s in range(0, int(x.shape[0]), chunk):
        gs = g(params, x[s:s + chunk], y[s:s + chunk])
        yield torch.cat([gs[k].reshape(gs[k].shape[0], -1) for k in params], dim=1)


def _gradient_canary(model, x, y, clip_norm: float, *, full: bool, seed: int, directions: int = 64):
    """Craft the canary sample and the unit score direction (see the module docstring).

    Candidates: inputs ``a·v`` with ``v`` a unit vector on the client's all-zero features (each
    feature alone, both signs, plus ``directions`` random ones), ``a`` in {30, 300}, every
    label. Kept: the largest share of the gradient on parameters no client sample moves (the
    *exclusive* fraction), among those with gradient norm at least ``2C``.
    """
    was_training = model.training
    model.eval()
    flat_x = x.reshape(x.shape[0], -1)
    exclusive = None
    for g in _per_sample_grads(model, x, y):
        touched = g.abs().sum(0) > 0
        exclusive = ~touched if exclusive is None else exclusive & ~touched
    zero_feats = torch.nonzero((flat_x == 0).all(0)).flatten()
    gen = torch.Generator().manual_seed(derive_seed(seed, "audit", "dp-sgd", "canary"))
    k = int(zero_feats.numel())
    width = k if k else int(flat_x.shape[1])
    cols = zero_feats if k else torch.arange(width)
    v = torch.randn(directions, width, generator=gen)
    if k:
        v = torch.cat([v, torch.eye(k), -torch.eye(k)])
    v = v / v.norm(dim=1, keepdim=True)
    classes = int(model(x[:1]).shape[1])
    best = (-1.0, None)
    for a in (30.0, 300.0):
        cand = torch.zeros(v.shape[0], flat_x.shape[1], device=x.device)
        cand[:, cols] = a * v.to(x.device)
        cand = cand.reshape(v.shape[0], *x.shape[1:])
        for label in range(classes):
            labels = torch.full((v.shape[0],), label, dtype=torch.long, device=x.device)
            g = torch.cat(list(_per_sample_grads(model, cand, labels)))
            norm = g.norm(dim=1)
            frac = (g * exclusive).norm(dim=1) / norm.clamp_min(1e-30)
            frac[~(norm >= 2.0 * clip_norm) | ~torch.isfinite(norm)] = -1.0
            i = int(frac.argmax())
            if float(frac[i]) > best[0]:
                best = (float(frac[i]), (cand[i], torch.tensor(label, device=x.device), g[i]))
    model.train(was_training)
    if best[1] is None:
        raise ConfigError("privacy.clip_norm", f"no canary reaches a gradient norm of 2C = {2 * clip_norm:g}",
                          "lower privacy.clip_norm, or audit another model")
    share, (x_c, y_c, g_c) = best
    use_exclusive = not full and share > 0
    d = g_c * exclusive if use_exclusive else g_c
    info = {"kind": "gradient canary (one extra sample)", "client": 0, "dedicated_features": k,
            "exclusive_gradient_share": share, "label": int(y_c),
            "score": "exclusive coordinates" if use_exclusive else "full clipped gradient",
            "input_scale": float(x_c.abs().max())}
    return x_c, y_c, d / d.norm(), info
