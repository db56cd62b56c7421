"""vellum-sidecar: a localhost entitlement sidecar for the Vellum API."""

from __future__ import annotations

from importlib.metadata import version

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # The one version source is pyproject.toml's [project] version, read from the
    # installed distribution's metadata when first asked for (no import-time work).
    if name == "__version__":
        return version("vellum-sidecar")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
