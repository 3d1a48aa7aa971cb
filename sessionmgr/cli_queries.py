"""`sessionmgr list`, `show` and `stats`: read-only admin queries."""

from __future__ import annotations

import json
from datetime import datetime

import click
from rich.table import Table
from rich.text import Text

from .checks import DEFAULT_PAGE, DEFAULT_STATS_DAYS, MAX_PAGE, MAX_STATS_DAYS
from .cli_app import CliContext, cli, open_repository, run
from .cli_output import (
    echo_json,
    events_table,
    human_seconds,
    iso_seconds,
    new_table,
    print_out,
    record_view,
    records_csv,
    records_table,
    stdout_console,
)
from .cli_params import (
    DURATION,
    KEY_VALUE,
    MOMENT,
    json_option,
)
from .queries import SORTS
from .records import (
    Page,
    SessionEvent,
    SessionFilter,
    SessionRecord,
    Stats,
)
from .states import SessionStatus

# --- list, show, stats -----------------------------------------------------------------------


@cli.command(name="list")
@click.option(
    "--status",
    "statuses",
    type=click.Choice([s.value for s in SessionStatus]),
    multiple=True,
    help="Only this status (repeatable).",
)
@click.option("--agent-id", help="Only this agent.")
@click.option("--since", type=MOMENT, help="Created at or after (ISO time, or e.g. 2h, 7d ago).")
@click.option("--until", type=MOMENT, help="Created before (ISO time, or e.g. 2h, 7d ago).")
@click.option("--meta", type=KEY_VALUE, multiple=True, help="Tag KEY=VALUE (repeatable: all).")
@click.option("--idle-for", type=DURATION, help="No activity for at least this long (e.g. 10m).")
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_PAGE),
    default=DEFAULT_PAGE,
    show_default=True,
    help="Rows per page.",
)
@click.option("--after", metavar="CURSOR", help="Next page: the cursor the last page printed.")
@click.option(
    "--sort",
    type=click.Choice(tuple(SORTS)),
    default="-created_at",
    show_default=True,
    help="Order ('-' = descending; last_activity_at = idle longest first).",
)
@click.option("--json", "fmt", flag_value="json", help="One JSON array.")
@click.option("--jsonl", "fmt", flag_value="jsonl", help="One JSON object per line.")
@click.option("--csv", "fmt", flag_value="csv", help="CSV with a header row.")
@click.option("--wide", is_flag=True, help="Every column, nothing truncated.")
@click.pass_obj
def list_(
    obj: CliContext,
    statuses: tuple[str, ...],
    agent_id: str | None,
    since: datetime | None,
    until: datetime | None,
    meta: tuple[tuple[str, str], ...],
    idle_for: float | None,
    limit: int,
    after: str | None,
    sort: str,
    fmt: str | None,
    wide: bool,
) -> None:
    """List sessions, newest first.

    When there are more rows than --limit, the cursor of the next page is printed on stderr.
    """
    flt = SessionFilter(
        statuses=[SessionStatus(s) for s in statuses] or None,
        agent_id=agent_id,
        created_after=since,
        created_before=until,
        meta=dict(meta),
        idle_for=idle_for,
    )

    async def go() -> tuple[Page, datetime]:
        async with open_repository(obj.settings) as repo:
            try:
                page = await repo.list(flt, limit=limit, after=after, sort=sort)
            except ValueError as exc:  # a damaged cursor, a filter no database can hold
                raise click.UsageError(str(exc)) from None
            return page, repo.clock.now()

    page, now = run(go())
    if fmt == "json":
        echo_json([r.to_dict() for r in page.items])
    elif fmt == "jsonl":
        for r in page.items:
            click.echo(json.dumps(r.to_dict(), ensure_ascii=False, default=str))
    elif fmt == "csv":
        click.echo(records_csv(page.items), nl=False)
    elif page.items:
        width = None if wide else stdout_console().width
        print_out(records_table(page.items, now, width=width), wide=wide)
    else:
        click.echo("no sessions match", err=True)
    if page.next_cursor:
        click.echo(f"more: add --after {page.next_cursor}", err=True)


@cli.command()
@click.argument("session_id")
@json_option
@click.option("--wide", is_flag=True, help="Show long URLs in full.")
@click.pass_obj
def show(obj: CliContext, session_id: str, as_json: bool, wide: bool) -> None:
    """One session and its lifecycle events.

    SESSION_ID is a local id or a LemonSlice session_id. Exit 3 if unknown.
    """

    async def go() -> tuple[SessionRecord, list[SessionEvent], datetime]:
        async with open_repository(obj.settings) as repo:
            record = await repo.get(session_id)
            return record, await repo.events(record.id), repo.clock.now()

    record, events, now = run(go())
    if as_json:
        echo_json({**record.to_dict(), "events": [e.to_dict() for e in events]})
        return
    print_out(
        record_view(record, now, wide=wide),
        "",
        events_table(events) if events else "no events",
        wide=wide,
    )


@cli.command()
@click.option(
    "--days",
    type=click.IntRange(1, MAX_STATS_DAYS),
    default=DEFAULT_STATS_DAYS,
    show_default=True,
    help="Days of per-day history (UTC).",
)
@json_option
@click.pass_obj
def stats(obj: CliContext, days: int, as_json: bool) -> None:
    """Counts, live sessions, durations and credits.

    Sessions per status, the oldest live one, sessions created and ended per UTC day, duration
    percentiles and credits of the sessions that ended in the last --days.
    """

    async def go() -> tuple[Stats, datetime]:
        async with open_repository(obj.settings) as repo:
            return await repo.stats(days=days), repo.clock.now()

    result, now = run(go())
    if as_json:
        echo_json(result.to_dict())
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row(
        "sessions",
        "  ".join(f"{s.value} {result.by_status.get(s.value, 0)}" for s in SessionStatus),
    )
    grid.add_row("live now", str(result.live))
    oldest = result.oldest_live
    if oldest is not None:
        age = human_seconds((now - oldest.created_at).total_seconds())
        grid.add_row(
            "oldest live",
            Text(
                f"#{oldest.id} {oldest.session_id or '(pending)'} {oldest.agent_id or ''} "
                f"created {iso_seconds(oldest.created_at)} ({age} ago)"
            ),
        )
    else:
        grid.add_row("oldest live", "-")

    def dur(value: float | None) -> str:
        return "-" if value is None else human_seconds(value)

    grid.add_row(
        f"duration p50/p95 ({days}d)",
        f"{dur(result.duration_p50)} / {dur(result.duration_p95)}",
    )
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(result.end_reasons.items()))
    grid.add_row(f"end reasons ({days}d)", reasons or "-")
    grid.add_row(
        f"credits known ({days}d)",
        f"{result.credits_known:g}"
        + (f" ({result.cost_unknown} ended without a cost yet)" if result.cost_unknown else ""),
    )
    table = new_table()
    table.add_column("DAY (UTC)", no_wrap=True)
    for name in ("CREATED", "ENDED", "CREDITS"):
        table.add_column(name, justify="right", no_wrap=True)
    for d in result.per_day:
        table.add_row(
            d.day.isoformat(),
            str(d.created),
            str(d.ended),
            "-" if d.credits is None else f"{d.credits:g}",
        )
    print_out(grid, "", table)
