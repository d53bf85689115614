from hypothesis import given
from hypothesis import strategies as st

from fedsim.clients.schedules import cosine, in_window, linear

P = st.floats(0, 1)


@given(P, st.floats(-5, 5), st.floats(-5, 5))
def test_schedules_start_and_end_at_their_values_and_stay_between(p, a, b):
    for f in (linear, cosine):
        assert f(0.0, a, b) == a or abs(f(0.0, a, b) - a) < 1e-12
        assert abs(f(1.0, a, b) - b) < 1e-12
        assert min(a, b) - 1e-12 <= f(p, a, b) <= max(a, b) + 1e-12


def test_window_and_clamping():
    assert linear(0.1, 0.0, 1.0, start=0.5, end=0.9) == 0.0
    assert abs(linear(0.7, 0.0, 1.0, start=0.5, end=0.9) - 0.5) < 1e-12
    assert in_window(0.5, 0.5, 0.9) and not in_window(0.9, 0.5, 0.9)
