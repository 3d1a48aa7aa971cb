"""Request parity with pipecat 1.14.0's ``LemonSliceApi`` and livekit-plugins-lemonslice 1.8.9.

The golden request vectors in tests/golden/ are what those packages' own create code (and
pipecat's ``end_session``) sent to ``FakeLemonSlice`` for each case below. Regenerate them, with
the versions pinned in tests/constraints.txt installed, by running from the project root::

    .venv/bin/python -m tests.parity

tests/test_parity.py compares our client's requests with the vectors, and also runs the real
packages live against the fake, request for request. A vector is the request's *shape*: method,
path, query, the headers sent (names; values of the API key and content type), and the JSON body
text or the multipart parts (name, filename, content type, JSON text or bytes).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from sessionmgr.client import LemonSliceClient
from sessionmgr.testing import REDACTED, FakeLemonSlice, RecordedRequest

GOLDEN = Path(__file__).parent / "golden"
API_KEY = "parity-key-4b1d"
LIVEKIT_TOKEN = "lk-parity-token-77"
DAILY_TOKEN = "daily-parity-token-55"
IMAGE = "$image"  # in a case's arguments: the PNG below
# Headers aiohttp adds whose values depend on the run (the fake's port)
VOLATILE_HEADERS = frozenset({"host"})
SESSION_ID = re.compile(r"/sess_[0-9a-f]+(?=/|$)")

# name -> (flavour, our client's create_session arguments). Every create argument pipecat 1.14.0
# has is in at least one daily case, every one of the plugin's in at least one livekit case.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "daily_minimal": ("daily", {"agent_id": "agent_1"}),
    "daily_pipecat_transport_default": (
        "daily",  # what pipecat's LemonSliceTransport sends by default: 24000 Hz, no model
        {
            "agent_id": "agent_1",
            "audio_sample_rate": 24000,
            "daily_room_url": "https://x.daily.co/room",
            "daily_token": DAILY_TOKEN,
        },
    ),
    "daily_json_every_argument": (
        "daily",
        {
            "agent_id": "agent_1",
            "agent_prompt": "Be upbeat.",
            "idle_timeout": 30,
            "audio_sample_rate": 48000,
            "model": "lemon-pro",
            "daily_room_url": "https://x.daily.co/room",
            "daily_token": DAILY_TOKEN,
            "connection_properties": {"lang": "en", "limits": {"minutes": 5}},
            "extra_properties": {"agent_idle_prompt": "Nod.", "aspect_ratio": "9x16"},
        },
    ),
    "daily_json_image_url": (
        "daily",
        {"agent_image_url": "https://x/a.png", "audio_sample_rate": 16000, "idle_timeout": -1},
    ),
    "daily_multipart": (
        "daily",
        {
            "agent_image": IMAGE,
            "agent_prompt": "Calm.",
            "model": "lemon-fast",
            "audio_sample_rate": 22050,
            "daily_room_url": "https://x.daily.co/room",
            "daily_token": DAILY_TOKEN,
            "extra_properties": {"response_done_timeout": 2},
        },
    ),
    "livekit_minimal": (
        "livekit",
        {
            "agent_id": "agent_1",
            "livekit_url": "wss://x.livekit.cloud",
            "livekit_token": LIVEKIT_TOKEN,
            "livekit_session_id": "RM_abc",
        },
    ),
    "livekit_plugin_default": (
        "livekit",  # what the plugin's AvatarSession sends by default: 24000 Hz
        {
            "agent_id": "agent_1",
            "livekit_url": "wss://x.livekit.cloud",
            "livekit_token": LIVEKIT_TOKEN,
            "livekit_session_id": "RM_abc",
            "audio_sample_rate": 24000,
        },
    ),
    "livekit_json_every_argument": (
        "livekit",
        {
            "agent_image_url": "https://x/a.png",
            "agent_prompt": "Be upbeat.",
            "agent_idle_prompt": "Nod.",
            "idle_timeout": 45,
            "audio_sample_rate": 44100,
            "model": "lemon-pro",
            "livekit_url": "wss://x.livekit.cloud",
            "livekit_token": LIVEKIT_TOKEN,
            "livekit_session_id": "RM_abc",
            "extra_properties": {"simulcast": True, "aspect_ratio": "2x3"},
        },
    ),
    "livekit_multipart": (
        "livekit",
        {
            "agent_image": IMAGE,
            "agent_prompt": "Calm.",
            "model": "lemon-fast",
            "audio_sample_rate": 24000,
            "livekit_url": "wss://x.livekit.cloud",
            "livekit_token": LIVEKIT_TOKEN,
            "livekit_session_id": "RM_abc",
        },
    ),
}


def png_bytes() -> bytes:
    """A tiny PNG drawn with Pillow (what both packages take as an image)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 200, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


class StoredPNG:
    """An object with ``.save(fp, format="PNG")`` that writes exactly these bytes, so a vector's
    image reaches our client byte for byte whatever Pillow version is installed."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def save(self, fp: Any, /, format: str) -> None:
        assert format == "PNG"
        fp.write(self.data)


def shape(request: RecordedRequest) -> dict[str, Any]:
    """What a vector holds of one request (see the module docstring)."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    content_type = headers.get("content-type", "").split(";")[0].strip()
    out: dict[str, Any] = {
        "method": request.method,
        "path": SESSION_ID.sub("/{session_id}", request.path),  # the fake's ids are random
        "query": request.query,
        "headers": sorted(k for k in headers if k not in VOLATILE_HEADERS),
        "api_key": headers.get("x-api-key"),
        "content_type": content_type,
    }
    if request.form is not None:
        out["parts"] = [
            {
                "name": f.name,
                "filename": f.filename,
                "content_type": f.content_type,
                **(
                    {"text": f.text}
                    if f.content_type == "application/json"
                    else {"sha256": hashlib.sha256(f.data).hexdigest()}
                ),
            }
            for f in request.form.values()
        ]
    else:
        out["body"] = request.body.decode("utf-8")
    return out


def our_args(args: dict[str, Any], image: bytes | None) -> dict[str, Any]:
    """A case's arguments for our client: the image as an object that saves it."""
    out = dict(args)
    if out.get("agent_image") == IMAGE:
        assert image is not None
        out["agent_image"] = StoredPNG(image)
    return out


async def _with_fake(run: Callable[[FakeLemonSlice], Awaitable[None]]) -> list[RecordedRequest]:
    async with FakeLemonSlice(api_key=API_KEY) as fake:
        await run(fake)
        assert all(r.headers.get("x-api-key", REDACTED) == REDACTED for r in fake.requests)
        return list(fake.requests)


async def pipecat_requests(args: dict[str, Any], image: bytes | None) -> list[RecordedRequest]:
    """pipecat 1.14.0's ``LemonSliceApi``: create with ``args``, then ``end_session``."""
    from PIL import Image
    from pipecat.transports.lemonslice.api import LemonSliceApi

    theirs = dict(args)
    if theirs.get("agent_image") == IMAGE:
        assert image is not None
        theirs["agent_image"] = Image.open(io.BytesIO(image))

    async def run(fake: FakeLemonSlice) -> None:
        async with aiohttp.ClientSession() as session:
            api = LemonSliceApi(API_KEY, session)
            answer = await api.create_session(**theirs, api_url=fake.url)
            await api.end_session(answer["session_id"], answer["control_url"])

    return await _with_fake(run)


async def livekit_requests(args: dict[str, Any], image: bytes | None) -> list[RecordedRequest]:
    """livekit-plugins-lemonslice 1.8.9's ``LemonSliceAPI.start_agent_session`` (the call its
    ``AvatarSession.start`` makes), with ``extra_properties`` as its ``extra_payload``."""
    from livekit.plugins.lemonslice.api import LemonSliceAPI
    from PIL import Image

    theirs = {k: v for k, v in args.items() if k != "transport_type"}
    if "extra_properties" in theirs:
        theirs["extra_payload"] = theirs.pop("extra_properties")
    if theirs.get("agent_image") == IMAGE:
        assert image is not None
        theirs["agent_image"] = Image.open(io.BytesIO(image))

    async def run(fake: FakeLemonSlice) -> None:
        async with aiohttp.ClientSession() as session:
            api = LemonSliceAPI(api_key=API_KEY, api_url=fake.url, session=session)
            await api.start_agent_session(**theirs)

    return await _with_fake(run)


async def our_requests(
    flavour: str, args: dict[str, Any], image: bytes | None
) -> list[RecordedRequest]:
    """Our client, the same calls: pipecat's create and end, or the plugin's create."""
    ours = our_args(args, image)
    if flavour == "livekit":
        ours["transport_type"] = "livekit"

    async def run(fake: FakeLemonSlice) -> None:
        async with LemonSliceClient(API_KEY, api_url=fake.url) as client:
            answer = await client.create_session(**ours)
            if flavour == "daily":
                await client.end_session(answer["session_id"], answer["control_url"])

    return await _with_fake(run)


def vector_path(name: str) -> Path:
    return GOLDEN / f"{name}.json"


async def record_all() -> list[Path]:
    """Run the real packages for every case and write one vector file per case."""
    GOLDEN.mkdir(exist_ok=True)
    image = png_bytes()
    written = []
    for name, (flavour, args) in CASES.items():
        if flavour == "daily":
            source = "pipecat-ai 1.14.0 LemonSliceApi.create_session + end_session"
            requests = await pipecat_requests(args, image)
        else:
            source = "livekit-plugins-lemonslice 1.8.9 LemonSliceAPI.start_agent_session"
            requests = await livekit_requests(args, image)
        sent = requests[0].form["image"].data if requests[0].form is not None else None
        vector = {
            "case": name,
            "flavour": flavour,
            "source": source,
            "arguments": args,
            # the PNG bytes the package sent (our client is given exactly these)
            "image_base64": base64.b64encode(sent).decode() if sent is not None else None,
            "requests": [shape(r) for r in requests],
        }
        path = vector_path(name)
        path.write_text(json.dumps(vector, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(vector_path(name).read_text())
    return data


if __name__ == "__main__":
    for written in asyncio.run(record_all()):
        print(written.relative_to(Path.cwd()) if written.is_relative_to(Path.cwd()) else written)
