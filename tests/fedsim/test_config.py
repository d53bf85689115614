import pytest

from fedsim.catalog import resolve
from fedsim.config import apply_overrides, dumps_scenario, load_scenario, loads_scenario, parse_value, scenario_from_dict
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
        ({"client": {"fedprox": {"mu": 1.0}}}, "client", ["fedprox", "client.plugins"]),
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


def test_unimplemented_attacks_are_refused_by_the_schema():
    from fedsim.faults import ATTACKS

    for attack in ("ipm", "alie"):
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
