"""pipecat's ``LemonSliceTransport``, guarded by a ``SessionManager`` (``sessionmgr[pipecat]``).

pipecat's transport builds its own ``LemonSliceApi`` (``LemonSliceTransportClient._api``) and ends
its session only from ``stop()`` / ``cleanup()``: a crashed bot leaves it billing. One call puts a
manager behind it::

    transport = LemonSliceTransport(bot_name, session, api_key, session_request=request)
    api = manage_transport(transport, manager, metadata={"bot": "support"})
    task = PipelineTask(pipeline, observers=[SessionActivityObserver(manager, api)])

Every session the transport creates is then recorded (intent first), touched while the user or
the bot speaks, ended through the manager when pipecat ends it, and reaped when the bot dies.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Mapping
from typing import Any

from pipecat.frames.frames import (
    BotSpeakingFrame,
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    UserSpeakingFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.transports.lemonslice.api import LemonSliceApi
from pipecat.transports.lemonslice.transport import LemonSliceTransport, LemonSliceTransportClient

from ..client import CreateOptions
from ..errors import IntegrationError, SessionMgrError
from ..manager import SessionManager
from ..states import EndReason

logger = logging.getLogger(__name__)

BUILT_AGAINST = "1.14.0"  # the pipecat-ai whose private attribute manage_transport replaces
TOUCH_EVERY = 1.0  # seconds: touches of one session closer together than this are dropped
END_DETAIL = "pipecat end_session"
ACTIVITY_FRAMES: tuple[type, ...] = (  # frames that mean someone is speaking
    UserStartedSpeakingFrame,
    UserSpeakingFrame,
    UserStoppedSpeakingFrame,
    BotStartedSpeakingFrame,
    BotSpeakingFrame,
    BotStoppedSpeakingFrame,
    TranscriptionFrame,
    InterimTranscriptionFrame,
)


class ManagedLemonSliceApi:
    """pipecat's ``LemonSliceApi`` interface, backed by a ``SessionManager``: the same
    ``create_session`` keyword arguments and answer (``session_id``, ``room_url``,
    ``control_url``), and ``end_session(session_id, control_url)``.

    The manager's client (its key and URL) sends the requests; ``api_url`` still overrides the
    URL per create, as in pipecat. ``metadata``, ``idle_window`` and ``max_age`` go on every
    record. ``session_id`` is the live session this object created last (for the observer).
    """

    LEMONSLICE_URL = LemonSliceApi.LEMONSLICE_URL

    def __init__(
        self,
        manager: SessionManager,
        *,
        metadata: Mapping[str, Any] | None = None,
        idle_window: float | None = None,
        max_age: float | None = None,
    ) -> None:
        self.manager = manager
        self.metadata = dict(metadata or {})
        self.idle_window = idle_window
        self.max_age = max_age
        self.session_id: str | None = None

    def __repr__(self) -> str:
        return f"ManagedLemonSliceApi(session_id={self.session_id!r})"

    async def create_session(
        self,
        *,
        agent_image_url: str | None = None,
        agent_id: str | None = None,
        agent_image: Any = None,
        agent_prompt: str | None = None,
        idle_timeout: int | None = None,
        audio_sample_rate: int | None = None,
        model: str | None = None,
        daily_room_url: str | None = None,
        daily_token: str | None = None,
        connection_properties: dict[str, Any] | None = None,
        extra_properties: dict[str, Any] | None = None,
        api_url: str | None = None,
    ) -> dict[str, Any]:
        """Create through the manager (intent first); pipecat's answer shape."""
        record = await self.manager._create_session(
            CreateOptions.of(locals()),
            idle_window=self.idle_window,
            max_age=self.max_age,
            metadata=self.metadata,
        )
        self.session_id = record.session_id
        return {
            "session_id": record.session_id,
            "room_url": record.room_url,
            "control_url": record.control_url,
        }

    async def end_session(self, session_id: str, control_url: str | None = None) -> None:
        """End it through the manager. A terminate that fails is not raised: the session stays
        ``ending`` and the reaper retries it, so the bot's shutdown goes on."""
        result = await self.manager.end_session(
            session_id, reason=EndReason.MANUAL, detail=END_DETAIL
        )
        if self.session_id == session_id:
            self.session_id = None
        if not result.changed:
            logger.info("session %s: %s", session_id, result.message)


def manage_transport(
    transport: LemonSliceTransport | LemonSliceTransportClient,
    manager: SessionManager,
    *,
    metadata: Mapping[str, Any] | None = None,
    idle_window: float | None = None,
    max_age: float | None = None,
) -> ManagedLemonSliceApi:
    """Put ``manager`` behind ``transport``'s LemonSlice calls; call it before the pipeline runs.

    It replaces pipecat's private ``LemonSliceTransportClient._api``, so it checks first that the
    attribute is there and holds a ``LemonSliceApi``, and raises ``IntegrationError`` naming the
    installed pipecat version if not. Returns the ``ManagedLemonSliceApi`` (give it to
    ``SessionActivityObserver``).
    """
    client = transport._client if isinstance(transport, LemonSliceTransport) else transport
    if not isinstance(client, LemonSliceTransportClient) or not isinstance(
        getattr(client, "_api", None), LemonSliceApi
    ):
        raise IntegrationError(
            f"pipecat-ai {_pipecat_version()} has no LemonSliceTransport._client._api holding a "
            f"LemonSliceApi (sessionmgr was built against pipecat-ai {BUILT_AGAINST}): install "
            f"pipecat-ai=={BUILT_AGAINST}, or point the transport at `sessionmgr serve` with "
            "LemonSliceNewSessionRequest(api_url=...) instead"
        )
    if getattr(client, "_session_id", None) is not None:
        raise IntegrationError(
            "this transport already created its LemonSlice session: call manage_transport() "
            "before the pipeline runs"
        )
    tags = {"via": "pipecat", "bot": getattr(client, "_bot_name", None), **(metadata or {})}
    api = ManagedLemonSliceApi(
        manager,
        metadata={k: v for k, v in tags.items() if v is not None},
        idle_window=idle_window,
        max_age=max_age,
    )
    client._api = api  # type: ignore[assignment]
    return api


class SessionActivityObserver(BaseObserver):
    """Touches the session while the user or the bot speaks, so idle reaping means "nobody
    talked for the idle window". ``manager.touch`` only notes the time in memory (written at the
    next flush), and touches of one session are at most one per ``every`` seconds: no I/O and
    next to no work on the frame path.

    ``session``: a ``ManagedLemonSliceApi`` (its current session), a session_id, or a callable
    returning one (None: no session yet).
    """

    def __init__(
        self,
        manager: SessionManager,
        session: ManagedLemonSliceApi | str | Callable[[], str | None],
        *,
        every: float = TOUCH_EVERY,
    ) -> None:
        super().__init__(observe_every_push=False)
        self._manager = manager
        if isinstance(session, ManagedLemonSliceApi):
            api = session
            self._session_id: Callable[[], str | None] = lambda: api.session_id
        elif isinstance(session, str):
            self._session_id = lambda: session
        else:
            self._session_id = session
        self._every = every
        self._last: tuple[str, float] | None = None
        self.touches = 0  # touches handed to the manager (for tests and metrics)

    async def on_push_frame(self, data: FramePushed) -> None:
        if not isinstance(data.frame, ACTIVITY_FRAMES):
            return
        session_id = self._session_id()
        if session_id is None:
            return
        now = self._manager.clock.monotonic()
        last = self._last
        if last is not None and last[0] == session_id and now - last[1] < self._every:
            return
        try:
            self._manager.touch(session_id)
        except SessionMgrError as exc:  # a closed manager must not break the pipeline
            logger.debug("touch of %s dropped: %s", session_id, exc)
            return
        self._last = (session_id, now)
        self.touches += 1


def _pipecat_version() -> str:
    try:
        return importlib.metadata.version("pipecat-ai")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - imported above
        return "(unknown version)"
