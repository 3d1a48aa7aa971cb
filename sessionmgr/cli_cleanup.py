"""`sessionmgr reap`, `end-all`, `reconcile` and `prune`: cleanup jobs."""

from __future__ import annotations

import collections
import sys
from datetime import UTC, datetime, timedelta

import click

from .cli_app import (
    EXIT_FAILURE,
    EXIT_PARTIAL,
    EXIT_USAGE,
    MAX_ERRORS_SHOWN,
    PRUNE_BATCH,
    WALK_PAGE,
    CliContext,
    EndOutcome,
    cli,
    end_many,
    fail,
    open_manager,
    open_repository,
    report_end_outcomes,
    run,
    scrub_line,
)
from .cli_output import (
    brief_table,
    due_reason,
    echo_json,
    iso_seconds,
    iso_time,
    print_out,
    print_reconcile,
    progress_bar,
    stderr_console,
    stdin_is_tty,
)
from .cli_params import (
    KEY_VALUE,
    POSITIVE_DURATION,
    json_option,
)
from .cli_sessions import end_options
from .config import ENV_API_KEY
from .reaper import Outcome, TickResult
from .reconcile import ReconcileReport
from .records import (
    SessionFilter,
    SessionRecord,
)
from .states import EndReason, SessionStatus

# --- reap, end-all, reconcile, prune ---------------------------------------------------------


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only list what is due; end nothing.")
@click.option(
    "--concurrency", type=click.IntRange(min=1), help="Terminate requests in flight at once."
)
@json_option
@click.pass_obj
def reap(obj: CliContext, dry_run: bool, concurrency: int | None, as_json: bool) -> None:
    """End every due session now: one reaper pass, for cron.

    Due means past its idle window or its max age.
    Safe beside `serve` and other reaps: each session is ended once. Exit 4 if some due sessions
    could not be ended (they stay due and are retried), 1 if none could.
    """
    ended: list[SessionRecord] = []

    async def go() -> tuple[TickResult, list[SessionRecord], datetime]:
        with progress_bar("reaping", None) as advance:

            async def on_ended(record: SessionRecord) -> None:
                ended.append(record)
                advance(1)

            async with open_manager(
                obj.settings, needs_api=not dry_run, concurrency=concurrency, on_ended=on_ended
            ) as manager:
                result = await manager.reaper.run_once(dry_run=dry_run)
                failed = [
                    await manager.repository.find(r.id) or r
                    for r in result.outcomes[Outcome.RESCHEDULED]
                ]
                return result, failed, manager.clock.now()

    result, failed, now = run(go())
    if dry_run:
        due = result.due
        if as_json:
            echo_json({"dry_run": True, "due": [r.to_dict() for r in due]})
        elif due:
            print_out(brief_table([(r, due_reason(r, now)) for r in due], now, "REASON"))
            click.echo(f"would end {len(due)} session(s)")
        else:
            click.echo("nothing due")
        return
    lost = result.outcomes[Outcome.LOST]
    if as_json:
        echo_json(
            {
                "dry_run": False,
                "ended": [r.to_dict() for r in ended],
                "failed": [r.to_dict() for r in failed],
                "lost": [r.to_dict() for r in lost],
            }
        )
    else:
        if ended:
            rows = [(r, str(r.end_reason or "")) for r in ended]
            print_out(brief_table(rows, now, "REASON"))
        by_reason = collections.Counter(str(r.end_reason) for r in ended)
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(by_reason.items()))
        click.echo(f"ended {len(ended)} session(s)" + (f" ({detail})" if detail else ""))
        if lost:
            click.echo(f"{len(lost)} taken over by another process")
    if result.auth_failed:
        fail(
            "LemonSlice rejected the API key; due sessions stay due: fix --api-key / "
            f"{ENV_API_KEY}",
            EXIT_FAILURE,
        )
    if failed:
        errors = {r.last_error for r in failed if r.last_error}
        sample = f": {scrub_line(sorted(errors)[0])}" if errors else ""
        fail(
            f"{len(failed)} due session(s) could not be ended now and will be retried{sample}",
            EXIT_PARTIAL if ended else EXIT_FAILURE,
        )


@cli.command(name="end-all")
@click.option(
    "--status",
    "statuses",
    type=click.Choice([SessionStatus.ACTIVE.value, SessionStatus.ENDING.value]),
    multiple=True,
    help="Only this status (repeatable) [default: active and ending].",
)
@click.option("--agent-id", help="Only this agent.")
@click.option("--meta", type=KEY_VALUE, multiple=True, help="Tag KEY=VALUE (repeatable: all).")
@click.option("--dry-run", is_flag=True, help="Only list what would be ended.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@end_options
@json_option
@click.pass_obj
def end_all(
    obj: CliContext,
    statuses: tuple[str, ...],
    agent_id: str | None,
    meta: tuple[tuple[str, str], ...],
    dry_run: bool,
    yes: bool,
    reason: str,
    concurrency: int,
    as_json: bool,
) -> None:
    """End every matching live session.

    Asks first unless --yes or --dry-run.
    Without a terminal to ask on, it refuses unless --yes. Exit 4 if some could not be ended.
    """
    flt = SessionFilter(
        statuses=[SessionStatus(s) for s in statuses]
        or [SessionStatus.ACTIVE, SessionStatus.ENDING],
        agent_id=agent_id,
        meta=dict(meta),
    )

    async def go() -> tuple[list[SessionRecord], list[EndOutcome] | None]:
        async with open_manager(obj.settings, needs_api=not dry_run) as manager:
            matches: list[SessionRecord] = []
            cursor: str | None = None
            while True:
                page = await manager.repository.list(
                    flt, limit=WALK_PAGE, after=cursor, sort="created_at"
                )
                matches.extend(page.items)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            if dry_run or not matches:
                return matches, None
            if not yes:
                if not stdin_is_tty():
                    fail(
                        f"refusing to end {len(matches)} session(s) without confirmation: "
                        "pass --yes (or --dry-run to list them)",
                        EXIT_USAGE,
                    )
                if not click.confirm(f"End {len(matches)} live session(s)?", err=True):
                    fail("aborted: nothing ended", EXIT_FAILURE)
            with progress_bar("ending", len(matches)) as advance:
                outcomes = await end_many(
                    manager,
                    [str(r.id) for r in matches],
                    reason=EndReason(reason),
                    concurrency=concurrency,
                    advance=advance,
                )
            return matches, outcomes

    matches, outcomes = run(go())
    if outcomes is None:
        if as_json:
            echo_json(
                {
                    "dry_run": dry_run,
                    "matched": len(matches),
                    "results": [],
                    "would_end": [r.to_dict() for r in matches],
                }
            )
        elif matches:
            rows = [(r, str(r.status)) for r in matches]
            print_out(brief_table(rows, datetime.now(UTC), "STATUS"))
            click.echo(f"would end {len(matches)} session(s)")
        else:
            click.echo("no live sessions match")
        return
    payload = {
        "dry_run": False,
        "matched": len(matches),
        "results": [o.to_dict() for o in outcomes],
        "would_end": [],
    }
    code = report_end_outcomes(outcomes, as_json=as_json, extra=payload)
    if not as_json:
        ended = sum(o.outcome == "ended" for o in outcomes)
        click.echo(f"ended {ended} of {len(matches)} session(s)")
    sys.exit(code)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Report only; change nothing locally or remotely.")
@click.option(
    "--end-orphans",
    is_flag=True,
    help="Also end live remote sessions this database does not know (they may be another "
    "system's: only if this API key is yours alone).",
)
@json_option
@click.pass_obj
def reconcile(obj: CliContext, dry_run: bool, end_orphans: bool, as_json: bool) -> None:
    """Compare the database with LemonSlice and repair it.

    Records remote status and cost of live sessions, ends the ones LemonSlice already finished,
    resolves creates whose answer was lost, terminates again sessions ended here that LemonSlice
    still lists as live, and reports remote sessions unknown here (orphans).
    Exit 4 if some checks failed, 1 if the API could not be used at all.
    """

    async def go() -> ReconcileReport:
        async with open_manager(obj.settings) as manager:
            return await manager.reconcile(dry_run=dry_run, end_orphans=end_orphans)

    report = run(go())
    errors = [scrub_line(e) for e in report.errors]
    nothing_done = not (report.checked or report.adopted or report.orphans or report.still_live)
    if as_json:
        echo_json(report.to_dict())
    elif not (errors and nothing_done):
        print_reconcile(report, end_orphans=end_orphans)
    if errors and nothing_done:  # the API could not be used at all: one line says why
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        fail(f"{errors[0]}{more}", EXIT_FAILURE)
    if errors:
        for error in errors[:MAX_ERRORS_SHOWN]:
            click.echo(f"error: {error}", err=True)
        if len(errors) > MAX_ERRORS_SHOWN:
            click.echo(f"error: ... and {len(errors) - MAX_ERRORS_SHOWN} more", err=True)
        sys.exit(EXIT_PARTIAL)


@cli.command()
@click.option(
    "--older-than",
    type=POSITIVE_DURATION,
    required=True,
    help="Delete ended/failed sessions that ended longer ago than this (e.g. 30d).",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=PRUNE_BATCH,
    show_default=True,
    help="Rows deleted per transaction.",
)
@json_option
@click.pass_obj
def prune(
    obj: CliContext, older_than: float, dry_run: bool, batch_size: int, as_json: bool
) -> None:
    """Delete old ended and failed sessions.

    Their lifecycle events go with them. Rows are deleted in batches, so a running backend
    never waits long.
    """

    async def go() -> tuple[int, datetime]:
        async with open_repository(obj.settings) as repo:
            cutoff = repo.clock.now() - timedelta(seconds=older_than)
            total: int | None = None
            if not dry_run and stderr_console().is_terminal:  # a bar needs its total first
                total = await repo.prune(older_than=cutoff, batch_size=batch_size, dry_run=True)
            with progress_bar("pruning", total) as advance:
                done = 0

                def progress(deleted_so_far: int) -> None:
                    nonlocal done
                    advance(deleted_so_far - done)
                    done = deleted_so_far

                count = await repo.prune(
                    older_than=cutoff, batch_size=batch_size, dry_run=dry_run, progress=progress
                )
            return count, cutoff

    count, cutoff = run(go())
    if as_json:
        echo_json({"dry_run": dry_run, "older_than": iso_time(cutoff), "pruned": count})
    else:
        verb = "would delete" if dry_run else "deleted"
        click.echo(f"{verb} {count} session(s) that ended before {iso_seconds(cutoff)}")
