"""Create options beyond pipecat 1.12: pipecat 1.14's arguments, LiveKit sessions, documented
fields; in the client and the manager (the record keeps model and transport, never a token)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import typing
from pathlib import Path
from typing import Any

import pytest

from sessionmgr import SessionStatus
from sessionmgr.client import (
    AUDIO_SAMPLE_RATES,
    CreateArguments,
    CreateOptions,
    LemonSliceClient,
    build_create_request,
)
from sessionmgr.manager import SessionManager
from sessionmgr.testing import FakeLemonSlice

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
LIVEKIT: dict[str, Any] = {
    "transport_type": "livekit",
    "livekit_url": "wss://x.livekit.cloud",
    "livekit_token": "lk-secret-token-123",
    "livekit_session_id": "RM_abc",
}


def _keywords(fn: Any) -> list[str]:
    """The keyword arguments ``fn`` takes: its named ones, then those of a ``**options:
    Unpack[TypedDict]`` (what mypy checks callers against)."""
    names = []
    for name, param in inspect.signature(fn).parameters.items():
        if name == "self":
            continue
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            (typed,) = typing.get_args(typing.get_type_hints(fn, include_extras=True)[name])
            names += list(typing.get_type_hints(typed))
        else:
            assert param.kind is inspect.Parameter.KEYWORD_ONLY, (fn, name)
            names.append(name)
    return names


def test_every_create_entry_point_takes_pipecats_arguments():
    """pipecat 1.14.0's create_session arguments (keyword-only there too) are taken by every
    entry point; the pipecat wrapper takes exactly them, in pipecat's order; CreateOptions keeps
    them first in that order, and the keyword lists are its fields."""
    from pipecat.transports.lemonslice.api import LemonSliceApi

    from sessionmgr.integrations.pipecat import ManagedLemonSliceApi

    theirs = _keywords(LemonSliceApi.create_session)
    assert _keywords(ManagedLemonSliceApi.create_session) == theirs
    fields = [f.name for f in dataclasses.fields(CreateOptions)]
    assert fields[: len(theirs)] == theirs
    assert sorted(_keywords(LemonSliceClient.create_session)) == sorted(fields)
    assert sorted(_keywords(build_create_request)) == sorted(set(fields) - {"api_url"})
    manager_only = {"idle_window", "max_age", "metadata"}
    assert sorted(_keywords(SessionManager.create_session)) == sorted([*fields, *manager_only])


def test_create_arguments_are_create_options_fields_with_their_types():
    hints = typing.get_type_hints(CreateOptions)
    assert typing.get_type_hints(CreateArguments) == hints
    assert CreateArguments.__required_keys__ == frozenset()  # every argument has a default


def test_audio_sample_rate_and_model_are_top_level_only_when_given():
    payload, _ = build_create_request(agent_id="a")
    assert "audio_sample_rate" not in payload
    assert "model" not in payload
    payload, _ = build_create_request(agent_id="a", audio_sample_rate=24000, model="lemon-2")
    assert payload == {
        "transport_type": "daily",
        "agent_id": "a",
        "audio_sample_rate": 24000,
        "model": "lemon-2",
    }


@pytest.mark.parametrize("rate", [8000, 24001, 0, -1, 24000.0, True, "24000"])
def test_audio_sample_rate_outside_the_documented_set_is_refused(rate: object):
    with pytest.raises(ValueError, match="audio_sample_rate must be one of 16000"):
        build_create_request(agent_id="a", audio_sample_rate=rate)  # type: ignore[arg-type]


def test_every_documented_rate_is_accepted():
    for rate in AUDIO_SAMPLE_RATES:
        payload, _ = build_create_request(agent_id="a", audio_sample_rate=rate)
        assert payload["audio_sample_rate"] == rate


def test_livekit_payload_is_the_plugins_shape():
    payload, image = build_create_request(agent_id="a", agent_idle_prompt="wait", **LIVEKIT)
    assert image is None
    assert list(payload) == ["transport_type", "properties", "agent_id", "agent_idle_prompt"]
    assert payload["properties"] == {
        "livekit_url": "wss://x.livekit.cloud",
        "livekit_token": "lk-secret-token-123",
        "livekit_session_id": "RM_abc",
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"transport_type": "livekit", "livekit_token": "t"}, "needs livekit_url"),
        ({"transport_type": "livekit", "livekit_url": "wss://x"}, "needs livekit_token"),
        ({**LIVEKIT, "daily_room_url": "https://r"}, "daily_room_url and daily_token"),
        ({"livekit_url": "wss://x"}, "need transport_type='livekit'"),
        ({"simulcast": True}, "simulcast is only"),
        ({"transport_type": "zoom"}, "transport_type must be one of"),
        ({"aspect_ratio": "16x9"}, "aspect_ratio must be one of"),
        ({"response_done_timeout": 0}, "positive number"),
        ({"response_done_timeout": float("nan")}, "positive number"),
        ({"recordings_bucket": "b"}, "needs enable_recording"),
        ({"enable_recording": 1}, "True or False"),
        ({"model": ""}, "non-empty"),
        ({"model": 3}, "must be a string"),
    ],
)
def test_bad_create_options_are_refused_before_sending(kwargs: dict[str, object], message: str):
    with pytest.raises(ValueError, match=message):
        build_create_request(agent_id="a", **kwargs)  # type: ignore[arg-type]


def test_documented_fields_are_first_class():
    payload, _ = build_create_request(
        agent_image_url="https://x/a.png",
        agent_idle_prompt="idle",
        response_done_timeout=2.5,
        aspect_ratio="9x16",
        enable_recording=True,
        recordings_bucket="bucket",
        extra_properties={"custom": 1},
    )
    assert payload == {
        "transport_type": "daily",
        "agent_image_url": "https://x/a.png",
        "agent_idle_prompt": "idle",
        "response_done_timeout": 2.5,
        "aspect_ratio": "9x16",
        "enable_recording": True,
        "recordings_bucket": "bucket",
        "custom": 1,
    }
    payload, _ = build_create_request(agent_id="a", simulcast=True, **LIVEKIT)
    assert payload["simulcast"] is True


async def test_livekit_create_derives_the_control_url_and_has_no_room(
    client: LemonSliceClient, fake: FakeLemonSlice
):
    answer = await client.create_session(agent_id="a", **LIVEKIT)
    sid = answer["session_id"]
    assert answer["room_url"] is None
    assert answer["control_url"] == f"{fake.url}/{sid}/control"
    assert fake.requests[-1].json["properties"]["livekit_token"] == "lk-secret-token-123"
    assert fake.sessions[sid].payload["properties"]["livekit_token"] == "REDACTED"


async def test_livekit_multipart_create(client: LemonSliceClient, fake: FakeLemonSlice):
    await client.create_session(agent_image=PNG, model="m1", **LIVEKIT)
    req = fake.requests[-1]
    assert req.form is not None
    assert set(req.form) == {"payload", "image"}
    assert req.payload["transport_type"] == "livekit"
    assert req.payload["model"] == "m1"
    assert req.form["image"].data == PNG


async def test_manager_records_model_and_transport_never_the_token(
    manager: SessionManager, lemon: FakeLemonSlice, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    record = await manager.create_session(
        agent_id="a", audio_sample_rate=48000, model="lemon-x", metadata={"bot": "b"}, **LIVEKIT
    )
    assert record.status is SessionStatus.ACTIVE
    assert (record.model, record.transport_type, record.room_url) == ("lemon-x", "livekit", None)
    assert record.control_url == f"{lemon.url}/{record.session_id}/control"
    again = await manager.get(record.id)
    assert (again.model, again.transport_type) == ("lemon-x", "livekit")
    dumped = json.dumps(again.to_dict()) + repr(again) + caplog.text
    dumped += json.dumps([e.to_dict() for e in await manager.repository.events(record.id)])
    assert "lk-secret-token-123" not in dumped
    body = lemon.requests[-1].json
    assert body["audio_sample_rate"] == 48000
    assert body["model"] == "lemon-x"


async def test_the_livekit_token_never_reaches_the_database_file(
    manager: SessionManager, db_url: str
):
    await manager.create_session(agent_id="a", **LIVEKIT)
    await manager.repository.flush_touches()
    path = Path(db_url.removeprefix("sqlite+aiosqlite:///"))
    raw = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    assert b"lk-secret-token-123" not in raw
    assert b"wss://x.livekit.cloud" not in raw  # the create payload is not stored at all


async def test_manager_default_is_daily_without_model(manager: SessionManager):
    record = await manager.create_session(agent_id="a")
    assert (record.model, record.transport_type) == (None, "daily")


async def test_manager_refuses_a_bad_rate_before_writing(
    manager: SessionManager, lemon: FakeLemonSlice
):
    with pytest.raises(ValueError, match="audio_sample_rate"):
        await manager.create_session(agent_id="a", audio_sample_rate=12345)
    assert lemon.requests == []
    assert (await manager.repository.list()).items == []


async def test_adopted_livekit_session_keeps_its_transport(manager: SessionManager):
    record = await manager.adopt_session("sess_lk", transport_type="livekit", model="m")
    assert (record.transport_type, record.model) == ("livekit", "m")
    plain = await manager.adopt_session("sess_dy")
    assert plain.transport_type == "daily"
