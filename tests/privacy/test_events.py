"""Privacy events: validation, JSON round trip, dp_accounting translation, sampled events."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.errors import ConfigError
from fedsim.privacy.events import (
    EVENT_TYPES,
    FixedSizeGaussianEvent,
    GaussianEvent,
    PoissonGaussianEvent,
    ZCDPEvent,
    event_from_dict,
    event_rho,
    event_sample_rate,
    event_to_dict,
    sampled_event,
    to_dp_event,
)


def test_events_round_trip():
    for ev in (PoissonGaussianEvent(1.0, 0.1), FixedSizeGaussianEvent(1.0, 10, 100), GaussianEvent(2.0),
               ZCDPEvent(0.1, gaussian=False)):
        assert event_from_dict(json.loads(json.dumps(event_to_dict(ev)))) == ev


event_strategy = st.one_of(
    st.builds(PoissonGaussianEvent, st.floats(0.0, 50.0), st.floats(0.0, 1.0)),
    st.builds(lambda z, m, extra, s: FixedSizeGaussianEvent(z, m, m + extra, s),
              st.floats(0.0, 50.0), st.integers(0, 10**6), st.integers(1, 10**6), st.floats(0.1, 4.0)),
    st.builds(GaussianEvent, st.floats(0.0, 50.0)),
    st.builds(ZCDPEvent, st.floats(0.0, 1e3), st.booleans()),
)


@settings(max_examples=50, deadline=None)
@given(ev=event_strategy)
def test_event_json_round_trip_property(ev):
    data = event_to_dict(ev)
    assert data["kind"] == ev.kind and EVENT_TYPES[ev.kind] is type(ev)
    back = event_from_dict(json.loads(json.dumps(data)))
    assert back == ev and hash(back) == hash(ev)


def test_event_validation():
    with pytest.raises(ConfigError):
        PoissonGaussianEvent(1.0, 1.5)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        GaussianEvent(-1.0)
    with pytest.raises(ConfigError, match="sample_size"):
        FixedSizeGaussianEvent(1.0, 11, 10)
    with pytest.raises(ConfigError, match="replace_sensitivity"):
        FixedSizeGaussianEvent(1.0, 1, 10, replace_sensitivity=0.0)
    with pytest.raises(ConfigError, match="rho"):
        ZCDPEvent(-0.1)
    with pytest.raises(ConfigError, match="unknown privacy event kind"):
        event_from_dict({"kind": "laplace", "scale": 1.0})


def test_to_dp_event():
    assert to_dp_event(GaussianEvent(2.0)) == dp_accounting.GaussianDpEvent(2.0)
    assert to_dp_event(PoissonGaussianEvent(1.5, 1.0)) == dp_accounting.GaussianDpEvent(1.5)
    assert to_dp_event(PoissonGaussianEvent(1.5, 0.04)) == dp_accounting.PoissonSampledDpEvent(
        0.04, dp_accounting.GaussianDpEvent(1.5))
    # replace-one sensitivity 2C halves the noise multiplier
    assert to_dp_event(FixedSizeGaussianEvent(2.0, 10, 1000)) == dp_accounting.SampledWithoutReplacementDpEvent(
        1000, 10, dp_accounting.GaussianDpEvent(1.0))
    assert to_dp_event(FixedSizeGaussianEvent(2.0, 10, 10)) == dp_accounting.GaussianDpEvent(1.0)
    assert to_dp_event(ZCDPEvent(0.3)) == dp_accounting.ZCDpEvent(0.3)
    with pytest.raises(ConfigError, match="unsupported privacy event"):
        to_dp_event("not an event")


def test_event_rho_and_sample_rate():
    assert event_rho(GaussianEvent(1.0)) == 0.5
    assert event_rho(FixedSizeGaussianEvent(2.0, 5, 5)) == 0.5
    assert event_rho(ZCDPEvent(0.25)) == 0.25
    assert event_rho(GaussianEvent(0.0)) == math.inf
    assert event_rho(PoissonGaussianEvent(0.0, 0.0)) == 0.0  # samples nobody
    assert event_sample_rate(GaussianEvent(1.0)) == 1.0
    assert event_sample_rate(FixedSizeGaussianEvent(1.0, 10, 40)) == 0.25
    assert event_sample_rate(PoissonGaussianEvent(1.0, 0.1)) == 0.1


def test_sampled_event():
    assert sampled_event(1.0, 0.1) == PoissonGaussianEvent(1.0, 0.1)
    assert sampled_event(1.0, 0.1, "fixed") == FixedSizeGaussianEvent(1.0, 1, 10)
    assert sampled_event(1.0, 0.013, "without_replacement", 1000) == FixedSizeGaussianEvent(1.0, 13, 1000)
    assert sampled_event(1.0, 0.0001, "fixed", 100) == FixedSizeGaussianEvent(1.0, 1, 100)  # at least one
    with pytest.raises(ConfigError, match="sample_rate"):
        sampled_event(1.0, 0.0, "fixed")
    with pytest.raises(ConfigError, match="unknown sampling scheme"):
        sampled_event(1.0, 0.1, "shuffle")
