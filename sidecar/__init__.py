"""vellum-sidecar: a localhost entitlement sidecar for the Vellum API."""

__version__ = "0.1.0"
__all__ = ["__version__"]
