"""The typed, immutable views of a session and its lifecycle events that the library hands out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any, TypeVar

from .states import LIVE_STATUSES, EndReason, SessionStatus


def iso_utc(moment: datetime) -> str:
    """The JSON form of a time everywhere: ISO 8601, UTC spelled ``Z``."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True, slots=True)
class SessionRecord:
    """One session as the database holds it. Never carries the API key or a token."""

    id: int  # local primary key
    session_id: str | None  # LemonSlice's id; None while pending
    status: SessionStatus
    agent_id: str | None
    agent_image_url: str | None
    agent_prompt: str | None
    idle_timeout: int | None  # what LemonSlice was told (seconds; negative = never)
    room_url: str | None
    control_url: str | None
    idle_window: float  # seconds of inactivity the reaper tolerates
    max_age: float | None  # seconds a session may live at most; None = no limit
    created_at: datetime
    updated_at: datetime
    last_activity_at: datetime
    deadline: datetime | None  # min(last_activity + idle_window, created + max_age)
    ended_at: datetime | None
    end_reason: EndReason | None
    remote_status: str | None
    cost: float | None
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    lease_owner: str | None
    lease_until: datetime | None
    metadata: dict[str, Any]
    model: str | None = None  # the LemonSlice model asked for; None: the server's default
    transport_type: str = "daily"  # "daily" (pipecat) or "livekit"

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: stable field names, ISO-8601 UTC times."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, datetime):
                value = iso_utc(value)
            out[field.name] = value
        return out


R = TypeVar("R")


def _builder(cls: type[R]) -> Callable[[Sequence[Any]], R]:
    """A constructor of ``cls`` (a frozen slotted dataclass) from all its field values in order,
    ~5x cheaper than its ``__init__``, for the reads that build a page of records per call.

    A frozen dataclass sets each field through ``object.__setattr__`` (~80 ns a field); this
    fills an unfrozen twin with the same slots (plain slot stores) and then makes it a ``cls``
    (``__class__`` assignment: same layout, so CPython allows it). The result is an ordinary
    ``cls``: frozen, equal, hashed, ``replace``-able and printed as one built by ``cls(...)``
    (tests/test_queries.py holds them equal). ``cls`` must have no ``__post_init__``: it is
    skipped."""
    names = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    if getattr(cls, "__post_init__", None) is not None or cls.__slots__ != names:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} cannot be built without its __init__")
    twin = type(f"_{cls.__name__}Twin", (), {"__slots__": names})
    source = (
        "def build(values):\n"
        "    record = new(twin)\n"
        f"    ({''.join(f'record.{name}, ' for name in names)}) = values\n"
        "    set_class(record, '__class__', cls)\n"
        "    return record\n"
    )
    scope: dict[str, Any] = {"new": object.__new__, "twin": twin, "set_class": object.__setattr__}
    scope["cls"] = cls
    exec(source, scope)  # generated from the field names only, as dataclasses does
    build: Callable[[Sequence[Any]], R] = scope["build"]
    build.__doc__ = f"A {cls.__name__} from its {len(names)} field values in field order."
    return build


build_record = _builder(SessionRecord)


@dataclasses.dataclass(frozen=True, slots=True)
class SessionEvent:
    """One transition of one session, appended in the same transaction as the transition."""

    id: int
    session_pk: int
    at: datetime
    from_status: SessionStatus | None  # None for the row's creation
    to_status: SessionStatus
    reason: str | None
    detail: str | None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["at"] = iso_utc(self.at)
        return out


# --- secrets ---------------------------------------------------------------------------------

SECRET_KEY_PARTS = ("token", "secret", "key")  # a key containing one of these holds a secret
REDACTED = "***"
MIN_SECRET_CHARS = 4  # shorter values are not scrubbed from text: they would blank out words


def scrub(text: str, secrets: Iterable[str | None], *, one_line: bool = False) -> str:
    """``text`` with every known secret blanked out as ``***`` (a value shorter than
    ``MIN_SECRET_CHARS`` is left: it would blank out words); ``one_line`` also folds it onto one
    line, for an error line. The one redaction of free text: CLI and API errors, client bodies."""
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_CHARS:
            text = text.replace(secret, REDACTED)
    return " ".join(text.split()) if one_line else text


def is_secret_key(key: object) -> bool:
    low = str(key).lower()
    return any(part in low for part in SECRET_KEY_PARTS)


def redact(mapping: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy whose values under secret-looking keys (token/secret/key, any case, at any depth)
    are ``"***"``: what may be stored, logged or printed."""
    return {
        key: REDACTED if is_secret_key(key) else _redact_value(value)
        for key, value in (mapping or {}).items()
    }


def _redact_value(value: Any) -> Any:
    """``redact`` for any JSON-like value: objects inside lists inside lists are walked too."""
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def is_clean_text(value: str) -> bool:
    """No NUL and no lone surrogate: text that encodes as UTF-8 and both databases can store."""
    if "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unclean_text(value: Any) -> str | None:
    """The first string in a JSON-like value (keys included, at any depth) that is not clean
    text (see ``is_clean_text``), or None when all are."""
    if isinstance(value, str):
        return None if is_clean_text(value) else value
    if isinstance(value, Mapping):
        items: Iterable[Any] = (x for kv in value.items() for x in kv)
    elif isinstance(value, list | tuple):
        items = value
    else:
        return None
    return next((bad for item in items if (bad := unclean_text(item)) is not None), None)


# --- admin queries ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SessionFilter:
    """What ``SessionRepository.list`` selects; every field narrows, None/empty means any."""

    statuses: Sequence[SessionStatus] | None = None
    agent_id: str | None = None
    created_after: datetime | None = None  # inclusive
    created_before: datetime | None = None  # exclusive
    meta: Mapping[str, str] = dataclasses.field(default_factory=dict)  # metadata tags, all equal
    idle_for: float | None = None  # seconds since the last activity, at least


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing; pass ``next_cursor`` as ``after`` for the next (None: last page)."""

    items: list[SessionRecord]
    next_cursor: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class DayStats:
    day: date  # UTC
    created: int
    ended: int
    credits: float | None  # cost of the sessions that ended that day; None when none is known


@dataclasses.dataclass(frozen=True, slots=True)
class Stats:
    """Counts and figures over the whole table and the last ``days`` UTC days."""

    by_status: dict[str, int]
    live: int  # pending + active + ending
    oldest_live: SessionRecord | None
    per_day: list[DayStats]  # oldest day first, every day of the window
    duration_p50: float | None  # seconds, sessions ended in the window
    duration_p95: float | None
    end_reasons: dict[str, int]  # sessions ended or failed in the window
    # sessions ended in the window: the credits their known costs sum to, and how many have no
    # cost yet (fetched after the end; until then the credits are a lower bound)
    credits_known: float = 0.0
    cost_unknown: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "by_status": dict(self.by_status),
            "live": self.live,
            "oldest_live": self.oldest_live.to_dict() if self.oldest_live else None,
            "per_day": [
                {
                    "day": d.day.isoformat(),
                    "created": d.created,
                    "ended": d.ended,
                    "credits": d.credits,
                }
                for d in self.per_day
            ],
            "duration_p50": self.duration_p50,
            "duration_p95": self.duration_p95,
            "end_reasons": dict(self.end_reasons),
            "credits_known": self.credits_known,
            "cost_unknown": self.cost_unknown,
        }
