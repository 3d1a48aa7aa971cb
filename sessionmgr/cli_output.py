"""How the CLI prints (consoles, tables, JSON, CSV, progress), apart from the commands."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import click
from rich import box
from rich.cells import cell_len
from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .reconcile import ReconcileReport
from .records import SessionEvent, SessionRecord, iso_utc
from .states import SessionStatus
from .transitions import as_row, claim_reason

WIDE_WIDTH = 10_000  # columns: effectively unlimited, for --wide
COLUMN_GAP = 2  # blanks between table columns
# (column index, narrowest width) of the `list` columns cut short, in order, to fit the terminal
SHRINK_ORDER = ((1, 14), (3, 10), (6, 8))
URL_WIDTH = 60  # characters of a URL shown in `show` before it is shortened in the middle


def stdout_console(*, wide: bool = False) -> Console:
    """Fits the terminal (80 columns when not a TTY); no colour unless stdout is a terminal."""
    return Console(highlight=False, emoji=False, width=WIDE_WIDTH if wide else None)


def print_out(*renderables: RenderableType, wide: bool = False) -> None:
    """Print to stdout without the trailing blanks rich pads table cells with."""
    console = stdout_console(wide=wide)
    with console.capture() as capture:
        for item in renderables:
            console.print(item)
    for line in capture.get().splitlines():
        click.echo(line.rstrip())


def stderr_console() -> Console:
    """Where progress goes; tests replace it to exercise the TTY path."""
    return Console(stderr=True, highlight=False, emoji=False)


def stdin_is_tty() -> bool:
    """Whether a confirmation can be asked; tests replace it."""
    return sys.stdin.isatty()


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def iso_time(moment: datetime | None) -> str:
    return "" if moment is None else iso_utc(moment)


def iso_seconds(moment: datetime | None) -> str:
    """ISO 8601 UTC to the second, for people (JSON keeps the microseconds)."""
    return "" if moment is None else iso_time(moment.astimezone(UTC).replace(microsecond=0))


def _short_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%m-%d %H:%M")


def human_seconds(seconds: float) -> str:
    """``45s``, ``4m10s``, ``2h05m``, ``3d04h``: compact enough for a table cell."""
    total = round(abs(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h" if hours else f"{days}d"


def shorten(text: str, width: int = URL_WIDTH) -> str:
    """Cut the middle out of a long URL, keeping its host and its tail (the session id)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return f"{text[:head]}…{text[len(text) - (width - 1 - head) :]}"


_STATUS_STYLE = {
    "pending": "cyan",
    "active": "green",
    "ending": "yellow",
    "ended": "dim",
    "failed": "red",
}


def _status_text(status: str) -> Text:
    return Text(status, style=_STATUS_STYLE.get(status, ""))


def _idle_cell(record: SessionRecord, now: datetime) -> str:
    if record.status in (SessionStatus.ACTIVE, SessionStatus.ENDING):
        return human_seconds((now - record.last_activity_at).total_seconds())
    return ""


def _end_cell(record: SessionRecord, now: datetime) -> str:
    """When an active session will be ended, or why a finished one ended."""
    if record.status is SessionStatus.PENDING:
        return "creating"
    if record.status is SessionStatus.ACTIVE:
        if record.deadline is None:
            return "-"
        left = (record.deadline - now).total_seconds()
        return "due" if left <= 0 else f"in {human_seconds(left)}"
    reason = str(record.end_reason) if record.end_reason else "-"
    if record.status is SessionStatus.ENDING and record.attempts > 1:
        return f"{reason} (try {record.attempts})"
    return reason


def _meta_text(metadata: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in metadata.items()
    )


def new_table() -> Table:
    """The one table style: a rule under the header, two blanks between columns, no frame."""
    return Table(
        box=box.SIMPLE_HEAD,
        padding=(0, COLUMN_GAP - 1, 0, 0),
        pad_edge=False,
        show_edge=False,
        header_style="bold",
    )


def records_table(records: Sequence[SessionRecord], now: datetime, *, width: int | None) -> Table:
    """Sessions as rows. Within ``width`` columns the session id, agent and end reason are cut
    short first (a local id works wherever a session id does); ``None`` shows everything."""
    headers = ["ID", "SESSION ID", "STATUS", "AGENT", "CREATED", "IDLE", "END"]
    rows = [
        [
            str(r.id),
            r.session_id or "-",
            str(r.status),
            r.agent_id or r.agent_image_url or "-",
            _short_time(r.created_at) if width else iso_seconds(r.created_at),
            _idle_cell(r, now),
            _end_cell(r, now),
        ]
        for r in records
    ]
    if width is None:
        headers[4] = "CREATED (UTC)"
        headers += ["DEADLINE", "COST", "METADATA", "ROOM URL", "CONTROL URL", "LAST ERROR"]
        for row, r in zip(rows, records, strict=True):
            row += [
                iso_seconds(r.deadline),
                "" if r.cost is None else f"{r.cost:g}",
                _meta_text(r.metadata),
                r.room_url or "",
                r.control_url or "",
                r.last_error or "",
            ]
    caps: dict[int, int] = {}
    if width is not None:
        natural = [
            max([cell_len(h), *(cell_len(row[i]) for row in rows)]) for i, h in enumerate(headers)
        ]
        excess = sum(natural) + COLUMN_GAP * (len(headers) - 1) - width
        for index, minimum in SHRINK_ORDER:
            if excess <= 0:
                break
            cut = min(excess, max(0, natural[index] - minimum))
            caps[index] = natural[index] - cut
            excess -= cut
    table = new_table()
    for i, header in enumerate(headers):
        table.add_column(
            header,
            justify="right" if header in ("ID", "IDLE", "COST") else "left",
            no_wrap=True,
            overflow="ellipsis",
            max_width=caps.get(i),
        )
    for row in rows:
        cells = [Text(cell) for cell in row]
        cells[2].stylize(_STATUS_STYLE.get(row[2], ""))
        table.add_row(*cells)
    return table


def _seconds_cell(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    short, exact = human_seconds(seconds), f"{seconds:g}s"
    return short if short == exact else f"{short} ({exact})"


def _relative(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "-"
    delta = (moment - now).total_seconds()
    when = f"in {human_seconds(delta)}" if delta > 0 else f"{human_seconds(delta)} ago"
    return f"{iso_seconds(moment)} ({when})"


def record_view(record: SessionRecord, now: datetime, *, wide: bool) -> Table:
    """One session as field / value lines; long URLs shortened unless ``wide``."""

    def url(value: str | None) -> Text:
        return Text("-" if value is None else value if wide else shorten(value))

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    rows: list[tuple[str, Text | str]] = [
        ("id", str(record.id)),
        ("session_id", Text(record.session_id or "-")),
        ("status", _status_text(record.status)),
        ("agent_id", Text(record.agent_id or "-")),
        ("agent_image_url", url(record.agent_image_url)),
        ("agent_prompt", Text(record.agent_prompt or "-")),
        ("idle_timeout", "-" if record.idle_timeout is None else f"{record.idle_timeout}s"),
        ("transport_type", record.transport_type),
        ("model", Text(record.model or "-")),
        ("room_url", url(record.room_url)),
        ("control_url", url(record.control_url)),
        ("idle_window", _seconds_cell(record.idle_window)),
        ("max_age", _seconds_cell(record.max_age)),
        ("created_at", _relative(record.created_at, now)),
        ("updated_at", _relative(record.updated_at, now)),
        ("last_activity_at", _relative(record.last_activity_at, now)),
        ("deadline", _relative(record.deadline, now)),
        ("ended_at", _relative(record.ended_at, now)),
        ("end_reason", str(record.end_reason or "-")),
        ("remote_status", record.remote_status or "-"),
        ("cost", "-" if record.cost is None else f"{record.cost:g}"),
        ("attempts", str(record.attempts)),
        ("next_attempt_at", _relative(record.next_attempt_at, now)),
        ("last_error", Text(record.last_error or "-")),
        ("lease_owner", record.lease_owner or "-"),
        ("lease_until", _relative(record.lease_until, now)),
        ("metadata", Text(_meta_text(record.metadata) or "-")),
    ]
    for name, value in rows:
        grid.add_row(name, value)
    return grid


def events_table(events: Sequence[SessionEvent]) -> Table:
    table = new_table()
    table.add_column("AT (UTC)", no_wrap=True)
    table.add_column("FROM", no_wrap=True)
    table.add_column("TO", no_wrap=True)
    table.add_column("REASON", no_wrap=True)
    table.add_column("DETAIL", overflow="fold")
    for e in events:
        table.add_row(
            e.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            str(e.from_status or "-"),
            _status_text(e.to_status),
            str(e.reason or ""),
            Text(e.detail or ""),
        )
    return table


def print_record(record: SessionRecord, *, as_json: bool, wide: bool, now: datetime) -> None:
    if as_json:
        echo_json(record.to_dict())
    else:
        print_out(record_view(record, now, wide=wide), wide=wide)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr when it is a terminal; otherwise nothing at all."""
    console = stderr_console()
    if not console.is_terminal:
        yield lambda _n: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


CSV_FIELDS = tuple(f.name for f in dataclasses.fields(SessionRecord))


def records_csv(records: Sequence[SessionRecord]) -> str:
    """Record fields as columns; times ISO-8601 UTC, metadata as JSON, None as empty."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in records:
        row = r.to_dict()
        row["metadata"] = json.dumps(row["metadata"], ensure_ascii=False, sort_keys=True)
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def due_reason(record: SessionRecord, now: datetime) -> str:
    """The reason the reaper's claim would stamp (``transitions.claim_reason``)."""
    return str(claim_reason(as_row(record), now))


def _idle_at(record: SessionRecord, now: datetime) -> str:
    """How long the session had been idle: until now if live, until its end if finished."""
    if record.status is SessionStatus.PENDING:
        return ""
    until = now if record.live else (record.ended_at or record.updated_at)
    return human_seconds((until - record.last_activity_at).total_seconds())


def brief_table(rows: Sequence[tuple[SessionRecord, str]], now: datetime, last: str) -> Table:
    """The few columns that say which sessions a batch command touched and how."""
    table = new_table()
    table.add_column("ID", justify="right", no_wrap=True)
    table.add_column("SESSION ID", no_wrap=True, overflow="ellipsis")
    table.add_column("AGENT", overflow="fold")
    table.add_column("IDLE", justify="right", no_wrap=True)
    table.add_column(last, overflow="fold")
    for r, value in rows:
        table.add_row(
            str(r.id), Text(r.session_id or "-"), Text(r.agent_id or "-"), _idle_at(r, now), value
        )
    return table


def print_reconcile(report: ReconcileReport, *, end_orphans: bool) -> None:
    now = datetime.now(UTC)
    dry = report.dry_run
    click.echo(f"checked {report.checked} live session(s) with LemonSlice")
    if report.ended_remote:
        verb = "would end" if dry else "ended"
        click.echo(f"{verb} {len(report.ended_remote)} that LemonSlice had already finished:")
        rows = [(r, str(r.end_reason or r.remote_status or "")) for r in report.ended_remote]
        print_out(brief_table(rows, now, "REASON"))
    if report.adopted:
        verb = "would adopt and end" if dry else "adopted and ended"
        click.echo(f"{verb} {len(report.adopted)} session(s) whose create answer was lost:")
        print_out(brief_table([(r, str(r.status)) for r in report.adopted], now, "STATUS"))
    if report.intents_failed:
        verb = "would mark" if dry else "marked"
        click.echo(
            f"{verb} {len(report.intents_failed)} unresolved create(s) failed "
            "(no matching remote session)"
        )
    if report.orphans:
        ended = set(report.orphans_ended)
        hint = "" if end_orphans else " (--end-orphans ends them)"
        click.echo(f"{len(report.orphans)} live remote session(s) unknown here{hint}:")
        table = new_table()
        for name in ("SESSION ID", "REMOTE STATUS", "CREATED (UTC)", "ACTION"):
            table.add_column(name, no_wrap=True)
        for o in report.orphans:
            if o.session_id in ended:
                action = "ended"
            elif end_orphans:
                action = "would end" if dry else "not ended (see errors)"
            else:
                action = "left running"
            table.add_row(Text(o.session_id), o.status or "-", iso_seconds(o.created_at), action)
        print_out(table)
    if report.held:
        click.echo(
            f"left alone {len(report.held)} unknown remote session(s) a create still in flight "
            "could own (its intent's lease is held)"
        )
    if report.costs:
        click.echo(f"recorded the cost of {report.costs} ended session(s) from the list")
    if report.still_live:
        verb = "would terminate" if dry else "terminated"
        click.echo(
            f"{verb} again {len(report.still_live)} session(s) ended here that LemonSlice "
            "still listed as live:"
        )
        print_out(
            brief_table([(r, str(r.end_reason or "")) for r in report.still_live], now, "REASON")
        )
    if not (
        report.ended_remote
        or report.adopted
        or report.intents_failed
        or report.orphans
        or report.still_live
    ):
        click.echo("nothing to repair")
