"""Scenario schema: TOML → validated, typed configuration.

Unknown keys and bad values are rejected before anything runs; every error names the dotted key,
the bad value and the allowed values. ``--set section.key=value`` overrides any key (the value is
parsed as a TOML value, falling back to a string).

Sections: ``run``, ``data``, ``model``, ``client`` (with one sub-table per enabled plugin),
``strategy`` (``name`` plus that strategy's own options), ``privacy``, ``faults``, ``ray``, ``deploy``.
"""

from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedsim.config_hints import pld_noise_too_small, privacy_setting_without_effect, to_config_error, unknown_key_hint
from fedsim.config_checks import DEFAULT_STRAGGLER_SLOWDOWN, check_sections_agree
from fedsim.errors import ConfigError
from fedsim.privacy.bounds import MAX_NOISE, MIN_NOISE, outside_accountable_range


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_device(name: str) -> str:
    """``run.device`` if this machine has it, else :class:`ConfigError`: ``cuda:N`` needs ``N`` visible CUDA
    devices, ``mps`` Apple's Metal backend (torch is imported only then), so it is refused before any run."""
    if name in ("auto", "cpu"):
        return name
    import torch

    fix = 'use run.device = "auto" (CUDA when present, else CPU) or "cpu"'
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("run.device", "'mps' asked for but this machine has no usable Apple MPS device", fix)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name.startswith("cuda") and int(name.partition(":")[2] or 0) >= visible:
        raise ConfigError("run.device", f"'{name}' asked for but {visible} CUDA device(s) are visible", fix)
    return name


class RunConfig(_Section):
    name: str = "run"
    seed: int = Field(0, ge=0)
    rounds: int = Field(10, ge=1, le=1_000_000)
    engine: Literal["local", "ray", "deploy"] = "local"
    device: Annotated[str, AfterValidator(check_device)] = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    output: str = "runs"
    threads: int = Field(1, ge=1, le=1024, description="torch intra-op threads per client process")
    vectorize: Literal["auto"] | bool = Field(
        "auto", description="local engine: train a round's plain-fit clients together (torch.vmap over "
        "stacked parameters). auto: wherever the plugin set and model allow it and it is faster (conv "
        "models stay per client on CPU); true: every eligible client, convolutions included; false: "
        "always client by client. Clients with plugins, faults, Adam, DP-SGD or BatchNorm/Dropout run "
        "per client (reason in summary.json). Deterministic for a scenario and seed; equal to the "
        "per-client path up to float32 rounding, not bit for bit")
    eval_every: int = Field(1, ge=1)
    round_timeout: float = Field(600.0, gt=0, description="seconds to wait for replies in one round (local "
                                 "engine: a client call that took longer is recorded as timeout, its reply dropped)")
    quorum: float = Field(0.5, ge=0.0, le=1.0, description="fraction of sampled clients that must reply")
    checkpoint_every: int = Field(1, ge=0, description="rounds between checkpoints (0 = never; such a run "
                                  "cannot be resumed)")
    on_failed_round: Literal["stop", "continue"] = Field(
        "stop", description="a round with no valid reply (below quorum, or refused by the aggregator) leaves the "
        "model unchanged: stop the run there with FailedRoundError (exit code 10), or continue and count it in "
        "summary.json")
    require_all_partitions: bool = Field(
        False, description="refuse, before round 1, a federation in which some of the data.num_clients "
        "partitions have no node (by default such partitions are a warning and never train)")
    progress: bool = True
    client_app: str = Field(
        "", pattern=r"^([A-Za-z_][\w.]*:[A-Za-z_][\w.]*)?$", description="the clients' Flower ClientApp as "
        "'module:object' (a flwr.clientapp.ClientApp or a zero-argument factory returning one); empty = fedsim's "
        "own. Every engine serves it (deploy and flwr run through fedsim's ClientApp, which hands it every "
        "message); it must be importable wherever clients run")
    log: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="tracking sinks fed every round's metrics and ε (fedsim/sinks.py); "
        "a sink whose package is missing is refused when the run starts, before it writes anything")


#: most clients a scenario may simulate (every engine holds one Flower ``Context`` per client)
MAX_CLIENTS = 1_000_000


def _no_nan_or_inf(prefix: str, value: Any) -> None:
    """:class:`ConfigError` naming the dotted key of the first NaN/±inf in a free-form table (TOML has them;
    no fedsim setting means anything with them)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(prefix, f"must be a finite number, got {value}", f"set {prefix} to a finite number")
    for key, item in value.items() if isinstance(value, dict) else enumerate(value if isinstance(value, list) else []):
        _no_nan_or_inf(f"{prefix}.{key}" if isinstance(value, dict) else prefix, item)


class DataConfig(_Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    dataset: str = "digits"
    num_clients: int = Field(10, ge=1, le=MAX_CLIENTS)
    partitioner: str = "dirichlet"
    partition: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    server_labelled: int = Field(0, ge=0, description="labelled samples held by the server")
    label_noise: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of training labels flipped to "
                               "another class (seeded; the test split stays clean)")

    @model_validator(mode="after")
    def _finite_tables(self) -> "DataConfig":
        _no_nan_or_inf("data.partition", self.partition)
        _no_nan_or_inf("data.options", self.options)
        return self


class ModelConfig(_Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    name: str = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [64])
    channels: list[int] = Field(default_factory=lambda: [16, 32])
    norm: Literal["none", "batch", "group"] = "none"
    groups: int = Field(4, ge=1)
    group_size: int = Field(0, ge=0, description="cnn: input channels per group of every convolution after "
                            "the first (grouped convolutions of constant group size; 0 = dense)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("hidden", "channels")
    @classmethod
    def _widths_at_least_one(cls, widths: list[int]) -> list[int]:
        bad = [w for w in widths if w < 1]
        if bad:
            raise ValueError(f"every layer needs at least one unit or channel, got {widths} (bad: {bad}); "
                             "use an empty list [] for no hidden layer")
        return widths


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)

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
            if not isinstance(value, dict):  # a setting, not a plugin's table: e.g. client.rounds (run.rounds)
                raise ConfigError(f"client.{key}", "unknown key (only an enabled plugin's table may be added to "
                                  "[client])", unknown_key_hint(Scenario, "client", key))
            if key not in self.plugins:
                raise ConfigError(f"client.{key}", f"plugin settings are allowed only for enabled plugins "
                                  f"{self.plugins}", f"add '{key}' to client.plugins or remove the table")
            _no_nan_or_inf(f"client.{key}", value)
        return self

    def plugin_settings(self, name: str) -> dict[str, Any]:
        return dict((self.model_extra or {}).get(name, {}))


class StrategyConfig(BaseModel):
    """``name`` and the common sampling keys; every other key is an option of that strategy."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)

    name: str = "fedavg"
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    min_train_clients: int = Field(2, ge=1)
    fraction_evaluate: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _finite_options(self) -> "StrategyConfig":
        for key, value in (self.model_extra or {}).items():
            _no_nan_or_inf(f"strategy.{key}", value)
        return self

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PrivacyConfig(_Section):
    """Privacy mechanism, its noise and clipping, the accountant and the budget.

    ``dp-sgd``: sample-level DP on every client (Opacus per-sample clipping, Poisson sampling with
    ``sample_rate``). ``dp-fedavg``: client-level DP on the server (per-update clipping, Gaussian
    noise on the average, ``client_sampling`` poisson or fixed). ``dp-ftrl``: client-level DP with
    tree-aggregated noise on the running sum of clipped updates (no sampling amplification).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    mechanism: Literal["none", "dp-sgd", "dp-fedavg", "dp-ftrl"] = "none"
    noise_multiplier: float = Field(0.0, ge=0.0)
    target_epsilon: float = Field(0.0, ge=0.0, description="calibrate noise_multiplier so that the run's total "
                                  "ε(δ) stays ≤ this (0 = off; not with noise_multiplier)")
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

    @model_validator(mode="after")
    def _noise_in_accountable_range(self) -> "PrivacyConfig":
        """Each noise multiplier σ is 0 or in ``[MIN_NOISE, MAX_NOISE]``: the accountants compute 1/σ² and σ²,
        which underflow or overflow far outside it (σ = 1e-300 divides by zero, σ = 1e308 overflows)."""
        for key in ("noise_multiplier", "counter_noise", "count_noise"):
            if outside_accountable_range(sigma := getattr(self, key)):
                raise ConfigError(f"privacy.{key}", f"{sigma} is outside 0 or [{MIN_NOISE}, {MAX_NOISE:g}], where "
                                  "the privacy accountants' arithmetic is sound",
                                  f"set privacy.{key} = 0 (off) or a value in [{MIN_NOISE}, {MAX_NOISE:g}]")
        if (refused := pld_noise_too_small(self) or privacy_setting_without_effect(self)) is not None:
            raise ConfigError(*refused)
        if self.max_epsilon and self.target_epsilon > self.max_epsilon:
            raise ConfigError("privacy.target_epsilon", f"{self.target_epsilon:g} is above the budget "
                              f"privacy.max_epsilon = {self.max_epsilon:g}, so the run would be stopped before its "
                              "end", "lower privacy.target_epsilon to at most privacy.max_epsilon")
        return self




class FaultsConfig(_Section):
    dropout: float = Field(0.0, ge=0.0, le=1.0, description="probability a sampled client drops per round")
    stragglers: float = Field(0.0, ge=0.0, le=1.0, description="probability a client is slow in a round")
    straggler_slowdown: float = Field(DEFAULT_STRAGGLER_SLOWDOWN, ge=1.0)
    crash_clients: list[int] = Field(default_factory=list, description="clients whose ClientApp raises")
    crash_rounds: list[int] = Field(default_factory=list, description="rounds they raise in (empty = all)")
    crash_mode: Literal["raise", "exit"] = Field(
        "raise", description="raise: the ClientApp raises; exit: its process dies abruptly (os._exit on the "
        "deployment engine, a dead node on the local engine)")
    byzantine_clients: list[int] = Field(default_factory=list)
    attack: Literal["none", "sign_flip", "gaussian", "nan", "label_flip", "alie", "ipm", "min_max", "min_sum"] = Field(
        "none", description="implemented attacks only (fedsim.faults.ATTACKS); a scenario asking for another "
        "is refused, never run with honest clients")
    attack_strength: float | None = Field(
        None, gt=0.0, allow_inf_nan=False, description="ipm: ε (default 0.1); gaussian: σ (default 1.0); "
        "refused with any other attack, which has no strength")

    @model_validator(mode="after")
    def _strength_has_an_effect(self) -> "FaultsConfig":
        if self.attack_strength is not None and self.attack not in ("ipm", "gaussian"):
            raise ConfigError("faults.attack_strength", f"attack '{self.attack}' has no strength, so this value "
                              "would have no effect", "remove faults.attack_strength, or use attack \"ipm\" (ε) "
                              "or \"gaussian\" (σ)")
        return self


class RayConfig(_Section):
    num_cpus: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0.0)
    max_workers: int = Field(0, ge=0, description="0 = as many actors as CPUs allow")


class DeployConfig(_Section):
    nodes: int = Field(2, ge=1)
    insecure: bool = Field(
        False, description="false (default): TLS with a throw-away CA and SuperNode authentication (a key "
        "per node, registered before the run; unregistered nodes are refused). true: plaintext gRPC and any "
        "node may join and claim a partition: loopback experiments only")
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

    @model_validator(mode="after")
    def _sections_agree(self) -> "Scenario":  # crashes of real clients in real rounds; enough clients
        return check_sections_agree(self)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python")


# ------------------------------------------------------------------------ cross-section checks
# --------------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """Parse an override value as a TOML value (``3``, ``0.1``, ``true``, ``[1, 2]``, ``"x"``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):  # not TOML (or nested beyond the parser): a string
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
    from fedsim.config_switch import drop_switched_options  # a switched strategy/partitioner sheds old options

    drop_switched_options(raw, out, {i.split("=", 1)[0].strip() for i in overrides or []})
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
        raise to_config_error(err, Scenario) from None
    return scenario


#: largest scenario file read: a scenario is a few hundred bytes; this refuses a data file given by mistake
MAX_SCENARIO_BYTES = 1 << 20
_PATH_HINT = "pass the path of a .toml scenario file; `fedsim list` shows the built-in scenarios"


def _shown(path: str) -> str:
    """``path`` printable on one line (NUL, newlines and other control characters escaped)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)


def read_scenario_text(path: str | Path) -> tuple[Path, str]:
    """The file at ``path`` (a built-in scenario for a bare name only, never for a missing ``dir/name.toml``)
    and its text. A NUL byte, a missing file, a directory, a device, more than :data:`MAX_SCENARIO_BYTES`, an
    unreadable or a binary (not UTF-8) file is a :class:`ConfigError` whose key is the path."""
    text = str(path)
    shown = _shown(text) if len(text) <= 200 else _shown(text[:100]) + "..." + _shown(text[-97:])
    if "\x00" in text:
        raise ConfigError(shown, "the path contains a NUL byte, which no file name can hold", _PATH_HINT)
    p = Path(text)
    try:
        if not p.exists():
            builtin = Path(__file__).resolve().parent.parent / "scenarios" / p.name
            if not builtin.is_file() and not p.suffix:  # `fedsim run default`: the built-in default.toml
                builtin = builtin.with_name(p.name + ".toml")
            if p.name != text or not builtin.is_file():
                raise ConfigError(shown, "scenario file not found", _PATH_HINT)
            p = builtin
        if p.is_dir():
            raise ConfigError(shown, "is a directory, not a scenario file", _PATH_HINT)
        if not p.is_file():
            raise ConfigError(shown, "is not a regular file (a device, a pipe or a socket)", _PATH_HINT)
        if (size := p.stat().st_size) > MAX_SCENARIO_BYTES:
            raise ConfigError(shown, f"is {size} bytes, over a scenario's {MAX_SCENARIO_BYTES} (a data file?)",
                              _PATH_HINT)
        data = p.read_bytes()
    except OSError as err:
        raise ConfigError(shown, f"cannot be read ({err.strerror or err})",
                          "check the path and the file's permissions") from None
    try:
        return p, data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(shown, f"is not a text file (byte {err.start} is not UTF-8), so not a TOML scenario",
                          _PATH_HINT) from None


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """Read a TOML scenario file (see :func:`read_scenario_text`), apply overrides and validate it."""
    p, text = read_scenario_text(path)
    try:
        raw = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as err:  # RecursionError: arrays nested too deeply
        why = err if isinstance(err, tomllib.TOMLDecodeError) else "nested too deeply to parse"
        raise ConfigError(_shown(str(p)), f"not valid TOML: {why}", "fix the syntax at the line shown") from None
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
