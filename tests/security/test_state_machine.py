"""Property-based isolation: a Hypothesis state machine drives random sequences of
register / suspend / activate / delete (soft and for good) / re-register / write / read /
commit / rollback over several tenants, some steps running several tenants' work at
once (asyncio.gather), against real PostgreSQL and SQLite. After every step, every
tenant is read through the app and must show exactly the rows the model says it
committed, each marked with that tenant's slug and incarnation, or the refusal its
status calls for."""

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_tenancy import (
    InvalidTransitionError,
    TenancyConfig,
    TenancyError,
    TenancyManager,
    TenantAlreadyExistsError,
    TenantInactiveError,
    TenantNotFoundError,
)

from ..apps import Base, Order, build_app
from .sync import fresh_database, new_runner

SLUGS = ["ant", "bee", "cat-1", "cat--1"]  # the last two differ only in '-' vs '--'
IDS = st.integers(min_value=1, max_value=6)  # few ids: tenants' primary keys overlap


@dataclass
class Model:
    """What one slug should look like from outside."""

    status: str = "absent"  # absent | active | suspended | deleted
    incarnation: int = 0  # bumped by every registration of the slug
    rows: dict[int, str] = field(default_factory=dict)  # committed rows


@dataclass
class Pending:
    """An open session of a tenant with uncommitted writes."""

    context: contextlib.AbstractAsyncContextManager[AsyncSession]
    session: AsyncSession
    writes: dict[int, str] = field(default_factory=dict)


EXPECTED_STATUS = {"absent": 404, "active": 200, "suspended": 403, "deleted": 403}


class TenancyMachine(RuleBasedStateMachine):
    backend = "postgres"

    def __init__(self) -> None:
        super().__init__()
        self.runner = new_runner()
        self._database = fresh_database(self.runner, self.backend)
        url = self._database.__enter__()
        # A small shared pool (PostgreSQL): every pending session holds a connection.
        config = TenancyConfig(
            database_url=url,
            database_pool_size=len(SLUGS) + 2,
            database_max_overflow=0,
            database_pool_timeout=10,
        )
        self.manager = TenancyManager(config)
        self.runner.run(self.manager.initialize())
        transport = httpx.ASGITransport(app=build_app(self.manager))
        self.client = httpx.AsyncClient(transport=transport, base_url="http://test")
        self.model = {slug: Model() for slug in SLUGS}
        self.pending: dict[str, Pending] = {}
        self.purged: dict[str, Any] = {}  # slug -> the record of its destroyed incarnation
        self.marks = itertools.count()

    def teardown(self) -> None:
        try:
            for slug in list(self.pending):
                self.runner.run(self._close_pending(slug, commit=False))
            self.runner.run(self.client.aclose())
            self.runner.run(self.manager.close())
        finally:
            self._database.__exit__(None, None, None)
            self.runner.close()

    # -- helpers -------------------------------------------------------------------

    def _mark(self, slug: str, order_id: int) -> str:
        return f"{slug}/{self.model[slug].incarnation}/{order_id}/{next(self.marks)}"

    async def _close_pending(self, slug: str, *, commit: bool) -> None:
        pending = self.pending.pop(slug)
        try:
            if commit:
                await pending.session.commit()
        finally:
            await pending.context.__aexit__(None, None, None)
        if commit:
            self.model[slug].rows.update(pending.writes)

    async def _read(self, slug: str) -> None:
        """Read `slug` through the app; check the status and every row against the model."""
        model = self.model[slug]
        response = await self.client.get("/orders", headers={"X-Tenant-ID": slug})
        assert response.status_code == EXPECTED_STATUS[model.status], (slug, model.status, response.text)
        if response.status_code != 200:
            return
        body = response.json()
        assert body["tenant"] == slug
        seen = {o["id"]: o["description"] for o in body["orders"]}
        for description in seen.values():  # nothing of another tenant or an earlier incarnation
            assert description.startswith(f"{slug}/{model.incarnation}/"), (slug, description)
        assert seen == model.rows, (slug, seen, model.rows)

    async def _write_and_commit(self, slug: str, order_id: int) -> None:
        description = self._mark(slug, order_id)
        async with self.manager.session(await self.manager.get_tenant(slug)) as session:
            await session.merge(Order(id=order_id, description=description))
            await session.commit()
        self.model[slug].rows[order_id] = description

    def _expect(self, error: type[TenancyError] | None, coroutine: Any) -> Any:
        if error is None:
            return self.runner.run(coroutine)
        with pytest.raises(error):
            self.runner.run(coroutine)
        return None

    def _record(self, slug: str) -> Any:
        return self.runner.run(self.manager.store.get_by_identifier(slug))

    def _session_refused(self, tenant: Any, error: type[TenancyError]) -> None:
        """A session for a record read before a change is refused: the registry decides."""

        async def attempt() -> None:
            async with self.manager.session(tenant):
                pass

        with pytest.raises(error):
            self.runner.run(attempt())

    # -- lifecycle -----------------------------------------------------------------

    @rule(slug=st.sampled_from(SLUGS))
    def register(self, slug: str) -> None:
        model = self.model[slug]
        error = None if model.status == "absent" else TenantAlreadyExistsError
        self._expect(error, self.manager.register_tenant(slug, slug, app_metadata=Base.metadata))
        if error is None:
            model.status, model.incarnation, model.rows = "active", model.incarnation + 1, {}
            old = self.purged.pop(slug, None)
            if old is not None:  # a record of the purged incarnation never reaches the new one
                self._session_refused(old, TenantNotFoundError)

    @rule(slug=st.sampled_from(SLUGS))
    def suspend(self, slug: str) -> None:
        model = self.model[slug]
        error = {"absent": TenantNotFoundError, "active": None}.get(model.status, InvalidTransitionError)
        before = self._record(slug)
        self._expect(error, self.manager.suspend_tenant(slug))
        if error is None:
            model.status = "suspended"
            self._session_refused(before, TenantInactiveError)  # a job holding the active record

    @rule(slug=st.sampled_from(SLUGS))
    def activate(self, slug: str) -> None:
        model = self.model[slug]
        error = {"absent": TenantNotFoundError, "suspended": None}.get(model.status, InvalidTransitionError)
        self._expect(error, self.manager.activate_tenant(slug))
        if error is None:
            model.status = "active"

    @rule(slug=st.sampled_from(SLUGS), destroy=st.booleans(), again=st.booleans())
    def delete(self, slug: str, destroy: bool, again: bool) -> None:
        """Delete (soft, or for good); for good and `again`: register the slug anew at once."""
        model = self.model[slug]
        if destroy and slug in self.pending:
            # Dropping storage waits for the open transaction's locks: end it first,
            # as a real purge waits for in-flight work.
            self.runner.run(self._close_pending(slug, commit=False))
        error = TenantNotFoundError if model.status == "absent" else None
        before = self._record(slug)
        self._expect(error, self.manager.delete_tenant(slug, destroy_data=destroy))
        if error is None:
            model.status = "absent" if destroy else "deleted"
            self._session_refused(before, TenantNotFoundError if destroy else TenantInactiveError)
            if destroy:
                model.rows = {}
                self.purged[slug] = before
                if again:
                    self.register(slug)

    # -- data ----------------------------------------------------------------------

    @rule(slug=st.sampled_from(SLUGS), order_id=IDS)
    def write(self, slug: str, order_id: int) -> None:
        """Write in the tenant's open session (opening one if needed); not committed yet."""
        model = self.model[slug]
        pending = self.pending.get(slug)
        if pending is None:
            error = {"absent": TenantNotFoundError, "active": None}.get(model.status, TenantInactiveError)
            if error is not None:
                # A record from when the tenant was served: refused by the registry check.
                tenant = self.runner.run(self.manager.store.get_by_identifier(slug))
                stale = tenant.with_changes() if tenant is not None else None
                with pytest.raises(error):
                    self.runner.run(self._open(slug, stale))
                return
            pending = self.runner.run(self._open(slug, None))
        description = self._mark(slug, order_id)
        self.runner.run(pending.session.merge(Order(id=order_id, description=description)))
        self.runner.run(pending.session.flush())
        pending.writes[order_id] = description

    async def _open(self, slug: str, tenant: Any) -> Pending:
        if tenant is None:
            tenant = await self.manager.get_tenant(slug)
        context = self.manager.session(tenant)
        session = await context.__aenter__()
        pending = Pending(context, session)
        self.pending[slug] = pending
        return pending

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        # In-flight work finishes even if the tenant was suspended or soft-deleted
        # meanwhile (the documented bound); new work is refused.
        self.runner.run(self._close_pending(data.draw(st.sampled_from(sorted(self.pending))), commit=True))

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        self.runner.run(self._close_pending(data.draw(st.sampled_from(sorted(self.pending))), commit=False))

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def read_own_writes(self, data: st.DataObject) -> None:
        """Inside the open transaction: committed rows plus its own writes, nobody else's."""
        slug = data.draw(st.sampled_from(sorted(self.pending)))
        pending = self.pending[slug]
        rows = self.runner.run(pending.session.execute(sa.select(Order.id, Order.description)))
        assert {r[0]: r[1] for r in rows} == {**self.model[slug].rows, **pending.writes}

    @rule(
        work=st.lists(
            st.tuples(st.sampled_from(SLUGS), IDS), min_size=2, max_size=4, unique_by=lambda w: w[0]
        )
    )
    def concurrently(self, work: list[tuple[str, int]]) -> None:
        """Several tenants at once: active ones write and commit, then everyone reads."""
        writers = [
            (slug, order_id)
            for slug, order_id in work
            if self.model[slug].status == "active" and slug not in self.pending  # no lock waits
        ]

        async def together() -> None:
            await asyncio.gather(*(self._write_and_commit(slug, order_id) for slug, order_id in writers))
            await asyncio.gather(*(self._read(slug) for slug, _ in work * 3))

        self.runner.run(together())

    @invariant()
    def every_tenant_shows_exactly_its_committed_rows(self) -> None:
        async def read_all() -> None:
            await asyncio.gather(*(self._read(slug) for slug in SLUGS))

        self.runner.run(read_all())


class PostgresMachine(TenancyMachine):
    backend = "postgres"


class SQLiteMachine(TenancyMachine):
    backend = "sqlite"


MACHINES = {"postgres": PostgresMachine, "sqlite": SQLiteMachine}


@pytest.mark.parametrize("backend", list(MACHINES))
def test_random_lifecycles_and_transactions_never_cross_tenants(backend: str) -> None:
    run_state_machine_as_test(
        MACHINES[backend],
        settings=settings(
            max_examples=8 if backend == "postgres" else 15,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
