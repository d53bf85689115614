"""ReSTE (spec §B.10): sign forward, the estimator's shape against o, the o schedule (endpoints, monotone in
the run's progress, never restarting in a round), the binarised layers, and the 1-bit uplink."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedsim.clients.plugin_api import Event
from fedsim.clients.plugins.reste import BinaryLinear, ReSTE, binarize, binary_weight, o_schedule, reste_slope
from fedsim.clients.plugin_api import PluginStack
from fedsim.clients.trainer import train_local
from fedsim.errors import ConfigError
from fedsim.models import build_model
from tests.clients.plugins.loop_helpers import Recorder, data, weights
from tests.conftest import tiny

DEEP = ["model.hidden=[16, 16]", "client.max_steps=4", "client.batch_size=16"]


def _round(plugins, x, y):
    """One local round of a 64-16-16-10 MLP with ``plugins``: (model, result)."""
    s = tiny(DEEP)
    model = build_model(s.model, (64,), 10, 0)
    res = train_local(model, x, y, s.client, PluginStack(plugins), round=1, client_id=0, seed=0,
                      rng=torch.Generator().manual_seed(1), progress=0.0, progress_span=0.5)
    return model, res

X = torch.tensor([-2.0, -1.5, -1.0, -0.5, -0.1, -0.05, 0.0, 0.05, 0.1, 0.3, 1.0, 1.5, 1.6], dtype=torch.float64)


def _autograd_slope(x, t, o):
    xx = x.clone().requires_grad_(True)
    binarize(xx, t, o).sum().backward()
    return xx.grad


def test_forward_is_torch_sign():
    assert torch.equal(binarize(X, 1.5, 2.0), torch.sign(X))
    assert set(binarize(X, 1.5, 2.0).tolist()) <= {-1.0, 0.0, 1.0}


def test_at_o_one_the_backward_is_the_clipped_ste():
    assert torch.equal(_autograd_slope(X, 1.5, 1.0), (X.abs() <= 1.5).double())


@pytest.mark.parametrize("o", [1.5, 2.0, 3.0])
def test_backward_is_the_power_function_derivative_with_a_secant_near_zero(o):
    g = _autograd_slope(X, 1.5, o)
    assert torch.isfinite(g).all()
    for x, slope in zip(X.tolist(), g.tolist()):
        ax = abs(x)
        if ax > 1.5:
            expected = 0.0
        elif ax <= 0.1:
            expected = 0.1 ** (1 / o) / 0.1  # the secant of g_o over [0, 0.1]
        else:
            expected = (1 / o) * ax ** (1 / o - 1)
        assert slope == pytest.approx(expected, rel=1e-12), x
    # the power branch is the derivative of g_o(x) = sign(x)|x|^(1/o): check by finite differences
    x, h = 0.7, 1e-6
    fd = ((x + h) ** (1 / o) - (x - h) ** (1 / o)) / (2 * h)
    assert float(reste_slope(torch.tensor(x, dtype=torch.float64), 1.5, o)) == pytest.approx(fd, rel=1e-6)


def test_larger_o_steepens_near_zero_and_flattens_far_from_it():
    near, far = torch.tensor(0.05), torch.tensor(1.2)
    assert reste_slope(near, 1.5, 3.0) > reste_slope(near, 1.5, 2.0) > reste_slope(near, 1.5, 1.0)
    assert reste_slope(far, 1.5, 3.0) < reste_slope(far, 1.5, 2.0) < reste_slope(far, 1.5, 1.0)


def test_schedule_endpoints_and_monotone():
    assert o_schedule(0.0, 3.0) == 1.0 and o_schedule(1.0, 3.0) == pytest.approx(3.0)
    values = [o_schedule(p / 100, 3.0) for p in range(101)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert o_schedule(0.5, 3.0) == pytest.approx(1 + 2 * (1 - math.cos(math.pi / 4)))


def test_o_follows_global_progress_across_rounds_and_never_restarts():
    seen = []

    def look(event, state):
        seen.append((state.progress, state.model[3].o))
    rec = Recorder(look, [Event.BEFORE_FORWARD])
    x, y = data(n=64, d=64)
    s = tiny(DEEP)
    model = build_model(s.model, (64,), 10, 0)
    plugin = ReSTE(ReSTE.Settings(o_end=3.0))
    for rnd in (1, 2):
        train_local(model, x, y, s.client, PluginStack([plugin, rec]), round=rnd, client_id=0, seed=0,
                    rng=torch.Generator().manual_seed(rnd), progress=(rnd - 1) / 2, progress_span=0.5)
    os_ = [o for _, o in seen]
    assert len(os_) == 8 and os_[0] == 1.0
    assert all(b > a for a, b in zip(os_, os_[1:]))  # rises every step, also from round 1 to round 2
    assert all(o == pytest.approx(o_schedule(p, 3.0)) for p, o in seen)


def test_binary_layers_compute_with_scaled_signs_and_binary_inputs():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    b = BinaryLinear(lin, 1.5, activations=True)
    x = torch.randn(5, 6)
    expected = nn.functional.linear(torch.sign(x), torch.sign(lin.weight) * lin.weight.abs().mean(), lin.bias)
    torch.testing.assert_close(b(x), expected)
    w = binary_weight(lin.weight, 1.5, 1.0)
    assert torch.unique(w.detach().abs()).numel() == 1


def test_plugin_binarises_hidden_layers_sends_one_bit_weights_and_restores_the_model():
    types = []
    rec = Recorder(lambda e, s: types.append([type(m).__name__ for m in s.model]), [Event.AFTER_STEP])
    x, y = data()
    model, res = _round([ReSTE(), rec], x, y)
    latent, _ = _round([ReSTE(ReSTE.Settings(uplink="latent"))], x, y)
    plain, _ = _round([], x, y)
    neutral, _ = _round([ReSTE(ReSTE.Settings.neutral())], x, y)
    assert types[0] == ["Flatten", "Linear", "ReLU", "BinaryLinear", "ReLU", "Linear"]
    assert [type(m).__name__ for m in model] == ["Flatten", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    w = model[3].weight.detach()
    assert torch.unique(w.abs()).numel() == 1  # one scale, one sign per weight
    assert torch.equal(w, torch.sign(latent[3].weight.detach()) * latent[3].weight.detach().abs().mean())
    assert torch.equal(model[1].weight, latent[1].weight)  # the full-precision first layer is sent as trained
    assert res.metrics["reste/uplink_bits"] == 16 * 16 + 32
    assert not torch.equal(latent[3].weight, plain[3].weight)
    assert weights(neutral) == weights(plain)


def test_settings_are_validated():
    for bad in (dict(layers="all"), dict(uplink="int8"), dict(t=0.05), dict(o_end=0.5)):
        with pytest.raises(ValueError):
            ReSTE.Settings(**bad)


def test_a_model_without_hidden_layers_is_refused_before_the_run():
    with pytest.raises(ConfigError, match="client.reste.layers"):
        tiny(['client.plugins=["reste"]', "model.hidden=[16]"])


def test_binarize_works_under_torch_func():
    from torch.func import grad, vmap

    xs = X.reshape(-1, 1)
    g = vmap(grad(lambda v: binarize(v, 1.5, 2.0).sum()))(xs)
    torch.testing.assert_close(g.flatten(), reste_slope(X, 1.5, 2.0))


# ------------------------------------------------------------------ the 1-bit uplink on the wire
import numpy as np  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, RecordDict  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as hst  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from fedsim.errors import ClientUpdateError  # noqa: E402
from fedsim.sign_codec import encode_arrays, is_sign_binary, pack_signs, packed_size, unpack_signs  # noqa: E402
from fedsim.strategies.replies import decode_sign_reply  # noqa: E402
from fedsim.wire import from_numpy, to_numpy  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=9),
       hst.floats(0, 1e6, width=32), hst.data())
def test_sign_codec_round_trip_is_exact(shape, scale, draw):
    signs = draw.draw(hnp.arrays(np.bool_, shape))
    w = np.where(signs, np.float32(scale), -np.float32(scale)).astype(np.float32)
    bits, s = pack_signs(w)
    assert bits.dtype == np.uint8 and bits.size == packed_size(shape) == math.ceil(w.size / 8)
    back = unpack_signs(bits, s, shape)
    assert back.dtype == np.float32 and back.shape == w.shape
    assert np.array_equal(back, w) and (scale == 0 or np.array_equal(np.signbit(back), np.signbit(w)))


def test_sign_codec_refuses_what_it_cannot_represent():
    for w in (np.array([1.0, -1.0, 0.0], np.float32), np.array([1.0, 2.0], np.float32),
              np.array([1.0, -1.0]), np.array([np.inf, -np.inf], np.float32), np.zeros(0, np.float32)):
        assert not is_sign_binary(w)
        with pytest.raises(ValueError):
            pack_signs(w)
    bits, s = pack_signs(np.array([0.5, -0.5, 0.5], np.float32))
    for b, sc, shape in ((bits, s, (4, 4)), (bits | np.uint8(1), s, (3,)), (bits.astype(np.int8), s, (3,)),
                         (bits, -1.0, (3,)), (bits, 0.1, (3,)), (bits, float("nan"), (3,))):
        with pytest.raises(ValueError):
            unpack_signs(b, sc, shape)


def test_uplink_sends_exact_zeros_as_plus_scale_so_the_codec_is_exact():
    from types import SimpleNamespace

    s = tiny(DEEP)
    model = build_model(s.model, (64,), 10, 0)
    with torch.no_grad():
        model[3].weight[0, :3] = torch.tensor([0.0, -0.0, 0.0])
    state = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress=0.0,
                            metrics={})
    plugin = ReSTE()
    plugin.on(Event.ROUND_START, state)
    plugin.on(Event.ROUND_END, state)
    w = model[3].weight.detach().numpy()
    assert np.all(w[0, :3] == np.abs(w).max()) and w[0, 0] > 0 and is_sign_binary(w)
    assert state.metrics["codec.sign1:3.weight"] == 1.0 and len(state.metrics) == 3
    assert np.array_equal(unpack_signs(*pack_signs(w), w.shape), w)


def _tiny_run(tmp_path, tag, monkeypatch=None, *sets):
    from fedsim.engines.local import run_local
    from fedsim.results import load_checkpoint, read_jsonl

    s = tiny(['client.plugins=["reste"]', "model.hidden=[16, 64]", "data.num_clients=3",
              "strategy.min_train_clients=3", "run.rounds=2", *sets])
    out = tmp_path / tag
    assert run_local(s, out)["status"] == "completed"
    model = load_checkpoint(sorted((out / "checkpoints").glob("round_*.npz"))[-1])["model"]
    return read_jsonl(out / "clients.jsonl"), model


@pytest.mark.slow
def test_binary_uplink_is_one_bit_per_weight_on_the_wire_and_aggregates_the_same(tmp_path, monkeypatch):
    import fedsim.clients.tasks as tasks

    packed_rows, packed_model = _tiny_run(tmp_path, "packed")
    monkeypatch.setattr(tasks, "encode_arrays", lambda arrays, keys: (arrays, None))  # the codec off
    dense_rows, dense_model = _tiny_run(tmp_path, "dense")
    assert all(np.array_equal(a, b) for a, b in zip(packed_model, dense_model))  # decoded exactly
    n = 16 * 64  # the binarised hidden layer "3.weight" (64-16-64-10 MLP, first and last full precision)
    key = "uplink_bytes"
    dense = {(r["round"], r["client"]): r[key] for r in dense_rows}
    assert len(dense) == len(packed_rows) == 6 and all(r["status"] == "ok" for r in packed_rows)
    # the codec record's own bytes and its entry in the reply's RecordDict: the whole overhead
    codec = ConfigRecord({"sign1": ["3.weight"], "sign1.scale": [0.5]})
    plain = {"arrays": ArrayRecord({"w": from_numpy(np.zeros(2, np.float32))})}
    overhead = len(codec.deflate()) + len(RecordDict({**plain, "codec": codec}).deflate()) - len(
        RecordDict(plain).deflate())
    for r in packed_rows:
        saved = dense[(r["round"], r["client"])] - r[key]
        # 4 bytes per binarised weight become 1 bit, plus the codec record (±8: the Array dtype/shape fields)
        assert abs(saved - (4 * n - packed_size((n,)) - overhead)) <= 8, (saved, overhead)


def test_malformed_packed_reply_is_refused_naming_the_client():
    shapes = {"w": (3, 5), "b": (5,)}
    w = np.where(np.arange(15).reshape(3, 5) % 3 == 0, 0.25, -0.25).astype(np.float32)
    b = np.ones(5, np.float32)
    arrays, codec = encode_arrays(ArrayRecord({"w": from_numpy(w), "b": from_numpy(b)}), ["w"])
    good = RecordDict({"arrays": arrays, "codec": codec})
    decoded = decode_sign_reply(good, 7, shapes)
    assert "codec" not in decoded.config_records and list(decoded["arrays"].keys()) == ["w", "b"]
    assert np.array_equal(to_numpy(decoded["arrays"]["w"]), w) and to_numpy(arrays["w"]).dtype == np.uint8
    bits = to_numpy(arrays["w"])

    def reply(ws=None, **codec_fields):
        fields = {"sign1": ["w"], "sign1.scale": [0.25], **codec_fields}
        return RecordDict({"arrays": ArrayRecord({"w": from_numpy(bits if ws is None else ws), "b": from_numpy(b)}),
                           "codec": ConfigRecord(fields)})
    bad = {"short": reply(bits[:-1]), "padding": reply(bits | np.uint8(1)), "dtype": reply(w),
           "2-d": reply(bits.reshape(1, -1)), "unknown key": reply(**{"sign1": ["x"]}),
           "no scale": reply(**{"sign1.scale": []}), "negative scale": reply(**{"sign1.scale": [-0.25]}),
           "duplicate": reply(**{"sign1": ["w", "w"], "sign1.scale": [0.25, 0.25]})}
    for case, content in bad.items():
        with pytest.raises(ClientUpdateError) as err:
            decode_sign_reply(content, 7, shapes)
        assert err.value.client == 7 and "7" in str(err.value), case
    plain = RecordDict({"arrays": ArrayRecord({"w": from_numpy(w)})})
    assert decode_sign_reply(plain, 7, shapes) is plain
