"""``SessionManager``: what a backend embeds to create, touch, end and adopt sessions.

Create is crash-safe: the intent row (``pending``) is written before the POST, under this
process's intent lease, renewed while the POST is in flight (``config.INTENT_LEASE``; renewing
rather than one lease for the client's whole create deadline keeps recovery fast: a killed creator
is presumed dead one lease after its last renewal, not a create deadline later). If the process
dies between LemonSlice starting a session and the answer being recorded, the lease runs out and
the next reaper tick anywhere (``reconcile.recover``) finds the session and ends it.
Everything else (touch, end, adopt) goes through the repository's one
conditional transition per change, and the reaper guards whatever the backend forgets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import EllipsisType
from typing import Any, Literal, TypeVar, Unpack

from . import config
from .checks import check_session_id
from .client import (
    RESET_IDLE_EVENT,
    TRANSPORT_TYPE,
    WAIT_TIMEOUT,
    AgentImage,
    CreateArguments,
    CreateOptions,
    LemonSliceClient,
    RawAnswer,
    agent_prompt_event,
    create_fields,
    idle_prompt_event,
    image_event,
    trigger_event,
)
from .clock import SYSTEM_CLOCK, Clock
from .config import ReaperConfig, Windows
from .errors import (
    ConfigurationError,
    CreateOutcomeUnknown,
    IntentTakenOver,
    LemonSliceError,
    NotFoundError,
    SessionMgrError,
    SessionNotLive,
)
from .leases import LeaseKeeper
from .reaper import Outcome, Reaper, new_owner
from .reconcile import ReconcileReport, reconcile
from .records import SessionRecord
from .repository import SessionRepository
from .resources import AsyncResource
from .states import REMOTE_FINAL, EndReason, SessionStatus
from .transitions import as_row, may_control, still_creating

logger = logging.getLogger(__name__)

SessionHook = Callable[[SessionRecord], Awaitable[None]]
CreateSend = Callable[[], Awaitable[dict[str, Any]]]  # sends one create POST, returns the answer
ReconciledHook = Callable[[ReconcileReport], None]
ActiveHook = Callable[[SessionRecord, float], None]  # the record, seconds from intent to ACTIVE
KeepaliveHook = Callable[[str, bool], None]  # session_id, whether reset-idle-timeout went through
OnExit = Literal["leave", "end"]

BACKGROUND_GRACE = 30.0  # seconds close() waits for creates whose callers were cancelled
KEEPALIVE_CONCURRENCY = 10  # reset-idle-timeout requests in flight at once


@dataclasses.dataclass(frozen=True, slots=True)
class EndResult:
    """What ``end_session`` did: ``changed`` is False when there was nothing to do."""

    record: SessionRecord
    changed: bool
    message: str


_Config = TypeVar("_Config", Windows, ReaperConfig)


def _with(settings: _Config, **given: Any) -> _Config:
    """``settings`` with the fields given (not None) replaced, validated again by the class."""
    changes = {name: value for name, value in given.items() if value is not None}
    return dataclasses.replace(settings, **changes) if changes else settings


class SessionManager(AsyncResource):
    """Sessions as durable records that are guaranteed to end.

    A session is named by its local ``id`` (an int) or LemonSlice's ``session_id`` (a string); a
    parameter called ``session_ref`` takes either: a local id or a LemonSlice session_id.

    ``on_exit="leave"`` (the default) leaves live sessions to the reaper of whichever process runs
    next, which suits redeploys; ``"end"`` ends the sessions this process created, reason
    ``shutdown``.

    Settings come grouped, as httpx groups ``Timeout`` and ``Limits``: ``windows=Windows(idle=60)``
    (how long sessions live) and ``reaper=ReaperConfig(interval=1)`` (how the reaper runs;
    ``reaper=False`` runs none), each validated when built. The older flat keywords
    (``idle_window=``, ``max_age=``, ``reaper_interval=``, ``reaper_concurrency=``,
    ``reaper_batch=``, ``lease=``, ``touch_flush_interval=``, ``reconcile_interval=``) still
    work and override the matching field.
    """

    def __init__(
        self,
        *,
        database_url: str | None = None,
        repository: SessionRepository | None = None,
        client: LemonSliceClient | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
        windows: Windows | None = None,
        reaper: bool | ReaperConfig = True,
        intent_lease: float = config.INTENT_LEASE,
        on_exit: OnExit = "leave",
        on_created: SessionHook | None = None,
        on_ended: SessionHook | None = None,
        on_reconciled: ReconciledHook | None = None,
        auto_upgrade: bool = False,
        clock: Clock | None = None,
        owner: str | None = None,
        server_keepalive: float | None = None,
        on_active: ActiveHook | None = None,
        on_keepalive: KeepaliveHook | None = None,
        # the flat keywords of earlier versions, each overriding its field of windows / reaper:
        idle_window: float | None = None,
        max_age: float | EllipsisType | None = ...,  # None: no limit; ...: not given
        reaper_interval: float | None = None,
        reaper_concurrency: int | None = None,
        reaper_batch: int | None = None,
        lease: float | None = None,
        touch_flush_interval: float | None = None,
        reconcile_interval: float | None = None,
    ) -> None:
        windows = _with(windows or Windows(), idle=idle_window)
        if max_age is not ...:
            windows = dataclasses.replace(windows, max_age=max_age)
        reaping = _with(
            reaper if isinstance(reaper, ReaperConfig) else ReaperConfig(),
            interval=reaper_interval,
            concurrency=reaper_concurrency,
            batch=reaper_batch,
            lease=lease,
            touch_flush_interval=touch_flush_interval,
            reconcile_interval=reconcile_interval,
        )
        if on_exit not in ("leave", "end"):
            raise ConfigurationError(f"on_exit must be 'leave' or 'end', not {on_exit!r}")
        if server_keepalive is not None and (
            isinstance(server_keepalive, bool)
            or not isinstance(server_keepalive, int | float)
            or not 0 < server_keepalive < float("inf")
        ):
            raise ConfigurationError(
                f"server_keepalive must be a positive number of seconds, not {server_keepalive!r}"
            )
        self._database_url = database_url
        self._repository = repository
        self._client = client
        self._owns_client = client is None
        self._api_key = api_key
        self._api_url = api_url
        self.windows = windows
        self.reaper_config = reaping
        self.idle_window = windows.idle
        self.max_age = windows.max_age
        self._reaper_enabled = reaper is not False
        self._reaper_interval = reaping.interval
        self._reaper_concurrency = reaping.concurrency
        self._reaper_batch = reaping.batch
        self._lease = reaping.lease
        self._touch_flush_interval = reaping.touch_flush_interval
        self.intent_lease = intent_lease
        self._intents: LeaseKeeper | None = None
        self._reconcile_interval = reaping.reconcile_interval
        self.on_exit = on_exit
        self.on_created = on_created
        self._on_ended = on_ended
        self.on_reconciled = on_reconciled
        self._auto_upgrade = auto_upgrade
        self.clock = clock or (repository.clock if repository else SYSTEM_CLOCK)
        self.owner = owner or new_owner()
        self._reaper: Reaper | None = None
        # local ids this process created and has not ended itself, kept only for on_exit="end" (a
        # long-running backend that leaves sessions to the reaper must not grow per create)
        self._created: set[int] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._opened = False
        # keep-alive: session_ids touched since their last reset-idle-timeout (an ordered set),
        # and when each was last reset (monotonic seconds)
        self.server_keepalive = server_keepalive
        self.on_active = on_active
        self.on_keepalive = on_keepalive
        self._keepalive_due: dict[str, None] = {}
        self._keepalive_last: dict[str, float] = {}
        self.keepalive_sent = 0
        self.keepalive_failures = 0

    # --- lifecycle -------------------------------------------------------------------------

    async def _enter(self) -> None:
        await self.open()

    async def open(self) -> None:
        if self._opened:
            return
        if self._repository is None:
            url = self._database_url or config.Settings.from_env().database_url
            self._repository = await SessionRepository.open(
                url, clock=self.clock, upgrade=self._auto_upgrade
            )
            self._owns_repository = True
        else:
            self._owns_repository = False
        try:
            if self._client is None:
                self._client = LemonSliceClient(self._api_key, api_url=self._api_url)
            self._reaper = Reaper(
                self._repository,
                self._client,
                owner=self.owner,
                interval=self._reaper_interval,
                concurrency=self._reaper_concurrency,
                batch=self._reaper_batch,
                lease=self._lease,
                clock=self.clock,
                on_ended=self.on_ended,
                touch_grace=self._touch_flush_interval,
            )
            self._intents = LeaseKeeper(
                self._repository, owner=self.owner, lease=self.intent_lease, clock=self.clock
            )
        except BaseException:
            if self._owns_repository:
                await self._repository.close()
            raise
        self._opened = True
        if self._reaper_enabled:
            self._reaper.start()
        # on its own interval, reaper or not: another process claims on the stored deadline one
        # flush interval late (touch_grace), so every touch must land within that interval
        self._loops.append(asyncio.create_task(self._flush_loop()))
        if self._reconcile_interval:
            self._loops.append(asyncio.create_task(self._reconcile_loop(self._reconcile_interval)))
        if self.server_keepalive is not None:
            self._loops.append(asyncio.create_task(self._keepalive_loop()))

    async def close(self, grace: float = BACKGROUND_GRACE) -> None:
        if not self._opened:
            return
        self._opened = False
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        # Creates whose callers were cancelled, and the ends they spawn once they complete.
        deadline = asyncio.get_running_loop().time() + grace
        while self._background:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            await asyncio.wait(set(self._background), timeout=left)
        if self.reaper.running:
            await self.reaper.stop()
        if self._intents is not None:
            await self._intents.close()
        if self.on_exit == "end":
            await self._end_own_sessions()
        try:
            await self.repository.flush_touches()
        finally:
            if self._owns_repository:
                await self.repository.close()
            if self._owns_client:
                await self.client.close()

    async def _end_own_sessions(self) -> None:
        for local_id in sorted(self._created):
            try:
                await self.end_session(local_id, reason=EndReason.SHUTDOWN)
            except SessionMgrError as exc:  # the reaper of the next process takes it over
                logger.warning("could not end session %s on exit: %s", local_id, exc)

    async def _flush_loop(self) -> None:
        while True:
            await self.clock.sleep(self._touch_flush_interval)
            try:
                await self.repository.flush_touches()
            except Exception:
                logger.exception("flushing touches failed; retrying")

    async def _reconcile_loop(self, interval: float) -> None:
        while True:
            try:
                report = await self.reconcile()
                if report.orphans:
                    logger.warning(
                        "reconcile found %d live remote session(s) unknown to this database; "
                        "run `sessionmgr reconcile --end-orphans` if they are ours",
                        len(report.orphans),
                    )
            except Exception:
                logger.exception("periodic reconcile failed; retrying next interval")
            await self.clock.sleep(interval)

    @property
    def on_ended(self) -> SessionHook | None:
        return self._on_ended

    @on_ended.setter
    def on_ended(self, hook: SessionHook | None) -> None:
        """Every end goes through the reaper, so an open manager's reaper takes the new hook."""
        self._on_ended = hook
        if self._reaper is not None:
            self._reaper.on_ended = hook

    # --- parts -----------------------------------------------------------------------------

    @property
    def repository(self) -> SessionRepository:
        if self._repository is None:
            raise SessionMgrError(
                "SessionManager is not open: use `async with SessionManager(...)`"
            )
        return self._repository

    @property
    def client(self) -> LemonSliceClient:
        if self._client is None:
            raise SessionMgrError(
                "SessionManager is not open: use `async with SessionManager(...)`"
            )
        return self._client

    @property
    def reaper(self) -> Reaper:
        if self._reaper is None:
            raise SessionMgrError(
                "SessionManager is not open: use `async with SessionManager(...)`"
            )
        return self._reaper

    # --- create ----------------------------------------------------------------------------

    async def create_session(
        self,
        *,
        idle_window: float | None = None,
        max_age: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        **options: Unpack[CreateArguments],
    ) -> SessionRecord:
        """Record the intent, POST, record the answer: what the reaper enforces and the tags,
        then the client's arguments (``CreateArguments``: pipecat 1.14's and LemonSlice's other
        documented fields, checked by mypy).

        The record keeps ``model`` and ``transport_type``, never a daily or livekit token.

        A 4xx marks the intent failed and re-raises. An unknown outcome (timeout after sending,
        a 5xx other than 503, a garbled answer) leaves it ``pending`` for reconcile and re-raises.
        If the caller is cancelled mid-create, the create still completes in the background and
        the session is ended at once, so no one is billed for a session nobody holds.
        """
        return await self._create_session(
            CreateOptions.of(options), idle_window=idle_window, max_age=max_age, metadata=metadata
        )

    async def _create_session(
        self,
        options: CreateOptions,
        *,
        idle_window: float | None = None,
        max_age: float | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> SessionRecord:
        """``create_session`` for options built once by its caller (the pipecat wrapper, the
        CLI): validated before the intent is written, then sent as built."""
        request = options.request()
        return await self.create_with(
            lambda: self.client._send_create(request, options.api_url),
            **options.record_fields(),
            idle_window=idle_window,
            max_age=max_age,
            metadata=metadata,
        )

    async def create_with(
        self,
        send: CreateSend,
        *,
        agent_id: str | None = None,
        agent_image_url: str | None = None,
        agent_prompt: str | None = None,
        idle_timeout: int | None = None,
        model: str | None = None,
        transport_type: str = TRANSPORT_TYPE,
        idle_window: float | None = None,
        max_age: float | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> SessionRecord:
        """The crash-safe create for a request someone else sends (the recording proxy, the
        LiveKit plugin): record the intent, ``await send()``, record its answer.

        ``send`` returns LemonSlice's answer (``session_id``, ``control_url``, optional
        ``room_url``) and raises ``CreateOutcomeUnknown`` when a session may exist, any other
        ``LemonSliceError`` when the server provably took nothing. The fields are what the
        record shows; never a token.
        """
        intent = await self.repository.record_intent(
            owner=self.owner,
            lease=self.intent_lease,
            agent_id=agent_id,
            agent_image_url=agent_image_url,
            agent_prompt=agent_prompt,
            idle_timeout=idle_timeout,
            idle_window=self.idle_window if idle_window is None else idle_window,
            max_age=max_age if max_age is not None else self.max_age,
            metadata=metadata,
            model=model,
            transport_type=transport_type,
        )
        return await self._run_create(intent, send)

    async def create_session_raw(
        self,
        body: bytes,
        content_type: str,
        *,
        idle_window: float | None = None,
        max_age: float | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> tuple[SessionRecord | None, RawAnswer]:
        """A create body sent byte-for-byte (the recording proxy), through ``create_with``.

        The body is parsed only to fill the record (agent, prompt, idle timeout, model, transport;
        never a token).
        Returns the record (None when LemonSlice refused) and LemonSlice's answer as it came;
        raises ``CreateOutcomeUnknown`` when no answer came (the intent stays pending) and
        ``InvalidArgument`` for a body that is not a create, before anything is written.
        """
        fields = create_fields(body, content_type)
        answers: list[RawAnswer] = []

        async def send() -> dict[str, Any]:
            answer = await self.client.create_session_raw(body, content_type)
            answers.append(answer)
            if answer.session is not None:
                return answer.session
            error = LemonSliceError if not answer.unknown else CreateOutcomeUnknown
            raise error(
                f"LemonSlice answered the create with HTTP {answer.status}", status=answer.status
            )

        try:
            record = await self.create_with(
                send,
                idle_window=idle_window,
                max_age=max_age,
                metadata={**fields.pop("metadata"), **(metadata or {})},
                **fields,
            )
        except LemonSliceError:
            if not answers:
                raise
            return None, answers[0]
        return record, answers[0]

    async def _run_create(self, intent: SessionRecord, send: CreateSend) -> SessionRecord:
        """``_create_remote`` in a task the caller's cancellation cannot cut short."""
        task = asyncio.create_task(self._create_remote(intent, send))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        try:
            record = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._end_abandoned)
            raise
        if self.on_exit == "end":
            self._created.add(record.id)
        if self.on_created is not None:
            await self._call_hook(self.on_created, record)
        return record

    async def _create_remote(self, intent: SessionRecord, send: CreateSend) -> SessionRecord:
        """POST (``send``) under the intent's lease and record the answer; every create path
        (the manager's, a recording proxy's raw body) goes through here.

        An answer that comes after recovery resolved the intent: if recovery recorded that very
        session (and so ended it), ``IntentTakenOver`` is raised with the record; if the intent
        was only failed, the session is recorded now and returned, guarded as any other."""
        repo = self.repository
        keeper = self._intents
        assert keeper is not None
        held = (intent.id,)
        keeper.add(held)  # add/discard, not ``holding``: no context manager per create
        try:
            try:
                answer = await send()
            finally:
                keeper.discard(held)
        except CreateOutcomeUnknown:
            logger.warning("create outcome unknown for intent %d; recovery resolves it", intent.id)
            with contextlib.suppress(SessionMgrError):  # else the lease runs out by itself
                await repo.release_intent(intent.id, owner=self.owner)
            raise
        except LemonSliceError as exc:
            # The client raises anything but CreateOutcomeUnknown only when the server provably
            # did not take the request (a 4xx, 429, 503, or nothing sent): nothing to reconcile.
            await repo.mark_failed(intent.id, reason=EndReason.CREATE_REJECTED, error=str(exc))
            raise
        session_id = answer["session_id"]
        try:
            record = await repo.mark_active(
                intent.id,
                session_id=session_id,
                room_url=answer.get("room_url"),
                control_url=answer["control_url"],
                intent=intent,
            )
            if record is None:  # recovery resolved the intent meanwhile: keep the session guarded
                record, created = await repo.adopt(
                    session_id=session_id,
                    control_url=answer["control_url"],
                    room_url=answer.get("room_url"),
                    idle_window=intent.idle_window,
                    max_age=intent.max_age,
                    agent_id=intent.agent_id,
                    metadata=intent.metadata,
                    model=intent.model,
                    transport_type=intent.transport_type,
                )
                if not created:
                    raise IntentTakenOver(
                        f"the answer to create {intent.id} came after recovery had resolved it "
                        f"(its lease lapsed): session {session_id} is recorded as "
                        f"{record.status}; create a new session",
                        record=record,
                    )
        except IntentTakenOver:
            raise  # recorded (and ended) by recovery: nothing more to end here
        except Exception:
            # The session is live but unrecorded and the caller will get an error, not a session:
            # end it now rather than pay for it until reconcile finds it.
            with contextlib.suppress(LemonSliceError):
                await self.client.end_session(session_id, answer["control_url"])
            raise
        logger.info(
            "created session %s",
            session_id,
            extra={"session_id": session_id, "pk": record.id, "agent_id": intent.agent_id},
        )
        return record

    def _end_abandoned(self, task: asyncio.Task[SessionRecord]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        record = task.result()
        ender = asyncio.create_task(self._end_quietly(record.id, EndReason.MANUAL))
        self._background.add(ender)
        ender.add_done_callback(self._background.discard)

    async def _end_quietly(self, session_ref: int | str, reason: EndReason) -> None:
        try:
            await self.end_session(session_ref, reason=reason)
        except Exception as exc:  # the reaper ends it later
            logger.warning("could not end abandoned session %s: %s", session_ref, exc)

    # --- touch, end, adopt -----------------------------------------------------------------

    def touch(self, session_id: str) -> None:
        """Record activity now; O(1), no I/O. Written at the next flush (reaper tick or timer).

        Touches of sessions that are not active (unknown, ending, ended) are dropped at flush;
        a ``session_id`` that is not one (not a string, NUL, lone surrogate) raises
        ``InvalidArgument`` here, so it can never fail a later flush.
        """
        self.repository.touch(session_id, self.clock.now())
        if self.server_keepalive is not None:
            self._keepalive_due[session_id] = None

    async def end_session(
        self,
        session_ref: str | int,
        reason: EndReason | str = EndReason.MANUAL,
        *,
        detail: str | None = None,
    ) -> EndResult:
        """Terminate a session and record its end. Idempotent: ending an ended one says so.
        ``detail`` goes on the lifecycle event (who asked, e.g. "client terminate via proxy").

        One write transaction claims the row (and says what it found when it could not), the
        terminate goes out, and one bulk statement records the end: nothing is read around it."""
        reason = EndReason(reason)
        found = await self.repository.claim_end(
            session_ref, owner=self.owner, lease=self._lease, reason=reason, detail=detail
        )
        record = found.record
        if not found.claimed:
            if record.status in (SessionStatus.ENDED, SessionStatus.FAILED):
                return EndResult(
                    record, False, f"already {record.status} ({record.end_reason or 'no reason'})"
                )
            if record.status is SessionStatus.PENDING:
                raise SessionMgrError(still_creating(record.id))
            return EndResult(record, False, f"being ended by {record.lease_owner}")
        outcome, final = await self.reaper.end_claimed(record)
        if outcome is not Outcome.RESCHEDULED:
            self._created.discard(record.id)
        if final is None:  # LOST: another process holds the row now; show it as it is
            final = await self.repository.get(record.id)
        message = {
            Outcome.ENDED: "ended",
            Outcome.GONE: "ended (LemonSlice no longer knew it)",
            Outcome.LOST: "ended by another process",
            Outcome.RESCHEDULED: "terminate failed; the reaper retries",
        }[outcome]
        return EndResult(final, outcome is not Outcome.RESCHEDULED, message)

    async def adopt_session(
        self,
        session_id: str,
        control_url: str | None = None,
        room_url: str | None = None,
        *,
        idle_window: float | None = None,
        max_age: float | None = None,
        agent_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        model: str | None = None,
        transport_type: str | None = None,
    ) -> SessionRecord:
        """Guard a session created elsewhere (e.g. by pipecat's own transport, or LiveKit's
        plugin: ``transport_type="livekit"``). A ``control_url`` off the API's origin raises
        ``UntrustedURLError``: the reaper would send the API key there."""
        check_session_id(session_id)
        if control_url:
            self.client.check_control_url(control_url)
        record, created = await self.repository.adopt(
            session_id=session_id,
            control_url=control_url or self.client.control_url_for(session_id),
            room_url=room_url,
            idle_window=self.idle_window if idle_window is None else idle_window,
            max_age=max_age if max_age is not None else self.max_age,
            agent_id=agent_id,
            metadata=metadata,
            model=model,
            transport_type=transport_type,
        )
        if created and self.on_created is not None:
            await self._call_hook(self.on_created, record)
        return record

    async def get(self, session_ref: str | int) -> SessionRecord:
        return await self.repository.get(session_ref)

    async def reconcile(
        self, *, dry_run: bool = False, end_orphans: bool = False
    ) -> ReconcileReport:
        report = await reconcile(
            self.repository,
            self.client,
            self.reaper,
            dry_run=dry_run,
            end_orphans=end_orphans,
        )
        if self.on_reconciled is not None:
            try:
                self.on_reconciled(report)
            except Exception:  # the report is what the caller asked for
                logger.exception("on_reconciled hook failed")
        return report

    # --- control events ------------------------------------------------------------------

    async def update_image(
        self,
        session_ref: str | int,
        *,
        image_url: str | None = None,
        image: AgentImage | None = None,
    ) -> SessionRecord:
        """Show another image (``image_url``, or ``image``: PNG bytes or an object with
        ``.save(fp, format="PNG")``, at most 900 KB) on an active session."""
        body = image_event(image_url=image_url, image=image)
        if image_url is not None:
            detail = f"update-image {image_url}"
        else:
            b64 = body["image_base64"]
            detail = f"update-image (PNG, {len(b64) * 3 // 4 - b64[-2:].count('='):,} bytes)"
        return await self._control(session_ref, body, detail)

    async def update_agent_prompt(self, session_ref: str | int, agent_prompt: str) -> SessionRecord:
        body = agent_prompt_event(agent_prompt)
        return await self._control(
            session_ref, body, f"update-agent-prompt ({len(agent_prompt)} chars)"
        )

    async def update_idle_prompt(self, session_ref: str | int, idle_prompt: str) -> SessionRecord:
        body = idle_prompt_event(idle_prompt)
        return await self._control(
            session_ref, body, f"update-idle-prompt ({len(idle_prompt)} chars)"
        )

    async def trigger_action(self, session_ref: str | int, name: str) -> SessionRecord:
        return await self._control(session_ref, trigger_event(name), f"trigger {name}")

    async def reset_idle_timeout(self, session_ref: str | int) -> SessionRecord:
        return await self._control(session_ref, {"event": RESET_IDLE_EVENT}, RESET_IDLE_EVENT)

    async def _control(
        self, session_ref: str | int, body: Mapping[str, Any], detail: str
    ) -> SessionRecord:
        """Send one control event to the session ``session_ref`` names and append a ``control``
        event row. Only an active session takes one: anything else is refused with
        ``SessionNotLive`` before a request. 404/410 means LemonSlice no longer has it: it is
        ended (``gone``, through a terminate, as the reaper would) and ``SessionNotLive`` raised.
        A control counts as activity (a touch)."""
        record = await self.repository.get(session_ref)
        if not may_control(as_row(record)):
            raise SessionNotLive(
                f"session {record.id} is {record.status}: control events go to active sessions only"
            )
        assert record.session_id is not None  # may_control says so
        try:
            await self.client.send_control_event(
                record.session_id,
                self.client.stored_control_url(record.session_id, record.control_url),
                body,
            )
        except NotFoundError:
            raise await self._gone(record, f"when sent {body['event']}") from None
        self.touch(record.session_id)
        return await self.repository.record_control(record.id, detail=detail) or (
            await self.repository.get(record.id)
        )

    async def _gone(self, record: SessionRecord, when: str) -> SessionNotLive:
        """LemonSlice answered 404/410 for a session the row says is live: end the row as
        ``gone`` (through a terminate, as the reaper would) and return the error to raise."""
        logger.info("session %s was gone at LemonSlice %s", record.session_id, when)
        with contextlib.suppress(SessionMgrError):
            await self.end_session(record.id, reason=EndReason.GONE)
        return SessionNotLive(
            f"session {record.id} ({record.session_id}) is gone at LemonSlice; recorded as ended"
        )

    async def wait_until_active(
        self,
        session_ref: str | int,
        *,
        timeout: float = WAIT_TIMEOUT,  # noqa: ASYNC109 - the documented name; polls, never cut
    ) -> SessionRecord:
        """Wait while LemonSlice keeps the session QUEUED (a cold start); the record once ACTIVE.

        Every status seen is recorded in ``remote_status``; a final one ends the row (as
        reconcile would) and raises ``SessionNotLive``, and so does a 404/410 (the row ends as
        ``gone``, as after a control event); ``ActivationTimeout`` after ``timeout``
        seconds leaves it active and QUEUED. ``on_active`` gets the seconds from intent to ACTIVE.
        """
        record = await self.repository.get(session_ref)
        if record.status is not SessionStatus.ACTIVE or record.session_id is None:
            raise SessionNotLive(
                f"session {record.id} is {record.status}: only an active session can be waited on"
            )
        seen = [record.remote_status]

        async def on_status(answer: dict[str, Any]) -> None:
            status = answer["session_status"]
            if status == seen[0]:
                return
            seen[0] = status
            if status in REMOTE_FINAL:
                cost = answer.get("cost")
                await self.repository.mark_ended_remote(
                    record.id,
                    reason=REMOTE_FINAL[status],
                    remote_status=status,
                    cost=cost if isinstance(cost, int | float) else None,
                )
            else:
                await self.repository.record_remote(record.id, remote_status=status, cost=None)

        try:
            await self.client.wait_until_active(
                record.session_id, timeout=timeout, on_status=on_status
            )
        except NotFoundError:
            raise await self._gone(record, "while waited on") from None
        seconds = (self.clock.now() - record.created_at).total_seconds()
        if self.on_active is not None:
            try:
                self.on_active(record, seconds)
            except Exception:
                logger.exception("on_active hook failed")
        return await self.repository.get(record.id)

    # --- keep-alive ------------------------------------------------------------------------

    async def _keepalive_loop(self) -> None:
        while True:
            await self.clock.sleep(self._touch_flush_interval)
            try:
                await self.send_keepalives()
            except Exception:
                logger.exception("keep-alive round failed; retrying next interval")

    async def send_keepalives(self) -> int:
        """``reset-idle-timeout`` for each session touched since its last one and not reset
        within ``server_keepalive`` seconds; returns how many went through.

        LemonSlice's idle clock only sees the avatar speak, so a long user turn could time a
        session out there; with this, its own ``idle_timeout`` can be short (a tight backstop if
        this process dies) while conversations stay up. Runs every touch-flush interval in its own
        task, never on the touch path; at most ``KEEPALIVE_CONCURRENCY`` requests in flight;
        failures are logged and counted (``keepalive_failures``), never raised. Touches inside the
        interval wait for the next round, so the last one is always passed on.
        """
        interval = self.server_keepalive
        if interval is None or not self._keepalive_due:
            return 0
        now = self.clock.monotonic()
        # forget resets older than the interval (ended sessions), so the map stays bounded
        self._keepalive_last = {
            sid: at for sid, at in self._keepalive_last.items() if now - at < interval
        }
        due = [sid for sid in self._keepalive_due if sid not in self._keepalive_last]
        if not due:
            return 0
        for sid in due:
            del self._keepalive_due[sid]
        try:
            urls = await self.repository.active_control_urls(due)
        except SessionMgrError as exc:
            logger.warning("keep-alive: could not read control URLs (%s); next round", exc)
            self.keepalive_failures += len(due)
            self._keepalive_due.update(dict.fromkeys(due))
            return 0
        gate = asyncio.Semaphore(KEEPALIVE_CONCURRENCY)

        async def reset(session_id: str, control_url: str) -> bool:
            async with gate:
                try:
                    await self.client.reset_idle_timeout(
                        session_id, self.client.stored_control_url(session_id, control_url)
                    )
                except LemonSliceError as exc:
                    ok = False
                    self.keepalive_failures += 1
                    logger.warning(
                        "keep-alive for session %s failed: %s",
                        session_id,
                        exc,
                        extra={"session_id": session_id},
                    )
                else:
                    ok = True
                    self.keepalive_sent += 1
                    self._keepalive_last[session_id] = self.clock.monotonic()
            if self.on_keepalive is not None:
                try:
                    self.on_keepalive(session_id, ok)
                except Exception:
                    logger.exception("on_keepalive hook failed")
            return ok

        results = await asyncio.gather(*(reset(sid, url) for sid, url in urls.items()))
        return sum(results)

    @staticmethod
    async def _call_hook(hook: SessionHook, record: SessionRecord) -> None:
        try:
            await hook(record)
        except Exception:
            logger.exception("session hook failed for session %s", record.session_id)
