"""schemathesis against the served OpenAPI document: for generated requests to every operation
(valid and invalid ones), the app never answers 5xx and every answer conforms to the document.

The app runs in process, on its own event loop in a thread (schemathesis calls it with
``requests``); Hypothesis is driven directly with ``as_strategy()`` (no schemathesis pytest plugin)
and derandomized, so a run is repeatable.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks
from schemathesis.specs.openapi import checks as openapi_checks

from sessionmgr import openapi
from sessionmgr.clock import FakeClock
from sessionmgr.testing import FakeLemonSlice
from sessionmgr.web import create_app

from .helpers import FAKE_API_KEY, make_manager

# No 5xx, and status, content type and body as documented; invalid requests are refused. Not
# positive_data_acceptance: some rules are not schema-shaped (`after` takes only cursors the server
# issued, `since` an ISO time or a duration, a create exactly one of agent_id/agent_image_url).
CHECKS = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
]
TOKEN = "schema-admin-token"
EXAMPLES = 15  # generated requests per operation and generation mode
START_TIMEOUT = 30.0  # seconds for the in-thread app to come up


class AppThread:
    """The app, a manager and FakeLemonSlice on a loop of their own; ``url`` once started."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.url = ""
        self.session_ids: list[str] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AppThread:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("the app did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        clock = FakeClock()
        async with (
            FakeLemonSlice(api_key=FAKE_API_KEY, clock=clock) as lemon,
            make_manager(lemon, clock, self.db_url, reaper=True) as manager,
        ):
            for agent in ("alpha", "beta", "gamma"):
                record = await manager.create_session(agent_id=agent, metadata={"team": "x"})
                self.session_ids += [str(record.id), str(record.session_id)]
            await manager.end_session(record.id)
            runner = web.AppRunner(create_app(manager, admin_token=TOKEN), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppThread]:
    db = tmp_path_factory.mktemp("schema") / "s.db"
    with AppThread(f"sqlite+aiosqlite:///{Path(db)}") as app:
        yield app


SCHEMA = schemathesis.openapi.from_dict(openapi.document("test"))
OPERATIONS = [
    (method.upper(), path)
    for path, operations in openapi.document("test")["paths"].items()
    for method in operations
]


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_generated_requests_get_documented_answers(
    app_url: AppThread, method: str, path: str
) -> None:
    operation = SCHEMA[path][method]
    strategies = [
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    ]
    if "{id}" in path:  # also aim at sessions that exist, not only random ids
        strategies += [
            operation.as_strategy(path_parameters={"id": key}) for key in app_url.session_ids
        ]
    http = requests.Session()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    statuses: list[int] = []

    @settings(
        max_examples=EXAMPLES * 2,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies))
    def check(case: Any) -> None:
        response = case.call(base_url=app_url.url, session=http, headers=headers)
        statuses.append(response.status_code)
        assert response.status_code < 500
        case.validate_response(response, checks=CHECKS, headers=headers)

    check()
    assert statuses, "no request was generated"
