"""Domain errors. Each carries the gRPC status it maps to (one table: server/transport/status.py), so the data
plane never imports grpc and the transport never guesses a code."""

from __future__ import annotations

# Re-exported: the server's modules quote client values through this module.
from rnnserve.echo import echo as echo
from rnnserve.echo import echo_names as echo_names


class RnnServeError(Exception):
    """Base class: a request the server refuses, with a status and a message saying what to do."""

    status: str = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(RnnServeError):
    status = "INVALID_ARGUMENT"


class NotFound(RnnServeError):
    status = "NOT_FOUND"


class ModelNotFound(NotFound):
    pass


class SessionNotFound(NotFound):
    def __init__(self, session_id: str):
        super().__init__(
            f"session '{echo(session_id)}' not found: it was closed, expired after its idle TTL, or never opened; "
            "open a new session"
        )


class ResourceExhausted(RnnServeError):
    status = "RESOURCE_EXHAUSTED"


class FailedPrecondition(RnnServeError):
    status = "FAILED_PRECONDITION"


class SessionEnded(FailedPrecondition):
    """A call on a session the server ended itself (its model was unloaded by force), not a closed one."""


class AlreadyExists(RnnServeError):
    status = "ALREADY_EXISTS"


class SessionIdUnavailable(AlreadyExists):
    """A proposed session id this caller cannot take: its own session of that id is open (here, or at a
    replica through the session store) or was ended by the server. Ids are per principal with authentication
    on, so another principal's session never makes an id unavailable. The message names no place, and the
    caller's own retry reads it as "my earlier attempt opened it" (the SDK's adopt)."""

    def __init__(self, session_id: str):
        super().__init__(f"session id '{session_id}' is not available: choose another id")


class Aborted(RnnServeError):
    status = "ABORTED"


class SessionMoved(Aborted):
    """Another replica changed the session since this one last wrote or read it (the gateway moved it): the
    local copy is stale and was dropped. A retry of the same call loads the current state from the session
    store, and a step's ``step_index`` keeps the retry from applying twice."""

    def __init__(self, session_id: str):
        super().__init__(
            f"session '{echo(session_id)}' was changed by another replica since this one last saw it (it moved "
            "between replicas); this replica dropped its stale copy: retry the call, it resumes from the "
            "session store"
        )


class Unavailable(RnnServeError):
    status = "UNAVAILABLE"


class OutcomeUnknown(RnnServeError):
    """A change whose outcome the server could not learn (its session-store write was not confirmed: it may
    land later). DEADLINE_EXCEEDED is gRPC's status for "may have completed"; a retry with the same
    ``step_index`` settles it, applying the step at most once."""

    status = "DEADLINE_EXCEEDED"


class Internal(RnnServeError):
    status = "INTERNAL"
