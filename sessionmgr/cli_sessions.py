"""`sessionmgr create`, `end`, `touch`, `control` and `adopt`: one session at a time."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from .cli_app import (
    END_CONCURRENCY,
    EXIT_NOT_FOUND,
    EXIT_OK,
    SECRETS,
    CliContext,
    EndOutcome,
    cli,
    end_many,
    open_manager,
    open_repository,
    report_end_outcomes,
    run,
    secret_flag,
)
from .cli_output import (
    echo_json,
    print_record,
    progress_bar,
)
from .cli_params import (
    KEY_JSON,
    KEY_VALUE,
    POSITIVE_DURATION,
    json_option,
)
from .client import ASPECT_RATIOS, AUDIO_SAMPLE_RATES, TRANSPORT_TYPES, CreateOptions
from .config import ENV_LIVEKIT_TOKEN
from .errors import (
    ActivationTimeout,
    InvalidArgument,
)
from .records import (
    SessionRecord,
    is_secret_key,
)
from .states import MANUAL_REASONS, EndReason, SessionStatus

# --- create, end, touch, adopt ---------------------------------------------------------------


@cli.command()
@click.option("--agent-id", help="ID of a LemonSlice agent.")
@click.option("--agent-image-url", help="URL of an agent image.")
@click.option(
    "--agent-image",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A PNG file to animate (sent as multipart form data).",
)
@click.option("--agent-prompt", help="Prompt for the agent.")
@click.option(
    "--idle-timeout",
    type=int,
    help="Seconds LemonSlice itself waits before ending an idle session (negative: never).",
)
@click.option(
    "--audio-sample-rate",
    type=click.Choice([str(r) for r in AUDIO_SAMPLE_RATES]),
    help="Hz the avatar takes and plays audio at [default: LemonSlice's].",
)
@click.option("--model", help="LemonSlice model to run the avatar on [default: LemonSlice's].")
@click.option(
    "--transport-type",
    type=click.Choice(TRANSPORT_TYPES),
    help="daily (pipecat) or livekit [default: livekit with --livekit-url, else daily].",
)
@click.option("--daily-room-url", help="Daily room to join.")
@click.option("--daily-token", help="Daily meeting token (never stored or printed).")
@click.option("--livekit-url", help="LiveKit server URL (a livekit session).")
@click.option(
    "--livekit-token",
    envvar=ENV_LIVEKIT_TOKEN,
    show_envvar=True,
    help="LiveKit token for the avatar (never stored or printed; prefer the environment).",
)
@click.option("--livekit-session-id", help="LiveKit room session id (room SID).")
@click.option("--agent-idle-prompt", help="Prompt for the agent while it listens.")
@click.option("--aspect-ratio", type=click.Choice(ASPECT_RATIOS), help="Video aspect ratio.")
@click.option(
    "--response-done-timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds."
)
@click.option("--simulcast/--no-simulcast", default=None, help="Simulcast video (livekit only).")
@click.option("--enable-recording", is_flag=True, default=None, help="Record the session.")
@click.option("--recordings-bucket", help="Where recordings go (with --enable-recording).")
@click.option(
    "--daily-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the Daily meeting token (keeps it out of `ps`).",
)
@click.option(
    "--property",
    "properties",
    type=KEY_JSON,
    multiple=True,
    help="Connection property KEY=VALUE (repeatable; JSON values allowed).",
)
@click.option(
    "--extra",
    type=KEY_JSON,
    multiple=True,
    help="Extra top-level request field KEY=VALUE (repeatable; JSON values allowed).",
)
@click.option(
    "--idle-window", type=POSITIVE_DURATION, help="Idle time before the reaper ends it (e.g. 5m)."
)
@click.option("--max-age", type=POSITIVE_DURATION, help="Longest life before the reaper ends it.")
@click.option("--meta", type=KEY_VALUE, multiple=True, help="Tag KEY=VALUE stored with it.")
@click.option(
    "--wait-active",
    type=POSITIVE_DURATION,
    help="Then wait up to this long while LemonSlice keeps it QUEUED (e.g. 3m).",
)
@json_option
@click.option("--wide", is_flag=True, help="Show long URLs in full.")
@click.pass_obj
def create(
    obj: CliContext,
    agent_id: str | None,
    agent_image_url: str | None,
    agent_image: Path | None,
    agent_prompt: str | None,
    idle_timeout: int | None,
    audio_sample_rate: str | None,
    model: str | None,
    transport_type: str | None,
    daily_room_url: str | None,
    daily_token: str | None,
    livekit_url: str | None,
    livekit_token: str | None,
    livekit_session_id: str | None,
    agent_idle_prompt: str | None,
    aspect_ratio: str | None,
    response_done_timeout: float | None,
    simulcast: bool | None,
    enable_recording: bool | None,
    recordings_bucket: str | None,
    daily_token_file: Path | None,
    properties: tuple[tuple[str, Any], ...],
    extra: tuple[tuple[str, Any], ...],
    idle_window: float | None,
    max_age: float | None,
    meta: tuple[tuple[str, str], ...],
    wait_active: float | None,
    as_json: bool,
    wide: bool,
) -> None:
    """Start a session and record it; prints the record.

    A Daily session (pipecat's payload) by default; --livekit-url, --livekit-token (or
    $SESSIONMGR_LIVEKIT_TOKEN) and --livekit-session-id make a LiveKit one.
    """
    sources = [s for s in (agent_id, agent_image_url, agent_image) if s is not None]
    if len(sources) != 1:
        raise click.UsageError("give exactly one of --agent-id, --agent-image-url, --agent-image")
    daily_token = secret_flag(
        click.get_current_context(), "daily_token", daily_token, daily_token_file
    )
    for token in (daily_token, livekit_token):
        if token:
            SECRETS.add(token)
    if transport_type is None:
        transport_type = "livekit" if livekit_url or livekit_token else "daily"
    for key, value in properties:
        if isinstance(value, str) and is_secret_key(key) and value:
            SECRETS.add(value)
    options = dataclasses.replace(
        CreateOptions.of(locals()),
        agent_image=agent_image.read_bytes() if agent_image is not None else None,
        audio_sample_rate=int(audio_sample_rate) if audio_sample_rate else None,
        connection_properties=dict(properties) or None,
        extra_properties=dict(extra) or None,
        transport_type=transport_type,
    )

    async def go() -> SessionRecord:
        async with open_manager(obj.settings) as manager:
            try:
                record = await manager._create_session(
                    options, idle_window=idle_window, max_age=max_age, metadata=dict(meta) or None
                )
            except ValueError as exc:  # the client's own argument checks (e.g. not a PNG)
                raise click.UsageError(str(exc)) from None
            if wait_active is not None:
                try:
                    record = await manager.wait_until_active(record.id, timeout=wait_active)
                except ActivationTimeout as exc:
                    raise ActivationTimeout(
                        f"#{record.id} {record.session_id}: {exc}; it stays recorded and "
                        "guarded (`sessionmgr show` shows remote_status)",
                        last_status=exc.last_status,
                    ) from None
            return record

    record = run(go())
    print_record(record, as_json=as_json, wide=wide, now=datetime.now(UTC))


def end_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--reason`` and ``--concurrency``, shared by ``end`` and ``end-all``."""
    fn = click.option(
        "--concurrency",
        type=click.IntRange(min=1),
        default=END_CONCURRENCY,
        show_default=True,
        help="Terminate requests in flight at once.",
    )(fn)
    return click.option(
        "--reason",
        type=click.Choice([r.value for r in MANUAL_REASONS]),
        default=EndReason.MANUAL.value,
        show_default=True,
        help="End reason recorded.",
    )(fn)


@cli.command()
@click.argument("session_ids", metavar="SESSION_ID...", nargs=-1, required=True)
@end_options
@json_option
@click.pass_obj
def end(
    obj: CliContext, session_ids: tuple[str, ...], reason: str, concurrency: int, as_json: bool
) -> None:
    """End sessions now.

    SESSION_ID is a local id or a LemonSlice session_id.
    Exit 3 if an id is unknown, 4 if some could not be ended (the reaper retries them), 1 if none
    could.
    """

    async def go() -> list[EndOutcome]:
        async with open_manager(obj.settings) as manager:
            with progress_bar("ending", len(session_ids)) as advance:
                return await end_many(
                    manager,
                    list(dict.fromkeys(session_ids)),
                    reason=EndReason(reason),
                    concurrency=concurrency,
                    advance=advance,
                )

    code = report_end_outcomes(run(go()), as_json=as_json)
    sys.exit(code)


@cli.command()
@click.argument("session_ids", metavar="SESSION_ID...", nargs=-1, required=True)
@json_option
@click.pass_obj
def touch(obj: CliContext, session_ids: tuple[str, ...], as_json: bool) -> None:
    """Record activity now for active sessions.

    SESSION_ID is a local id or a LemonSlice session_id.
    Exit 3 if any id is unknown; sessions that are not active are reported and left alone.
    """

    async def go() -> tuple[list[SessionRecord], list[SessionRecord], list[str]]:
        async with open_repository(obj.settings) as repo:
            found: dict[str, SessionRecord] = {}
            unknown: list[str] = []
            for session_ref in dict.fromkeys(session_ids):
                record = await repo.find(session_ref)
                if record is None:
                    unknown.append(session_ref)
                else:
                    found[session_ref] = record
            wanted = [
                r.session_id
                for r in found.values()
                if r.status is SessionStatus.ACTIVE and r.session_id is not None
            ]
            touched_ids = await repo.touch_many(wanted) if wanted else set()
            touched = [r for r in found.values() if r.session_id in touched_ids]
            idle = [r for r in found.values() if r.session_id not in touched_ids]
            return touched, idle, unknown

    touched, not_active, unknown = run(go())
    if as_json:
        echo_json(
            {
                "touched": [r.to_dict() for r in touched],
                "not_active": [r.to_dict() for r in not_active],
                "unknown": unknown,
            }
        )
    else:
        for r in touched:
            click.echo(f"#{r.id} {r.session_id}: touched")
    for r in not_active:
        label = r.session_id or "(no session_id)"
        click.echo(f"warning: #{r.id} {label} is {r.status}, not touched", err=True)
    for session_ref in unknown:
        click.echo(
            f"error: no session with id or session_id {session_ref!r}: see `sessionmgr list`",
            err=True,
        )
    sys.exit(EXIT_NOT_FOUND if unknown else EXIT_OK)


@cli.command()
@click.argument("session_id")
@click.option("--agent-prompt", help="Replace the prompt that steers the avatar as it speaks.")
@click.option("--idle-prompt", help="Replace the prompt that steers the avatar as it listens.")
@click.option("--image-url", help="Show this image instead.")
@click.option(
    "--image",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Show this PNG instead (at most 900 KB).",
)
@click.option("--action", "action", metavar="NAME", help="Trigger a pose or action by name.")
@click.option("--reset-idle-timeout", is_flag=True, help="Restart LemonSlice's idle clock.")
@json_option
@click.pass_obj
def control(
    obj: CliContext,
    session_id: str,
    agent_prompt: str | None,
    idle_prompt: str | None,
    image_url: str | None,
    image: Path | None,
    action: str | None,
    reset_idle_timeout: bool,
    as_json: bool,
) -> None:
    """Send one control event to an active session; recorded as a `control` event.

    SESSION_ID is a local id or a LemonSlice session_id. Exit 1 if the session is not active (or
    LemonSlice no longer has it: then it is recorded as ended), 3 if the id is unknown.
    """
    given = {
        "--agent-prompt": agent_prompt is not None,
        "--idle-prompt": idle_prompt is not None,
        "--image-url": image_url is not None,
        "--image": image is not None,
        "--action": action is not None,
        "--reset-idle-timeout": reset_idle_timeout,
    }
    if sum(given.values()) != 1:
        raise click.UsageError(f"give exactly one of {', '.join(given)}")
    png = image.read_bytes() if image is not None else None

    async def go() -> SessionRecord:
        async with open_manager(obj.settings) as manager:
            try:
                if agent_prompt is not None:
                    return await manager.update_agent_prompt(session_id, agent_prompt)
                if idle_prompt is not None:
                    return await manager.update_idle_prompt(session_id, idle_prompt)
                if image_url is not None or png is not None:
                    return await manager.update_image(session_id, image_url=image_url, image=png)
                if action is not None:
                    return await manager.trigger_action(session_id, action)
                return await manager.reset_idle_timeout(session_id)
            except InvalidArgument:
                raise
            except ValueError as exc:  # the client's own checks: not a PNG, over 900 KB
                raise click.UsageError(str(exc)) from None

    record = run(go())
    sent = next(flag for flag, on in given.items() if on).lstrip("-")
    if as_json:
        echo_json({"sent": sent, "session": record.to_dict()})
    else:
        click.echo(f"#{record.id} {record.session_id}: {sent} sent")


@cli.command()
@click.argument("session_id")
@click.option("--control-url", help="Its control URL [default: derived from --api-url].")
@click.option("--room-url", help="Its room URL, for the record.")
@click.option("--agent-id", help="The agent it runs, for the record.")
@click.option("--idle-window", type=POSITIVE_DURATION, help="Idle time before the reaper ends it.")
@click.option("--max-age", type=POSITIVE_DURATION, help="Longest life before the reaper ends it.")
@click.option("--meta", type=KEY_VALUE, multiple=True, help="Tag KEY=VALUE stored with it.")
@json_option
@click.option("--wide", is_flag=True, help="Show long URLs in full.")
@click.pass_obj
def adopt(
    obj: CliContext,
    session_id: str,
    control_url: str | None,
    room_url: str | None,
    agent_id: str | None,
    idle_window: float | None,
    max_age: float | None,
    meta: tuple[tuple[str, str], ...],
    as_json: bool,
    wide: bool,
) -> None:
    """Guard a session created elsewhere.

    For sessions started outside sessionmgr (e.g. by pipecat's own transport). The reaper
    then ends it like any other once it is idle or too old.
    """

    async def go() -> tuple[SessionRecord, bool]:
        async with open_manager(obj.settings) as manager:
            known = await manager.repository.find(session_id)
            record = await manager.adopt_session(
                session_id,
                control_url,
                room_url,
                idle_window=idle_window,
                max_age=max_age,
                agent_id=agent_id,
                metadata=dict(meta) or None,
            )
            return record, known is None

    record, adopted = run(go())
    if not as_json:
        click.echo(f"adopted as #{record.id}" if adopted else f"already known as #{record.id}")
    print_record(record, as_json=as_json, wide=wide, now=datetime.now(UTC))
