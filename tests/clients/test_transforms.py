"""Gradient transforms (fedsim.clients.transforms): chain, the basic transforms against direct
formulas and torch.optim, the scenario-facing chain builder, state flattening."""

import pytest
import torch

import fedsim.clients.plugins.step  # noqa: F401  (registers every transform)
from fedsim.clients.transforms import (TRANSFORMS, Adam, ClipByNorm, Momentum, Scale, Sign, WeightDecay, build_chain,
                                       chain, flatten_state, unflatten_state)
from fedsim.errors import ConfigError


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}


def _grads(step):
    return _params(100 + step)


def test_chain_of_two_equals_applying_them_by_hand():
    mom, clip = Momentum(Momentum.Settings(beta=0.8)), ClipByNorm(ClipByNorm.Settings(max_norm=0.5))
    params = _params()
    both = chain(mom, clip)
    state = both.init(params)
    s_mom, s_clip = mom.init(params), clip.init(params)
    for step in range(4):
        g = _grads(step)
        out, state = both.update(g, state, params)
        by_hand, s_mom = mom.update(g, s_mom, params)
        by_hand, s_clip = clip.update(by_hand, s_clip, params)
        # by hand again, from the formulas: b <- 0.8 b + g; d = b * min(1, 0.5 / ||b||)
        for k in g:
            assert torch.equal(out[k], by_hand[k])
        norm = torch.sqrt(sum((s_mom["buf"][k] ** 2).sum() for k in g))
        for k in g:
            torch.testing.assert_close(out[k], s_mom["buf"][k] * min(1.0, 0.5 / float(norm)))
    assert set(state) == {"0", "1"}


def test_basic_transforms_match_their_formulas():
    params, g = _params(), _grads(0)
    assert torch.equal(Sign().update(g, {}, params)[0]["w"], torch.sign(g["w"]))
    assert torch.equal(Scale(Scale.Settings(factor=3.0)).update(g, {}, params)[0]["b"], g["b"] * 3.0)
    wd = WeightDecay(WeightDecay.Settings(rate=0.1)).update(g, {}, params)[0]
    torch.testing.assert_close(wd["w"], g["w"] + 0.1 * params["w"])
    small = ClipByNorm(ClipByNorm.Settings(max_norm=1e6)).update(g, {}, params)[0]
    assert small["w"] is g["w"]  # under the bound: untouched


def _torch_run(opt_factory, steps=5):
    p = {k: v.clone().requires_grad_(True) for k, v in _params().items()}
    opt = opt_factory(list(p.values()))
    for step in range(steps):
        for k, v in p.items():
            v.grad = _grads(step)[k].clone()
        opt.step()
    return {k: v.detach() for k, v in p.items()}


def _chain_run(transform, lr, steps=5):
    p = _params()
    state = transform.init(p)
    for step in range(steps):
        d, state = transform.update(_grads(step), state, p)
        p = {k: v - lr * d[k] for k, v in p.items()}
    return p


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_equals_torch_sgd_momentum(nesterov):
    ref = _torch_run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=nesterov))
    got = _chain_run(Momentum(Momentum.Settings(beta=0.9, nesterov=nesterov)), 0.1)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


def test_adam_equals_torch_adam():
    ref = _torch_run(lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6))
    got = _chain_run(Adam(Adam.Settings(b1=0.8, b2=0.99, eps=1e-6)), 0.01)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


def test_build_chain_reads_names_and_tables_and_names_bad_keys():
    c = build_chain(["adam", {"name": "clip_by_norm", "max_norm": 2.0}], "client.step.transforms")
    assert [t.name for t in c.transforms] == ["adam", "clip_by_norm"]
    assert c.transforms[1].settings.max_norm == 2.0
    with pytest.raises(ConfigError) as e:
        build_chain(["adamm"], "client.step.transforms")
    assert e.value.key == "client.step.transforms[0]" and "adam" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_chain(["sgd", {"name": "frugal", "density": 2.0}], "client.step.transforms")
    assert e.value.key == "client.step.transforms[1].density"
    with pytest.raises(ConfigError) as e:
        build_chain([{"name": "momentum", "bta": 0.9}], "client.step.transforms")
    assert e.value.key == "client.step.transforms[0].bta"
    with pytest.raises(ConfigError) as e:
        build_chain([{"max_norm": 1.0}], "k")
    assert e.value.key == "k[0].name"
    with pytest.raises(ConfigError) as e:
        build_chain(["gns_newton", "clip_by_norm"], "k")
    assert e.value.key == "k[0]" and "last" in str(e.value)
    with pytest.raises(ConfigError):
        build_chain([], "k")


def test_every_registered_transform_has_a_name_and_settings():
    for name in ["sgd", "scale", "momentum", "adam", "sign", "clip_by_norm", "weight_decay"]:
        assert name in TRANSFORMS
    for name in ["frugal", "dct_lowrank", "normalized_gd", "gns_newton"]:
        cls = TRANSFORMS.get(name)
        assert cls.name == name and cls.Settings() is not None


def test_state_flattens_and_comes_back():
    params = _params()
    c = chain(Adam(), Momentum())
    state = c.init(params)
    _, state = c.update(_grads(0), state, params)
    flat = flatten_state(state)
    assert "0/m/w" in flat and "1/buf/b" in flat and "0/count" in flat
    back = unflatten_state({k: v.numpy() for k, v in flat.items()})
    for k, v in flatten_state(back).items():
        assert torch.equal(v, flat[k])
    with pytest.raises(TypeError):
        flatten_state({"x": 1.0})


def test_metrics_of_the_same_transform_twice_are_kept_apart():
    from fedsim.clients.transforms_lowrank import Frugal

    params = _params()
    c = chain(Frugal(Frugal.Settings(density=0.0)), Frugal(Frugal.Settings(density=1.0)))
    _, state = c.update(_grads(0), c.init(params), params)
    m = c.metrics(state)
    assert m == {"frugal0.moment_fraction": 0.0, "frugal1.moment_fraction": 1.0}


def test_fedsim_list_prints_the_transforms():
    import json

    from typer.testing import CliRunner

    from fedsim.cli import app

    out = CliRunner().invoke(app, ["list", "--format", "json"])
    assert out.exit_code == 0, out.output
    listed = json.loads(out.stdout)["transforms"]
    assert {"sgd", "adam", "frugal", "dct_lowrank", "normalized_gd", "gns_newton"} <= set(listed)
