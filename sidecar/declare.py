"""How a setting is declared: ``setting`` and ``secret_setting``, and what they record.

Each field of ``config.Settings`` is declared with one of them: the variable's name,
parser, default, help and README text in one place (a ``Setting``, kept in the
field's metadata under :data:`SETTING_KEY`), from which ``config`` derives parsing,
the flags and the redacted print, and ``scripts/gen_config_docs.py`` the README's
table. ``Variable`` is one environment variable as an operator sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar, cast

from .parsers import shown

__all__ = ["SETTING_KEY", "Setting", "Variable", "secret_setting", "setting"]

T = TypeVar("T")

#: The dataclass field metadata key that holds a field's ``Setting``.
SETTING_KEY: Final = "sidecar.config.setting"


@dataclass(frozen=True, slots=True)
class Variable:
    """One environment variable as an operator sees it: its name, flag and default."""

    name: str
    default: str | None
    help: str
    secret: bool = False

    @property
    def flag(self) -> str:
        base = self.name.removeprefix("VELLUM_").removeprefix("SIDECAR_")
        return "--" + base.lower().replace("_", "-")


@dataclass(frozen=True, slots=True)
class Setting:
    """The declaration of one ``Settings`` field: every fact about its variable.

    ``default`` is written as an operator would write it and parsed by ``parse``
    like any value, so the README shows exactly what the code does. A setting
    with ``file_help`` also reads ``<name>_FILE`` (the two are mutually exclusive).
    """

    name: str
    default: str | None
    help: str
    doc: str
    parse: Callable[[str, Path | None], Any]
    show: Callable[[Any], str]
    required: bool = False
    secret: bool = False
    file_help: str | None = None

    @property
    def file_name(self) -> str | None:
        return f"{self.name}_FILE" if self.file_help is not None else None

    @property
    def required_hint(self) -> str:
        if self.file_name is not None:
            return f"set {self.name} or {self.file_name}"
        return self.help

    def variables(self) -> tuple[Variable, ...]:
        """The variable (and its ``_FILE`` twin), each with its own flag."""
        help_ = self.help
        if self.required:
            help_ += " (required" + (f" unless {self.file_name})" if self.file_name else ")")
        own = Variable(self.name, self.default, help_, self.secret)
        if self.file_name is None or self.file_help is None:
            return (own,)
        return own, Variable(self.file_name, None, self.file_help)


def setting(
    name: str,
    parse: Callable[[str], T],
    default: str | None,
    *,
    help: str,
    doc: str,
    show: Callable[[T], str] | None = None,
) -> T:
    """Declare a ``Settings`` field read from ``name`` (and its flag).

    ``default=None`` makes the variable required. The field's own default is
    ``parse(default)``, so a directly built ``Settings`` agrees with ``from_env``.
    """
    decl = Setting(
        name,
        default,
        help,
        doc,
        parse=lambda value, _path: parse(value),
        show=show or shown,
        required=default is None,
    )
    if default is None:
        return cast(T, field(metadata={SETTING_KEY: decl}))
    return field(default=parse(default), metadata={SETTING_KEY: decl})


def secret_setting(
    name: str,
    parse: Callable[[str, Path | None], T],
    *,
    unset: object = None,
    required: bool = False,
    help: str,
    file_help: str,
    doc: str,
    show: Callable[[Any], str],
) -> T:
    """Declare a secret field read from ``name`` or from the file ``<name>_FILE`` names.

    The file is read at start (surrounding whitespace, such as the trailing
    newline of a mounted Secret, stripped); ``parse`` gets the value and the path
    it came from (``None`` for the variable itself). ``unset`` is the value when
    neither is set and the setting is not required.
    """
    decl = Setting(
        name,
        None,
        help,
        doc,
        parse=parse,
        show=show,
        required=required,
        secret=True,
        file_help=file_help,
    )
    if required:
        return cast(T, field(repr=False, metadata={SETTING_KEY: decl}))
    return cast(T, field(default=unset, repr=False, metadata={SETTING_KEY: decl}))
