"""Issue 9: every bad input is refused with a typed error, never a traceback.

Every invalid value the schema implies for every key of every section is tried (a parametrized list:
types, bounds, choices, patterns, NaN/inf, unknown keys, cross-section ranges); Hypothesis draws any
out-of-range number, combinations of valid values and ``.npz`` datasets (shapes, dtypes, label ranges).
Each input runs through the real entry point as a user would:
``fedsim run SCENARIO --out DIR``, i.e. ``fedsim.cli.main`` (the ``fedsim`` console script) called
in-process under typer's ``CliRunner`` isolation. The keys are read from the pydantic models of
``fedsim.config``, so a key added tomorrow gets valid and invalid values without touching this file.

For every input: the exit code is one of the documented ones (an error class's ``exit_code``), 0 only
for a valid input; a refusal prints exactly one error line, naming the key (or the npz array), and no
traceback; a refused input (config 2, data 3) leaves no run directory behind.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import tempfile
import traceback
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import annotated_types as at
import numpy as np
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from fedsim import cli, errors
from fedsim.config import Scenario
from fedsim.data.federation import clear_federation_cache

pytestmark = pytest.mark.slow  # ~450 in-process runs of the CLI, about 30 s in all (most refused at once)

#: every exit code a typed error documents (fedsim.errors), 0 aside
CODES = {cls.exit_code for cls in vars(errors).values()
         if isinstance(cls, type) and issubclass(cls, errors.FedSimError) and cls is not errors.FedSimError}
REFUSED = {errors.ConfigError.exit_code, errors.DataError.exit_code}

#: a valid scenario that runs one tiny round in well under a second
BASE = {
    "run": {"name": "bad-inputs", "seed": 1, "rounds": 1, "progress": False, "checkpoint_every": 0,
            "round_timeout": 5.0},
    "data": {"dataset": "digits", "num_clients": 4, "partitioner": "iid"},
    "model": {"name": "mlp", "hidden": [8]},
    "client": {"epochs": 1, "batch_size": 32, "max_steps": 2},
    "strategy": {"name": "fedavg", "min_train_clients": 2},
}
NUM_CLIENTS, ROUNDS = BASE["data"]["num_clients"], BASE["run"]["rounds"]
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------ the entry point
@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    leaked: str | None  # the traceback of an exception that escaped fedsim.cli.main

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error (")]


def fedsim(*args: str) -> Outcome:
    """``fedsim ARGS`` as the console script runs it: ``fedsim.cli.main`` with ``sys.argv`` set."""
    clear_federation_cache()
    with CliRunner().isolation() as (out, err, _), mock.patch.object(sys, "argv", ["fedsim", *args]):
        code, leaked = 0, None
        try:
            cli.main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:  # noqa: BLE001 - a traceback a user would see
            code, leaked = -1, traceback.format_exc()
        return Outcome(code, out.getvalue().decode(errors="replace"), err.getvalue().decode(errors="replace"),
                       leaked)


def run_scenario(raw: dict, workdir: Path, *extra: str) -> tuple[Outcome, Path]:
    scenario = workdir / "scenario.toml"
    scenario.write_text(tomli_w.dumps(raw))
    out_dir = workdir / "run"
    return fedsim("run", str(scenario), "--out", str(out_dir), *extra), out_dir


def assert_typed(outcome: Outcome, out_dir: Path, what: str) -> None:
    """The invariants of every input: a documented code, one typed line on failure, no traceback."""
    assert outcome.leaked is None, f"{what}: a traceback escaped fedsim.cli.main\n{outcome.leaked}"
    assert "Traceback" not in outcome.stdout + outcome.stderr, f"{what}\n{outcome.stderr}"
    if outcome.code == 0:
        assert (out_dir / "summary.json").is_file(), f"{what}: exit 0 but no summary.json"
        return
    assert outcome.code in CODES, f"{what}: exit {outcome.code} is not a documented code {sorted(CODES)}\n" \
                                  f"{outcome.stdout}\n{outcome.stderr}"
    assert len(outcome.error_lines()) == 1, f"{what}: want one error line\n{outcome.stderr}"
    if outcome.code in REFUSED:  # refused before the run: nothing else printed, nothing written
        said = [line for line in outcome.stderr.splitlines() if line.strip()]
        # besides the refusal, only the status line printed while the scenario loads (fedsim.progress)
        assert all(line.startswith(("error (", "hint: ", "fedsim: loading ")) for line in said), \
            f"{what}: more than a refusal\n{said}"
        assert not out_dir.exists(), f"{what}: refused with {outcome.code} but left {out_dir} behind\n{outcome.stderr}"


def assert_refused(outcome: Outcome, out_dir: Path, code: int, names: list[str], what: str) -> None:
    assert_typed(outcome, out_dir, what)
    assert outcome.code == code, f"{what}: want exit {code}, got {outcome.code}\n{outcome.stdout}\n{outcome.stderr}"
    line = outcome.error_lines()[0]
    assert any(name in line for name in names), f"{what}: the error line names none of {names}: {line}"


# --------------------------------------------------------------------- values from the schema
def sections() -> dict[str, type]:
    return {name: field.annotation for name, field in Scenario.model_fields.items()}


def all_keys() -> list[tuple[str, str]]:
    return [(sec, key) for sec, model in sections().items() for key in model.model_fields]


@dataclass
class Spec:
    """What the schema says about one key: its type and its bounds."""
    kind: typing.Any
    lo: float | None = None
    lo_open: bool = False
    hi: float | None = None
    hi_open: bool = False
    pattern: str | None = None
    finite: bool = False
    default: typing.Any = None


def spec(sec: str, key: str) -> Spec:
    model = sections()[sec]
    field = model.model_fields[key]
    kind = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # ``float | None``: the value's type
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    s = Spec(kind, finite=model.model_config.get("allow_inf_nan") is False,
             default=field.get_default(call_default_factory=True))
    for m in field.metadata:
        if isinstance(m, at.Ge):
            s.lo = m.ge
        elif isinstance(m, at.Gt):
            s.lo, s.lo_open = m.gt, True
        elif isinstance(m, at.Le):
            s.hi = m.le
        elif isinstance(m, at.Lt):
            s.hi, s.hi_open = m.lt, True
        elif getattr(m, "allow_inf_nan", None) is False:
            s.finite = True
        if getattr(m, "pattern", None):
            s.pattern = m.pattern
    return s


def _registered(kind: str) -> list[str]:
    from fedsim.catalog import registries

    return registries()[kind].names()


def cheap_valid() -> dict[str, st.SearchStrategy]:
    """Valid values that keep a run tiny, for the keys whose generic range could make it long."""
    from fedsim.models import MODELS

    small_widths = st.lists(st.integers(1, 12), max_size=2)
    return {
        "run.rounds": st.integers(1, 2), "run.engine": st.just("local"), "run.threads": st.integers(1, 2),
        "run.round_timeout": st.floats(1.0, 5.0), "run.device": st.sampled_from(["auto", "cpu"]),
        "run.output": st.just("runs"), "run.seed": st.integers(0, 2**64),
        "run.name": st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12),
        "data.dataset": st.sampled_from(["digits", "synthetic"]), "data.num_clients": st.integers(2, 4),
        "data.partitioner": st.sampled_from(_registered("partitioners")),
        "data.server_labelled": st.integers(0, 20), "data.test_fraction": st.floats(0.1, 0.5),
        "model.name": st.sampled_from(MODELS.names()), "model.hidden": small_widths,
        "model.channels": small_widths, "client.epochs": st.integers(0, 1), "client.max_steps": st.integers(1, 3),
        "client.batch_size": st.integers(1, 64), "client.lr": st.floats(1e-4, 1.0),
        "client.weight_decay": st.floats(0.0, 0.1), "client.plugins": st.sampled_from([[], ["fedprox"]]),
        "strategy.name": st.sampled_from(_registered("strategies")), "strategy.min_train_clients": st.integers(1, 2),
        "privacy.noise_multiplier": st.sampled_from([0.0, 1.0, 2.0]),
        "privacy.counter_noise": st.sampled_from([0.0, 10.0]),
        "privacy.count_noise": st.sampled_from([0.0, 1.0]), "privacy.max_epsilon": st.sampled_from([0.0, 5.0, 100.0]),
        "privacy.delta": st.floats(1e-8, 1e-3), "privacy.clip_lr": st.floats(0.01, 1.0),
        "faults.crash_clients": st.sampled_from([[], [0]]), "faults.crash_rounds": st.sampled_from([[], [1]]),
        "faults.byzantine_clients": st.sampled_from([[], [0]]), "faults.straggler_slowdown": st.floats(1.0, 10.0),
        "faults.attack_strength": st.one_of(st.none(), st.floats(0.01, 2.0)),
    }


def valid_values(sec: str, key: str) -> st.SearchStrategy:
    cheap = cheap_valid().get(f"{sec}.{key}")
    if cheap is not None:
        return cheap
    s = spec(sec, key)
    if s.kind is bool:
        return st.booleans()
    if typing.get_origin(s.kind) is typing.Literal:
        return st.sampled_from(typing.get_args(s.kind))
    if s.kind is int:
        lo = 0 if s.lo is None else int(s.lo)
        return st.integers(lo, lo + 3 if s.hi is None else min(int(s.hi), lo + 3))
    if s.kind is float:
        lo = 0.0 if s.lo is None else float(s.lo)
        hi = lo + 10.0 if s.hi is None else float(s.hi)
        return st.floats(lo, hi, exclude_min=s.lo_open, exclude_max=s.hi_open, allow_nan=False)
    return st.just(s.default)  # free strings, lists and tables: the default is valid


def invalid_values(sec: str, key: str) -> list[typing.Any]:
    """Values the schema itself refuses for ``sec.key`` (type, bounds, choices, pattern, finiteness)."""
    s, bad = spec(sec, key), []
    if s.kind is bool:
        bad += ["maybe", 2, [True]]
    elif typing.get_origin(s.kind) is typing.Literal:
        bad += ["no-such-choice", 3]
    elif s.kind in (int, float):
        bad += ["many", [1]] + ([1.5] if s.kind is int else [])
        if s.lo is not None:
            bad.append(s.lo if s.lo_open else (s.lo - 1 if s.kind is int else s.lo - 0.5))
        if s.hi is not None:
            bad.append(s.hi if s.hi_open else (s.hi + 1 if s.kind is int else s.hi + 0.5))
        if s.kind is float and s.finite:
            bad += [math.nan, math.inf, -math.inf]
    elif s.kind is str:
        bad += [7, ["x"]] + (["tpu", "cuda:99"] if s.pattern else [])
    elif typing.get_origin(s.kind) is list:
        bad += ["not-a-list", ["x"] if typing.get_args(s.kind) == (int,) else [[1]]]
    elif typing.get_origin(s.kind) is dict:
        bad += ["not-a-table", {"no_such_option": 1}]
    return bad


def known_bad() -> dict[str, list[typing.Any]]:
    """Values no field metadata can express: cross-section ranges, devices this machine lacks, names."""
    import torch

    devices = ["cuda:99"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"])
    mps = getattr(torch.backends, "mps", None)
    devices += [] if mps is not None and mps.is_available() else ["mps"]
    return {
        "run.device": devices,
        "model.hidden": [[-5], [0], [8, 0], [100_000, 100_000]],  # the last: 10⁹ parameters
        "model.channels": [[0], [-1, 4], [4]], "model.norm": ["group"],  # BASE's mlp has neither
        "model.name": ["resnet"], "data.dataset": ["mnist"], "data.partitioner": ["nope"],
        "data.num_clients": [0, 10**20], "strategy.name": ["nope"], "client.plugins": [["nope"]],
        "strategy.min_train_clients": [NUM_CLIENTS + 1], "faults.crash_clients": [[NUM_CLIENTS], [-1], [99]],
        "faults.crash_rounds": [[ROUNDS + 1], [0]], "privacy.noise_multiplier": [1e-300, 1e308],
        "privacy.counter_noise": [1e-300, 1e308], "client.lr": [math.inf], "strategy.server_lr": [math.nan],
    }


def bad_mutations() -> list[tuple[str, typing.Any]]:
    out = [(f"{sec}.{key}", value) for sec, key in all_keys() for value in invalid_values(sec, key)]
    out += [(key, value) for key, values in known_bad().items() for value in values]
    out += [(f"{sec}.no_such_key", 1) for sec in sections()]
    return out


def with_value(raw: dict, dotted: str, value: typing.Any) -> dict:
    out = copy.deepcopy(raw)
    sec, key = dotted.split(".", 1)
    out.setdefault(sec, {})[key] = value
    return out


# --------------------------------------------------------------------------------- properties
def test_every_key_of_every_section_has_bad_values():
    """The generator covers the schema: a new key without a refusable value fails here."""
    covered = {key for key, _ in bad_mutations()}
    missing = [f"{sec}.{key}" for sec, key in all_keys() if f"{sec}.{key}" not in covered]
    assert not missing, f"no invalid value generated for {missing}; teach invalid_values() the key's type"


@pytest.mark.parametrize("key, value", bad_mutations(), ids=lambda v: repr(v)[:40])
def test_an_invalid_value_is_refused_with_its_key(key, value):
    """Every invalid value the schema implies, for every key (all of them: each is refused in ~50 ms)."""
    with tempfile.TemporaryDirectory() as tmp:
        outcome, out_dir = run_scenario(with_value(BASE, key, value), Path(tmp))
        assert_refused(outcome, out_dir, errors.ConfigError.exit_code, [key], f"{key} = {value!r}")


def out_of_range(sec: str, key: str) -> st.SearchStrategy | None:
    """Any number beyond a bounded key's limits (the fixed values above are only its edges)."""
    s, parts = spec(sec, key), []
    if s.kind is int:
        if s.lo is not None:
            parts.append(st.integers(max_value=int(s.lo) - (0 if s.lo_open else 1)))
        if s.hi is not None:
            parts.append(st.integers(min_value=int(s.hi) + (0 if s.hi_open else 1)))
    elif s.kind is float:
        if s.lo is not None:
            parts.append(st.floats(max_value=s.lo, exclude_max=not s.lo_open, allow_nan=False))
        if s.hi is not None:
            parts.append(st.floats(min_value=s.hi, exclude_min=not s.hi_open, allow_nan=False))
    return st.one_of(parts) if parts else None


def cross_section_out_of_range() -> dict[str, st.SearchStrategy]:
    """Ranges only a cross-section or domain check knows (against BASE's clients and rounds)."""
    from fedsim.config import MAX_NOISE, MIN_NOISE

    noise = st.one_of(st.floats(0.0, MIN_NOISE, exclude_min=True, exclude_max=True),
                      st.floats(MAX_NOISE, 1e308, exclude_min=True))
    return {
        "faults.crash_clients": st.lists(st.integers(NUM_CLIENTS, 2**62), min_size=1, max_size=3),
        "faults.crash_rounds": st.lists(st.integers(ROUNDS + 1, 10**9), min_size=1, max_size=3),
        "strategy.min_train_clients": st.integers(NUM_CLIENTS + 1, 10**12),
        "model.hidden": st.lists(st.integers(-10**6, 10**3), min_size=1, max_size=3).filter(lambda w: min(w) < 1),
        "privacy.noise_multiplier": noise, "privacy.counter_noise": noise, "privacy.count_noise": noise,
    }


@st.composite
def out_of_range_values(draw) -> tuple[str, typing.Any]:
    generators = {f"{sec}.{key}": g for sec, key in all_keys() if (g := out_of_range(sec, key)) is not None}
    generators |= cross_section_out_of_range()
    key = draw(st.sampled_from(sorted(generators)))
    return key, draw(generators[key])


@SETTINGS
@given(out_of_range_values())
def test_any_out_of_range_number_is_refused_with_its_key(mutation):
    key, value = mutation
    with tempfile.TemporaryDirectory() as tmp:
        outcome, out_dir = run_scenario(with_value(BASE, key, value), Path(tmp))
        assert_refused(outcome, out_dir, errors.ConfigError.exit_code, [key], f"{key} = {value!r}")


@st.composite
def valid_scenarios(draw) -> tuple[dict, list[str]]:
    keys = draw(st.lists(st.sampled_from(all_keys()), min_size=1, max_size=3, unique=True))
    raw, changed = copy.deepcopy(BASE), []
    for sec, key in keys:
        value = draw(valid_values(sec, key))
        if value is not None:
            raw = with_value(raw, f"{sec}.{key}", value)
            changed.append(f"{sec}.{key}={value!r}")
    return raw, changed


@SETTINGS
@given(valid_scenarios())
def test_valid_values_run_or_end_with_a_typed_error(case):
    """Valid values one by one may still be refused together (e.g. DP-SGD with a strategy's own task),
    or a run may stop on a documented error (quorum, budget…), but never with a traceback."""
    raw, changed = case
    with tempfile.TemporaryDirectory() as tmp:
        outcome, out_dir = run_scenario(raw, Path(tmp))
        assert_typed(outcome, out_dir, ", ".join(changed))


# ---------------------------------------------------------------------------------- npz files
NPZ_FAULTS = {  # name: (what it does to the arrays, exit code, what the error line must name)
    "nan": (lambda a: a["x_train"].__setitem__((0, 0), np.nan), 3, "x_train"),
    "inf": (lambda a: a["x_train"].__setitem__((1, 0), -np.inf), 3, "x_train"),
    "beyond_float32": (lambda a: a.update(x_train=a["x_train"].astype(np.float64) * 1e300), 3, "x_train"),
    "complex": (lambda a: a.update(x_train=a["x_train"] + 1j), 3, "x_train"),
    "strings": (lambda a: a.update(x_train=a["x_train"].astype(str)), 3, "x_train"),
    "flat": (lambda a: a.update(x_train=a["x_train"][:, 0]), 3, "x_train"),
    "no_features": (lambda a: a.update(x_train=a["x_train"][:, :0]), 3, "x_train"),
    "negative_label": (lambda a: a["y_train"].__setitem__(0, -1), 3, "y_train"),
    "label_1e9": (lambda a: a["y_train"].__setitem__(0, 10**9), 3, "y_train"),
    "label_uint64_max": (lambda a: a.update(y_train=a["y_train"].astype(np.uint64) + np.uint64(2**64 - 4)), 3,
                         "y_train"),
    "fractional_label": (lambda a: a.update(y_train=a["y_train"] + 0.5), 3, "y_train"),
    "float_label_1e300": (lambda a: a.update(y_train=np.r_[1e300, a["y_train"][1:]]), 3, "y_train"),
    "bool_labels": (lambda a: a.update(y_train=a["y_train"] > 0), 3, "y_train"),
    "short_labels": (lambda a: a.update(y_train=a["y_train"][:-1]), 3, "y_train"),
    "matrix_labels": (lambda a: a.update(y_train=np.stack([a["y_train"]] * 2, 1)), 3, "y_train"),
    "no_labels": (lambda a: a.pop("y_train"), 3, "y_train"),
    "x_test_alone": (lambda a: a.update(x_test=a["x_train"][:3]), 3, "x_test"),
    "x_test_shape": (lambda a: a.update(x_test=np.zeros((3, a["x_train"].shape[1] + 1), np.float32),
                                        y_test=a["y_train"][:3]), 3, "x_test"),
    "y_test_out_of_range": (lambda a: a.update(x_test=a["x_train"][:3], y_test=np.full(3, 10**6)), 3, "y_test"),
    "owner_ids_too_long": (lambda a: a.update(natural_ids=np.zeros(len(a["y_train"]) + 1, np.int64)), 3,
                           "natural_ids"),
}
NPZ_VALID = {  # variants a user may legitimately save
    "plain": lambda a: None,
    "float64_x": lambda a: a.update(x_train=a["x_train"].astype(np.float64)),
    "int_x": lambda a: a.update(x_train=(a["x_train"] * 10).astype(np.int16)),
    "bool_x": lambda a: a.update(x_train=a["x_train"] > 0),
    "image_x": lambda a: a.update(x_train=a["x_train"].reshape(len(a["x_train"]), 1, 1, -1)),
    "float_labels": lambda a: a.update(y_train=a["y_train"].astype(np.float32)),
    "column_labels": lambda a: a.update(y_train=a["y_train"][:, None]),
    "uint8_labels": lambda a: a.update(y_train=a["y_train"].astype(np.uint8)),
    "test_split": lambda a: a.update(x_test=a["x_train"][:4].copy(), y_test=a["y_train"][:4].copy()),
}


@st.composite
def npz_cases(draw) -> tuple[dict, str, int | None]:
    n = draw(st.integers(8, 30))
    classes = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    arrays = {"x_train": rng.normal(size=(n, draw(st.integers(1, 4)))).astype(np.float32),
              "y_train": rng.permutation(np.arange(n) % classes).astype(np.int64)}
    name = draw(st.sampled_from(sorted(NPZ_FAULTS) + sorted(NPZ_VALID)))
    (NPZ_FAULTS[name][0] if name in NPZ_FAULTS else NPZ_VALID[name])(arrays)
    num_classes = draw(st.one_of(st.none(), st.integers(classes, n))) if name in NPZ_VALID else None
    return arrays, name, num_classes


def _npz_scenario(path: Path, num_classes: typing.Any) -> dict:
    options = {"path": str(path)} | ({} if num_classes is None else {"num_classes": num_classes})
    return {**copy.deepcopy(BASE), "data": {**BASE["data"], "dataset": "npz", "num_clients": 2, "options": options}}


@SETTINGS
@given(npz_cases())
def test_npz_files_run_or_are_refused_naming_the_array(case):
    arrays, name, num_classes = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        np.savez(path, **arrays)
        outcome, out_dir = run_scenario(_npz_scenario(path, num_classes), Path(tmp))
        if name in NPZ_VALID:
            assert_typed(outcome, out_dir, f"valid npz '{name}'")
            assert outcome.code == 0, f"valid npz '{name}' (num_classes={num_classes}) refused:\n{outcome.stderr}"
        else:
            _, code, array = NPZ_FAULTS[name]
            assert_refused(outcome, out_dir, code, [array], f"npz '{name}'")


@pytest.mark.parametrize("option, code", [(0, 2), (10**9, 2), (1, 3), ("two", 2)])
def test_npz_num_classes_option_is_bounded_by_the_data(option, code, tmp_path):
    """Labels 0..2 in 12 samples: 0, or more classes than samples (10⁹ would be a 64 GB output layer),
    are settings errors; fewer classes than the labels need is a data error; both name the option."""
    path = tmp_path / "data.npz"
    np.savez(path, x_train=np.ones((12, 2), np.float32), y_train=np.arange(12) % 3)
    outcome, out_dir = run_scenario(_npz_scenario(path, option), tmp_path)
    assert_refused(outcome, out_dir, code, ["data.options.num_classes"], f"num_classes = {option!r}")


# ------------------------------------------------------------------------------ scenario paths
def _binary(tmp: Path) -> str:
    (tmp / "binary.toml").write_bytes(bytes(range(256)) * 4)
    return str(tmp / "binary.toml")


def _directory(tmp: Path) -> str:
    (tmp / "dir.toml").mkdir()
    return str(tmp / "dir.toml")


def _under_a_file(tmp: Path) -> str:
    (tmp / "file").write_text("x")
    return str(tmp / "file" / "scenario.toml")


def _huge(tmp: Path) -> str:
    (tmp / "huge.toml").write_text("# padding\n" * 200_000)
    return str(tmp / "huge.toml")


def _deep(tmp: Path) -> str:
    (tmp / "deep.toml").write_text("x = " + "[" * 50_000 + "]" * 50_000 + "\n")
    return str(tmp / "deep.toml")


PATHS = {
    "binary file": _binary,
    "directory": _directory,
    "NUL byte": lambda tmp: str(tmp / "sce\x00nario.toml"),
    "newline in the name": lambda tmp: str(tmp / "a\nb.toml"),
    "under a file": _under_a_file,
    "a device": lambda tmp: os.devnull,
    "too long a name": lambda tmp: str(tmp / ("x" * 5000 + ".toml")),
    "missing, with a built-in's name": lambda tmp: str(tmp / "nowhere" / "default.toml"),
    "larger than a scenario": _huge,
    "nested too deeply": _deep,
}


@pytest.mark.parametrize("name", sorted(PATHS))
def test_an_unusable_scenario_path_is_refused_naming_it(name, tmp_path):
    given_path = PATHS[name](tmp_path)
    out_dir = tmp_path / "run"
    outcome = fedsim("run", given_path, "--out", str(out_dir))
    shown = given_path.replace("\x00", "\\x00").replace("\n", "\\n")
    assert_refused(outcome, out_dir, errors.ConfigError.exit_code, [shown[:60]], name)


def test_an_unreadable_scenario_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "secret.toml"
    path.write_text("[run]\nrounds = 1\n")
    path.chmod(0)
    real_read = Path.read_bytes

    def read_bytes(self):  # root (as in CI) reads a mode-0 file: make this one unreadable for everyone
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    outcome = fedsim("run", str(path), "--out", str(tmp_path / "run"))
    assert_refused(outcome, tmp_path / "run", errors.ConfigError.exit_code, [str(path)], "unreadable")


def test_the_base_scenario_runs():
    """The base every property mutates is valid, so a refusal above is the mutation's doing."""
    with tempfile.TemporaryDirectory() as tmp:
        outcome, out_dir = run_scenario(BASE, Path(tmp))
        assert_typed(outcome, out_dir, "base")
        assert outcome.code == 0, outcome.stderr

