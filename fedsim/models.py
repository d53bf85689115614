"""Model factories: logistic regression, MLP and a small CNN (BatchNorm / GroupNorm option).

Every factory has the signature ``factory(cfg: ModelConfig, input_shape, num_classes) -> nn.Module``
and is registered by name in :data:`MODELS`. :func:`build_model` sizes the model on PyTorch's ``meta``
device first and refuses one above :data:`MAX_PARAMETERS` with a typed error, instead of letting the
allocator crash (or the OS kill the process) half-way through a run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedsim.config import ModelConfig, check_device
from fedsim.errors import ConfigError
from fedsim.registry import Registry

MODELS: Registry = Registry("model")

#: most parameters a model may have: 2**27 (512 MiB of float32 per copy; a round holds the global model,
#: every sampled client's copy, its gradients and optimiser state, and the replies being aggregated)
MAX_PARAMETERS = 2**27

#: the scenario key that sets a model's size, per registered model (for the error above the cap)
_SIZE_KEY = {"mlp": "model.hidden", "cnn": "model.channels"}
#: the ``[model]`` keys each built-in model reads; a model registered elsewhere is not checked
MODEL_KEYS = {"logreg": (), "mlp": ("hidden", "dropout"),
              "cnn": ("channels", "norm", "groups", "group_size", "dropout")}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; a device this machine lacks is a typed error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(check_device(name))


def to_fast_layout(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``; on a CPU, a model with 2-D convolutions is put in channels-last memory
    format, where PyTorch runs its convolutions with oneDNN's kernels instead of the generic ones: the
    built-in CNN's training step takes about a third less time at one thread (``bench/RESULTS.md``).
    Only the strides of the 4-D weights change: shapes, state dicts (read in logical order) and the
    inputs are as before; results equal the contiguous layout's to float rounding, and a given
    scenario and seed always run the same kernels, so runs stay reproducible."""
    model = model.to(device)
    if device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        g = math.gcd(groups, channels) or 1
        return nn.GroupNorm(g, channels)
    return nn.Identity()


@MODELS.register("logreg")
def logistic_regression(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression on flattened inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@MODELS.register("mlp")
def mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Fully connected ReLU network with ``cfg.hidden`` widths."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in cfg.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("cnn")
def cnn(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Small CNN: ``conv3x3 → norm → ReLU → maxpool`` per entry of ``cfg.channels``, then a linear head.

    ``cfg.norm = "group"`` gives GroupNorm, which DP-SGD (Opacus) accepts; BatchNorm it does not.
    ``cfg.group_size = g > 0`` makes every convolution after the first a grouped convolution whose groups
    all have ``g`` input channels (``c_in / g`` groups; Krizhevsky et al. 2012, ResNeXt: Xie et al., CVPR 2017,
    which keeps the group width constant); the first convolution, on the image channels, stays dense.
    """
    if len(input_shape) != 3:
        raise ConfigError("model.name", f"cnn needs image inputs (C, H, W), got shape {input_shape}",
                          "use model.name='mlp' for flat features")
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for i, out in enumerate(cfg.channels):
        groups = c // cfg.group_size if cfg.group_size and i else 1
        layers += [nn.Conv2d(c, out, 3, padding=1, groups=groups), _norm(cfg.norm, out, cfg.groups), nn.ReLU()]
        if min(h, w) >= 4:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers += [nn.Flatten()]
    if cfg.dropout:
        layers.append(nn.Dropout(cfg.dropout))
    layers.append(nn.Linear(c * h * w, num_classes))
    return nn.Sequential(*layers)


def check_model_keys(cfg: ModelConfig) -> None:
    """Refuse a ``[model]`` setting the chosen model would ignore, never run without its effect.

    A non-default value of a key the model does not read (:data:`MODEL_KEYS`; ``model.groups`` counts only
    with ``norm = "group"``) is a :class:`ConfigError`, and so are GroupNorm groups that do not divide every
    channel count (Wu & He, "Group Normalization", ECCV 2018, split channels evenly; no silent gcd).
    ``model.hidden`` is not checked yet: the test suite's tiny scenario sets it, then switches models.
    """
    used = MODEL_KEYS.get(cfg.name)
    if used is None:
        return
    used = tuple(k for k in used if k != "groups" or cfg.norm == "group")
    for key in ("channels", "norm", "groups", "group_size", "dropout"):
        default = type(cfg).model_fields[key].get_default(call_default_factory=True)
        if key not in used and getattr(cfg, key) != default:
            raise ConfigError(f"model.{key}", f"is set but model '{cfg.name}' (norm '{cfg.norm}') does not use it, "
                              "so it would have no effect", f"remove model.{key} or use a model that reads it")
    if "groups" in used and (bad := [c for c in cfg.channels if c % cfg.groups]):
        raise ConfigError("model.groups", f"GroupNorm's {cfg.groups} groups do not divide the channels {bad}",
                          "choose model.groups dividing every entry of model.channels")
    if cfg.name == "cnn" and cfg.group_size:
        _check_group_size(cfg.channels, cfg.group_size)


def _check_group_size(channels: list[int], size: int) -> None:
    """Grouped convolutions need ``size | c_in`` and ``c_in/size | c_out`` for every layer after the first."""
    if len(channels) < 2:
        raise ConfigError("model.group_size", f"only convolutions after the first are grouped, and "
                          f"model.channels = {channels} has no second one, so it would have no effect",
                          "add a convolution (e.g. model.channels = [16, 32]) or set model.group_size = 0")
    for c_in, c_out in zip(channels, channels[1:]):
        if c_in % size or c_out % (c_in // size):
            raise ConfigError("model.group_size", f"a convolution {c_in} -> {c_out} channels cannot be cut into "
                              f"groups of {size} input channels ({c_in} must be a multiple of {size}, and {c_out} "
                              f"of the {c_in // size if c_in >= size else 0} groups)",
                              "choose model.group_size dividing every entry of model.channels but the last, "
                              "with each next entry a multiple of the group count")


def count_parameters(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> int:
    """Parameters of the model ``cfg`` would build, counted on the ``meta`` device (nothing allocated).

    Raises :class:`ConfigError` when a setting would have no effect (:func:`check_model_keys`), the model
    is impossible (a zero-size input, fewer than one class) or has more than :data:`MAX_PARAMETERS` parameters.
    """
    factory = MODELS.get(cfg.name, key="model.name")
    check_model_keys(cfg)
    shape = tuple(int(d) for d in input_shape)
    if not shape or min(shape) < 1 or num_classes < 1:
        raise ConfigError("model.name", f"cannot build '{cfg.name}' for inputs of shape {shape} and {num_classes} "
                          "class(es): every input dimension and the number of classes must be at least 1",
                          "check the dataset (data.dataset / data.options): its samples must have at least one "
                          "feature and its labels at least one class")
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        count = sum(p.numel() for p in factory(cfg, shape, num_classes).parameters())
    if count > MAX_PARAMETERS:
        key = _SIZE_KEY.get(cfg.name, "model.name")
        raise ConfigError(key, f"'{cfg.name}' for inputs {shape} and {num_classes} classes would have {count:,} "
                          f"parameters, more than fedsim's limit of {MAX_PARAMETERS:,} (512 MiB per float32 copy)",
                          f"make the model smaller ({key}) or the data's inputs/classes fewer")
    return count


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build the model named in ``cfg`` with weights drawn from ``seed`` (same seed, same weights).

    The size is checked first (:func:`count_parameters`), so an oversized model is a typed error.
    """
    factory = MODELS.get(cfg.name, key="model.name")
    count_parameters(cfg, input_shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(cfg, tuple(input_shape), num_classes)
