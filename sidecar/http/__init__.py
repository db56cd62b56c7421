"""HTTP-facing pieces of the sidecar: listener limits and guards."""
