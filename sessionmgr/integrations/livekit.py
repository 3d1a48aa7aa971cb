"""LiveKit's LemonSlice ``AvatarSession``, guarded by a ``SessionManager`` (extra
``sessionmgr[livekit]``).

The plugin (livekit-plugins-lemonslice) creates the session and never sends a terminate: it
removes the avatar from the room and leaves the session to LemonSlice's idle timeout. Use
``ManagedAvatarSession`` where you would use the plugin's ``AvatarSession`` (same arguments, plus
the manager)::

    avatar = ManagedAvatarSession(manager, agent_id="agent_abc123", metadata={"bot": "support"})
    await avatar.start(session, room=ctx.room)   # recorded: intent first, then the plugin's POST
    ...
    await avatar.aclose()                        # the plugin's close, then a terminate

The record carries the session id with the livekit transport and the documented control URL
(``{api_url}/{session_id}/control``); the reaper guards it until ``aclose()``, and ends it if
the worker dies. ``touch_on_activity(manager, avatar, agent_session)`` keeps idle reaping
meaningful while the user or the agent speaks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from livekit import rtc
from livekit.agents import (
    NOT_GIVEN,
    AgentSession,
    APIConnectOptions,
    APIStatusError,
    NotGivenOr,
)
from livekit.plugins.lemonslice import AvatarSession
from livekit.plugins.lemonslice.api import DEFAULT_API_URL

from ..client import _control_url
from ..errors import ClientRequestError, CreateOutcomeUnknown, SessionMgrError
from ..manager import SessionManager
from ..records import SessionRecord
from ..states import EndReason

logger = logging.getLogger(__name__)

# One attempt per create: the plugin would retry a create whose answer was lost, which can
# start a second paid session; a lost answer is left to sessionmgr's reconcile instead.
CREATE_OPTIONS = APIConnectOptions(max_retry=0)
END_DETAIL = "livekit AvatarSession.aclose"
ACTIVITY_STATES = frozenset({"speaking", "thinking", "listening"})  # agent/user state changes


class ManagedAvatarSession(AvatarSession):
    """The plugin's ``AvatarSession`` whose session is recorded, reaped and terminated.

    ``start()`` records an intent, runs the plugin's own ``start()`` (which POSTs the create),
    and records the answer; a rejected create marks the intent failed, a lost one leaves it
    ``pending`` for reconcile. ``aclose()`` runs the plugin's close, then ends the session
    through the manager. ``record`` is the session's record once started.
    """

    def __init__(
        self,
        manager: SessionManager,
        *,
        metadata: Mapping[str, Any] | None = None,
        idle_window: float | None = None,
        max_age: float | None = None,
        conn_options: APIConnectOptions = CREATE_OPTIONS,
        **kwargs: Any,
    ) -> None:
        super().__init__(conn_options=conn_options, **kwargs)
        self.manager = manager
        self.metadata = dict(metadata or {})
        self.idle_window = idle_window
        self.max_age = max_age
        self.record: SessionRecord | None = None
        self._own_http = False

    async def start(  # type: ignore[override]
        self,
        agent_session: AgentSession[Any],
        room: rtc.Room,
        *,
        livekit_url: NotGivenOr[str] = NOT_GIVEN,
        livekit_api_key: NotGivenOr[str] = NOT_GIVEN,
        livekit_api_secret: NotGivenOr[str] = NOT_GIVEN,
    ) -> str:
        plugin_start = super().start
        api_url = str(self._api_url) if self._api_url else DEFAULT_API_URL
        sent = self._watch_requests()

        async def send() -> dict[str, Any]:
            try:
                session_id = await plugin_start(
                    agent_session,
                    room,
                    livekit_url=livekit_url,
                    livekit_api_key=livekit_api_key,
                    livekit_api_secret=livekit_api_secret,
                )
            except APIStatusError as exc:
                if exc.retryable:  # 5xx, 429: a session may exist
                    raise CreateOutcomeUnknown(
                        f"LemonSlice answered HTTP {exc.status_code}", status=exc.status_code
                    ) from exc
                raise ClientRequestError(
                    f"LemonSlice rejected the create: {exc.message}", status=exc.status_code
                ) from exc
            except Exception as exc:
                if not sent:  # LemonSliceException, a bad token, ...: refused before the POST
                    raise ClientRequestError(
                        f"the LemonSlice plugin did not start: {type(exc).__name__}: {exc}"
                    ) from exc
                raise CreateOutcomeUnknown(f"the create's answer was lost: {exc}") from exc
            return {"session_id": session_id, "control_url": _control_url(api_url, session_id)}

        tags: dict[str, Any] = {"via": "livekit"}
        if room.name:
            tags["room"] = room.name
        try:
            self.record = await self.manager.create_with(
                send,
                agent_id=_given(self._agent_id),
                agent_image_url=_given(self._agent_image_url),
                agent_prompt=_given(self._agent_prompt),
                idle_timeout=_given(self._idle_timeout),
                model=_given(self._model),
                transport_type="livekit",
                idle_window=self.idle_window,
                max_age=self.max_age,
                metadata={**tags, **self.metadata},
            )
        except Exception:  # not on cancellation: the create goes on in the background
            await self._close_http()
            raise
        assert self.record.session_id is not None
        return self.record.session_id

    def _watch_requests(self) -> list[bool]:
        """The plugin's HTTP goes through a session of ours that notes when a request starts,
        so a failure before the create POST is told apart from one after it."""
        sent: list[bool] = []
        if self._http_session is None:

            async def started(*_: Any) -> None:
                sent.append(True)

            trace = aiohttp.TraceConfig()
            trace.on_request_start.append(started)
            self._http_session = aiohttp.ClientSession(trace_configs=[trace])
            self._own_http = True
        else:  # a session the caller gave: assume the worst (a failure may follow the POST)
            sent.append(True)
        return sent

    async def _close_http(self) -> None:
        if self._own_http and self._http_session is not None:
            await self._http_session.close()
            self._http_session = None
            self._own_http = False

    async def aclose(self) -> None:
        """The plugin's close (leaves any meeting, removes the avatar), then the terminate the
        plugin never sends. A failed terminate is not raised: the reaper retries it."""
        try:
            await super().aclose()
        finally:
            await self._close_http()
            record, self.record = self.record, None
            if record is not None:
                try:
                    result = await self.manager.end_session(
                        record.id, reason=EndReason.MANUAL, detail=END_DETAIL
                    )
                except SessionMgrError as exc:
                    logger.warning("could not end session %s: %s", record.session_id, exc)
                else:
                    if not result.changed:
                        logger.info("session %s: %s", record.session_id, result.message)


def touch_on_activity(
    manager: SessionManager, avatar: ManagedAvatarSession, agent_session: AgentSession[Any]
) -> None:
    """Touch the avatar's session whenever the user or the agent changes state (speaks, thinks,
    listens): ``manager.touch`` notes the time in memory, no I/O in the event handler."""

    def touch(event: Any) -> None:
        record = avatar.record
        if record is None or record.session_id is None:
            return
        if getattr(event, "new_state", None) not in ACTIVITY_STATES:
            return
        try:
            manager.touch(record.session_id)
        except SessionMgrError as exc:
            logger.debug("touch of %s dropped: %s", record.session_id, exc)

    agent_session.on("user_state_changed", touch)
    agent_session.on("agent_state_changed", touch)


def _given(value: Any) -> Any:
    """The plugin's NOT_GIVEN as None."""
    return None if value is NOT_GIVEN or value is None else value
