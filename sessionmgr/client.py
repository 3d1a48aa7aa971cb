"""``LemonSliceClient``: pipecat's ``LemonSliceApi`` on the wire, typed errors, safe retries.

Requests are byte-for-byte what pipecat sends for the same arguments (``build_create_request`` is
the pure half of that, testable without I/O). On top of that: ``get_session``, ``list_sessions``,
timeouts on every attempt, and retries that never risk a second paid session:

- reads and terminate are idempotent: retried on transport errors, 5xx and 429;
- create is retried only when the server provably did not take it (connect failure, 429, 503).
  Any other failure after the request left (a timeout, a dropped connection, another 5xx, a 2xx
  without a usable ``session_id``) raises ``CreateOutcomeUnknown``: a session may exist, and only
  reconcile may find out.
- terminate answered 404/410 means "already gone": ``end_session`` returns False, never retries.
- control events (``update_image``, ``update_agent_prompt``, ``update_idle_prompt``,
  ``trigger_action``, ``reset_idle_timeout``) are idempotent: retried like reads; 404/410 raises
  ``NotFoundError``. 402 (no credits) is ``NoCreditsError``, never retried.

The API key travels only in the ``x-api-key`` header: never in a URL, a log record, an error or a
repr. Redirects are not followed, and a ``control_url`` (from an answer, or given to
``end_session``) must be on the API URL's origin or one in ``control_origins``
(``UntrustedURLError`` otherwise), so the key never goes to another host. Answers are read up to
``MAX_ANSWER_BYTES``.
"""

from __future__ import annotations

import base64
import dataclasses
import email.parser
import email.policy
import email.utils
import enum
import functools
import hmac
import io
import json
import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol, TypedDict, TypeGuard, TypeVar, Unpack
from urllib.parse import quote

import aiohttp
from yarl import URL

from . import config
from .clock import SYSTEM_CLOCK, Clock
from .errors import (
    ActivationTimeout,
    AuthError,
    ClientRequestError,
    ConfigurationError,
    CreateOutcomeUnknown,
    InvalidArgument,
    InvalidResponseError,
    LemonSliceError,
    NoCreditsError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    SessionNotLive,
    TransportError,
    UntrustedURLError,
    excerpt,
)
from .records import MIN_SECRET_CHARS, is_clean_text, is_secret_key, scrub, unclean_text
from .resources import AsyncResource
from .retry import RetryPolicy
from .states import REMOTE_FINAL

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds to open a connection, per attempt
TOTAL_TIMEOUT = 15.0  # seconds for one whole attempt: connect, send, read the answer
MIN_ATTEMPT_TIMEOUT = 0.05  # seconds; floor of an attempt squeezed by the retry deadline
MAX_CONNECTIONS = 200  # pooled connections of a session the client creates itself
LIST_PAGE_SIZE = 25  # sessions per page, as LemonSlice's default
MAX_LIST_PAGES = 100_000  # a server whose pagination never ends is a bug, not a long list
MAX_SESSION_ID_CHARS = 128  # a longer session_id in an answer is garbage (LemonSlice's are ~30)
MAX_ANSWER_BYTES = 1 << 20  # an answer body larger than this is refused, not buffered (1 MiB)

API_KEY_HEADER = "x-api-key"  # pipecat's spelling (header names are case-insensitive)
TRANSPORT_TYPE = "daily"  # pipecat's, and the default
LIVEKIT = "livekit"  # livekit-plugins-lemonslice's self-managed flavour
TRANSPORT_TYPES = (TRANSPORT_TYPE, LIVEKIT)
AUDIO_SAMPLE_RATES = (16000, 22050, 24000, 44100, 48000)  # Hz, the documented set
ASPECT_RATIOS = ("1x1", "2x3", "9x16")
LIVEKIT_PROPERTIES = ("livekit_url", "livekit_token", "livekit_session_id")  # the plugin's order
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TERMINATE_BODY = json.dumps({"event": "terminate"}).encode()
MAX_IMAGE_BYTES = 900_000  # decoded bytes of an update-image PNG; LemonSlice's limit is 900 KB
WAIT_POLL_FIRST = 0.5  # seconds between the first status polls of wait_until_active
WAIT_POLL_CAP = 5.0  # seconds between polls at most (doubling from WAIT_POLL_FIRST)
WAIT_TIMEOUT = 180.0  # seconds; a cold start can stay QUEUED ~2.5 minutes

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-attempt time limits in seconds (each retry gets a fresh budget)."""

    connect: float = CONNECT_TIMEOUT
    total: float = TOTAL_TIMEOUT

    def __post_init__(self) -> None:
        if not (self.connect > 0 and self.total > 0):
            raise ValueError("Timeouts.connect and .total must be > 0 seconds")

    def for_attempt(self, budget: float | None = None) -> aiohttp.ClientTimeout:
        """aiohttp's form; ``budget`` (seconds left before a retry deadline) may shorten it.

        Only ``sock_connect`` bounds the connect phase: waiting for a pooled connection counts
        against ``total``, so a busy pool is not mistaken for an unreachable server.
        """
        total = self.total if budget is None else max(min(self.total, budget), MIN_ATTEMPT_TIMEOUT)
        return aiohttp.ClientTimeout(total=total, sock_connect=min(self.connect, total))


class SupportsSavePNG(Protocol):
    """Anything that can write itself as a PNG, such as a PIL image (Pillow is not required)."""

    def save(self, fp: Any, /, format: str) -> object: ...


AgentImage = bytes | bytearray | memoryview | SupportsSavePNG  # PNG bytes, or an image to encode


class _Secret:
    """Holds the API key so that no repr, vars() dump or rich traceback prints it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"


class _Op(enum.Enum):
    CREATE = "create"
    GET = "get"
    LIST = "list"
    TERMINATE = "terminate"
    CONTROL = "control"


@dataclasses.dataclass(frozen=True, slots=True)
class _Call:
    """What one logical call needs to build errors: never the key itself."""

    op: _Op
    method: str
    url: str
    secrets: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    retry_after: str | None
    location: str | None
    content_type: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclasses.dataclass(frozen=True, slots=True)
class RawAnswer:
    """An answer as LemonSlice gave it, for passing back unchanged (the recording proxy)."""

    status: int
    body: bytes
    content_type: str | None
    session: dict[str, Any] | None = None  # a usable create answer, parsed
    unknown: bool = False  # a create answer that leaves its outcome unknown (5xx, garbled 2xx)

    @classmethod
    def of(
        cls, answer: _Answer, *, session: dict[str, Any] | None = None, unknown: bool = False
    ) -> RawAnswer:
        return cls(answer.status, answer.body, answer.content_type, session, unknown)


def build_create_request(**fields: Unpack[CreateFields]) -> tuple[dict[str, Any], bytes | None]:
    """The create payload for these arguments, and the PNG bytes of ``agent_image``.

    ``transport_type="daily"`` (the default) is exactly what pipecat 1.14's ``LemonSliceApi``
    builds; ``"livekit"`` is exactly what livekit-plugins-lemonslice 1.8.9 builds (``properties``
    first: ``livekit_url``, ``livekit_token``, ``livekit_session_id``). Keys are sent only when
    given; ``properties`` is ``connection_properties`` plus the transport's own keys and is sent
    only when non-empty; ``extra_properties`` is merged last (it wins, as in pipecat).

    First-class because LemonSlice documents them: ``audio_sample_rate``, ``model``,
    ``agent_idle_prompt``, ``response_done_timeout``, ``aspect_ratio``, ``simulcast`` (livekit
    only), ``enable_recording`` / ``recordings_bucket``. Anything else goes in
    ``extra_properties``. Raises ValueError/TypeError for bad arguments, so nothing is sent.
    """
    request = CreateOptions.of(fields).request()
    return request.payload, request.image


@dataclasses.dataclass(frozen=True, slots=True)
class CreateOptions:
    """A create's arguments, in pipecat 1.14's order (``api_url`` included), then LemonSlice's
    other documented fields: built once per create by every entry point, so the list of them is
    written once (``build_create_request`` says what each means)."""

    agent_image_url: str | None = None
    agent_id: str | None = None
    agent_image: AgentImage | None = None
    agent_prompt: str | None = None
    idle_timeout: int | None = None
    audio_sample_rate: int | None = None
    model: str | None = None
    daily_room_url: str | None = None
    daily_token: str | None = None
    connection_properties: Mapping[str, Any] | None = None
    extra_properties: Mapping[str, Any] | None = None
    api_url: str | None = None
    transport_type: str = TRANSPORT_TYPE
    livekit_url: str | None = None
    livekit_token: str | None = None
    livekit_session_id: str | None = None
    agent_idle_prompt: str | None = None
    response_done_timeout: float | None = None
    aspect_ratio: str | None = None
    simulcast: bool | None = None
    enable_recording: bool | None = None
    recordings_bucket: str | None = None

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> CreateOptions:
        """The options among an entry point's ``locals()`` (other names are left out)."""
        return cls(**{name: arguments[name] for name in _CREATE_FIELDS if name in arguments})

    def record_fields(self) -> dict[str, Any]:
        """What a session's record keeps of the create (never a token or property)."""
        return {name: getattr(self, name) for name in _RECORDED_FIELDS}

    def request(self) -> CreateRequest:
        """The validated request (raises ValueError/TypeError for bad arguments, so nothing is
        sent): built once, sent as built."""
        return _build_request(self)


_CREATE_FIELDS = tuple(f.name for f in dataclasses.fields(CreateOptions))
_RECORDED_FIELDS = (
    "agent_id",
    "agent_image_url",
    "agent_prompt",
    "idle_timeout",
    "model",
    "transport_type",
)


class CreateFields(TypedDict, total=False):
    """``CreateOptions``' fields but ``api_url``, as keyword arguments (``build_create_request``):
    mypy checks callers against it. Declarative, so written beside the dataclass; a test keeps the
    two equal (names and types)."""

    agent_image_url: str | None
    agent_id: str | None
    agent_image: AgentImage | None
    agent_prompt: str | None
    idle_timeout: int | None
    audio_sample_rate: int | None
    model: str | None
    daily_room_url: str | None
    daily_token: str | None
    connection_properties: Mapping[str, Any] | None
    extra_properties: Mapping[str, Any] | None
    transport_type: str
    livekit_url: str | None
    livekit_token: str | None
    livekit_session_id: str | None
    agent_idle_prompt: str | None
    response_done_timeout: float | None
    aspect_ratio: str | None
    simulcast: bool | None
    enable_recording: bool | None
    recordings_bucket: str | None


class CreateArguments(CreateFields, total=False):
    """Every create argument (``client.create_session``, ``SessionManager.create_session``)."""

    api_url: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class CreateRequest:
    """A create's payload, its JSON text (one ``json.dumps``) and the PNG of ``agent_image``."""

    payload: dict[str, Any]
    text: str
    image: bytes | None


def _build_request(o: CreateOptions) -> CreateRequest:
    given = [
        name
        for name, value in (
            ("agent_id", o.agent_id),
            ("agent_image_url", o.agent_image_url),
            ("agent_image", o.agent_image),
        )
        if value is not None
    ]
    if len(given) != 1:
        got = ", ".join(given) if given else "none"
        raise ValueError(
            f"Provide exactly one of agent_id, agent_image_url, or agent_image (got {got})"
        )
    for name, value in (("agent_id", o.agent_id), ("agent_image_url", o.agent_image_url)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{name} must be a non-empty string")
    if o.idle_timeout is not None and (
        isinstance(o.idle_timeout, bool) or not isinstance(o.idle_timeout, int)
    ):
        raise ValueError(
            f"idle_timeout must be whole seconds (an int; negative = never), got {o.idle_timeout!r}"
        )

    _check_create_options(
        transport_type=o.transport_type,
        audio_sample_rate=o.audio_sample_rate,
        model=o.model,
        daily=(o.daily_room_url, o.daily_token),
        livekit=(o.livekit_url, o.livekit_token, o.livekit_session_id),
        agent_idle_prompt=o.agent_idle_prompt,
        response_done_timeout=o.response_done_timeout,
        aspect_ratio=o.aspect_ratio,
        simulcast=o.simulcast,
        enable_recording=o.enable_recording,
        recordings_bucket=o.recordings_bucket,
    )
    properties: dict[str, Any] = dict(o.connection_properties) if o.connection_properties else {}
    payload: dict[str, Any] = {"transport_type": o.transport_type}
    if o.transport_type == LIVEKIT:  # the plugin puts its properties right after transport_type
        for name, value in zip(
            LIVEKIT_PROPERTIES, (o.livekit_url, o.livekit_token, o.livekit_session_id), strict=True
        ):
            if value is not None:
                properties[name] = value
        payload["properties"] = properties
    optional: tuple[tuple[str, Any], ...] = (
        ("agent_id", o.agent_id),
        ("agent_image_url", o.agent_image_url),
        ("agent_prompt", o.agent_prompt),
        ("agent_idle_prompt", o.agent_idle_prompt),
        ("idle_timeout", o.idle_timeout),
        ("audio_sample_rate", o.audio_sample_rate),
        ("model", o.model),
        ("response_done_timeout", o.response_done_timeout),
        ("aspect_ratio", o.aspect_ratio),
        ("simulcast", o.simulcast),
        ("enable_recording", o.enable_recording),
        ("recordings_bucket", o.recordings_bucket),
    )
    for name, value in optional:
        if value is not None:
            payload[name] = value
    if o.transport_type == TRANSPORT_TYPE:
        if o.daily_room_url is not None:
            properties["daily_url"] = o.daily_room_url
        if o.daily_token is not None:
            properties["daily_token"] = o.daily_token
        if properties:
            payload["properties"] = properties
    if o.extra_properties:
        payload.update(o.extra_properties)
    try:
        text = json.dumps(payload, allow_nan=False)  # strict JSON (no NaN): what a server reads
        bad = unclean_text(payload)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"the create payload is not JSON-serializable: {exc}") from None
    if bad is not None:
        shown = excerpt(repr(bad), 40)
        raise ValueError(f"{shown} is not valid text (a NUL or a lone surrogate)")

    image = _encode_png(o.agent_image) if o.agent_image is not None else None
    return CreateRequest(payload, text, image)


def create_fields(body: bytes, content_type: str) -> dict[str, Any]:
    """What a record keeps of a create body someone else built (JSON, or multipart with a
    ``payload`` part): ``agent_id``, ``agent_image_url``, ``agent_prompt``, ``idle_timeout``,
    ``model``, ``transport_type`` (``daily`` when absent) and ``metadata`` tags (``agent_image:
    upload``). Never a token or property.

    Raises ``InvalidArgument`` when the body is not a create payload at all.
    """
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        head = f"Content-Type: {content_type}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        parts = {
            part.get_param("name", header="content-disposition"): part
            for part in (message.iter_parts() if message.is_multipart() else ())
        }
        if "payload" not in parts:
            raise InvalidArgument("a multipart create needs a 'payload' part (the JSON payload)")
        raw = parts["payload"].get_payload(decode=True)
        uploaded = "image" in parts
    else:
        raw, uploaded = body, False
    try:
        payload = json.loads(raw) if isinstance(raw, bytes) else None
    except (ValueError, RecursionError):
        payload = None
    if not isinstance(payload, dict):
        raise InvalidArgument("the create body must be a JSON object (or multipart with 'payload')")
    fields: dict[str, Any] = {}
    for name in ("agent_id", "agent_image_url", "agent_prompt", "model", "transport_type"):
        if isinstance(payload.get(name), str):
            fields[name] = payload[name]
    if _is_int(payload.get("idle_timeout")):
        fields["idle_timeout"] = payload["idle_timeout"]
    tags: dict[str, Any] = {}
    if uploaded:
        tags["agent_image"] = "upload"
    fields["metadata"] = tags
    return fields


def _check_create_options(
    *,
    transport_type: str,
    audio_sample_rate: int | None,
    model: str | None,
    daily: tuple[str | None, str | None],
    livekit: tuple[str | None, str | None, str | None],
    agent_idle_prompt: str | None,
    response_done_timeout: float | None,
    aspect_ratio: str | None,
    simulcast: bool | None,
    enable_recording: bool | None,
    recordings_bucket: str | None,
) -> None:
    """The documented ranges of the create options, checked before anything is sent."""
    if transport_type not in TRANSPORT_TYPES:
        raise ValueError(
            f"transport_type must be one of {', '.join(TRANSPORT_TYPES)}, got {transport_type!r}"
        )
    if audio_sample_rate is not None and (
        not _is_int(audio_sample_rate) or audio_sample_rate not in AUDIO_SAMPLE_RATES
    ):
        rates = ", ".join(str(r) for r in AUDIO_SAMPLE_RATES)
        raise ValueError(
            f"audio_sample_rate must be one of {rates} (Hz), got {audio_sample_rate!r}"
        )
    for name, text in (
        ("model", model),
        ("agent_idle_prompt", agent_idle_prompt),
        ("recordings_bucket", recordings_bucket),
    ):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{name} must be a string, got {type(text).__name__}")
    if model is not None and not model.strip():
        raise ValueError("model must be a non-empty string (leave it out for the default model)")
    if response_done_timeout is not None and (
        isinstance(response_done_timeout, bool)
        or not isinstance(response_done_timeout, int | float)
        or not math.isfinite(response_done_timeout)
        or response_done_timeout <= 0
    ):
        raise ValueError(
            f"response_done_timeout must be a positive number of seconds, "
            f"got {response_done_timeout!r}"
        )
    if aspect_ratio is not None and aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(
            f"aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}, got {aspect_ratio!r}"
        )
    for name, flag in (("simulcast", simulcast), ("enable_recording", enable_recording)):
        if flag is not None and not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if recordings_bucket is not None and not enable_recording:
        raise ValueError("recordings_bucket needs enable_recording=True")
    livekit_url, livekit_token, _ = livekit
    if transport_type == LIVEKIT:
        if any(v is not None for v in daily):
            raise ValueError(
                "daily_room_url and daily_token are for transport_type='daily', not 'livekit'"
            )
        for name, value in (("livekit_url", livekit_url), ("livekit_token", livekit_token)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"transport_type='livekit' needs {name} (a non-empty string)")
    else:
        if any(v is not None for v in livekit):
            raise ValueError(
                "livekit_url, livekit_token and livekit_session_id need transport_type='livekit'"
            )
        if simulcast is not None:
            raise ValueError("simulcast is only for transport_type='livekit'")
    for name, value in zip(LIVEKIT_PROPERTIES, livekit, strict=True):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{name} must be a non-empty string")


RESET_IDLE_EVENT = "reset-idle-timeout"
# The docs show two shapes for a trigger: {"event": "pose-trigger", "pose_trigger": {"name": N}}
# and {"event": "action", "action": N}. We send the second: it is flat like every other control
# event (``update-agent-prompt`` carries ``agent_prompt``, ``update-idle-prompt``
# ``idle_prompt``), and it names actions, not only poses. Should LemonSlice settle on the other,
# only these two lines change.
TRIGGER_EVENT = "action"


def trigger_event(name: str) -> dict[str, Any]:
    """The control body that triggers action ``name`` (see ``TRIGGER_EVENT``)."""
    return {"event": TRIGGER_EVENT, TRIGGER_EVENT: _text("name", name, allow_empty=False)}


def agent_prompt_event(agent_prompt: str) -> dict[str, Any]:
    return {"event": "update-agent-prompt", "agent_prompt": _text("agent_prompt", agent_prompt)}


def idle_prompt_event(idle_prompt: str) -> dict[str, Any]:
    return {"event": "update-idle-prompt", "idle_prompt": _text("idle_prompt", idle_prompt)}


def image_event(*, image_url: str | None = None, image: AgentImage | None = None) -> dict[str, Any]:
    """The ``update-image`` body: exactly one of ``image_url`` or ``image`` (PNG, base64)."""
    if (image_url is None) == (image is None):
        raise ValueError("update_image needs exactly one of image_url or image")
    if image_url is not None:
        return {"event": "update-image", "image_url": _text("image_url", image_url, False)}
    assert image is not None
    data = _encode_png(image, "image")
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(
            f"the image is {len(data):,} bytes; LemonSlice takes at most {MAX_IMAGE_BYTES:,} "
            "(900 KB): shrink it or send image_url"
        )
    return {"event": "update-image", "image_base64": base64.b64encode(data).decode("ascii")}


def _text(name: str, value: object, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, not {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    if not is_clean_text(value):
        raise ValueError(f"{name} is not valid text (a NUL or a lone surrogate)")
    return value


def _usable_id(value: Any) -> TypeGuard[str]:
    """A session id we can put in a URL and a database: clean, non-blank, not absurdly long."""
    return (
        isinstance(value, str)
        and bool(value.strip())
        and len(value) <= MAX_SESSION_ID_CHARS
        and is_clean_text(value)
    )


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _usable_url(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip()) and is_clean_text(value)


def _encode_png(image: AgentImage, name: str = "agent_image") -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    elif callable(getattr(image, "save", None)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise TypeError(
            f"{name} must be PNG bytes or an image with .save(fp, format='PNG'), "
            f"not {type(image).__name__}"
        )
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{name} bytes are not a PNG image: encode it as PNG first")
    return data


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class LemonSliceClient(AsyncResource):
    """Async client for LemonSlice sessions, a drop-in for pipecat's ``LemonSliceApi``.

    ``session``: an ``aiohttp.ClientSession`` to borrow (never closed here); without one the client
    creates its own on first use and closes it in ``close()`` / ``async with``. ``trace_configs``
    go to that own session (a borrowed one keeps its own); each request carries
    ``trace_request_ctx={"endpoint": "create" | "get" | "list" | "terminate" | "control"}``.
    """

    LEMONSLICE_URL: ClassVar[str] = config.DEFAULT_API_URL

    def __init__(
        self,
        api_key: str | None = None,
        session: aiohttp.ClientSession | None = None,
        *,
        api_url: str | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        clock: Clock | None = None,
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
        control_origins: Sequence[str] | None = None,
    ) -> None:
        """``control_origins``: origins (``https://host[:port]``) besides the API URL's that a
        ``control_url`` may point to; None reads ``LEMONSLICE_CONTROL_ORIGINS``
        (comma-separated)."""
        key = (api_key if api_key is not None else os.environ.get(config.ENV_API_KEY, "")).strip()
        if not key:
            raise ConfigurationError(
                f"no LemonSlice API key: pass api_key= or set {config.ENV_API_KEY}"
            )
        if any(ch.isspace() or not ch.isprintable() for ch in key):
            raise ConfigurationError(
                f"the LemonSlice API key contains whitespace or control characters: "
                f"check {config.ENV_API_KEY}"
            )
        url = api_url or os.environ.get(config.ENV_API_URL) or self.LEMONSLICE_URL
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"LemonSlice API URL {url!r} must start with http:// or https://: "
                f"check {config.ENV_API_URL}"
            )
        if control_origins is None:
            control_origins = config.split_list(os.environ.get(config.ENV_CONTROL_ORIGINS, ""))
        origins = set()
        for given in control_origins:
            origin = _origin(given)
            if origin is None:
                raise ConfigurationError(
                    f"control origin {given!r} is not an http(s) URL such as "
                    f"https://control.example.com: check {config.ENV_CONTROL_ORIGINS}"
                )
            origins.add(origin)
        self._key = _Secret(key)
        self._api_url = url
        self._control_origins = frozenset(origins)
        # where the key may go, parsed once; and the control URL last found on it (a terminate
        # checks its URL twice: ``stored_control_url``, then ``end_session``)
        self._trusted = frozenset({_origin(url), *origins})
        self._last_trusted: str | None = None
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self.clock: Clock = clock or SYSTEM_CLOCK
        self._trace_configs = list(trace_configs)

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        """The sessions collection URL, without a trailing slash."""
        return self._api_url

    async def close(self) -> None:
        """Close the aiohttp session if this client created it; a borrowed one stays open."""
        self._closed = True
        session, self._session = self._session, None
        if self._owns_session and session is not None and not session.closed:
            await session.close()

    def __repr__(self) -> str:
        owner = "owned" if self._owns_session else "borrowed"
        return f"LemonSliceClient(api_url={self._api_url!r}, api_key='***', session={owner})"

    def key_matches(self, given: str) -> bool:
        """Whether ``given`` is this client's API key, compared in constant time."""
        return hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), self._key.reveal().encode()
        )

    def control_url_for(self, session_id: str) -> str:
        """The documented control URL of a session: ``{api_url}/{session_id}/control``."""
        return _control_url(self._api_url, session_id)

    def check_control_url(self, control_url: str, *, api_url: str | None = None) -> str:
        """``control_url`` if the key may go there: the origin (scheme, host, port) of the API
        URL (or of ``api_url``, a per-call override) or of a configured control origin.
        Raises ``UntrustedURLError`` otherwise, before anything is sent."""
        if api_url is None and type(control_url) is str and control_url == self._last_trusted:
            return control_url
        trusted = self._trusted if api_url is None else self._trusted | {_origin(api_url)}
        origin = _origin(control_url) if isinstance(control_url, str) else None
        if origin is None or origin not in trusted:
            shown = excerpt(repr(control_url), 120)
            raise UntrustedURLError(
                f"control_url {shown} is not on the LemonSlice API's origin "
                f"({_origin_text(self._api_url)}): refused, the API key is sent only there; if "
                f"LemonSlice really serves control requests from it, add its origin to "
                f"{config.ENV_CONTROL_ORIGINS}"
            )
        if api_url is None:  # the trusted set never changes: the same text passes again
            self._last_trusted = control_url
        return control_url

    def stored_control_url(self, session_id: str, control_url: str | None) -> str:
        """Where to send a stored session's controls: its recorded ``control_url``, unless that
        is missing or off the API's origin (a row recorded before origins were checked); then
        the documented one, so the session still ends and the key still goes only to
        LemonSlice."""
        if control_url:
            try:
                return self.check_control_url(control_url)
            except UntrustedURLError:
                logger.warning(
                    "session %s has a control_url off the API's origin: using the documented one",
                    session_id,
                    extra={"session_id": session_id},
                )
        return self.control_url_for(session_id)

    # --- the pipecat surface --------------------------------------------------------------------

    async def create_session(self, **options: Unpack[CreateArguments]) -> dict[str, Any]:
        """Start a session; returns the server's answer with ``session_id``, ``room_url`` (may be
        None) and ``control_url`` (derived when the server leaves it out, as the livekit flavour
        always does).

        ``options``: ``CreateArguments`` (pipecat 1.14's keyword arguments, then LemonSlice's
        other documented fields; see ``build_create_request``), checked by mypy. Raises
        ``CreateOutcomeUnknown`` when the request may have started a session but the answer was
        lost or unusable: do not call again blindly, reconcile instead.
        """
        built = CreateOptions.of(options)
        return await self._send_create(built.request(), built.api_url)

    async def _send_create(self, request: CreateRequest, api_url: str | None) -> dict[str, Any]:
        """POST a request built by ``CreateOptions.request`` (the manager validates it before
        recording the intent, then sends it as built)."""
        url = api_url or self._api_url  # as given, like pipecat; derived URLs strip the slash
        call = _Call(_Op.CREATE, "POST", url, _secrets_of(request.payload))

        def handle(answer: _Answer) -> dict[str, Any]:
            return self._created(call, answer)

        text, image = request.text, request.image
        if image is None:
            return await self._call(call, handle, body=text.encode())
        return await self._call(call, handle, form=lambda: _create_form(text, image))

    async def end_session(self, session_id: str, control_url: str | None = None) -> bool:
        """Terminate a session. True: ended now. False: the server says it is already gone."""
        _check_session_id(session_id)
        url = self.check_control_url(control_url) if control_url else None
        url = url or self.control_url_for(session_id)
        call = _Call(_Op.TERMINATE, "POST", url)

        def handle(answer: _Answer) -> bool:
            if answer.status in (404, 410):
                logger.info(
                    "LemonSlice session %s was already gone",
                    session_id,
                    extra={"session_id": session_id, "status": answer.status},
                )
                return False
            if not answer.ok:
                raise self._status_error(call, answer)
            data = _loads_or_none(answer.body)
            if isinstance(data, dict) and data.get("success") is False:
                raise InvalidResponseError(
                    "LemonSlice answered the terminate with success=false: the session may "
                    "still be live, retry later",
                    **self._error_fields(call, answer),
                )
            logger.debug(
                "ended LemonSlice session %s", session_id, extra={"session_id": session_id}
            )
            return True

        return await self._call(call, handle, body=TERMINATE_BODY)

    # --- raw requests (the recording proxy, sessionmgr/proxy.py) ---------------------------------

    async def create_session_raw(
        self, body: bytes, content_type: str, *, api_url: str | None = None
    ) -> RawAnswer:
        """POST a create body byte-for-byte (JSON or multipart, as the caller built it), under
        create's retry rules; the answer as it came, with ``session`` set when it is a usable
        create answer (``control_url`` derived when the server left it out).

        A 4xx or an exhausted 429/503 comes back as the answer (``session`` None): nothing was
        created. ``CreateOutcomeUnknown`` when the answer was lost (timeout, dropped connection);
        a 5xx other than 503 or an unusable 2xx comes back with ``unknown`` True.
        """
        url = api_url or self._api_url
        call = _Call(_Op.CREATE, "POST", url)
        last: list[_Answer] = []

        def handle(answer: _Answer) -> RawAnswer:
            last[:] = [answer]
            try:
                session = self._created(call, answer)
            except CreateOutcomeUnknown:
                return RawAnswer.of(answer, unknown=True)
            except (RateLimitedError, ServerError):
                raise  # 429 / 503: provably not taken, retried by _call
            except LemonSliceError:
                return RawAnswer.of(answer)
            return RawAnswer.of(answer, session=session)

        try:
            return await self._call(call, handle, body=body, content_type=content_type)
        except (RateLimitedError, ServerError):
            if not last:
                raise
            return RawAnswer.of(last[0])

    async def forward(
        self, method: str, url: str, *, body: bytes | None = None, content_type: str | None = None
    ) -> RawAnswer:
        """One request with the configured key, answered as it came (no retries: the caller
        decides); ``TransportError`` when no answer came."""
        op = _Op.CONTROL if method == "POST" else _Op.GET
        call = _Call(op, method, url)
        return await self._call(
            call,
            RawAnswer.of,
            body=body,
            content_type=content_type or "application/json",
            retry=False,
        )

    # --- control events ------------------------------------------------------------------------
    #
    # Each is idempotent (sending it twice leaves the session as sending it once), so it follows
    # the read/terminate retry policy. 404/410 raises NotFoundError: the session is gone.
    # ``control_url`` None: the documented one, derived from the session_id.

    async def update_image(
        self,
        session_id: str,
        control_url: str | None,
        *,
        image_url: str | None = None,
        image: AgentImage | None = None,
    ) -> None:
        """Show another image: ``image_url``, or ``image`` (PNG bytes or an object with
        ``.save(fp, format="PNG")``) sent base64; a PNG over ``MAX_IMAGE_BYTES`` is refused
        before sending."""
        await self.send_control_event(
            session_id, control_url, image_event(image_url=image_url, image=image)
        )

    async def update_agent_prompt(
        self, session_id: str, control_url: str | None, agent_prompt: str
    ) -> None:
        """Replace the prompt that steers the avatar while it speaks."""
        await self.send_control_event(session_id, control_url, agent_prompt_event(agent_prompt))

    async def update_idle_prompt(
        self, session_id: str, control_url: str | None, idle_prompt: str
    ) -> None:
        """Replace the prompt that steers the avatar while it listens."""
        await self.send_control_event(session_id, control_url, idle_prompt_event(idle_prompt))

    async def trigger_action(self, session_id: str, control_url: str | None, name: str) -> None:
        """Trigger a pose or action by name (the wire shape: ``trigger_event``)."""
        await self.send_control_event(session_id, control_url, trigger_event(name))

    async def reset_idle_timeout(self, session_id: str, control_url: str | None) -> None:
        """Restart LemonSlice's idle clock for this session (it otherwise only sees the avatar
        speak)."""
        await self.send_control_event(session_id, control_url, {"event": RESET_IDLE_EVENT})

    async def send_control_event(
        self, session_id: str, control_url: str | None, event: Mapping[str, Any]
    ) -> None:
        """POST one control event body (``{"event": NAME, ...}``, as built by the methods above,
        ``image_event`` or ``trigger_event``) to the session's control URL."""
        _check_session_id(session_id)
        url = control_url or self.control_url_for(session_id)
        call = _Call(_Op.CONTROL, "POST", url)
        name = event["event"]

        def handle(answer: _Answer) -> None:
            if not answer.ok:
                raise self._status_error(call, answer)
            data = _loads_or_none(answer.body)
            if isinstance(data, dict) and data.get("success") is False:
                raise InvalidResponseError(
                    f"LemonSlice answered {name} with success=false: not applied, retry later",
                    **self._error_fields(call, answer),
                )
            logger.debug(
                "sent %s to LemonSlice session %s",
                name,
                session_id,
                extra={"session_id": session_id, "event": name},
            )

        await self._call(call, handle, body=json.dumps(event).encode())

    async def wait_until_active(
        self,
        session_id: str,
        *,
        timeout: float = WAIT_TIMEOUT,  # noqa: ASYNC109 - the documented name; polls, never cut
        on_status: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """Poll ``get_session`` with backoff until the session is ACTIVE; returns that answer.

        A QUEUED session (a cold start, up to ~2.5 minutes) is waited on; a final status raises
        ``SessionNotLive``; still not ACTIVE after ``timeout`` seconds raises
        ``ActivationTimeout``. ``on_status`` sees every answer (the manager records it).
        """
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        start = self.clock.monotonic()
        delay = WAIT_POLL_FIRST
        while True:
            answer = await self.get_session(session_id)
            if on_status is not None:
                await on_status(answer)
            status = answer["session_status"]
            if status == "ACTIVE":
                return answer
            if status in REMOTE_FINAL:
                raise SessionNotLive(f"LemonSlice session {session_id} ended ({status})")
            left = timeout - (self.clock.monotonic() - start)
            if left <= 0:
                raise ActivationTimeout(
                    f"LemonSlice session {session_id} is still {status} after {timeout:g} s: "
                    "wait longer, or end it",
                    last_status=status,
                )
            await self.clock.sleep(min(delay, left))
            delay = min(delay * 2, WAIT_POLL_CAP)

    # --- beyond pipecat -------------------------------------------------------------------------

    async def get_session(self, session_id: str) -> dict[str, Any]:
        """``{"session_status": ..., "cost": ...}``; NotFoundError if the server has no such id."""
        _check_session_id(session_id)
        call = _Call(_Op.GET, "GET", f"{self._api_url}/{quote(session_id, safe='')}")

        def handle(answer: _Answer) -> dict[str, Any]:
            if not answer.ok:
                raise self._status_error(call, answer)
            data = self._json_object(call, answer)
            if not isinstance(data.get("session_status"), str):
                raise InvalidResponseError(
                    "LemonSlice's session status answer has no 'session_status' string",
                    **self._error_fields(call, answer),
                )
            return data

        return await self._call(call, handle)

    async def list_sessions(self, *, limit: int = LIST_PAGE_SIZE) -> AsyncIterator[dict[str, Any]]:
        """Every session the key can see, page by page (``limit`` per page), each one once."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int (sessions per page), got {limit!r}")
        seen: set[str] = set()
        for page in range(1, MAX_LIST_PAGES + 1):
            call = _Call(_Op.LIST, "GET", f"{self._api_url}?page={page}&limit={limit}")
            sessions, more = await self._call(
                call, functools.partial(self._page, call, limit=limit)
            )
            for item in sessions:
                if item["session_id"] not in seen:  # a session created mid-listing shifts pages
                    seen.add(item["session_id"])
                    yield item
            if not more:
                return
        raise InvalidResponseError(
            f"LemonSlice's session list did not end after {MAX_LIST_PAGES} pages: report this",
            method="GET",
            url=self._api_url,
        )

    # --- answers --------------------------------------------------------------------------------

    def _created(self, call: _Call, answer: _Answer) -> dict[str, Any]:
        if not answer.ok:
            error = self._status_error(call, answer)
            if isinstance(error, ServerError) and answer.status != 503:
                raise self._outcome_unknown(
                    call, f"create answered HTTP {answer.status}", answer
                ) from error
            if isinstance(error, NotFoundError):  # no session is involved yet: a wrong URL
                raise ClientRequestError(
                    f"LemonSlice has no create endpoint at this URL: check {config.ENV_API_URL}",
                    **self._error_fields(call, answer),
                ) from None
            raise error
        try:
            data = self._json_object(call, answer)
            session_id = data.get("session_id")
            if not _usable_id(session_id):
                raise InvalidResponseError(
                    "LemonSlice's create answer has no usable 'session_id' string",
                    **self._error_fields(call, answer),
                )
        except InvalidResponseError as exc:
            raise self._outcome_unknown(
                call, f"create accepted but the answer is unusable ({exc.args[0]})", answer
            ) from exc
        base = call.url
        result = dict(data)
        room_url = data.get("room_url")
        result["room_url"] = room_url if _usable_url(room_url) else None
        control_url = data.get("control_url")
        if not _usable_url(control_url):
            result["control_url"] = _control_url(base, session_id)
        else:
            try:
                self.check_control_url(str(control_url), api_url=base)
            except UntrustedURLError as exc:
                # The session exists; its intent stays pending and reconcile ends it at the
                # documented control URL. The foreign one is never called.
                raise self._outcome_unknown(call, f"create answered a {exc}", answer) from exc
        logger.debug("created LemonSlice session %s", session_id, extra={"session_id": session_id})
        return result

    def _page(self, call: _Call, answer: _Answer, limit: int) -> tuple[list[dict[str, Any]], bool]:
        if not answer.ok:
            raise self._status_error(call, answer)
        data = self._json_object(call, answer)
        sessions = data.get("sessions")
        if not isinstance(sessions, list) or not all(
            isinstance(s, dict) and _usable_id(s.get("session_id")) for s in sessions
        ):
            raise InvalidResponseError(
                "LemonSlice's session list has no 'sessions' array of objects with a usable "
                "'session_id'",
                **self._error_fields(call, answer),
            )
        pagination = data.get("pagination")
        if not isinstance(pagination, dict):
            pagination = {}
        page, total_pages = pagination.get("page"), pagination.get("total_pages")
        if isinstance(pagination.get("has_more"), bool):
            more = pagination["has_more"]
        elif _is_int(page) and _is_int(total_pages):
            more = page < total_pages
        else:  # no usable pagination: a full page may have a next one
            more = len(sessions) >= limit
        return sessions, bool(more and sessions)

    def _json_object(self, call: _Call, answer: _Answer) -> dict[str, Any]:
        try:
            data = json.loads(answer.body)
        except (ValueError, RecursionError):  # RecursionError: nested past the parser's limit
            head = answer.body.lstrip()[:1]
            what = "an HTML page" if head == b"<" else "an empty body" if not head else "non-JSON"
            raise InvalidResponseError(
                f"LemonSlice answered {what} instead of JSON: check the API URL",
                **self._error_fields(call, answer),
            ) from None
        if not isinstance(data, dict):
            raise InvalidResponseError(
                f"LemonSlice answered JSON {type(data).__name__} where an object was expected",
                **self._error_fields(call, answer),
            )
        return data

    def _status_error(self, call: _Call, answer: _Answer) -> LemonSliceError:
        status = answer.status
        fields = self._error_fields(call, answer)
        if status in (401, 403):
            return AuthError(
                f"LemonSlice rejected the API key: check {config.ENV_API_KEY}", **fields
            )
        if status in (404, 410):
            return NotFoundError(
                "LemonSlice has no such session (ended or never existed)", **fields
            )
        if status == 402:
            return NoCreditsError(
                "LemonSlice refused: no subscription or not enough credits (top up the account)",
                **fields,
            )
        if status == 429:
            retry_after = parse_retry_after(answer.retry_after, self.clock.now())
            hint = f"retry after {retry_after:g} s" if retry_after is not None else "retry later"
            return RateLimitedError(
                f"LemonSlice rate limit hit: {hint}", retry_after=retry_after, **fields
            )
        if status >= 500:
            return ServerError("LemonSlice server error: retry later", **fields)
        if 300 <= status < 400:
            to = f" to {answer.location}" if answer.location else ""
            return ClientRequestError(
                f"LemonSlice answered a redirect{to}: set {config.ENV_API_URL} to the final URL",
                **fields,
            )
        if status >= 400:
            return ClientRequestError(
                "LemonSlice rejected the request: check the arguments", **fields
            )
        return InvalidResponseError(f"LemonSlice answered unexpected HTTP {status}", **fields)

    def _error_fields(self, call: _Call, answer: _Answer | None = None) -> dict[str, Any]:
        body = None
        if answer is not None:
            body = _scrub(
                answer.body.decode("utf-8", "replace"), (self._key.reveal(), *call.secrets)
            )
        return {
            "status": answer.status if answer else None,
            "body": body,
            "method": call.method,
            "url": call.url,
        }

    def _outcome_unknown(
        self, call: _Call, what: str, answer: _Answer | None = None
    ) -> CreateOutcomeUnknown:
        logger.warning(
            "LemonSlice create outcome unknown: %s",
            what,
            extra={"method": call.method, "url": call.url},
        )
        return CreateOutcomeUnknown(
            f"{what}: a session may exist; reconcile (`sessionmgr reconcile`) instead of "
            f"creating again",
            **self._error_fields(call, answer),
        )

    # --- transport and retries ------------------------------------------------------------------

    async def _call(
        self,
        call: _Call,
        handle: Callable[[_Answer], T],
        *,
        body: bytes | None = None,
        form: Callable[[], aiohttp.FormData] | None = None,
        content_type: str = "application/json",
        retry: bool = True,
    ) -> T:
        """One logical call: attempts, each answer through ``handle``, retries per the rules."""
        policy = self.retry
        start = self.clock.monotonic()
        attempt = 0
        while True:
            attempt += 1
            elapsed = self.clock.monotonic() - start
            # A create cut short by the deadline would turn a clean answer into an unknown one.
            budget = None if call.op is _Op.CREATE else policy.remaining(elapsed)
            try:
                answer = await self._send(
                    call, self.timeouts.for_attempt(budget), body, form, content_type
                )
                return handle(answer)
            except LemonSliceError as exc:
                if not retry or not _retryable(call.op, exc):
                    raise
                elapsed = self.clock.monotonic() - start
                retry_after = exc.retry_after if isinstance(exc, RateLimitedError) else None
                delay = policy.delay(attempt, retry_after, elapsed=elapsed)
                if not policy.should_retry(attempt, elapsed=elapsed, delay=delay):
                    raise
                logger.info(
                    "LemonSlice %s %s failed (%s); retry %d of %d in %.3f s",
                    call.method,
                    call.url,
                    type(exc).__name__,
                    attempt,
                    policy.attempts - 1,
                    delay,
                    extra={
                        "method": call.method,
                        "url": call.url,
                        "status": exc.status,
                        "attempt": attempt,
                        "delay": delay,
                        "error": type(exc).__name__,
                    },
                )
            await self.clock.sleep(delay)

    async def _send(
        self,
        call: _Call,
        limits: aiohttp.ClientTimeout,
        body: bytes | None,
        form: Callable[[], aiohttp.FormData] | None,
        content_type: str = "application/json",
    ) -> _Answer:
        headers = {API_KEY_HEADER: self._key.reveal()}
        data: aiohttp.FormData | bytes | None = None
        if form is not None:
            data = form()  # a FormData can be sent once: a fresh one per attempt
        elif body is not None:
            headers["Content-Type"] = content_type
            data = body
        try:
            async with self._http().request(
                call.method,
                call.url,
                headers=headers,
                data=data,
                timeout=limits,
                allow_redirects=False,
                trace_request_ctx={"endpoint": call.op.value},
            ) as resp:
                raw = await _read_limited(resp, MAX_ANSWER_BYTES)
                if raw is None:
                    what = f"LemonSlice answered more than {MAX_ANSWER_BYTES} bytes"
                    if call.op is _Op.CREATE:
                        raise self._outcome_unknown(call, what)
                    raise InvalidResponseError(
                        f"{what}: refused unread; check the API URL",
                        status=resp.status,
                        method=call.method,
                        url=call.url,
                    )
                return _Answer(
                    resp.status,
                    raw,
                    resp.headers.get("Retry-After"),
                    resp.headers.get("Location"),
                    resp.headers.get("Content-Type"),
                )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # Nothing was sent: safe to retry even a create.
            raise TransportError(
                f"could not connect to LemonSlice ({_describe(exc)}): check the network and "
                f"{config.ENV_API_URL}",
                method=call.method,
                url=call.url,
            ) from exc
        except TimeoutError as exc:
            what = f"no answer within {limits.total:g} s"
            if call.op is _Op.CREATE:
                raise self._outcome_unknown(call, what) from exc
            raise TransportError(
                f"LemonSlice gave {what}: retry later or raise the timeout",
                method=call.method,
                url=call.url,
            ) from exc
        except aiohttp.ClientError as exc:
            what = f"the connection dropped before the answer ({_describe(exc)})"
            if call.op is _Op.CREATE:
                raise self._outcome_unknown(call, what) from exc
            raise TransportError(f"{what}: retry later", method=call.method, url=call.url) from exc

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("this LemonSliceClient is closed: create a new one")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
                trace_configs=self._trace_configs or None,
            )
        return self._session


def _retryable(op: _Op, exc: LemonSliceError) -> bool:
    if isinstance(exc, CreateOutcomeUnknown):
        return False
    if op is _Op.CREATE:
        # Provably not taken: nothing was sent, or the server said "not now".
        return isinstance(exc, TransportError | RateLimitedError) or (
            isinstance(exc, ServerError) and exc.status == 503
        )
    return isinstance(exc, TransportError | ServerError | RateLimitedError)


def _create_form(payload_text: str, image: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("payload", payload_text, content_type="application/json")
    form.add_field("image", image, filename="image.png", content_type="image/png")
    return form


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or None once it passes ``limit`` bytes (nothing more is read or kept)."""
    if resp.content_length is not None and resp.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of an http(s) URL, default ports filled in; None for anything else."""
    try:
        parsed = URL(url.strip())
    except (ValueError, TypeError):
        return None
    if parsed.scheme.lower() not in ("http", "https") or not parsed.host:
        return None
    return parsed.scheme.lower(), parsed.host.lower(), parsed.port


def _origin_text(url: str) -> str:
    origin = _origin(url)
    return f"{origin[0]}://{origin[1]}:{origin[2]}" if origin else url


def _control_url(api_url: str, session_id: str) -> str:
    _check_session_id(session_id)
    return f"{api_url.rstrip('/')}/{quote(session_id, safe='')}/control"


def _check_session_id(session_id: str) -> None:
    if not isinstance(session_id, str) or not session_id.strip():
        raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")


def _secrets_of(payload: Mapping[str, Any]) -> tuple[str, ...]:
    """String values under token/secret/key-like keys, at any depth, to scrub from error bodies."""
    found: list[str] = []

    def walk(value: Any, sensitive: bool) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, sensitive or is_secret_key(k))
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v, sensitive)
        elif sensitive and isinstance(value, str) and len(value) >= MIN_SECRET_CHARS:
            found.append(value)

    walk(payload, False)
    return tuple(found)


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    """The body excerpt an error keeps, with any echoed secret blanked out."""
    return scrub(excerpt(text, limit=4096), secrets)  # bound the work before replacing


def _loads_or_none(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except (ValueError, RecursionError):
        return None


def _describe(exc: BaseException) -> str:
    return excerpt(str(exc) or type(exc).__name__, limit=120)
