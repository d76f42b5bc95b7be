"""`fastapi-tenancy demo`: two tenants, one order id each, and each sees only its own."""

from typing import Any

import sqlalchemy as sa

from ..errors import TenantNotFoundError
from ..manager import TenancyManager
from .base import print_rows, run_with_manager

__all__ = ["DEMO_TENANTS", "demo"]

DEMO_TENANTS = {"demo-acme": "Acme Corporation", "demo-globex": "Globex Inc."}
"""The demo's tenants, by identifier: registered on the first run, reused after."""


def demo() -> None:
    """Register two demo tenants, give each an order with the SAME id, and show each sees its own."""
    metadata = sa.MetaData()
    orders = sa.Table(
        "demo_orders",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("description", sa.String(200), nullable=False),
    )

    async def work(manager: TenancyManager) -> list[dict[str, Any]]:
        rows = []
        for identifier, name in DEMO_TENANTS.items():
            try:
                tenant = await manager.get_tenant(identifier)
            except TenantNotFoundError:
                tenant = await manager.register_tenant(identifier, name, app_metadata=metadata)
                async with manager.session(tenant) as session, session.begin():
                    await session.execute(orders.insert().values(id=1, description=f"First order of {name}"))
            async with manager.session(tenant) as session:
                for order in (await session.execute(sa.select(orders).order_by(orders.c.id))).all():
                    rows.append(
                        {"tenant": identifier, "order_id": order.id, "description": order.description}
                    )
        return rows

    rows = run_with_manager(work)
    print_rows("Each tenant sees only its own orders", rows, ["tenant", "order_id", "description"])
