"""Options shared by the ``fedsim`` commands: one name, help text and check for each.

``--format`` takes ``text`` or ``json``; anything else is refused with a
:class:`~fedsim.errors.ConfigError` naming ``--format`` and the choices, before the command runs.
``--quiet`` turns off what a run prints on stderr while it runs (:mod:`fedsim.progress`).
``--client-app module:object`` names the clients' Flower ClientApp (``run.client_app``).
"""

from __future__ import annotations

from typing import Annotated

import typer

from fedsim.errors import ConfigError

__all__ = ["FORMATS", "ClientAppName", "Format", "Quiet", "check_format", "keep_argument_help"]

#: the output formats every command offers (``json`` on stdout, for scripts)
FORMATS = ("text", "json")


def check_format(value: str) -> str:
    """Return ``value`` if it is one of :data:`FORMATS`, else raise a ConfigError naming ``--format``."""
    if value not in FORMATS:
        raise ConfigError("--format", f"unknown output format {value!r}; choices: {', '.join(FORMATS)}",
                          "use --format text (tables for people) or --format json (machine-readable, on stdout)")
    return value


Format = Annotated[str, typer.Option("--format", help="output format: text or json (json goes to stdout)",
                                     callback=check_format)]
ClientAppName = Annotated[str | None, typer.Option(
    "--client-app", help="the clients' Flower ClientApp as module:object (a ClientApp or a factory returning one; "
    "sets run.client_app; default: fedsim's own); it must be importable where clients run")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="print no progress on stderr (no bar, no line per "
                                     "round, no status lines); errors and the summary still print")]


def keep_argument_help() -> None:
    """Make ``--help`` show the help text of positional arguments (``SCENARIO``, ``RUN_DIR``…).

    Typer (0.20) stores an argument's help and then calls click's ``Parameter.__init__``, which since
    click 8.5 takes a ``help`` of its own and sets it to ``None``: the help text vanished from every
    ``--help``. This sets it again after that call; with versions that keep it, it changes nothing.
    Idempotent; ``tests/fedsim/test_cli.py`` checks the text appears.
    """
    from typer.core import TyperArgument

    original = TyperArgument.__init__
    if getattr(original, "keeps_help", False):
        return

    def init(self: TyperArgument, *args: object, help: str | None = None, **kwargs: object) -> None:
        original(self, *args, help=help, **kwargs)
        if help and not self.help:
            self.help = help

    init.keeps_help = True  # type: ignore[attr-defined]
    TyperArgument.__init__ = init  # type: ignore[method-assign]
