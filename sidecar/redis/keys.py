"""The Redis key names of one tenant (entries, generations, locks, links, events, fan-out,
the epoch, metered usage)."""

from __future__ import annotations

from urllib.parse import quote

__all__ = ["Keys", "KindKeys"]


class KindKeys:
    """The key names of one document kind: entries, generations and fetch locks.

    ``kind`` is the kind's prefix inside the tenant's namespace (``Kind.key``);
    each kind has its own per-document generations and its own tenant-wide
    generation, so a drop of one axis leaves the other's fills alone.
    """

    __slots__ = ("_entry", "_gen", "_lock", "entry_pattern", "tenant_gen")

    def __init__(self, prefix: str) -> None:
        self._entry = prefix + "e:"
        self._gen = prefix + "g:"
        self._lock = prefix + "l:"
        self.tenant_gen = prefix + "g"
        self.entry_pattern = self._entry + "*"

    def entry(self, ident: str) -> str:
        return self._entry + ident

    def gen(self, ident: str) -> str:
        return self._gen + ident

    def lock(self, ident: str) -> str:
        return self._lock + ident


class Keys(KindKeys):
    """Key names for one tenant, all sharing the hash tag ``{tenant}``.

    The tag keeps a tenant's keys in one Redis Cluster slot, so multi-key
    scripts (generation checks) work on a cluster. The tenant id is
    percent-encoded: no ``{``, ``}`` or glob characters can reach a key name.

    Its own ``entry``/``gen``/``lock`` names are the entitlement kind's (they
    predate the other kinds); :meth:`kind` gives any kind's.
    """

    __slots__ = ("_kinds", "beat", "channel", "epoch", "prefix", "seq", "usage_members")

    def __init__(self, tenant: str) -> None:
        self.prefix = f"vsc:{{{quote(tenant, safe='')}}}:"
        super().__init__(self.prefix)
        self.channel = self.prefix + "inv"
        #: The tenant's epoch and drop sequence (``cache.shared``: no TTL).
        self.epoch = self.prefix + "epoch"
        self.seq = self.prefix + "seq"
        #: Redis's clock at the fleet's last health check (TTL 60 s).
        self.beat = self.prefix + "beat"
        self._kinds: dict[str, KindKeys] = {"": self}
        #: The sidecars delivering metered usage (``usage.store``: a sorted set by
        #: Redis time of their last lease round).
        self.usage_members = self.prefix + "u:m"

    def kind(self, key: str) -> KindKeys:
        """The key names of the kind whose ``Kind.key`` is ``key``."""
        found = self._kinds.get(key)
        if found is None:
            found = self._kinds[key] = KindKeys(self.prefix + key)
        return found

    def account(self, account: str) -> str:
        return self.prefix + "a:" + account

    @property
    def events(self) -> str:
        """The push webhooks' replay guard: digests of the events first seen lately."""
        return self.prefix + "evts"

    # Metered usage (``sidecar/usage``): no TTL on a partition's stream nor on a
    # queued record, so ``volatile-lru`` never evicts what is not delivered yet.

    def usage_stream(self, partition: int) -> str:
        """One partition's stream of queued records (consumer group ``deliver``)."""
        return f"{self.prefix}u:s:{partition}"

    def usage_lease(self, partition: int) -> str:
        """The sidecar delivering one partition (TTL: the lease)."""
        return f"{self.prefix}u:l:{partition}"

    def usage_record(self, idempotency_key: str) -> str:
        """One record's state and outcome, by its idempotency key."""
        return self.prefix + "u:r:" + idempotency_key
