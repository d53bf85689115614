"""Scenario schema: TOML → validated, typed configuration.

Unknown keys and bad values are rejected before anything runs; every error names the dotted key,
the bad value and the allowed values. ``--set section.key=value`` overrides any key (the value is
parsed as a TOML value, falling back to a string).

Sections: ``run``, ``data``, ``model``, ``client`` (with one sub-table per enabled plugin),
``strategy`` (``name`` plus that strategy's own options), ``privacy``, ``faults``, ``ray``, ``deploy``.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedsim.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = "run"
    seed: int = Field(0, ge=0)
    rounds: int = Field(10, ge=1)
    engine: Literal["local", "ray", "deploy"] = "local"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    output: str = "runs"
    threads: int = Field(1, ge=1, description="torch intra-op threads per client process")
    vectorize: bool = Field(
        False, description="local engine: train a round's plain-fit clients together (torch.vmap "
        "over stacked parameters; clients with plugins, faults, Adam, BatchNorm/Dropout, and conv "
        "models on CPU stay per client); equal to the per-client path up to float32 rounding, not bit "
        "for bit, hence off by default")
    eval_every: int = Field(1, ge=1)
    round_timeout: float = Field(600.0, gt=0, description="seconds to wait for replies in one round")
    quorum: float = Field(0.5, ge=0.0, le=1.0, description="fraction of sampled clients that must reply")
    checkpoint_every: int = Field(1, ge=0, description="rounds between checkpoints (0 = never)")
    progress: bool = True


class DataConfig(_Section):
    dataset: str = "digits"
    num_clients: int = Field(10, ge=1)
    partitioner: str = "dirichlet"
    partition: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    server_labelled: int = Field(0, ge=0, description="labelled samples held by the server")


class ModelConfig(_Section):
    name: str = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [64])
    channels: list[int] = Field(default_factory=lambda: [16, 32])
    norm: Literal["none", "batch", "group"] = "none"
    groups: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    epochs: int = Field(1, ge=0)
    batch_size: int = Field(32, ge=1)
    max_steps: int = Field(0, ge=0, description="cap on local steps per round (0 = no cap)")
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    plugins: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _plugin_tables(self) -> "ClientConfig":
        extra = self.model_extra or {}
        for key, value in extra.items():
            if key not in self.plugins:
                raise ValueError(
                    f"unknown key 'client.{key}'; plugin settings are allowed only for enabled "
                    f"plugins {self.plugins}; add '{key}' to client.plugins or remove the table"
                )
            if not isinstance(value, dict):
                raise ValueError(f"'client.{key}' must be a table of plugin settings")
        return self

    def plugin_settings(self, name: str) -> dict[str, Any]:
        return dict((self.model_extra or {}).get(name, {}))


class StrategyConfig(BaseModel):
    """``name`` and the common sampling keys; every other key is an option of that strategy."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = "fedavg"
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    min_train_clients: int = Field(2, ge=1)
    fraction_evaluate: float = Field(0.0, ge=0.0, le=1.0)

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PrivacyConfig(_Section):
    """Privacy mechanism, its noise and clipping, the accountant and the budget.

    ``dp-sgd``: sample-level DP on every client (Opacus per-sample clipping, Poisson sampling with
    ``sample_rate``). ``dp-fedavg``: client-level DP on the server (per-update clipping, Gaussian
    noise on the average, ``client_sampling`` poisson or fixed). ``dp-ftrl``: client-level DP with
    tree-aggregated noise on the running sum of clipped updates (no sampling amplification).
    """

    mechanism: Literal["none", "dp-sgd", "dp-fedavg", "dp-ftrl"] = "none"
    noise_multiplier: float = Field(0.0, ge=0.0)
    clip_norm: float = Field(1.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_epsilon: float = Field(0.0, ge=0.0, description="budget; 0 = no budget check")
    accountant: Literal["rdp", "pld", "zcdp"] = "rdp"
    sample_rate: float = Field(0.0, ge=0.0, le=1.0, description="dp-sgd Poisson rate; 0 = batch_size / local size")
    client_sampling: Literal["poisson", "fixed"] = "poisson"
    clipping: Literal["flat", "per_layer"] = "flat"
    adaptive_clipping: bool = False
    target_quantile: float = Field(0.5, gt=0.0, lt=1.0)
    clip_lr: float = Field(0.2, gt=0.0)
    count_noise: float = Field(0.0, ge=0.0, description="σ_b of the clipped-count release (adaptive clipping)")
    ftrl_restart_every: int = Field(0, ge=0, description="dp-ftrl: restart the tree every k rounds (0 = never)")
    release_counters: bool = Field(True, description="publish participation counts through a DP counter")
    counter: Literal["tree", "honaker", "sqrt"] = "tree"
    counter_noise: float = Field(10.0, ge=0.0, description="noise multiplier of the released counters")
    secure_rng: bool = Field(False, description="OS randomness for noise (not reproducible)")


class FaultsConfig(_Section):
    dropout: float = Field(0.0, ge=0.0, le=1.0, description="probability a sampled client drops per round")
    stragglers: float = Field(0.0, ge=0.0, le=1.0, description="probability a client is slow in a round")
    straggler_slowdown: float = Field(5.0, ge=1.0)
    crash_clients: list[int] = Field(default_factory=list, description="clients whose ClientApp raises")
    crash_rounds: list[int] = Field(default_factory=list, description="rounds they raise in (empty = all)")
    crash_mode: Literal["raise", "exit"] = Field(
        "raise", description="raise: the ClientApp raises; exit: its process dies abruptly (os._exit on the "
        "deployment engine, a dead node on the local engine)")
    byzantine_clients: list[int] = Field(default_factory=list)
    attack: Literal["none", "sign_flip", "gaussian", "nan"] = Field(
        "none", description="implemented attacks only (fedsim.faults.ATTACKS); a scenario asking for another "
        "is refused, never run with honest clients")


class RayConfig(_Section):
    num_cpus: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0.0)
    max_workers: int = Field(0, ge=0, description="0 = as many actors as CPUs allow")


class DeployConfig(_Section):
    nodes: int = Field(2, ge=1)
    insecure: bool = True
    startup_timeout: float = Field(120.0, gt=0)
    run_timeout: float = Field(900.0, gt=0)


class Scenario(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python")


# --------------------------------------------------------------------------------------------
def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Scenario
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}))


def _to_config_error(err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "scenario"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        return ConfigError(key, "unknown key", f"allowed keys here: {', '.join(allowed)}")
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    if first["type"] not in ("value_error", "missing") and not isinstance(got, dict):
        msg = f"{msg} (got {got!r})"
    more = len(err.errors()) - 1
    return ConfigError(key, msg, f"fix this key in the scenario or with --set {key}=VALUE"
                       + (f"; {more} more problem(s) after this one" if more else ""))


def parse_value(text: str) -> Any:
    """Parse an override value as a TOML value (``3``, ``0.1``, ``true``, ``[1, 2]``, ``"x"``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw scenario dict (returns a new dict)."""
    out = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(item, "override must look like section.key=value",
                              "e.g. --set run.rounds=5")
        path, value = item.split("=", 1)
        parts = [p for p in path.strip().split(".") if p]
        if len(parts) < 2:
            raise ConfigError(path, "override needs a section and a key", "e.g. --set client.lr=0.1")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(path, f"'{part}' is a value, not a section")
        node[parts[-1]] = parse_value(value.strip())
    return out


def scenario_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Scenario:
    """Validate a raw dict (plus overrides) into a :class:`Scenario`.

    Values are checked here; registered names (strategy, plugins, dataset...) are checked by the
    resolver step, ``fedsim.catalog.resolve``, which the entry points call."""
    raw = {k: v for k, v in raw.items() if k != "meta"}  # a run directory's config.toml has [meta]
    data = apply_overrides(raw, overrides)
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as err:
        raise _to_config_error(err) from None
    return scenario


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """Read a TOML scenario file, apply overrides and validate it."""
    p = Path(path)
    if not p.exists():
        builtin = Path(__file__).resolve().parent.parent / "scenarios" / p.name
        if builtin.exists():
            p = builtin
        else:
            raise ConfigError(str(path), "scenario file not found",
                              "pass a path to a .toml file; `fedsim list` shows the built-in scenarios")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(p), f"not valid TOML: {err}", "fix the syntax at the line shown") from None
    return scenario_from_dict(raw, overrides)


def dumps_scenario(scenario: Scenario) -> str:
    """Serialise a scenario to TOML text (round-trips through :func:`scenario_from_dict`)."""
    import tomli_w

    return tomli_w.dumps(_drop_none(scenario.to_dict()))


def loads_scenario(text: str) -> Scenario:
    return scenario_from_dict(tomllib.loads(text))


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d
