"""Accountants: golden values (Opacus, dp_accounting, spec §7 tables), Opacus cross-check, properties.

Events and their serialisation are tested in ``test_events.py``, the math of ``analysis`` in
``test_analysis.py``.
"""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting import rdp as dp_rdp
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant as OpacusRDP

from fedsim.errors import ConfigError, UnknownNameError
from fedsim.privacy import accountants, analysis, events
from fedsim.privacy.accountants import ACCOUNTANTS, RdpAccountant, make_accountant
from fedsim.privacy.events import FixedSizeGaussianEvent, GaussianEvent, PoissonGaussianEvent, ZCDPEvent

OPACUS_ORDERS = list(OpacusRDP.DEFAULT_ALPHAS)


def eps(name: str, event, count: int, delta: float = 1e-5) -> float:
    acc = make_accountant(name)
    acc.compose(event, count)
    return acc.epsilon(delta)


def test_registry_names():
    assert ACCOUNTANTS.names() == ["pld", "rdp", "zcdp"]
    with pytest.raises(UnknownNameError, match="allowed: pld, rdp, zcdp"):
        make_accountant("prv")


def test_opacus_golden_rdp():
    # Opacus's accountant test: sigma 1.5, q 0.04, 2250 steps, delta 1e-5 -> 7.32911117143.
    assert eps("rdp", PoissonGaussianEvent(1.5, 0.04), 2250) == pytest.approx(7.32911117143, abs=1e-6)


def test_opacus_golden_pld_vs_prv():
    # Opacus's PRV golden 6.777395712150674 is for int(90 // 0.04) = 2249 steps (its RDP golden for
    # int(90 / 0.04) = 2250). PLD is the same kind of numerical composition: within 1 %.
    assert eps("pld", PoissonGaussianEvent(1.5, 0.04), 2249) == pytest.approx(6.777395712150674, rel=0.01)


@pytest.mark.parametrize(
    "q, z, steps, rdp_eps, pld_eps",
    [
        (256 / 60000, 1.1, 14062, 2.5966, 2.3817),
        (0.01, 1.0, 10000, 6.7127, 6.1877),
        (0.1, 1.0, 1000, 27.163, 25.205),
        (1.0, 10.0, 100, 4.7285, 4.3772),
    ],
)
def test_spec_table_7_2(q, z, steps, rdp_eps, pld_eps):
    assert eps("rdp", PoissonGaussianEvent(z, q), steps) == pytest.approx(rdp_eps, abs=1e-3)
    assert eps("pld", PoissonGaussianEvent(z, q), steps) == pytest.approx(pld_eps, rel=0.01)


def test_spec_conversions_7_1_accountants():
    # The closed forms of the same table are in test_analysis.py::test_spec_conversions_7_1.
    # rho = 0.5 is one Gaussian with mu = 1: PLD is exact, RDP on its grid, zCDP continuous.
    assert eps("pld", ZCDPEvent(0.5), 1) == pytest.approx(4.3772, rel=1e-3)
    assert eps("rdp", ZCDPEvent(0.5), 1) == pytest.approx(4.7285, abs=1e-4)
    assert eps("zcdp", ZCDPEvent(0.5), 1) == pytest.approx(4.7284, abs=1e-4)
    assert eps("zcdp", GaussianEvent(1.0), 1) == pytest.approx(4.7284, abs=1e-4)


def test_tree_event_matches_zcdp_event():
    # Spec 7.2 gotcha: tree T=1000, z=sqrt(10) -> RDP alpha*10/(2*10) -> same as ZCDpEvent(0.5).
    acc = dp_rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(math.sqrt(10), 1000))
    assert acc.get_epsilon(1e-5) == pytest.approx(eps("rdp", ZCDPEvent(0.5), 1), abs=1e-9)
    assert acc.get_epsilon(1e-5) == pytest.approx(4.7285, abs=1e-4)


@pytest.mark.filterwarnings("ignore:Optimal order")
@settings(max_examples=25, deadline=None)
@given(
    z=st.floats(0.5, 5.0),
    log_q=st.floats(-3.0, 0.0),
    steps=st.integers(1, 5000),
    log_delta=st.floats(-8.0, -3.0),
)
def test_matches_opacus_rdp_on_random_inputs(z, log_q, steps, log_delta):
    q, delta = 10**log_q, 10**log_delta
    ours = RdpAccountant(orders=OPACUS_ORDERS)
    ours.compose(PoissonGaussianEvent(z, q), steps)
    opacus = OpacusRDP()
    opacus.history = [(z, q, steps)]
    expected = opacus.get_epsilon(delta)
    assert ours.epsilon(delta) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # The default (larger) order grid can only do better.
    assert eps("rdp", PoissonGaussianEvent(z, q), steps, delta) <= expected * (1 + 1e-6) + 1e-9


@pytest.mark.parametrize("name", ["rdp", "zcdp"])
@settings(max_examples=15, deadline=None)
@given(z=st.floats(0.6, 8.0), q=st.floats(1e-3, 1.0), steps=st.integers(1, 2000), extra=st.integers(0, 2000),
       factor=st.floats(1.0, 3.0))
def test_epsilon_monotone(name, z, q, steps, extra, factor):
    event = (lambda zz: GaussianEvent(zz)) if name == "zcdp" else (lambda zz: PoissonGaussianEvent(zz, q))
    base = eps(name, event(z), steps)
    assert eps(name, event(z), steps + extra) >= base - 1e-9  # non-decreasing in steps
    assert eps(name, event(z * factor), steps) <= base + 1e-9  # non-increasing in noise


@settings(max_examples=3, deadline=None)
@given(z=st.floats(1.0, 3.0), q=st.floats(0.01, 0.1), steps=st.integers(10, 300), extra=st.integers(1, 300))
def test_pld_monotone(z, q, steps, extra):
    base = eps("pld", PoissonGaussianEvent(z, q), steps)
    assert eps("pld", PoissonGaussianEvent(z, q), steps + extra) >= base - 1e-6
    assert eps("pld", PoissonGaussianEvent(1.5 * z, q), steps) <= base + 1e-6
    assert base <= eps("rdp", PoissonGaussianEvent(z, q), steps)  # PLD is tighter than RDP


event_strategy = st.one_of(
    st.builds(PoissonGaussianEvent, st.floats(0.8, 5.0), st.floats(0.001, 1.0)),
    st.builds(GaussianEvent, st.floats(0.8, 20.0)),
    st.builds(ZCDPEvent, st.floats(0.0, 0.5)),
)


def _round_trip_and_resume(name, history, cut):
    full = make_accountant(name)
    for ev, n in history:
        full.compose(ev, n)
    # Interrupt after `cut` entries, persist as JSON, resume, finish: identical ledger and epsilon.
    first = make_accountant(name)
    for ev, n in history[:cut]:
        first.compose(ev, n)
    resumed = make_accountant(name)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for ev, n in history[cut:]:
        resumed.compose(ev, n)
    assert resumed.ledger == full.ledger
    assert resumed.state_dict() == full.state_dict()
    assert resumed.epsilon(1e-5) == full.epsilon(1e-5)


@settings(max_examples=15, deadline=None)
@given(history=st.lists(st.tuples(event_strategy, st.integers(0, 50)), min_size=1, max_size=4), cut=st.integers(0, 4))
def test_state_round_trip_and_resume_rdp(history, cut):
    _round_trip_and_resume("rdp", history, cut)


def test_state_round_trip_and_resume_pld():
    # PLD composition is slow at high epsilon, so one realistic history instead of Hypothesis.
    history = [(PoissonGaussianEvent(1.2, 0.05), 40), (ZCDPEvent(0.05), 2), (PoissonGaussianEvent(1.2, 0.05), 10),
               (GaussianEvent(8.0), 1)]
    _round_trip_and_resume("pld", history, cut=2)


def test_ledger_merges_repeats():
    # (The events' own JSON round trip is in test_events.py.)
    acc = make_accountant("rdp")
    for _ in range(5):
        acc.compose(PoissonGaussianEvent(1.0, 0.01))
    acc.compose(GaussianEvent(3.0), 2)
    assert acc.ledger == [(PoissonGaussianEvent(1.0, 0.01), 5), (GaussianEvent(3.0), 2)]


def test_budget_checks():
    # The budget check of a run (fedsim.privacy.ledger) is "epsilon_if(next) > max_epsilon: refuse,
    # else compose"; epsilon_if must predict the composed epsilon and compose nothing itself.
    acc = make_accountant("rdp")
    event = PoissonGaussianEvent(1.0, 0.01)
    planned = acc.epsilon_if(event, 1000, 1e-5)
    assert planned <= 10.0  # fits a budget of 10: compose it
    acc.compose(event, 1000)
    spent = acc.epsilon(1e-5)
    assert spent == planned
    assert acc.epsilon_if(event, 100_000, 1e-5) > spent + 0.01  # would exceed the budget spent + 0.01
    assert not acc.epsilon_if(event, 0, 1e-5) > spent  # composing nothing never exceeds
    assert acc.epsilon(1e-5) == spent  # a refused release is not composed
    assert acc.ledger == [(event, 1000)]


def test_accountants_re_exports_for_existing_callers():
    # The privacy ledger (and its mechanisms) import these from accountants: the very same objects.
    assert accountants.PoissonGaussianEvent is events.PoissonGaussianEvent
    assert accountants.FixedSizeGaussianEvent is events.FixedSizeGaussianEvent
    assert accountants.zcdp_to_epsilon is analysis.zcdp_to_epsilon
    assert {"PoissonGaussianEvent", "FixedSizeGaussianEvent", "make_accountant", "zcdp_to_epsilon"} <= set(
        accountants.__all__)
    assert not hasattr(accountants.Accountant, "spend") and not hasattr(accountants.Accountant, "would_exceed")


def test_load_refuses_other_accountant():
    rdp = make_accountant("rdp")
    rdp.compose(GaussianEvent(2.0))
    with pytest.raises(ConfigError, match="privacy.accountant"):
        make_accountant("pld").load_state_dict(rdp.state_dict())


def test_sampling_without_replacement():
    # RDP uses dp_accounting's WOR bound (replace-one) with the replace-one sensitivity 2C.
    ours = eps("rdp", FixedSizeGaussianEvent(2.0, 10, 1000), 500)
    ref = dp_rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    ref.compose(dp_accounting.SampledWithoutReplacementDpEvent(1000, 10, dp_accounting.GaussianDpEvent(1.0)), 500)
    assert ours == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)
    with pytest.raises(ConfigError, match="without replacement"):
        make_accountant("pld").compose(FixedSizeGaussianEvent(2.0, 10, 1000))
    mixed = make_accountant("rdp")
    mixed.compose(FixedSizeGaussianEvent(2.0, 10, 1000))
    with pytest.raises(ConfigError, match="cannot be composed"):
        mixed.compose(PoissonGaussianEvent(2.0, 0.01))


def test_zcdp_refuses_subsampling_and_pld_refuses_generic_zcdp():
    with pytest.raises(ConfigError, match="subsampling"):
        make_accountant("zcdp").compose(PoissonGaussianEvent(1.0, 0.1))
    with pytest.raises(ConfigError, match="Gaussian mechanism"):
        make_accountant("pld").compose(ZCDPEvent(0.1, gaussian=False))


def test_no_noise_means_infinite_epsilon_and_bad_inputs_are_typed():
    assert eps("rdp", PoissonGaussianEvent(0.0, 0.1), 1) == math.inf
    assert eps("pld", GaussianEvent(0.0), 1) == math.inf
    assert make_accountant("zcdp").epsilon(1e-5) == 0.0
    with pytest.raises(ConfigError):
        make_accountant("rdp").epsilon(0.0)
    with pytest.raises(ConfigError):
        make_accountant("rdp").compose(GaussianEvent(1.0), -1)
