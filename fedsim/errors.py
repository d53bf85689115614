"""Typed errors. Every message says what went wrong, why, and how to fix it.

Each class carries its own process exit code in ``exit_code``; the CLI exits with ``err.exit_code``
and prints one line plus the hint, never a traceback, for these user-facing errors.
"""

from __future__ import annotations


class FedSimError(Exception):
    """Base class of every error fedsim raises on purpose.

    Parameters
    ----------
    message
        What went wrong (and why).
    hint
        How to fix it; shown on its own line by the CLI.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one line plus hint
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class ConfigError(FedSimError):
    """A scenario or a setting is malformed: unknown key, wrong type, value out of range."""

    exit_code = 2

    def __init__(self, key: str, message: str, hint: str | None = None) -> None:
        self.key = key
        super().__init__(f"{key}: {message}", hint)


class UnknownNameError(ConfigError):
    """A strategy, plugin, partitioner, dataset or model name that is not registered."""


class DataError(FedSimError):
    """A dataset cannot be loaded or partitioned as asked (e.g. an impossible partition)."""

    exit_code = 3


class AggregationError(FedSimError):
    """Client replies cannot be aggregated (no valid reply left, mismatched shapes, NaN...)."""

    exit_code = 4


class ClientUpdateError(AggregationError):
    """One client's reply is invalid; the round goes on without it.

    Attributes name the client and the offending field so the failure can be recorded.
    """

    def __init__(self, client: int | str, field: str, message: str, hint: str | None = None) -> None:
        self.client = client
        self.field = field
        super().__init__(f"client {client}: field '{field}': {message}", hint)


class ClientFailure(FedSimError):
    """A client raised or died; recorded in clients.jsonl, never fatal to the run by itself."""

    exit_code = 5


class QuorumError(FedSimError):
    """Too few clients answered (or were available) before the deadline."""

    exit_code = 6


class PrivacyBudgetExceeded(FedSimError):
    """The next round would push ε(δ) beyond the scenario's budget; the run stops before it."""

    exit_code = 7


class IncompatibleModelError(FedSimError):
    """The model cannot be used as asked (e.g. BatchNorm under DP-SGD)."""

    exit_code = 8


class EngineError(FedSimError):
    """An engine (Ray, deployment) failed to start or its run did not complete."""

    exit_code = 9


class FailedRoundError(QuorumError):
    """A round got no valid reply, or fewer than its quorum: the model could not be updated.

    With ``run.on_failed_round = "stop"`` (the default) the run stops after recording that round;
    ``"continue"`` goes on and counts the failed rounds in ``summary.json``.
    """

    exit_code = 10


class RunDirectoryError(FedSimError):
    """The run directory cannot be used as asked (``--out`` not empty, not a run directory...)."""

    exit_code = 11


class CheckpointError(FedSimError):
    """A run cannot be resumed from its checkpoint: missing, corrupted, or written by another scenario."""

    exit_code = 12


class RunInterrupted(FedSimError):
    """The run was interrupted (SIGINT, SIGTERM); everything written until then is valid and resumable."""

    exit_code = 130


class AuditViolation(FedSimError):
    """A privacy audit's empirical lower bound on ε exceeds the claimed ε: the claim is refuted."""

    exit_code = 13
