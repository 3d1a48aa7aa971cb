"""The typed, immutable views of a session and its lifecycle events that the library hands out."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from .states import EndReason, SessionStatus


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

    @property
    def live(self) -> bool:
        return self.status in (SessionStatus.PENDING, SessionStatus.ACTIVE, SessionStatus.ENDING)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: stable field names, ISO-8601 UTC times."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, datetime):
                value = value.isoformat().replace("+00:00", "Z")
            out[field.name] = value
        return out


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
        out["at"] = self.at.isoformat().replace("+00:00", "Z")
        return out
