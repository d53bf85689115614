"""Model factories: logistic regression, MLP and a small CNN (BatchNorm / GroupNorm option).

Every factory has the signature ``factory(cfg: ModelConfig, input_shape, num_classes) -> nn.Module``
and is registered by name in :data:`MODELS`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedsim.config import ModelConfig
from fedsim.errors import ConfigError
from fedsim.registry import Registry

MODELS: Registry = Registry("model")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is a typed error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("run.device", f"'{name}' asked for but no CUDA device is visible",
                          "use run.device='auto' or 'cpu'")
    return torch.device(name)


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
    """
    if len(input_shape) != 3:
        raise ConfigError("model.name", f"cnn needs image inputs (C, H, W), got shape {input_shape}",
                          "use model.name='mlp' for flat features")
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out in cfg.channels:
        layers += [nn.Conv2d(c, out, 3, padding=1), _norm(cfg.norm, out, cfg.groups), nn.ReLU()]
        if min(h, w) >= 4:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers += [nn.Flatten()]
    if cfg.dropout:
        layers.append(nn.Dropout(cfg.dropout))
    layers.append(nn.Linear(c * h * w, num_classes))
    return nn.Sequential(*layers)


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build the model named in ``cfg`` with weights drawn from ``seed`` (same seed, same weights)."""
    factory = MODELS.get(cfg.name, key="model.name")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(cfg, tuple(input_shape), num_classes)
