"""Schemathesis against the Quick Start app's OpenAPI, through ASGI on a loop of our own:
positive and negative cases of every operation, each sent as tenant alpha, tenant beta,
an unknown, malformed or missing tenant. No 5xx, and no response ever carries another
tenant's rows."""

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from .sync import fresh_database, new_runner

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "main.py"
TENANTS = ["alpha", "beta"]
HEADERS: st.SearchStrategy[dict[str, str]] = st.one_of(
    st.sampled_from([*TENANTS, "nobody", "ALPHA", "alpha%C2%A0", "../beta", "beta;alpha", ""]).map(
        lambda t: {"X-Tenant-ID": t}
    ),
    st.just({}),
)


@contextmanager
def quickstart(url: str) -> Iterator[ModuleType]:
    """The Quick Start's main.py, imported as written, on `url`."""
    previous = os.environ.get("TENANCY_DATABASE_URL")
    os.environ["TENANCY_DATABASE_URL"] = url
    try:
        spec = importlib.util.spec_from_file_location("quickstart_main_under_fuzz", EXAMPLE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("quickstart_main_under_fuzz", None)
        if previous is None:
            os.environ.pop("TENANCY_DATABASE_URL", None)
        else:
            os.environ["TENANCY_DATABASE_URL"] = previous


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_schemathesis_finds_no_server_error_and_no_crossed_tenant(backend: str) -> None:
    with new_runner() as runner, fresh_database(runner, backend) as url, quickstart(url) as main:
        manager, app = main.manager, main.app
        runner.run(manager.initialize())
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        try:
            for tenant in TENANTS:
                runner.run(manager.register_tenant(tenant, tenant, app_metadata=main.Base.metadata))
                for _ in range(2):  # overlapping ids: 1 and 2 in each tenant
                    created = runner.run(
                        client.post(
                            "/orders",
                            params={"description": f"{tenant}-secret"},
                            headers={"X-Tenant-ID": tenant},
                        )
                    )
                    assert created.status_code == 200, created.text
            # PostgreSQL cannot store NUL in text: the Quick Start's POST /orders (kept as the
            # spec has it, with no input validation) answers 500 to a description holding
            # one. That is the app's input to check, not the library's; see docs/security.md.
            config = schemathesis.Config.from_dict({"generation": {"allow-x00": backend != "postgres"}})
            schema = schemathesis.openapi.from_dict(app.openapi(), config=config)
            cases = st.one_of(
                schema.as_strategy(generation_mode=GenerationMode.POSITIVE),
                schema.as_strategy(generation_mode=GenerationMode.NEGATIVE),
            )

            @given(case=cases, headers=HEADERS)
            @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
            def probe(case: schemathesis.Case[Any], headers: dict[str, str]) -> None:
                kwargs = case.as_transport_kwargs(base_url="http://test", headers=headers)
                request = client.build_request(
                    kwargs["method"],
                    kwargs["url"],
                    params=kwargs.get("params"),
                    headers=kwargs.get("headers"),
                    json=kwargs.get("json"),
                    content=kwargs.get("data"),
                )
                response = runner.run(client.send(request))
                case.validate_response(response, checks=[not_a_server_error])
                tenant = headers.get("X-Tenant-ID")
                for other in TENANTS:
                    if other != tenant:
                        assert f"{other}-secret" not in response.text, (tenant, response.text)

            probe()
        finally:
            runner.run(client.aclose())
            runner.run(manager.close())
            runner.run(main.store.close())
