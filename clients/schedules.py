"""Schedules keyed to the federated run's ``progress`` (0..1 over all rounds, ``TrainState.progress``).

Papers write schedules over epochs of one training run ("ramp τ from 0 to 1 over the epochs",
"the window from 50 % to 90 % of training"). On a federated client the local epochs restart every
round, so a schedule over local epochs would restart too; plugins key their schedules to the global
``progress`` instead, which the loop advances after every local step.
"""

from __future__ import annotations

import math


def _fraction(progress: float, start: float, end: float) -> float:
    if end <= start:
        return 1.0 if progress >= start else 0.0
    return min(max((progress - start) / (end - start), 0.0), 1.0)


def linear(progress: float, begin: float, final: float, start: float = 0.0, end: float = 1.0) -> float:
    """``begin`` before ``start``, ``final`` after ``end``, linear in between."""
    return begin + (final - begin) * _fraction(progress, start, end)


def cosine(progress: float, begin: float, final: float, start: float = 0.0, end: float = 1.0) -> float:
    """Half-cosine from ``begin`` (at ``start``) to ``final`` (at ``end``)."""
    return final + (begin - final) * 0.5 * (1.0 + math.cos(math.pi * _fraction(progress, start, end)))


def in_window(progress: float, start: float, end: float) -> bool:
    """Whether ``start <= progress < end`` (a technique active for part of the run)."""
    return start <= progress < end
