import math
import os

import pytest
from hypothesis import given, settings, strategies as st

from fedsim.catalog import resolve
from fedsim.config import (MAX_NOISE, MAX_SCENARIO_BYTES, MIN_NOISE, apply_overrides, dumps_scenario, load_scenario,
                           loads_scenario, parse_value, scenario_from_dict)
from fedsim.errors import ConfigError, DataError, UnknownNameError
from tests.conftest import TINY, tiny


def test_defaults_validate():
    s = scenario_from_dict({})
    assert s.run.engine == "local" and s.strategy.name == "fedavg"


@pytest.mark.parametrize(
    "raw, key, words",
    [
        ({"run": {"rounds_": 3}}, "run.rounds_", ["unknown key", "rounds"]),
        ({"bogus": {}}, "bogus", ["unknown key", "run"]),
        ({"run": {"rounds": "many"}}, "run.rounds", ["integer", "many"]),
        ({"run": {"engine": "spark"}}, "run.engine", ["local", "ray", "deploy", "spark"]),
        ({"client": {"lr": -1}}, "client.lr", ["greater than 0"]),
        ({"strategy": {"name": "fedavgg"}}, "strategy.name", ["fedavg", "allowed"]),
        ({"strategy": {"name": "krum", "num_malicous": 1}}, "strategy.num_malicous", ["num_malicious"]),
        ({"strategy": {"name": "fedprox", "mu": "big"}}, "strategy.mu", ["number"]),
        ({"client": {"plugins": ["nope"]}}, "client.plugins", ["unknown plugin"]),
        ({"client": {"fedprox": {"mu": 1.0}}}, "client.fedprox", ["fedprox", "client.plugins"]),
        ({"client": {"plugins": ["fedprox"], "fedprox": {"muu": 1.0}}}, "client.fedprox.muu", ["mu"]),
        ({"data": {"partitioner": "dirichlet2"}}, "data.partitioner", ["dirichlet"]),
        ({"model": {"name": "resnet"}}, "model.name", ["mlp", "cnn"]),
    ],
)
def test_bad_scenarios_name_the_key(raw, key, words):
    with pytest.raises(ConfigError) as ei:
        resolve(scenario_from_dict(raw))  # values by the schema, names by the resolver step
    text = str(ei.value)
    assert ei.value.key == key, text
    for w in words:
        assert w in text, text


def test_unknown_names_are_unknown_name_errors():
    scenario = scenario_from_dict({"strategy": {"name": "nope"}})  # the schema only validates values
    with pytest.raises(UnknownNameError):
        resolve(scenario)


def test_unknown_attacks_are_refused_by_the_schema():
    from fedsim.faults import ATTACKS

    for attack in ("ipm2", "little_is_enough", "backdoor"):
        with pytest.raises(ConfigError) as ei:
            scenario_from_dict({"faults": {"attack": attack, "byzantine_clients": [0]}})
        assert ei.value.key == "faults.attack"
    for attack in ATTACKS:
        assert scenario_from_dict({"faults": {"attack": attack}}).faults.attack == attack


def test_overrides_are_typed():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("fedprox") == "fedprox"
    raw = apply_overrides({}, ["run.rounds=7", "strategy.name=fedprox", "strategy.mu=0.1"])
    s = scenario_from_dict(raw)
    assert s.run.rounds == 7 and s.strategy.options() == {"mu": 0.1}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["rounds"])


def test_round_trip_through_toml():
    s = tiny()
    again = loads_scenario(dumps_scenario(s))
    assert again == s


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError):
        load_scenario(tmp_path / "nope.toml")


def test_impossible_partition_is_typed(tmp_path):
    s = tiny(data={"num_clients": 5000})
    from fedsim.engines.local import run_local

    with pytest.raises((DataError, ConfigError)) as ei:
        run_local(s, tmp_path / "run")
    assert "data.num_clients" in str(ei.value) and "5000" in str(ei.value), str(ei.value)


def test_builtin_scenarios_validate():
    from fedsim.catalog import builtin_scenarios

    paths = builtin_scenarios()
    assert paths, "no built-in scenario"
    for p in paths:
        load_scenario(p)


def test_tiny_matches_template():
    assert tiny().run.rounds == TINY["run"]["rounds"]


# ---------------------------------------------- issue 9: bad values refused by the schema, with the key
def _refused(raw: dict, key: str) -> str:
    with pytest.raises(ConfigError) as ei:
        resolve(scenario_from_dict(raw))
    assert ei.value.key == key, str(ei.value)
    return str(ei.value)


@pytest.mark.parametrize("raw, key", [
    ({"model": {"hidden": [-5]}}, "model.hidden"),
    ({"model": {"hidden": [0]}}, "model.hidden"),
    ({"model": {"hidden": [8, 0]}}, "model.hidden"),
    ({"model": {"name": "cnn", "channels": [0]}}, "model.channels"),
    ({"client": {"lr": math.inf}}, "client.lr"),
    ({"client": {"weight_decay": math.inf}}, "client.weight_decay"),
    ({"client": {"plugins": ["fedprox"], "fedprox": {"mu": math.inf}}}, "client.fedprox.mu"),
    ({"strategy": {"server_lr": math.nan}}, "strategy.server_lr"),
    ({"strategy": {"name": "fedprox", "mu": -math.inf}}, "strategy.mu"),
    ({"data": {"options": {"noise": [0.1, math.nan]}}}, "data.options.noise"),
    ({"data": {"partition": {"alpha": math.inf}}}, "data.partition.alpha"),
    ({"data": {"num_clients": 10**20}}, "data.num_clients"),
    ({"privacy": {"clip_norm": math.inf}}, "privacy.clip_norm"),
    ({"privacy": {"noise_multiplier": 1e-300}}, "privacy.noise_multiplier"),
    ({"privacy": {"counter_noise": 1e308}}, "privacy.counter_noise"),
    ({"faults": {"crash_clients": [10]}}, "faults.crash_clients"),           # ids are 0..9
    ({"faults": {"crash_clients": [-1]}}, "faults.crash_clients"),
    ({"faults": {"crash_clients": [0], "crash_rounds": [11]}, "run": {"rounds": 10}}, "faults.crash_rounds"),
    ({"faults": {"crash_clients": [0], "crash_rounds": [0]}}, "faults.crash_rounds"),
    ({"faults": {"crash_rounds": [1]}}, "faults.crash_rounds"),             # nobody to crash
    ({"strategy": {"min_train_clients": 11}}, "strategy.min_train_clients"),
    ({"run": {"device": "cuda:99"}}, "run.device"),
])
def test_bad_values_are_refused_naming_the_key(raw, key):
    _refused(raw, key)


def test_the_boundaries_of_those_checks_are_accepted():
    s = scenario_from_dict({"run": {"rounds": 3}, "data": {"num_clients": 5},
                            "faults": {"crash_clients": [0, 4], "crash_rounds": [1, 3]},
                            "strategy": {"min_train_clients": 5}, "model": {"hidden": [], "dropout": 0.5},
                            "privacy": {"mechanism": "dp-sgd", "noise_multiplier": MIN_NOISE,
                                        "counter_noise": MAX_NOISE}})
    assert s.faults.crash_clients == [0, 4] and s.strategy.min_train_clients == 5 and s.model.hidden == []
    from fedsim.models import build_model

    cnn = scenario_from_dict({"model": {"name": "cnn", "norm": "group", "channels": [6, 12], "groups": 3}}).model
    assert build_model(cnn, (1, 8, 8), 10, seed=0)[1].num_groups == 3


def test_devices_this_machine_lacks_are_refused():
    import torch

    lacking = ["cuda:99"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"])
    mps = getattr(torch.backends, "mps", None)
    lacking += [] if mps is not None and mps.is_available() else ["mps"]
    for device in lacking:
        assert "run.device" in _refused({"run": {"device": device}}, "run.device")
    for device in ("auto", "cpu"):
        assert scenario_from_dict({"run": {"device": device}}).run.device == device
    if torch.cuda.is_available():
        assert scenario_from_dict({"run": {"device": "cuda:0"}}).run.device == "cuda:0"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 3), max_size=4))
def test_widths_are_accepted_iff_every_layer_has_a_unit(widths):
    ok = all(w >= 1 for w in widths)
    try:
        scenario_from_dict({"model": {"hidden": widths}})
        assert ok, widths
    except ConfigError as err:
        assert not ok and err.key == "model.hidden"


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.just(0.0), st.floats(0.0, 1e300, exclude_min=True)))
def test_noise_is_accepted_iff_zero_or_in_the_accountable_range(sigma):
    ok = sigma == 0 or MIN_NOISE <= sigma <= MAX_NOISE
    try:
        scenario_from_dict({"privacy": {"mechanism": "dp-sgd", "noise_multiplier": sigma}})
        assert ok, sigma
    except ConfigError as err:
        assert not ok and err.key == "privacy.noise_multiplier"


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.lists(st.integers(-2, 8), max_size=3), st.lists(st.integers(-1, 5),
                                                                                              max_size=3))
def test_crashes_are_accepted_iff_they_name_real_clients_and_rounds(clients, rounds, ids, crash_rounds):
    raw = {"run": {"rounds": rounds}, "data": {"num_clients": clients}, "strategy": {"min_train_clients": 1},
           "faults": {"crash_clients": ids, "crash_rounds": crash_rounds}}
    ok = (all(0 <= i < clients for i in ids) and all(1 <= r <= rounds for r in crash_rounds)
          and (ids or not crash_rounds))
    try:
        scenario_from_dict(raw)
        assert ok
    except ConfigError as err:
        assert not ok and err.key in ("faults.crash_clients", "faults.crash_rounds")


@pytest.mark.parametrize("model, key", [
    ({"channels": [4]}, "model.channels"),                       # mlp has no channels
    ({"norm": "group"}, "model.norm"),                           # nor a norm
    ({"name": "logreg", "dropout": 0.1}, "model.dropout"),       # logreg has no dropout
    ({"name": "cnn", "groups": 2}, "model.groups"),              # no GroupNorm: no groups
    ({"name": "cnn", "norm": "group", "channels": [6]}, "model.groups"),  # 4 groups do not divide 6 channels
])
def test_a_model_setting_without_effect_is_refused_when_the_model_is_built(model, key):
    from fedsim.models import build_model

    cfg = scenario_from_dict({"model": model}).model
    with pytest.raises(ConfigError) as ei:
        build_model(cfg, (1, 8, 8), 10, seed=0)
    assert ei.value.key == key, str(ei.value)


def test_model_size_is_capped_before_anything_is_allocated():
    from fedsim.config import ModelConfig
    from fedsim.models import MAX_PARAMETERS, build_model, count_parameters

    assert count_parameters(ModelConfig(hidden=[64]), (1, 8, 8), 10) == 64 * 64 + 64 + 64 * 10 + 10
    for cfg, shape, classes, key in [(ModelConfig(hidden=[100_000, 100_000]), (64,), 10, "model.hidden"),
                                     (ModelConfig(hidden=[64]), (64,), 10**9, "model.hidden"),
                                     (ModelConfig(name="cnn", channels=[4096] * 3), (3, 32, 32), 10, "model.channels"),
                                     (ModelConfig(name="logreg"), (0,), 3, "model.name")]:
        with pytest.raises(ConfigError) as ei:
            build_model(cfg, shape, classes, seed=0)
        assert ei.value.key == key and (key == "model.name" or f"{MAX_PARAMETERS:,}" in str(ei.value))


# ---------------------------------------------------------------------- the scenario file itself
def _file(path, data):
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def _directory(path):
    path.mkdir()
    return path


@pytest.mark.parametrize("make, words", [
    (lambda d: _file(d / "b.toml", b"\x00\xff\xfe" * 10), ["not a text file"]),
    (lambda d: _directory(d / "dir.toml"), ["directory"]),
    (lambda d: str(d / "a\x00b.toml"), ["NUL byte", "\\x00"]),
    (lambda d: d / "elsewhere" / "default.toml", ["not found"]),       # no silent fallback to the built-in
    (lambda d: _file(d / "big.toml", "#" * (MAX_SCENARIO_BYTES + 1)), ["bytes"]),
    (lambda d: _file(d / "deep.toml", "x = " + "[" * 50_000 + "]" * 50_000), ["deeply"]),
    (lambda d: os.devnull, ["not a regular file"]),
], ids=["binary", "directory", "nul", "no-fallback", "too-big", "too-deep", "device"])
def test_unusable_scenario_paths_are_config_errors_naming_the_path(make, words, tmp_path):
    path = make(tmp_path)
    with pytest.raises(ConfigError) as ei:
        load_scenario(path)
    assert "\n" not in str(ei.value) and str(ei.value).startswith(str(path)[:20].replace("\x00", "\\x00"))
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_a_bare_builtin_name_still_finds_the_builtin_and_deep_overrides_are_strings():
    assert load_scenario("default.toml").run.engine == "local"
    assert load_scenario("default") == load_scenario("default.toml")  # `fedsim run default`
    assert load_scenario("dp_sgd_digits").privacy.mechanism == "dp-sgd"
    for missing in ("no_such_scenario", "elsewhere/default"):
        with pytest.raises(ConfigError, match="not found"):
            load_scenario(missing)
    assert parse_value("[" * 10_000) == "[" * 10_000
    with pytest.raises(ConfigError) as ei:
        scenario_from_dict({}, ["run.rounds=" + "[" * 10_000])
    assert ei.value.key == "run.rounds" and len(str(ei.value)) < 400


# ------------------------------------------------------- issue 14: hints for misplaced keys, settings without effect
@pytest.mark.parametrize("raw, key, meant", [
    ({"client": {"rounds": 5}}, "client.rounds", "`run.rounds`"),           # a key of another section
    ({"data": {"lr": 0.1}}, "data.lr", "`client.lr`"),
    ({"rounds": 5}, "rounds", "`run.rounds`"),                               # at the top level
    ({"run": {"rouns": 5}}, "run.rouns", "`run.rounds`"),                    # misspelt, same section
    ({"data": {"num_client": 5}}, "data.num_clients", None),
    ({"privcy": {}}, "privcy", "`privacy`"),                                 # a misspelt section
    ({"privacy": {"noise": 1.0}}, "privacy.noise", "`privacy.noise_multiplier`"),
    ({"strategy": {"rounds": 5}}, "strategy.rounds", "`run.rounds`"),       # not an option of fedavg
    ({"strategy": {"name": "krum", "num_malicous": 1}}, "strategy.num_malicous", "`strategy.num_malicious`"),
])
def test_unknown_keys_say_what_was_probably_meant(raw, key, meant):
    with pytest.raises(ConfigError) as ei:
        resolve(scenario_from_dict(raw))
    text = str(ei.value)
    if meant is None:  # the key is reported as typed, the hint names the right one
        assert ei.value.key == "data.num_client" and "did you mean `data.num_clients`" in text, text
    else:
        assert ei.value.key == key and f"did you mean {meant}" in text, text


def test_a_plugin_table_is_still_a_table_and_unrelated_keys_get_no_guess():
    from fedsim.config import Scenario
    from fedsim.config_hints import did_you_mean

    assert did_you_mean(Scenario, "run", "zzzz") == []
    s = resolve(scenario_from_dict({"client": {"plugins": ["fedprox"], "fedprox": {"mu": 0.5}}}))
    assert s.client.plugin_settings("fedprox") == {"mu": 0.5}


#: a valid value other than the default for every [privacy] setting
NON_DEFAULT = {"noise_multiplier": 1.0, "target_epsilon": 5.0, "clip_norm": 2.0, "delta": 1e-6, "max_epsilon": 5.0,
               "accountant": "pld", "sample_rate": 0.1, "client_sampling": "fixed", "clipping": "per_layer",
               "adaptive_clipping": True, "target_quantile": 0.7, "clip_lr": 0.1, "count_noise": 1.0,
               "ftrl_restart_every": 2, "release_counters": False, "counter": "sqrt", "counter_noise": 5.0,
               "secure_rng": True}


def test_every_privacy_setting_is_refused_without_a_mechanism():
    from fedsim.config import PrivacyConfig

    assert set(NON_DEFAULT) == set(PrivacyConfig.model_fields) - {"mechanism"}, "teach NON_DEFAULT the new key"
    for key, value in NON_DEFAULT.items():
        with pytest.raises(ConfigError) as ei:
            scenario_from_dict({"privacy": {key: value}})
        assert ei.value.key == f"privacy.{key}" and "has no effect without a mechanism" in str(ei.value)
    for key, value in NON_DEFAULT.items():  # the defaults themselves are fine (a run directory's config.toml)
        default = PrivacyConfig.model_fields[key].default
        assert getattr(scenario_from_dict({"privacy": {key: default}}).privacy, key) == default


@pytest.mark.parametrize("mechanism, privacy, key", [
    ("dp-sgd", {"client_sampling": "fixed"}, "privacy.client_sampling"),   # DP-SGD clients sample records
    ("dp-sgd", {"clipping": "per_layer"}, "privacy.clipping"),
    ("dp-sgd", {"adaptive_clipping": True}, "privacy.adaptive_clipping"),
    ("dp-sgd", {"ftrl_restart_every": 2}, "privacy.ftrl_restart_every"),
    ("dp-fedavg", {"sample_rate": 0.1}, "privacy.sample_rate"),              # the cohort rate is fraction_train
    ("dp-fedavg", {"clip_lr": 0.1}, "privacy.clip_lr"),                      # adaptive clipping is off
    ("dp-fedavg", {"count_noise": 1.0}, "privacy.count_noise"),
    ("dp-ftrl", {"accountant": "pld"}, "privacy.accountant"),                # ρ-zCDP of the tree, always
    ("dp-ftrl", {"clipping": "per_layer"}, "privacy.clipping"),
    ("dp-fedavg", {"release_counters": False, "counter": "sqrt"}, "privacy.counter"),
    ("dp-fedavg", {"release_counters": False, "counter_noise": 3.0}, "privacy.counter_noise"),
])
def test_settings_the_chosen_mechanism_never_reads_are_refused(mechanism, privacy, key):
    with pytest.raises(ConfigError) as ei:
        scenario_from_dict({"privacy": {"mechanism": mechanism, **privacy}})
    assert ei.value.key == key and "would be ignored" in str(ei.value), str(ei.value)


@pytest.mark.parametrize("mechanism, privacy", [
    ("dp-sgd", {"sample_rate": 0.1, "accountant": "pld", "secure_rng": True, "counter": "sqrt"}),
    ("dp-fedavg", {"client_sampling": "fixed", "clipping": "per_layer", "adaptive_clipping": True,
                   "target_quantile": 0.7, "clip_lr": 0.1, "count_noise": 1.0}),
    ("dp-ftrl", {"ftrl_restart_every": 2, "release_counters": False}),
])
def test_settings_the_mechanism_reads_are_accepted(mechanism, privacy):
    s = scenario_from_dict({"privacy": {"mechanism": mechanism, **privacy}})
    assert all(getattr(s.privacy, k) == v for k, v in privacy.items())


@pytest.mark.parametrize("sets, key", [
    (['client.optimizer="adam"', "client.momentum=0.9"], "client.momentum"),
    (['client.optimizer="adamw"', "client.momentum=0.5"], "client.momentum"),
    (["faults.straggler_slowdown=3"], "faults.straggler_slowdown"),
])
def test_a_setting_another_key_makes_inert_is_refused(sets, key):
    with pytest.raises(ConfigError) as err:
        scenario_from_dict({}, sets)
    assert err.value.key == key and "no effect" in str(err.value)


def test_the_same_settings_are_accepted_where_they_act():
    s = scenario_from_dict({}, ['client.optimizer="sgd"', "client.momentum=0.9", "faults.stragglers=0.2",
                                "faults.straggler_slowdown=3"])
    assert s.client.momentum == 0.9 and s.faults.straggler_slowdown == 3
    assert scenario_from_dict({}, ['client.optimizer="adam"']).client.momentum == 0.0
