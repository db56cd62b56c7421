"""The Redis key names of one tenant (entries, generations, locks, links, events, fan-out)."""

from __future__ import annotations

from urllib.parse import quote

__all__ = ["Keys"]


class Keys:
    """Key names for one tenant, all sharing the hash tag ``{tenant}``.

    The tag keeps a tenant's keys in one Redis Cluster slot, so multi-key
    scripts (generation checks) work on a cluster. The tenant id is
    percent-encoded: no ``{``, ``}`` or glob characters can reach a key name.
    """

    __slots__ = ("channel", "entry_pattern", "prefix", "tenant_gen")

    def __init__(self, tenant: str) -> None:
        self.prefix = f"vsc:{{{quote(tenant, safe='')}}}:"
        self.tenant_gen = self.prefix + "g"
        self.channel = self.prefix + "inv"
        self.entry_pattern = self.prefix + "e:*"

    def entry(self, customer: str) -> str:
        return self.prefix + "e:" + customer

    def gen(self, customer: str) -> str:
        return self.prefix + "g:" + customer

    def lock(self, customer: str) -> str:
        return self.prefix + "l:" + customer

    def account(self, account: str) -> str:
        return self.prefix + "a:" + account

    def event(self, event_id: str) -> str:
        return self.prefix + "evt:" + event_id
