"""Every registered strategy and plugin runs on a tiny scenario (a new one is tested the day it lands),
and every plugin's neutral setting reproduces the plain run bit for bit."""

import dataclasses

import numpy as np
import pytest
import tomli_w

from fedsim.catalog import registries
from fedsim.clients.plugin_api import make_settings
from fedsim.engines.local import run_local
from fedsim.results import load_checkpoint, read_jsonl
from tests.conftest import tiny

REG = registries()

# Plugins a scenario enables through another section than [client], with the keys that do it.
# dp_sgd takes every setting from [privacy] (one source of truth: a [client.dp_sgd] table is refused),
# so a scenario cannot set it to its neutral values; its neutral setting is checked on the local loop
# itself (test_dp_sgd_neutral_setting_equals_the_plain_loop).
ENABLED_BY: dict[str, list[str]] = {"dp_sgd": ['privacy.mechanism="dp-sgd"', "privacy.noise_multiplier=1.0"]}
NEUTRAL_EXEMPT: dict[str, str] = {"dp_sgd": "settings only from [privacy]; checked on the loop below"}

# Short enough to stay fast, long enough that the second round trains from an aggregated model.
# Both runs go through the per-client loop (run.vectorize=false): a plugin run always does, and the
# claim is about that loop; the plain run would otherwise be batched, equal only up to float rounding.
NEUTRAL_BASE = ("run.rounds=2", "run.checkpoint_every=1", "client.max_steps=3", "run.vectorize=false")


@pytest.mark.parametrize("name", REG["strategies"].names())
def test_every_strategy_runs(name, tmp_path):
    cls = REG["strategies"].get(name)
    extra = list(getattr(cls, "tiny_overrides", ()))
    s = tiny([f'strategy.name="{name}"', "data.num_clients=6", "strategy.min_train_clients=6", *extra])
    summary = run_local(s, tmp_path)
    assert summary["status"] == "completed"
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert np.isfinite(rows[-1]["test_loss"])
    ok = [c for c in read_jsonl(tmp_path / "clients.jsonl") if c["status"] == "ok"]
    assert ok, "no client reply was accepted"


@pytest.mark.parametrize("name", REG["plugins"].names())
def test_every_plugin_runs_and_has_a_neutral_setting(name, tmp_path):
    cls = REG["plugins"].get(name)
    neutral = cls.Settings.neutral()
    assert isinstance(neutral, cls.Settings)
    enable = ENABLED_BY.get(name, [f'client.plugins=["{name}"]'])
    s = tiny([*enable, *getattr(cls, "tiny_overrides", ())])
    summary = run_local(s, tmp_path)
    assert summary["status"] == "completed"
    assert np.isfinite(read_jsonl(tmp_path / "metrics.jsonl")[-1]["test_loss"])


def _toml_value(value) -> str:
    """``value`` as a TOML literal for a ``--set`` override (``inf``, ``false``, ``"rdp"``...)."""
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def neutral_overrides(cls) -> list[str]:
    """``--set`` items that enable plugin ``cls`` with every setting at its neutral value."""
    neutral = cls.Settings.neutral()
    return [f'client.plugins=["{cls.name}"]'] + [
        f"client.{cls.name}.{f.name}={_toml_value(getattr(neutral, f.name))}"
        for f in dataclasses.fields(neutral) if f.init
    ]


def final_model(run_dir) -> list[np.ndarray]:
    ckpts = (run_dir / "checkpoints").glob("round_*.npz")
    return load_checkpoint(max(ckpts, key=lambda p: int(p.stem.split("_", 1)[1])))["model"]


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """Final weights of the plain run for a tuple of extra overrides (run once per tuple)."""
    cache: dict[tuple[str, ...], list[np.ndarray]] = {}

    def get(extra: tuple[str, ...]) -> list[np.ndarray]:
        if extra not in cache:
            out = tmp_path_factory.mktemp("plain")
            assert run_local(tiny([*NEUTRAL_BASE, *extra]), out)["status"] == "completed"
            cache[extra] = final_model(out)
        return cache[extra]

    return get


@pytest.mark.parametrize("name", [n for n in REG["plugins"].names() if n not in NEUTRAL_EXEMPT])
def test_every_plugin_at_its_neutral_setting_equals_the_plain_run(name, plain_model, tmp_path):
    cls = REG["plugins"].get(name)
    extra = tuple(getattr(cls, "tiny_overrides", ()))
    s = tiny([*NEUTRAL_BASE, *extra, *neutral_overrides(cls)])
    assert s.client.plugins == [name]
    assert run_local(s, tmp_path)["status"] == "completed"
    plain, with_plugin = plain_model(extra), final_model(tmp_path)
    assert len(plain) == len(with_plugin)
    for i, (a, b) in enumerate(zip(plain, with_plugin)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"array {i}"
        assert a.tobytes() == b.tobytes(), f"{name}: array {i} differs from the plain run at the neutral setting"


def test_neutral_overrides_enable_the_plugin_at_its_neutral_setting():
    for name in REG["plugins"].names():
        if name in NEUTRAL_EXEMPT:
            continue
        cls = REG["plugins"].get(name)
        s = tiny([*getattr(cls, "tiny_overrides", ()), *neutral_overrides(cls)])
        assert make_settings(cls, s.client.plugin_settings(name)) == cls.Settings.neutral(), name


def test_registries_are_not_empty():
    for kind in ("strategies", "plugins", "partitioners", "datasets", "models"):
        assert REG[kind].names(), kind
    for required in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "trimmed_mean", "krum"):
        assert required in REG["strategies"]


def test_dp_sgd_neutral_setting_equals_the_plain_loop():
    """The one plugin a scenario cannot set to neutral: compared on the local training loop directly."""
    import torch

    from fedsim.clients.plugin_api import PluginStack, build_plugins
    from fedsim.clients.trainer import train_local
    from fedsim.models import build_model

    s = tiny(list(NEUTRAL_BASE))
    x, y = torch.randn(40, 64, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 10
    out = []
    for stack in (PluginStack([]), build_plugins(["dp_sgd"], lambda _: dataclasses.asdict(
            REG["plugins"].get("dp_sgd").Settings.neutral()))):
        model = build_model(s.model, (64,), 10, 0)
        train_local(model, x, y, s.client, stack, round=1, client_id=0, seed=0,
                    rng=torch.Generator().manual_seed(1), config={}, progress=0.0)
        out.append([p.detach().numpy().tobytes() for p in model.state_dict().values()])
    assert out[0] == out[1]
