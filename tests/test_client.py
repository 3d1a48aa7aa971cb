"""LemonSliceClient and RetryPolicy: wire format, error mapping, retries, against the fake."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import struct
import zlib
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest

from sessionmgr.client import (
    TERMINATE_BODY,
    LemonSliceClient,
    Timeouts,
    build_create_request,
    parse_retry_after,
)
from sessionmgr.errors import (
    AuthError,
    ClientRequestError,
    ConfigurationError,
    CreateOutcomeUnknown,
    InvalidResponseError,
    LemonSliceError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    TransportError,
)
from sessionmgr.retry import RetryPolicy
from sessionmgr.testing import REDACTED, FakeLemonSlice, Fault

from .helpers import FAKE_API_KEY, TEST_RETRY

AGENT_ID = "agent_abc123"
IMAGE_URL = "https://cdn.example.com/avatar.png"
ROOM = "https://x.daily.co/room"
DAILY_TOKEN = "daily-tok-7c1f9e"


def tiny_png() -> bytes:
    """A real 1x1 PNG, built by hand so the tests need no Pillow."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


PNG = tiny_png()


class PilLikeImage:
    """Quacks like a PIL image: ``save(fp, format="PNG")``."""

    def __init__(self) -> None:
        self.formats: list[str] = []

    def save(self, fp: Any, format: str) -> None:
        self.formats.append(format)
        fp.write(PNG)


class VirtualClock:
    """Wall-clock ``now``; a monotonic clock that only ``sleep`` moves: retries without waiting."""

    def __init__(self) -> None:
        self.mono = 0.0
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.mono += seconds
        await asyncio.sleep(0)


def make_client(fake: FakeLemonSlice, **kw: Any) -> LemonSliceClient:
    kw.setdefault("retry", TEST_RETRY)
    kw.setdefault("timeouts", Timeouts(connect=1.0, total=1.0))
    return LemonSliceClient(kw.pop("api_key", FAKE_API_KEY), api_url=fake.url, **kw)


def calls(fake: FakeLemonSlice, endpoint: str) -> int:
    return sum(1 for r in fake.requests if r.endpoint == endpoint)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the wire format: golden payloads ----------------------------------------------------------

# (arguments, the JSON text pipecat's LemonSliceApi sends for them), written out literally.
GOLDEN: list[tuple[dict[str, Any], str]] = [
    ({"agent_id": AGENT_ID}, '{"transport_type": "daily", "agent_id": "agent_abc123"}'),
    (
        {"agent_image_url": IMAGE_URL},
        '{"transport_type": "daily", "agent_image_url": "https://cdn.example.com/avatar.png"}',
    ),
    (
        {"agent_id": AGENT_ID, "agent_prompt": "Be upbeat and concise.", "idle_timeout": 60},
        '{"transport_type": "daily", "agent_id": "agent_abc123", '
        '"agent_prompt": "Be upbeat and concise.", "idle_timeout": 60}',
    ),
    (
        {"agent_id": AGENT_ID, "idle_timeout": -1},
        '{"transport_type": "daily", "agent_id": "agent_abc123", "idle_timeout": -1}',
    ),
    (
        {"agent_id": AGENT_ID, "idle_timeout": 0, "agent_prompt": ""},
        '{"transport_type": "daily", "agent_id": "agent_abc123", "agent_prompt": "", '
        '"idle_timeout": 0}',
    ),
    (
        {"agent_id": AGENT_ID, "daily_room_url": ROOM},
        '{"transport_type": "daily", "agent_id": "agent_abc123", '
        '"properties": {"daily_url": "https://x.daily.co/room"}}',
    ),
    (
        {"agent_id": AGENT_ID, "daily_token": DAILY_TOKEN},
        '{"transport_type": "daily", "agent_id": "agent_abc123", '
        '"properties": {"daily_token": "daily-tok-7c1f9e"}}',
    ),
    (
        {"agent_id": AGENT_ID, "daily_room_url": ROOM, "daily_token": DAILY_TOKEN},
        '{"transport_type": "daily", "agent_id": "agent_abc123", "properties": '
        '{"daily_url": "https://x.daily.co/room", "daily_token": "daily-tok-7c1f9e"}}',
    ),
    (
        {"agent_id": AGENT_ID, "connection_properties": {"lang": "en"}},
        '{"transport_type": "daily", "agent_id": "agent_abc123", "properties": {"lang": "en"}}',
    ),
    (
        {"agent_id": AGENT_ID, "connection_properties": {}},
        '{"transport_type": "daily", "agent_id": "agent_abc123"}',
    ),
    (  # daily_url/daily_token overwrite same-named connection properties, in place
        {
            "agent_id": AGENT_ID,
            "connection_properties": {"daily_url": "old", "lang": "en"},
            "daily_room_url": ROOM,
            "daily_token": DAILY_TOKEN,
        },
        '{"transport_type": "daily", "agent_id": "agent_abc123", "properties": '
        '{"daily_url": "https://x.daily.co/room", "lang": "en", '
        '"daily_token": "daily-tok-7c1f9e"}}',
    ),
    (
        {"agent_id": AGENT_ID, "extra_properties": {}},
        '{"transport_type": "daily", "agent_id": "agent_abc123"}',
    ),
    (  # extra_properties are merged last: they add keys and may override any
        {
            "agent_image_url": IMAGE_URL,
            "daily_room_url": ROOM,
            "extra_properties": {
                "agent_idle_prompt": "Say hi.",
                "simulcast": True,
                "transport_type": "livekit",
                "properties": {"livekit_url": "wss://lk"},
            },
        },
        '{"transport_type": "livekit", "agent_image_url": "https://cdn.example.com/avatar.png", '
        '"properties": {"livekit_url": "wss://lk"}, "agent_idle_prompt": "Say hi.", '
        '"simulcast": true}',
    ),
    (
        {
            "agent_id": AGENT_ID,
            "agent_prompt": "Calm.",
            "idle_timeout": 30,
            "daily_room_url": ROOM,
            "daily_token": DAILY_TOKEN,
            "connection_properties": {"lang": "en"},
            "extra_properties": {"response_done_timeout": 2.5},
        },
        '{"transport_type": "daily", "agent_id": "agent_abc123", "agent_prompt": "Calm.", '
        '"idle_timeout": 30, "properties": {"lang": "en", "daily_url": "https://x.daily.co/room", '
        '"daily_token": "daily-tok-7c1f9e"}, "response_done_timeout": 2.5}',
    ),
]


@pytest.mark.parametrize(("kwargs", "wire"), GOLDEN)
def test_create_payload_matches_pipecat_golden(kwargs: dict[str, Any], wire: str) -> None:
    payload, image = build_create_request(**kwargs)
    assert json.dumps(payload) == wire  # key order included: it is what goes on the wire
    assert image is None


def seed_payload(
    *,
    agent_image_url: Any = None,
    agent_id: Any = None,
    agent_image: Any = None,
    agent_prompt: Any = None,
    idle_timeout: Any = None,
    daily_room_url: Any = None,
    daily_token: Any = None,
    connection_properties: Any = None,
    extra_properties: Any = None,
) -> dict[str, Any]:
    """The payload the seed's LemonSliceApi.create_session builds (its steps, in its order)."""
    payload: dict[str, Any] = {"transport_type": "daily"}
    if agent_id is not None:
        payload["agent_id"] = agent_id
    if agent_image_url is not None:
        payload["agent_image_url"] = agent_image_url
    if agent_prompt is not None:
        payload["agent_prompt"] = agent_prompt
    if idle_timeout is not None:
        payload["idle_timeout"] = idle_timeout
    properties = dict(connection_properties) if connection_properties else {}
    if daily_room_url is not None:
        properties["daily_url"] = daily_room_url
    if daily_token is not None:
        properties["daily_token"] = daily_token
    if properties:
        payload["properties"] = properties
    if extra_properties:
        payload.update(extra_properties)
    return payload


def test_every_parameter_combination_matches_the_seed() -> None:
    sources: list[dict[str, Any]] = [
        {"agent_id": AGENT_ID},
        {"agent_image_url": IMAGE_URL},
        {"agent_image": PNG},
    ]
    combos = itertools.product(
        sources,
        [None, "Be upbeat."],  # agent_prompt
        [None, 60, 0, -1],  # idle_timeout
        [None, ROOM],  # daily_room_url
        [None, DAILY_TOKEN],  # daily_token
        [None, {}, {"daily_url": "old", "lang": "en"}],  # connection_properties
        [None, {}, {"simulcast": True, "transport_type": "livekit"}],  # extra_properties
    )
    count = 0
    for source, prompt, idle, room, token, conn, extra in combos:
        kwargs: dict[str, Any] = {
            **source,
            "agent_prompt": prompt,
            "idle_timeout": idle,
            "daily_room_url": room,
            "daily_token": token,
            "connection_properties": conn,
            "extra_properties": extra,
        }
        payload, image = build_create_request(**kwargs)
        assert json.dumps(payload) == json.dumps(seed_payload(**kwargs)), kwargs
        assert image == (PNG if "agent_image" in source else None)
        count += 1
    assert count == 3 * 2 * 4 * 2 * 2 * 3 * 3


def test_agent_image_accepts_png_bytes_and_pil_like_images() -> None:
    assert build_create_request(agent_image=PNG)[1] == PNG
    assert build_create_request(agent_image=bytearray(PNG))[1] == PNG
    pil = PilLikeImage()
    payload, image = build_create_request(agent_image=pil, agent_prompt="Hi")
    assert image == PNG
    assert pil.formats == ["PNG"]
    assert payload == {"transport_type": "daily", "agent_prompt": "Hi"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"agent_id": AGENT_ID, "agent_image_url": IMAGE_URL},
        {"agent_id": AGENT_ID, "agent_image": PNG},
        {"agent_image_url": IMAGE_URL, "agent_image": PNG},
        {"agent_id": AGENT_ID, "agent_image_url": IMAGE_URL, "agent_image": PNG},
    ],
)
async def test_zero_or_several_agent_sources_fail_before_any_io(
    fake: FakeLemonSlice, client: LemonSliceClient, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(
        ValueError, match="exactly one of agent_id, agent_image_url, or agent_image"
    ):
        await client.create_session(**kwargs)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"agent_id": ""}, ValueError, "agent_id must be a non-empty string"),
        ({"agent_image": b"GIF89a..."}, ValueError, "not a PNG"),
        ({"agent_image": 42}, TypeError, "PNG bytes or an image"),
        ({"agent_id": AGENT_ID, "idle_timeout": "60"}, ValueError, "idle_timeout must be whole"),
        ({"agent_id": AGENT_ID, "idle_timeout": 1.5}, ValueError, "idle_timeout must be whole"),
        ({"agent_id": AGENT_ID, "extra_properties": {"x": object()}}, ValueError, "JSON"),
    ],
)
async def test_bad_arguments_fail_before_any_io(
    fake: FakeLemonSlice, client: LemonSliceClient, kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        await client.create_session(**kwargs)
    assert fake.requests == []


# --- the wire format: what reaches the server --------------------------------------------------


async def test_json_create_request_on_the_wire(fake: FakeLemonSlice, client: LemonSliceClient):
    kwargs = GOLDEN[-1][0]
    result = await client.create_session(**kwargs)

    [req] = fake.requests
    assert (req.method, req.path, req.query) == ("POST", "/api/liveai/sessions", {})
    assert req.headers["x-api-key"] == REDACTED  # sent (and accepted), redacted in the record
    assert req.headers["Content-Type"] == "application/json"
    assert req.body == GOLDEN[-1][1].encode()
    assert req.form is None
    assert result == {
        "session_id": result["session_id"],
        "room_url": ROOM,  # the fake joins the room it was given
        "control_url": f"{fake.url}/{result['session_id']}/control",
    }
    assert result["session_id"].startswith("sess_")


async def test_multipart_create_request_on_the_wire(fake: FakeLemonSlice, client: LemonSliceClient):
    result = await client.create_session(
        agent_image=PilLikeImage(), agent_prompt="Smile.", daily_token=DAILY_TOKEN
    )

    [req] = fake.requests
    assert req.method == "POST"
    assert req.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert req.headers["x-api-key"] == REDACTED
    assert req.json is None
    assert req.form is not None
    assert set(req.form) == {"payload", "image"}
    payload_part, image_part = req.form["payload"], req.form["image"]
    assert payload_part.content_type == "application/json"
    assert payload_part.filename is None
    assert payload_part.text == (
        '{"transport_type": "daily", "agent_prompt": "Smile.", '
        '"properties": {"daily_token": "daily-tok-7c1f9e"}}'
    )
    assert (image_part.filename, image_part.content_type, image_part.data) == (
        "image.png",
        "image/png",
        PNG,
    )
    assert fake.sessions[result["session_id"]].status == "ACTIVE"


async def test_end_session_request_on_the_wire(fake: FakeLemonSlice, client: LemonSliceClient):
    created = await client.create_session(agent_id=AGENT_ID)
    sid = created["session_id"]
    assert await client.end_session(sid, created["control_url"]) is True

    req = fake.requests[-1]
    assert (req.method, req.path) == ("POST", f"/api/liveai/sessions/{sid}/control")
    assert req.body == TERMINATE_BODY == b'{"event": "terminate"}'
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["x-api-key"] == REDACTED
    assert fake.terminate_counts == {sid: 1}


async def test_control_url_is_derived_when_not_given(
    fake: FakeLemonSlice, client: LemonSliceClient
):
    created = await client.create_session(agent_id=AGENT_ID)
    sid = created["session_id"]
    assert client.control_url_for(sid) == f"{fake.url}/{sid}/control" == created["control_url"]
    assert await client.end_session(sid) is True
    assert fake.terminate_counts == {sid: 1}


async def test_livekit_answer_without_urls_gets_a_derived_control_url(
    fake: FakeLemonSlice, client: LemonSliceClient
):
    created = await client.create_session(
        agent_id=AGENT_ID,
        transport_type="livekit",
        livekit_url="wss://x.livekit.cloud",
        livekit_token="lk-token",
    )
    sid = created["session_id"]
    assert created == {
        "session_id": sid,
        "room_url": None,
        "control_url": f"{fake.url}/{sid}/control",
    }


async def test_per_call_api_url_overrides_the_default(fake: FakeLemonSlice):
    async with LemonSliceClient(
        FAKE_API_KEY, api_url=f"http://127.0.0.1:{closed_port()}/nowhere", retry=TEST_RETRY
    ) as client:
        created = await client.create_session(agent_id=AGENT_ID, api_url=fake.url)
    assert created["control_url"] == f"{fake.url}/{created['session_id']}/control"
    assert fake.creates == 1


async def test_get_and_list_requests_on_the_wire(fake: FakeLemonSlice, client: LemonSliceClient):
    created = await client.create_session(agent_id=AGENT_ID)
    sid = created["session_id"]
    assert await client.get_session(sid) == {"session_status": "ACTIVE"}
    assert [s["session_id"] async for s in client.list_sessions(limit=10)] == [sid]

    get_req, list_req = fake.requests[-2:]
    assert (get_req.method, get_req.path) == ("GET", f"/api/liveai/sessions/{sid}")
    assert (list_req.method, list_req.path) == ("GET", "/api/liveai/sessions")
    assert list_req.query == {"page": "1", "limit": "10"}
    assert get_req.body == list_req.body == b""


async def test_get_session_reports_cost_when_completed(
    fake: FakeLemonSlice, client: LemonSliceClient
):
    sid = (await client.create_session(agent_id=AGENT_ID))["session_id"]
    fake.set_status(sid, "COMPLETED", cost=10.5)
    assert await client.get_session(sid) == {"session_status": "COMPLETED", "cost": 10.5}


# --- pagination --------------------------------------------------------------------------------


async def test_list_sessions_walks_every_page(fake: FakeLemonSlice, client: LemonSliceClient):
    ids = {(await client.create_session(agent_id=f"a{i}"))["session_id"] for i in range(23)}
    listed = [s async for s in client.list_sessions(limit=5)]
    assert len(listed) == 23
    assert {s["session_id"] for s in listed} == ids
    pages = [r.query["page"] for r in fake.requests if r.endpoint == "list"]
    assert pages == ["1", "2", "3", "4", "5"]
    assert set(listed[0]) == {
        "session_id",
        "created_at",
        "session_status",
        "credits_used",
        "provider",
    }


async def test_list_sessions_yields_each_session_once_while_pages_shift(
    fake: FakeLemonSlice, client: LemonSliceClient
):
    ids = {(await client.create_session(agent_id=f"a{i}"))["session_id"] for i in range(6)}
    seen: list[str] = []
    async for item in client.list_sessions(limit=2):
        seen.append(item["session_id"])
        if len(seen) == 2:  # a new session pushes everything one place down (newest first)
            await client.create_session(agent_id="late")
    assert len(seen) == len(set(seen))
    assert ids <= set(seen)


async def test_list_sessions_of_an_empty_account(fake: FakeLemonSlice, client: LemonSliceClient):
    assert [s async for s in client.list_sessions()] == []
    assert calls(fake, "list") == 1


@pytest.mark.parametrize("limit", [0, -1, True, 2.5])
async def test_list_sessions_rejects_a_bad_limit(client: LemonSliceClient, limit: Any):
    with pytest.raises(ValueError, match="limit must be a positive int"):
        [s async for s in client.list_sessions(limit=limit)]


async def test_list_sessions_retries_a_failed_page(fake: FakeLemonSlice, client: LemonSliceClient):
    for i in range(4):
        await client.create_session(agent_id=f"a{i}")
    fake.inject("list", Fault.status(503))
    assert len([s async for s in client.list_sessions(limit=3)]) == 4
    assert calls(fake, "list") == 3  # page 1 twice, then page 2


# --- error mapping -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error", "status", "attempts"),
    [
        (Fault.status(401), AuthError, 401, 1),
        (Fault.status(403), AuthError, 403, 1),
        (Fault.status(404), NotFoundError, 404, 1),
        (Fault.status(410), NotFoundError, 410, 1),
        (Fault.status(400), ClientRequestError, 400, 1),
        (Fault.status(409), ClientRequestError, 409, 1),
        (Fault.status(422), ClientRequestError, 422, 1),
        (Fault.status(301), ClientRequestError, 301, 1),
        (Fault.status(429, retry_after=0), RateLimitedError, 429, 4),
        (Fault.status(500), ServerError, 500, 4),
        (Fault.status(503), ServerError, 503, 4),
        (Fault.html_502(), ServerError, 502, 4),
        (Fault.non_json(), InvalidResponseError, 200, 1),
        (Fault.missing_fields(), InvalidResponseError, 200, 1),
        # aiohttp itself resends an idempotent GET once on a fresh connection after a drop
        (Fault.drop(), TransportError, None, 8),
    ],
)
async def test_get_session_error_mapping(
    fake: FakeLemonSlice,
    client: LemonSliceClient,
    fault: Fault,
    error: type[LemonSliceError],
    status: int | None,
    attempts: int,
):
    sid = (await client.create_session(agent_id=AGENT_ID))["session_id"]
    fake.inject("get", fault, times=10)
    with pytest.raises(error) as info:
        await client.get_session(sid)
    exc = info.value
    assert type(exc) is error
    assert exc.status == status
    assert (exc.method, exc.url) == ("GET", f"{fake.url}/{sid}")
    assert f"GET {fake.url}/{sid}" in str(exc)
    if status is not None:
        assert exc.body
        assert len(exc.body) <= 200
    assert calls(fake, "get") == attempts
    assert "\n" not in str(exc)


async def test_html_body_is_named_and_excerpted(fake: FakeLemonSlice, client: LemonSliceClient):
    fake.inject("get", Fault.status(200, body="<html><body>maintenance</body></html>"))
    with pytest.raises(InvalidResponseError, match="HTML page instead of JSON") as info:
        await client.get_session("sess_x")
    assert info.value.body == "<html><body>maintenance</body></html>"


async def test_wrong_key_is_an_auth_error_naming_the_variable(fake: FakeLemonSlice):
    async with make_client(fake, api_key="wrong-key") as client:
        with pytest.raises(AuthError, match="LEMONSLICE_API_KEY") as info:
            await client.create_session(agent_id=AGENT_ID)
    assert info.value.status == 401
    assert fake.creates == 0


async def test_unreachable_server_is_a_transport_error() -> None:
    clock = VirtualClock()
    async with LemonSliceClient(
        FAKE_API_KEY, api_url=f"http://127.0.0.1:{closed_port()}/s", retry=TEST_RETRY, clock=clock
    ) as client:
        with pytest.raises(TransportError, match="could not connect") as info:
            await client.get_session("sess_x")
    assert type(info.value) is TransportError
    assert len(clock.sleeps) == TEST_RETRY.attempts - 1


async def test_a_hanging_read_times_out_and_is_retried(fake: FakeLemonSlice):
    sid = next(iter(await _seed_sessions(fake, 1)))
    fake.inject("get", Fault.hang(30))
    async with make_client(fake, timeouts=Timeouts(connect=1.0, total=0.2)) as client:
        assert await client.get_session(sid) == {"session_status": "ACTIVE"}
    assert calls(fake, "get") == 2


async def _seed_sessions(fake: FakeLemonSlice, n: int) -> list[str]:
    async with make_client(fake) as client:
        return [(await client.create_session(agent_id=f"a{i}"))["session_id"] for i in range(n)]


# --- retry semantics: create -------------------------------------------------------------------


async def test_create_timeout_after_the_server_took_it_is_outcome_unknown(fake: FakeLemonSlice):
    fake.inject("create", Fault.hang(30))
    async with make_client(fake, timeouts=Timeouts(connect=1.0, total=0.2)) as client:
        with pytest.raises(CreateOutcomeUnknown, match="a session may exist") as info:
            await client.create_session(agent_id=AGENT_ID)
    assert fake.creates == 1  # exactly one session: never posted twice
    assert len(fake.sessions) == 1
    assert calls(fake, "create") == 1
    assert info.value.status is None
    assert (info.value.method, info.value.url) == ("POST", fake.url)


async def test_create_answer_lost_on_a_dropped_connection(
    fake: FakeLemonSlice, client: LemonSliceClient
):
    fake.inject("create", Fault.lost_answer())
    with pytest.raises(CreateOutcomeUnknown):
        await client.create_session(agent_id=AGENT_ID)
    assert fake.creates == 1
    assert calls(fake, "create") == 1


async def test_create_dropped_before_handling_is_still_unknown_to_the_client(
    fake: FakeLemonSlice, client: LemonSliceClient
):
    fake.inject("create", Fault.drop())
    with pytest.raises(CreateOutcomeUnknown):
        await client.create_session(agent_id=AGENT_ID)
    assert fake.creates == 0
    assert calls(fake, "create") == 1


@pytest.mark.parametrize(
    ("fault", "cause", "created"),
    [
        (Fault.status(500), ServerError, 0),
        (Fault.status(504), ServerError, 0),
        (Fault.html_502(), ServerError, 0),
        (Fault.non_json(), InvalidResponseError, 1),
        (Fault.missing_fields(), InvalidResponseError, 1),
    ],
)
async def test_create_answers_that_may_hide_a_session_are_outcome_unknown(
    fake: FakeLemonSlice,
    client: LemonSliceClient,
    fault: Fault,
    cause: type[LemonSliceError],
    created: int,
):
    fake.inject("create", fault, times=10)
    with pytest.raises(CreateOutcomeUnknown) as info:
        await client.create_session(agent_id=AGENT_ID)
    assert isinstance(info.value.__cause__, cause)
    assert info.value.status == info.value.__cause__.status
    assert calls(fake, "create") == 1  # never retried
    assert fake.creates == created


@pytest.mark.parametrize(
    "fault", [Fault.status(503), Fault.status(429, retry_after=0)], ids=["503", "429"]
)
async def test_create_is_retried_when_the_server_did_not_take_it(
    fake: FakeLemonSlice, client: LemonSliceClient, fault: Fault
):
    fake.inject("create", fault, times=2)
    created = await client.create_session(agent_id=AGENT_ID)
    assert list(fake.sessions) == [created["session_id"]]
    assert calls(fake, "create") == 3


async def test_create_503_until_attempts_run_out_is_a_server_error(
    fake: FakeLemonSlice, client: LemonSliceClient
):
    fake.inject("create", Fault.status(503), times=10)
    with pytest.raises(ServerError) as info:
        await client.create_session(agent_id=AGENT_ID)
    assert type(info.value) is ServerError
    assert calls(fake, "create") == TEST_RETRY.attempts
    assert fake.creates == 0


async def test_create_at_a_wrong_url_says_so(fake: FakeLemonSlice, client: LemonSliceClient):
    with pytest.raises(ClientRequestError, match="no create endpoint at this URL") as info:
        await client.create_session(agent_id=AGENT_ID, api_url=fake.url + "/x/y/z")
    assert info.value.status == 404
    assert info.value.url == fake.url + "/x/y/z"


@pytest.mark.parametrize("code", [400, 401, 422])
async def test_create_rejections_are_not_retried(
    fake: FakeLemonSlice, client: LemonSliceClient, code: int
):
    fake.inject("create", Fault.status(code, body='{"error": "no"}'))
    with pytest.raises((ClientRequestError, AuthError)) as info:
        await client.create_session(agent_id=AGENT_ID)
    assert info.value.status == code
    assert info.value.body == '{"error": "no"}'
    assert calls(fake, "create") == 1


async def test_create_is_retried_when_the_connection_is_refused() -> None:
    clock = VirtualClock()
    async with LemonSliceClient(
        FAKE_API_KEY, api_url=f"http://127.0.0.1:{closed_port()}/s", retry=TEST_RETRY, clock=clock
    ) as client:
        with pytest.raises(TransportError) as info:
            await client.create_session(agent_id=AGENT_ID)
    assert not isinstance(info.value, CreateOutcomeUnknown)  # provably never sent
    assert len(clock.sleeps) == TEST_RETRY.attempts - 1


async def test_create_honours_retry_after(fake: FakeLemonSlice):
    clock = VirtualClock()
    fake.inject("create", Fault.status(429, retry_after=3))
    retry = RetryPolicy(attempts=4, base=0.001, cap=10.0, deadline=30.0)
    async with make_client(fake, retry=retry, clock=clock) as client:
        await client.create_session(agent_id=AGENT_ID)
    assert clock.sleeps == [3.0]
    assert fake.creates == 1


async def test_retry_after_as_an_http_date(fake: FakeLemonSlice):
    clock = VirtualClock()
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=8), usegmt=True)
    fake.inject("get", Fault.status(429, retry_after=when))
    sid = (await _seed_sessions(fake, 1))[0]
    retry = RetryPolicy(attempts=2, base=0.001, cap=60.0, deadline=60.0)
    async with make_client(fake, retry=retry, clock=clock) as client:
        await client.get_session(sid)
    [slept] = clock.sleeps
    assert 5.0 <= slept <= 8.0


async def test_retry_after_past_the_deadline_gives_up_at_once(fake: FakeLemonSlice):
    clock = VirtualClock()
    fake.inject("create", Fault.status(429, retry_after=120))
    retry = RetryPolicy(attempts=4, base=0.001, cap=300.0, deadline=30.0)
    async with make_client(fake, retry=retry, clock=clock) as client:
        with pytest.raises(RateLimitedError, match="retry after 120 s") as info:
            await client.create_session(agent_id=AGENT_ID)
    assert info.value.retry_after == 120.0  # the caller (e.g. the reaper) can reschedule with it
    assert clock.sleeps == []
    assert calls(fake, "create") == 1


async def test_retry_after_is_capped(fake: FakeLemonSlice):
    clock = VirtualClock()
    fake.inject("create", Fault.status(429, retry_after=120))
    retry = RetryPolicy(attempts=4, base=0.001, cap=2.0, deadline=300.0)
    async with make_client(fake, retry=retry, clock=clock) as client:
        await client.create_session(agent_id=AGENT_ID)
    assert clock.sleeps == [2.0]


# --- retry semantics: terminate and reads ------------------------------------------------------


async def test_terminate_503_503_200_ends_the_session_once(
    fake: FakeLemonSlice, client: LemonSliceClient
):
    created = await client.create_session(agent_id=AGENT_ID)
    sid = created["session_id"]
    fake.inject("terminate", Fault.status(503), times=2)
    assert await client.end_session(sid, created["control_url"]) is True
    assert fake.terminate_counts == {sid: 1}
    assert fake.terminate_requests == {sid: 3}
    assert fake.sessions[sid].status == "COMPLETED"


async def test_terminate_of_a_gone_session_is_false_and_not_retried(
    fake: FakeLemonSlice, client: LemonSliceClient
):
    sid = (await client.create_session(agent_id=AGENT_ID))["session_id"]
    assert await client.end_session(sid) is True
    assert await client.end_session(sid) is False  # the fake answers 404 now
    assert await client.end_session("sess_never_existed") is False
    fake.inject("terminate", Fault.status(410))
    assert await client.end_session("sess_other") is False
    assert fake.terminate_requests == {sid: 2, "sess_never_existed": 1, "sess_other": 1}
    assert fake.terminate_counts == {sid: 1}


async def test_terminate_whose_answer_is_lost_is_retried_and_reports_gone(
    fake: FakeLemonSlice, client: LemonSliceClient
):
    sid = (await client.create_session(agent_id=AGENT_ID))["session_id"]
    fake.inject("terminate", Fault.lost_answer())
    assert await client.end_session(sid) is False  # it ended on the first try; the retry says 404
    assert fake.terminate_counts == {sid: 1}
    assert fake.terminate_requests == {sid: 2}


async def test_terminate_success_false_is_an_invalid_response(
    fake: FakeLemonSlice, client: LemonSliceClient
):
    fake.inject("terminate", Fault.status(200, body='{"success": false}'))
    with pytest.raises(InvalidResponseError, match="success=false"):
        await client.end_session("sess_x")


async def test_terminate_rejected_by_the_server(fake: FakeLemonSlice, client: LemonSliceClient):
    fake.inject("terminate", Fault.status(400))
    with pytest.raises(ClientRequestError):
        await client.end_session("sess_x")
    assert fake.terminate_requests == {"sess_x": 1}


async def test_retries_stop_at_the_deadline(fake: FakeLemonSlice):
    clock = VirtualClock()
    fake.inject("terminate", Fault.status(503), times=100)
    retry = RetryPolicy(attempts=100, base=1.0, cap=1.0, deadline=3.5, jitter=False)
    async with make_client(fake, retry=retry, clock=clock) as client:
        with pytest.raises(ServerError):
            await client.end_session("sess_x")
    assert clock.sleeps == [1.0, 1.0, 1.0]  # a fourth wait would reach the deadline
    assert calls(fake, "terminate") == 4


async def test_retries_are_logged_with_structured_fields(
    fake: FakeLemonSlice, client: LemonSliceClient, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="sessionmgr")
    fake.inject("terminate", Fault.status(503))
    await client.end_session("sess_x")
    [record] = [r for r in caplog.records if "retry" in r.getMessage()]
    assert record.levelno in (logging.INFO, logging.WARNING)
    fields = record.__dict__
    assert (fields["method"], fields["status"], fields["attempt"]) == ("POST", 503, 1)
    assert fields["url"] == f"{fake.url}/sess_x/control"


# --- secrets never leak ------------------------------------------------------------------------

SECRET_KEY = "sk-live-SECRET-4f0d2a9b"


async def test_the_key_and_tokens_never_reach_reprs_errors_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[BaseException] = []
    async with FakeLemonSlice(api_key=SECRET_KEY) as fake:
        client = make_client(fake, api_key=SECRET_KEY, timeouts=Timeouts(connect=1.0, total=0.1))
        assert SECRET_KEY not in repr(client)
        assert SECRET_KEY not in str(vars(client))
        async with client:
            sid = (await client.create_session(agent_id=AGENT_ID, daily_token=DAILY_TOKEN))[
                "session_id"
            ]
            faults = [
                Fault.status(401),
                Fault.status(404),
                Fault.status(429, retry_after=0),
                Fault.status(503),
                Fault.html_502(),
                Fault.non_json(),
                Fault.missing_fields(),
                Fault.hang(5),
                Fault.drop(),
                Fault.lost_answer(),
                # a server echoing what it got: the key (any call) or the create's secrets
                Fault.status(400, body=f'{{"error": "bad key {SECRET_KEY}"}}'),
                Fault.status(
                    422, body=f'{{"error": "bad {DAILY_TOKEN} / conn-secret-99 / {SECRET_KEY}"}}'
                ),
            ]
            for fault in faults:
                for endpoint in ("create", "get", "terminate"):
                    if fault.code == 422 and endpoint != "create":
                        continue  # only a create knows the token it sent
                    fake.inject(endpoint, fault, times=10)
                    try:
                        if endpoint == "create":
                            await client.create_session(
                                agent_id=AGENT_ID,
                                daily_token=DAILY_TOKEN,
                                connection_properties={"api_secret": "conn-secret-99"},
                            )
                        elif endpoint == "get":
                            await client.get_session(sid)
                        else:
                            await client.end_session(sid)
                    except LemonSliceError as exc:
                        errors.append(exc)
                    fake.faults.clear()
        stored = json.dumps(fake.state())
    assert len(errors) >= 25
    for error in errors:
        for secret in (SECRET_KEY, DAILY_TOKEN, "conn-secret-99"):
            assert secret not in str(error)
            assert secret not in repr(error)
            assert secret not in (getattr(error, "body", None) or "")
    for secret in (SECRET_KEY, DAILY_TOKEN, "conn-secret-99"):
        assert secret not in caplog.text
        assert secret not in stored  # the fake's own state redacts them too
    assert any("***" in (getattr(e, "body", None) or "") for e in errors)


# --- configuration and lifecycle ---------------------------------------------------------------


def test_missing_key_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEMONSLICE_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="LEMONSLICE_API_KEY"):
        LemonSliceClient()
    with pytest.raises(ConfigurationError, match="LEMONSLICE_API_KEY"):
        LemonSliceClient("   ")


def test_key_and_url_fall_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEMONSLICE_API_KEY", "env-key")
    monkeypatch.delenv("LEMONSLICE_API_URL", raising=False)
    client = LemonSliceClient()
    assert client.api_url == LemonSliceClient.LEMONSLICE_URL
    assert client.api_url == "https://lemonslice.com/api/liveai/sessions"
    assert "env-key" not in repr(client)

    monkeypatch.setenv("LEMONSLICE_API_URL", "http://localhost:9999/api/liveai/sessions/")
    assert LemonSliceClient().api_url == "http://localhost:9999/api/liveai/sessions"
    assert LemonSliceClient(api_url="https://x.test/s").api_url == "https://x.test/s"

    class Staging(LemonSliceClient):
        LEMONSLICE_URL = "https://staging.test/api/liveai/sessions"

    monkeypatch.delenv("LEMONSLICE_API_URL")
    assert Staging().api_url == "https://staging.test/api/liveai/sessions"


@pytest.mark.parametrize("url", ["lemonslice.com/api", "ftp://x/y"])
def test_bad_api_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError, match="must start with http"):
        LemonSliceClient("k", api_url=url)


def test_key_with_a_newline_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="whitespace or control characters") as info:
        LemonSliceClient("abc\ndef")
    assert "abc" not in str(info.value)


async def test_owned_session_is_closed_with_the_client(fake: FakeLemonSlice) -> None:
    async with make_client(fake) as client:
        await client.create_session(agent_id=AGENT_ID)
        owned = client._session
        assert owned is not None
        assert not owned.closed
    assert owned.closed
    with pytest.raises(RuntimeError, match="closed"):
        await client.get_session("sess_x")


async def test_borrowed_session_is_left_open(fake: FakeLemonSlice) -> None:
    async with aiohttp.ClientSession() as http:
        async with LemonSliceClient(FAKE_API_KEY, http, api_url=fake.url) as client:
            await client.create_session(agent_id=AGENT_ID)
            assert "borrowed" in repr(client)
        assert not http.closed
        async with http.get(fake.url, headers={"x-api-key": FAKE_API_KEY}) as resp:
            assert resp.status == 200  # still usable by its owner


async def test_client_without_calls_closes_cleanly() -> None:
    client = LemonSliceClient("k")
    await client.close()
    await client.close()


def test_timeouts_validate() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        Timeouts(connect=0)
    limits = Timeouts(connect=5.0, total=15.0).for_attempt(2.0)
    assert (limits.total, limits.sock_connect) == (2.0, 2.0)
    assert Timeouts().for_attempt(None).total == 15.0


# --- Retry-After parsing and RetryPolicy -------------------------------------------------------


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 1.5 ", now) == 1.5
    assert parse_retry_after("-3", now) == 0.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
    for junk in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(junk, now) is None


def test_retry_policy_backoff_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(base=0.2, cap=5.0, jitter=False)
    assert [policy.delay(n) for n in range(1, 8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert policy.delay(10_000) == 5.0  # no overflow however many attempts


def test_retry_policy_full_jitter_stays_within_the_backoff() -> None:
    policy = RetryPolicy(base=1.0, cap=8.0)
    for attempt in range(1, 6):
        for _ in range(50):
            assert 0.0 <= policy.delay(attempt) <= policy.backoff(attempt)


def test_retry_policy_honours_retry_after_within_cap_and_deadline() -> None:
    policy = RetryPolicy(base=0.2, cap=5.0, deadline=30.0)
    assert policy.delay(1, retry_after=2.0) == 2.0
    assert policy.delay(1, retry_after=60.0) == 5.0
    assert policy.delay(1, retry_after=4.0, elapsed=28.0) == 2.0
    assert policy.delay(1, retry_after=-1.0) == 0.0


def test_retry_policy_should_retry() -> None:
    policy = RetryPolicy(attempts=3, deadline=10.0)
    assert policy.should_retry(1, elapsed=0.0, delay=1.0)
    assert not policy.should_retry(3, elapsed=0.0)
    assert not policy.should_retry(1, elapsed=9.0, delay=1.0)


def test_retry_policy_for_the_reaper() -> None:
    policy = RetryPolicy(attempts=1_000_000, base=5.0, cap=300.0, deadline=float("inf"))
    assert policy.delay(1, retry_after=30.0) == 30.0
    assert RetryPolicy(base=5.0, cap=300.0, jitter=False, deadline=1e9).delay(20) == 300.0
    assert policy.should_retry(500, elapsed=1e7, delay=300.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"attempts": 0}, {"base": -1.0}, {"base": 2.0, "cap": 1.0}, {"deadline": 0.0}],
)
def test_retry_policy_validates(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)
