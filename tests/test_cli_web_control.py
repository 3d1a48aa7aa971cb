"""The new create arguments, control events, 402 and QUEUED through the CLI and the HTTP API."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from sessionmgr import client as client_module
from sessionmgr.client import MAX_IMAGE_BYTES
from sessionmgr.manager import SessionManager
from sessionmgr.states import EndReason, SessionStatus
from sessionmgr.testing import FakeLemonSlice, Fault

from .test_cli import PNG, Cli, FakeThread, ok
from .test_cli import db_path as db_path
from .test_cli import db_url as db_url
from .test_cli import fake as fake
from .test_cli import fast_retries as fast_retries
from .test_cli import sm as sm
from .test_web import AUTH, create, expect_error
from .test_web import api as api

LIVEKIT_TOKEN = "lk-token-cli-9d8e7f"
QUEUED = Fault.status(200, body='{"session_status": "QUEUED"}')  # what a cold start answers


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """wait_until_active polls in milliseconds here (its backoff is tested on a FakeClock)."""
    monkeypatch.setattr(client_module, "WAIT_POLL_FIRST", 0.001)
    monkeypatch.setattr(client_module, "WAIT_POLL_CAP", 0.002)


def _last_payload(fake: FakeThread) -> Any:
    return fake.on_loop(lambda f: [r for r in f.requests if r.endpoint == "create"][-1].payload)


# --- CLI -------------------------------------------------------------------------------------


def test_cli_create_with_pipecat_14_arguments(sm: Cli, fake: FakeThread):
    record = sm.json("create", "--agent-id", "a", "--audio-sample-rate", "24000", "--model", "m3")
    assert (record["model"], record["transport_type"]) == ("m3", "daily")
    payload = _last_payload(fake)
    assert payload == {
        "transport_type": "daily",
        "agent_id": "a",
        "audio_sample_rate": 24000,
        "model": "m3",
    }


def test_cli_create_livekit_keeps_the_token_out(sm: Cli, fake: FakeThread, tmp_path: Path):
    image = tmp_path / "a.png"
    image.write_bytes(PNG)
    result = ok(
        sm(
            "create",
            "--agent-image",
            str(image),
            "--livekit-url",
            "wss://x.livekit.cloud",
            "--livekit-token",
            LIVEKIT_TOKEN,
            "--livekit-session-id",
            "RM_1",
            "--agent-idle-prompt",
            "listen",
            "--aspect-ratio",
            "9x16",
            "--simulcast",
            "--json",
        )
    )
    record = json.loads(result.stdout)
    assert record["transport_type"] == "livekit"
    assert record["room_url"] is None
    assert record["control_url"].endswith(f"/{record['session_id']}/control")
    assert LIVEKIT_TOKEN not in result.output
    payload = _last_payload(fake)
    assert list(payload)[:2] == ["transport_type", "properties"]
    assert payload["properties"]["livekit_token"] == LIVEKIT_TOKEN
    assert payload["simulcast"] is True
    assert payload["aspect_ratio"] == "9x16"
    assert "enable_recording" not in payload  # a flag not given is not sent
    shown = ok(sm("show", record["session_id"], "--json")).stdout
    assert LIVEKIT_TOKEN not in shown


def test_cli_create_refuses_bad_arguments_in_one_line(sm: Cli):
    result = sm("create", "--agent-id", "a", "--audio-sample-rate", "8000")
    assert result.exit_code == 2
    assert "8000" in result.output
    result = sm("create", "--agent-id", "a", "--livekit-url", "wss://x")
    assert result.exit_code == 2
    assert "needs livekit_token" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_402_is_one_line_exit_1(sm: Cli, fake: FakeThread):
    fake.on_loop(lambda f: setattr(f, "no_credits", True))
    try:
        result = sm("create", "--agent-id", "a")
    finally:
        fake.on_loop(lambda f: setattr(f, "no_credits", False))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [
        "error: LemonSlice refused: no subscription or not enough credits (top up the account) "
        "[HTTP 402]"
    ]
    [row] = sm.json("list", "--status", "failed")
    assert row["end_reason"] == "create_rejected"


def test_cli_create_wait_active_through_queued(sm: Cli, fake: FakeThread):
    fake.inject("get", QUEUED, times=2)
    record = sm.json("create", "--agent-id", "a", "--wait-active", "1m")
    assert record["remote_status"] == "ACTIVE"
    gets = fake.on_loop(lambda f: [r for r in f.requests if r.endpoint == "get"])
    assert len(gets) >= 3
    events = ok(sm("show", str(record["id"]))).stdout
    assert "active" in events


def test_cli_create_wait_active_timeout(sm: Cli, fake: FakeThread):
    fake.inject("get", QUEUED, times=10_000)
    try:
        result = sm("create", "--agent-id", "a", "--wait-active", "0.05")
    finally:
        fake.on_loop(lambda f: f.faults.clear())
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert "still QUEUED after 0.05 s" in line
    assert "stays recorded and guarded" in line
    [row] = sm.json("list", "--status", "active")
    assert row["remote_status"] == "QUEUED"


def test_cli_control_each_event(sm: Cli, fake: FakeThread, tmp_path: Path):
    record = sm.json("create", "--agent-id", "a")
    sid = record["session_id"]
    image = tmp_path / "b.png"
    image.write_bytes(PNG)
    for args, sent in [
        (("--agent-prompt", "be brief"), "agent-prompt"),
        (("--idle-prompt", "nod"), "idle-prompt"),
        (("--image-url", "https://x/c.png"), "image-url"),
        (("--image", str(image)), "image"),
        (("--action", "wave"), "action"),
        (("--reset-idle-timeout",), "reset-idle-timeout"),
    ]:
        result = ok(sm("control", str(record["id"]), *args))
        assert result.stdout == f"#{record['id']} {sid}: {sent} sent\n"
    events = fake.on_loop(lambda f: f.control_events(sid))
    assert [e["event"] for e in events] == [
        "update-agent-prompt",
        "update-idle-prompt",
        "update-image",
        "update-image",
        "action",
        "reset-idle-timeout",
    ]
    shown = ok(sm("show", sid)).stdout
    assert shown.count(" active   control  ") == 6
    out = sm.json("control", sid, "--action", "bow")
    assert out["sent"] == "action"
    assert out["session"]["session_id"] == sid


def test_cli_control_errors(sm: Cli, tmp_path: Path):
    record = sm.json("create", "--agent-id", "a")
    key = str(record["id"])
    both = sm("control", key, "--agent-prompt", "x", "--action", "y")
    assert both.exit_code == 2
    assert "exactly one of" in both.output
    assert sm("control", key).exit_code == 2
    big = tmp_path / "big.png"
    big.write_bytes(PNG + b"\x00" * MAX_IMAGE_BYTES)
    too_big = sm("control", key, "--image", str(big))
    assert too_big.exit_code == 2
    assert "at most 900,000" in too_big.output
    unknown = sm("control", "sess_nope", "--reset-idle-timeout")
    assert unknown.exit_code == 3
    ok(sm("end", key))
    ended = sm("control", key, "--agent-prompt", "x")
    assert ended.exit_code == 1
    assert ended.output.strip().splitlines() == [
        f"error: session {key} is ended: control events go to active sessions only"
    ]


def test_cli_control_on_a_session_gone_at_lemonslice(sm: Cli, fake: FakeThread):
    record = sm.json("create", "--agent-id", "a")
    fake.on_loop(lambda f: f.set_status(record["session_id"], "TIMED_OUT"))
    result = sm("control", str(record["id"]), "--reset-idle-timeout")
    assert result.exit_code == 1
    assert "gone at LemonSlice" in result.output
    [row] = sm.json("list", "--status", "ended")
    assert row["end_reason"] == "gone"


# --- HTTP ------------------------------------------------------------------------------------


async def test_http_create_takes_the_new_fields(api: Any, lemon: FakeLemonSlice):
    body = await create(
        api,
        audio_sample_rate=16000,
        model="m",
        transport_type="livekit",
        livekit_url="wss://x",
        livekit_token=LIVEKIT_TOKEN,
        livekit_session_id="RM_2",
        agent_idle_prompt="idle",
        response_done_timeout=1.5,
        enable_recording=True,
        recordings_bucket="b",
    )
    assert (body["transport_type"], body["model"], body["room_url"]) == ("livekit", "m", None)
    assert LIVEKIT_TOKEN not in json.dumps(body)
    payload = lemon.requests[-1].json
    assert payload["properties"] == {
        "livekit_url": "wss://x",
        "livekit_token": LIVEKIT_TOKEN,
        "livekit_session_id": "RM_2",
    }
    assert payload["enable_recording"] is True
    resp = await api.get(f"/api/sessions/{body['id']}")
    assert LIVEKIT_TOKEN not in await resp.text()


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("audio_sample_rate", 1, "audio_sample_rate must be one of"),
        ("audio_sample_rate", "24000", "must be a whole number"),
        ("simulcast", "yes", "must be true or false"),
        ("transport_type", "zoom", "transport_type must be one of"),
        ("wait_active", True, "wait_active must be a number"),
    ],
)
async def test_http_create_refuses_bad_new_fields(
    api: Any, lemon: FakeLemonSlice, field: str, value: Any, needle: str
):
    resp = await api.post("/api/sessions", json={"agent_id": "a", field: value}, headers=AUTH)
    await expect_error(resp, 400, "bad_request", needle)
    assert lemon.requests == []


async def test_http_402_is_lemonslice_no_credits(api: Any, lemon: FakeLemonSlice):
    lemon.no_credits = True
    resp = await api.post("/api/sessions", json={"agent_id": "a"}, headers=AUTH)
    await expect_error(resp, 502, "lemonslice_no_credits", "not enough credits", "402")


async def test_http_create_wait_active(api: Any, lemon: FakeLemonSlice):
    lemon.inject("get", QUEUED, times=2)
    body = await create(api, wait_active=60)
    assert body["remote_status"] == "ACTIVE"
    lemon.inject("get", QUEUED, times=10_000)
    resp = await api.post(
        "/api/sessions", json={"agent_id": "a", "wait_active": 0.05}, headers=AUTH
    )
    await expect_error(resp, 504, "activation_timeout", "still QUEUED")
    lemon.faults.clear()
    live = await (await api.get("/api/sessions?status=active")).json()
    assert len(live["items"]) == 2  # the queued one stays recorded and guarded


async def test_http_control(api: Any, lemon: FakeLemonSlice, manager: SessionManager):
    body = await create(api)
    url = f"/api/sessions/{body['session_id']}/control"
    b64 = base64.b64encode(PNG).decode()
    for payload in (
        {"agent_prompt": "p"},
        {"idle_prompt": "i"},
        {"image_url": "https://x/d.png"},
        {"image_base64": b64},
        {"action": "wave"},
        {"reset_idle_timeout": True},
    ):
        resp = await api.post(url, json=payload, headers=AUTH)
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
        assert answer["sent"] == next(iter(payload))
        assert answer["record"]["status"] == "active"
    events = lemon.control_events(body["session_id"])
    assert [e["event"] for e in events] == [
        "update-agent-prompt",
        "update-idle-prompt",
        "update-image",
        "update-image",
        "action",
        "reset-idle-timeout",
    ]
    assert events[3]["image_bytes"] == len(PNG)
    rows = [e for e in await manager.repository.events(body["id"]) if e.reason == "control"]
    assert len(rows) == 6


async def test_http_control_errors(api: Any, lemon: FakeLemonSlice):
    body = await create(api)
    url = f"/api/sessions/{body['id']}/control"
    resp = await api.post(url, json={"action": "wave"})
    await expect_error(resp, 401, "unauthorized")
    for bad, needle in [
        ({}, "exactly one of"),
        ({"action": "a", "agent_prompt": "b"}, "exactly one of"),
        ({"reset_idle_timeout": False}, "exactly one of"),
        ({"pose": "x"}, "unknown field"),
        ({"image_base64": "!!"}, "not base64"),
        ({"image_base64": base64.b64encode(PNG + b"\x00" * MAX_IMAGE_BYTES).decode()}, "900,000"),
        ({"action": " "}, "non-empty"),
    ]:
        resp = await api.post(url, json=bad, headers=AUTH)
        await expect_error(resp, 400, "bad_request", needle)
    assert lemon.control_events() == []
    resp = await api.post("/api/sessions/sess_nope/control", json={"action": "a"}, headers=AUTH)
    await expect_error(resp, 404, "not_found")
    lemon.inject("control", Fault.status(500), times=100)
    resp = await api.post(url, json={"action": "a"}, headers=AUTH)
    await expect_error(resp, 502, "lemonslice_error")
    lemon.faults.clear()
    lemon.set_status(body["session_id"], "COMPLETED")
    resp = await api.post(url, json={"action": "a"}, headers=AUTH)
    await expect_error(resp, 409, "conflict", "gone at LemonSlice")
    shown = await (await api.get(url.removesuffix("/control"))).json()
    assert (shown["status"], shown["end_reason"]) == (
        SessionStatus.ENDED.value,
        EndReason.GONE.value,
    )
    resp = await api.post(url, json={"action": "a"}, headers=AUTH)
    await expect_error(resp, 409, "conflict", "control events go to active sessions only")


def test_the_openapi_document_names_every_body_field():
    from sessionmgr import __version__, openapi, web

    schemas = openapi.document(__version__)["components"]["schemas"]
    assert set(schemas["CreateRequest"]["properties"]) == set(web.CREATE_FIELDS)
    assert set(schemas["ControlRequest"]["properties"]) == set(web.CONTROL_FIELDS)
    assert set(openapi.CONTROL_NAMES) == set(web.CONTROL_FIELDS)
    paths = openapi.document(__version__)["paths"]
    assert paths["/api/sessions/{id}/control"]["post"]["security"] == openapi.BEARER
