"""The values settings hold, apart from how they are read: secrets, listen addresses, redaction.

``Secret`` and ``ApiKeySource`` never show their value in ``repr``, ``str`` or
f-strings; ``Listen`` is where a listener binds; ``redact_url`` and
``redact_text`` hide the credentials of any URL (userinfo, password or token
options). ``sidecar/config.py`` declares the settings made of these,
``sidecar/logs.py`` passes every log line through ``redact_text``, and the
listeners bind ``Listen`` addresses (``sidecar/server.py``, ``sidecar/workers.py``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import unquote

__all__ = ["ApiKeySource", "Listen", "Secret", "redact_text", "redact_url"]


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class ApiKeySource:
    """The upstream API key, from a value or from a mounted file.

    A file is re-read when its modification time changes (checked at most once a
    second), so a rotated Kubernetes Secret takes effect without a restart. A file
    that becomes unreadable or empty keeps the last good key.
    """

    __slots__ = ("_checked", "_key", "_mtime", "path")

    def __init__(self, key: str, path: Path | None = None) -> None:
        self._key = key
        self.path = path
        self._mtime = path.stat().st_mtime_ns if path is not None else 0
        self._checked = 0.0

    def __repr__(self) -> str:
        return f"ApiKeySource(path={str(self.path) if self.path else None!r}, key='***')"

    def current(self, now: float) -> str:
        if self.path is not None and now - self._checked >= 1.0:
            self._checked = now
            try:
                mtime = self.path.stat().st_mtime_ns
                if mtime != self._mtime:
                    key = self.path.read_text(encoding="utf-8").strip()
                    if key:
                        self._key, self._mtime = key, mtime
            except OSError:
                pass
        return self._key


@dataclass(frozen=True, slots=True)
class Listen:
    """Where a listener binds: ``host:port`` or ``unix:/path.sock``."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def is_loopback(self) -> bool:
        if self.path is not None:
            return True
        host = self.host or ""
        if host == "localhost" or host.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self) -> str:
        """A URL a local client can use to reach this listener."""
        if self.path is not None:
            return f"unix:{self.path}"
        host = self.host or "127.0.0.1"
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @classmethod
    def parse(cls, value: str) -> Listen:
        value = value.strip()
        if value.startswith("unix:"):
            path = value[5:]
            if not path:
                raise ValueError("unix: needs a socket path, e.g. unix:/run/sidecar.sock")
            return cls(path=path)
        host, sep, port_s = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port or unix:/path.sock, got {value!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            port = int(port_s)
        except ValueError:
            raise ValueError(f"port must be a number, got {port_s!r}") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0-65535, got {port}")
        return cls(host=host, port=port)


#: Query and fragment options whose value is a credential (matched on the
#: option's words, so ``ssl_keyfile`` stays visible and ``sentinel_password`` not).
_CREDENTIAL_WORDS: Final = frozenset(
    {
        "apikey", "auth", "authorization", "code", "credential", "credentials", "jwt", "key",
        "pass", "passphrase", "passwd", "password", "pwd", "secret", "session", "sig",
        "signature", "token",
    }
)  # fmt: skip
_CREDENTIAL_PARTS: Final = ("password", "secret", "token", "apikey", "credential")
#: A URL in free text (a log line, an error): it ends at whitespace, a quote or a
#: backslash (so a JSON escape next to it is never consumed).
_URL_IN_TEXT: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>`\\]+")


def _is_credential(option: str) -> bool:
    low = unquote(option).lower()
    words = re.split(r"[^a-z0-9]+", low)
    return any(w in _CREDENTIAL_WORDS for w in words) or any(p in low for p in _CREDENTIAL_PARTS)


def _redact_options(options: str) -> str:
    return "&".join(
        f"{name}=***" if sep and _is_credential(name) else f"{name}{sep}{value}"
        for name, sep, value in (part.partition("=") for part in options.split("&"))
    )


def redact_url(url: str) -> str:
    """``url`` with its credentials replaced by ``***``; never raises.

    Hides the password (and a lone username, which some providers use as a
    token) and the value of every credential-like query or fragment option
    (``?sentinel_password=``, ``?token=``, ``?api_key=``). Works on the raw text,
    so a host list (``h1:26379,h2:26379``) and an unparsable URL survive.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
    tail, hash_, fragment = tail.partition("#")
    path, qmark, query = tail.partition("?")
    if qmark:
        query = _redact_options(query)
    if hash_ and "=" in fragment:
        fragment = _redact_options(fragment)
    return f"{scheme}{sep}{netloc}{path}{qmark}{query}{hash_}{fragment}"


def redact_text(text: str) -> str:
    """``text`` with every ``scheme://...`` URL in it passed through ``redact_url``."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
