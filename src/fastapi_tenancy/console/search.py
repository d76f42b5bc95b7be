"""The console's tenant list: filters over the registry, read in identifier order with a bounded scan.

The registry answers one question quickly: the tenants (of one status) after an
identifier, in order (`TenantStore.list`, keyset paging). Everything else the list
filters on (a text in the name, the tier, the plan, the database server) is applied here, to tenants read
a batch at a time. A page stops when it is full, or when `scan_limit` tenants have been
read without filling it: then it says how far it got, and the next page goes on from
there. Each page costs at most `scan_limit` rows, whatever the size of the registry,
with any store.
"""

from dataclasses import dataclass

from sqlalchemy.engine import make_url

from ..manager import TenancyManager
from ..tenant import Tenant, TenantStatus

__all__ = ["TenantFilter", "TenantPage", "search_tenants", "server_of"]

_BATCH = 1000


@dataclass(frozen=True)
class TenantFilter:
    """What the operator asked for; empty fields match every tenant."""

    text: str = ""
    """Found in the identifier or the name, ignoring case."""
    status: TenantStatus | None = None
    tier: str = ""
    plan: str = ""
    """The tenant's `metadata["plan"]`, exactly."""
    server: str = ""
    """The database server that holds the tenant's data (`host:port`, see `server_of`), exactly."""

    @property
    def scans(self) -> bool:
        """Whether tenants must be read and tested here (the registry filters by status only)."""
        return bool(self.text or self.tier or self.plan or self.server)

    def matches(self, tenant: Tenant, manager: TenancyManager | None = None) -> bool:
        if self.status is not None and tenant.status is not self.status:
            return False
        if self.server and (manager is None or server_of(manager, tenant) != self.server):
            return False
        if self.tier and tenant.tier != self.tier:
            return False
        if self.plan and tenant.metadata.get("plan") != self.plan:
            return False
        needle = self.text.casefold()
        return not needle or needle in tenant.identifier or needle in tenant.name.casefold()


@dataclass(frozen=True)
class TenantPage:
    """One page of the list."""

    tenants: list[Tenant]
    after: str | None
    """Where the next page starts (its `after`), or None at the end of the registry."""
    scanned: int
    """How many tenants were read for this page."""
    budget_spent: bool
    """True when the page stopped at `scan_limit` rather than full: more may match further on."""


async def search_tenants(
    manager: TenancyManager,
    where: TenantFilter,
    *,
    after: str | None = None,
    page_size: int = 50,
    scan_limit: int = 20_000,
) -> TenantPage:
    """The tenants matching `where` after the identifier `after`, at most `page_size` of them."""
    if not where.scans:
        # The registry does all of it: one query, one row more than the page to know
        # whether there is a next one.
        rows = await manager.list_tenants(status=where.status, after=after, limit=page_size + 1)
        more = len(rows) > page_size
        rows = rows[:page_size]
        return TenantPage(rows, rows[-1].identifier if more and rows else None, len(rows), False)
    found: list[Tenant] = []
    scanned = 0
    cursor = after
    while True:
        batch_size = min(_BATCH, scan_limit - scanned)
        batch = await manager.list_tenants(status=where.status, after=cursor, limit=batch_size)
        for tenant in batch:
            scanned += 1
            cursor = tenant.identifier
            if where.matches(tenant, manager):
                found.append(tenant)
                if len(found) == page_size:
                    return TenantPage(found, cursor, scanned, False)
        if len(batch) < batch_size:
            return TenantPage(found, None, scanned, False)
        if scanned >= scan_limit:
            return TenantPage(found, cursor, scanned, True)


def server_of(manager: TenancyManager, tenant: Tenant) -> str:
    """`host:port` of the database server holding `tenant`'s data: its own (database isolation
    with a `database_url` of its own), else the application's."""
    try:
        url = manager.isolation.migration_url(tenant)
    except Exception:  # no known tier, an undecryptable URL: the detail page says which
        return "unknown"
    if url is None:
        url = make_url(manager.config.database_url)
    return f"{url.host or 'local'}:{url.port or ''}".rstrip(":")
