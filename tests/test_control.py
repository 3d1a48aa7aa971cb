"""Control events, 402, QUEUED and wait_until_active, keep-alive: client, manager and the fake."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
from typing import Any

import pytest

from sessionmgr import (
    ActivationTimeout,
    ClientRequestError,
    EndReason,
    Metrics,
    NoCreditsError,
    NotFoundError,
    SessionNotLive,
    SessionStatus,
    server,
)
from sessionmgr.client import MAX_IMAGE_BYTES, TRIGGER_EVENT, LemonSliceClient, trigger_event
from sessionmgr.clock import FakeClock
from sessionmgr.config import Settings
from sessionmgr.manager import SessionManager
from sessionmgr.testing import FakeLemonSlice, Fault

from .helpers import FAKE_API_KEY, make_manager, wait_for

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


class _Image:
    """Something with .save(fp, format="PNG"), as a PIL image has."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def save(self, fp: Any, /, format: str) -> None:
        assert format == "PNG"
        fp.write(self.data)


async def _live(client: LemonSliceClient) -> tuple[str, str]:
    answer = await client.create_session(agent_id="a")
    return answer["session_id"], answer["control_url"]


# --- client ----------------------------------------------------------------------------------


async def test_each_control_event_is_sent_as_documented(
    client: LemonSliceClient, fake: FakeLemonSlice
):
    sid, url = await _live(client)
    await client.update_agent_prompt(sid, url, "be brief")
    await client.update_idle_prompt(sid, url, "nod")
    await client.update_image(sid, url, image_url="https://x/b.png")
    await client.update_image(sid, url, image=PNG)
    await client.update_image(sid, None, image=_Image(PNG))  # None: the documented control URL
    await client.trigger_action(sid, url, "wave")
    await client.reset_idle_timeout(sid, url)
    sent = [r.json for r in fake.requests if r.endpoint == "control"]
    b64 = base64.b64encode(PNG).decode()
    assert sent == [
        {"event": "update-agent-prompt", "agent_prompt": "be brief"},
        {"event": "update-idle-prompt", "idle_prompt": "nod"},
        {"event": "update-image", "image_url": "https://x/b.png"},
        {"event": "update-image", "image_base64": b64},
        {"event": "update-image", "image_base64": b64},
        {"event": "action", "action": "wave"},
        {"event": "reset-idle-timeout"},
    ]
    assert all(r.path.endswith(f"/{sid}/control") for r in fake.requests if r.endpoint == "control")
    assert all(r.headers["Content-Type"] == "application/json" for r in fake.requests[1:])
    assert [c["event"] for c in fake.control_events(sid)] == [
        "update-agent-prompt",
        "update-idle-prompt",
        "update-image",
        "update-image",
        "update-image",
        "action",
        "reset-idle-timeout",
    ]
    assert fake.sessions[sid].payload["agent_prompt"] == "be brief"
    assert fake.terminate_requests == {}  # control events are not terminates


def test_the_trigger_shape_lives_in_one_place():
    assert trigger_event("wave") == {"event": TRIGGER_EVENT, TRIGGER_EVENT: "wave"}
    with pytest.raises(ValueError, match="non-empty"):
        trigger_event(" ")


async def test_an_image_over_900_kb_is_refused_before_sending(
    client: LemonSliceClient, fake: FakeLemonSlice
):
    sid, url = await _live(client)
    big = PNG + b"\x00" * (MAX_IMAGE_BYTES - len(PNG) + 1)
    with pytest.raises(ValueError, match="at most 900,000"):
        await client.update_image(sid, url, image=big)
    with pytest.raises(ValueError, match="exactly one"):
        await client.update_image(sid, url)
    with pytest.raises(ValueError, match="not a PNG"):
        await client.update_image(sid, url, image=b"GIF89a")
    assert [r.endpoint for r in fake.requests] == ["create"]
    await client.update_image(sid, url, image=big[:MAX_IMAGE_BYTES])  # exactly the limit is fine


async def test_the_fake_answers_413_to_a_large_image(
    client: LemonSliceClient, fake: FakeLemonSlice
):
    sid, url = await _live(client)
    big = base64.b64encode(PNG + b"\x00" * MAX_IMAGE_BYTES).decode()
    with pytest.raises(ClientRequestError) as info:
        await client.send_control_event(sid, url, {"event": "update-image", "image_base64": big})
    assert info.value.status == 413


@pytest.mark.parametrize(
    "body",
    [
        {"event": "update-agent-prompt"},
        {"event": "update-idle-prompt", "idle_prompt": 3},
        {"event": "update-image", "image_url": "u", "image_base64": "AA=="},
        {"event": "update-image", "image_base64": "!!"},
        {"event": "action"},
        {"event": "dance"},
    ],
)
async def test_the_fake_validates_control_events(
    client: LemonSliceClient, fake: FakeLemonSlice, body: dict[str, Any]
):
    sid, url = await _live(client)
    with pytest.raises(ClientRequestError) as info:
        await client.send_control_event(sid, url, body)
    assert info.value.status == 400
    assert fake.control_events(sid) == []


async def test_the_fake_takes_both_documented_trigger_shapes(
    client: LemonSliceClient, fake: FakeLemonSlice
):
    sid, url = await _live(client)
    await client.send_control_event(
        sid, url, {"event": "pose-trigger", "pose_trigger": {"name": "bow"}}
    )
    await client.trigger_action(sid, url, "wave")
    assert [(c["action"], c["shape"]) for c in fake.control_events(sid)] == [
        ("bow", "pose-trigger"),
        ("wave", "action"),
    ]


async def test_control_retries_like_a_read_and_404_is_gone(
    client: LemonSliceClient, fake: FakeLemonSlice
):
    sid, url = await _live(client)
    fake.inject("control", Fault.status(503), times=2)
    await client.reset_idle_timeout(sid, url)
    assert len([r for r in fake.requests if r.endpoint == "control"]) == 3
    fake.inject("control", Fault.lost_answer())  # idempotent: sent again
    await client.update_agent_prompt(sid, url, "x")
    await client.end_session(sid, url)
    with pytest.raises(NotFoundError):
        await client.reset_idle_timeout(sid, url)
    fake.inject("control", Fault.status(400))
    with pytest.raises(ClientRequestError):
        await client.trigger_action(sid, url, "wave")


async def test_reset_idle_timeout_restarts_the_fakes_idle_clock(
    clock: FakeClock, lemon: FakeLemonSlice
):
    async with LemonSliceClient(lemon.api_key, api_url=lemon.url) as client:
        answer = await client.create_session(agent_id="a", idle_timeout=10)
        sid = answer["session_id"]
        clock.advance(8)
        await client.reset_idle_timeout(sid, answer["control_url"])
        clock.advance(8)
        assert lemon.expire_idle() == []
        clock.advance(2)
        assert lemon.expire_idle() == [sid]


async def test_402_is_its_own_error_and_never_retried(
    client: LemonSliceClient, fake: FakeLemonSlice
):
    fake.no_credits = True
    with pytest.raises(NoCreditsError, match="not enough credits") as info:
        await client.create_session(agent_id="a")
    assert info.value.status == 402
    assert "credits" in (info.value.body or "")
    assert len(fake.requests) == 1
    assert fake.creates == 0


async def test_wait_until_active_polls_with_backoff(clock: FakeClock, lemon: FakeLemonSlice):
    async with LemonSliceClient(lemon.api_key, api_url=lemon.url, clock=clock) as client:
        sid, _ = await _live(client)
        lemon.set_status(sid, "QUEUED")
        seen: list[str] = []

        async def on_status(answer: dict[str, Any]) -> None:
            seen.append(answer["session_status"])

        task = asyncio.create_task(client.wait_until_active(sid, timeout=60, on_status=on_status))
        for _ in range(4):  # polls at 0, 0.5, 1.5, 3.5 s
            await wait_for(lambda: clock.sleepers > 0)
            clock.advance(2.0)
        await wait_for(lambda: clock.sleepers > 0)
        lemon.set_status(sid, "ACTIVE")
        clock.advance(10)
        answer = await task
        assert answer["session_status"] == "ACTIVE"
        assert seen[:3] == ["QUEUED", "QUEUED", "QUEUED"]
        assert seen[-1] == "ACTIVE"
        gets = [r for r in lemon.requests if r.endpoint == "get"]
        assert len(gets) == len(seen)


async def test_wait_until_active_times_out_and_sees_final_statuses(
    clock: FakeClock, lemon: FakeLemonSlice
):
    async with LemonSliceClient(lemon.api_key, api_url=lemon.url, clock=clock) as client:
        sid, _ = await _live(client)
        lemon.set_status(sid, "QUEUED")
        task = asyncio.create_task(client.wait_until_active(sid, timeout=3))
        while not task.done():
            await wait_for(lambda: clock.sleepers > 0 or task.done())
            clock.advance(1)
        with pytest.raises(ActivationTimeout, match="still QUEUED after 3 s") as info:
            await task
        assert info.value.last_status == "QUEUED"
        lemon.set_status(sid, "FAILED")
        with pytest.raises(SessionNotLive, match="FAILED"):
            await client.wait_until_active(sid)
        with pytest.raises(ValueError, match="timeout"):
            await client.wait_until_active(sid, timeout=0)


# --- manager ---------------------------------------------------------------------------------


async def test_manager_controls_by_id_or_session_id_with_an_event_row(
    manager: SessionManager, lemon: FakeLemonSlice
):
    record = await manager.create_session(agent_id="a")
    assert record.session_id is not None
    await manager.update_agent_prompt(record.id, "be brief")
    await manager.update_idle_prompt(record.session_id, "listen")
    await manager.update_image(str(record.id), image=PNG)
    await manager.update_image(record.id, image_url="https://x/c.png")
    await manager.trigger_action(record.id, "wave")
    after = await manager.reset_idle_timeout(record.id)
    assert after.status is SessionStatus.ACTIVE
    events = [e for e in await manager.repository.events(record.id) if e.reason == "control"]
    assert [e.detail for e in events] == [
        "update-agent-prompt (8 chars)",
        "update-idle-prompt (6 chars)",
        f"update-image (PNG, {len(PNG)} bytes)",
        "update-image https://x/c.png",
        "trigger wave",
        "reset-idle-timeout",
    ]
    assert all(e.from_status is e.to_status is SessionStatus.ACTIVE for e in events)
    assert len(lemon.control_events(record.session_id)) == 6


async def test_manager_refuses_control_on_a_session_that_is_not_live(
    manager: SessionManager, lemon: FakeLemonSlice
):
    record = await manager.create_session(agent_id="a")
    await manager.end_session(record.id)
    before = len(lemon.requests)
    with pytest.raises(SessionNotLive, match="is ended"):
        await manager.update_agent_prompt(record.id, "x")
    with pytest.raises(SessionNotLive):
        await manager.reset_idle_timeout(record.session_id or "")
    with pytest.raises(SessionNotLive):
        await manager.wait_until_active(record.id)
    intent = await manager.repository.record_intent(idle_window=60, max_age=None)
    with pytest.raises(SessionNotLive, match="is pending"):
        await manager.trigger_action(intent.id, "wave")
    assert len(lemon.requests) == before


async def test_manager_records_a_control_404_as_gone(
    manager: SessionManager, lemon: FakeLemonSlice
):
    record = await manager.create_session(agent_id="a")
    assert record.session_id is not None
    lemon.set_status(record.session_id, "TIMED_OUT")  # the server ended it by itself
    with pytest.raises(SessionNotLive, match="gone at LemonSlice"):
        await manager.update_agent_prompt(record.id, "x")
    final = await manager.get(record.id)
    assert (final.status, final.end_reason) == (SessionStatus.ENDED, EndReason.GONE)


async def test_manager_control_leaves_bad_input_unsent(
    manager: SessionManager, lemon: FakeLemonSlice
):
    record = await manager.create_session(agent_id="a")
    before = len(lemon.requests)
    with pytest.raises(ValueError, match="agent_prompt must be a string"):
        await manager.update_agent_prompt(record.id, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a PNG"):
        await manager.update_image(record.id, image=b"x" * 10)
    assert len(lemon.requests) == before


async def test_manager_402_fails_the_intent(manager: SessionManager, lemon: FakeLemonSlice):
    lemon.no_credits = True
    with pytest.raises(NoCreditsError):
        await manager.create_session(agent_id="a")
    [row] = (await manager.repository.list()).items
    assert (row.status, row.end_reason) == (SessionStatus.FAILED, EndReason.CREATE_REJECTED)
    assert len(lemon.requests) == 1


async def test_manager_wait_until_active_records_queued_then_active(
    clock: FakeClock, lemon: FakeLemonSlice, db_url: str
):
    metrics = Metrics()
    async with make_manager(lemon, clock, db_url) as mgr:
        metrics.attach(mgr)
        # The wait polls on a clock of its own, so "parked" means the wait and nothing else.
        polls = FakeClock(clock.now())
        mgr.client.clock = polls
        record = await mgr.create_session(agent_id="a")
        assert record.session_id is not None
        lemon.set_status(record.session_id, "QUEUED")

        def polled(times: int) -> bool:  # the wait asked that often and sleeps again
            gets = sum(1 for r in lemon.requests if r.endpoint == "get")
            return gets >= times and polls.sleepers == 1

        def advance(seconds: float) -> None:
            clock.advance(seconds)
            polls.advance(seconds)

        task = asyncio.create_task(mgr.wait_until_active(record.session_id, timeout=120))
        await wait_for(lambda: polled(1))
        assert (await mgr.get(record.id)).remote_status == "QUEUED"
        advance(20)  # polled again: still QUEUED
        await wait_for(lambda: polled(2))
        lemon.set_status(record.session_id, "ACTIVE")
        advance(20)  # seen ACTIVE 40 s after the intent
        active = await task
        assert (active.status, active.remote_status) == (SessionStatus.ACTIVE, "ACTIVE")
        text = metrics.render().decode()
        assert "sessionmgr_session_time_to_active_seconds_count 1.0" in text
        assert 'sessionmgr_session_time_to_active_seconds_bucket{le="60.0"} 1.0' in text
        assert 'sessionmgr_session_time_to_active_seconds_bucket{le="30.0"} 0.0' in text


async def test_manager_wait_until_active_ends_a_row_the_server_finished(
    clock: FakeClock, lemon: FakeLemonSlice, db_url: str
):
    async with make_manager(lemon, clock, db_url) as mgr:
        mgr.client.clock = clock
        record = await mgr.create_session(agent_id="a")
        assert record.session_id is not None
        lemon.set_status(record.session_id, "FAILED")
        with pytest.raises(SessionNotLive, match="FAILED"):
            await mgr.wait_until_active(record.id)
        final = await mgr.get(record.id)
        assert (final.status, final.end_reason) == (SessionStatus.ENDED, EndReason.REMOTE_FAILED)
        assert final.remote_status == "FAILED"


async def test_manager_wait_until_active_records_a_404_as_gone(
    clock: FakeClock, lemon: FakeLemonSlice, db_url: str
):
    """The server forgot a QUEUED session (a 404 while it was waited on): the row ends as gone,
    not left active for the reaper to find a window later."""
    async with make_manager(lemon, clock, db_url) as mgr:
        mgr.client.clock = clock
        record = await mgr.create_session(agent_id="a")
        assert record.session_id is not None
        lemon.set_status(record.session_id, "QUEUED")
        lemon.inject("get", Fault.status(404))
        with pytest.raises(SessionNotLive, match="gone at LemonSlice"):
            await mgr.wait_until_active(record.id)
        final = await mgr.get(record.id)
        assert (final.status, final.end_reason) == (SessionStatus.ENDED, EndReason.GONE)


async def test_manager_wait_until_active_timeout_leaves_it_active(
    clock: FakeClock, lemon: FakeLemonSlice, db_url: str
):
    async with make_manager(lemon, clock, db_url) as mgr:
        mgr.client.clock = clock
        record = await mgr.create_session(agent_id="a")
        assert record.session_id is not None
        lemon.set_status(record.session_id, "QUEUED")
        task = asyncio.create_task(mgr.wait_until_active(record.id, timeout=2))
        while not task.done():
            await wait_for(lambda: clock.sleepers > 0 or task.done())
            clock.advance(1)
        with pytest.raises(ActivationTimeout):
            await task
        row = await mgr.get(record.id)
        assert (row.status, row.remote_status) == (SessionStatus.ACTIVE, "QUEUED")


# --- keep-alive ------------------------------------------------------------------------------


async def test_keepalive_resets_touched_sessions_at_most_once_per_interval(
    clock: FakeClock, lemon: FakeLemonSlice, db_url: str
):
    outcomes: list[tuple[str, bool]] = []
    async with make_manager(
        lemon,
        clock,
        db_url,
        server_keepalive=30,
        on_keepalive=lambda s, ok: outcomes.append((s, ok)),
    ) as mgr:
        metrics = Metrics()
        metrics.attach(mgr)
        a = await mgr.create_session(agent_id="a")
        b = await mgr.create_session(agent_id="b")
        assert a.session_id is not None
        assert b.session_id is not None
        for _ in range(100):
            mgr.touch(a.session_id)  # many touches, one reset
        assert await mgr.send_keepalives() == 1
        mgr.touch(a.session_id)
        clock.advance(10)
        assert await mgr.send_keepalives() == 0  # inside the interval: waits
        mgr.touch(b.session_id)
        assert await mgr.send_keepalives() == 1  # b had none yet
        clock.advance(21)
        assert await mgr.send_keepalives() == 1  # a's touch of 10 s ago goes out now
        assert await mgr.send_keepalives() == 0  # nothing touched since
        resets = [c for c in lemon.control_events() if c["event"] == "reset-idle-timeout"]
        assert len(resets) == 3
        assert outcomes == [(a.session_id, True), (b.session_id, True), (a.session_id, True)]
        assert (mgr.keepalive_sent, mgr.keepalive_failures) == (3, 0)
        assert 'sessionmgr_keepalives_total{outcome="ok"} 3.0' in metrics.render().decode()
        # a keep-alive writes no event rows: it is not a user's control
        assert not [e for e in await mgr.repository.events(a.id) if e.reason == "control"]


async def test_keepalive_failures_are_counted_never_raised(
    clock: FakeClock, lemon: FakeLemonSlice, db_url: str
):
    async with make_manager(lemon, clock, db_url, server_keepalive=5) as mgr:
        a = await mgr.create_session(agent_id="a")
        b = await mgr.create_session(agent_id="b")
        assert a.session_id is not None
        assert b.session_id is not None
        lemon.inject("control", Fault.status(400))
        mgr.touch(a.session_id)
        assert await mgr.send_keepalives() == 0
        assert mgr.keepalive_failures == 1
        await mgr.end_session(b.id)
        mgr.repository.touch(b.session_id)  # an ended session's touch sends nothing
        mgr._keepalive_due[b.session_id] = None
        mgr.touch(a.session_id)
        assert await mgr.send_keepalives() == 1
        assert mgr.keepalive_failures == 1


async def test_keepalive_runs_in_the_background_and_bounds_concurrency(
    clock: FakeClock, lemon: FakeLemonSlice, db_url: str
):
    lemon.set_latency("control", 0.02)
    async with make_manager(
        lemon, clock, db_url, server_keepalive=30, touch_flush_interval=1.0
    ) as mgr:
        records = [await mgr.create_session(agent_id=f"a{i}") for i in range(25)]
        for r in records:
            assert r.session_id is not None
            mgr.touch(r.session_id)
        await wait_for(lambda: clock.sleepers >= 2)  # the flush and keep-alive loops
        clock.advance(1.0)
        await wait_for(lambda: mgr.keepalive_sent == 25)
        assert 1 < lemon.max_in_flight("control") <= 10


async def test_without_keepalive_touches_send_nothing(
    manager: SessionManager, lemon: FakeLemonSlice
):
    record = await manager.create_session(agent_id="a")
    assert record.session_id is not None
    manager.touch(record.session_id)
    assert await manager.send_keepalives() == 0
    assert lemon.control_events() == []


def test_keepalive_must_be_positive():
    from sessionmgr.errors import ConfigurationError

    for bad in (0, -1, float("nan"), True):
        with pytest.raises(ConfigurationError, match="server_keepalive"):
            SessionManager(server_keepalive=bad)


async def test_serve_gives_its_manager_the_server_keepalive(
    lemon: FakeLemonSlice, db_url: str
) -> None:
    """``sessionmgr serve --server-keepalive`` reaches the manager whose keep-alive loop sends
    the resets (tested above): the serving process keeps proxied sessions alive too."""
    settings = Settings(api_key=FAKE_API_KEY, api_url=lemon.url, database_url=db_url, http_port=0)
    seen: list[float | None] = []

    def ready(mgr: SessionManager) -> None:
        seen.append(mgr.server_keepalive)
        os.kill(os.getpid(), signal.SIGTERM)  # serve's own handler: a clean stop

    await asyncio.wait_for(
        server.serve(settings, reconcile_interval=None, server_keepalive=20, ready=ready), 60
    )
    assert seen == [20]
