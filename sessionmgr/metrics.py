"""Prometheus metrics of a manager: sessions, LemonSlice API calls, the reaper and reconcile.

Each ``Metrics`` owns its ``CollectorRegistry``, so several apps (or tests) in one process never
collide on names. Counters are fed by the manager's hooks (``attach``) and by an aiohttp
``TraceConfig`` the LemonSlice client is built with (``trace_config``); the live-sessions gauge is
one grouped COUNT read at scrape time (``scrape``), never the full ``stats`` query.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import SessionMgrError
from .reaper import Outcome
from .records import SessionRecord
from .states import SessionStatus

if TYPE_CHECKING:
    from .manager import SessionManager
    from .reaper import TickResult
    from .reconcile import ReconcileReport

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text exposition format
API_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
TICK_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)  # seconds
# seconds; a warm start is ~1 s, a cold one (QUEUED) up to ~150 s
ACTIVE_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0, 150.0, 180.0, 300.0)


class _LiveSessions(Collector):
    """``sessionmgr_sessions_live{status}`` and ``sessionmgr_database_up`` as of the last scrape:
    collect() is synchronous, so ``Metrics.scrape`` reads the counts just before rendering."""

    def __init__(self) -> None:
        self.counts: Mapping[SessionStatus, int] | None = None

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "sessionmgr_database_up", "1 if the last scrape could read the database, else 0"
        )
        up.add_metric([], 0 if self.counts is None else 1)
        yield up
        if self.counts is None:
            return  # no number rather than a wrong one
        live = GaugeMetricFamily(
            "sessionmgr_sessions_live", "Sessions not yet ended, by status", labels=["status"]
        )
        for status, count in self.counts.items():
            live.add_metric([status.value], count)
        yield live


class Metrics:
    """The metrics of one manager; ``render()`` gives the text a Prometheus server scrapes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # prometheus_client appends ``_total`` to counter names
        self.sessions_created = Counter(
            "sessionmgr_sessions_created", "Sessions created or adopted by this process", registry=r
        )
        self.sessions_ended = Counter(
            "sessionmgr_sessions_ended",
            "Sessions this process saw end, by reason",
            ["reason"],
            registry=r,
        )
        self.api_requests = Counter(
            "sessionmgr_api_requests",
            "LemonSlice API requests (each attempt), by endpoint and outcome (2xx, 4xx, 5xx, "
            "timeout, error)",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.api_duration = Histogram(
            "sessionmgr_api_request_duration_seconds",
            "LemonSlice API request time until the answer's headers, by endpoint",
            ["endpoint"],
            buckets=API_BUCKETS,
            registry=r,
        )
        self.tick_duration = Histogram(
            "sessionmgr_reaper_tick_duration_seconds",
            "Time of one reaper tick (flush, claims, terminates)",
            buckets=TICK_BUCKETS,
            registry=r,
        )
        self.reaper_claims = Counter(
            "sessionmgr_reaper_claims", "Sessions the reaper claimed", registry=r
        )
        self.reaper_ended = Counter(
            "sessionmgr_reaper_ended", "Sessions the reaper ended (or found gone)", registry=r
        )
        self.reaper_failures = Counter(
            "sessionmgr_reaper_terminate_failures",
            "Reaper terminates that failed and were rescheduled",
            registry=r,
        )
        self.reconcile_orphans = Counter(
            "sessionmgr_reconcile_orphans",
            "Live remote sessions unknown to the database, counted at every reconcile that sees "
            "them",
            registry=r,
        )
        self.time_to_active = Histogram(
            "sessionmgr_session_time_to_active_seconds",
            "Seconds from a session's intent to LemonSlice reporting it ACTIVE (seen by "
            "wait_until_active; QUEUED cold starts make the long tail)",
            buckets=ACTIVE_BUCKETS,
            registry=r,
        )
        self.keepalives = Counter(
            "sessionmgr_keepalives",
            "reset-idle-timeout requests the keep-alive sent, by outcome (ok, failed)",
            ["outcome"],
            registry=r,
        )
        self._live = _LiveSessions()
        r.register(self._live)
        self._attached: list[SessionManager] = []

    # --- wiring -------------------------------------------------------------------------------

    def attach(self, manager: SessionManager) -> None:
        """Count what ``manager`` does, keeping any hooks it already has (they run after ours).

        The manager must be open (its reaper exists). Attaching one manager twice is a no-op.
        """
        if any(m is manager for m in self._attached):
            return
        reaper = manager.reaper  # raises a clear error when the manager is not open
        self._attached.append(manager)
        user_created, user_ended = manager.on_created, manager.on_ended
        user_tick, user_reconciled = reaper.on_tick, manager.on_reconciled

        async def on_created(record: SessionRecord) -> None:
            self.sessions_created.inc()
            if user_created is not None:
                await user_created(record)

        async def on_ended(record: SessionRecord) -> None:
            self.sessions_ended.labels(str(record.end_reason or "unknown")).inc()
            if user_ended is not None:
                await user_ended(record)

        def on_tick(result: TickResult) -> None:
            self.tick_duration.observe(result.seconds)
            self.reaper_claims.inc(result.claimed)
            self.reaper_ended.inc(len(result.ended))
            self.reaper_failures.inc(len(result.outcomes[Outcome.RESCHEDULED]))
            if user_tick is not None:
                user_tick(result)

        def on_reconciled(report: ReconcileReport) -> None:
            if not report.dry_run:
                self.reconcile_orphans.inc(len(report.orphans))
            if user_reconciled is not None:
                user_reconciled(report)

        user_active, user_keepalive = manager.on_active, manager.on_keepalive

        def on_active(record: SessionRecord, seconds: float) -> None:
            self.time_to_active.observe(max(seconds, 0.0))
            if user_active is not None:
                user_active(record, seconds)

        def on_keepalive(session_id: str, ok: bool) -> None:
            self.keepalives.labels("ok" if ok else "failed").inc()
            if user_keepalive is not None:
                user_keepalive(session_id, ok)

        manager.on_active = on_active
        manager.on_keepalive = on_keepalive
        manager.on_created = on_created
        manager.on_ended = on_ended
        manager.on_reconciled = on_reconciled
        reaper.on_tick = on_tick

    def trace_config(self) -> aiohttp.TraceConfig:
        """For ``LemonSliceClient(trace_configs=[...])``: counts and times every request."""
        trace = aiohttp.TraceConfig()

        def endpoint(ctx: SimpleNamespace) -> str:
            info = getattr(ctx, "trace_request_ctx", None)
            name = info.get("endpoint") if isinstance(info, Mapping) else None
            return str(name) if name else "other"

        async def start(
            _: aiohttp.ClientSession, ctx: SimpleNamespace, __: aiohttp.TraceRequestStartParams
        ) -> None:
            ctx.started = asyncio.get_running_loop().time()

        def done(ctx: SimpleNamespace, outcome: str) -> None:
            name = endpoint(ctx)
            self.api_requests.labels(name, outcome).inc()
            started = getattr(ctx, "started", None)
            if started is not None:
                self.api_duration.labels(name).observe(asyncio.get_running_loop().time() - started)

        async def end(
            _: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
        ) -> None:
            done(ctx, f"{params.response.status // 100}xx")

        async def failed(
            _: aiohttp.ClientSession,
            ctx: SimpleNamespace,
            params: aiohttp.TraceRequestExceptionParams,
        ) -> None:
            done(ctx, "timeout" if isinstance(params.exception, TimeoutError) else "error")

        trace.on_request_start.append(start)
        trace.on_request_end.append(end)
        trace.on_request_exception.append(failed)
        return trace

    # --- scraping -----------------------------------------------------------------------------

    async def scrape(self, manager: SessionManager) -> bytes:
        """The text exposition, with the live counts read now (one grouped COUNT)."""
        try:
            self._live.counts = await manager.repository.count_live()
        except SessionMgrError as exc:
            logger.warning("metrics: could not count live sessions: %s", exc)
            self._live.counts = None
        return self.render()

    def render(self) -> bytes:
        return generate_latest(self.registry)
