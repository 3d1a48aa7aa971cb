"""Every exception sessionmgr raises, in one place.

::

    SessionMgrError
    ├── LemonSliceError                 the LemonSlice API said no, or could not be reached
    │   ├── AuthError                   401 / 403: the API key is wrong or lacks rights
    │   ├── NotFoundError               404 / 410: the session is gone (terminate treats it as done)
    │   ├── RateLimitedError            429, with ``retry_after`` seconds when the server said
    │   ├── ServerError                 5xx
    │   ├── ClientRequestError          any other 4xx: the request itself was rejected
    │   │   └── NoCreditsError          402: no subscription or not enough credits
    │   ├── TransportError              connect failure, timeout, dropped connection
    │   │   └── CreateOutcomeUnknown    a create was sent and its answer was lost
    │   └── InvalidResponseError        non-JSON, an HTML page, or JSON missing required fields
    ├── ConfigurationError              a missing API key, a bad URL or setting
    │   └── IntegrationError            pipecat / LiveKit are missing or not the expected shape
    ├── InvalidArgument                 a bad argument, refused before any I/O (also a
    │   │                               ValueError and a TypeError, as Python code expects)
    │   └── UntrustedURLError           a control_url off LemonSlice's origin (the key would go)
    ├── DatabaseError                   the database cannot be used as it is
    │   ├── DatabaseNotMigrated         behind the migrations: run ``sessionmgr db upgrade``
    │   └── DatabaseLocked              another process held the write lock past the busy timeout
    ├── SessionNotFound                 no record with that id or session_id
    ├── IntentTakenOver                 a create's answer came after recovery resolved its
    │                                   intent (``record``: the session as recorded)
    ├── SessionNotLive                  a control event or a wait on a session that is over
    │                                   (refused before any request), or ended while waited on
    └── ActivationTimeout               ``wait_until_active`` ran out of time (still QUEUED)

Messages are one line and say what to do; none carries the API key or a token.
"""

from __future__ import annotations

BODY_EXCERPT_CHARS = 200  # characters of a response body kept on an error


class SessionMgrError(Exception):
    """Base of every sessionmgr error."""


class LemonSliceError(SessionMgrError):
    """The LemonSlice API failed; ``status`` is the HTTP status (None when no answer came)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: str | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        self.status = status
        self.body = excerpt(body) if body is not None else None
        self.method = method
        self.url = url
        super().__init__(message)

    def __str__(self) -> str:
        parts = [self.args[0] if self.args else type(self).__name__]
        if self.method and self.url:
            parts.append(f"({self.method} {self.url})")
        if self.status is not None:
            parts.append(f"[HTTP {self.status}]")
        if self.body:
            parts.append(f"body: {self.body!r}")
        return " ".join(parts)


class AuthError(LemonSliceError):
    """401/403: check LEMONSLICE_API_KEY."""


class NotFoundError(LemonSliceError):
    """404/410: the session does not exist (any more)."""


class RateLimitedError(LemonSliceError):
    """429; ``retry_after`` is the server's hint in seconds, if it gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kw)  # type: ignore[arg-type]


class ServerError(LemonSliceError):
    """5xx from LemonSlice."""


class ClientRequestError(LemonSliceError):
    """Another 4xx: the request was rejected and retrying will not help."""


class NoCreditsError(ClientRequestError):
    """402: the account has no subscription or not enough credits. Never retried: a retry
    cannot help until someone tops up."""


class TransportError(LemonSliceError):
    """No usable answer: connection refused or dropped, or a timeout."""


class CreateOutcomeUnknown(TransportError):
    """A create POST was sent but its answer was lost: a session may or may not exist.

    Never retried blindly (a retry could start a second paid session); the manager leaves the
    intent ``pending`` and reconcile resolves it.
    """


class InvalidResponseError(LemonSliceError):
    """The answer was not the JSON the protocol promises."""


class ConfigurationError(SessionMgrError):
    """A setting is missing or malformed."""


class IntegrationError(ConfigurationError):
    """An integration (sessionmgr/integrations/) cannot work with the installed framework: it is
    missing, or its internals are not what this version of sessionmgr was built against."""


class InvalidArgument(SessionMgrError, ValueError, TypeError):
    """A bad argument (a NaN window, text no database can store, a naive datetime...), refused
    before anything is written or sent. Subclasses ValueError and TypeError, so code written
    against the plain built-in errors keeps working."""


class UntrustedURLError(InvalidArgument):
    """A ``control_url`` on another origin than the API URL's (or a configured one): the API key
    travels with every control request, so none is sent there."""


class DatabaseError(SessionMgrError):
    """The database cannot be used as it is."""


class DatabaseNotMigrated(DatabaseError):
    """The schema is behind the code: run ``sessionmgr db upgrade``."""


class DatabaseLocked(DatabaseError):
    """SQLite stayed locked past the busy timeout."""


class SessionNotFound(SessionMgrError):
    """No session record with that id or session_id."""


class IntentTakenOver(SessionMgrError):
    """A create's answer arrived after its intent was resolved by recovery (its creator could not
    renew the intent's lease in time, so it was presumed dead) and the session was recorded, and
    ended, on that account. ``record`` is that session as it stands; nothing is raised as a raw
    database error, and the caller must not use the session."""

    def __init__(self, message: str, *, record: object) -> None:
        self.record = record
        super().__init__(message)


class SessionNotLive(SessionMgrError):
    """The session is not live (pending, ending, ended, failed, or finished at LemonSlice), so a
    control event for it is refused before anything is sent."""


class ActivationTimeout(SessionMgrError):
    """A session did not become ACTIVE within the time given; ``last_status`` is what
    LemonSlice said last (usually QUEUED: a cold start)."""

    def __init__(self, message: str, *, last_status: str | None = None) -> None:
        self.last_status = last_status
        super().__init__(message)


def excerpt(text: str, limit: int = BODY_EXCERPT_CHARS) -> str:
    """A short single-line excerpt of a response body, for error messages."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
